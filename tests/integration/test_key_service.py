"""keys.v1.KeyService through a real server process and a real gRPC channel."""

from __future__ import annotations

import json
import subprocess

import grpc
import pytest

from devstack.processes import executable
from keys.v1 import keys_pb2
from tests.conftest import Server
from tests.helpers import Clients, bearer

pytestmark = pytest.mark.integration


def test_create_key_returns_the_key_once_with_its_data(clients: Clients) -> None:
    key, data = clients.create_key(
        name="My Production Key",
        user_id="user_123",
        team_id="team_9",
        allowed_models=["gpt-4"],
        max_budget=1.0,
        tpm_limit=1000,
        rpm_limit=5,
        metadata={"env": "prod"},
    )
    assert key.startswith(f"sk-mp-{data.id}-")
    assert (data.name, data.user_id, data.team_id, data.status) == (
        "My Production Key",
        "user_123",
        "team_9",
        "active",
    )
    assert list(data.allowed_models) == ["gpt-4"]
    assert (data.max_budget, data.spent, data.budget_remaining) == (1.0, 0.0, 1.0)
    assert (data.tpm_limit, data.rpm_limit, data.total_requests) == (1000, 5, 0)
    assert dict(data.metadata) == {"env": "prod"}
    assert not data.HasField("last_used")
    assert key not in str(clients.get_key(data.id))


def test_create_key_applies_the_environment_defaults(clients: Clients) -> None:
    _, data = clients.create_key()
    assert (data.max_budget, data.tpm_limit, data.rpm_limit) == (25.5, 5000, 40)
    assert list(data.allowed_models) == ["*"]
    lifetime = data.expires_at.ToSeconds() - data.created_at.ToSeconds()
    assert lifetime == 90 * 86_400  # VIRTUAL_KEY_MAX_EXPIRES_DAYS


def test_explicit_zero_means_no_budget_and_no_limits(clients: Clients) -> None:
    _, data = clients.create_key(max_budget=0, tpm_limit=0, rpm_limit=0)
    assert (data.max_budget, data.tpm_limit, data.rpm_limit) == (0, 0, 0)
    assert not data.HasField("budget_remaining")


