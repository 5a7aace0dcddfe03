"""A small OpenAI-compatible upstream: it answers with a `usage` object, which the usage
tap charges. With `reports=True` (the tests' default; `make run` turns it off) it also
plays the load balancer of the integration guide's step 4 and reports that usage with
ReportUsage, keyed by `x-virtual-key-id` and `x-virtual-key-request-id`, the id Check gave
the request (never a client-chosen one such as `x-request-id`); the key is still charged
once.

Completion tokens are the request's output cap (`max_tokens`, `max_completion_tokens` or
`max_output_tokens`, the smallest named; default 10); prompt tokens are about one per four
characters of message content. It answers chat completions, completions, embeddings and
the Responses API (`/v1/responses`) in OpenAI's shapes. A request with `"stream": true`
gets an SSE stream (chunked, a word per event), with the usage chunk when it asked for
`stream_options.include_usage` (the Responses API: always, in `response.completed`),
gzip-encoded when it accepts gzip. Test knobs, as request headers: `x-mock-delay-seconds:
N` answers (and reports) N seconds later, so requests can be held in flight;
`x-mock-usage: omit` leaves usage out (`zero`: reports 0 tokens);
`x-mock-cut-after-events: N` drops the connection after N events; `x-mock-split-at: N`
writes the stream in two parts, split at byte N; `x-mock-status: 500` fails;
`x-mock-event-interval-seconds: S` (at most 1) paces a stream. Every request it saw is
kept in `seen` (with the body it sent back), and, with `log_path` (`make run`:
.run/upstream.log), written there as one JSON line: what the upstream received of the
identity headers, and whether any key header reached it.
"""

from __future__ import annotations

import json
import logging
import socket
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
    "x-virtual-key-max-tokens",
)
# A request may ask the mock to take this long to answer (0..60 s), to show requests in
# flight (max_parallel_requests) with curl.
DELAY_HEADER = "x-mock-delay-seconds"
MAX_DELAY_S = 60.0
USAGE_HEADER = "x-mock-usage"  # omit: no usage in the answer; zero: usage of 0 tokens
CUT_HEADER = "x-mock-cut-after-events"  # a stream dropped after N events
SPLIT_HEADER = "x-mock-split-at"  # a stream written in two parts, split at byte N
STATUS_HEADER = "x-mock-status"  # 500: an upstream failure
INTERVAL_HEADER = "x-mock-event-interval-seconds"  # a pause before each streamed event


REPLY = "Hello from the mock."


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _sse(document: dict[str, Any], event: str = "") -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(document).encode() + b"\n\n"


def stream_events(
    model: str, prompt: int, completion: int, with_usage: bool, path: str = "/v1/chat/completions"
) -> list[bytes]:
    """The SSE events of a streamed answer, each `data: <json>` and a blank line: chat
    completion chunks, text completion chunks (`/v1/completions`), or the Responses API's
    typed events (`/v1/responses`, whose `response.completed` always carries usage)."""
    words = REPLY.split(" ")
    pieces = [word if i == 0 else " " + word for i, word in enumerate(words)]
    created = int(time.time())
    if path.endswith("/responses"):
        response_id = f"resp_{uuid.uuid4().hex[:12]}"
        events = [
            _sse(
                {"type": "response.output_text.delta", "item_id": response_id, "delta": piece},
                "response.output_text.delta",
            )
            for piece in pieces
        ]
        usage = {
            "input_tokens": prompt,
            "output_tokens": completion,
            "total_tokens": prompt + completion,
        }
        done: dict[str, Any] = {
            "id": response_id,
            "object": "response",
            "model": model,
            "status": "completed",
        }
        if with_usage:
            done["usage"] = usage
        events.append(_sse({"type": "response.completed", "response": done}, "response.completed"))
        return events
    base: dict[str, Any] = {
        "id": f"cmpl-{uuid.uuid4().hex[:12]}",
        "created": created,
        "model": model,
    }
    choices: list[list[dict[str, Any]]]
    last: list[dict[str, Any]]
    if path.endswith("/chat/completions"):
        base["object"] = "chat.completion.chunk"
        choices = [
            [{"index": 0, "delta": {"content": piece}, "finish_reason": None}] for piece in pieces
        ]
        last = [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    else:
        base["object"] = "text_completion"
        choices = [[{"index": 0, "text": piece, "finish_reason": None}] for piece in pieces]
        last = [{"index": 0, "text": "", "finish_reason": "stop"}]
    events = [_sse({**base, "choices": c}) for c in [*choices, last]]
    if with_usage:
        events.append(_sse({**base, "choices": [], "usage": _usage(prompt, completion)}))
    return [*events, b"data: [DONE]\n\n"]


def answer(path: str, model: str, prompt: int, completion: int, with_usage: bool) -> dict[str, Any]:
    """A non-streamed answer in the shape of `path`'s API."""
    answer_id = uuid.uuid4().hex[:12]
    created = int(time.time())
    if path.endswith("/embeddings"):
        document: dict[str, Any] = {
            "object": "list",
            "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 0.125]}],
        }
        if with_usage:
            document["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
        return document
    if path.endswith("/responses"):
        document = {
            "id": f"resp_{answer_id}",
            "object": "response",
            "model": model,
            "status": "completed",
            "output": [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": REPLY}],
                }
            ],
        }
        if with_usage:
            document["usage"] = {
                "input_tokens": prompt,
                "output_tokens": completion,
                "total_tokens": prompt + completion,
            }
        return document
    if path.endswith("/chat/completions"):
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": REPLY},
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "finish_reason": "stop", "text": REPLY}
        kind = "text_completion"
    document = {
        "id": f"cmpl-{answer_id}",
        "object": kind,
        "created": created,
        "model": model,
        "choices": [choice],
    }
    if with_usage:
        document["usage"] = _usage(prompt, completion)
    return document


