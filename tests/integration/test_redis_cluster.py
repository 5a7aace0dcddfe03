"""The server on a real Redis Cluster (REDIS_URL `redis+cluster://`): the core behaviours on
three primaries, through gRPC and through Envoy, and a primary's failover under load."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from redis.asyncio.cluster import RedisCluster as ClusterClient

from devstack.mock_upstream import MockUpstream
from devstack.processes import free_port
from keys.connection import connect
from keys.keyspace import level_key, record_key
from keys.v1 import keys_pb2
from tests.conftest import Envoy, Server, start_envoy, start_server
from tests.helpers import Clients, bearer, chat_body, eventually, fetch
from tests.money_load import HoldingUpstream, team_budget_under_load
from tests.redis_cluster import RedisCluster

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"


@dataclass
class Stack:
    cluster: RedisCluster
    servers: list[Server]
    clients: list[Clients]
    envoy: Envoy
    upstream: MockUpstream


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Three primaries, two server processes on them, Envoy in front of the first."""
    work = tmp_path_factory.mktemp("cluster")
    cluster = RedisCluster(work / "redis", masters=3).start()
    first = start_server(cluster.url, work)
    second = start_server(
        cluster.url, work, admin_token=first.admin_token, usage_token=first.usage_token
    )
    servers = [first, second]
    channels = [grpc.insecure_channel(s.address) for s in servers]
    clients = [
        Clients(c, s.admin_token, s.usage_token) for c, s in zip(channels, servers, strict=True)
    ]
    upstream = MockUpstream(free_port(), first.address, first.usage_token).start()
    envoy = start_envoy(first.grpc_port, upstream.port, work)
    yield Stack(cluster, servers, clients, envoy, upstream)
    envoy.process.stop()
    upstream.stop()
    for channel in channels:
        channel.close()
    for server in servers:
        server.process.stop()
    cluster.stop()


def status_of(clients: Clients, key: str, model: str = "gpt-4") -> int:
    """The HTTP status a Check decides: 200 allowed, else the denial's status."""
    reply = clients.check({"authorization": f"Bearer {key}"}, chat_body(model))
    return int(reply.denied_response.status.code) if reply.HasField("denied_response") else 200


def post(envoy: Envoy, key: str, model: str = "gpt-4") -> int:
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    return fetch(envoy.port, "POST", CHAT, headers, chat_body(model)).status


def keys_on_every_primary(stack: Stack, **fields: object) -> dict[int, tuple[str, str]]:
    """Creates keys until each primary owns one: {primary port: (key, id)}."""
    owned: dict[int, tuple[str, str]] = {}
    for _ in range(60):
        key, data = stack.clients[0].create_key(**fields)
        owned.setdefault(stack.cluster.owner_of(record_key(data.id)), (key, data.id))
        if len(owned) == stack.cluster.masters:
            return owned
    raise AssertionError(f"60 keys landed on only {sorted(owned)}")


def test_cluster_url_builds_a_cluster_client_and_tls_form_asks_for_tls() -> None:
    plain = connect("redis+cluster://127.0.0.1:7000", timeout_s=0.15)
    tls = connect("rediss+cluster://127.0.0.1:7000/0?ssl_cert_reqs=none", timeout_s=0.15)
    single = connect("redis://127.0.0.1:7000/0", timeout_s=0.15)
    assert isinstance(plain, ClusterClient) and isinstance(tls, ClusterClient)
    assert not isinstance(single, ClusterClient)
    assert plain.connection_kwargs["socket_timeout"] == 0.15
    assert plain.connection_kwargs["decode_responses"] is True
    assert tls.connection_kwargs["connection_class"].__name__ == "SSLConnection"
    assert tls.connection_kwargs["ssl_cert_reqs"] == "none"


def test_keys_on_every_primary_are_allowed_through_envoy_and_both_servers(stack: Stack) -> None:
    owned = keys_on_every_primary(stack)
    for key, key_id in owned.values():
        before = len(stack.upstream.seen)
        assert post(stack.envoy, key) == 200
        assert stack.upstream.seen[before].headers["x-virtual-key-id"] == key_id
        assert [status_of(c, key) for c in stack.clients] == [200, 200]
    assert not stack.upstream.report_errors


