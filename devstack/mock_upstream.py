"""A small OpenAI-compatible upstream that plays the load balancer of the integration
guide's step 4: it answers with a `usage` object and reports it with ReportUsage, keyed by
`x-virtual-key-id` and `x-virtual-key-request-id`, the id Check gave the request (never a
client-chosen one such as `x-request-id`). Real load balancers must do the same.

Completion tokens are the request's `max_tokens` (default 10); prompt tokens are about
one per four characters of message content. A POST with `x-mock-delay-seconds: N` is
answered (and reported) N seconds later, so requests can be held in flight. A request with
`"stream": true` gets an SSE stream (chunked, a word per event), with the usage chunk when
it asked for `stream_options.include_usage`, gzip-encoded when it accepts gzip. Every request
it saw is kept in `seen`, and, with `log_path` (`make run`: .run/upstream.log), written
there as one JSON line: what the upstream received of the identity headers, and whether
any key header reached it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc

from keys.v1 import keys_pb2, keys_pb2_grpc

log = logging.getLogger("devstack.upstream")
LOGGED_HEADERS = (
    "x-virtual-key-id",
    "x-virtual-key-user-id",
    "x-virtual-key-team-id",
    "x-virtual-key-request-id",
    "x-virtual-key-unverified",
    "x-virtual-key-would-deny",
)
# A request may ask the mock to take this long to answer (0..60 s), to show requests in
# flight (max_parallel_requests) with curl.
DELAY_HEADER = "x-mock-delay-seconds"
MAX_DELAY_S = 60.0


REPLY = "Hello from the mock."


def stream_events(model: str, prompt: int, completion: int, with_usage: bool) -> list[bytes]:
    """The SSE events of a streamed chat completion, each `data: <json>` and a blank line."""
    chat_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
    base = {"id": chat_id, "object": "chat.completion.chunk", "created": int(time.time())}
    words = REPLY.split(" ")
    chunks: list[dict[str, Any]] = [
        {
            **base,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": word if i == 0 else " " + word},
                    "finish_reason": None,
                }
            ],
        }
        for i, word in enumerate(words)
    ]
    chunks.append(
        {**base, "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    )
    if with_usage:
        chunks.append(
            {
                **base,
                "model": model,
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            }
        )
    return [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def _delay(value: str | None) -> float:
    try:
        seconds = float(value or 0)
    except ValueError:
        return 0.0
    return min(max(seconds, 0.0), MAX_DELAY_S) if seconds == seconds else 0.0


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class MockUpstream:
    port: int
    extauthz_addr: str
    usage_token: str
    seen: list[Seen] = field(default_factory=list)
    report_errors: list[str] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)  # request ids, in report order
    log_path: Path | None = None
    # False: play an upstream that reports nothing (only its responses carry usage)
    reports: bool = True
    _server: ThreadingHTTPServer | None = None
    _channel: grpc.Channel | None = None

    def log_request(self, method: str, path: str, headers: dict[str, str]) -> None:
        if self.log_path is None:
            return
        line = {
            "method": method,
            "path": path,
            # our header names only: a value a client made up never reaches the log
            **{k: headers[k] for k in LOGGED_HEADERS if k in headers},
            "key_header_reached_upstream": any(
                h in headers for h in ("authorization", "x-api-key", "api-key")
            ),
        }
        with self.log_path.open("a") as out:
            out.write(json.dumps(line) + "\n")

    def start(self) -> MockUpstream:
        self._channel = grpc.insecure_channel(self.extauthz_addr)
        usage = keys_pb2_grpc.UsageServiceStub(self._channel)
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _record(self) -> tuple[dict[str, str], bytes]:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                upstream.seen.append(Seen(self.command, self.path, headers, body))
                upstream.log_request(self.command, self.path, headers)
                return headers, body

            def _refuse(self, headers: dict[str, str], message: str) -> None:
                """A 400, reported as zero usage: that closes the request's reservation
                (a load balancer that reports only successes leaves it held, with its
                share of the budget and its concurrency slot, until the TTL)."""
                key_id = headers.get("x-virtual-key-id")
                request_id = headers.get("x-virtual-key-request-id")
                if key_id and request_id and upstream.reports:
                    upstream.report(usage, key_id, request_id, "", 0, 0, cost=0.0)
                self._send(400, {"error": {"message": message}})

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(
                self, model: str, prompt: int, completion: int, with_usage: bool, gzipped: bool
            ) -> None:
                """An OpenAI-style SSE stream, chunked: the reply a word at a time, then the
                usage chunk when the request asked for it, then [DONE]."""
                events = stream_events(model, prompt, completion, with_usage)
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header("transfer-encoding", "chunked")
                if gzipped:
                    self.send_header("content-encoding", "gzip")
                self.end_headers()
                packer = zlib.compressobj(wbits=16 + zlib.MAX_WBITS) if gzipped else None
                for event in events:
                    data = (
                        packer.compress(event) + packer.flush(zlib.Z_SYNC_FLUSH)
                        if packer
                        else event
                    )
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                if packer:
                    tail = packer.flush()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(tail), tail))
                self.wfile.write(b"0\r\n\r\n")

            def do_GET(self) -> None:
                self._record()
                if self.path.startswith("/v1/models"):
                    self._send(
                        200, {"object": "list", "data": [{"id": "gpt-4", "object": "model"}]}
                    )
                else:
                    self._send(200, {"status": "ok", "path": self.path})

            def do_POST(self) -> None:
                headers, body = self._record()
                time.sleep(_delay(headers.get(DELAY_HEADER)))
                try:
                    request = json.loads(body or b"{}")
                    assert isinstance(request, dict)
                except (ValueError, AssertionError):
                    self._refuse(headers, "body is not a JSON object")
                    return
                model = str(request.get("model", "gpt-4"))
                messages = request.get("messages") or []
                chars = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
                prompt = chars // 4 + 1
                asked = request.get("max_tokens") or 10
                if not isinstance(asked, int) or not 0 < asked <= 1_000_000:
                    self._refuse(headers, "max_tokens: 1..1000000")
                    return
                completion = asked
                key_id = headers.get("x-virtual-key-id")
                request_id = headers.get("x-virtual-key-request-id")
                if not upstream.reports:
                    pass
                elif key_id and request_id:
                    upstream.report(usage, key_id, request_id, model, prompt, completion)
                elif key_id:
                    upstream.report_errors.append("no x-virtual-key-request-id: not reported")
                if request.get("stream") is True:
                    options = request.get("stream_options")
                    with_usage = isinstance(options, dict) and options.get("include_usage") is True
                    gzipped = "gzip" in headers.get("accept-encoding", "")
                    self._stream(model, prompt, completion, with_usage, gzipped)
                    return
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": model,
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": REPLY},
                            }
                        ],
                        "usage": {
                            "prompt_tokens": prompt,
                            "completion_tokens": completion,
                            "total_tokens": prompt + completion,
                        },
                    },
                )

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, name="mock-upstream", daemon=True
        ).start()
        return self

    def report(
        self,
        usage: keys_pb2_grpc.UsageServiceStub,
        key_id: str,
        request_id: str,
        model: str,
        prompt: int,
        completion: int,
        cost: float | None = None,
    ) -> None:
        self.reported.append(request_id)
        try:
            usage.ReportUsage(
                keys_pb2.ReportUsageRequest(
                    key_id=key_id,
                    request_id=request_id,
                    model=model,
                    provider="mock",
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    cost=cost,
                ),
                metadata=(("authorization", f"Bearer {self.usage_token}"),),
                timeout=5,
            )
        except grpc.RpcError as exc:
            self.report_errors.append(f"{exc.code().name}: {exc.details()}")
            log.warning("usage report failed: %s", exc.code().name)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._channel is not None:
            self._channel.close()
