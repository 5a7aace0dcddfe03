"""A Redis Cluster on loopback for the cluster tests: only tests need one, so it lives here."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from devstack.processes import Process, executable, free_port, spawn, wait_port


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
