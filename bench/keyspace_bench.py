"""Rows 4 and 5: Check latency with 1,000 vs 1,000,000 keys in Redis, and Redis memory
per key.

Two Redis servers, each with its own server of ours: one holds 1,000 keys, the other
1,000,000. In each, one real key (CreateKey, then one Check) is the template for the
clones (bench/keyspace.py) and the key the Checks use. The memory per key is the
used_memory growth of the big one over its clones: record hash, index entries and
Redis's own per-key overhead, in the state a key is in after a Check.
"""

from __future__ import annotations

import time

import redis

from bench import compare, keyspace, load, payloads
from bench.check_bench import check_url
from bench.stack import ADMIN_TOKEN, Stack
from bench.table import Row, ratio, verdict

SMALL, LARGE = 1_000, 1_000_000
SECONDS = 2.0
ROUNDS = 4
LATENCY_TARGET = 1.1
MEMORY_TARGET = 1024


def measure(stack: Stack) -> list[Row]:
    targets = []
    memory: dict[str, float] = {}
    for name, total in (("1k", SMALL), ("1M", LARGE)):
        server = stack.redis(f"redis-{name}")
        ours = stack.ours(server.url, f"ours-{name}")
        key, key_id = payloads.create_key(ours.address, ADMIN_TOKEN)
        request = payloads.check_request(key)
        payloads.expect_allowed(ours.address, request)  # the template now has its window
        client = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            before = keyspace.used_memory(client)
            started = time.monotonic()
            keyspace.clone_keys(client, key_id, 0, total - 1)
            memory[f"load_{name}_s"] = round(time.monotonic() - started, 1)
            if total == LARGE:
                memory["bytes_per_key"] = (keyspace.used_memory(client) - before) / (total - 1)
                memory["record_bytes"] = keyspace.record_bytes(client)
            memory[f"dbsize_{name}"] = int(client.dbsize())
        finally:
            client.close()
        targets.append(
            compare.Target(
                name,
                check_url(ours.grpc_port),
                load.grpc_frame(request.SerializeToString()),
                counter=ours.allowed,
            )
        )
    got = compare.alternate(targets, clients=1, seconds=SECONDS, rounds=ROUNDS)
    small, large = got["1k"], got["1M"]
    share = large.p50_ms / small.p50_ms
    per_key = memory["bytes_per_key"]
    return [
        Row(
            "4",
            "Check p50 / p99 ms, concurrency 1: 1M keys vs 1k keys",
            f"{large.p50_ms:.2f} / {large.p99_ms:.2f} (1M)",
            f"{small.p50_ms:.2f} / {small.p99_ms:.2f} (1k)",
            ratio(large.p50_ms, small.p50_ms),
            f"<= {LATENCY_TARGET}x (p50)",
            verdict(share <= LATENCY_TARGET),
            data={"1M": large.summary(), "1k": small.summary(), **memory},
        ),
        Row(
            "5",
            "Redis bytes per idle key (record + indexes, after a Check)",
            f"{per_key:,.0f} (record alone {memory['record_bytes']:,.0f})",
            "",
            "",
            f"<= {MEMORY_TARGET}",
            verdict(per_key <= MEMORY_TARGET),
        ),
    ]
