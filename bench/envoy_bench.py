"""Row 2: what a Check adds to a request through Envoy.

Three Envoys from the shipped envoy.yaml (rendered with ports, without the usage tap: the
no-op serves no ext_proc, and row 12 measures the tap) in front of one nginx that answers
at once: ext_authz off on the LLM route (the floor), ext_authz to the no-op server,
ext_authz to ours. HTTP/1.1 clients in a closed loop, at concurrency 1 (the
Check's own latency, no queueing) and at a moderate fixed concurrency.
"""

from __future__ import annotations

import yaml

from bench import compare
from bench.payloads import CHAT_BODY, CHAT_PATH
from bench.stack import Ours, Stack
from bench.table import Row, verdict
from devstack import processes as p

CONCURRENCY = (1, 4)
SECONDS = 1.5
ROUNDS = 4
ADDED_TARGET = 1.5

_AUTHZ_OFF = {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
    "disabled": True,
}


def render(ports: dict[str, int], *, authz: bool, tap: bool = True) -> str:
    """envoy.yaml with these ports; without `tap`, without the usage tap
    (`devstack.processes.without_tap`); without `authz`, the catch-all LLM route skips
    ext_authz (its per-route entry replaced by `disabled: true`) and nothing else changes."""
    text = p.render_envoy_config(ports, tap=tap)
    if authz:
        return text
    config = yaml.safe_load(text)
    catch_all = [
        route
        for listener in config["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for network_filter in chain["filters"]
        for host in network_filter["typed_config"]["route_config"]["virtual_hosts"]
        for route in host["routes"]
        if route.get("match") == {"prefix": "/"}
    ]
    if len(catch_all) != 1:
        raise RuntimeError("envoy.yaml's catch-all route changed; update bench/envoy_bench.py")
    catch_all[0].setdefault("typed_per_filter_config", {})[p.AUTHZ_FILTER] = dict(_AUTHZ_OFF)
    return str(yaml.safe_dump(config, sort_keys=False))


def _envoy(stack: Stack, name: str, authz_port: int, upstream: int, *, authz: bool) -> int:
    """Without the usage tap: this row is the Check's cost alone (row 12 is the tap's),
    and the no-op serves no ext_proc."""
    ports = {
        "listener": p.free_port(),
        "extauthz": authz_port,
        "extauthz_http": p.free_port(),  # /ui (the console): not measured, nothing there
        "upstream": upstream,
        "admin": p.free_port(),
    }
    stack.envoy(render(ports, authz=authz, tap=False), ports["listener"], name)
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
