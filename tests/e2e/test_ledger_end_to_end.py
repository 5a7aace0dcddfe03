"""The spend ledger end to end (docs/design.md section 12), every part real: two server
replicas on one Redis, both appending to the ledger stream; the usage tap charging through
the shipped envoy.yaml; `extauthz ledger` as a process of its own, SIGKILLed twice (once
while it writes, once while it holds a batch PostgreSQL could not take) and PostgreSQL
crashed and restarted under it. The ledger must hold each charge once and sum, key by key,
to what Redis charged, to the nano-dollar; `extauthz ledger reconcile` must agree, then
name the key whose Redis counter was corrupted. And one key's life, created to deleted, as
the ledger's rows."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import redis as redis_sync

from devstack import processes as p
from devstack.mock_upstream import MockUpstream
from keys import keygen
from keys.keyspace import record_key
from keys.pricing import PriceTable
from keys.v1 import keys_pb2
from ledger.entries import nanos
from ledger.streams import GROUP
from tests.conftest import Envoy, Server, create_database, start_envoy, start_server
from tests.helpers import Clients, bearer, eventually, fetch
from tests.ledger_support import (
    SINGLE_STREAM,
    ledger_command,
    metric,
    reconcile,
    start_sink,
    usage_count,
)

pytestmark = pytest.mark.e2e
PRICES = PriceTable.builtin()
CHAT = "/v1/chat/completions"

CHARGES = 10_000
TAPPED = 300  # requests through Envoy, charged by the tap
REPORTED = CHARGES - TAPPED  # ReportUsage calls, each to one of the two replicas
DUPLICATED = 1_000  # of those, sent again at once with the same request id to the other
KEYS = 6
THREADS = 16
MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4")
TAP_MODEL = "gpt-4o"
TAP_PROMPT = 1  # the mock's prompt tokens for one "Hi"
HISTORY = ["created", "updated", "rotated", "revoked", "deleted"]
# every row of every ledger table, as text
EVERY_ROW = (
    "SELECT concat_ws(E'\\n', (SELECT json_agg(t)::text FROM virtual_keys t), "
    "(SELECT json_agg(t)::text FROM key_usage t), (SELECT json_agg(t)::text FROM key_events t), "
    "(SELECT json_agg(t)::text FROM ledger_rejects t))"
)
OPEN = {"max_budget": 0.0, "tpm_limit": 0, "rpm_limit": 0, "max_parallel_requests": 0}


@dataclass(frozen=True, slots=True)
class Report:
    key_id: str
    request_id: str
    model: str
    prompt: int
    completion: int
    replica: int

    @property
    def cost(self) -> int:
        return PRICES.cost_nanos(self.model, self.prompt, self.completion)


@dataclass(frozen=True, slots=True)
class Tapped:
    key: str
    key_id: str
    max_tokens: int
    shape: str  # json, stream (the tap adds and removes the usage chunk), stream+usage

    def body(self) -> bytes:
        request: dict[str, Any] = {
            "model": TAP_MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": self.max_tokens,
        }
        if self.shape != "json":
            request["stream"] = True
        if self.shape == "stream+usage":
            request["stream_options"] = {"include_usage": True}
        return json.dumps(request).encode()


Job = Report | Tapped


def plan(keys: list[tuple[str, str]], rng: random.Random) -> list[Job]:
    """REPORTED unique reports spread over the keys and both replicas, DUPLICATED of them
    sent twice (the copy right behind, to the other replica, so the two race), and TAPPED
    requests through Envoy mixed in evenly."""
    reports = [
        Report(
            rng.choice(keys)[1],
            f"req-{n:05d}-{rng.getrandbits(32):08x}",
            rng.choice(MODELS),
            rng.randint(1, 2000),
            rng.randint(1, 1000),
            n % 2,
        )
        for n in range(REPORTED)
    ]
    twice = set(rng.sample(range(REPORTED), DUPLICATED))
    calls: list[Job] = []
    for n, report in enumerate(reports):
        calls.append(report)
        if n in twice:
            calls.append(replace(report, replica=1 - report.replica))
    shapes = ("json", "stream", "stream+usage")
    taps = [
        Tapped(*keys[n % len(keys)], rng.randint(1, 64), shapes[n % len(shapes)])
        for n in range(TAPPED)
    ]
    every = len(calls) // TAPPED
    jobs: list[Job] = []
    for n, call in enumerate(calls):
        if n % every == 0 and taps:
            jobs.append(taps.pop())
        jobs.append(call)
    return jobs + taps


@dataclass
class Load:
    """The jobs, in order, from THREADS threads: reports to their replica, tapped requests
    through Envoy. `gates` are fractions of the jobs: those from the nth on wait for the
    nth `release()`, so that charges keep arriving while each thing the test does to the
    sink and PostgreSQL needs them to, however fast this machine runs the load."""

    jobs: list[Job]
    replicas: list[Clients]
    envoy: Envoy
    gates: tuple[float, ...]
    reports: list[tuple[Report, keys_pb2.ReportUsageResponse]] = field(default_factory=list)
    tapped: list[tuple[Tapped, int]] = field(default_factory=list)
    _opened: list[threading.Event] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pool: ThreadPoolExecutor | None = None
    _futures: list[Future[None]] = field(default_factory=list)

    @property
    def done(self) -> int:
        with self._lock:
            return len(self.reports) + len(self.tapped)

    def start(self) -> None:
        self._opened = [threading.Event() for _ in self.gates]
        self._pool = ThreadPoolExecutor(max_workers=THREADS)
        self._futures = [self._pool.submit(self._run, n, job) for n, job in enumerate(self.jobs)]

    def release(self) -> None:
        """Opens the next gate."""
        next(gate for gate in self._opened if not gate.is_set()).set()

    def release_all(self) -> None:
        for gate in self._opened:
            gate.set()

    def wait(self) -> None:
        for future in self._futures:
            future.result(timeout=120)
        if self._pool is not None:
            self._pool.shutdown()

    def _run(self, n: int, job: Job) -> None:
        for fraction, gate in zip(self.gates, self._opened, strict=True):
            if n >= fraction * len(self.jobs):
                gate.wait(timeout=120)
        if isinstance(job, Report):
            reply = self.replicas[job.replica].report(
                job.key_id,
                job.request_id,
                model=job.model,
                provider="openai",
                prompt_tokens=job.prompt,
                completion_tokens=job.completion,
            )
            with self._lock:
                self.reports.append((job, reply))
        else:
            headers = {"authorization": f"Bearer {job.key}", "content-type": "application/json"}
            status = fetch(self.envoy.port, "POST", CHAT, headers, job.body()).status
            with self._lock:
                self.tapped.append((job, status))


@dataclass
class Sink:
    """`extauthz ledger run`, the one running now (or none)."""

    redis_url: str
    database_url: str
    log: Path
    process: p.Process | None = None
    consumer: str = ""

    def start(self, consumer: str, *args: str) -> int:
        """Under the name `consumer`; returns its metrics port."""
        self.consumer = consumer
        self.process, port = start_sink(
            self.redis_url, self.database_url, self.log, "--batch", "100", *args, consumer=consumer
        )
        return port

    def freeze_after_commit(self, redis: redis_sync.Redis, db: str, tries: int = 2000) -> int:
        """SIGSTOPs the sink at random moments until it is caught between committing a
        batch and acknowledging it: every entry it holds pending is a charge already in
        PostgreSQL. Returns how many it holds; the sink stays stopped."""
        assert self.process is not None
        proc, rng = self.process.proc, random.Random(7)
        consumer = self.consumer
        for _ in range(tries):
            time.sleep(rng.uniform(0, 0.005))
            proc.send_signal(signal.SIGSTOP)
            held = held_charges(redis, consumer)
            if held and committed(db, held) == len(held):
                return len(held)
            proc.send_signal(signal.SIGCONT)
        raise AssertionError(f"the sink was never caught between commit and ack in {tries} tries")

    def kill(self) -> None:
        assert self.process is not None
        assert self.process.stop(signal.SIGKILL) == -signal.SIGKILL
        self.process = None

    def stop(self) -> int:
        code = self.process.stop() if self.process is not None else 0
        self.process = None
        return code


def until(condition: Callable[[], bool], timeout: float = 60) -> None:
    assert eventually(condition, timeout=timeout, interval=0.02), "timed out"


def pending(redis: redis_sync.Redis) -> dict[str, int]:
    """Entries each consumer of the group holds unacknowledged."""
    consumers = redis.xinfo_consumers(SINGLE_STREAM, GROUP)
    return {str(c["name"]): int(c["pending"]) for c in consumers}


def held_charges(redis: redis_sync.Redis, consumer: str) -> list[tuple[str, str]]:
    """(key_id, request_id) of each entry `consumer` holds unacknowledged, or [] while it
    holds anything that is not a charge whose content is still in the stream."""
    ids = [
        entry["message_id"]
        for entry in redis.xpending_range(SINGLE_STREAM, GROUP, "-", "+", 1000, consumer)
    ]
    pipe = redis.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xrange(SINGLE_STREAM, entry_id, entry_id)
    held = []
    for found in pipe.execute():
        fields = found[0][1] if found else {}
        if fields.get("type") != "charge":
            return []
        held.append((fields["key_id"], fields["request_id"]))
    return held


def committed(db: str, charges: list[tuple[str, str]]) -> int:
    """How many of `charges` PostgreSQL has (committed: this reads committed rows only)."""
    ((count,),) = rows(
        db,
        "SELECT count(*) FROM key_usage u JOIN unnest(%s::text[], %s::text[]) AS c (k, r) "
        "ON u.key_id = c.k AND u.request_id = c.r",
        ([k for k, _ in charges], [r for _, r in charges]),
    )
    return int(count)


def drained(redis: redis_sync.Redis) -> bool:
    """Every entry written and acknowledged: the sink deletes what it has written."""
    return int(redis.xlen(SINGLE_STREAM)) == 0 and sum(pending(redis).values()) == 0


def spent_totals(redis: redis_sync.Redis, key_ids: list[str]) -> dict[str, int]:
    return {k: int(redis.hget(record_key(k), "spent_total") or 0) for k in key_ids}


def rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql.encode(), params).fetchall()


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[p.PostgresServer]:
    """A PostgreSQL of this test's own, to crash and restart."""
    server = p.PostgresServer(tmp_path / "postgres").start()
    yield server
    server.remove()


