"""keys.v1.BudgetService through a real server process and a real gRPC channel."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis

from keys import keyspace
from keys.v1 import keys_pb2
from tests.conftest import Server
from tests.helpers import Clients, bearer, eventually

pytestmark = pytest.mark.integration

DAY_S = 86_400


@pytest.fixture
def plain_redis(redis_url: str) -> Iterator[redis.Redis]:
    """What the session server stores to: for writing the counters the check and report
    scripts would write."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def new_id(prefix: str = "team") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def admin(clients: Clients, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (*bearer(clients.admin_token), *extra)


def set_budget(clients: Clients, scope: str, scope_id: str, **fields: Any) -> keys_pb2.Budget:
    return clients.budgets.SetBudget(
        keys_pb2.SetBudgetRequest(scope=scope, id=scope_id, **fields),
        metadata=admin(clients),
        timeout=5,
    )


def get_budget(clients: Clients, scope: str, scope_id: str) -> keys_pb2.Budget:
    return clients.budgets.GetBudget(
        keys_pb2.GetBudgetRequest(scope=scope, id=scope_id), metadata=admin(clients), timeout=5
    )


def list_budgets(clients: Clients, scope: str) -> list[keys_pb2.Budget]:
    reply = clients.budgets.ListBudgets(
        keys_pb2.ListBudgetsRequest(scope=scope), metadata=admin(clients), timeout=5
    )
    return list(reply.budgets)


def delete_budget(clients: Clients, scope: str, scope_id: str) -> keys_pb2.DeleteBudgetResponse:
    return clients.budgets.DeleteBudget(
        keys_pb2.DeleteBudgetRequest(scope=scope, id=scope_id), metadata=admin(clients), timeout=5
    )


