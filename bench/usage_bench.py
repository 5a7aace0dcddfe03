"""Row 3: ReportUsage calls/s.

Two ways, both stated in the table:
- h2load posts one frame again and again, so after the first call every report is a
  duplicate: the idempotent "already charged" path. Baseline: the no-op Check, same load.
- a Python grpc.aio client with many calls in flight, every request_id unique, so every
  call charges. Baseline: the same client calling the no-op Check, which shows how much
  of the ceiling is the (Python) client itself.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc

from bench import compare, load, payloads
from bench.check_bench import SAT_CLIENTS, SAT_STREAMS, check_url
from bench.stack import USAGE_TOKEN, Ours
from bench.table import Row, ratio
from keys.v1 import keys_pb2_grpc

SECONDS = 2.0
ROUNDS = 2
IN_FLIGHT = 64


async def _drive(
    numbers: Iterator[int], address: str, call: Callable[[grpc.aio.Channel, int], Awaitable[object]]
) -> tuple[int, float]:
    """Calls for SECONDS with IN_FLIGHT at once; (calls completed, seconds). Each call
    gets the next number of `numbers`, shared across runs."""
    done = 0
    async with grpc.aio.insecure_channel(address) as channel:
        await call(channel, next(numbers))  # connect and warm up
        started = time.perf_counter()
        deadline = started + SECONDS

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await call(channel, next(numbers))
                done += 1

        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        return done, time.perf_counter() - started


def _usage_counter(ours: Ours, outcome: str) -> float:
    return ours.counter("extauthz_usage_reports_total", f'outcome="{outcome}"')


def measure(ours: Ours, noop_port: int, key: str, key_id: str) -> list[Row]:
    tag = f"{time.time_ns():x}"
    numbers = itertools.count()
    metadata = payloads.bearer(USAGE_TOKEN)
    check = payloads.check_request(key)

    async def report(channel: grpc.aio.Channel, n: int) -> object:
        stub = keys_pb2_grpc.UsageServiceStub(channel)
        return await stub.ReportUsage(
            payloads.report_request(key_id, f"{tag}-{n}"), metadata=metadata, timeout=10
        )

    async def noop_check(channel: grpc.aio.Channel, n: int) -> object:
        return await external_auth_pb2_grpc.AuthorizationStub(channel).Check(check, timeout=10)

    unique = {"ours": [0, 0.0], "noop": [0, 0.0]}
    for _ in range(ROUNDS):
        before = _usage_counter(ours, "charged")
        calls, seconds = asyncio.run(_drive(numbers, ours.address, report))
        charged = _usage_counter(ours, "charged") - before
        if charged != calls + 1:  # + the warm-up call
            raise RuntimeError(f"ReportUsage: {calls + 1} unique calls, {charged} charged")
        unique["ours"][0] += calls
        unique["ours"][1] += seconds
        calls, seconds = asyncio.run(_drive(numbers, f"127.0.0.1:{noop_port}", noop_check))
        unique["noop"][0] += calls
        unique["noop"][1] += seconds
    ours_unique = unique["ours"][0] / unique["ours"][1]
    noop_unique = unique["noop"][0] / unique["noop"][1]

    duplicate = payloads.report_request(key_id, f"{tag}-duplicate")
    payloads.expect_reported(ours.address, USAGE_TOKEN, duplicate)
    targets = [
        compare.Target(
            "ours",
            f"http://127.0.0.1:{ours.grpc_port}{payloads.REPORT_PATH}",
            load.grpc_frame(duplicate.SerializeToString()),
            headers=(*load.GRPC_HEADERS, f"authorization: Bearer {USAGE_TOKEN}"),
            counter=lambda: _usage_counter(ours, "duplicate"),
        ),
        compare.Target("noop", check_url(noop_port), load.grpc_frame(check.SerializeToString())),
    ]
    dup = compare.alternate(
        targets, clients=SAT_CLIENTS, streams=SAT_STREAMS, seconds=SECONDS, rounds=ROUNDS
    )
    return [
        Row(
            "3",
            f"ReportUsage calls/s, unique request_ids (Python grpc.aio, {IN_FLIGHT} in flight)",
            f"{ours_unique:,.0f}",
            f"{noop_unique:,.0f} (no-op Check, same client)",
            ratio(ours_unique, noop_unique),
            data={"ours_rps": round(ours_unique, 1), "noop_rps": round(noop_unique, 1)},
        ),
        Row(
            "3",
            f"ReportUsage calls/s, one request_id: duplicates (h2load {SAT_CLIENTS}x{SAT_STREAMS})",
            f"{dup['ours'].rps:,.0f}",
            f"{dup['noop'].rps:,.0f} (no-op Check)",
            ratio(dup["ours"].rps, dup["noop"].rps),
            data={name: s.summary() for name, s in dup.items()},
        ),
    ]
