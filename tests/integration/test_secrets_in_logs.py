"""No secret ever reaches the server's logs: full keys, secrets, admin or usage tokens."""

from __future__ import annotations

import json

import grpc
import pytest

from keys.v1 import keys_pb2
from tests.conftest import Server
from tests.helpers import Clients, bearer, chat_body

pytestmark = pytest.mark.integration


def test_full_scenario_logs_no_secret(server: Server, clients: Clients) -> None:
    key, data = clients.create_key(rpm_limit=2, allowed_models=["gpt-4"], max_budget=2.0)
    auth = {"authorization": f"Bearer {key}"}
    clients.check(auth, chat_body())  # allowed
    clients.check(auth, chat_body("gpt-4o"))  # model not allowed
    clients.check({"x-api-key": key[:-2] + "zz"}, chat_body())  # tampered
    clients.check(auth, chat_body())
    clients.check(auth, chat_body())  # over RPM
    clients.report(data.id, "req-1", cost=2.5)  # over budget
    clients.check(auth, chat_body())
    clients.keys.ValidateKey(keys_pb2.ValidateKeyRequest(key=key))
    clients.keys.GetKey(keys_pb2.GetKeyRequest(id=data.id), metadata=bearer(key))
    with pytest.raises(grpc.RpcError):
        clients.keys.GetKey(keys_pb2.GetKeyRequest(id=data.id), metadata=bearer(key + "x"))
    clients.revoke(data.id)
    clients.check(auth, chat_body())

    log = server.process.log_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    denials = [e for e in lines if e["msg"] == "denied" and e.get("key_id") == data.id]
    assert {e["level"] for e in denials} == {"info"}  # no extra field takes "level"
    assert {e["reason"] for e in denials} >= {
        "model_not_allowed",
        "invalid_api_key",
        "rate_limit_exceeded",
        "key_revoked",
    }
    secret = key.rsplit("-", 1)[1]
    for forbidden in (key, secret, secret[:16], server.admin_token, server.usage_token):
        assert forbidden not in log
