"""The Redis half of the spend ledger (docs/design.md section 12): the entries the scripts
append, on one Redis and on a real Redis Cluster, and the server's switch for them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from keys import keygen, keyspace, scripts
from keys.budget import parse_duration
from keys.budgets import BudgetSpec, BudgetStore
from keys.connection import Arg, RedisBridge
from keys.errors import InvalidArgument, NotFound
from keys.journal import UsageJournal
from keys.ledger_stream import STREAM_PATTERN, cluster_stream, hash_slot, stream_key
from keys.model import KeyUpdate, RequestedModel, UsageReport
from keys.store import KeyStore
from tests.conftest import ManualClock, Server, start_server
from tests.helpers import Clients, key_spec
from tests.redis_cluster import RedisCluster

pytestmark = pytest.mark.integration
GPT4 = RequestedModel.named("gpt-4")
VOLATILE = {"win_start", "win_requests", "win_tokens", "reserved", "prev_hash", "prev_hash_until"}


@pytest.fixture(params=["redis-py", "pipelined"])
async def ledger(
    redis_url: str, clock: ManualClock, request: pytest.FixtureRequest
) -> AsyncIterator[KeyStore]:
    """A store that appends to the ledger (as the server does with LEDGER_DATABASE_URL)."""
    bridge = RedisBridge.from_url(redis_url, timeout_s=2, transport=request.param)
    yield KeyStore(bridge, clock=clock, ledger=True)
    await bridge.aclose()


async def entries(store: KeyStore, key_id: str) -> list[dict[str, str]]:
    """The key's entries in its ledger stream, oldest first."""
    stream = stream_key(key_id, cluster=store.redis.cluster)
    found: Any = await store.redis.client.xrange(stream)
    return [fields for _, fields in found if fields["key_id"] == key_id]


async def record(store: KeyStore, key_id: str) -> dict[str, str]:
    fields: dict[str, str] = await store.redis.client.hgetall(keyspace.record_key(key_id))  # type: ignore[assignment]
    return fields


async def new_key(store: KeyStore, **overrides: Any) -> tuple[str, keygen.ParsedKey]:
    full, _ = await store.create(key_spec(**overrides), "sk-mp")
    parsed = keygen.parse_key(full)
    assert parsed is not None
    return full, parsed


def usage(key_id: str, request_id: str, cost: int = 1234, provider: str = "openai") -> UsageReport:
    return UsageReport(key_id, request_id, "gpt-4", provider, 10, 5, 15, cost, family="gpt-4")


# --- charges --------------------------------------------------------------------------


async def test_a_charge_appends_one_entry_with_its_fields_and_adds_to_spent_total(
    ledger: KeyStore, clock: ManualClock
) -> None:
    _, key = await new_key(ledger)
    await ledger.report_usage(usage(key.key_id, "req-1"))
    charges = [e for e in await entries(ledger, key.key_id) if e["type"] == "charge"]
    assert charges == [
        {
            "type": "charge",
            "key_id": key.key_id,
            "ts": str(clock.now_ms),
            "request_id": "req-1",
            "model": "gpt-4",
            "provider": "openai",
            "prompt_tokens": "10",
            "completion_tokens": "5",
            "total_tokens": "15",
            "cost": "1234",
        }
    ]
    assert (await record(ledger, key.key_id))["spent_total"] == "1234"


async def test_a_duplicate_report_appends_nothing_and_charges_once(ledger: KeyStore) -> None:
    _, key = await new_key(ledger)
    first = await ledger.report_usage(usage(key.key_id, "req-1"))
    again = await ledger.report_usage(usage(key.key_id, "req-1"))
    assert not first.duplicate and again.duplicate
    charges = [e for e in await entries(ledger, key.key_id) if e["type"] == "charge"]
    assert [c["request_id"] for c in charges] == ["req-1"]
    assert (await record(ledger, key.key_id))["spent_total"] == "1234"


async def test_a_refused_charge_appends_nothing(ledger: KeyStore) -> None:
    _, key = await new_key(ledger)
    with pytest.raises(InvalidArgument):
        await ledger.report_usage(usage(key.key_id, "req-1", cost=9_300_000_000_000_000_000))
    assert [e["type"] for e in await entries(ledger, key.key_id)] == ["created"]
    assert (await record(ledger, key.key_id))["spent_total"] == "0"


