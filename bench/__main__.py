"""`make bench`: every row in one run on this machine, then one table (and its JSON in
bench/results/). See docs/performance.md for what each row measures."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import (
    attack_bench,
    check_bench,
    envoy_bench,
    keyspace_bench,
    ledger_bench,
    load,
    money_bench,
    money_redis_bench,
    noop_server,
    payloads,
    tap_bench,
    usage_bench,
    workers_bench,
)
from bench.stack import ADMIN_TOKEN, Stack
from bench.table import Row, render, write_json
from devstack import processes as p

RESULTS = p.ROOT / "bench" / "results"


def _version(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[-1].strip() if lines else "?"


def _envoy_version() -> str:
    """`envoy --version` ends in <sha>/<version>/<status>/<build>/<ssl>."""
    parts = _version([p.executable("envoy"), "--version"]).split()[-1].split("/")
    return parts[1] if len(parts) > 1 else parts[0]


def machine() -> dict[str, Any]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    commit = _version(["git", "-C", str(p.ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _version(["git", "-C", str(p.ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "loadavg_before": os.getloadavg()[0],
        "commit": commit + ("+dirty" if dirty not in ("", "?") else ""),
        "h2load": _version(["h2load", "--version"]),
        "redis": " ".join(_version([p.executable("redis-server"), "--version"]).split()[:3]),
        "envoy": _envoy_version(),
        "noop_loop": noop_server.default_loop(),
    }


def _step(name: str, started: float) -> None:
    print(f"[{time.monotonic() - started:6.1f}s] {name}", file=sys.stderr, flush=True)


def run(root: Path, started: float, only: set[str]) -> list[Row]:
    stack = Stack(root)
    rows: list[Row] = []
    try:
        redis = stack.redis("redis")
        ours = stack.ours(redis.url, "ours")
        noop_port, noop = stack.noop()
        key, key_id = payloads.create_key(ours.address, ADMIN_TOKEN)
        redis_pid = redis.process.proc.pid if redis.process else 0
        if "1" in only:
            _step("1: Check direct to the gRPC port", started)
            rows += check_bench.measure(ours, noop_port, noop.proc.pid, redis_pid, key)
        if "2" in only:
            _step("2: through Envoy", started)
            rows += envoy_bench.measure(stack, ours, key, noop_port)
        if "3" in only:
            _step("3: ReportUsage", started)
            rows += usage_bench.measure(ours, noop_port, key, key_id)
        if only & {"4", "5"}:
            _step("4-5: 1k vs 1M keys, memory per key", started)
            rows += keyspace_bench.measure(stack)
        if "6" in only:
            _step("6: 1 vs 2 workers", started)
            rows += workers_bench.measure(stack, redis.url)
        if "7" in only:
            _step("7: legitimate traffic under a made-up-key body flood", started)
            rows += attack_bench.measure_attack(stack, ours, key)
        if "8" in only:
            _step("8: unknown id vs wrong secret", started)
            rows += attack_bench.measure_timing(redis.url, key)
        if "9" in only:
            _step("9: the money path's cost per Check, vs the Check before it", started)
            rows += money_bench.measure(stack)
        if "10" in only:
            _step("10: check.lua and level_admit.lua in Redis, pipelined", started)
            rows += money_redis_bench.measure_scripts(stack)
        if "11" in only:
            _step("11: memory of open in-flight records, and reaping them", started)
            rows += money_redis_bench.measure_inflight(stack)
        if "12" in only:
            _step("12: the usage tap through Envoy, vs no tap and vs the Check", started)
            rows += tap_bench.measure(stack, ours, redis_pid, noop_port, noop.proc.pid)
        if "13" in only:
            _step("13: the ledger sink's charges/s, and the Check with it running vs not", started)
            rows += ledger_bench.measure(stack)
        _step("done", started)
        return rows
    finally:
        stack.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--only",
        default=",".join(str(n) for n in range(1, 14)),
        help="comma-separated rows to run (default: all)",
    )
    only = set(parser.parse_args(argv).only.split(","))
    try:
        load.h2load_binary()
    except FileNotFoundError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    meta = machine()
    root = Path(tempfile.mkdtemp(prefix="extauthz-bench-"))
    try:
        rows = run(root, started, only)
    except BaseException:
        print(f"bench: failed; process logs are in {root}", file=sys.stderr)
        raise
    shutil.rmtree(root, ignore_errors=True)
    meta["seconds"] = round(time.monotonic() - started, 1)
    meta["loadavg_after"] = os.getloadavg()[0]
    out = RESULTS / f"bench-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    write_json(out, rows, meta)
    print(
        f"\n{meta['nproc']} x {meta['cpu']}, Python {meta['python']}, Envoy {meta['envoy']}, "
        f"{meta['redis']}, no-op on {meta['noop_loop']}; "
        f"load average {meta['loadavg_before']:.1f} before, {meta['loadavg_after']:.1f} after; "
        f"{meta['seconds']}s\n"
    )
    print(render(rows))
    print(f"\n(written to {out.relative_to(p.ROOT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
