"""Row 2: what a Check adds to a request through Envoy.

Three Envoys from the shipped envoy.yaml (rendered with ports) in front of one nginx that
answers at once: ext_authz off on the LLM route (the floor), ext_authz to the no-op
server, ext_authz to ours. HTTP/1.1 clients in a closed loop, at concurrency 1 (the
Check's own latency, no queueing) and at a moderate fixed concurrency.
"""

from __future__ import annotations

import re

from bench import compare
from bench.payloads import CHAT_BODY, CHAT_PATH
from bench.stack import Ours, Stack
from bench.table import Row, verdict
from devstack import processes as p

CONCURRENCY = (1, 4)
SECONDS = 1.5
ROUNDS = 4
ADDED_TARGET = 1.5

_CATCH_ALL = re.compile(
    r"^(?P<indent> *)- match: \{ prefix: / \}\n(?P=indent)  route: \{ cluster: llm_upstream.*\}$",
    re.MULTILINE,
)
_AUTHZ_OFF = (
    "envoy.filters.http.ext_authz: "
    '{ "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute,'
    " disabled: true }"
)


def render(ports: dict[str, int], *, authz: bool) -> str:
    """envoy.yaml with these ports; without `authz`, the catch-all LLM route skips
    ext_authz (per-route `disabled: true`) and nothing else changes."""
    text = p.render_envoy_config(ports)
    if authz:
        return text
    found = _CATCH_ALL.search(text)
    if found is None:
        raise RuntimeError("envoy.yaml's catch-all route changed; update bench/envoy_bench.py")
    indent = found.group("indent") + "  "
    addition = f"\n{indent}typed_per_filter_config:\n{indent}  {_AUTHZ_OFF}"
    return text[: found.end()] + addition + text[found.end() :]


def _envoy(stack: Stack, name: str, authz_port: int, upstream: int, *, authz: bool) -> int:
    ports = {
        "listener": p.free_port(),
        "extauthz": authz_port,
        "upstream": upstream,
        "admin": p.free_port(),
    }
    stack.envoy(render(ports, authz=authz), ports["listener"], name)
    return ports["listener"]


def measure(stack: Stack, ours: Ours, key: str, noop_port: int) -> list[Row]:
    upstream = stack.nginx()
    listeners = {
        "envoy-only": _envoy(stack, "envoy-off", noop_port, upstream, authz=False),
        "envoy+noop": _envoy(stack, "envoy-noop", noop_port, upstream, authz=True),
        "envoy+ours": _envoy(stack, "envoy-ours", ours.grpc_port, upstream, authz=True),
    }
    headers = (f"authorization: Bearer {key}", "content-type: application/json")
    targets = [
        compare.Target(
            name,
            f"http://127.0.0.1:{port}{CHAT_PATH}",
            CHAT_BODY,
            headers=headers,
            h1=True,
            counter=ours.allowed if name == "envoy+ours" else None,
        )
        for name, port in listeners.items()
    ]
    rows = []
    for clients in CONCURRENCY:
        got = compare.alternate(targets, clients=clients, seconds=SECONDS, rounds=ROUNDS)
        floor, noop, mine = got["envoy-only"], got["envoy+noop"], got["envoy+ours"]
        data = {name: series.summary() for name, series in got.items()}
        rows.append(
            Row(
                "2",
                f"through Envoy, p50 / p99 ms, {clients} HTTP/1.1 client(s)",
                f"{mine.p50_ms:.2f} / {mine.p99_ms:.2f}",
                f"{noop.p50_ms:.2f} / {noop.p99_ms:.2f} (no-op); "
                f"{floor.p50_ms:.2f} / {floor.p99_ms:.2f} (authz off)",
                data=data,
            )
        )
        for q in ("p50", "p99"):
            added_ours = getattr(mine, f"{q}_ms") - getattr(floor, f"{q}_ms")
            added_noop = getattr(noop, f"{q}_ms") - getattr(floor, f"{q}_ms")
            share = added_ours / added_noop if added_noop > 0 else float("inf")
            targeted = q == "p50"
            rows.append(
                Row(
                    "2",
                    f"  added {q} ms vs authz off, {clients} client(s)",
                    f"{added_ours:.2f}",
                    f"{added_noop:.2f} (no-op)",
                    f"{share:.2f}x",
                    f"<= {ADDED_TARGET}x" if targeted else "",
                    verdict(share <= ADDED_TARGET) if targeted else "",
                )
            )
    return rows