async def test_spent_total_is_lifetime_spend_across_budget_periods(
    ledger: KeyStore, clock: ManualClock
) -> None:
    _, key = await new_key(ledger, max_budget_nanos=10**9, budget=parse_duration("1d"))
    await ledger.report_usage(usage(key.key_id, "day-1", cost=300))
    clock.advance(2 * 86_400)
    await ledger.report_usage(usage(key.key_id, "day-3", cost=200))
    fields = await record(ledger, key.key_id)
    assert (fields["spent"], fields["spent_total"]) == ("200", "500")


async def test_a_journal_replay_appends_the_charge_with_its_provider(
    ledger: KeyStore, tmp_path: Path
) -> None:
    """A report kept on disk while Redis was down is charged, and appended, as it was sent."""
    _, key = await new_key(ledger)
    journal = UsageJournal(tmp_path / "journal", 1 << 20)
    try:
        journal.append(usage(key.key_id, "req-1", provider="azure"))
        journal.append(usage(key.key_id, "req-1", provider="azure"))  # twice: charged once
        assert await journal.replay(ledger.report_usage) == 2
    finally:
        journal.close()
    charges = [e for e in await entries(ledger, key.key_id) if e["type"] == "charge"]
    assert [(c["request_id"], c["provider"]) for c in charges] == [("req-1", "azure")]


async def test_budgets_above_the_key_add_no_entries_of_their_own(ledger: KeyStore) -> None:
    """One Redis settles the team inline, in the key's script: still one charge entry."""
    team = "team-" + keygen.new_key_id()
    await BudgetStore(ledger.redis, clock=ledger.clock).set(
        BudgetSpec("team", team, 10**9, parse_duration(""), 0, 0, 0)
    )
    _, key = await new_key(ledger, team_id=team)
    decision = await ledger.check(key, GPT4, reserve_nanos=5000)
    await ledger.report_usage(usage(key.key_id, decision.request_id))
    charges = [e for e in await entries(ledger, key.key_id) if e["type"] == "charge"]
    assert [c["request_id"] for c in charges] == [decision.request_id]


# --- key events -----------------------------------------------------------------------


async def test_key_events_have_rising_versions_and_records_without_the_key(
    ledger: KeyStore, clock: ManualClock
) -> None:
    full, key = await new_key(ledger, name="before")
    created_at = clock.now_ms
    clock.advance(1)
    await ledger.update(key.key_id, KeyUpdate(name="after", rpm_limit=7))
    clock.advance(1)
    await ledger.revoke(key.key_id)
    clock.advance(1)
    rotated_key, _ = await ledger.rotate(key.key_id, "sk-mp", grace_ms=60_000)
    clock.advance(1)
    await ledger.delete(key.key_id)

    events = await entries(ledger, key.key_id)
    assert [e["type"] for e in events] == ["created", "updated", "revoked", "rotated", "deleted"]
    assert [e["version"] for e in events] == ["1", "2", "3", "4", "5"]
    assert [int(e["ts"]) - created_at for e in events] == [0, 1000, 2000, 3000, 4000]
    records = [json.loads(e["record"]) for e in events]
    assert [r["ver"] for r in records] == ["1", "2", "3", "4", "5"]
    assert [r["name"] for r in records] == ["before", "after", "after", "after", "after"]
    assert [r["status"] for r in records] == ["active", "active", "revoked", "revoked", "revoked"]
    assert records[1]["rpm_limit"] == "7"
    digest, new_digest = keygen.digest(full), keygen.digest(rotated_key)
    assert [r["hash"] for r in records] == [digest] * 3 + [new_digest] * 2
    assert all(not VOLATILE & r.keys() for r in records)  # prev_hash too: no old digest
    assert records[0]["spent_total"] == "0" and records[0]["user_id"] == "u1"
    text = json.dumps(events)
    for secret in (full, rotated_key, full.rsplit("-", 1)[1], rotated_key.rsplit("-", 1)[1]):
        assert secret not in text
    # the record, its reservations and its windows went with the `deleted` entry
    assert (
        await ledger.redis.client.exists(
            keyspace.record_key(key.key_id),
            keyspace.inflight_key(key.key_id),
            keyspace.model_windows_key(key.key_id),
        )
        == 0
    )