def refused(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value


def details_of(error: grpc.RpcError) -> str:
    return error.details() or ""


# --- set / get / list / delete ---------------------------------------------------------


def test_set_budget_creates_a_team_budget_with_nothing_spent(clients: Clients) -> None:
    team = new_id()
    before = time.time()
    got = set_budget(
        clients,
        "team",
        team,
        max_budget=5,
        budget_duration="1mo",
        rpm_limit=100,
        tpm_limit=0,
        max_parallel_requests=3,
    )
    assert (got.scope, got.id, got.max_budget, got.budget_duration) == ("team", team, 5, "1mo")
    assert (got.rpm_limit, got.tpm_limit, got.max_parallel_requests) == (100, 0, 3)
    assert (got.spent, got.reserved, got.in_flight, got.budget_remaining) == (0, 0, 0, 5)
    assert before - 1 <= got.created_at.ToSeconds() <= time.time()
    assert got.budget_reset_at.ToDatetime().day == 1  # the next calendar month


def test_get_budget_returns_what_set_budget_stored(clients: Clients) -> None:
    team = new_id()
    stored = set_budget(clients, "team", team, max_budget=2.5, rpm_limit=7)
    assert get_budget(clients, "team", team) == stored


def test_user_budget_is_apart_from_a_team_budget_of_the_same_id(clients: Clients) -> None:
    shared = new_id("same")
    set_budget(clients, "user", shared, max_budget=1)
    set_budget(clients, "team", shared, max_budget=2)
    assert get_budget(clients, "user", shared).max_budget == 1
    assert get_budget(clients, "team", shared).max_budget == 2


def test_list_budgets_lists_the_scope_oldest_first(clients: Clients) -> None:
    made = [set_budget(clients, "team", new_id()).id for _ in range(3)]
    user = set_budget(clients, "user", new_id("user")).id
    listed = [b.id for b in list_budgets(clients, "team")]
    assert [i for i in listed if i in made] == made
    assert user not in listed


def test_delete_budget_removes_it(clients: Clients) -> None:
    team = new_id()
    set_budget(clients, "team", team, max_budget=1)
    assert delete_budget(clients, "team", team) == keys_pb2.DeleteBudgetResponse(
        scope="team", id=team
    )
    assert refused(get_budget, clients, "team", team).code() is grpc.StatusCode.NOT_FOUND
    assert team not in [b.id for b in list_budgets(clients, "team")]


def test_delete_budget_drops_its_open_reservations(
    clients: Clients, plain_redis: redis.Redis
) -> None:
    team = new_id()
    set_budget(clients, "team", team)
    inflight = keyspace.level_inflight_key("team", team)
    plain_redis.zadd(inflight, {keyspace.reservation_id("ab", 10): 2**50})
    delete_budget(clients, "team", team)
    assert plain_redis.exists(inflight) == 0


def test_setting_again_changes_limits_and_keeps_spent(
    clients: Clients, plain_redis: redis.Redis
) -> None:
    team = new_id()
    first = set_budget(clients, "team", team, max_budget=5, rpm_limit=10)
    plain_redis.hset(keyspace.level_key("team", team), "spent", 1_500_000_000)  # $1.50
    changed = set_budget(clients, "team", team, max_budget=8, rpm_limit=20)
    assert (changed.max_budget, changed.rpm_limit, changed.spent) == (8, 20, 1.5)
    assert changed.budget_remaining == 6.5
    assert changed.created_at == first.created_at


def test_setting_the_same_duration_again_keeps_the_current_period(clients: Clients) -> None:
    team = new_id()
    first = set_budget(clients, "team", team, max_budget=1, budget_duration="30d")
    time.sleep(0.01)
    same = set_budget(clients, "team", team, max_budget=2, budget_duration="30d")
    assert same.budget_reset_at == first.budget_reset_at


def test_a_new_duration_starts_its_first_period_now(clients: Clients) -> None:
    team = new_id()
    set_budget(clients, "team", team, max_budget=1, budget_duration="30d")
    before = time.time()
    changed = set_budget(clients, "team", team, max_budget=1, budget_duration="1d")
    reset_in = changed.budget_reset_at.ToMilliseconds() / 1000 - before
    assert DAY_S - 1 <= reset_in <= DAY_S + 1


def test_without_max_budget_budget_remaining_is_unset(clients: Clients) -> None:
    got = set_budget(clients, "user", new_id("user"), rpm_limit=5)
    assert got.max_budget == 0 and not got.HasField("budget_remaining")
    assert not got.HasField("budget_reset_at")


def test_set_and_delete_are_logged_as_json_without_the_token(
    server: Server, clients: Clients
) -> None:
    team = new_id()
    set_budget(clients, "team", team, max_budget=1)
    delete_budget(clients, "team", team)

    def actions() -> list[tuple[str, str]]:
        lines = server.process.log_text().splitlines()
        entries = [json.loads(line) for line in lines if line.startswith("{")]
        return [(e["action"], e["budget_scope"]) for e in entries if e.get("budget_id") == team]

    assert eventually(lambda: len(actions()) == 2)
    assert actions() == [("budget set", "team"), ("budget deleted", "team")]
    assert server.admin_token not in server.process.log_text()


# --- what is refused -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"scope": "org"}, 'scope must be "user" or "team"'),
        ({"scope": ""}, 'scope must be "user" or "team"'),
        ({"id": "  "}, "id is required"),
        ({"id": "x" * 129}, "id is longer than 128 characters"),
        ({"id": "a\nb"}, "id contains control characters"),
        ({"max_budget": -1.0}, "max_budget"),
        ({"max_budget": float("inf")}, "max_budget"),
        ({"max_budget": 4e-10}, "below 1e-9 USD"),
        ({"budget_duration": "weekly"}, "budget_duration"),
        ({"rpm_limit": -1}, "rpm_limit"),
        ({"tpm_limit": -1}, "tpm_limit"),
        ({"max_parallel_requests": -1}, "max_parallel_requests"),
    ],
)
def test_bad_set_budget_requests_say_what_to_fix(
    clients: Clients, fields: dict[str, Any], message: str
) -> None:
    request = {"scope": "team", "id": new_id(), **fields}
    error = refused(
        clients.budgets.SetBudget, keys_pb2.SetBudgetRequest(**request), metadata=admin(clients)
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in details_of(error)


def test_spec_and_typed_fields_together_are_refused(clients: Clients) -> None:
    request = keys_pb2.SetBudgetRequest(scope="team", id=new_id(), rpm_limit=5)
    request.spec.update({"max_budget": 1})
    error = refused(clients.budgets.SetBudget, request, metadata=admin(clients))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not both (fields: rpm_limit)" in details_of(error)


def test_spec_sets_the_budget_as_the_typed_fields_do(clients: Clients) -> None:
    team = new_id()
    request = keys_pb2.SetBudgetRequest(scope="team", id=team)
    request.spec.update({"max_budget": 3, "budget_duration": "1d", "tpm_limit": 500})
    got = clients.budgets.SetBudget(request, metadata=admin(clients))
    assert (got.max_budget, got.budget_duration, got.tpm_limit) == (3, "1d", 500)


def test_unknown_scope_is_refused_on_reads_too(clients: Clients) -> None:
    error = refused(list_budgets, clients, "org")
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "org" in details_of(error)


def test_get_budget_that_was_never_set_is_not_found(clients: Clients) -> None:
    error = refused(get_budget, clients, "team", new_id())
    assert error.code() is grpc.StatusCode.NOT_FOUND


def test_delete_budget_that_was_never_set_is_not_found(clients: Clients) -> None:
    error = refused(delete_budget, clients, "user", new_id("user"))
    assert error.code() is grpc.StatusCode.NOT_FOUND


def every_call(clients: Clients, metadata: tuple[tuple[str, str], ...]) -> list[grpc.RpcError]:
    stub = clients.budgets
    return [
        refused(stub.SetBudget, keys_pb2.SetBudgetRequest(scope="team", id="t"), metadata=metadata),
        refused(stub.GetBudget, keys_pb2.GetBudgetRequest(scope="team", id="t"), metadata=metadata),
        refused(stub.ListBudgets, keys_pb2.ListBudgetsRequest(scope="team"), metadata=metadata),
        refused(
            stub.DeleteBudget,
            keys_pb2.DeleteBudgetRequest(scope="team", id="t"),
            metadata=metadata,
        ),
    ]


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ((), "admin token missing"),
        (bearer("wrong-admin-token"), "admin token is wrong"),
    ],
    ids=["missing", "wrong"],
)
def test_every_call_needs_the_admin_token(
    clients: Clients, metadata: tuple[tuple[str, str], ...], says: str
) -> None:
    for error in every_call(clients, metadata):
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        assert details_of(error).startswith(says)
        assert "wrong-admin-token" not in details_of(error)


