"""What the budget alert tests share: a local webhook receiver (http.server in a thread,
keeping every request it got and answering the first `fail_first` with 500), and the
events a level has in the alert streams."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from keys import alert_stream
from keys.alert_stream import AlertEvent
from keys.store import KeyStore

THRESHOLDS = (5000, 8000, 10000)  # 0.5, 0.8, 1.0: the default


@dataclass(frozen=True)
class Delivery:
    headers: dict[str, str]  # lower-cased names
    body: bytes
    status: int  # what the receiver answered

    @property
    def payload(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.body)
        return decoded

    def signed_by(self, secret: str) -> bool:
        """What a receiver checks: the header is the HMAC-SHA256 of the raw body."""
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("x-extauthz-signature", ""), expected)


@dataclass
class WebhookReceiver:
    port: int
    fail_first: int = 0
    deliveries: list[Delivery] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/budget"

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver._lock:
                    status = 500 if len(receiver.deliveries) < receiver.fail_first else 204
                    receiver.deliveries.append(
                        Delivery({k.lower(): v for k, v in self.headers.items()}, body, status)
                    )
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def received(self) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries)

    def acknowledged(self) -> dict[str, Delivery]:
        """The events the receiver accepted, deduplicated by event_id (as a receiver must)."""
        return {d.payload["event_id"]: d for d in self.received() if 200 <= d.status < 300}


async def events_of(store: KeyStore, scope: str, scope_id: str) -> list[AlertEvent]:
    """The level's events in the alert streams (on every primary), oldest first."""
    found: list[AlertEvent] = []
    async for name in store.redis.client.scan_iter(match=alert_stream.STREAM_MATCH):
        entries: Any = await store.redis.client.xrange(name)
        found += [AlertEvent.from_fields(fields) for _, fields in entries]
    return sorted(
        (e for e in found if (e.scope, e.id) == (scope, scope_id)),
        key=lambda e: (e.ts_ms, e.threshold_bp),
    )
