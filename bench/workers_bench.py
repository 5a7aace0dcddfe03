"""Row 6: one server process vs two sharing the gRPC port (grpc sets SO_REUSEPORT on
Linux, so the kernel spreads connections over both), and whether limits stay exact
when two processes share them through Redis."""

from __future__ import annotations

import asyncio
import time

import grpc

from bench import compare, load, payloads
from bench.check_bench import check_url
from bench.stack import ADMIN_TOKEN, USAGE_TOKEN, Ours, Stack, metric
from bench.table import Row, ratio
from keys.v1 import keys_pb2_grpc

CLIENTS, STREAMS = 16, 4  # many connections, so the kernel can spread them
SECONDS = 2.0
ROUNDS = 3
RPM, SENT = 200, 600
REPORTS, TOKENS, COST = 100, 20, 0.001


def _rpm_exact(ours: Ours) -> tuple[int, int]:
    """A key with rpm_limit RPM gets SENT Checks at once: (allowed, total_requests)."""
    key, key_id = payloads.create_key(ours.address, ADMIN_TOKEN, rpm_limit=RPM)
    frame = load.grpc_frame(payloads.check_request(key).SerializeToString())
    before = ours.allowed()
    load.run(
        check_url(ours.grpc_port),
        requests=SENT,
        clients=CLIENTS,
        streams=STREAMS,
        body=frame,
        headers=load.GRPC_HEADERS,
    )
    allowed = int(ours.allowed() - before)
    return allowed, payloads.get_key(ours.address, ADMIN_TOKEN, key_id).total_requests


def _usage_exact(ours: Ours) -> tuple[float, int]:
    """REPORTS unique reports, each sent twice at once, against a key whose tpm_limit is
    their token sum: (spent, HTTP status of the next Check, 429 when TPM is exact)."""
    key, key_id = payloads.create_key(ours.address, ADMIN_TOKEN, tpm_limit=REPORTS * TOKENS)
    tag = f"{time.time_ns():x}"

    async def send() -> None:
        async with grpc.aio.insecure_channel(ours.address) as channel:
            stub = keys_pb2_grpc.UsageServiceStub(channel)
            calls = [
                stub.ReportUsage(
                    payloads.report_request(
                        key_id,
                        f"{tag}-{n}",
                        prompt_tokens=TOKENS // 2,
                        completion_tokens=TOKENS // 2,
                        cost=COST,
                    ),
                    metadata=payloads.bearer(USAGE_TOKEN),
                    timeout=10,
                )
                for n in [*range(REPORTS), *range(REPORTS)]
            ]
            await asyncio.gather(*calls)

    asyncio.run(send())
    spent = payloads.get_key(ours.address, ADMIN_TOKEN, key_id).spent
    status = payloads.http_status(payloads.check(ours.address, payloads.check_request(key)))
    return spent, status


def measure(stack: Stack, redis_url: str) -> list[Row]:
    one = stack.ours(redis_url, "workers-1", workers=1)
    two = stack.ours(redis_url, "workers-2", workers=2)
    key, _ = payloads.create_key(one.address, ADMIN_TOKEN)
    request = payloads.check_request(key)
    payloads.expect_allowed(one.address, request)
    frame = load.grpc_frame(request.SerializeToString())
    targets = [
        compare.Target(name, check_url(o.grpc_port), frame, counter=o.allowed, pids=o.pids)
        for name, o in (("1 worker", one), ("2 workers", two))
    ]
    split_before = [
        metric(port, "extauthz_check_duration_seconds_count", 'decision="allow"')
        for port in two.http_ports
    ]
    got = compare.alternate(
        targets, clients=CLIENTS, streams=STREAMS, seconds=SECONDS, rounds=ROUNDS
    )
    split = [
        int(metric(port, "extauthz_check_duration_seconds_count", 'decision="allow"') - b)
        for port, b in zip(two.http_ports, split_before, strict=True)
    ]
    w1, w2 = got["1 worker"], got["2 workers"]
    exact = {name: _rpm_exact(o) for name, o in (("1", one), ("2", two))}
    spent, status = _usage_exact(two)
    rpm_ok = all(a == RPM and t == RPM for a, t in exact.values())
    usage_ok = abs(spent - REPORTS * COST) < 1e-9 and status == 429
    return [
        Row(
            "6",
            f"Check calls/s at saturation, 2 workers vs 1 ({CLIENTS} conns x {STREAMS})",
            f"{w2.rps:,.0f} (2; split {split[0]:,}/{split[1]:,})",
            f"{w1.rps:,.0f} (1)",
            ratio(w2.rps, w1.rps),
            data={"1": w1.summary(), "2": w2.summary(), "split": split},
        ),
        Row(
            "6",
            f"rpm_limit {RPM}, {SENT} Checks at once: allowed (1 / 2 workers)",
            f"{exact['2'][0]} (2)",
            f"{exact['1'][0]} (1)",
            "",
            f"== {RPM}",
            "exact" if rpm_ok else "WRONG",
            data={"allowed_total_requests": exact},
        ),
        Row(
            "6",
            f"2 workers: {REPORTS} reports sent twice: spent, next Check",
            f"${spent:.9f}, {status}",
            f"${REPORTS * COST:.3f}, 429 (tpm)",
            "",
            "equal",
            "exact" if usage_ok else "WRONG",
        ),
    ]
