"""Row 12: what the usage tap (extauthz/tap.py, Envoy's ext_proc filter) adds to a request
through Envoy, against what the Check itself adds.

Four Envoys, one server of ours (Check and tap on the same gRPC port) and one devstack
mock upstream that reports nothing (bench/mock_server.py), all in the same run:

- tap: the shipped envoy.yaml, ext_authz then the tap;
- no-op tap: the same, its ext_proc filter sent to bench/noop_server.py's processor
  (CONTINUE to every message, no body asked for): what any grpc.aio processor costs;
- no tap: the shipped envoy.yaml without the ext_proc filter
  (`devstack.processes.without_tap`);
- authz off: that, with ext_authz off on the catch-all route (bench/envoy_bench.py's
  `render`): the floor, so "no tap" minus "authz off" is what the Check adds.

One client, one keep-alive HTTP/1.1 connection per Envoy, requests one at a time (latency,
not throughput), read off a raw socket as they arrive. The configurations take turns in
blocks of BLOCK requests, the order reversed every other round, so the machine's noise
hits each alike. Between requests the client waits PAUSE_S: the tap charges after the
response has passed, off its path, and the pause lets that finish before the next
request, whichever Envoy it goes to (the charge's cost shows in the CPU line instead).

Three measures, each a chat completion of the same body:
- non-streamed (JSON): the whole response;
- streamed (`"stream": true`, no `stream_options`, as most clients send it: the tap asks
  for the usage chunk and takes it back out), events written as fast as the mock can:
  the whole stream, to `data: [DONE]`;
- time to first token: the same stream with its events PACE_S apart
  (`x-mock-event-interval-seconds`), timed from sending the request to the arrival of the
  first SSE event that carries content.

Every response must be a 200 and whole (a stream up to `data: [DONE]`, and with no usage
chunk where the client did not ask for one); every tapped one must be charged from its
usage (the key's spend grows by exactly the unit cost per tapped request, and
`extauthz_tap_responses_total{basis="usage"}` by one); keys of the other configurations
are charged nothing; ours counts an allow for every request but the authz-off ones. A tap
that did not run cannot look fast.
"""

from __future__ import annotations

import copy
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from bench import load, payloads
from bench.envoy_bench import render
from bench.payloads import CHAT_PATH
from bench.stack import ADMIN_TOKEN, Ours, Stack, cpu_seconds
from bench.table import Row, verdict
from devstack import mock_upstream
from devstack import processes as p

REQUESTS = 400  # measured per configuration and measure
WARMUP = 40
BLOCK = 10
PAUSE_S = 0.003
PACE_S = 0.004
BUDGET_USD = 1_000_000.0
TTFT_TARGET_MS = 1.0
CONFIGS = ("tap", "no-op tap", "no tap", "authz off")
TAP_NOOP_CLUSTER = "tap_noop"
STREAM_BODY = json.dumps({**json.loads(payloads.CHAT_BODY), "stream": True}).encode()
# a stream that asked for its usage chunk: the tap changes no byte of it (observing only)
USAGE_STREAM_BODY = json.dumps(
    {**json.loads(STREAM_BODY), "stream_options": {"include_usage": True}}
).encode()
USAGE_METRIC = ("extauthz_tap_responses_total", 'basis="usage"')


class _Reply:
    """One HTTP/1.1 response read off a socket as it arrives."""

    def __init__(self) -> None:
        self.status = 0
        self.body = bytearray()
        self.first_event_at = 0  # perf_counter_ns of the recv that completed it
        self.ended_at = 0


def _first_content(body: bytes) -> bool:
    """Whether the complete SSE events so far include one carrying content."""
    for event in body.split(b"\n\n")[:-1]:
        for line in event.split(b"\n"):
            if not line.startswith(b"data: {"):
                continue
            document = json.loads(line[6:])
            for choice in document.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    return True
    return False


