"""The devstack mock upstream (devstack/mock_upstream.py) in a process of its own, as an
upstream that reports nothing (`reports=False`): the usage tap's case, where only the
responses carry usage. Its own process, so its threads never share a GIL with the
bench's client, whose clock they would otherwise disturb.

    python -m bench.mock_server --port 8000
"""

from __future__ import annotations

import argparse
import signal
import threading

from devstack.mock_upstream import MockUpstream


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.mock_server", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # reports=False: it never calls ReportUsage, so the address is never dialled
    mock = MockUpstream(args.port, "127.0.0.1:1", "unused", reports=False).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        mock.seen.clear()  # it keeps every request; a long run needs none of them
    mock.stop()


if __name__ == "__main__":
    main()
