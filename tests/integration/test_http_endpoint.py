"""The HTTP port (extauthz/http.py) in process: real sockets, a real Redis behind /auth."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import AsyncIterator
from fnmatch import fnmatch
from pathlib import Path

import pytest

from extauthz.decision import Decider
from extauthz.http import HttpEndpoint
from extauthz.metrics import Metrics
from extauthz.ui import Console, console_files
from keys.pricing import PriceTable
from keys.store import KeyStore
from tests.helpers import key_spec

pytestmark = pytest.mark.integration


class Reply:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = dict(
            (name.lower(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:])
        )


class Endpoint:
    def __init__(self, port: int, ready: list[bool]) -> None:
        self.port = port
        self.ready = ready

    async def send(self, raw: bytes) -> Reply:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()
        return Reply(data)

    async def get(self, path: str, **headers: str) -> Reply:
        lines = [f"GET {path} HTTP/1.1", "host: x", "connection: close"]
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        return await self.send(("\r\n".join(lines) + "\r\n\r\n").encode())


@pytest.fixture
async def endpoint(store: KeyStore) -> AsyncIterator[Endpoint]:
    ready = [True]
    decider = Decider(
        store,
        Metrics(),
        PriceTable.builtin(),
        public_paths=frozenset({"/healthz"}),
        fail_open=False,
    )
    server = await HttpEndpoint(Metrics(), lambda: ready[0], decider).start("127.0.0.1", 0)
    yield Endpoint(server.sockets[0].getsockname()[1], ready)
    server.close()
    await server.wait_closed()


async def test_healthz_answers_ok(endpoint: Endpoint) -> None:
    assert (await endpoint.get("/healthz")).status == 200


async def test_readyz_follows_the_readiness_it_is_given(endpoint: Endpoint) -> None:
    assert (await endpoint.get("/readyz")).status == 200
    endpoint.ready[0] = False
    assert (await endpoint.get("/readyz")).status == 503


async def test_metrics_are_prometheus_text(endpoint: Endpoint) -> None:
    reply = await endpoint.get("/metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")


async def test_auth_allows_a_key_and_returns_identity_headers(
    endpoint: Endpoint, store: KeyStore
) -> None:
    full, key = await store.create(key_spec(team_id="t9"), "sk-mp")
    reply = await endpoint.get(
        "/auth",
        authorization=f"Bearer {full}",
        x_original_uri="/v1/chat/completions",
        x_original_method="POST",
        x_model="gpt-4",
    )
    assert reply.status == 200
    assert reply.headers["x-virtual-key-id"] == key.id
    assert reply.headers["x-virtual-key-team-id"] == "t9"
    assert re.fullmatch(r"[0-9a-f]{24}-[0-9]+", reply.headers["x-virtual-key-request-id"])


async def test_auth_denial_carries_status_and_json_body_twice(endpoint: Endpoint) -> None:
    reply = await endpoint.get(
        "/auth", x_original_uri="/v1/chat/completions", x_original_method="POST"
    )
    assert reply.status == 401
    assert json.loads(reply.body)["error"]["code"] == "invalid_api_key"
    assert json.loads(reply.headers["x-extauthz-body"]) == json.loads(reply.body)


async def test_unknown_path_is_404(endpoint: Endpoint) -> None:
    assert (await endpoint.get("/nothing")).status == 404


async def test_post_is_405(endpoint: Endpoint) -> None:
    reply = await endpoint.send(
        b"POST /healthz HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    assert reply.status == 405 and reply.headers["allow"] == "GET, HEAD"


async def test_malformed_request_line_is_400(endpoint: Endpoint) -> None:
    assert (await endpoint.send(b"GARBAGE\r\n\r\n")).status == 400


async def test_head_has_no_body_but_the_length_of_one(endpoint: Endpoint) -> None:
    reply = await endpoint.send(b"HEAD /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert reply.status == 200 and reply.body == b"" and reply.headers["content-length"] == "3"


async def test_the_listen_queue_takes_a_burst_of_nginx_connections(endpoint: Endpoint) -> None:
    """nginx opens a connection per auth subrequest; the kernel's queue for not yet
    accepted connections must hold a burst of hundreds (asyncio's default is 100)."""
    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("ss (iproute2) is not installed")
    command = [ss, "-ltnH", f"sport = :{endpoint.port}"]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True)
    backlog = int(done.stdout.split()[2])  # for a listening socket, Send-Q is its backlog
    somaxconn = await asyncio.to_thread(Path("/proc/sys/net/core/somaxconn").read_text)
    assert backlog >= min(1024, int(somaxconn))