def test_10000_charges_from_two_replicas_and_the_tap_are_in_the_ledger_once_through_two_sink_kills_and_a_postgres_restart(  # noqa: E501
    ledger_redis: p.RedisServer, own_postgres: p.PostgresServer, tmp_path: Path
) -> None:
    _, db = create_database(own_postgres.url)
    migrated = ledger_command(ledger_redis.url, db, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    ledger = {"LEDGER_DATABASE_URL": db}  # the servers append; they never connect to it
    with ExitStack() as stack:
        redis = redis_sync.Redis.from_url(ledger_redis.url, decode_responses=True)
        stack.callback(redis.close)
        first = start_server(ledger_redis.url, tmp_path, extra=ledger)
        stack.callback(first.stop)
        second = start_server(
            ledger_redis.url,
            tmp_path,
            extra=ledger,
            admin_token=first.admin_token,
            usage_token=first.usage_token,
        )
        stack.callback(second.stop)
        replicas = [replica_clients(s, stack) for s in (first, second)]
        silent = MockUpstream(p.free_port(), first.address, first.usage_token, reports=False)
        stack.callback(silent.start().stop)
        envoy = start_envoy(first.grpc_port, silent.port, tmp_path)
        stack.callback(envoy.process.stop)
        keys = [replicas[n % 2].create_key(**OPEN) for n in range(KEYS)]
        key_ids = [data.id for _, data in keys]

        sink = Sink(ledger_redis.url, db, tmp_path / "sink.log")
        stack.callback(sink.stop)
        sink.start("sink-a")
        jobs = plan([(key, data.id) for key, data in keys], random.Random(12))
        # gates: the jobs from 60% wait for the first SIGKILL, those from 85% for the second
        load = Load(jobs, replicas, envoy, gates=(0.6, 0.85))
        stack.callback(load.release_all)  # no thread left waiting if the test fails
        load.start()

        # 1. SIGKILL between committing a batch and acknowledging it; back under the same
        #    name, it reads those entries again at once, and writing them again adds nothing
        until(lambda: load.done >= len(jobs) // 5 and usage_count(db) > 0)
        replayed = sink.freeze_after_commit(redis, db)
        sink.kill()
        port = sink.start("sink-a")
        load.release()
        duplicates = 'extauthz_ledger_duplicates_total{table="key_usage"}'
        until(lambda: metric(port, duplicates) >= replayed, timeout=20)
        # 2. PostgreSQL crashes; the sink reads a batch it cannot write, and is SIGKILLed
        #    holding it. PostgreSQL comes back; a sink under another name claims the dead
        #    one's entries (XAUTOCLAIM) once they have been idle a second
        until(lambda: load.done >= len(jobs) * 2 // 5)
        own_postgres.stop(signal.SIGQUIT)
        until(lambda: pending(redis).get("sink-a", 0) > 0)
        sink.kill()
        held = pending(redis)["sink-a"]
        own_postgres.start()
        sink.start("sink-b", "--claim-idle-seconds", "1", "--rescan-seconds", "0.5")
        load.release()
        load.wait()

        # what was charged: each unique report once, whichever replica it reached first;
        # each tapped request that Envoy answered 200, under the request id Check gave it
        charged = [r for r, reply in load.reports if not reply.duplicate]
        assert len(load.reports) == REPORTED + DUPLICATED
        assert not any(reply.queued for _, reply in load.reports)
        assert sorted(r.request_id for r in charged) == sorted(
            {r.request_id for r, _ in load.reports}
        )
        statuses = [status for _, status in load.tapped]
        assert set(statuses) <= {200, 503}  # 503: Envoy gave up on a Check (a slow machine)
        assert statuses.count(200) >= TAPPED * 9 // 10
        expected = {
            (r.key_id, r.request_id): (r.cost, r.model, "openai") for r in charged
        } | tap_charges(silent, set(key_ids))
        assert len(expected) == len(charged) + statuses.count(200)
        totals = dict.fromkeys(key_ids, 0)
        for (key_id, _), (cost, _, _) in expected.items():
            totals[key_id] += cost
        # the tap charges after the response is sent: wait until Redis has them all
        until(lambda: spent_totals(redis, key_ids) == totals, timeout=20)
        until(lambda: drained(redis))

        # the ledger: every charge once, with its cost to the nano-dollar
        usage = rows(db, "SELECT key_id, request_id, cost, model, provider FROM key_usage")
        ledger_rows = {(k, r): (nanos(Decimal(c)), m, pr) for k, r, c, m, pr in usage}
        assert len(usage) == len(ledger_rows) == len(expected)
        assert ledger_rows == expected
        per_key = rows(
            db,
            "SELECT v.id, v.spent, v.total_requests, sum(u.cost), count(u.id) "
            "FROM virtual_keys v JOIN key_usage u ON u.key_id = v.id GROUP BY v.id",
        )
        redis_totals = spent_totals(redis, key_ids)
        assert {k: (nanos(s), n) for k, s, n, _, _ in per_key} == {
            k: (nanos(s), n) for k, _, _, s, n in per_key
        }
        assert {k: nanos(s) for k, _, _, s, _ in per_key} == redis_totals == totals

        # the chaos did happen: the first life of sink-a held entries when killed the
        # second time, and sink-b took them over (sink-a never came back)
        assert held > 0
        assert pending(redis) == {"sink-a": 0, "sink-b": 0}

        agreed = reconcile(ledger_redis.url, db, lag_wait_s=10)
        assert agreed.returncode == 0, agreed.stdout + agreed.stderr
        assert agreed.stdout == ""
        assert f"{KEYS} keys compared, 0 differences" in agreed.stderr

        victim = key_ids[3]
        redis.hset(record_key(victim), "spent_total", str(totals[victim] + 1_000_000))
        differs = reconcile(ledger_redis.url, db)
        assert differs.returncode == 1, differs.stdout + differs.stderr
        assert differs.stdout.splitlines() == [
            f"{victim} spend redis={Decimal(totals[victim] + 1_000_000).scaleb(-9):f} "
            f"ledger={Decimal(totals[victim]).scaleb(-9):f} difference=+0.001000000"
        ]
        assert sink.stop() == 0


def replica_clients(server: Server, stack: ExitStack) -> Clients:
    channel = grpc.insecure_channel(server.address)
    stack.callback(channel.close)
    return Clients(channel, server.admin_token, server.usage_token)


def tap_charges(
    silent: MockUpstream, key_ids: set[str]
) -> dict[tuple[str, str], tuple[int, str, str]]:
    """What the tap charges for each request that reached the upstream: the usage the mock
    answered with (its prompt tokens, and max_tokens as completion tokens)."""
    found = {}
    for seen in silent.seen:
        key_id = seen.headers.get("x-virtual-key-id", "")
        if key_id in key_ids:
            completion = json.loads(seen.body)["max_tokens"]
            cost = PRICES.cost_nanos(TAP_MODEL, TAP_PROMPT, completion)
            found[(key_id, seen.headers["x-virtual-key-request-id"])] = (cost, TAP_MODEL, "tap")
    return found


def test_a_keys_ledger_rows_are_its_history_from_created_to_deleted_with_its_digest_never_the_key(
    ledger_redis: p.RedisServer, ledger_db: str, tmp_path: Path
) -> None:
    assert ledger_command(ledger_redis.url, ledger_db, "migrate").returncode == 0
    with ExitStack() as stack:
        server = start_server(ledger_redis.url, tmp_path, extra={"LEDGER_DATABASE_URL": ledger_db})
        stack.callback(server.stop)
        clients = replica_clients(server, stack)
        admin = bearer(server.admin_token)
        first, data = clients.create_key(name="before", **OPEN)
        key_id = data.id
        costs = [charge(clients, key_id, "r1", 100), charge(clients, key_id, "r2", 200)]
        clients.keys.UpdateKey(
            keys_pb2.UpdateKeyRequest(id=key_id, name="after", rpm_limit=60), metadata=admin
        )
        rotated = clients.keys.RotateKey(keys_pb2.RotateKeyRequest(id=key_id), metadata=admin)
        second = rotated.key
        costs.append(charge(clients, key_id, "r3", 300))
        assert clients.revoke(key_id).status == "revoked"
        costs.append(charge(clients, key_id, "r4", 400))  # in flight when it was revoked
        clients.keys.DeleteKey(keys_pb2.DeleteKeyRequest(id=key_id), metadata=admin)

        redis = redis_sync.Redis.from_url(ledger_redis.url, decode_responses=True)
        stack.callback(redis.close)
        sink = Sink(ledger_redis.url, ledger_db, tmp_path / "sink.log")
        stack.callback(sink.stop)
        sink.start("sink")
        until(lambda: drained(redis), timeout=20)
        assert sink.stop() == 0

    events = rows(
        ledger_db,
        "SELECT type, version, record FROM key_events WHERE key_id = %s ORDER BY id",
        (key_id,),
    )
    assert [kind for kind, _, _ in events] == [
        "created",
        "updated",
        "rotated",
        "revoked",
        "deleted",
    ]
    versions = [version for _, version, _ in events]
    assert versions == sorted(set(versions))  # strictly increasing, in stream order
    records = {kind: record for kind, _, record in events}
    assert records["created"]["hash"] == keygen.digest(first)
    assert records["created"]["name"] == "before"
    assert records["updated"]["name"] == "after"
    assert records["updated"]["rpm_limit"] == "60"
    assert records["rotated"]["hash"] == keygen.digest(second)
    assert records["revoked"]["status"] == "revoked"
    assert records["deleted"]["hash"] == keygen.digest(second)  # as it was before it went
    assert not any("prev_hash" in record for record in records.values())

    ((status, is_active, deleted_at, key_hash, name, version, spent, requests),) = rows(
        ledger_db,
        "SELECT status, is_active, deleted_at, key_hash, name, version, spent, total_requests "
        "FROM virtual_keys WHERE id = %s",
        (key_id,),
    )
    assert (status, is_active, name, version) == ("deleted", False, "after", versions[-1])
    assert deleted_at is not None
    assert key_hash == keygen.digest(second)
    # the usage stays, under its foreign key, and sums into the deleted key's row
    usage = rows(
        ledger_db,
        "SELECT u.request_id, u.cost FROM key_usage u JOIN virtual_keys v ON v.id = u.key_id "
        "WHERE v.id = %s ORDER BY u.request_id",
        (key_id,),
    )
    assert [(r, nanos(c)) for r, c in usage] == list(
        zip(["r1", "r2", "r3", "r4"], costs, strict=True)
    )
    assert (nanos(spent), requests) == (sum(costs), 4)

    # neither key, nor either secret, is anywhere in the ledger
    secrets = [k.rsplit("-", 1)[1] for k in (first, second)]
    ((dumped,),) = rows(ledger_db, EVERY_ROW)
    assert keygen.digest(first) in dumped and keygen.digest(second) in dumped
    for secret in (first, second, *secrets):
        assert secret not in dumped

    agreed = reconcile(ledger_redis.url, ledger_db)  # deleted in both: nothing differs
    assert agreed.returncode == 0, agreed.stdout + agreed.stderr


def charge(clients: Clients, key_id: str, request_id: str, completion: int) -> int:
    reply = clients.report(
        key_id, request_id, model="gpt-4o", prompt_tokens=10, completion_tokens=completion
    )
    assert not reply.duplicate
    cost = PRICES.cost_nanos("gpt-4o", 10, completion)
    assert round(reply.cost * 1e9) == cost
    return cost
