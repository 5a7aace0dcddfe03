"""Row 13: the spend ledger's sink (`extauthz ledger run`, docs/design.md section 12): how
many charges a second it writes to PostgreSQL, and what having it run costs the Check, in
the same run.

- A server of ours with LEDGER_DATABASE_URL set, so its scripts append every charge to
  `ledger:{all}`, on a Redis of its own; a PostgreSQL of the run's own with fsync on
  (`Stack.postgres`), migrated by `extauthz ledger migrate`; two keys without limits, one
  for the Checks and one that the charges go to.
- Drain: PRELOAD charges sent with ReportUsage (grpc.aio, IN_FLIGHT at once, every
  request id new) while no sink runs, so they wait in the stream; then the sink starts
  with its defaults (--batch 500) and writes them. Its rows counter is polled every
  POLL_S: charges/s = the rows written between the first poll that sees one and the one
  that sees them all, over that time (the process's start is not counted). CPU: the sink's
  and PostgreSQL's (postmaster and backends) over the same span.
- Keeping pace: a stream of STREAM_RATE ReportUsage calls/s (new request ids, a thread of
  its own) for PACE_S with nothing else running: the sink's and PostgreSQL's CPU per
  charge, and charges per commit (pg_stat_database's xact_commit; a sink that keeps pace
  writes what arrived since its last batch, a few entries).
- Check: row 1's saturation load (h2load 4x16, ~2 s runs, ABBA rounds, ROUNDS of them)
  under the same charge stream throughout, with the sink running vs stopped (SIGSTOP: it
  takes no CPU and the entries wait in the stream). Before each "running" run the sink is
  resumed and has caught up, so during the run it writes the stream as it arrives. Same
  server, key, load and charge stream; the only difference is the sink's work.
- Verified at the end (the sink caught up, the stream stopped): key_usage holds every
  charge once, and the key's sum equals its `spent_total` in Redis, to the nano-dollar.

Everything runs on the same machine: on 2 cores, the sink and PostgreSQL take CPU the
server would otherwise have. A sink on a node of its own costs the Check only its Redis
commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import psycopg
import redis as redis_sync

from bench import compare, load, payloads
from bench.check_bench import SAT_CLIENTS, SAT_STREAMS, SECONDS, check_url
from bench.stack import ADMIN_TOKEN, USAGE_TOKEN, Ours, Stack, metric, tree_cpu_seconds
from bench.table import Row, ratio
from devstack import processes as p
from keys.keyspace import record_key
from keys.v1 import keys_pb2_grpc

PRELOAD = 20_000
IN_FLIGHT = 64
POLL_S = 0.02
STREAM_RATE = 500  # charges/s while the Checks run
STREAM_TICK_S = 0.02
PACE_S = 3.0
ROUNDS = 6  # row 1's 4 and two more: the difference sought is small, the machine's noise not
STREAM = "ledger:{all}"
GROUP = "ledger"
STARTED = '"msg": "ledger sink started"'
ROWS = ("extauthz_ledger_rows_total", 'table="key_usage"')


def _cpu(pids: list[int]) -> float:
    """User + system CPU seconds of the processes still there (a backend may have gone)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class Sink:
    process: p.Process
    metrics_port: int

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    def rows(self) -> float:
        return metric(self.metrics_port, *ROWS)

    def pause(self) -> None:
        self.process.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.proc.send_signal(signal.SIGCONT)