def test_denial_rows_through_envoy(stack: Stack) -> None:
    c = stack.clients[0]
    unknown = "sk-mp-0123456789abcdef-" + "A" * 43
    assert post(stack.envoy, unknown) == 401
    revoked, data = c.create_key()
    c.revoke(data.id)
    assert post(stack.envoy, revoked) == 401
    restricted, _ = c.create_key(allowed_models=["gpt-4"])
    assert post(stack.envoy, restricted, "gpt-4o") == 403
    poor, data = c.create_key(max_budget=0.5)
    c.report(data.id, "spend-all", cost=0.5)
    assert post(stack.envoy, poor) == 402
    limited, _ = c.create_key(rpm_limit=2)
    assert [post(stack.envoy, limited) for _ in range(3)] == [200, 200, 429]


def test_rpm_is_exact_with_two_servers_on_every_primary(stack: Stack) -> None:
    owned = keys_on_every_primary(stack, rpm_limit=20, tpm_limit=0, max_budget=0)
    calls = [(key, i) for key, _ in owned.values() for i in range(50)]

    def one(call: tuple[str, int]) -> tuple[str, int]:
        key, i = call
        return key, status_of(stack.clients[i % 2], key)

    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(one, calls))
    for key, _ in owned.values():
        statuses = [status for k, status in results if k == key]
        assert statuses.count(200) == 20
        assert statuses.count(429) == 30


def test_report_usage_is_idempotent_and_200_concurrent_reports_sum_exactly(
    stack: Stack,
) -> None:
    c = stack.clients[0]
    _, data = c.create_key(max_budget=0, tpm_limit=0)
    first = c.report(data.id, "same", cost=0.25, prompt_tokens=10, completion_tokens=5)
    again = c.report(data.id, "same", cost=0.25, prompt_tokens=10, completion_tokens=5)
    assert not first.duplicate and again.duplicate and again.spent == pytest.approx(0.25)

    # 200 at once, 100 per server: more than a server's 64 Redis connections.
    def one(i: int) -> bool:
        reply = stack.clients[i % 2].report(
            data.id, f"r{i}", cost=0.01, prompt_tokens=3, completion_tokens=2
        )
        return reply.duplicate

    with ThreadPoolExecutor(max_workers=200) as pool:
        duplicates = list(pool.map(one, range(200)))
    assert not any(duplicates)
    key = c.get_key(data.id)
    assert round(key.spent * 1e9) == 2_250_000_000  # 0.25 + 200 * 0.01, exactly

    usage = c.usage.GetUsage(
        keys_pb2.GetUsageRequest(key_id=data.id, days=1), metadata=bearer(c.admin_token)
    )
    assert usage.totals.requests == 201
    assert usage.totals.prompt_tokens == 10 + 200 * 3
    assert usage.totals.completion_tokens == 5 + 200 * 2
    assert round(usage.totals.cost * 1e9) == 2_250_000_000


def test_get_usage_of_a_user_sums_keys_on_every_primary(stack: Stack) -> None:
    user = f"cluster-user-{time.monotonic_ns()}"
    owned = keys_on_every_primary(stack, user_id=user)
    c = stack.clients[1]
    for _, key_id in owned.values():
        c.report(key_id, "one", cost=0.5, prompt_tokens=100, completion_tokens=50)
    usage = c.usage.GetUsage(
        keys_pb2.GetUsageRequest(user_id=user, days=7), metadata=bearer(c.admin_token)
    )
    assert usage.totals.requests == 3 and round(usage.totals.cost * 1e9) == 1_500_000_000
    assert usage.totals.prompt_tokens == 300 and len(usage.rows) == 1
    assert set(usage.key_ids) >= {key_id for _, key_id in owned.values()}


def test_list_keys_pages_through_keys_on_every_primary(stack: Stack) -> None:
    user = f"pager-{time.monotonic_ns()}"
    c = stack.clients[0]
    created = [c.create_key(user_id=user, name=f"k{i}")[1].id for i in range(7)]
    assert len({stack.cluster.owner_of(record_key(i)) for i in created}) >= 2
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = c.keys.ListKeys(
            keys_pb2.ListKeysRequest(user_id=user, page_size=3, page_token=token),
            metadata=bearer(c.admin_token),
        )
        seen += [k.id for k in page.keys]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == created and pages == 3
    c.keys.DeleteKey(keys_pb2.DeleteKeyRequest(id=created[3]), metadata=bearer(c.admin_token))
    listed = c.keys.ListKeys(
        keys_pb2.ListKeysRequest(user_id=user, page_size=50), metadata=bearer(c.admin_token)
    )
    assert [k.id for k in listed.keys] == created[:3] + created[4:]