OUTPUT_CAPS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _asked(request: dict[str, Any]) -> int | None:
    """The smallest output cap the request names (10 where none), None if one is bad."""
    caps = [request[name] for name in OUTPUT_CAPS if request.get(name) is not None]
    if not all(isinstance(c, int) and not isinstance(c, bool) and 0 < c <= 1_000_000 for c in caps):
        return None
    return min(caps, default=10)


def _count(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


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
    sent: bytes = b""  # the response body it wrote (a stream's bytes before any gzip)


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
            # headers and body go out in separate writes: with Nagle on, the body waits
            # for the peer's delayed ACK of the headers (~40 ms on Linux loopback)
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _record(self) -> tuple[dict[str, str], bytes]:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                self.record = Seen(self.command, self.path, headers, body)
                upstream.seen.append(self.record)
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
                if hasattr(self, "record"):
                    self.record.sent = data
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, events: list[bytes], headers: dict[str, str]) -> None:
                """An SSE stream, chunked; gzip-encoded when the client accepts gzip."""
                gzipped = "gzip" in headers.get("accept-encoding", "")
                raw = b"".join(events)
                self.record.sent = raw
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header("transfer-encoding", "chunked")
                if gzipped:
                    self.send_header("content-encoding", "gzip")
                self.end_headers()
                cut = _count(headers.get(CUT_HEADER))
                interval = min(_delay(headers.get(INTERVAL_HEADER)), 1.0)
                split = _count(headers.get(SPLIT_HEADER))
                if split is not None:
                    parts = [raw[:split], raw[split:]]  # one stream, cut at one byte
                else:
                    parts = events[:cut] if cut is not None else events
                packer = zlib.compressobj(wbits=16 + zlib.MAX_WBITS) if gzipped else None
                for part in parts:
                    data = (
                        packer.compress(part) + packer.flush(zlib.Z_SYNC_FLUSH) if packer else part
                    )
                    if data:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                        time.sleep(0.002 if split is not None else interval)
                if cut is not None:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # mid-stream: no last chunk
                    return
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
                chars += len(str(request.get("input", "") or request.get("prompt", "")))
                prompt = chars // 4 + 1
                asked = _asked(request)
                if asked is None:
                    self._refuse(headers, "max_tokens: 1..1000000")
                    return
                completion = 0 if self.path.endswith("/embeddings") else asked
                if headers.get(USAGE_HEADER) == "zero":
                    prompt = completion = 0  # a usage that says nothing was used
                if headers.get(STATUS_HEADER) == "500":
                    self._send(500, {"error": {"message": "the mock failed, as asked"}})
                    return
                key_id = headers.get("x-virtual-key-id")
                request_id = headers.get("x-virtual-key-request-id")
                if not upstream.reports:
                    pass
                elif key_id and request_id:
                    upstream.report(usage, key_id, request_id, model, prompt, completion)
                elif key_id:
                    upstream.report_errors.append("no x-virtual-key-request-id: not reported")
                with_usage = headers.get(USAGE_HEADER) != "omit"
                if request.get("stream") is True:
                    options = request.get("stream_options")
                    asked_usage = isinstance(options, dict) and options.get("include_usage") is True
                    if not self.path.endswith("/responses"):
                        with_usage = with_usage and asked_usage
                    events = stream_events(model, prompt, completion, with_usage, self.path)
                    self._stream(events, headers)
                    return
                self._send(200, answer(self.path, model, prompt, completion, with_usage))

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