def _env(redis_url: str, database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEDGER_", "REDIS_"))}
    return env | {"REDIS_URL": redis_url, "LEDGER_DATABASE_URL": database_url, **extra}


def _migrate(redis_url: str, database_url: str, log: Path) -> None:
    with log.open("ab") as out:
        subprocess.run(
            [p.executable("extauthz"), "ledger", "migrate"],
            env=_env(redis_url, database_url),
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=60,
        )


def _start_sink(stack: Stack, redis_url: str, database_url: str) -> Sink:
    port = p.free_port()
    env = _env(redis_url, database_url, LEDGER_METRICS_PORT=str(port), LEDGER_CONSUMER="bench")
    process = p.spawn(
        [p.executable("extauthz"), "ledger", "run"], stack.root / "ledger-sink.log", env
    )
    stack.processes.append(process)
    p.wait_log(process, STARTED)
    return Sink(process, port)


async def _report(stub: Any, key_id: str, request_id: str) -> bool:
    """One charge; whether it charged (not a duplicate)."""
    reply = await stub.ReportUsage(
        payloads.report_request(key_id, request_id),
        metadata=payloads.bearer(USAGE_TOKEN),
        timeout=10,
    )
    return not reply.duplicate


async def _preload(address: str, key_id: str, count: int, tag: str) -> float:
    """`count` charges with new request ids, IN_FLIGHT at once; returns calls/s."""
    numbers = iter(range(count))
    charged = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = keys_pb2_grpc.UsageServiceStub(channel)
        started = time.perf_counter()

        async def worker() -> None:
            nonlocal charged
            for n in numbers:
                ok = await _report(stub, key_id, f"{tag}-{n}")
                charged += ok  # not `charged += await ...`: that reads charged before it waits

        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        seconds = time.perf_counter() - started
    if charged != count:
        raise RuntimeError(f"preload: {count} reports, {charged} charged")
    return count / seconds


@dataclass
class ChargeStream:
    """ReportUsage at `rate` calls/s, every request id new, from a thread of its own."""

    address: str
    key_id: str
    rate: int
    sent: int = 0
    charged: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    async def _run(self) -> None:
        per_tick = max(1, round(self.rate * STREAM_TICK_S))
        numbers = itertools.count()
        tag = f"stream-{time.time_ns():x}"
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = keys_pb2_grpc.UsageServiceStub(channel)
            calls: set[asyncio.Task[bool]] = set()
            next_tick = time.perf_counter()
            while not self._stop.is_set():
                for _ in range(per_tick):
                    calls.add(
                        asyncio.create_task(_report(stub, self.key_id, f"{tag}-{next(numbers)}"))
                    )
                self.sent += per_tick
                next_tick += STREAM_TICK_S
                await asyncio.sleep(max(0.0, next_tick - time.perf_counter()))
                done = {c for c in calls if c.done()}
                self.charged += sum(c.result() for c in done)
                calls -= done
            self.charged += sum(await asyncio.gather(*calls))


def _backlog(client: redis_sync.Redis) -> int:
    """Entries the sink has not written: what is left in the stream (it deletes what it
    writes) and what it holds unacknowledged."""
    summary = client.xpending(STREAM, GROUP)
    return int(client.xlen(STREAM)) + int(summary["pending"])


def _until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"ledger bench: {what} within {timeout}s")
        time.sleep(POLL_S)


def _drain(sink: Sink, postmaster: int) -> dict[str, float]:
    """Times the sink writing PRELOAD waiting charges (it has just started)."""
    first_at = first_rows = 0.0
    cpu: tuple[float, float] = (0.0, 0.0)
    deadline = time.monotonic() + 300
    while True:
        rows, now = sink.rows(), time.perf_counter()
        if rows > 0 and not first_at:
            first_at, first_rows = now, rows
            cpu = (_cpu([sink.pid]), tree_cpu_seconds(postmaster))
        if rows >= PRELOAD:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"ledger bench: the sink wrote {rows} of {PRELOAD} charges")
        time.sleep(POLL_S)
    seconds = now - first_at
    written = rows - first_rows
    if rows != PRELOAD or seconds <= 0:
        raise RuntimeError(f"ledger bench: {rows} rows, {seconds:.3f}s: nothing to time")
    return {
        "charges": written,
        "seconds": round(seconds, 3),
        "rps": round(written / seconds, 1),
        "sink_cpu_us_per_charge": round((_cpu([sink.pid]) - cpu[0]) / written * 1e6, 1),
        "postgres_cpu_us_per_charge": round(
            (tree_cpu_seconds(postmaster) - cpu[1]) / written * 1e6, 1
        ),
    }


