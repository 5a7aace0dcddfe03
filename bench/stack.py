"""The processes a run needs, each started here and stopped by Stack.close()."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_sync

from devstack import processes as p

ADMIN_TOKEN = "adm-" + secrets.token_urlsafe(16)
USAGE_TOKEN = "use-" + secrets.token_urlsafe(16)
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Ours:
    """One or more `extauthz serve` processes sharing one gRPC port."""

    grpc_port: int
    http_ports: list[int]
    processes: list[p.Process]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pids(self) -> list[int]:
        return [proc.proc.pid for proc in self.processes]

    def counter(self, name: str, labels: str) -> float:
        """A metric summed over the processes, e.g. ('extauthz_..._count', 'decision="allow"')."""
        return sum(metric(port, name, labels) for port in self.http_ports)

    def allowed(self) -> float:
        return self.counter("extauthz_check_duration_seconds_count", 'decision="allow"')


def metric(http_port: int, name: str, labels: str) -> float:
    url = f"http://127.0.0.1:{http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    wanted = f"{name}{{{labels}}} "
    for line in text.splitlines():
        if line.startswith(wanted):
            return float(line[len(wanted) :])
    return 0.0


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU time of `root` and its children, those that have exited too (a
    reaped child's time is in its parent's cutime and cstime): PostgreSQL's postmaster and
    its backends, which come and go."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            fields = text[text.rindex(")") + 2 :].split()
            pid = int(stat.parent.name)
            if pid == root:
                total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
            elif int(fields[1]) == root:
                total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes (all their threads), from /proc."""
    total = 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


@dataclass
class Stack:
    root: Path
    processes: list[p.Process] = field(default_factory=list)
    redises: list[p.RedisServer] = field(default_factory=list)
    postgreses: list[p.PostgresServer] = field(default_factory=list)

    def redis(self, name: str) -> p.RedisServer:
        server = p.RedisServer(self.root / name)
        self.redises.append(server)
        return server.start()

    def postgres(self, name: str) -> p.PostgresServer:
        """A PostgreSQL of the run's own, with fsync on (every commit reaches the disk)."""
        server = p.PostgresServer(self.root / name, fsync=True)
        self.postgreses.append(server)
        return server.start()

    def cluster_node(self, name: str, timeout: float = 10) -> str:
        """A Redis Cluster of one node that owns every slot; its `redis+cluster://` URL.
        The server treats it as any cluster (each budget level in a script of its own),
        which is what bench/money_redis_bench.py watches it do."""
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        port, bus = p.free_port(), p.free_port()
        args = [
            p.executable("redis-server"),
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)),
            *("--save", "", "--appendonly", "no", "--cluster-enabled", "yes"),
            *("--cluster-port", str(bus), "--cluster-config-file", "nodes.conf"),
        ]
        process = p.spawn(args, directory / "redis.log")
        self.processes.append(process)
        p.wait_port(port, process.proc)
        client = redis_sync.Redis(host="127.0.0.1", port=port, decode_responses=True)
        try:
            client.cluster("ADDSLOTSRANGE", 0, 16383)
            deadline = time.monotonic() + timeout
            while client.cluster("info").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the one-node cluster on {port} is not ok")
                time.sleep(0.05)
        finally:
            client.close()
        return f"redis+cluster://127.0.0.1:{port}"

    def ours(
        self, redis_url: str, name: str, workers: int = 1, env: Mapping[str, str] | None = None
    ) -> Ours:
        """`workers` server processes on one gRPC port (SO_REUSEPORT, EXTAUTHZ_REUSE_PORT);
        `env` adds to their environment (e.g. PYTHONPATH for bench/baseline.py's tree)."""
        grpc_port = p.free_port()
        http_ports: list[int] = []
        started: list[p.Process] = []
        for n in range(workers):
            server = p.start_extauthz(
                redis_url=redis_url,
                log_path=self.root / f"{name}-{n}.log",
                grpc_port=grpc_port,
                admin_token=ADMIN_TOKEN,
                usage_token=USAGE_TOKEN,
                extra={
                    "EXTAUTHZ_JOURNAL_DIR": str(self.root / f"{name}-{n}-journal"),
                    "EXTAUTHZ_DRAIN_SECONDS": "0",
                    # the processes share the gRPC port on purpose (as --workers does)
                    "EXTAUTHZ_REUSE_PORT": "true" if workers > 1 else "false",
                    **(env or {}),
                },
            )
            self.processes.append(server.process)
            started.append(server.process)
            http_ports.append(server.http_port)
        return Ours(grpc_port, http_ports, started)

    def noop(self) -> tuple[int, p.Process]:
        port = p.free_port()
        args = [sys.executable, "-m", "bench.noop_server", "--port", str(port)]
        process = p.spawn(args, self.root / "noop.log")
        self.processes.append(process)
        p.wait_port(port, process.proc)
        return port, process

    def mock_upstream(self) -> tuple[int, p.Process]:
        """The devstack mock upstream in a process of its own (bench/mock_server.py),
        reporting nothing: the tap is what charges its responses."""
        port = p.free_port()
        args = [sys.executable, "-m", "bench.mock_server", "--port", str(port)]
        process = p.spawn(args, self.root / "mock-upstream.log")
        self.processes.append(process)
        p.wait_port(port, process.proc)
        return port, process

    def nginx(self) -> int:
        """A fast upstream: nginx, one worker, answering every request with a fixed 200."""
        port = p.free_port()
        work = self.root / "nginx"
        work.mkdir(parents=True, exist_ok=True)
        config = work / "nginx.conf"
        config.write_text(
            "worker_processes 1;\nerror_log stderr warn;\nevents { worker_connections 1024; }\n"
            "http {\n  access_log off;\n"
            f"  client_body_temp_path {work / 'body'};\n"
            f"  server {{\n    listen 127.0.0.1:{port};\n    keepalive_requests 1000000;\n"
            "    location / { default_type application/json;"
            ' return 200 \'{"object":"chat.completion","choices":[]}\'; }\n  }\n}\n'
        )
        process = p.start_nginx(config, port, work)
        self.processes.append(process)
        return port

    def envoy(self, config_text: str, listener_port: int, name: str) -> p.Process:
        config = self.root / f"{name}.yaml"
        config.write_text(config_text)
        process = p.start_envoy(config, listener_port, self.root / f"{name}.log")
        self.processes.append(process)
        return process

    def close(self) -> None:
        p.terminate_all(self.processes)
        for server in reversed(self.redises):
            with contextlib.suppress(Exception):
                server.stop()
        for postgres in self.postgreses:
            with contextlib.suppress(Exception):
                postgres.remove()
