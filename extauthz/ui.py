"""The web console's files (extauthz/console/), served by the HTTP port under /ui/.

Plain HTML, CSS and JavaScript, read once at start: no build step, nothing fetched from
elsewhere at run time. The browser calls the admin REST API (/api/...) on the same origin,
through Envoy, with the admin token it keeps in sessionStorage; nothing here needs a secret.

Only the files found in the directory at start are served, by exact name (`/ui/app.js`), so
no path can reach anything else. Every answer carries a strict Content-Security-Policy
(scripts, styles and images from the console's own files only, no inline script or style,
no framing) and revalidates through an ETag (`Cache-Control: no-cache`): after an upgrade
the browser never mixes an old app.js with a new index.html.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Final

import orjson

PREFIX: Final = "/ui"
INDEX: Final = "index.html"
TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
CSP: Final = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS: Final = (
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
)
Headers = list[tuple[str, str]]
Answer = tuple[int, Headers, bytes]


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def console_files() -> Traversable:
    return resources.files("extauthz") / "console"


class Console:
    """The console's files by name, and the answers for every path under /ui."""

    def __init__(self, assets: Mapping[str, Asset], ready: Callable[[], bool]) -> None:
        if INDEX not in assets:
            raise ValueError(f"the console has no {INDEX}")
        self.assets = dict(assets)
        self.ready = ready

    @classmethod
    def load(cls, ready: Callable[[], bool], directory: Traversable | None = None) -> Console:
        folder = directory if directory is not None else console_files()
        assets: dict[str, Asset] = {}
        for entry in folder.iterdir():
            suffix = "." + entry.name.rpartition(".")[2]
            if entry.is_file() and suffix in TYPES and not entry.name.startswith("."):
                body = entry.read_bytes()
                digest = hashlib.sha256(body).hexdigest()[:32]
                assets[entry.name] = Asset(body, TYPES[suffix], f'"{digest}"')
        return cls(assets, ready)

    def answer(self, path: str, headers: Mapping[str, str]) -> Answer:
        """`path` is /ui or under it (no query string)."""
        if path == PREFIX:
            return 308, [*SECURITY_HEADERS, ("location", f"{PREFIX}/")], b""
        name = path.removeprefix(f"{PREFIX}/") or INDEX
        if name == "health":
            return self.health()
        asset = self.assets.get(name)
        if asset is None:
            text = [*SECURITY_HEADERS, ("content-type", "text/plain; charset=utf-8")]
            return 404, [*text, ("cache-control", "no-store")], b"not found\n"
        cached = [*SECURITY_HEADERS, ("cache-control", "no-cache"), ("etag", asset.etag)]
        if asset.etag in _etags(headers.get("if-none-match", "")):
            return 304, cached, b""
        return 200, [*cached, ("content-type", asset.content_type)], asset.body

    def health(self) -> Answer:
        """What the console's header shows: the server's readiness (/readyz), as JSON."""
        ready = self.ready()
        body = {
            "status": "ready" if ready else "not ready",
            "message": "the server is ready"
            if ready
            else "the server cannot reach Redis, or is shutting down",
        }
        extra = [("content-type", "application/json"), ("cache-control", "no-store")]
        return 200 if ready else 503, [*SECURITY_HEADERS, *extra], orjson.dumps(body)


def _etags(header: str) -> set[str]:
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return tags - {""}
