"""Row 1: Check straight to the gRPC port, ours against the no-op server, and the CPU
each spends per call. Ours gets a key without limits, so every call is an allow."""

from __future__ import annotations

from bench import compare, load, payloads
from bench.stack import Ours
from bench.table import Row, ratio, verdict

SAT_CLIENTS, SAT_STREAMS = 4, 16
SECONDS = 2.0
ROUNDS = 4
THROUGHPUT_TARGET = 0.65


def check_url(port: int) -> str:
    return f"http://127.0.0.1:{port}{payloads.CHECK_PATH}"


def targets(
    ours: Ours, noop_port: int, noop_pid: int, redis_pid: int, key: str
) -> list[compare.Target]:
    request = payloads.check_request(key)
    payloads.expect_allowed(ours.address, request)
    payloads.expect_allowed(f"127.0.0.1:{noop_port}", request)
    frame = load.grpc_frame(request.SerializeToString())
    return [
        compare.Target(
            "ours",
            check_url(ours.grpc_port),
            frame,
            counter=ours.allowed,
            pids=ours.pids,
            other_pids=(redis_pid,),
        ),
        compare.Target("noop", check_url(noop_port), frame, pids=(noop_pid,)),
    ]


def _latency(s: compare.Series) -> str:
    return f"{s.p50_ms:.2f} / {s.p99_ms:.2f}"


def measure(ours: Ours, noop_port: int, noop_pid: int, redis_pid: int, key: str) -> list[Row]:
    chosen = targets(ours, noop_port, noop_pid, redis_pid, key)
    one = compare.alternate(chosen, clients=1, seconds=SECONDS, rounds=ROUNDS)
    sat = compare.alternate(
        chosen, clients=SAT_CLIENTS, streams=SAT_STREAMS, seconds=SECONDS, rounds=ROUNDS
    )
    o1, n1, os_, ns = one["ours"], one["noop"], sat["ours"], sat["noop"]
    sat_label = f"{SAT_CLIENTS} conns x {SAT_STREAMS} streams"
    throughput = os_.rps / ns.rps
    data_one = {"ours": o1.summary(), "noop": n1.summary()}
    data_sat = {"ours": os_.summary(), "noop": ns.summary()}
    return [
        Row(
            "1",
            "Check calls/s, concurrency 1",
            f"{o1.rps:,.0f}",
            f"{n1.rps:,.0f} (no-op)",
            ratio(o1.rps, n1.rps),
            data=data_one,
        ),
        Row(
            "1",
            "Check p50 / p99 ms, concurrency 1",
            _latency(o1),
            _latency(n1),
            ratio(o1.p50_ms, n1.p50_ms),
        ),
        Row(
            "1",
            f"Check calls/s at saturation ({sat_label})",
            f"{os_.rps:,.0f}",
            f"{ns.rps:,.0f} (no-op)",
            f"{throughput:.2f}x",
            f">= {THROUGHPUT_TARGET}x",
            verdict(throughput >= THROUGHPUT_TARGET),
            data=data_sat,
        ),
        Row(
            "1",
            "Check p50 / p99 ms at saturation",
            _latency(os_),
            _latency(ns),
            ratio(os_.p50_ms, ns.p50_ms),
        ),
        Row(
            "1",
            "server CPU per Check, us (saturation runs)",
            f"{os_.cpu_us_per_call:.0f} (+{os_.other_cpu_us_per_call:.0f} Redis)",
            f"{ns.cpu_us_per_call:.0f} (no-op)",
            ratio(os_.cpu_us_per_call, ns.cpu_us_per_call),
        ),
    ]
