"""What an operator sees: /metrics, health endpoints, structured logs, SIGTERM draining."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from keys.v1 import keys_pb2
from tests.conftest import Server, start_server
from tests.helpers import Clients, bearer, chat_body, fetch

pytestmark = pytest.mark.integration


def samples(port: int) -> list[tuple[str, dict[str, str], float]]:
    reply = fetch(port, "GET", "/metrics")
    assert reply.status == 200
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(reply.body.decode())
        for s in family.samples
    ]


def value(found: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in found if n == name and labels.items() <= lab.items())


def test_guide_metrics_count_requests_tokens_cost_and_failures(
    server: Server, clients: Clients
) -> None:
    key, data = clients.create_key(rpm_limit=1)
    auth = {"authorization": f"Bearer {key}"}
    clients.check(auth, chat_body("gpt-4"))
    clients.check(auth, chat_body("gpt-4"))  # over RPM
    clients.report(data.id, "m1", prompt_tokens=10, completion_tokens=5, cost=0.5)
    found = samples(server.http_port)
    assert value(found, "ailb_key_requests_total", key_id=data.id, model="gpt-4") == 1
    assert value(found, "ailb_key_tokens_total", key_id=data.id, model="gpt-4") == 15
    assert value(found, "ailb_key_cost_total", key_id=data.id) == 0.5
    assert value(found, "ailb_key_validation_failures_total", reason="rate_limit_exceeded") >= 1
    assert value(found, "extauthz_check_duration_seconds_count", decision="allow") >= 1
    assert value(found, "extauthz_redis_latency_seconds_count", op="check") >= 2
    assert value(found, "extauthz_usage_reports_total", outcome="charged") >= 1
    assert value(found, "extauthz_redis_up") == 1


def test_metric_labels_never_carry_a_key(server: Server, clients: Clients) -> None:
    key, _ = clients.create_key()
    clients.check({"authorization": f"Bearer {key}"}, chat_body(model=key))
    text = fetch(server.http_port, "GET", "/metrics").body.decode()
    assert key not in text and key.rsplit("-", 1)[1] not in text


def test_key_id_label_can_be_dropped(redis_url: str, tmp_path: Path) -> None:
    srv = start_server(redis_url, tmp_path, extra={"EXTAUTHZ_METRICS_KEY_ID": "false"})
    channel = grpc.insecure_channel(srv.address)
    try:
        clients = Clients(channel, srv.admin_token, srv.usage_token)
        key, data = clients.create_key()
        clients.check({"authorization": f"Bearer {key}"}, chat_body("gpt-4"))
        clients.report(data.id, "x", cost=0.25)
        found = samples(srv.http_port)
        assert value(found, "ailb_key_requests_total", model="gpt-4") == 1
        assert value(found, "ailb_key_cost_total") == 0.25
        assert not any("key_id" in labels for _, labels, _ in found)
    finally:
        channel.close()
        srv.process.stop()


def test_healthz_and_readyz_answer(server: Server) -> None:
    assert fetch(server.http_port, "GET", "/healthz").status == 200
    assert fetch(server.http_port, "GET", "/readyz").body == b"ready\n"


@pytest.mark.parametrize(
    ("method", "path", "status"), [("GET", "/nope", 404), ("POST", "/metrics", 405)]
)
def test_http_port_refuses_what_it_does_not_serve(
    server: Server, method: str, path: str, status: int
) -> None:
    assert fetch(server.http_port, method, path).status == status


def test_grpc_health_serves_every_service(clients: Clients) -> None:
    stub = health_pb2_grpc.HealthStub(clients.channel)
    for service in (
        "",
        "envoy.service.auth.v3.Authorization",
        "keys.v1.KeyService",
        "keys.v1.UsageService",
        "keys.v1.BudgetService",
    ):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_admin_actions_are_logged_as_json_without_secrets(server: Server, clients: Clients) -> None:
    key, data = clients.create_key()
    clients.keys.UpdateKey(
        keys_pb2.UpdateKeyRequest(id=data.id, rpm_limit=3), metadata=bearer(clients.admin_token)
    )
    rotated = clients.keys.RotateKey(
        keys_pb2.RotateKeyRequest(id=data.id), metadata=bearer(clients.admin_token)
    )
    clients.revoke(data.id)
    log = server.process.log_text()
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    actions = [(e.get("action"), e.get("fields")) for e in entries if e.get("key_id") == data.id]
    assert ("key created", None) in actions and ("key updated", ["rpm_limit"]) in actions
    assert ("key rotated", None) in actions and ("key revoked", None) in actions
    created = next(
        e for e in entries if e.get("action") == "key created" and e["key_id"] == data.id
    )
    assert created["actor"] == "admin" and created["peer"]
    for secret in (key, rotated.key, server.admin_token):
        assert secret not in log


def test_sigterm_drains_then_exits_zero(redis_url: str, tmp_path: Path) -> None:
    srv = start_server(redis_url, tmp_path, extra={"EXTAUTHZ_DRAIN_SECONDS": "4"})
    channel = grpc.insecure_channel(srv.address)
    clients = Clients(channel, srv.admin_token, srv.usage_token)
    key, _ = clients.create_key()
    health = health_pb2_grpc.HealthStub(channel)
    try:
        srv.process.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3
        status = health_pb2.HealthCheckResponse.SERVING
        while time.monotonic() < deadline and status == health_pb2.HealthCheckResponse.SERVING:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        # still answering Checks while draining
        assert clients.check({"authorization": f"Bearer {key}"}, chat_body()).status.code == 0
        assert srv.process.proc.wait(timeout=15) == 0
        assert '"msg": "stopped"' in srv.process.log_text()
    finally:
        channel.close()
        srv.process.stop()


def test_malformed_request_line_gets_400(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
