"""KeyService lifecycle and UsageService.GetUsage through a real server (gRPC and grpcurl)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import grpc
import pytest

from devstack.processes import executable
from keys import keygen
from keys.v1 import keys_pb2
from tests.conftest import Server
from tests.helpers import Clients, bearer, chat_body

pytestmark = pytest.mark.integration


def admin_as(clients: Clients, user: str) -> tuple[tuple[str, str], ...]:
    return (*bearer(clients.admin_token), ("x-user-id", user))


def unique(prefix: str) -> str:
    return f"{prefix}-{keygen.new_key_id()}"


def update(clients: Clients, **fields: Any) -> keys_pb2.KeyData:
    return clients.keys.UpdateKey(
        keys_pb2.UpdateKeyRequest(**fields), metadata=bearer(clients.admin_token), timeout=5
    )


def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


# --- ListKeys ---------------------------------------------------------------------------


def test_list_keys_pages_through_a_users_keys(clients: Clients) -> None:
    user = unique("lister")
    created = [clients.create_key(user_id=user)[1].id for _ in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = clients.keys.ListKeys(
            keys_pb2.ListKeysRequest(user_id=user, page_size=2, page_token=token),
            metadata=bearer(clients.admin_token),
        )
        seen.extend(k.id for k in page.keys)
        if not (token := page.next_page_token):
            break
    assert sorted(seen) == sorted(created)


def test_x_user_id_lists_only_that_users_keys(clients: Clients) -> None:
    alice, bob = unique("alice"), unique("bob")
    mine = clients.create_key(user_id=alice)[1].id
    clients.create_key(user_id=bob)
    own = clients.keys.ListKeys(keys_pb2.ListKeysRequest(), metadata=admin_as(clients, alice))
    assert [k.id for k in own.keys] == [mine]
    other = clients.keys.ListKeys(
        keys_pb2.ListKeysRequest(user_id=bob), metadata=admin_as(clients, alice)
    )
    assert list(other.keys) == []


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"page_token": "%%%"}, "page_token"),
        ({"page_size": 501}, "page_size"),
        ({"status": "sleeping"}, "status"),
    ],
)
def test_bad_list_requests_are_invalid(
    clients: Clients, request_fields: dict[str, Any], message: str
) -> None:
    err = rpc_error(
        lambda: clients.keys.ListKeys(
            keys_pb2.ListKeysRequest(**request_fields), metadata=bearer(clients.admin_token)
        )
    )
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and message in (err.details() or "")


# --- UpdateKey --------------------------------------------------------------------------


def test_update_changes_only_the_fields_sent(clients: Clients) -> None:
    _, data = clients.create_key(name="orig", rpm_limit=5, tpm_limit=7, metadata={"a": "b"})
    after = update(clients, id=data.id, rpm_limit=50)
    assert (after.rpm_limit, after.tpm_limit, after.name, dict(after.metadata)) == (
        50,
        7,
        "orig",
        {"a": "b"},
    )


def test_update_replaces_models_metadata_and_budget(clients: Clients) -> None:
    _, data = clients.create_key(allowed_models=["gpt-4"])
    after = update(
        clients,
        id=data.id,
        allowed_models=keys_pb2.ModelList(models=["gpt-4o", "o3"]),
        metadata=keys_pb2.Metadata(entries={"team": "ml"}),
        max_budget=12.5,
        budget_duration="30d",
        expires_days=10,
    )
    assert list(after.allowed_models) == ["gpt-4o", "o3"]
    assert dict(after.metadata) == {"team": "ml"}
    assert (after.max_budget, after.budget_duration) == (12.5, "30d")
    assert after.budget_reset_at.ToSeconds() > 0
    assert after.expires_at.ToSeconds() - after.created_at.ToSeconds() in range(
        10 * 86_400 - 5, 10 * 86_400 + 5
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rpm_limit": -1}, "rpm_limit"),
        ({"max_budget": 1e12}, "max_budget"),
        ({"name": ""}, "name is required"),
        ({"allowed_models": keys_pb2.ModelList(models=["m"] * 10_000)}, "more than 1000"),
        ({"budget_duration": "fortnight"}, "budget_duration"),
        ({"expires_days": 10_000}, "expires_days"),
        ({"metadata": keys_pb2.Metadata(entries={"k": "v" * 2000})}, "metadata value"),
    ],
)
def test_bad_updates_say_what_to_fix_and_change_nothing(
    clients: Clients, fields: dict[str, Any], message: str
) -> None:
    _, data = clients.create_key(name="keep", rpm_limit=3)
    err = rpc_error(lambda: update(clients, id=data.id, tpm_limit=99, **fields))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and message in (err.details() or "")
    after = clients.get_key(data.id)
    assert (after.name, after.rpm_limit, after.tpm_limit) == ("keep", 3, data.tpm_limit)


def test_update_of_unknown_key_is_not_found(clients: Clients) -> None:
    err = rpc_error(lambda: update(clients, id="00000000000000aa", rpm_limit=1))
    assert err.code() is grpc.StatusCode.NOT_FOUND


def test_update_of_another_users_key_is_not_found(clients: Clients) -> None:
    _, data = clients.create_key(user_id=unique("owner"))
    err = rpc_error(
        lambda: clients.keys.UpdateKey(
            keys_pb2.UpdateKeyRequest(id=data.id, rpm_limit=1),
            metadata=admin_as(clients, "intruder"),
        )
    )
    assert err.code() is grpc.StatusCode.NOT_FOUND
    assert clients.get_key(data.id).rpm_limit == data.rpm_limit


# --- RotateKey / DeleteKey --------------------------------------------------------------


def test_rotate_returns_a_new_key_for_the_same_id(clients: Clients) -> None:
    old, data = clients.create_key()
    reply = clients.keys.RotateKey(
        keys_pb2.RotateKeyRequest(id=data.id), metadata=bearer(clients.admin_token)
    )
    assert reply.key != old and reply.key.startswith(f"sk-mp-{data.id}-")
    assert clients.check({"authorization": f"Bearer {reply.key}"}, chat_body()).status.code == 0
    denied = clients.check({"authorization": f"Bearer {old}"}, chat_body())
    assert denied.denied_response.status.code == 401


def test_rotate_with_grace_keeps_the_old_key_working(clients: Clients) -> None:
    old, data = clients.create_key()
    clients.keys.RotateKey(
        keys_pb2.RotateKeyRequest(id=data.id, grace_seconds=300),
        metadata=bearer(clients.admin_token),
    )
    assert clients.check({"authorization": f"Bearer {old}"}, chat_body()).status.code == 0


def test_delete_removes_the_key(clients: Clients) -> None:
    key, data = clients.create_key()
    clients.keys.DeleteKey(
        keys_pb2.DeleteKeyRequest(id=data.id), metadata=bearer(clients.admin_token)
    )
    assert rpc_error(lambda: clients.get_key(data.id)).code() is grpc.StatusCode.NOT_FOUND
    assert (
        clients.check({"authorization": f"Bearer {key}"}, chat_body()).denied_response.status.code
        == 401
    )


# --- GetUsage ---------------------------------------------------------------------------


def test_get_usage_totals_and_rows_for_a_key(clients: Clients) -> None:
    _, data = clients.create_key()
    clients.report(data.id, "u1", prompt_tokens=100, completion_tokens=50)
    clients.report(data.id, "u2", model="gpt-4o", cost=0.5, prompt_tokens=1)
    usage = clients.usage.GetUsage(
        keys_pb2.GetUsageRequest(key_id=data.id, days=7), metadata=bearer(clients.admin_token)
    )
    assert usage.totals.requests == 2
    assert usage.totals.prompt_tokens == 101 and usage.totals.completion_tokens == 50
    assert usage.totals.cost == pytest.approx(0.5 + 100 * 30e-6 + 50 * 60e-6)
    assert {(r.model, r.requests) for r in usage.rows} == {("gpt-4", 1), ("gpt-4o", 1)}
    assert all(r.date == usage.end_date for r in usage.rows)
    assert list(usage.key_ids) == [data.id]


def test_a_key_may_read_its_own_usage(clients: Clients) -> None:
    key, data = clients.create_key()
    clients.report(data.id, "u1", cost=0.25)
    usage = clients.usage.GetUsage(keys_pb2.GetUsageRequest(key_id=data.id), metadata=bearer(key))
    assert usage.totals.cost == 0.25


def test_a_key_may_not_read_another_keys_usage(clients: Clients) -> None:
    key, _ = clients.create_key()
    _, other = clients.create_key()
    err = rpc_error(
        lambda: clients.usage.GetUsage(
            keys_pb2.GetUsageRequest(key_id=other.id), metadata=bearer(key)
        )
    )
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED


def test_user_and_team_totals_sum_their_keys(clients: Clients) -> None:
    user, team = unique("spender"), unique("team")
    _, a = clients.create_key(user_id=user, team_id=team)
    _, b = clients.create_key(user_id=user)
    _, c = clients.create_key(user_id=unique("other"), team_id=team)
    for key_id, cost in ((a.id, 1.0), (b.id, 2.0), (c.id, 4.0)):
        clients.report(key_id, "r", cost=cost)
    admin = bearer(clients.admin_token)
    by_user = clients.usage.GetUsage(keys_pb2.GetUsageRequest(user_id=user), metadata=admin)
    by_team = clients.usage.GetUsage(keys_pb2.GetUsageRequest(team_id=team), metadata=admin)
    assert (by_user.totals.cost, by_team.totals.cost) == (3.0, 5.0)
    scoped = clients.usage.GetUsage(
        keys_pb2.GetUsageRequest(team_id=team), metadata=admin_as(clients, user)
    )
    assert scoped.totals.cost == 1.0


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"key_id": "0000000000000001", "user_id": "u"},
        {"key_id": "x"},
        {"key_id": "0000000000000001", "days": 1000},
    ],
)
def test_bad_usage_queries_are_invalid(clients: Clients, fields: dict[str, Any]) -> None:
    err = rpc_error(
        lambda: clients.usage.GetUsage(
            keys_pb2.GetUsageRequest(**fields), metadata=bearer(clients.admin_token)
        )
    )
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT


# --- every method through grpcurl ---------------------------------------------------------


def grpcurl(server: Server, method: str, body: dict[str, Any], token: str | None = None) -> Any:
    result = subprocess.run(
        [
            executable("grpcurl"),
            "-plaintext",
            "-H",
            f"authorization: Bearer {token or server.admin_token}",
            "-d",
            json.dumps(body),
            server.address,
            method,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout or "{}")


def test_every_method_works_through_grpcurl(server: Server) -> None:
    user = unique("grpcurl")
    created = grpcurl(server, "keys.v1.KeyService/CreateKey", {"name": "g", "user_id": user})
    key_id = created["key_data"]["id"]
    assert grpcurl(server, "keys.v1.KeyService/GetKey", {"id": key_id})["user_id"] == user
    listed = grpcurl(server, "keys.v1.KeyService/ListKeys", {"user_id": user})
    assert [k["id"] for k in listed["keys"]] == [key_id]
    updated = grpcurl(server, "keys.v1.KeyService/UpdateKey", {"id": key_id, "rpm_limit": 7})
    assert updated["rpm_limit"] == 7
    valid = grpcurl(server, "keys.v1.KeyService/ValidateKey", {"key": created["key"]})
    assert valid["valid"] is True
    charged = grpcurl(
        server,
        "keys.v1.UsageService/ReportUsage",
        {"key_id": key_id, "request_id": "g1", "model": "gpt-4", "cost": 0.75},
        token=server.usage_token,
    )
    assert charged["spent"] == 0.75
    usage = grpcurl(server, "keys.v1.UsageService/GetUsage", {"key_id": key_id})
    assert usage["totals"]["cost"] == 0.75
    rotated = grpcurl(server, "keys.v1.KeyService/RotateKey", {"id": key_id})
    assert rotated["key"] != created["key"]
    revoked = grpcurl(server, "keys.v1.KeyService/RevokeKey", {"id": key_id})
    assert revoked["status"] == "revoked"
    assert grpcurl(server, "keys.v1.KeyService/DeleteKey", {"id": key_id}) == {"id": key_id}


def test_an_empty_x_user_id_is_refused_not_read_as_everyone(clients: Clients) -> None:
    err = rpc_error(
        lambda: clients.keys.ListKeys(keys_pb2.ListKeysRequest(), metadata=admin_as(clients, ""))
    )
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