def test_expires_days_is_honoured(clients: Clients) -> None:
    _, data = clients.create_key(expires_days=7)
    assert data.expires_at.ToSeconds() - data.created_at.ToSeconds() == 7 * 86_400


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"expires_days": 91}, "expires_days must be from 1 to 90"),
        ({"expires_days": 0}, "expires_days must be from 1 to 90"),
        ({"max_budget": -1.0}, "max_budget"),
        ({"max_budget": float("nan")}, "max_budget"),
        ({"max_budget": 4e-10}, "below 1e-9 USD"),
        ({"rpm_limit": -5}, "rpm_limit"),
        ({"name": "  "}, "name is required"),
        ({"user_id": ""}, "user_id is required"),
        ({"allowed_models": ["gpt-4", ""]}, "allowed_models entry is required"),
        ({"allowed_models": ["m"] * 1001}, "more than 1000"),
    ],
)
def test_bad_create_requests_say_what_to_fix(
    clients: Clients, fields: dict[str, object], message: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        clients.create_key(**fields)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")


@pytest.mark.parametrize("token", [None, "wrong"])
def test_admin_calls_need_the_admin_token(clients: Clients, token: str | None) -> None:
    metadata = bearer(token) if token else ()
    with pytest.raises(grpc.RpcError) as err:
        clients.keys.CreateKey(keys_pb2.CreateKeyRequest(name="x", user_id="u"), metadata=metadata)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ((), "admin token missing"),
        ((("authorization", "Basic abc"),), "admin token missing"),
        (bearer("wrong-admin-token"), "admin token is wrong"),
    ],
    ids=["no-header", "not-bearer", "wrong"],
)
def test_admin_refusal_says_whether_the_token_is_missing_or_wrong(
    clients: Clients, metadata: tuple[tuple[str, str], ...], says: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        clients.keys.CreateKey(keys_pb2.CreateKeyRequest(name="x", user_id="u"), metadata=metadata)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    details = err.value.details() or ""
    assert details.startswith(says)
    assert "wrong-admin-token" not in details and "abc" not in details


@pytest.mark.parametrize(
    ("metadata", "says"),
    [((), "admin or usage token missing"), (bearer("nope"), "admin or usage token is wrong")],
    ids=["missing", "wrong"],
)
def test_report_usage_refusal_says_whether_the_token_is_missing_or_wrong(
    clients: Clients, metadata: tuple[tuple[str, str], ...], says: str
) -> None:
    request = keys_pb2.ReportUsageRequest(key_id="0123456789abcdef", request_id="r", model="m")
    with pytest.raises(grpc.RpcError) as err:
        clients.usage.ReportUsage(request, metadata=metadata)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert (err.value.details() or "").startswith(says)


def test_usage_token_cannot_create_keys(clients: Clients) -> None:
    with pytest.raises(grpc.RpcError) as err:
        clients.keys.CreateKey(
            keys_pb2.CreateKeyRequest(name="x", user_id="u"), metadata=bearer(clients.usage_token)
        )
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_get_unknown_key_is_not_found(clients: Clients) -> None:
    with pytest.raises(grpc.RpcError) as err:
        clients.get_key("0123456789abcdef")
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_get_key_with_a_malformed_id_is_invalid(clients: Clients) -> None:
    with pytest.raises(grpc.RpcError) as err:
        clients.get_key("not-an-id")
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_x_user_id_hides_other_users_keys(clients: Clients) -> None:
    _, data = clients.create_key(user_id="alice")
    with pytest.raises(grpc.RpcError) as err:
        clients.keys.GetKey(
            keys_pb2.GetKeyRequest(id=data.id),
            metadata=(*bearer(clients.admin_token), ("x-user-id", "bob")),
        )
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_x_user_id_fills_in_user_id_on_create(clients: Clients) -> None:
    reply = clients.keys.CreateKey(
        keys_pb2.CreateKeyRequest(name="mine"),
        metadata=(*bearer(clients.admin_token), ("x-user-id", "carol")),
    )
    assert reply.key_data.user_id == "carol"


def test_active_key_may_read_itself(clients: Clients) -> None:
    key, data = clients.create_key()
    own = clients.keys.GetKey(keys_pb2.GetKeyRequest(id=data.id), metadata=bearer(key))
    assert own.id == data.id


def test_revoked_key_may_not_read_itself(clients: Clients) -> None:
    key, data = clients.create_key()
    clients.revoke(data.id)
    with pytest.raises(grpc.RpcError) as err:
        clients.keys.GetKey(keys_pb2.GetKeyRequest(id=data.id), metadata=bearer(key))
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_validate_key_reports_validity_without_counting(clients: Clients) -> None:
    key, data = clients.create_key(rpm_limit=3)
    reply = clients.keys.ValidateKey(keys_pb2.ValidateKeyRequest(key=key))
    assert reply.valid and reply.key_id == data.id and reply.error == ""
    assert reply.rate_limit_info.rpm.limit == 3 and reply.rate_limit_info.rpm.remaining == 3
    assert clients.get_key(data.id).total_requests == 0


def test_validate_key_names_the_problem(clients: Clients) -> None:
    key, data = clients.create_key()
    clients.revoke(data.id)
    revoked = clients.keys.ValidateKey(keys_pb2.ValidateKeyRequest(key=key))
    assert (revoked.valid, revoked.error) == (False, "key_revoked")
    assert not revoked.HasField("key_data")  # a revoked key learns no more than that
    other = "R" if key.endswith("Q") else "Q"  # a different last character, always
    tampered = clients.keys.ValidateKey(keys_pb2.ValidateKeyRequest(key=key[:-1] + other))
    assert (tampered.valid, tampered.error) == (False, "invalid_api_key")
    assert not tampered.HasField("key_data")


def test_grpcurl_creates_a_key_through_reflection(server: Server) -> None:
    request = {
        "name": "via grpcurl",
        "user_id": "user_123",
        "allowed_models": ["gpt-4"],
        "max_budget": 1.0,
        "tpm_limit": 1000,
        "rpm_limit": 5,
    }
    result = subprocess.run(
        [
            executable("grpcurl"),
            "-plaintext",
            "-H",
            f"authorization: Bearer {server.admin_token}",
            "-d",
            json.dumps(request),
            server.address,
            "keys.v1.KeyService/CreateKey",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    reply = json.loads(result.stdout)
    assert reply["key"].startswith("sk-mp-" + reply["key_data"]["id"])
    assert reply["key_data"]["rpm_limit"] == 5


def test_grpcurl_lists_our_services(server: Server) -> None:
    result = subprocess.run(
        [executable("grpcurl"), "-plaintext", server.address, "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    services = set(result.stdout.split())
    assert {
        "envoy.service.auth.v3.Authorization",
        "keys.v1.KeyService",
        "keys.v1.UsageService",
        "keys.v1.BudgetService",
        "grpc.health.v1.Health",
    } <= services


def test_public_path_check_needs_no_key_and_strips_forged_identity(clients: Clients) -> None:
    reply = clients.check(
        {"x-virtual-key-id": "forged", "authorization": "Bearer whatever"},
        path="/healthz?probe=1",
    )
    assert reply.status.code == 0 and reply.HasField("ok_response")
    assert list(reply.ok_response.headers_to_remove) == ["x-virtual-key-id"]
    assert not reply.ok_response.headers
