"""The usage tap (extauthz/tap.py) behind the shipped envoy.yaml, in front of an upstream
that reports nothing: every response is charged from the usage it carries (or, where it
carries none, the documented estimate), exactly once, and the client sees what the
upstream sent, less only the usage chunk it did not ask for."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import math
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from devstack import processes as p
from devstack.mock_upstream import MockUpstream, Seen
from keys.pricing import PriceTable
from tests.conftest import Envoy, Server, start_envoy
from tests.helpers import Clients, HttpReply, eventually, fetch

pytestmark = pytest.mark.e2e
CHAT = "/v1/chat/completions"
PRICES = PriceTable.builtin()
MESSAGES = [{"role": "user", "content": "Hi"}]
PROMPT = 1  # the mock's prompt tokens for MESSAGES


@pytest.fixture(scope="module")
def silent(server: Server) -> Iterator[MockUpstream]:
    mock = MockUpstream(p.free_port(), server.address, server.usage_token, reports=False)
    yield mock.start()
    mock.stop()


@pytest.fixture(scope="module")
def tapped(
    server: Server, silent: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Envoy]:
    """The shipped envoy.yaml, with the silent upstream behind it."""
    envoy = start_envoy(server.grpc_port, silent.port, tmp_path_factory.mktemp("tap"))
    yield envoy
    envoy.process.stop()


def post(
    envoy: Envoy,
    key: str,
    path: str = CHAT,
    headers: dict[str, str] | None = None,
    **body: object,
) -> HttpReply:
    request = {"model": "gpt-4o", **({"messages": MESSAGES} if path == CHAT else {}), **body}
    sent = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    payload = json.dumps(request).encode()
    return fetch(envoy.port, "POST", path, {**sent, **(headers or {})}, payload)


def charged(clients: Clients, key_id: str) -> int:
    return round(clients.get_key(key_id).spent * 1e9)


def settled(clients: Clients, key_id: str) -> bool:
    key = clients.get_key(key_id)
    return key.in_flight == 0 and key.reserved == 0


def seen_by(mock: MockUpstream, key_id: str) -> Seen:
    return next(s for s in reversed(mock.seen) if s.headers.get("x-virtual-key-id") == key_id)


def without_usage_chunk(stream: bytes) -> bytes:
    events = stream.split(b"\n\n")
    kept = [e for e in events if not (b'"usage": {' in e and b'"choices": []' in e)]
    assert len(kept) == len(events) - 1, "the stream had one usage chunk"
    return b"\n\n".join(kept)


def counter(server: Server, series: str) -> float:
    text = fetch(server.http_port, "GET", "/metrics").body.decode()
    line = next((ln for ln in text.splitlines() if ln.startswith(series)), "")
    return float(line.split()[-1]) if line else 0.0


def unmetered(server: Server, reason: str) -> float:
    return counter(server, f'extauthz_tap_unmetered_total{{reason="{reason}"}}')


# --- responses that carry usage --------------------------------------------------------


def test_a_json_completion_is_charged_from_its_usage_with_no_report(
    tapped: Envoy, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=10)
    reply = post(tapped, key, max_tokens=7)
    assert reply.status == 200
    usage = reply.json()["usage"]
    cost = PRICES.cost_nanos("gpt-4o", usage["prompt_tokens"], usage["completion_tokens"])
    assert eventually(lambda: charged(clients, data.id) == cost)
    assert settled(clients, data.id)


def test_a_stream_that_asked_for_usage_reaches_the_client_byte_for_byte(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=10)
    options = {"include_usage": True}
    reply = post(tapped, key, max_tokens=9, stream=True, stream_options=options)
    assert reply.status == 200
    assert reply.body == seen_by(silent, data.id).sent
    assert eventually(lambda: charged(clients, data.id) == PRICES.cost_nanos("gpt-4o", PROMPT, 9))
    assert settled(clients, data.id)


def test_a_stream_that_did_not_ask_for_usage_is_charged_and_the_chunk_is_removed(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=10)
    reply = post(tapped, key, max_tokens=6, stream=True)
    upstream = seen_by(silent, data.id)
    assert json.loads(upstream.body)["stream_options"] == {"include_usage": True}
    assert reply.status == 200
    assert reply.body == without_usage_chunk(upstream.sent)
    assert reply.body.endswith(b"data: [DONE]\n\n")
    assert eventually(lambda: charged(clients, data.id) == PRICES.cost_nanos("gpt-4o", PROMPT, 6))


def test_stream_options_the_client_set_are_kept_when_usage_is_added(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=10)
    options = {"include_usage": False, "include_obfuscation": False}
    assert post(tapped, key, stream=True, stream_options=options).status == 200
    sent = json.loads(seen_by(silent, data.id).body)
    assert sent["stream_options"] == {"include_usage": True, "include_obfuscation": False}
    assert sent["messages"] == MESSAGES


def test_a_request_the_tap_does_not_change_reaches_the_upstream_unchanged(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=10)
    body = b'{"model":"gpt-4o",  "messages":[{"role":"user","content":"Hi"}],"max_tokens":3}'
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    assert fetch(tapped.port, "POST", CHAT, headers, body).status == 200
    assert seen_by(silent, data.id).body == body


def test_sse_events_split_at_every_byte_offset_are_charged_and_filtered_exactly(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=100, rpm_limit=0, tpm_limit=0)
    first = post(tapped, key, max_tokens=2, stream=True)
    length = len(seen_by(silent, data.id).sent)
    for offset in range(1, length):
        split = {"x-mock-split-at": str(offset)}
        reply = post(tapped, key, headers=split, max_tokens=2, stream=True)
        assert reply.body == without_usage_chunk(seen_by(silent, data.id).sent), offset
    assert first.status == 200
    requests = length  # the first, and one per offset
    cost = PRICES.cost_nanos("gpt-4o", PROMPT, 2)
    assert eventually(lambda: charged(clients, data.id) == requests * cost)
    assert eventually(lambda: settled(clients, data.id))


def test_a_gzip_stream_that_asked_for_usage_is_charged(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=10)
    reply = post(
        tapped,
        key,
        headers={"accept-encoding": "gzip"},
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert reply.headers.get("content-encoding") == "gzip"
    assert gzip.decompress(reply.body) == seen_by(silent, data.id).sent
    assert eventually(lambda: charged(clients, data.id) == PRICES.cost_nanos("gpt-4o", PROMPT, 4))


def test_a_stream_whose_usage_chunk_is_removed_is_asked_for_without_encoding(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    """The chunk is cut from plain text: the upstream is asked for identity."""
    key, data = clients.create_key(max_budget=10)
    reply = post(tapped, key, headers={"accept-encoding": "gzip"}, max_tokens=4, stream=True)
    upstream = seen_by(silent, data.id)
    assert upstream.headers["accept-encoding"] == "identity"
    assert "content-encoding" not in reply.headers
    assert reply.body == without_usage_chunk(upstream.sent)
    assert eventually(lambda: charged(clients, data.id) == PRICES.cost_nanos("gpt-4o", PROMPT, 4))


def test_a_gzip_json_completion_is_charged(tapped: Envoy, clients: Clients) -> None:
    key, data = clients.create_key(max_budget=10)
    payload = json.dumps({"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5}).encode()
    headers = {
        "authorization": f"Bearer {key}",
        "content-type": "application/json",
        "accept-encoding": "gzip",
    }
    # the mock answers JSON uncompressed; Envoy passes it as is: charged either way
    assert fetch(tapped.port, "POST", CHAT, headers, payload).status == 200
    assert eventually(lambda: charged(clients, data.id) == PRICES.cost_nanos("gpt-4o", PROMPT, 5))


def test_a_legacy_completions_stream_gets_its_usage_added_and_removed(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=10)
    reply = post(tapped, key, "/v1/completions", prompt="Hi", max_tokens=3, stream=True)
    upstream = seen_by(silent, data.id)
    assert reply.body == without_usage_chunk(upstream.sent)
    assert eventually(lambda: charged(clients, data.id) == PRICES.cost_nanos("gpt-4o", PROMPT, 3))


def test_a_responses_api_stream_is_charged_from_response_completed(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=10)
    reply = post(tapped, key, "/v1/responses", input="Hi", max_output_tokens=8, stream=True)
    upstream = seen_by(silent, data.id)
    assert "stream_options" not in json.loads(upstream.body)  # not an option of this API
    assert reply.body == upstream.sent
    assert eventually(lambda: charged(clients, data.id) == PRICES.cost_nanos("gpt-4o", PROMPT, 8))


def test_a_responses_api_answer_is_charged(tapped: Envoy, clients: Clients) -> None:
    key, data = clients.create_key(max_budget=10)
    assert post(tapped, key, "/v1/responses", input="Hi", max_output_tokens=5).status == 200
    assert eventually(lambda: charged(clients, data.id) == PRICES.cost_nanos("gpt-4o", PROMPT, 5))


def test_an_embeddings_answer_is_charged_for_its_input(tapped: Envoy, clients: Clients) -> None:
    key, data = clients.create_key(max_budget=10)
    model = "text-embedding-3-small"
    reply = post(tapped, key, "/v1/embeddings", model=model, input="Hi")
    assert reply.status == 200
    assert eventually(lambda: charged(clients, data.id) == PRICES.cost_nanos(model, PROMPT, 0))
    assert settled(clients, data.id)


def test_a_tap_and_a_reporting_load_balancer_charge_once(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=10)
    silent.reports = True
    try:
        assert post(tapped, key, max_tokens=5).status == 200
        assert post(tapped, key, max_tokens=5, stream=True).status == 200
    finally:
        silent.reports = False
    cost = PRICES.cost_nanos("gpt-4o", PROMPT, 5)
    assert eventually(lambda: charged(clients, data.id) == 2 * cost)
    time.sleep(0.3)  # a second charge would have landed by now
    assert charged(clients, data.id) == 2 * cost


# --- responses that carry none ---------------------------------------------------------


def estimate(request: bytes, events: int, chars: int) -> int:
    """docs/design.md's estimate: prompt at 4 request bytes a token; completion the
    larger of the content events and 4 characters a token."""
    prompt = math.ceil(len(request) / 4)
    return PRICES.cost_nanos("gpt-4o", prompt, max(events, math.ceil(chars / 4)))


def test_a_stream_the_upstream_cut_is_charged_the_estimate(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=10)
    with contextlib.suppress(http.client.IncompleteRead):  # Envoy passes the cut on
        cut = {"x-mock-cut-after-events": "3", "x-mock-event-interval-seconds": "0.05"}
        post(tapped, key, headers=cut, max_tokens=50, stream=True)
    sent = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50, "stream": True}
    chars = len("Hello from the")  # the three events' content
    expected = estimate(json.dumps(sent).encode(), 3, chars)
    assert eventually(lambda: charged(clients, data.id) == expected)
    assert settled(clients, data.id)


@pytest.mark.parametrize(
    "options",
    [{}, {"stream_options": {"include_usage": True}}],
    ids=["the tap adds usage", "the client asked for usage (observed only)"],
)
def test_a_client_that_leaves_mid_stream_is_charged_the_estimate(
    tapped: Envoy, clients: Clients, options: dict[str, object]
) -> None:
    key, data = clients.create_key(max_budget=10)
    body = json.dumps({"model": "gpt-4o", "messages": MESSAGES, "stream": True, **options})
    request = (
        f"POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
        "content-type: application/json\r\nx-mock-event-interval-seconds: 0.3\r\n"
        f"content-length: {len(body)}\r\n\r\n{body}"
    ).encode()
    with socket.create_connection(("127.0.0.1", tapped.port)) as conn:
        conn.sendall(request)
        received = b""
        while b"Hello" not in received:
            received += conn.recv(4096)
    # gone after the first event: charged for what passed, not the whole answer
    assert eventually(lambda: charged(clients, data.id) > 0)
    # the tap may have passed an event or two more than the client read
    assert charged(clients, data.id) in {
        estimate(body.encode(), n, len(text)) for n, text in ((1, "Hello"), (2, "Hello from"))
    }
    assert eventually(lambda: settled(clients, data.id))


def test_a_json_answer_without_usage_is_charged_the_estimate(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=10)
    reply = post(tapped, key, headers={"x-mock-usage": "omit"}, max_tokens=5)
    assert reply.status == 200 and "usage" not in reply.json()
    expected = estimate(seen_by(silent, data.id).body, 1, len("Hello from the mock."))
    # (a request the tap did not change: the upstream saw the client's bytes)
    assert eventually(lambda: charged(clients, data.id) == expected)
    assert expected > 0


def test_an_answer_with_content_whose_usage_says_zero_is_charged_the_estimate(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=10)
    reply = post(tapped, key, headers={"x-mock-usage": "zero"}, max_tokens=5)
    assert reply.json()["usage"]["total_tokens"] == 0
    expected = estimate(seen_by(silent, data.id).body, 1, len("Hello from the mock."))
    assert eventually(lambda: charged(clients, data.id) == expected)


def test_an_upstream_failure_gives_the_reservation_back(
    tapped: Envoy, server: Server, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=10, max_parallel_requests=1)
    before = unmetered(server, "upstream_error")
    assert post(tapped, key, headers={"x-mock-status": "500"}).status == 500
    assert eventually(lambda: settled(clients, data.id))
    assert charged(clients, data.id) == 0
    assert unmetered(server, "upstream_error") == before + 1
    assert post(tapped, key, max_tokens=3).status == 200  # the slot is free


def test_a_refused_request_gives_the_reservation_back(tapped: Envoy, clients: Clients) -> None:
    key, data = clients.create_key(max_budget=10, max_parallel_requests=1)
    assert post(tapped, key, max_tokens=-1).status == 400  # the mock refuses it
    assert eventually(lambda: settled(clients, data.id))
    assert charged(clients, data.id) == 0


# --- clamping ----------------------------------------------------------------------------


def test_a_budget_that_covers_part_of_a_request_gets_a_shorter_answer(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    """$0.0005 covers ~40 gpt-4o output tokens after the prompt bound, not 4096."""
    key, data = clients.create_key(max_budget=0.0005)
    reply = post(tapped, key, max_tokens=4096)
    assert reply.status == 200
    clamped = int(reply.headers["x-virtual-key-max-tokens-clamped"])
    assert 16 <= clamped < 4096
    upstream = seen_by(silent, data.id)
    assert json.loads(upstream.body)["max_tokens"] == clamped
    assert upstream.headers["x-virtual-key-max-tokens"] == str(clamped)
    assert eventually(lambda: settled(clients, data.id))
    assert charged(clients, data.id) <= 500_000  # within the budget


def test_a_clamped_request_that_names_no_max_tokens_gets_one(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=0.0005)
    reply = post(tapped, key)
    assert reply.status == 200
    sent = json.loads(seen_by(silent, data.id).body)
    assert sent["max_tokens"] == int(reply.headers["x-virtual-key-max-tokens-clamped"])


def test_a_clamped_stream_keeps_its_usage_handling(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=0.0005)
    reply = post(tapped, key, max_completion_tokens=9000, stream=True)
    upstream = seen_by(silent, data.id)
    sent = json.loads(upstream.body)
    assert sent["max_completion_tokens"] == int(reply.headers["x-virtual-key-max-tokens-clamped"])
    assert sent["stream_options"] == {"include_usage": True}
    assert reply.body == without_usage_chunk(upstream.sent)


def test_a_budget_below_the_fewest_clamped_tokens_still_gets_402(
    tapped: Envoy, clients: Clients
) -> None:
    key, _ = clients.create_key(max_budget=0.00002)  # under 16 gpt-4o output tokens
    reply = post(tapped, key, max_tokens=100)
    assert reply.status == 402
    assert "x-virtual-key-max-tokens-clamped" not in reply.headers


def test_a_request_the_budget_covers_is_not_clamped(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=10)
    reply = post(tapped, key, max_tokens=100)
    assert "x-virtual-key-max-tokens-clamped" not in reply.headers
    assert "x-virtual-key-max-tokens" not in seen_by(silent, data.id).headers


def test_40_clamped_requests_at_once_never_spend_past_the_budget(
    tapped: Envoy, clients: Clients
) -> None:
    """Each clamp is a fresh atomic Check for what is free at that moment: however the
    40 interleave, what they are charged stays within the $0.05."""
    key, data = clients.create_key(max_budget=0.05, rpm_limit=0, tpm_limit=0)
    with ThreadPoolExecutor(max_workers=40) as pool:
        replies = list(pool.map(lambda _: post(tapped, key, max_tokens=4096), range(40)))
    assert {r.status for r in replies} <= {200, 402}
    clamped = [r for r in replies if "x-virtual-key-max-tokens-clamped" in r.headers]
    assert clamped, "some were clamped rather than refused"
    assert all(int(r.headers["x-virtual-key-max-tokens-clamped"]) >= 16 for r in clamped)
    assert eventually(lambda: settled(clients, data.id))
    ok = [r for r in replies if r.status == 200]
    spent = sum(
        PRICES.cost_nanos(
            "gpt-4o", r.json()["usage"]["prompt_tokens"], r.json()["usage"]["completion_tokens"]
        )
        for r in ok
    )
    assert charged(clients, data.id) == spent <= 50_000_000


def test_a_client_asking_for_brotli_gets_an_answer_the_tap_can_read(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    """Else a client could make its answers unreadable, and be charged by their size."""
    key, data = clients.create_key(max_budget=10)
    post(tapped, key, headers={"accept-encoding": "br, gzip"}, max_tokens=3)
    assert seen_by(silent, data.id).headers["accept-encoding"] == "gzip"
    assert eventually(lambda: charged(clients, data.id) == PRICES.cost_nanos("gpt-4o", PROMPT, 3))


def test_a_request_without_a_body_is_not_metered(
    tapped: Envoy, server: Server, clients: Clients
) -> None:
    """GET /v1/models generates nothing, and Check opened no reservation for it."""
    key, data = clients.create_key(max_budget=10)
    series = 'extauthz_tap_responses_total{basis="released"}'
    before = counter(server, series)
    reply = fetch(tapped.port, "GET", "/v1/models", {"authorization": f"Bearer {key}"})
    assert reply.status == 200
    time.sleep(0.2)
    assert counter(server, series) == before
    assert charged(clients, data.id) == 0


def test_a_request_check_refused_is_not_counted_by_the_tap(
    tapped: Envoy, server: Server, clients: Clients
) -> None:
    """ext_authz's 401 passes through the tap's response path; it is no response of an
    allowed request, so nothing is released for it nor counted unmetered."""
    released = 'extauthz_tap_responses_total{basis="released"}'
    before = counter(server, released), unmetered(server, "no_usage")
    assert post(tapped, "sk-mp-0000000000000000-" + "x" * 43).status == 401
    time.sleep(0.2)
    assert (counter(server, released), unmetered(server, "no_usage")) == before


# --- bodies that must not slip past the tap ---------------------------------------------

# JSON allows a lone surrogate ("\ud800"); Check reads it. The tap once raised writing it
# back as UTF-8, and Envoy (failure_mode_allow) then forwarded the body as sent: unclamped,
# its usage chunk never asked for, the answer charged as if cut before it began.
LONE_SURROGATE = b'{"model":"gpt-4o","messages":[{"role":"user","content":"Hi \\ud800"}],'


def test_a_lone_surrogate_does_not_unclamp_a_request(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=0.0005)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    reply = fetch(tapped.port, "POST", CHAT, headers, LONE_SURROGATE + b'"max_tokens":4096}')
    assert reply.status == 200
    clamped = int(reply.headers["x-virtual-key-max-tokens-clamped"])
    assert json.loads(seen_by(silent, data.id).body)["max_tokens"] == clamped < 4096
    usage = reply.json()["usage"]
    cost = PRICES.cost_nanos("gpt-4o", usage["prompt_tokens"], usage["completion_tokens"])
    assert eventually(lambda: charged(clients, data.id) == cost)
    assert cost <= 500_000  # within the budget


def test_a_lone_surrogate_stream_is_charged_its_usage(
    tapped: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    key, data = clients.create_key(max_budget=10)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    body = LONE_SURROGATE + b'"max_tokens":2000,"stream":true}'
    reply = fetch(tapped.port, "POST", CHAT, headers, body)
    upstream = seen_by(silent, data.id)
    assert json.loads(upstream.body)["stream_options"] == {"include_usage": True}
    assert reply.body == without_usage_chunk(upstream.sent)
    usage = json.loads(_usage_chunk(upstream.sent))["usage"]
    cost = PRICES.cost_nanos("gpt-4o", usage["prompt_tokens"], 2000)
    assert eventually(lambda: charged(clients, data.id) == cost)


def _usage_chunk(stream: bytes) -> bytes:
    event = next(e for e in stream.split(b"\n\n") if b'"usage": {' in e)
    return event.removeprefix(b"data: ")


def test_a_cut_request_sent_without_a_content_length_is_charged_its_prompt(
    tapped: Envoy, clients: Clients
) -> None:
    """A chunked (or HTTP/2) body declares no length: the estimate's prompt is the body
    Check read, not 0 (which charged a 48 KB prompt as nothing)."""
    key, data = clients.create_key(max_budget=10, tpm_limit=0)
    messages = [{"role": "user", "content": "hello " * 8000}]
    body = json.dumps({"model": "gpt-4o", "messages": messages, "stream": True}).encode()
    request = (
        f"POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
        "content-type: application/json\r\ntransfer-encoding: chunked\r\n"
        "x-mock-cut-after-events: 2\r\nconnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", tapped.port), timeout=10) as conn:
        conn.sendall(request + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
        while conn.recv(65536):
            pass
    assert eventually(lambda: settled(clients, data.id))
    assert charged(clients, data.id) >= PRICES.cost_nanos("gpt-4o", math.ceil(len(body) / 4), 1)


@pytest.fixture(scope="module")
def clamp_unreachable(
    server: Server, silent: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Envoy]:
    """The shipped envoy.yaml, but its clamp filter calls a tap that is not there."""
    work: Path = tmp_path_factory.mktemp("clamp-down")
    ports = {
        "listener": p.free_port(),
        "extauthz": server.grpc_port,
        "extauthz_http": server.http_port,
        "upstream": silent.port,
        "admin": p.free_port(),
    }
    config = yaml.safe_load(p.render_envoy_config(ports))
    resources = config["static_resources"]
    dead = {**resources["clusters"][0], "name": "nowhere"}
    dead["load_assignment"] = {
        "cluster_name": "nowhere",
        "endpoints": [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {
                                "socket_address": {
                                    "address": "127.0.0.1",
                                    "port_value": p.free_port(),
                                }
                            }
                        }
                    }
                ]
            }
        ],
    }
    resources["clusters"].append(dead)
    manager = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    clamp = next(f for f in manager["http_filters"] if f["name"].endswith(".clamp"))
    clamp["typed_config"]["extension_config"]["typed_config"]["grpc_service"]["envoy_grpc"] = {
        "cluster_name": "nowhere"
    }
    path = work / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    envoy = Envoy(
        ports["listener"],
        p.start_envoy(path, ports["listener"], work / "envoy.log"),
        ports["admin"],
    )
    yield envoy
    envoy.process.stop()


def test_a_clamped_request_is_refused_when_its_body_cannot_be_clamped(
    clamp_unreachable: Envoy, silent: MockUpstream, clients: Clients
) -> None:
    """The clamp filter fails closed: never the full request on a reservation for part."""
    key, data = clients.create_key(max_budget=0.0005)
    assert post(clamp_unreachable, key, max_tokens=4096).status == 503
    assert not [s for s in silent.seen if s.headers.get("x-virtual-key-id") == data.id]
    # (its clamped reservation is held until the TTL: nothing told extauthz it failed)
    other, _ = clients.create_key(max_budget=10)
    assert post(clamp_unreachable, other, max_tokens=20).status == 200  # no clamp: no filter
