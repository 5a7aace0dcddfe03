"""Start, wait for and stop the real processes of the stack."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# Below the kernel's ephemeral range (32768-60999 by default), so a port handed out here
# never collides with the local end of an outgoing connection (the server does not share
# ports: a collision would be "port in use").
_PORTS = range(20000, 32000)


def free_port() -> int:
    """A port nothing on 127.0.0.1 is bound to now."""
    for _ in range(200):
        port = random.choice(_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found in 200 tries")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
    if proc is None or proc.poll() is not None:
        return proc.returncode if proc is not None else 0
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def executable(name: str) -> str:
    """A console script of this environment (envoy, grpcurl, extauthz), else from PATH."""
    local = BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found; run `make install`")
    return found


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        code = stop(self.proc, sig)
        self._log.close()
        return code

    def log_text(self) -> str:
        return self.log_bytes().decode(errors="replace")

    def log_bytes(self) -> bytes:
        self._log.flush()
        return self.log_path.read_bytes()


def spawn(
    args: list[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    *,
    user: str | None = None,
    cwd: Path | None = None,
) -> Process:
    """`args` in the background, output to `log_path` (opened here, so a process run as
    another `user` needs no right to write there)."""
    log = log_path.open("ab")
    proc = subprocess.Popen(
        args,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        user=user,
        cwd=cwd,
    )
    return Process(proc, log_path, log)


@dataclass
class RedisServer:
    """A redis-server of our own in `directory` (so it can be stopped, restarted, persisted)."""

    directory: Path
    port: int = field(default_factory=free_port)
    appendonly: bool = False
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            executable("redis-server"),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
        ]
        self.process = spawn(args, self.directory / "redis.log")
        wait_port(self.port, self.process.proc)
        return self

    def running(self) -> Process:
        if self.process is None:
            raise RuntimeError(f"redis-server in {self.directory} is not running")
        return self.process

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: a clean shutdown (AOF flushed); SIGKILL: a crash."""
        if self.process is not None:
            self.process.stop(sig)
            self.process = None


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program (initdb, postgres). Debian keeps them off PATH, under
    /usr/lib/postgresql/<major>/bin: the newest major there, unless PATH has one."""
    found = shutil.which(name)
    if found is not None:
        return found
    majors = sorted(
        (p for p in Path("/usr/lib/postgresql").glob(f"*/bin/{name}") if p.parts[-3].isdigit()),
        key=lambda p: int(p.parts[-3]),
    )
    if not majors:
        raise FileNotFoundError(f"{name} not found; run `make install` (Debian's postgresql)")
    return str(majors[-1])


@dataclass
class PostgresServer:
    """A PostgreSQL of our own, for tests that stop and restart it: `initdb` into a new data
    directory, then `postgres` in the foreground on a free loopback port (like RedisServer;
    `pg_ctl` would daemonize it, and a test that dies would leave it running). PostgreSQL
    refuses to run as root, so as root it runs as the `postgres` user, with its data in a
    directory of the system's temp dir that user owns; `remove()` deletes it."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: Process | None = None
    data: Path | None = None
    # False (tests): no fsync, as a test kills processes, not machines. True (bench): every
    # commit reaches the disk, as in production.
    fsync: bool = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def user(self) -> str | None:
        return "postgres" if os.geteuid() == 0 else None

    def start(self, timeout: float = 30) -> PostgresServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.data is None:
            self.data = self._initdb()
        args = [
            postgres_bin("postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
            "-c",
            f"fsync={'on' if self.fsync else 'off'}",
        ]
        self.process = spawn(args, self.directory / "postgres.log", user=self.user, cwd=self.data)
        self._wait_ready(timeout)
        return self

    def _initdb(self) -> Path:
        if self.user is None:
            data = self.directory / "data"
        else:
            data = Path(tempfile.mkdtemp(prefix="extauthz-pg-"))
            owner = pwd.getpwnam(self.user)
            os.chown(data, owner.pw_uid, owner.pw_gid)
        with (self.directory / "initdb.log").open("ab") as log:
            subprocess.run(
                [
                    postgres_bin("initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
                user=self.user,
                cwd=data,
            )
        return data

    def _wait_ready(self, timeout: float) -> None:
        """The port opens before recovery ends: wait for a connection to be accepted."""
        proc = self.running().proc
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=1).close()
                return
            except psycopg.OperationalError:
                log = self.running().log_text()[-2000:]
                if proc.poll() is not None:
                    raise RuntimeError(f"postgres exited with {proc.returncode}:\n{log}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"postgres on port {self.port} not ready:\n{log}") from None
                time.sleep(0.1)

    def running(self) -> Process:
        if self.process is None:
            raise RuntimeError(f"postgres in {self.directory} is not running")
        return self.process

    def stop(self, sig: int = signal.SIGINT) -> None:
        """SIGINT: PostgreSQL's fast shutdown (clients are disconnected); SIGQUIT: its
        immediate shutdown, a crash that the next start recovers from."""
        if self.process is not None:
            self.process.stop(sig)
            self.process = None

    def restart(self, sig: int = signal.SIGINT) -> None:
        self.stop(sig)
        self.start()

    def remove(self) -> None:
        self.stop()
        if self.data is not None:
            shutil.rmtree(self.data, ignore_errors=True)
            self.data = None


def extauthz_env(
    *,
    redis_url: str | None,
    grpc_port: int,
    http_port: int,
    admin_token: str,
    usage_token: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The server's environment: ours minus any EXTAUTHZ_/VIRTUAL_KEY_ settings, then these.
    `redis_url=None` leaves the REDIS_* variables of our environment to name the Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXTAUTHZ_", "VIRTUAL_KEY_"))}
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    env.update(
        EXTAUTHZ_BIND="127.0.0.1",
        EXTAUTHZ_GRPC_PORT=str(grpc_port),
        EXTAUTHZ_HTTP_PORT=str(http_port),
        EXTAUTHZ_ADMIN_TOKEN=admin_token,
        EXTAUTHZ_USAGE_TOKEN=usage_token,
    )
    env.update(extra or {})
    return env


@dataclass
class Extauthz:
    """A running `extauthz serve` (one process, or a parent with its workers)."""

    grpc_port: int
    http_port: int
    admin_token: str
    usage_token: str
    process: Process

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return self.process.stop(sig)


SERVING = '"msg": "serving"'  # the server's log line once both of its ports answer


def start_extauthz(
    *,
    redis_url: str | None,
    log_path: Path,
    grpc_port: int | None = None,
    http_port: int | None = None,
    admin_token: str | None = None,
    usage_token: str | None = None,
    extra: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    workers: int = 1,
    timeout: float = 20,
) -> Extauthz:
    """The one way devstack, bench and tests start the server: `extauthz serve [args]`
    on the given (else free) ports, returned once `workers` processes log that they serve.
    The log line, not an open port, is the signal: workers share one port, so the first
    to bind would open it for all."""
    grpc = grpc_port if grpc_port is not None else free_port()
    http = http_port if http_port is not None else free_port()
    admin = admin_token or "adm-" + secrets.token_urlsafe(16)
    usage = usage_token or "use-" + secrets.token_urlsafe(16)
    env = extauthz_env(
        redis_url=redis_url,
        grpc_port=grpc,
        http_port=http,
        admin_token=admin,
        usage_token=usage,
        extra=extra,
    )
    before = log_path.stat().st_size if log_path.exists() else 0
    process = spawn([executable("extauthz"), "serve", *args], log_path, env)
    try:
        wait_log(process, SERVING, count=workers, offset=before, timeout=timeout)
    except BaseException:
        process.stop(signal.SIGKILL)
        raise
    return Extauthz(grpc, http, admin, usage, process)


def wait_log(
    process: Process, text: str, *, count: int = 1, offset: int = 0, timeout: float = 20
) -> None:
    """Until `text` appears `count` times in the process's log after byte `offset`."""
    deadline = time.monotonic() + timeout
    while True:
        if process.log_bytes()[offset:].decode(errors="replace").count(text) >= count:
            return
        if process.proc.poll() is not None:
            raise RuntimeError(
                f"{process.proc.args!r} exited with {process.proc.returncode}:\n"
                f"{process.log_text()[-2000:]}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{process.proc.args!r} did not log {text!r} in {timeout}s")
        time.sleep(0.05)


# envoy.yaml's ports, by role; "extauthz_http" is the server's HTTP port (the console, /ui).
ENVOY_PORTS = {
    "listener": 10000,
    "extauthz": 9191,
    "extauthz_http": 9192,
    "upstream": 8000,
    "admin": 9901,
}
# grpc_json_transcoder's descriptor set, as envoy.yaml names it: relative to the repo root.
ENVOY_DESCRIPTOR = "keys/v1/keys.pb"


TAP_FILTER = "envoy.filters.http.ext_proc"
AUTHZ_FILTER = "envoy.filters.http.ext_authz"


def without_tap(text: str) -> str:
    """An envoy.yaml without the usage tap: no ext_proc filters, and no route telling Check
    that a tap runs (so no clamping). What a deployment that meters only through
    ReportUsage runs; the tests of reservations held by an unreporting upstream use it."""
    config = yaml.safe_load(text)
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                manager = network_filter["typed_config"]
                manager["http_filters"] = [
                    f for f in manager["http_filters"] if not f["name"].startswith(TAP_FILTER)
                ]
                for host in manager["route_config"]["virtual_hosts"]:
                    for route in host["routes"]:
                        per_route = route.get("typed_per_filter_config", {})
                        per_route.pop(TAP_FILTER, None)
                        if "check_settings" in per_route.get(AUTHZ_FILTER, {}):
                            del per_route[AUTHZ_FILTER]
    return str(yaml.safe_dump(config, sort_keys=False))


def render_envoy_config(
    ports: Mapping[str, int], template: Path = ROOT / "envoy.yaml", *, tap: bool = True
) -> str:
    """envoy.yaml with `ports` in place of the defaults and the descriptor path made absolute
    (under ROOT), so the Envoy it configures may run from any working directory; with
    `tap=False`, without the usage tap (`without_tap`)."""
    text = template.read_text()
    for name, default in ENVOY_PORTS.items():
        text = text.replace(f"port_value: {default} ", f"port_value: {ports[name]} ")
    relative = f"proto_descriptor: {ENVOY_DESCRIPTOR}"
    if relative in text:
        descriptor = ROOT / ENVOY_DESCRIPTOR
        if not descriptor.is_file():
            raise FileNotFoundError(f"{descriptor} is missing; run `make protos`")
        # A JSON string is a YAML double-quoted scalar: safe for any path.
        text = text.replace(relative, f"proto_descriptor: {json.dumps(str(descriptor))}")
    return text if tap else without_tap(text)


def start_envoy(config_path: Path, listener_port: int, log_path: Path) -> Process:
    args = [
        executable("envoy"),
        "-c",
        str(config_path),
        "--disable-hot-restart",
        "--log-level",
        "warning",
    ]
    process = spawn(args, log_path)
    wait_port(listener_port, process.proc, timeout=30)
    return process


def terminate_all(processes: list[Process]) -> None:
    for process in reversed(processes):
        with contextlib.suppress(Exception):
            process.stop()


NGINX_PORTS = {"listener": 8080, "extauthz_http": 9192, "upstream": 8000}


def render_nginx_config(
    ports: Mapping[str, int], template: Path = ROOT / "deploy" / "nginx" / "nginx.conf"
) -> str:
    text = template.read_text()
    for name, default in NGINX_PORTS.items():
        text = text.replace(f"127.0.0.1:{default};", f"127.0.0.1:{ports[name]};")
    return text


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        raise FileNotFoundError("nginx not found; run `make install` (installs Debian's nginx)")
    return found


def start_nginx(config_path: Path, listener_port: int, work_dir: Path) -> Process:
    """nginx in the foreground with its pid and temp files under `work_dir`."""
    for sub in ("logs", "tmp"):
        (work_dir / sub).mkdir(parents=True, exist_ok=True)
    args = [
        nginx_binary(),
        "-p",
        str(work_dir),
        "-c",
        str(config_path),
        "-g",
        f"daemon off; pid {work_dir / 'nginx.pid'};",
    ]
    process = spawn(args, work_dir / "nginx.log")
    wait_port(listener_port, process.proc)
    return process
