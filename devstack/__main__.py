"""`make run`: Redis (unless REDIS_URL is set or one answers on 6379), the authz server,
Envoy on 127.0.0.1:10000 and the mock upstream, in the foreground; Ctrl-C stops it all."""

from __future__ import annotations

import os
import secrets
import signal
import sys
import threading

from devstack import processes as p
from devstack.mock_upstream import MockUpstream

RUN_DIR = p.ROOT / ".run"


def main() -> int:
    RUN_DIR.mkdir(exist_ok=True)
    ports = dict(p.ENVOY_PORTS)
    http_port = int(os.environ.get("EXTAUTHZ_HTTP_PORT", "9192"))
    busy = [f"{n}={port}" for n, port in [*ports.items(), ("http", http_port)] if p.port_open(port)]
    if busy:
        print(f"make run: ports already in use: {', '.join(busy)}", file=sys.stderr)
        return 1
    started: list[p.Process] = []
    upstream: MockUpstream | None = None
    try:
        redis_url = os.environ.get("REDIS_URL", "")
        if not redis_url:
            if p.port_open(6379):
                redis_url = "redis://127.0.0.1:6379/0"
            else:
                redis = p.RedisServer(RUN_DIR / "redis", port=6379, appendonly=True).start()
                assert redis.process is not None
                started.append(redis.process)
                redis_url = redis.url
        admin_token = os.environ.get("EXTAUTHZ_ADMIN_TOKEN") or secrets.token_urlsafe(24)
        usage_token = os.environ.get("EXTAUTHZ_USAGE_TOKEN") or secrets.token_urlsafe(24)
        env = p.extauthz_env(
            redis_url=redis_url,
            grpc_port=ports["extauthz"],
            http_port=http_port,
            admin_token=admin_token,
            usage_token=usage_token,
            extra={
                k: v
                for k, v in os.environ.items()
                if k.startswith(("EXTAUTHZ_", "VIRTUAL_KEY_"))
                and k not in ("EXTAUTHZ_GRPC_PORT", "EXTAUTHZ_HTTP_PORT", "EXTAUTHZ_BIND")
            },
        )
        env["EXTAUTHZ_ADMIN_TOKEN"], env["EXTAUTHZ_USAGE_TOKEN"] = admin_token, usage_token
        env.setdefault("EXTAUTHZ_JOURNAL_DIR", str(RUN_DIR / "journal"))
        env.setdefault("EXTAUTHZ_DRAIN_SECONDS", "0")  # nothing to drain for: stop at once
        started.append(p.start_extauthz(env, RUN_DIR / "extauthz.log"))
        upstream = MockUpstream(
            ports["upstream"], f"127.0.0.1:{ports['extauthz']}", usage_token
        ).start()
        config = RUN_DIR / "envoy.yaml"
        config.write_text(p.render_envoy_config(ports))
        started.append(p.start_envoy(config, ports["listener"], RUN_DIR / "envoy.log"))
        print(
            f"\nready: Envoy on http://127.0.0.1:{ports['listener']} -> mock upstream; "
            f"extauthz gRPC on 127.0.0.1:{ports['extauthz']}, HTTP on 127.0.0.1:{http_port}; "
            f"Redis at {redis_url}\n"
            f"admin token: {admin_token}\n"
            f"  export TOKEN={admin_token}\n"
            "logs in .run/ (Ctrl-C stops everything)\n",
            flush=True,
        )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            dead = [proc for proc in started if proc.proc.poll() is not None]
            if dead:
                print(
                    f"make run: a process exited; see {dead[0].log_path}",
                    file=sys.stderr,
                )
                return 1
        return 0
    finally:
        if upstream is not None:
            upstream.stop()
        p.terminate_all(started)
        print("stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