# ---------------------------------------------------------------- the console (/ui)


async def test_ui_without_its_slash_redirects_to_the_console(endpoint: Endpoint) -> None:
    reply = await endpoint.get("/ui")
    assert reply.status == 308 and reply.headers["location"] == "/ui/"


async def test_ui_serves_the_console_page_with_strict_security_headers(
    endpoint: Endpoint,
) -> None:
    reply = await endpoint.get("/ui/")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    assert b'<script src="app.js" defer></script>' in reply.body
    csp = reply.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["referrer-policy"] == "no-referrer"
    assert reply.headers["x-frame-options"] == "DENY"
    assert reply.headers["cache-control"] == "no-cache"


async def test_console_page_has_no_inline_script_or_style(endpoint: Endpoint) -> None:
    """The CSP forbids them: an inline one would silently not run."""
    page = (await endpoint.get("/ui/")).body.decode()
    assert re.findall(r"<script(?![^>]*\bsrc=)", page) == []
    assert "<style" not in page and " style=" not in page and "javascript:" not in page


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("app.js", "text/javascript; charset=utf-8"),
        ("app.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
        ("index.html", "text/html; charset=utf-8"),
    ],
)
async def test_each_console_file_has_its_content_type(
    endpoint: Endpoint, name: str, content_type: str
) -> None:
    reply = await endpoint.get(f"/ui/{name}")
    assert reply.status == 200 and reply.headers["content-type"] == content_type
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert int(reply.headers["content-length"]) == len(reply.body) > 0


async def test_a_console_file_the_browser_has_is_answered_304_without_a_body(
    endpoint: Endpoint,
) -> None:
    first = await endpoint.get("/ui/app.js")
    again = await endpoint.get("/ui/app.js", if_none_match=first.headers["etag"])
    assert again.status == 304 and again.body == b""
    assert again.headers["etag"] == first.headers["etag"]
    assert "content-length" not in again.headers
    changed = await endpoint.get("/ui/app.js", if_none_match='"something-else"')
    assert changed.status == 200 and changed.body == first.body


@pytest.mark.parametrize(
    "path",
    [
        "/ui/../metrics",
        "/ui/%2e%2e/metrics",
        "/ui/..%2fmetrics",
        "/ui/./app.js",
        "/ui//app.js",
        "/ui/app.js/",
        "/ui/nothing.js",
        "/ui/__init__.py",
        "/ui/console/app.js",
        "/ui/%61pp.js",
        "/uix",
    ],
)
async def test_only_the_console_files_own_names_are_served(endpoint: Endpoint, path: str) -> None:
    reply = await endpoint.get(path)
    assert reply.status == 404
    assert b"HELP" not in reply.body and b"function" not in reply.body


async def test_console_health_follows_readiness_as_json(endpoint: Endpoint) -> None:
    ready = await endpoint.get("/ui/health")
    assert ready.status == 200 and ready.headers["content-type"] == "application/json"
    assert json.loads(ready.body)["status"] == "ready"
    assert ready.headers["cache-control"] == "no-store"
    endpoint.ready[0] = False
    down = await endpoint.get("/ui/health")
    assert down.status == 503
    assert json.loads(down.body) == {
        "status": "not ready",
        "message": "the server cannot reach Redis, or is shutting down",
    }


async def test_console_files_cannot_be_posted_to(endpoint: Endpoint) -> None:
    reply = await endpoint.send(
        b"POST /ui/ HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    assert reply.status == 405


async def test_a_head_of_a_console_file_has_its_length_and_no_body(endpoint: Endpoint) -> None:
    full = await endpoint.get("/ui/app.css")
    reply = await endpoint.send(
        b"HEAD /ui/app.css HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    assert reply.status == 200 and reply.body == b""
    assert reply.headers["content-length"] == str(len(full.body))


def test_every_file_of_the_console_directory_is_served_and_packaged() -> None:
    """A file the loader skipped, or the wheel left out, would be a 404 in production."""
    directory = Path(str(console_files()))
    names = {entry.name for entry in directory.iterdir() if entry.is_file()}
    assert set(Console.load(lambda: True).assets) == names
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["extauthz"]
    assert [n for n in sorted(names) if not any(fnmatch(f"console/{n}", g) for g in globs)] == []