def test_rotation_and_revocation_on_one_server_are_seen_by_the_other(stack: Stack) -> None:
    one, other = stack.clients
    old, data = one.create_key()
    assert status_of(other, old) == 200
    rotated = one.keys.RotateKey(
        keys_pb2.RotateKeyRequest(id=data.id), metadata=bearer(one.admin_token)
    )
    assert status_of(other, old) == 401
    assert status_of(other, rotated.key) == 200
    one.revoke(data.id)
    assert status_of(other, rotated.key) == 401
    assert post(stack.envoy, rotated.key) == 401


def budgets_on_every_primary(stack: Stack) -> dict[int, str]:
    """Team ids whose budget records land one on each primary: {primary port: team id}."""
    owned: dict[int, str] = {}
    for n in range(200):
        team = f"cluster-team-{time.monotonic_ns()}-{n}"
        owned.setdefault(stack.cluster.owner_of(level_key("team", team)), team)
        if len(owned) == stack.cluster.masters:
            return owned
    raise AssertionError(f"200 ids landed on only {sorted(owned)}")


def set_budget(clients: Clients, team: str, **fields: Any) -> keys_pb2.Budget:
    return clients.budgets.SetBudget(
        keys_pb2.SetBudgetRequest(scope="team", id=team, **fields),
        metadata=bearer(clients.admin_token),
    )


def test_budgets_set_on_one_server_read_the_same_on_the_other(stack: Stack) -> None:
    one, other = stack.clients
    for team in budgets_on_every_primary(stack).values():
        stored = set_budget(one, team, max_budget=5, budget_duration="1mo", rpm_limit=100)
        got = other.budgets.GetBudget(
            keys_pb2.GetBudgetRequest(scope="team", id=team), metadata=bearer(other.admin_token)
        )
        assert got == stored and got.budget_remaining == 5


def test_budgets_on_every_primary_are_listed(stack: Stack) -> None:
    c = stack.clients[0]
    teams = list(budgets_on_every_primary(stack).values())
    for team in teams:
        set_budget(c, team, max_budget=1)
    listed = c.budgets.ListBudgets(
        keys_pb2.ListBudgetsRequest(scope="team"), metadata=bearer(c.admin_token)
    )
    assert set(teams) <= {b.id for b in listed.budgets}


def test_deleted_budgets_are_gone_on_every_primary(stack: Stack) -> None:
    c = stack.clients[1]
    for team in budgets_on_every_primary(stack).values():
        set_budget(c, team, max_budget=1)
        c.budgets.DeleteBudget(
            keys_pb2.DeleteBudgetRequest(scope="team", id=team), metadata=bearer(c.admin_token)
        )
        with pytest.raises(grpc.RpcError) as err:
            c.budgets.GetBudget(
                keys_pb2.GetBudgetRequest(scope="team", id=team), metadata=bearer(c.admin_token)
            )
        assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_servers_are_ready_and_logged_no_cluster_errors(stack: Stack) -> None:
    for server in stack.servers:
        assert fetch(server.http_port, "GET", "/readyz").status == 200
        log = server.process.log_text()
        for bad in ("CROSSSLOT", "CrossSlot", "MOVED", "ClusterDown", "Unexpected", "unavailable"):
            assert bad not in log, bad


# --- failover ---------------------------------------------------------------------------


@dataclass
class Answer:
    key: str
    started: float
    took: float
    status: int  # 200, 429, 503, or 0 for a gRPC error

    @property
    def done(self) -> float:
        return self.started + self.took


class Load:
    """Checks streamed from one thread per key given (a key may repeat), every 20 ms."""

    def __init__(self, clients: Clients, keys: list[str]) -> None:
        self.clients = clients
        self.keys = keys
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,)) for k in keys]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, key: str) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status = status_of(self.clients, key)
            except grpc.RpcError:
                status = 0
            self.answers.append(Answer(key, started, time.monotonic() - started, status))
            self._stop.wait(0.02)  # the pace, and a prompt end

    def wait_for_429(self, key: str, since: float, *, at_least_until: float) -> None:
        eventually(
            lambda: (
                time.monotonic() > at_least_until
                and any(
                    a.key == key and a.status == 429 and a.started > since for a in self.answers
                )
            )
        )

    def wait_for_answers(self, count: int) -> None:
        """Until `count` more answers than now came in, at least one for each key."""
        target = len(self.answers) + count
        assert eventually(
            lambda: len(self.answers) >= target and {a.key for a in self.answers} >= set(self.keys),
            interval=0.01,
        ), f"{len(self.answers)} answers"