def test_the_usage_token_is_not_an_admin_token(clients: Clients) -> None:
    for error in every_call(clients, bearer(clients.usage_token)):
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED


def test_a_virtual_key_is_not_an_admin_token(clients: Clients) -> None:
    key, _ = clients.create_key(user_id="budget-reader")
    for error in every_call(clients, bearer(key)):
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED
        assert key not in details_of(error)


def test_a_call_scoped_to_a_user_may_read_that_users_budget(clients: Clients) -> None:
    user = new_id("user")
    stored = set_budget(clients, "user", user, max_budget=3)
    got = clients.budgets.GetBudget(
        keys_pb2.GetBudgetRequest(scope="user", id=user),
        metadata=admin(clients, ("x-user-id", user)),
    )
    assert got == stored


@pytest.mark.parametrize(("scope", "scope_id"), [("user", "someone-else"), ("team", "scoped-user")])
def test_a_call_scoped_to_a_user_may_not_read_other_budgets(
    clients: Clients, scope: str, scope_id: str
) -> None:
    set_budget(clients, scope, scope_id, max_budget=1)
    error = refused(
        clients.budgets.GetBudget,
        keys_pb2.GetBudgetRequest(scope=scope, id=scope_id),
        metadata=admin(clients, ("x-user-id", "scoped-user")),
    )
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED


def test_a_call_scoped_to_a_user_may_not_set_list_or_delete(clients: Clients) -> None:
    user = new_id("user")
    set_budget(clients, "user", user, max_budget=1)
    scoped = admin(clients, ("x-user-id", user))
    stub = clients.budgets
    errors = [
        refused(
            stub.SetBudget,
            keys_pb2.SetBudgetRequest(scope="user", id=user, max_budget=100),
            metadata=scoped,
        ),
        refused(stub.ListBudgets, keys_pb2.ListBudgetsRequest(scope="user"), metadata=scoped),
        refused(
            stub.DeleteBudget, keys_pb2.DeleteBudgetRequest(scope="user", id=user), metadata=scoped
        ),
    ]
    assert [e.code() for e in errors] == [grpc.StatusCode.PERMISSION_DENIED] * 3
    assert get_budget(clients, "user", user).max_budget == 1
