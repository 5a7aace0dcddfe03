"""`make run`: Redis (the one REDIS_URL or REDIS_HOST/PORT/DB name, else one on 6379, else
its own), the authz server, Envoy on 127.0.0.1:10000 and the mock upstream, and with
LEDGER_DATABASE_URL set the ledger's sink, in the foreground; the banner says whose Redis
it is and whether it answers. Ctrl-C stops it all."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping

from devstack import processes as p
from devstack import redis_target
from devstack.mock_upstream import MockUpstream
from extauthz.settings import Settings, SettingsError
from ledger.settings import database_label

RUN_DIR = p.ROOT / ".run"
LEDGER_METRICS_PORT = int(os.environ.get("LEDGER_METRICS_PORT") or 9193)


def main() -> int:
    RUN_DIR.mkdir(exist_ok=True)
    ports = dict(p.ENVOY_PORTS)
    try:  # the server's own settings: a bad value stops here, before anything starts
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 2
    http_port = ports["extauthz_http"] = settings.http_port  # Envoy sends /ui (the console) there
    needed = list(ports.items())
    if settings.ledger_database_url:
        needed.append(("ledger-metrics", LEDGER_METRICS_PORT))
    busy = [f"{n}={port}" for n, port in needed if p.port_open(port)]
    if busy:
        print(f"make run: ports already in use: {', '.join(busy)}", file=sys.stderr)
        return 1
    started: list[p.Process] = []
    upstream: MockUpstream | None = None
    try:
        redis = redis_target.choose(
            os.environ, p.port_open(redis_target.DEFAULT_PORT), ".run/redis"
        )
        if redis.start_own:
            own = p.RedisServer(RUN_DIR / "redis", redis_target.DEFAULT_PORT, appendonly=True)
            started.append(own.start().running())
        admin_token = os.environ.get("EXTAUTHZ_ADMIN_TOKEN") or kept_token("admin-token")
        usage_token = os.environ.get("EXTAUTHZ_USAGE_TOKEN") or kept_token("usage-token")
        server = p.start_extauthz(
            redis_url=redis.env.get("REDIS_URL"),  # None: the user's REDIS_* pass through
            log_path=RUN_DIR / "extauthz.log",
            grpc_port=ports["extauthz"],
            http_port=http_port,
            admin_token=admin_token,
            usage_token=usage_token,
            extra={
                "EXTAUTHZ_JOURNAL_DIR": str(RUN_DIR / "journal"),
                "EXTAUTHZ_DRAIN_SECONDS": "0",  # nothing to drain for: stop at once
                **{
                    k: v
                    for k, v in os.environ.items()
                    if k.startswith(("EXTAUTHZ_", "VIRTUAL_KEY_"))
                    and k not in ("EXTAUTHZ_GRPC_PORT", "EXTAUTHZ_HTTP_PORT", "EXTAUTHZ_BIND")
                },
            },
        )
        started.append(server.process)
        if settings.ledger_database_url:
            started.append(start_ledger(redis.env.get("REDIS_URL")))
        upstream = MockUpstream(
            ports["upstream"],
            f"127.0.0.1:{ports['extauthz']}",
            usage_token,
            log_path=RUN_DIR / "upstream.log",
            reports=False,  # the usage tap charges its responses: no ReportUsage needed
        ).start()
        config = RUN_DIR / "envoy.yaml"
        config.write_text(p.render_envoy_config(ports))
        started.append(p.start_envoy(config, ports["listener"], RUN_DIR / "envoy.log"))
        redis_ok = ready(http_port)
        print(banner(ports, http_port, redis, redis_ok, admin_token), flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            if not redis_ok and ready(http_port):
                redis_ok = True
                print(f"Redis at {redis.described()} answers now: ready", flush=True)
            dead = [proc for proc in started if proc.proc.poll() is not None]
            if dead:
                print(
                    f"make run: a process exited; see {dead[0].log_path}",
                    file=sys.stderr,
                )
                return 1
        return 0
    except RuntimeError as exc:  # a process failed to start: its own words, no traceback
        print(f"make run: {exc}", file=sys.stderr)
        return 1
    finally:
        if upstream is not None:
            upstream.stop()
        p.terminate_all(started)
        print("stopped", flush=True)


def start_ledger(redis_url: str | None) -> p.Process:
    """LEDGER_DATABASE_URL is set: the ledger's schema migrated, then its sink running
    next to the server (its log: .run/ledger.log). Without it, nothing of the ledger runs."""
    env = dict(os.environ)
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    log_path = RUN_DIR / "ledger.log"
    migrate = subprocess.run(
        [p.executable("extauthz"), "ledger", "migrate"], env=env, capture_output=True, text=True
    )
    if migrate.returncode != 0:
        raise RuntimeError(migrate.stderr.strip())  # it names itself: "extauthz ledger: ..."
    before = log_path.stat().st_size if log_path.exists() else 0  # earlier runs' lines
    sink = p.spawn([p.executable("extauthz"), "ledger", "run"], log_path, env)
    p.wait_log(sink, '"msg": "ledger sink started"', offset=before)
    print(f"ledger: writing to {database_label(env['LEDGER_DATABASE_URL'])} (log .run/ledger.log)")
    return sink


def ready(http_port: int) -> bool:
    """The server's own /readyz: it pings Redis (any URL form, with its credentials)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as reply:
            return bool(reply.status == 200)
    except (OSError, urllib.error.HTTPError):
        return False


def kept_token(name: str) -> str:
    """A token generated on the first `make run` and kept in .run/<name> (mode 0600), so the
    keys you made and the TOKEN you exported still work after a restart."""
    path = RUN_DIR / name
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(24)
    path.touch(mode=0o600)
    path.chmod(0o600)  # touch keeps the mode of a file that was already there
    path.write_text(token + "\n")
    return token


def banner(
    ports: Mapping[str, int],
    http_port: int,
    redis: redis_target.RedisTarget,
    redis_ok: bool,
    admin_token: str,
) -> str:
    """What `make run` prints once everything is started; `ready` only when Redis answers."""
    if redis_ok:
        state = f"ready: Envoy on http://127.0.0.1:{ports['listener']} -> mock upstream"
    else:
        state = (
            f"NOT READY: Redis at {redis.described()} cannot be reached; the server keeps "
            "retrying (see .run/extauthz.log).\n"
            f"Started anyway: Envoy on http://127.0.0.1:{ports['listener']} -> mock upstream"
        )
    return (
        f"\n{state}; extauthz gRPC on 127.0.0.1:{ports['extauthz']}, "
        f"HTTP on 127.0.0.1:{http_port}\n"
        f"Redis: {redis.described()}\n"
        f"admin token: {admin_token} (kept in .run/admin-token; EXTAUTHZ_ADMIN_TOKEN sets one)\n"
        f"console: http://127.0.0.1:{ports['listener']}/ui/ (sign in with the admin token)\n"
        f"  export TOKEN={admin_token}\n"
        "logs in .run/; what the upstream received: .run/upstream.log (Ctrl-C stops everything)\n"
    )


if __name__ == "__main__":
    sys.exit(main())