def _keeping_pace(
    ours: Ours, sink: Sink, postmaster: int, key_id: str, database_url: str
) -> dict[str, Any]:
    """The charge stream alone for PACE_S, the sink running: its and PostgreSQL's CPU per
    charge, and how many charges each of its transactions holds."""
    stream = ChargeStream(ours.address, key_id, STREAM_RATE)

    def cpu_now() -> float:
        return _cpu([sink.pid]) + tree_cpu_seconds(postmaster)

    commits, cpu = _commits(database_url), cpu_now()
    stream.start()
    time.sleep(PACE_S)
    stream.stop()
    time.sleep(1.5)  # written, and PostgreSQL's statistics flushed (about once a second)
    cpu = cpu_now() - cpu
    commits = _commits(database_url) - commits - 1  # less the first count's own
    return {
        "charged": stream.charged,
        "seconds": PACE_S,
        "cpu_us_per_charge": round(cpu / stream.charged * 1e6, 1),
        "commits": commits,
        "charges_per_commit": round(stream.charged / max(commits, 1), 2),
    }


def _commits(database_url: str) -> int:
    """Transactions committed in the ledger's database so far (pg_stat_database)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


def _verify(
    client: redis_sync.Redis, database_url: str, key_ids: list[str], charges: int
) -> dict[str, Any]:
    """`charges` rows in key_usage, each once; each key's sum its spent_total in Redis."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT key_id, count(*), count(DISTINCT request_id), sum(cost) FROM key_usage "
            "GROUP BY key_id"
        ).fetchall()
    found = {str(k): (int(n), int(d), int(Decimal(s).scaleb(9))) for k, n, d, s in rows}
    redis_nanos = {k: int(client.hget(record_key(k), "spent_total") or 0) for k in key_ids}
    for key_id in key_ids:
        count, distinct, nanos = found.get(key_id, (0, 0, 0))
        if count != distinct or nanos != redis_nanos[key_id]:
            raise RuntimeError(
                f"ledger bench: key {key_id}: {count} rows, {distinct} request ids, "
                f"{nanos} nano-USD in the ledger, {redis_nanos[key_id]} in Redis"
            )
    if sum(n for n, _, _ in found.values()) != charges:
        raise RuntimeError(f"ledger bench: {found} in key_usage, {charges} charged")
    return {k: {"rows": v[0], "nanos": v[2]} for k, v in found.items()}


