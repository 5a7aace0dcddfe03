"""`extauthz serve --workers 2`: two processes on one port, one limit between them."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from devstack import processes as p
from tests.conftest import SERVER_DEFAULTS
from tests.helpers import Clients, chat_body, fetch

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("how", ["flag", "env"])
def test_two_workers_share_the_ports_and_enforce_one_limit(
    redis_url: str, tmp_path: Path, how: str
) -> None:
    extra = {**SERVER_DEFAULTS, "EXTAUTHZ_JOURNAL_DIR": str(tmp_path / "journal")}
    args: list[str] = []
    if how == "flag":
        args = ["--workers", "2"]
    else:
        extra["EXTAUTHZ_WORKERS"] = "2"  # inherited by the workers, who must not fork again
    # returns once both workers log that they serve (the first to bind opens the port)
    server = p.start_extauthz(
        redis_url=redis_url,
        log_path=tmp_path / "workers.log",
        admin_token="adm-workers",
        usage_token="use-workers",
        extra=extra,
        args=args,
        workers=2,
    )
    grpc_port, http_port, process = server.grpc_port, server.http_port, server.process
    try:
        # many channels, so the kernel spreads connections over both workers
        channels = [
            grpc.insecure_channel(
                f"127.0.0.1:{grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(8)
        ]
        clients = [Clients(c, "adm-workers", "use-workers") for c in channels]
        key, _ = clients[0].create_key(rpm_limit=30, tpm_limit=0, max_budget=0)
        auth = {"authorization": f"Bearer {key}"}
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(
                pool.map(
                    lambda i: int(
                        clients[i % 8].check(auth, chat_body()).denied_response.status.code
                    ),
                    range(80),
                )
            )
        assert statuses.count(0) == 30 and statuses.count(429) == 50
        # one journal directory, a subdirectory in it per worker
        owned = [d for d in (tmp_path / "journal").iterdir() if d.is_dir()]
        assert len(owned) == 2
        assert fetch(http_port, "GET", "/healthz").status == 200
        assert process.log_text().count('"msg": "serving"') == 2
        for channel in channels:
            channel.close()
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(timeout=20) == 0
    finally:
        process.stop()