async def test_delete_keeps_its_not_found_and_takes_the_key_out_of_its_indexes(
    ledger: KeyStore,
) -> None:
    user = "user-" + keygen.new_key_id()
    _, key = await new_key(ledger, user_id=user)
    decision = await ledger.check(key, GPT4, reserve_nanos=5000)
    assert decision.allowed  # an open reservation, deleted with the key
    await ledger.delete(key.key_id)
    assert await ledger.redis.client.zscore(keyspace.index_key("user", user), key.key_id) is None
    assert (await ledger.list_keys(user_id=user)).keys == ()
    with pytest.raises(NotFound):
        await ledger.delete(key.key_id)
    assert [e["type"] for e in await entries(ledger, key.key_id)] == ["created", "deleted"]


async def test_rerun_scripts_append_nothing_twice(ledger: KeyStore, clock: ManualClock) -> None:
    """A client retry re-runs a script whose first run went through: the ledger gets one
    entry, as the record gets one change."""
    _, key = await new_key(ledger)
    rec = keyspace.record_key(key.key_id)
    stream = stream_key(key.key_id, cluster=False)
    fields = await record(ledger, key.key_id)
    create_args: list[Arg] = [clock.now_ms, "hash", fields["hash"], "name", "k"]
    assert await ledger.redis.scripts.run(scripts.CREATE, [rec, stream], create_args) == 1
    new_digest = keygen.digest(f"sk-mp-{key.key_id}-" + "N" * 43)
    rotate_args: list[Arg] = [new_digest, clock.now_ms + 60_000, clock.now_ms]
    for _ in range(2):
        assert await ledger.redis.scripts.run(scripts.ROTATE, [rec, stream], rotate_args) == 1
    await ledger.delete(key.key_id)
    delete_keys = [rec, keyspace.inflight_key(key.key_id), keyspace.model_windows_key(key.key_id)]
    assert (
        await ledger.redis.scripts.run(scripts.DELETE, [*delete_keys, stream], [clock.now_ms]) == 0
    )
    events = await entries(ledger, key.key_id)
    assert [(e["type"], e["version"]) for e in events] == [
        ("created", "1"),
        ("rotated", "2"),
        ("deleted", "3"),
    ]


async def test_without_a_ledger_nothing_is_appended_and_lifetime_spend_still_counts(
    store: KeyStore,
) -> None:
    _, key = await new_key(store)
    await store.report_usage(usage(key.key_id, "req-1"))
    await store.update(key.key_id, KeyUpdate(name="n"))
    await store.revoke(key.key_id)
    await store.rotate(key.key_id, "sk-mp", grace_ms=0)
    fields = await record(store, key.key_id)
    assert (fields["spent_total"], fields["ver"]) == ("1234", "4")
    await store.delete(key.key_id)
    assert not store.ledger and await entries(store, key.key_id) == []


# --- the server's switch ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ledger_server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    url = "postgresql://ledger:hunter2@127.0.0.1:1/ledger"
    srv = start_server(
        redis_url, tmp_path_factory.mktemp("ledger"), extra={"LEDGER_DATABASE_URL": url}
    )
    yield srv
    srv.process.stop()


def stream_of(redis_url: str, key_id: str) -> list[dict[str, str]]:
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        found: Any = client.xrange(stream_key(key_id, cluster=False))
    return [fields for _, fields in found if fields["key_id"] == key_id]


def test_the_server_appends_only_when_a_ledger_database_is_set(
    ledger_server: Server, clients: Clients, redis_url: str
) -> None:
    with grpc.insecure_channel(ledger_server.address) as channel:
        on = Clients(channel, ledger_server.admin_token, ledger_server.usage_token)
        _, appended = on.create_key()
    _, silent = clients.create_key()  # the session's server: no LEDGER_DATABASE_URL
    assert [e["type"] for e in stream_of(redis_url, appended.id)] == ["created"]
    assert stream_of(redis_url, silent.id) == []
    log = ledger_server.process.log_text()
    serving = next(json.loads(line) for line in log.splitlines() if '"serving"' in line)
    assert serving["ledger"] is True
    assert "hunter2" not in log


