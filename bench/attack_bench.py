"""Rows 7 and 8: what an unauthenticated attacker can cost legitimate traffic.

Row 7: one legitimate client sends chat completions through Envoy (the shipped
envoy.yaml) for a few seconds, alone, then while 12 attackers post 1 MiB JSON bodies
(an array of floats) with well-formed made-up keys as fast as Envoy takes them. The row
is the legitimate client's p50 and its failed requests, without and with the attack.

Row 8: Redis's time per check.lua call for an unknown key id next to a known id with a
wrong secret: the two must cost the same, or the timing tells which ids exist. (The
Python side runs the same code for both: the script is the only place they differ.)
"""

from __future__ import annotations

import http.client
import json
import random
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis as redis_sync

from bench import load
from bench.envoy_bench import render
from bench.payloads import CHAT_BODY, CHAT_PATH
from bench.stack import Ours, Stack
from bench.table import Row, verdict
from devstack import processes as p
from keys import keygen, keyspace, scripts

ATTACKERS = 12
SECONDS = 4.0
P50_TARGET = 2.0


def attack_body() -> bytes:
    """Just under 1 MiB of JSON (so Envoy forwards it whole): a model and an array of
    floats, the slowest thing to parse per byte."""
    rng = random.Random(7)
    floats = [rng.random() for _ in range(50_000)]  # under envoy.yaml's 1 MiB cap
    return json.dumps({"model": "text-embedding-3-small", "input": floats}).encode()


def _legit(port: int, key: str, seconds: float) -> tuple[list[float], int]:
    """One keep-alive client in a closed loop: latencies (ms) of successes, failures."""
    latencies: list[float] = []
    failed = 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            conn.request("POST", CHAT_PATH, body=CHAT_BODY, headers=headers)
            reply = conn.getresponse()
            reply.read()
            ok = reply.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        if ok:
            latencies.append((time.perf_counter() - started) * 1000)
        else:
            failed += 1
        time.sleep(0.02)  # a steady, light legitimate load
    conn.close()
    return latencies, failed


def _attack(port: int, seconds: float, body_file: Path) -> subprocess.Popen[bytes]:
    made_up = keygen.format_key("sk-mp", keygen.new_key_id(), keygen.new_secret())
    args = [
        # the attackers are remote in life: here their load generator yields the CPU to
        # the system under test (which still takes every request they send)
        "nice",
        "-n",
        "19",
        load.h2load_binary(),
        "--h1",
        "-c",
        str(ATTACKERS),
        "-D",
        str(int(seconds) + 1),
        "-t",
        "1",
        f"--data={body_file}",
        "-H",
        f"authorization: Bearer {made_up}",
        "-H",
        "content-type: application/json",
        f"http://127.0.0.1:{port}/v1/embeddings",
    ]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _p50(values: list[float]) -> float:
    return load.percentile(sorted(values), 50)


def measure_attack(stack: Stack, ours: Ours, key: str) -> list[Row]:
    upstream = stack.nginx()
    ports = {
        "listener": p.free_port(),
        "extauthz": ours.grpc_port,
        "extauthz_http": ours.http_ports[0],  # /ui: not measured
        "upstream": upstream,
        "admin": p.free_port(),
    }
    stack.envoy(render(ports, authz=True), ports["listener"], "envoy-attack")
    port = ports["listener"]
    _legit(port, key, 0.5)  # warm-up
    calm, calm_failed = _legit(port, key, SECONDS)
    with tempfile.TemporaryDirectory(prefix="bench-attack-") as tmp:
        body_file = Path(tmp) / "body.json"
        body_file.write_bytes(attack_body())
        attackers = _attack(port, SECONDS, body_file)
        try:
            time.sleep(0.5)  # let the attack ramp up
            result: dict[str, tuple[list[float], int]] = {}
            worker = threading.Thread(
                target=lambda: result.setdefault("x", _legit(port, key, SECONDS))
            )
            worker.start()
            worker.join()
        finally:
            attackers.kill()
            attackers.wait()
    stormy, stormy_failed = result["x"]
    ratio = _p50(stormy) / _p50(calm)
    ok = stormy_failed == 0 and ratio <= P50_TARGET
    return [
        Row(
            "7",
            f"legit p50 ms / failures under {ATTACKERS} attackers (1 MiB, made-up key)",
            f"{_p50(stormy):.2f} / {stormy_failed} of {len(stormy) + stormy_failed}",
            f"{_p50(calm):.2f} / {calm_failed} of {len(calm) + calm_failed} (no attack)",
            f"{ratio:.2f}x",
            f"<= {P50_TARGET}x, 0 failed",
            verdict(ok),
            data={
                "calm_p50_ms": round(_p50(calm), 3),
                "attack_p50_ms": round(_p50(stormy), 3),
                "calm_failed": calm_failed,
                "attack_failed": stormy_failed,
            },
        )
    ]


def _redis_us_per_check(redis_url: str, key: str, calls: int) -> float:
    """Redis's own time per check.lua call for `key` (INFO commandstats, evalsha), so
    network and client noise stay out of a difference of a few microseconds."""
    parsed = keygen.parse_key(key)
    assert parsed is not None
    client = redis_sync.Redis.from_url(redis_url)
    try:
        client.script_load(scripts.CHECK.text)
        args: list[str | int] = [parsed.digest, int(time.time() * 1000), 1, "gpt-4", 60_000, 0]
        client.config_resetstat()
        pipe = client.pipeline(transaction=False)
        for _ in range(calls):
            pipe.evalsha(scripts.CHECK.sha, 1, keyspace.record_key(parsed.key_id), *args)
        pipe.execute()
        stats = client.info("commandstats")["cmdstat_evalsha"]
        return float(stats["usec"]) / int(stats["calls"])
    finally:
        client.close()


def measure_timing(redis_url: str, key: str) -> list[Row]:
    parsed = keygen.parse_key(key)
    assert parsed is not None
    unknown = keygen.format_key("sk-mp", keygen.new_key_id(), keygen.new_secret())
    wrong = keygen.format_key("sk-mp", parsed.key_id, keygen.new_secret())
    unknown_us: list[float] = []
    wrong_us: list[float] = []
    for round_ in range(6):  # alternating, so drift favours neither
        for name, k in (
            (("u", unknown), ("w", wrong))
            if round_ % 2 == 0
            else (
                ("w", wrong),
                ("u", unknown),
            )
        ):
            (unknown_us if name == "u" else wrong_us).append(
                _redis_us_per_check(redis_url, k, 20_000)
            )
    a, b = statistics.median(unknown_us), statistics.median(wrong_us)
    gap = b - a
    return [
        Row(
            "8",
            "check.lua us/call in Redis: wrong secret for a known id vs unknown id",
            f"{b:.2f}",
            f"{a:.2f} (unknown id)",
            f"{gap:+.2f} us",
            "|gap| <= 1 us",
            verdict(abs(gap) <= 1),
            data={"unknown_us": unknown_us, "wrong_secret_us": wrong_us},
        )
    ]