def key_with_replica(
    cluster: RedisCluster, clients: Clients, limit: int
) -> tuple[str, str, int, int]:
    """A key limited to `limit` a minute on a primary that still has a replica:
    (key, id, primary port, replica port)."""
    for _ in range(60):
        key, data = clients.create_key(rpm_limit=limit, tpm_limit=0, max_budget=0)
        owner = cluster.owner_of(record_key(data.id))
        replicas = cluster.replicas_of(owner)
        if replicas:
            return key, data.id, owner, replicas[0]
    raise AssertionError("no primary with a replica left")


@pytest.fixture(scope="module")
def replicated(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RedisCluster, Server, Clients]]:
    """Three primaries with a replica each, and one server on them."""
    work = tmp_path_factory.mktemp("replicated")
    cluster = RedisCluster(work / "redis", masters=3, replicas=1).start()
    server = start_server(cluster.url, work)
    channel = grpc.insecure_channel(server.address)
    yield cluster, server, Clients(channel, server.admin_token, server.usage_token)
    channel.close()
    server.process.stop()
    cluster.stop()


@dataclass
class Failover:
    answers: list[Answer]
    killed_at: float
    promoted_at: float  # when every live node said cluster_state:ok again
    allowed: int  # answers 200 for the limited key, in one rate window
    counted: int  # what the promoted replica's total_requests says
    recent: int  # allowed answers the old primary gave in its last second

    @property
    def lost(self) -> int:
        """Allowed requests the promoted replica never counted. Negative when a counted
        (and replicated) request's answer died with the primary: a 503, the safe way."""
        return self.allowed - self.counted


def fail_over(
    cluster: RedisCluster, clients: Clients, limit: int, *, lagging_replica: bool
) -> Failover:
    """Streams Checks for a key limited to `limit` a minute (on one primary) and an
    unlimited bystander (on another), SIGKILLs the first primary, waits for its replica
    to take over and for the key to hit its limit again. With `lagging_replica`, the
    primary's link to its (paused) replica is cut 0.3 s before the kill, so the
    primary's last counts never reach the replica."""
    key, key_id, owner, replica = key_with_replica(cluster, clients, limit)
    while True:
        bystander, other = clients.create_key(rpm_limit=0, tpm_limit=0, max_budget=0)
        if cluster.owner_of(record_key(other.id)) != owner:
            break

    with Load(clients, [key] * 4 + [bystander] * 2) as load:
        load.wait_for_answers(80)
        if lagging_replica:
            cluster.pause(replica)  # so that it cannot reconnect
            cluster.cli(owner, "client", "kill", "type", "replica")
            load.wait_for_answers(50)  # Checks go on, counted by the primary alone
        killed_at = time.monotonic()
        cluster.kill(owner)
        if lagging_replica:
            cluster.resume(replica)
        cluster.wait_ok(timeout=15)
        promoted_at = time.monotonic()
        assert cluster.owner_of(record_key(key_id)) == replica
        # Past the limit again (at about 170 answers a second), and on a while.
        load.wait_for_429(key, promoted_at, at_least_until=promoted_at + 1.5)

    answers = load.answers
    mine = [a for a in answers if a.key == key]
    result = Failover(
        answers=answers,
        killed_at=killed_at,
        promoted_at=promoted_at,
        allowed=sum(a.status == 200 for a in mine),
        counted=clients.get_key(key_id).total_requests,
        # The old primary answers nothing after the kill, so only these can be lost.
        recent=sum(
            a.status == 200 and a.started < killed_at and a.done >= killed_at - 1.0 for a in mine
        ),
    )
    for name, k in (("limited key", key), ("bystander", bystander)):
        down = [a for a in answers if a.key == k and a.status == 503]
        first = min((a.started for a in down), default=killed_at) - killed_at
        last = max((a.done for a in down), default=killed_at) - killed_at
        slowest = max(a.took for a in answers if a.key == k)
        print(f"\n  {name}: {len(down)} 503s, +{first:.2f}s..+{last:.2f}s, slowest {slowest:.3f}s")
    print(
        f"  {'lagging' if lagging_replica else 'plain'} failover: cluster ok "
        f"+{promoted_at - killed_at:.2f}s; allowed {result.allowed} (limit {limit}), "
        f"counted {result.counted}, lost {result.lost}, last-second answers {result.recent}"
    )

    before = [a for a in answers if a.done < killed_at]
    after = [a for a in answers if a.started >= promoted_at + 1.0]
    assert before and all(a.status == 200 for a in before)
    assert {a.status for a in answers} <= {200, 429, 503}  # 503 only while failing over
    assert after and {a.status for a in after} <= {200, 429}
    assert any(a.status == 200 and a.started > killed_at for a in mine)  # served again
    assert mine[-1].status == 429
    assert result.counted == limit  # the promoted replica stopped at the limit itself
    # The overshoot is exactly the lost counts, all from the primary's last answers.
    assert result.allowed <= limit + result.recent
    # Nothing hangs through the failover. (A 503 takes a reconnect, or redis-py's 0.25 s
    # pause on CLUSTERDOWN: inside Envoy's 0.5 s on an idle machine, up to 0.48 s seen on a
    # busy one; how fast is the benchmark's business, this bound only catches a hang.)
    assert max(a.took for a in answers) < 5.0
    return result


