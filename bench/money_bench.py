"""Row 9: what the money path costs a Check through the server's gRPC port.

Four targets, alternating in one run with row 1's saturation load (same connections,
streams, seconds and rounds), each with a key whose budget is $1,000,000 and no RPM or
TPM limit, so every call is an allow:

- baseline: today's Check as it was before the money path (bench/baseline.py: the
  server at BASELINE_COMMIT, its own Redis);
- key: ours, the key alone: every allow reserves and opens an in-flight record;
- parallel: the key with max_parallel_requests 1,000,000,000 (never full; ZCOUNT runs);
- team: the parallel key with a team_id whose team has a budget (BudgetService; large
  budget, large max_parallel): the key and the team in one check.lua call.

The three of ours share one server and one Redis. Nothing reports usage, so in-flight
records pile up during the run (every allow's, for the TTL): the "nobody reports" case.
"""

from __future__ import annotations

from typing import Any

import redis as redis_sync

from bench import baseline, compare, load, payloads
from bench.check_bench import ROUNDS, SAT_CLIENTS, SAT_STREAMS, SECONDS, check_url
from bench.stack import ADMIN_TOKEN, Ours, Stack
from bench.table import Row, ratio, verdict
from keys import keyspace

BUDGET_USD = 1_000_000.0
PARALLEL = 1_000_000_000
TEAM = "bench-team"
TARGET = 0.9  # key-only Check vs the baseline, calls/s at saturation

LABELS = {
    "key": "key only, $1M budget",
    "parallel": "+ max_parallel 1e9 (ZCOUNT)",
    "team": "+ team budget inline (key + team, one script)",
}


def _target(name: str, ours: Ours, redis_pid: int, key: str) -> compare.Target:
    request = payloads.check_request(key)
    payloads.expect_allowed(ours.address, request)
    return compare.Target(
        name,
        check_url(ours.grpc_port),
        load.grpc_frame(request.SerializeToString()),
        counter=ours.allowed,
        pids=ours.pids,
        other_pids=(redis_pid,),
    )


def _inflight(redis_url: str, members: dict[str, str]) -> dict[str, int]:
    """Open in-flight records per set after the runs (each allow opened one per level)."""
    client = redis_sync.Redis.from_url(redis_url)
    try:
        return {name: int(client.zcard(key)) for name, key in members.items()}
    finally:
        client.close()


def _cpu(s: compare.Series) -> str:
    return f"{s.cpu_us_per_call:.0f} (+{s.other_cpu_us_per_call:.0f})"


def measure(stack: Stack) -> list[Row]:
    tree = baseline.tree_in(stack.root)
    imports = baseline.verify_imports(tree)
    old_redis = stack.redis("redis-baseline")
    old = stack.ours(old_redis.url, "ours-baseline", env=baseline.python_path(tree))
    old_key, old_id = payloads.create_key(old.address, ADMIN_TOKEN, max_budget=BUDGET_USD)

    redis = stack.redis("redis-money")
    ours = stack.ours(redis.url, "ours-money")
    payloads.set_budget(
        ours.address,
        ADMIN_TOKEN,
        "team",
        TEAM,
        max_budget=BUDGET_USD,
        max_parallel_requests=PARALLEL,
    )
    keys = {
        "key": payloads.create_key(ours.address, ADMIN_TOKEN, max_budget=BUDGET_USD),
        "parallel": payloads.create_key(
            ours.address, ADMIN_TOKEN, max_budget=BUDGET_USD, max_parallel_requests=PARALLEL
        ),
        "team": payloads.create_key(
            ours.address,
            ADMIN_TOKEN,
            max_budget=BUDGET_USD,
            max_parallel_requests=PARALLEL,
            team_id=TEAM,
        ),
    }
    assert old_redis.process is not None and redis.process is not None
    targets = [_target("baseline", old, old_redis.process.proc.pid, old_key)]
    baseline.verify_server(old_redis.url, old_id)  # after the Check expect_allowed sent
    targets += [_target(name, ours, redis.process.proc.pid, key) for name, (key, _) in keys.items()]
    got = compare.alternate(
        targets, clients=SAT_CLIENTS, streams=SAT_STREAMS, seconds=SECONDS, rounds=ROUNDS
    )
    inflight = _inflight(
        redis.url,
        {
            **{name: keyspace.inflight_key(key_id) for name, (_, key_id) in keys.items()},
            "team budget": keyspace.level_inflight_key("team", TEAM),
        },
    )
    base = got["baseline"]
    # each round's ratio too: a burst of load from elsewhere moves one round, not all
    per_round = {
        name: [round(r.rps / b.rps, 3) for r, b in zip(got[name].runs, base.runs, strict=True)]
        for name in LABELS
    }
    data: dict[str, Any] = {name: s.summary() for name, s in got.items()}
    data.update(
        baseline=baseline.BASELINE_COMMIT,
        imports=imports,
        open_inflight=inflight,
        round_ratios=per_round,
    )
    sat = f"{SAT_CLIENTS}x{SAT_STREAMS}"
    rows = []
    for name, label in LABELS.items():
        s = got[name]
        share = s.rps / base.rps
        rows.append(
            Row(
                "9",
                f"Check calls/s at saturation ({sat}), {label}" if name == "key" else f"  {label}",
                f"{s.rps:,.0f}",
                f"{base.rps:,.0f} ({baseline.BASELINE_COMMIT}, before)",
                f"{share:.2f}x ({min(per_round[name]):.2f}-{max(per_round[name]):.2f})",
                f">= {TARGET}x" if name == "key" else "",
                verdict(share >= TARGET) if name == "key" else "",
                data=data if name == "key" else {},
            )
        )
    rows.append(
        Row(
            "9",
            "server CPU (+Redis) per Check, us: key / +parallel / +team",
            " / ".join(_cpu(got[name]) for name in LABELS),
            _cpu(base),
            ratio(got["key"].cpu_us_per_call, base.cpu_us_per_call),
        )
    )
    return rows