def measure(stack: Stack) -> list[Row]:
    redis = stack.redis("redis-ledger")
    postgres = stack.postgres("postgres-ledger")
    database_url = postgres.url
    _migrate(redis.url, database_url, stack.root / "ledger-migrate.log")
    ours = stack.ours(redis.url, "ours-ledger", env={"LEDGER_DATABASE_URL": database_url})
    check_key, _ = payloads.create_key(ours.address, ADMIN_TOKEN)
    _, charged_id = payloads.create_key(ours.address, ADMIN_TOKEN)
    client = redis_sync.Redis.from_url(redis.url, decode_responses=True)
    postmaster = postgres.running().proc.pid
    try:
        preload_rps = asyncio.run(
            _preload(ours.address, charged_id, PRELOAD, f"preload-{time.time_ns():x}")
        )
        waiting = int(client.xlen(STREAM))
        if waiting != PRELOAD + 2:  # and the two keys' `created` events
            raise RuntimeError(f"ledger bench: {waiting} entries in {STREAM}")
        sink = _start_sink(stack, redis.url, database_url)
        drain = _drain(sink, postmaster)
        _until(lambda: _backlog(client) == 0, 30, "the sink did not catch up")
        pace = _keeping_pace(ours, sink, postmaster, charged_id, database_url)
        check, stream = _check(ours, sink, postmaster, client, check_key, charged_id)
        _until(lambda: _backlog(client) == 0, 60, "the sink did not catch up")
        ledger = _verify(
            client, database_url, [charged_id], PRELOAD + int(stream["charged"]) + pace["charged"]
        )
    finally:
        client.close()
    running, stopped = check["sink"], check["no sink"]
    per_round = [round(a.rps / b.rps, 3) for a, b in zip(running.runs, stopped.runs, strict=True)]
    share = running.rps / stopped.rps
    running_s = sum(r.seconds for r in running.runs)
    core_share = running.other_cpu_s / running_s
    keeping_pace = running.other_cpu_s / (stream["achieved_rate"] * running_s) * 1e6
    drain_cpu = drain["sink_cpu_us_per_charge"] + drain["postgres_cpu_us_per_charge"]
    sat = f"{SAT_CLIENTS}x{SAT_STREAMS}"
    return [
        Row(
            "13",
            f"ledger sink: charges/s written ({PRELOAD:,} waiting, batch 500, fsync on)",
            f"{drain['rps']:,.0f}",
            f"{preload_rps:,.0f} (ReportUsage/s, one server, {IN_FLIGHT} in flight)",
            ratio(drain["rps"], preload_rps),
            result="exact",
            data={
                "drain": drain,
                "preload_rps": round(preload_rps, 1),
                "ledger": ledger,
                "stream": stream,
                "keeping_pace_alone": pace,
            },
        ),
        Row(
            "13",
            "  CPU per charge written, us: sink (+PostgreSQL)",
            f"{drain['sink_cpu_us_per_charge']:.0f} (+{drain['postgres_cpu_us_per_charge']:.0f})",
            "",
        ),
        Row(
            "13",
            f"Check calls/s at saturation ({sat}) under {STREAM_RATE} charges/s, sink running",
            f"{running.rps:,.0f}",
            f"{stopped.rps:,.0f} (sink stopped)",
            f"{share:.2f}x ({min(per_round):.2f}-{max(per_round):.2f})",
            data={
                "sink": running.summary(),
                "no sink": stopped.summary(),
                "round_ratios": per_round,
            },
        ),
        Row(
            "13",
            f"  sink + PostgreSQL CPU keeping pace with {STREAM_RATE} charges/s, us per charge",
            f"{keeping_pace:.0f} ({core_share:.0%} of a core)",
            f"{drain_cpu:.0f} (the drain, batches of 500)",
            ratio(keeping_pace, drain_cpu),
        ),
        Row(
            "13",
            f"    the same, {STREAM_RATE} charges/s, no Checks: us per charge, charges per commit",
            f"{pace['cpu_us_per_charge']:.0f}, {pace['charges_per_commit']:.1f}",
            f"{drain_cpu:.0f}, 500 (the drain)",
            ratio(pace["cpu_us_per_charge"], drain_cpu),
        ),
    ]


def _check(
    ours: Ours,
    sink: Sink,
    postmaster: int,
    client: redis_sync.Redis,
    check_key: str,
    charged_id: str,
) -> tuple[dict[str, compare.Series], dict[str, float]]:
    """The Check at saturation, sink running vs stopped, under the charge stream."""
    request = payloads.check_request(check_key)
    payloads.expect_allowed(ours.address, request)
    frame = load.grpc_frame(request.SerializeToString())

    def running() -> None:
        sink.resume()
        # caught up with what waited while it was stopped: it now keeps pace with the stream
        _until(lambda: _backlog(client) <= STREAM_RATE // 10, 30, "the sink did not catch up")

    targets = [
        compare.Target(
            name,
            check_url(ours.grpc_port),
            frame,
            counter=ours.allowed,
            pids=ours.pids,
            other_cpu=lambda: _cpu([sink.pid]) + tree_cpu_seconds(postmaster),  # the ledger's
            before=before,
        )
        for name, before in (("sink", running), ("no sink", sink.pause))
    ]
    stream = ChargeStream(ours.address, charged_id, STREAM_RATE)
    stream.start()
    started = time.perf_counter()
    try:
        got = compare.alternate(
            targets, clients=SAT_CLIENTS, streams=SAT_STREAMS, seconds=SECONDS, rounds=ROUNDS
        )
    finally:
        stream.stop()
        sink.resume()  # a stopped process would not see the SIGTERM that ends the run
    seconds = time.perf_counter() - started
    if stream.charged != stream.sent:
        raise RuntimeError(f"ledger bench: {stream.sent} charges sent, {stream.charged} charged")
    return got, {
        "rate": STREAM_RATE,
        "sent": stream.sent,
        "charged": stream.charged,
        "achieved_rate": round(stream.sent / seconds, 1),
    }