def test_planned_failover_is_followed_through_moved_and_keeps_rpm_exact(
    replicated: tuple[RedisCluster, Server, Clients],
) -> None:
    """CLUSTER FAILOVER on a replica: the old primary, still up, answers MOVED; the
    replica caught up first, so no count is lost."""
    cluster, server, clients = replicated
    limit = 150
    key, key_id, owner, replica = key_with_replica(cluster, clients, limit)
    with Load(clients, [key] * 4) as load:
        load.wait_for_answers(50)
        cluster.cli(replica, "cluster", "failover")
        assert eventually(
            lambda: cluster.owner_of(record_key(key_id), seen_by=owner) == replica,
            interval=0.05,
        ), "the replica did not take over"
        switched_at = time.monotonic()
        load.wait_for_429(key, switched_at, at_least_until=switched_at + 0.5)
    statuses = [a.status for a in load.answers]
    print(f"\n  planned failover: {statuses.count(503)} 503s, {statuses.count(200)} allowed")
    assert "errorstat_MOVED" in cluster.cli(owner, "info", "errorstats")  # it did redirect
    assert set(statuses) <= {200, 429}
    assert statuses.count(200) == limit
    assert clients.get_key(key_id).total_requests == limit
    assert "Unexpected" not in server.process.log_text()


def test_unplanned_failover_keeps_serving_and_bounds_the_rpm_overshoot(
    replicated: tuple[RedisCluster, Server, Clients],
) -> None:
    """SIGKILL a primary. Replication is asynchronous: counts the dead primary had not yet
    sent to its replica are lost, and each lost count lets one more request through in
    that window. So `allowed <= limit + lost`, `lost` at most the primary's last
    answers."""
    cluster, server, clients = replicated
    plain = fail_over(cluster, clients, 300, lagging_replica=False)
    assert plain.lost <= 1  # on loopback the replica is a few microseconds behind
    lagging = fail_over(cluster, clients, 300, lagging_replica=True)
    assert lagging.lost > 0  # the last 0.3 s of counts never reached the replica

    # The cluster keeps working for everything else, and the server is ready again.
    assert fetch(server.http_port, "GET", "/readyz").status == 200
    fresh, fresh_data = clients.create_key()
    assert status_of(clients, fresh) == 200
    assert not clients.report(fresh_data.id, "after-failover", cost=0.01).duplicate
    log = server.process.log_text()
    assert "CROSSSLOT" not in log and "Unexpected" not in log


@pytest.fixture(scope="module")
def sidecars(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[HoldingUpstream, list[Envoy]]]:
    """Each cluster server behind its own Envoy, in front of an upstream that holds requests."""
    work = tmp_path_factory.mktemp("cluster-sidecars")
    holding = HoldingUpstream(free_port()).start()
    envoys = [start_envoy(s.grpc_port, holding.port, work, tap=False) for s in stack.servers]
    for envoy in envoys:
        fetch(envoy.port, "GET", "/healthz")
    yield holding, envoys
    for envoy in envoys:
        envoy.process.stop()
    holding.stop()


def test_a_team_budget_shared_by_5_keys_on_2_replicas_holds_on_the_cluster(
    stack: Stack, sidecars: tuple[HoldingUpstream, list[Envoy]]
) -> None:
    """The team's budget, its 5 keys and their user sit in different slots: each level is
    checked in its own slot, and a refusal is compensated."""
    holding, envoys = sidecars
    team = next(iter(budgets_on_every_primary(stack).values()))
    team_budget_under_load(holding, [e.port for e in envoys], stack.clients[0], team)
