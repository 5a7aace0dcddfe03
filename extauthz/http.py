"""The HTTP port: /healthz, /readyz, /metrics, /auth for nginx's auth_request, and the web
console's files under /ui/ (extauthz/ui.py).

A deliberately small HTTP/1.1 server on asyncio streams (keep-alive, no request bodies
beyond discarding them), so the server needs no second web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from extauthz import responses
from extauthz.decision import Decider
from extauthz.metrics import Metrics
from extauthz.request import AmbiguousUri, model_from_headers, original_uri
from extauthz.ui import PREFIX as CONSOLE_PREFIX
from extauthz.ui import Console

log = logging.getLogger("extauthz.http")
MAX_HEAD_BYTES = 32_768
MAX_DISCARDED_BODY = 1 << 20
IDLE_TIMEOUT_S = 60
# nginx opens a connection per auth subrequest: a burst of 200 new client connections is
# 200 connects at once. asyncio's default listen backlog (100) drops SYNs beyond it, and the
# client's retry comes after 1 s, past nginx's 500 ms connect timeout (a 503). gRPC's port
# listens with 4096; so does this one (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 4096
_REASONS: Final = {
    200: "OK",
    304: "Not Modified",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    429: "Too Many Requests",
    503: "Service Unavailable",
}
Headers = list[tuple[str, str]]
Answer = tuple[int, Headers, bytes]


class BadRequest(Exception):
    pass


class HttpEndpoint:
    def __init__(
        self,
        metrics: Metrics,
        ready: Callable[[], bool],
        decider: Decider,
        *,
        uri_header: str = "x-original-uri",
        console: Console | None = None,
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        self.decider = decider
        self.uri_header = uri_header
        self.console = console if console is not None else Console.load(ready)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await asyncio.wait_for(
                        reader.readuntil(b"\r\n\r\n"), timeout=IDLE_TIMEOUT_S
                    )
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                method = ""
                try:
                    method, path, version, headers = _parse_head(head)
                    await _discard_body(reader, headers)
                    status, extra, body = await self.route(method, path, headers)
                    keep_alive = _keep_alive(version, headers)
                except BadRequest as exc:
                    status, extra, body = 400, [("content-type", "text/plain")], f"{exc}\n".encode()
                    keep_alive = False
                bodiless = method == "HEAD" or status == 304
                writer.write(
                    _response(status, extra, b"" if bodiless else body, len(body), keep_alive)
                )
                await writer.drain()
                if not keep_alive:
                    return
        except asyncio.LimitOverrunError:
            writer.write(_response(400, [], b"request head too large\n", 23, False))
        except ConnectionError:
            return
        finally:
            with contextlib.suppress(ConnectionError):
                writer.close()

    async def route(self, method: str, target: str, headers: dict[str, str]) -> Answer:
        path = target.partition("?")[0]
        if method not in ("GET", "HEAD"):
            return 405, [("allow", "GET, HEAD")], b"method not allowed\n"
        text = [("content-type", "text/plain")]
        if path == "/healthz":
            return 200, text, b"ok\n"
        if path == "/readyz":
            return (200, text, b"ready\n") if self.ready() else (503, text, b"not ready\n")
        if path == "/metrics":
            return (
                200,
                [("content-type", CONTENT_TYPE_LATEST)],
                generate_latest(self.metrics.registry),
            )
        if path == "/auth":
            return await self.auth(headers)
        if path == CONSOLE_PREFIX or path.startswith(f"{CONSOLE_PREFIX}/"):
            return self.console.answer(path, headers)
        return 404, text, b"not found\n"

    async def auth(self, headers: dict[str, str]) -> Answer:
        try:
            original = original_uri(headers, self.uri_header)
        except AmbiguousUri as exc:
            status, extra, body = responses.bad_request_parts(str(exc))
            return status, [*extra, ("x-extauthz-body", body.decode())], body
        outcome = await self.decider.decide(
            original,
            headers,
            lambda: model_from_headers(headers),
            # no method named: not a public GET (nginx.conf always names it)
            method=headers.get("x-original-method", ""),
        )
        return responses.nginx(outcome)

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> asyncio.Server:
        return await asyncio.start_server(
            self.handle,
            host,
            port,
            limit=MAX_HEAD_BYTES,
            reuse_port=reuse_port,
            backlog=LISTEN_BACKLOG,
        )


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest("malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest("malformed header line")
        key, value = name.lower(), value.strip()
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    return parts[0], parts[1], parts[2], headers


async def _discard_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
    if "transfer-encoding" in headers:
        raise BadRequest("chunked request bodies are not accepted")
    try:
        length = int(headers.get("content-length", "0") or 0)
    except ValueError:
        raise BadRequest("bad content-length") from None
    if length < 0 or length > MAX_DISCARDED_BODY:
        raise BadRequest("request body too large")
    if length:
        try:
            await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise BadRequest("request body shorter than its content-length") from None


def _keep_alive(version: str, headers: dict[str, str]) -> bool:
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.0":
        return connection == "keep-alive"
    return connection != "close"


def _response(status: int, headers: Headers, body: bytes, length: int, keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if status != 304:  # a 304's length would have to be the 200's: none is simpler
        lines.append(f"content-length: {length}")
    lines.append("connection: keep-alive" if keep_alive else "connection: close")
    # header values may carry UTF-8 (a user id like "李雷"); nginx passes the bytes through
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
