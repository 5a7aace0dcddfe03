"""The requests a run sends, and the gRPC calls that set up and verify it."""

from __future__ import annotations

import json
from typing import Any

import grpc
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

from keys.v1 import keys_pb2, keys_pb2_grpc

CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
REPORT_PATH = "/keys.v1.UsageService/ReportUsage"
CHAT_PATH = "/v1/chat/completions"
CHAT_BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello! Say something short."},
        ],
        "max_tokens": 16,
    }
).encode()

_Http = attribute_context_pb2.AttributeContext.HttpRequest


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def check_request(key: str) -> external_auth_pb2.CheckRequest:
    """What Envoy sends for a chat completion (envoy.yaml: with_request_body, pack_as_bytes)."""
    headers = {
        ":authority": "127.0.0.1:10000",
        ":method": "POST",
        ":path": CHAT_PATH,
        ":scheme": "http",
        "authorization": f"Bearer {key}",
        "content-type": "application/json",
        "content-length": str(len(CHAT_BODY)),
        "user-agent": "bench/1.0",
        "x-forwarded-proto": "http",
        "x-request-id": "4f1c7e5a-1d2b-4c3e-9f8a-7b6c5d4e3f21",
    }
    http = _Http(
        id="1",
        method="POST",
        headers=headers,
        path=CHAT_PATH,
        host="127.0.0.1:10000",
        scheme="http",
        protocol="HTTP/1.1",
        size=len(CHAT_BODY),
        raw_body=CHAT_BODY,
    )
    request = attribute_context_pb2.AttributeContext.Request(http=http)
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(request=request)
    )


def report_request(key_id: str, request_id: str, **fields: Any) -> keys_pb2.ReportUsageRequest:
    fields.setdefault("model", "gpt-4o-mini")
    fields.setdefault("prompt_tokens", 25)
    fields.setdefault("completion_tokens", 16)
    return keys_pb2.ReportUsageRequest(key_id=key_id, request_id=request_id, **fields)


def create_key(address: str, admin_token: str, **fields: Any) -> tuple[str, str]:
    """A new key (full key, id); `fields` as CreateKeyRequest's. Limits default to none."""
    fields.setdefault("name", "bench")
    fields.setdefault("user_id", "bench-user")
    for limit in ("max_budget", "tpm_limit", "rpm_limit"):
        fields.setdefault(limit, 0)
    with grpc.insecure_channel(address) as channel:
        reply = keys_pb2_grpc.KeyServiceStub(channel).CreateKey(
            keys_pb2.CreateKeyRequest(**fields), metadata=bearer(admin_token), timeout=10
        )
    return reply.key, reply.key_data.id


def set_budget(address: str, admin_token: str, scope: str, scope_id: str, **fields: Any) -> None:
    """BudgetService.SetBudget: a user's or team's budget; `fields` as SetBudgetRequest's."""
    with grpc.insecure_channel(address) as channel:
        keys_pb2_grpc.BudgetServiceStub(channel).SetBudget(
            keys_pb2.SetBudgetRequest(scope=scope, id=scope_id, **fields),
            metadata=bearer(admin_token),
            timeout=10,
        )


def get_key(address: str, admin_token: str, key_id: str) -> keys_pb2.KeyData:
    with grpc.insecure_channel(address) as channel:
        data: keys_pb2.KeyData = keys_pb2_grpc.KeyServiceStub(channel).GetKey(
            keys_pb2.GetKeyRequest(id=key_id), metadata=bearer(admin_token), timeout=10
        )
    return data


def check(address: str, request: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
    with grpc.insecure_channel(address) as channel:
        reply: external_auth_pb2.CheckResponse = external_auth_pb2_grpc.AuthorizationStub(
            channel
        ).Check(request, timeout=10)
    return reply


def http_status(reply: external_auth_pb2.CheckResponse) -> int:
    """200 for an allow, else the denial's HTTP status."""
    if reply.status.code == 0 and reply.HasField("ok_response"):
        return 200
    return int(reply.denied_response.status.code)


def expect_allowed(address: str, request: external_auth_pb2.CheckRequest) -> None:
    """The frame h2load will send really is an allow (gRPC OK and an ok_response)."""
    reply = check(address, request)
    if http_status(reply) != 200:
        raise RuntimeError(f"{address}: the bench Check is not allowed: {reply}")


def expect_reported(address: str, token: str, request: keys_pb2.ReportUsageRequest) -> None:
    with grpc.insecure_channel(address) as channel:
        keys_pb2_grpc.UsageServiceStub(channel).ReportUsage(
            request, metadata=bearer(token), timeout=10
        )
