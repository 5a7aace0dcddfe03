"""An upstream that reports nothing and can hold requests: the load tests decide when a
request finishes and when (or whether) its usage is reported."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


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
