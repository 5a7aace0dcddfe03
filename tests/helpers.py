"""Small clients the tests share: gRPC stubs with tokens, Check requests, plain HTTP."""

from __future__ import annotations

import hmac
import http.client
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from keys import keygen
from keys.model import KeySpec
from keys.store import KeyStore
from keys.v1 import keys_pb2, keys_pb2_grpc

# A key with no limits, for store-level tests: override what a test is about.
OPEN_SPEC = KeySpec(
    name="k",
    user_id="u1",
    team_id="",
    expires_at_ms=1_900_000_000_000,
    allowed_models=("*",),
    max_budget_nanos=0,
    tpm_limit=0,
    rpm_limit=0,
)


def key_spec(**overrides: Any) -> KeySpec:
    spec: KeySpec = replace(OPEN_SPEC, **overrides)
    return spec


async def stored_key(store: KeyStore, **overrides: Any) -> keygen.ParsedKey:
    """A new key in `store` (key_spec with `overrides`), as a Check would parse it."""
    full, _ = await store.create(key_spec(**overrides), "sk-mp")
    parsed = keygen.parse_key(full)
    assert parsed is not None
    return parsed


def eventually(condition: Callable[[], bool], timeout: float = 10, interval: float = 0.1) -> bool:
    """Polls `condition` every `interval` seconds until it holds or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


class CompareDigestSpy:
    """Wraps hmac.compare_digest, recording each call and answering as it would."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any]] = []
        self._real = hmac.compare_digest

    def __call__(self, a: Any, b: Any) -> bool:
        self.calls.append((a, b))
        return self._real(a, b)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Clients:
    channel: grpc.Channel
    admin_token: str
    usage_token: str

    @property
    def keys(self) -> keys_pb2_grpc.KeyServiceStub:
        return keys_pb2_grpc.KeyServiceStub(self.channel)

    @property
    def usage(self) -> keys_pb2_grpc.UsageServiceStub:
        return keys_pb2_grpc.UsageServiceStub(self.channel)

    @property
    def budgets(self) -> keys_pb2_grpc.BudgetServiceStub:
        return keys_pb2_grpc.BudgetServiceStub(self.channel)

    @property
    def authz(self) -> external_auth_pb2_grpc.AuthorizationStub:
        return external_auth_pb2_grpc.AuthorizationStub(self.channel)

    def create_key(self, **fields: Any) -> tuple[str, keys_pb2.KeyData]:
        fields.setdefault("name", "test key")
        fields.setdefault("user_id", "user_123")
        reply = self.keys.CreateKey(
            keys_pb2.CreateKeyRequest(**fields), metadata=bearer(self.admin_token), timeout=5
        )
        return reply.key, reply.key_data

    def get_key(self, key_id: str) -> keys_pb2.KeyData:
        return self.keys.GetKey(
            keys_pb2.GetKeyRequest(id=key_id), metadata=bearer(self.admin_token), timeout=5
        )

    def revoke(self, key_id: str) -> keys_pb2.KeyData:
        return self.keys.RevokeKey(
            keys_pb2.RevokeKeyRequest(id=key_id), metadata=bearer(self.admin_token), timeout=5
        )

    def report(self, key_id: str, request_id: str, **fields: Any) -> keys_pb2.ReportUsageResponse:
        fields.setdefault("model", "gpt-4")
        return self.usage.ReportUsage(
            keys_pb2.ReportUsageRequest(key_id=key_id, request_id=request_id, **fields),
            metadata=bearer(self.usage_token),
            timeout=5,
        )

    def check(
        self, headers: dict[str, str], body: bytes = b"", path: str = "/v1/chat/completions"
    ) -> external_auth_pb2.CheckResponse:
        return self.authz.Check(check_request(headers, body, path), timeout=5)


def check_request(
    headers: dict[str, str], body: bytes = b"", path: str = "/v1/chat/completions"
) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http_request = request.attributes.request.http
    http_request.method = "POST" if body else "GET"
    http_request.path = path
    http_request.headers.update(headers)
    http_request.raw_body = body
    return request


def chat_body(model: str = "gpt-4", **extra: Any) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "Hello!"}], **extra}
    ).encode()


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def fetch(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> HttpReply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return HttpReply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()