class _Connection:
    """A keep-alive HTTP/1.1 connection to one Envoy, one request at a time."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending = b""

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise RuntimeError("Envoy closed the connection mid-response")
        return data

    def exchange(self, request: bytes, *, stream: bool) -> tuple[_Reply, int]:
        """Send `request`, read its whole response; (the reply, the send time in ns)."""
        reply = _Reply()
        sent = time.perf_counter_ns()
        self.sock.sendall(request)
        buffer = self.pending
        while b"\r\n\r\n" not in buffer:
            buffer += self._recv()
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        reply.status = int(lines[0].split(" ", 2)[1])
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])
        }
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(buffer) < length:
                buffer += self._recv()
            reply.body += buffer[:length]
            self.pending = buffer[length:]
            reply.ended_at = time.perf_counter_ns()
            return reply, sent
        if headers.get("transfer-encoding", "").lower() != "chunked":
            raise RuntimeError(f"a response neither sized nor chunked: {headers}")
        received_at = time.perf_counter_ns()
        while True:
            while b"\r\n" not in buffer:
                buffer += self._recv()
                received_at = time.perf_counter_ns()
            size_line, _, rest = buffer.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                rest += self._recv()
                received_at = time.perf_counter_ns()
            reply.body += rest[:size]
            buffer = rest[size + 2 :]
            if stream and not reply.first_event_at and _first_content(bytes(reply.body)):
                reply.first_event_at = received_at
            if size == 0:
                self.pending = buffer
                reply.ended_at = received_at
                return reply, sent

    def close(self) -> None:
        self.sock.close()


def _request(port: int, key: str, body: bytes, extra: tuple[str, ...] = ()) -> bytes:
    head = [
        f"POST {CHAT_PATH} HTTP/1.1",
        f"host: 127.0.0.1:{port}",
        f"authorization: Bearer {key}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class _Measure:
    name: str
    body: bytes
    stream: bool
    extra: tuple[str, ...] = ()
    configs: tuple[str, ...] = CONFIGS
    asks_usage: bool = False  # a stream that asked for its usage chunk (and gets it)

    def check(self, reply: _Reply, config: str) -> None:
        if reply.status != 200:
            raise RuntimeError(f"{self.name}, {config}: HTTP {reply.status}: {bytes(reply.body)!r}")
        if self.stream:
            if not reply.body.endswith(b"data: [DONE]\n\n") or not reply.first_event_at:
                raise RuntimeError(f"{self.name}, {config}: a stream cut short: {reply.body!r}")
            if (b'"usage": {' in reply.body) != self.asks_usage:
                raise RuntimeError(f"{self.name}, {config}: usage chunk wrongly kept or cut")
        elif not json.loads(reply.body).get("usage"):
            raise RuntimeError(f"{self.name}, {config}: no usage in {bytes(reply.body)!r}")


MEASURES = (
    _Measure("json", payloads.CHAT_BODY, stream=False),
    _Measure("stream", STREAM_BODY, stream=True),
    _Measure(
        "ttft",
        STREAM_BODY,
        stream=True,
        extra=(f"{mock_upstream.INTERVAL_HEADER}: {PACE_S}",),
        configs=("tap", "no-op tap", "no tap"),  # the target is absolute: no floor needed
    ),
    _Measure("stream+usage", USAGE_STREAM_BODY, stream=True, asks_usage=True),
    _Measure(
        "ttft+usage",
        USAGE_STREAM_BODY,
        stream=True,
        extra=(f"{mock_upstream.INTERVAL_HEADER}: {PACE_S}",),
        configs=("tap", "no-op tap", "no tap"),
        asks_usage=True,
    ),
)


@dataclass
class _Series:
    total_us: list[float] = field(default_factory=list)
    first_us: list[float] = field(default_factory=list)
    cpu_s: float = 0.0  # ours
    envoy_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0
    other_cpu_s: float = 0.0

    def p(self, q: float, *, first: bool = False) -> float:
        return load.percentile(sorted(self.first_us if first else self.total_us), q) / 1000

    def summary(self) -> dict[str, float | int]:
        n = len(self.total_us)
        out: dict[str, float | int] = {
            "requests": n,
            "p50_ms": round(self.p(50), 3),
            "p99_ms": round(self.p(99), 3),
            "server_cpu_us_per_request": round(self.cpu_s / n * 1e6, 1),
            "envoy_cpu_us_per_request": round(self.envoy_cpu_s / n * 1e6, 1),
            "redis_cpu_us_per_request": round(self.redis_cpu_s / n * 1e6, 1),
        }
        if self.other_cpu_s:
            out["noop_processor_cpu_us_per_request"] = round(self.other_cpu_s / n * 1e6, 1)
        if self.first_us:
            out["ttft_p50_ms"] = round(self.p(50, first=True), 3)
            out["ttft_p99_ms"] = round(self.p(99, first=True), 3)
        return out


@dataclass
class _Config:
    name: str
    port: int
    envoy_pid: int
    key: str
    key_id: str
    other_pids: tuple[int, ...] = ()  # the no-op tap's processor
    connection: _Connection | None = None

    def conn(self) -> _Connection:
        if self.connection is None:
            self.connection = _Connection(self.port)
        return self.connection


def _spent_nanos(address: str, key_id: str) -> int:
    return round(payloads.get_key(address, ADMIN_TOKEN, key_id).spent * 1e9)


def _eventually(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"tap bench: {what} after {timeout}s")
        time.sleep(0.05)


def _settled(ours: Ours, key_id: str) -> bool:
    data = payloads.get_key(ours.address, ADMIN_TOKEN, key_id)
    return data.in_flight == 0 and data.reserved == 0


def _run(
    measure: _Measure,
    configs: list[_Config],
    ours: Ours,
    redis_pid: int,
    requests: int,
    *,
    record: bool,
) -> dict[str, _Series]:
    """`requests` per configuration, in alternating blocks; verified as it goes."""
    series = {c.name: _Series() for c in configs}
    rounds = max(1, requests // BLOCK)
    for round_ in range(rounds):
        for config in configs if round_ % 2 == 0 else reversed(configs):
            one = series[config.name]
            wire = _request(config.port, config.key, measure.body, measure.extra)
            allowed = ours.allowed()
            cpu = (
                cpu_seconds(ours.pids),
                cpu_seconds([config.envoy_pid]),
                cpu_seconds([redis_pid]),
                cpu_seconds(list(config.other_pids)),
            )
            for _ in range(BLOCK):
                reply, sent = config.conn().exchange(wire, stream=measure.stream)
                measure.check(reply, config.name)
                one.total_us.append((reply.ended_at - sent) / 1000)
                if measure.stream:
                    one.first_us.append((reply.first_event_at - sent) / 1000)
                time.sleep(PAUSE_S)
            one.cpu_s += cpu_seconds(ours.pids) - cpu[0]
            one.envoy_cpu_s += cpu_seconds([config.envoy_pid]) - cpu[1]
            one.redis_cpu_s += cpu_seconds([redis_pid]) - cpu[2]
            one.other_cpu_s += cpu_seconds(list(config.other_pids)) - cpu[3]
            grew = ours.allowed() - allowed
            expected = 0 if config.name == "authz off" else BLOCK
            if grew != expected:
                raise RuntimeError(f"{config.name}: {BLOCK} requests, {grew} allows counted")
    if not record:
        return {}
    return series


def tap_to(text: str, port: int) -> str:
    """An envoy.yaml whose ext_proc filters call 127.0.0.1:`port` (a cluster of its own,
    otherwise the extauthz cluster's settings) while ext_authz still calls extauthz."""
    config = yaml.safe_load(text)
    clusters = config["static_resources"]["clusters"]
    cluster = copy.deepcopy(next(c for c in clusters if c["name"] == "extauthz"))
    cluster["name"] = cluster["load_assignment"]["cluster_name"] = TAP_NOOP_CLUSTER
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    endpoint["endpoint"]["address"]["socket_address"]["port_value"] = port
    clusters.append(cluster)
    found = 0
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                for http_filter in network_filter["typed_config"]["http_filters"]:
                    if http_filter["name"].startswith(p.TAP_FILTER):
                        config_ = http_filter["typed_config"]
                        inner = config_.get("extension_config", {}).get("typed_config", config_)
                        inner["grpc_service"]["envoy_grpc"]["cluster_name"] = TAP_NOOP_CLUSTER
                        found += 1
    if found != 3:  # clamp, the tap that changes bytes, the observing tap
        raise RuntimeError("envoy.yaml's ext_proc filter changed; update bench/tap_bench.py")
    return str(yaml.safe_dump(config, sort_keys=False))


def _envoy(stack: Stack, name: str, ours: Ours, upstream: int, noop_port: int) -> tuple[int, int]:
    ports = {
        "listener": p.free_port(),
        "extauthz": ours.grpc_port,
        "extauthz_http": ours.http_ports[0],  # /ui: not measured
        "upstream": upstream,
        "admin": p.free_port(),
    }
    text = render(ports, authz=name != "authz off", tap=name in ("tap", "no-op tap"))
    if name == "no-op tap":
        text = tap_to(text, noop_port)
    process = stack.envoy(text, ports["listener"], "envoy-" + name.replace(" ", "-"))
    return ports["listener"], process.proc.pid


def _added_rows(label: str, got: dict[str, _Series], *, first: bool) -> list[Row]:
    """What the tap adds (tap minus no tap), p50 and p99, next to what the no-op tap adds
    and, where authz off was measured, what the Check adds (no tap minus authz off): the
    target is the Check's figure, or for time to first token TTFT_TARGET_MS."""
    tap, noop, plain = got["tap"], got["no-op tap"], got["no tap"]
    off = got.get("authz off")
    rows = []
    for q in (50, 99):
        added = tap.p(q, first=first) - plain.p(q, first=first)
        floor = noop.p(q, first=first) - plain.p(q, first=first)
        targeted = q == 50
        if off is None:
            rows.append(
                Row(
                    "12",
                    f"  tap adds, p{q} ms ({label})",
                    f"{added:.2f}",
                    f"{floor:.2f} (no-op tap)",
                    "",
                    f"< {TTFT_TARGET_MS:g} ms" if targeted else "",
                    verdict(added < TTFT_TARGET_MS) if targeted else "",
                )
            )
            continue
        check = plain.p(q) - off.p(q)
        rows.append(
            Row(
                "12",
                f"  tap adds vs Check adds, p{q} ms ({label})",
                f"{added:.2f}",
                f"{check:.2f} (Check); {floor:.2f} (no-op tap)",
                f"{added / check:.2f}x" if check > 0 else "n/a",
                "<= 1x Check's" if targeted else "",
                verdict(added <= check) if targeted else "",
            )
        )
    return rows


def _pair(s: _Series, *, first: bool = False) -> str:
    return f"{s.p(50, first=first):.2f} / {s.p(99, first=first):.2f}"


def _baselines(got: dict[str, _Series], *, first: bool = False) -> str:
    return "; ".join(
        f"{_pair(got[name], first=first)} ({name})" for name in CONFIGS[1:] if name in got
    )


def _cpu(s: _Series) -> str:
    n = len(s.total_us)
    return f"{s.cpu_s / n * 1e6:.0f} (+{s.envoy_cpu_s / n * 1e6:.0f} Envoy)"


def measure(stack: Stack, ours: Ours, redis_pid: int, noop_port: int, noop_pid: int) -> list[Row]:
    upstream, _ = stack.mock_upstream()
    configs = []
    for name in CONFIGS:
        port, pid = _envoy(stack, name, ours, upstream, noop_port)
        key, key_id = payloads.create_key(ours.address, ADMIN_TOKEN, max_budget=BUDGET_USD)
        other = (noop_pid,) if name == "no-op tap" else ()
        configs.append(_Config(name, port, pid, key, key_id, other))
    tap = configs[0]

    # the unit: what one tapped request is charged (every measure sends the same prompt
    # and output cap, and the mock answers with exactly that usage)
    reply, _ = tap.conn().exchange(_request(tap.port, tap.key, payloads.CHAT_BODY), stream=False)
    MEASURES[0].check(reply, "tap")
    _eventually(lambda: _settled(ours, tap.key_id), "the first tapped request was not settled")
    unit = _spent_nanos(ours.address, tap.key_id)
    if unit <= 0:
        raise RuntimeError("the tap charged nothing for a response that carried usage")
    tapped = 1
    usage_before = ours.counter(*USAGE_METRIC)

    got: dict[str, dict[str, _Series]] = {}
    try:
        for m in MEASURES:
            chosen = [c for c in configs if c.name in m.configs]
            _run(m, chosen, ours, redis_pid, WARMUP, record=False)
            got[m.name] = _run(m, chosen, ours, redis_pid, REQUESTS, record=True)
            tapped += (max(1, WARMUP // BLOCK) + max(1, REQUESTS // BLOCK)) * BLOCK
    finally:
        for c in configs:
            if c.connection is not None:
                c.connection.close()

    # the tap really ran: every tapped response charged from its usage, exactly once
    _eventually(lambda: _settled(ours, tap.key_id), "tapped requests still in flight")
    spent = _spent_nanos(ours.address, tap.key_id)
    charged = ours.counter(*USAGE_METRIC) - usage_before
    if spent != tapped * unit or charged != tapped - 1:
        raise RuntimeError(
            f"tap: {tapped} requests, spent {spent} nanos (expected {tapped * unit}), "
            f"{charged:.0f} charged from usage (expected {tapped - 1})"
        )
    for c in configs[1:]:
        if _spent_nanos(ours.address, c.key_id) != 0:
            raise RuntimeError(f"{c.name}: its key was charged, so our tap ran there")

    json_, stream, ttft = got["json"], got["stream"], got["ttft"]
    usage_stream, usage_ttft = got["stream+usage"], got["ttft+usage"]
    data: dict[str, Any] = {
        m: {name: s.summary() for name, s in series.items()} for m, series in got.items()
    }
    data["settings"] = {
        "requests": REQUESTS,
        "warmup": WARMUP,
        "block": BLOCK,
        "pause_s": PAUSE_S,
        "pace_s": PACE_S,
        "tapped_requests_charged": tapped,
        "unit_cost_nanos": unit,
    }
    return [
        Row(
            "12",
            "tap: chat completion through Envoy, p50 / p99 ms (1 client, sequential)",
            _pair(json_["tap"]),
            _baselines(json_),
            data=data,
        ),
        *_added_rows("non-streamed", json_, first=False),
        Row(
            "12",
            "tap: streamed chat completion, whole stream, p50 / p99 ms",
            _pair(stream["tap"]),
            _baselines(stream),
        ),
        *_added_rows("streamed", stream, first=False),
        Row(
            "12",
            f"tap: time to first token, p50 / p99 ms (events {PACE_S * 1000:g} ms apart)",
            _pair(ttft["tap"], first=True),
            _baselines(ttft, first=True),
        ),
        *_added_rows("time to first token", ttft, first=True),
        Row(
            "12",
            "tap: streamed, usage asked for (nothing to change), whole stream, p50 / p99 ms",
            _pair(usage_stream["tap"]),
            _baselines(usage_stream),
        ),
        *_added_rows("streamed, usage asked for", usage_stream, first=False),
        Row(
            "12",
            "tap: time to first token, usage asked for, p50 / p99 ms",
            _pair(usage_ttft["tap"], first=True),
            _baselines(usage_ttft, first=True),
        ),
        *_added_rows("time to first token, usage asked for", usage_ttft, first=True),
        Row(
            "12",
            "tap: server CPU per request, us, non-streamed / streamed",
            f"{_cpu(json_['tap'])} / {_cpu(stream['tap'])}",
            f"{_cpu(json_['no tap'])} / {_cpu(stream['no tap'])} (no tap)",
        ),
    ]