# --- Redis Cluster --------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    nodes = RedisCluster(Path(tmp_path_factory.mktemp("ledger-cluster")), masters=3).start()
    yield nodes
    nodes.stop()


@pytest.fixture
async def on_cluster(cluster: RedisCluster, clock: ManualClock) -> AsyncIterator[KeyStore]:
    bridge = RedisBridge.from_url(cluster.url, timeout_s=2)
    yield KeyStore(bridge, clock=clock, ledger=True)
    await bridge.aclose()


def test_slots_computed_for_streams_are_the_clusters_own(cluster: RedisCluster) -> None:
    """CLUSTER KEYSLOT on a real node: every slot's stream, and a sample of key names."""
    sample = [keyspace.record_key(keygen.new_key_id()) for _ in range(500)]
    sample += ["foo{}{bar}", "foo{{bar}}zap", "foo{bar}{zap}", "foo{bar", "{}", "ledger:{all}"]
    streams = [cluster_stream(slot) for slot in range(16384)]
    with redis.Redis(port=cluster.ports[0], decode_responses=True) as node:
        pipe = node.pipeline(transaction=False)
        for name in streams + sample:
            pipe.execute_command("CLUSTER KEYSLOT", name)
        slots = [int(s) for s in pipe.execute()]
    assert slots[: len(streams)] == list(range(16384))
    assert slots[len(streams) :] == [hash_slot(name) for name in sample]


async def test_on_a_cluster_entries_land_in_the_keys_slot_and_only_the_key_charges(
    on_cluster: KeyStore, cluster: RedisCluster
) -> None:
    """Keys on every primary, under a team budget in another slot: each script appends to
    its key's slot (no CROSSSLOT), and level_settle.lua appends nothing."""
    team = "team-" + keygen.new_key_id()
    await BudgetStore(on_cluster.redis, clock=on_cluster.clock).set(
        BudgetSpec("team", team, 10**9, parse_duration(""), 0, 0, 0)
    )
    by_primary: dict[int, keygen.ParsedKey] = {}
    for _ in range(60):
        _, key = await new_key(on_cluster, team_id=team)
        by_primary.setdefault(cluster.owner_of(keyspace.record_key(key.key_id)), key)
        if len(by_primary) == cluster.masters:
            break
    assert len(by_primary) == cluster.masters
    for key in by_primary.values():
        decision = await on_cluster.check(key, GPT4, reserve_nanos=5000)
        assert decision.allowed
        await on_cluster.report_usage(usage(key.key_id, decision.request_id))
        await on_cluster.report_usage(usage(key.key_id, decision.request_id))  # duplicate
        await on_cluster.rotate(key.key_id, "sk-mp", grace_ms=0)
        await on_cluster.delete(key.key_id)
        stream = stream_key(key.key_id, cluster=True)
        assert cluster.keyslot(stream) == cluster.keyslot(keyspace.record_key(key.key_id))
        events = await entries(on_cluster, key.key_id)
        assert [e["type"] for e in events] == ["created", "charge", "rotated", "deleted"]
        assert events[1]["request_id"] == decision.request_id
    team_spent = (await BudgetStore(on_cluster.redis).get("team", team)).spent_nanos
    assert team_spent == 1234 * cluster.masters  # the team was charged, by level_settle.lua
    everywhere: list[dict[str, str]] = []
    async for name in on_cluster.redis.client.scan_iter(match=STREAM_PATTERN, _type="stream"):
        found: Any = await on_cluster.redis.client.xrange(name)
        everywhere += [fields for _, fields in found]
    ours = {key.key_id for key in by_primary.values()}
    charges = [f for f in everywhere if f["type"] == "charge" and f["key_id"] in ours]
    assert len(charges) == cluster.masters  # one per key, none from the team's slot
