"""What /metrics says about the money path, scraped from a real server."""

from __future__ import annotations

import re

import pytest

from tests.conftest import Server
from tests.helpers import Clients, chat_body, fetch

pytestmark = pytest.mark.integration


def scrape(server: Server, series: str) -> float:
    text = fetch(server.http_port, "GET", "/metrics").body.decode()
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def allowed_request_id(clients: Clients, key: str) -> str:
    reply = clients.check({"authorization": f"Bearer {key}"}, chat_body(max_tokens=10))
    headers = {h.header.key: h.header.value for h in reply.ok_response.headers}
    return str(headers["x-virtual-key-request-id"])


def test_an_allowed_check_counts_a_reservation_and_its_usd_at_the_key(
    server: Server, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=10)
    series = f'extauthz_reserved_usd_total{{key_id="{data.id}",level="key"}}'
    opened = scrape(server, "extauthz_reservations_opened_total")
    allowed_request_id(clients, key)
    assert scrape(server, "extauthz_reservations_opened_total") == opened + 1
    assert scrape(server, series) > 0


def test_a_settling_report_counts_a_settled_reservation(server: Server, clients: Clients) -> None:
    key, data = clients.create_key(max_budget=10)
    request_id = allowed_request_id(clients, key)
    settled = scrape(server, "extauthz_reservations_settled_total")
    assert clients.report(data.id, request_id, prompt_tokens=3, completion_tokens=4).settled
    assert scrape(server, "extauthz_reservations_settled_total") == settled + 1


def test_a_shadow_mode_pass_is_counted_by_the_reason_it_would_have_failed(
    server: Server, clients: Clients
) -> None:
    key, _ = clients.create_key(max_parallel_requests=1, enforce=False)
    series = 'extauthz_shadow_denials_total{reason="concurrency_limit_exceeded"}'
    before = scrape(server, series)
    allowed_request_id(clients, key)
    reply = clients.check({"authorization": f"Bearer {key}"}, chat_body(max_tokens=10))
    upstream = {h.header.key: h.header.value for h in reply.ok_response.headers}
    assert upstream["x-virtual-key-would-deny"] == "concurrency_limit_exceeded"
    assert scrape(server, series) == before + 1
