"""`extauthz serve --workers N`: N server processes sharing the gRPC and HTTP ports.

One Python process is bound to one core; with SO_REUSEPORT (grpc's default on Linux, and
set on the HTTP socket) the kernel spreads connections over the workers. Every limit stays
exact, since all state is in Redis. The workers share the journal directory: each writes
in its own subdirectory of it (keys/journal.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import FrameType


def run_workers(count: int) -> int:
    """Starts `count` workers, forwards SIGTERM/SIGINT, and exits when they all have
    (non-zero if any failed). A worker that dies is not replaced: the supervisor exits
    so the orchestrator (Kubernetes, systemd) restarts the whole set."""
    children: list[subprocess.Popen[bytes]] = []
    for index in range(count):
        # EXTAUTHZ_WORKERS=1: a worker serves; it must not start workers of its own
        env = dict(
            os.environ,
            EXTAUTHZ_WORKER_INDEX=str(index),
            EXTAUTHZ_WORKERS="1",
            EXTAUTHZ_REUSE_PORT="true",  # the workers share the ports on purpose
        )
        children.append(
            subprocess.Popen([sys.executable, "-m", "extauthz.server", "serve"], env=env)
        )

    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while all(child.poll() is None for child in children):
        time.sleep(0.2)
    if not stopping:  # one died on its own: stop the rest (once: a second signal would
        forward(signal.SIGTERM, None)  # catch a worker past its handlers, mid-exit)
    codes = [child.wait() for child in children]
    return max(codes, key=abs)
