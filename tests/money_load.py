"""An upstream that reports nothing and can hold requests, and a burst of requests sent at
once: the load tests decide when a request finishes and when (or whether) its usage is
reported."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from extauthz.request import requested_model
from keys.pricing import PriceTable
from keys.reservation import estimate
from keys.v1 import keys_pb2
from tests.helpers import Clients, HttpReply, bearer, chat_body, eventually, fetch

CHAT = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class Arrival:
    key_id: str
    request_id: str
    body: bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # 200 requests arrive at once


@dataclass
class HoldingUpstream:
    port: int
    arrivals: list[Arrival] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    def hold(self) -> None:
        """Requests arriving from now on wait until `release` is set."""
        self.release.clear()

    def start(self) -> HoldingUpstream:
        upstream = self
        self.release.set()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                arrival = Arrival(
                    self.headers.get("x-virtual-key-id", ""),
                    self.headers.get("x-virtual-key-request-id", ""),
                    body,
                )
                with upstream._lock:
                    upstream.arrivals.append(arrival)
                upstream.release.wait(timeout=30)
                payload = json.dumps({"object": "chat.completion", "choices": []}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._server = _Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class Burst:
    """`count` requests sent at once, round-robin over `keys`; `answered` counts the replies
    in as they arrive (allowed ones may be held at the upstream meanwhile)."""

    def __init__(self, ports: list[int], keys: list[str], body: bytes, count: int) -> None:
        """Request i goes to ports[i % len(ports)] with keys[i % len(keys)]."""
        self.replies: list[HttpReply] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=count)
        headers = [
            {"authorization": f"Bearer {keys[i % len(keys)]}", "content-type": "application/json"}
            for i in range(count)
        ]
        self._futures = [
            self._pool.submit(self._one, ports[i % len(ports)], h, body)
            for i, h in enumerate(headers)
        ]

    def _one(self, port: int, headers: dict[str, str], body: bytes) -> None:
        reply = fetch(port, "POST", CHAT, headers, body)
        with self._lock:
            self.replies.append(reply)

    @property
    def answered(self) -> int:
        with self._lock:
            return len(self.replies)

    def wait(self) -> list[HttpReply]:
        for future in self._futures:
            future.result(timeout=30)
        self._pool.shutdown()
        return self.replies


def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def budget_burst(
    holding: HoldingUpstream,
    ports: list[int],
    keys: list[str],
    body: bytes,
    count: int,
) -> tuple[list[HttpReply], list[Arrival]]:
    """Sends `count` requests at once; the allowed ones wait at the upstream, unreported,
    until every other has its answer, so no report frees budget while the Checks run.
    Returns the replies and what reached the upstream."""
    holding.hold()
    before = len(holding.arrivals)
    burst = Burst(ports, keys, body, count)
    until(lambda: burst.answered + len(holding.arrivals) - before == count)
    held = holding.arrivals[before:]
    holding.release.set()
    return burst.wait(), held


PRICES = PriceTable.builtin()
MODEL = "gpt-4o"
MAX_TOKENS = 1000


def reservation_nanos(body: bytes) -> int:
    """What a Check reserves for `body` (the server runs the same estimate)."""
    model = requested_model(body, {"content-type": "application/json"})
    return estimate(PRICES, model, 4096).amount_nanos


def team_budget_under_load(
    holding: HoldingUpstream, ports: list[int], clients: Clients, team: str
) -> None:
    """200 requests at once over 5 keys of one team with a $1 team budget, through every
    Envoy in `ports` (one per server replica): the team admits exactly what its
    reservations allow, and after each allowed request reports its usage (after a random
    delay, through any replica) the team has spent exactly the sum, never above $1."""
    clients.budgets.SetBudget(
        keys_pb2.SetBudgetRequest(scope="team", id=team, max_budget=1.0),
        metadata=bearer(clients.admin_token),
    )
    keys = [
        clients.create_key(team_id=team, max_budget=0, rpm_limit=0, tpm_limit=0) for _ in range(5)
    ]
    body = chat_body(MODEL, max_tokens=MAX_TOKENS)
    expected = 1_000_000_000 // reservation_nanos(body)
    replies, held = budget_burst(holding, ports, [k for k, _ in keys], body, 200)
    allowed = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status == 402]
    abandoned = [r for r in replies if r.status == 503]  # Envoy gave up on a Check
    assert len(allowed) + len(refused) + len(abandoned) == 200
    assert len(allowed) == len(held)
    assert expected - len(abandoned) <= len(allowed) <= expected
    assert all('team "' in r.json()["error"]["message"] for r in refused)

    rng = random.Random(11)
    tokens = {a.request_id: (a.key_id, rng.randint(1, MAX_TOKENS)) for a in held}

    def report(request_id: str) -> None:
        time.sleep(rng.random() * 0.05)
        key_id, completion = tokens[request_id]
        clients.report(
            key_id, request_id, model=MODEL, prompt_tokens=20, completion_tokens=completion
        )

    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(report, tokens))
    charged = sum(PRICES.cost_nanos(MODEL, 20, c) for _, c in tokens.values())

    def team_now() -> keys_pb2.Budget:
        return clients.budgets.GetBudget(
            keys_pb2.GetBudgetRequest(scope="team", id=team),
            metadata=bearer(clients.admin_token),
        )

    # every reported reservation is closed; one an abandoned Check made (Envoy gave up
    # after the server answered) holds until its TTL, and only those
    assert eventually(lambda: team_now().in_flight <= len(abandoned), timeout=5)
    got = team_now()
    assert round(got.reserved * 1e9) == got.in_flight * reservation_nanos(body)
    assert round(got.spent * 1e9) == charged <= 1_000_000_000
