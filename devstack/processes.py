"""Start, wait for and stop the real processes of the stack."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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


def stop(
    proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 10
) -> int:
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
        self._log.flush()
        return self.log_path.read_text(errors="replace")


def spawn(args: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> Process:
    log = log_path.open("ab")
    proc = subprocess.Popen(
        args,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
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

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: a clean shutdown (AOF flushed); SIGKILL: a crash."""
        if self.process is not None:
            self.process.stop(sig)
            self.process = None


def extauthz_env(
    *,
    redis_url: str,
    grpc_port: int,
    http_port: int,
    admin_token: str,
    usage_token: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXTAUTHZ_", "VIRTUAL_KEY_"))}
    env.update(
        REDIS_URL=redis_url,
        EXTAUTHZ_BIND="127.0.0.1",
        EXTAUTHZ_GRPC_PORT=str(grpc_port),
        EXTAUTHZ_HTTP_PORT=str(http_port),
        EXTAUTHZ_ADMIN_TOKEN=admin_token,
        EXTAUTHZ_USAGE_TOKEN=usage_token,
    )
    env.update(extra or {})
    return env


def start_extauthz(env: Mapping[str, str], log_path: Path) -> Process:
    process = spawn([executable("extauthz"), "serve"], log_path, env)
    wait_port(int(env["EXTAUTHZ_GRPC_PORT"]), process.proc)
    return process


ENVOY_PORTS = {"listener": 10000, "extauthz": 9191, "upstream": 8000, "admin": 9901}
# grpc_json_transcoder's descriptor set, as envoy.yaml names it: relative to the repo root.
ENVOY_DESCRIPTOR = "keys/v1/keys.pb"


def render_envoy_config(ports: Mapping[str, int], template: Path = ROOT / "envoy.yaml") -> str:
    """envoy.yaml with `ports` in place of the defaults and the descriptor path made absolute
    (under ROOT), so the Envoy it configures may run from any working directory."""
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
    return text


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


@dataclass
class RedisCluster:
    """A Redis Cluster of our own on loopback: `masters` primaries, each with `replicas`
    replicas, one redis-server per node under `directory/<port>/` (append-only files
    on), joined by `redis-cli --cluster create`. `url` is the `redis+cluster://` seed
    form that REDIS_URL takes."""

    directory: Path
    masters: int = 3
    replicas: int = 0
    node_timeout_ms: int = 1000
    ports: list[int] = field(default_factory=list)
    processes: dict[int, Process] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self, timeout: float = 30) -> RedisCluster:
        count = self.masters * (1 + self.replicas)
        # The cluster bus needs a port of its own (by default port + 10000, which can
        # fall outside 1..65535 for an ephemeral port), so each node gets two free ports.
        taken: set[int] = set()
        while len(taken) < 2 * count:
            taken.add(free_port())
        chosen = sorted(taken)
        self.ports, bus_ports = chosen[:count], chosen[count:]
        try:
            for port, bus_port in zip(self.ports, bus_ports, strict=True):
                self._start_node(port, bus_port)
            self._create(timeout)
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self, timeout: float) -> None:
        create = subprocess.run(
            [
                executable("redis-cli"),
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        (self.directory / "create.log").write_text(create.stdout + create.stderr)
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout[-2000:]}")

    def _start_node(self, port: int, bus_port: int) -> None:
        node_dir = self.directory / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        args = [
            executable("redis-server"),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(node_dir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{port}.conf",
            "--cluster-node-timeout",
            str(self.node_timeout_ms),
            "--cluster-port",
            str(bus_port),
        ]
        process = spawn(args, node_dir / "redis.log")
        self.processes[port] = process
        wait_port(port, process.proc)

    def cli(self, port: int, *args: str) -> str:
        """One redis-cli command against one node; its reply as text."""
        done = subprocess.run(
            [executable("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout

    def live_ports(self) -> list[int]:
        return [port for port, p in self.processes.items() if p.proc.poll() is None]

    def cluster_info(self, port: int) -> dict[str, str]:
        lines = self.cli(port, "cluster", "info").splitlines()
        return dict(line.strip().split(":", 1) for line in lines if ":" in line)

    def nodes(self, port: int | None = None) -> list[dict[str, str]]:
        """CLUSTER NODES as seen by `port` (any live node by default): one dict per node
        with id, port, flags, master (its primary's id, or `-`) and slots."""
        seen_by = port if port is not None else self.live_ports()[0]
        rows = []
        for line in self.cli(seen_by, "cluster", "nodes").splitlines():
            parts = line.split()
            if len(parts) < 8:
                continue
            address = parts[1].split("@", 1)[0]
            rows.append(
                {
                    "id": parts[0],
                    "port": address.rsplit(":", 1)[1],
                    "flags": parts[2],
                    "master": parts[3],
                    "slots": " ".join(parts[8:]),
                }
            )
        return rows

    def keyslot(self, key: str) -> int:
        return int(self.cli(self.live_ports()[0], "cluster", "keyslot", key).strip())

    def owner_of(self, key: str, seen_by: int | None = None) -> int:
        """The port of the primary serving `key`'s slot (CLUSTER KEYSLOT, CLUSTER NODES)."""
        slot = self.keyslot(key)
        for node in self.nodes(seen_by):
            if "master" not in node["flags"] or "fail" in node["flags"]:
                continue
            for part in node["slots"].split():
                if part.startswith("["):
                    continue  # a slot being migrated or imported
                low, _, high = part.partition("-")
                if int(low) <= slot <= int(high or low):
                    return int(node["port"])
        raise LookupError(f"no live primary serves slot {slot}")

    def replicas_of(self, port: int) -> list[int]:
        nodes = self.nodes()
        primary = next(n["id"] for n in nodes if n["port"] == str(port))
        return [int(n["port"]) for n in nodes if n["master"] == primary]

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every live node says cluster_state:ok and agrees on which nodes are
        primaries, and every live replica's link to its primary is up."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                if self._all_ok():
                    return
            except (subprocess.SubprocessError, OSError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise TimeoutError(f"cluster not ok after {timeout}s {last}")

    def _all_ok(self) -> bool:
        live = self.live_ports()
        views = set()
        for port in live:
            if self.cluster_info(port).get("cluster_state") != "ok":
                return False
            masters = sorted(
                n["port"]
                for n in self.nodes(port)
                if "master" in n["flags"] and "fail" not in n["flags"] and n["slots"]
            )
            views.add(tuple(masters))
            info = self.cli(port, "info", "replication")
            if "role:slave" in info and "master_link_status:up" not in info:
                return False
        return len(views) == 1

    def kill(self, port: int) -> None:
        """SIGKILL one node: no shutdown save, no goodbye to the cluster."""
        self.processes[port].stop(signal.SIGKILL)

    def stop_node(self, port: int) -> None:
        self.processes[port].stop()

    def pause(self, port: int) -> None:
        """SIGSTOP one node (it keeps its sockets but reads nothing) until resume()."""
        self.processes[port].proc.send_signal(signal.SIGSTOP)

    def resume(self, port: int) -> None:
        self.processes[port].proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        for port, process in self.processes.items():
            with contextlib.suppress(Exception):
                if process.proc.poll() is None:
                    self.resume(port)
                process.stop()
