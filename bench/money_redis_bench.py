"""Rows 10 and 11: the money path's Redis side, measured on fresh redis-servers with the
scripts called directly (no server of ours), many EVALSHA calls in flight on one
connection, so Redis's one thread is what limits the rate.

Row 10: how many Checks one Redis thread runs per second, from Redis's own CPU time per
call (`/proc/<pid>/stat`, every thread, so request parsing and reply writing count too),
for
- baseline: check.lua at BASELINE_COMMIT (bench/baseline.py), before the money path;
- key: today's check.lua for a key alone (a $1M budget, its user without a budget, as
  the server sends it on one Redis);
- parallel: that key with max_parallel 1,000,000,000 (ZCOUNT runs);
- team: the parallel key, with its team's budget inline (the same call also reserves at
  the team, checks its concurrency and counts the request there);
- level: level_admit.lua alone, what a team's shard runs per Check on Redis Cluster.
Each sample is CALLS calls; the variants alternate for ROUNDS rounds (ABBA). Every call
is an allow (checked), with a fresh request id, so in-flight sets grow through the run
as they do when nobody reports.

Row 11: OPEN reservations through check.lua (key only, no reports): Redis's used_memory
growth per open record; then the clock passed to the script moves past the TTL and
Checks run until every expired record has been reaped (up to 64 per call): how many
calls that takes and what each costs in Redis next to an ordinary Check.
"""

from __future__ import annotations

import math
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import redis as redis_sync

from bench import baseline
from bench.payloads import CHAT_BODY
from bench.stack import Stack, cpu_seconds
from bench.table import Row, ratio
from extauthz.request import requested_model
from keys import keygen, keyspace, scripts
from keys.budget import NO_PERIOD, first_reset_ms, next_month_start_ms
from keys.model import WINDOW_MS, KeySpec
from keys.money import usd_to_nanos
from keys.pricing import PriceTable
from keys.reservation import estimate
from keys.resp import Arg, Endpoint, encode
from keys.scripts import Script

CALLS = 10_000
ROUNDS = 4
BATCH = 500  # calls per write; one batch is always in flight while the last is read
OPEN = 200_000
TTL_MS = 900_000  # EXTAUTHZ_RESERVATION_TTL_SECONDS' default
REAP_MAX = 64  # keys/lua/_lib.lua
STEADY_RATE, STEADY_TTL_S = 1_000, 900  # a key at 1,000 requests/s whose reports never come
BUDGET = usd_to_nanos(1_000_000)
PARALLEL = 1_000_000_000
USER, TEAM, CLUSTER_TEAM = "bench-user", "bench-team", "bench-team-shard"
MODEL = "gpt-4o-mini"

Command = Callable[[int, int], bytes]  # (call number, now ms) -> one EVALSHA, encoded
Verify = Callable[[Any], None]  # raises unless the reply is the expected allow


def reservation_nanos() -> int:
    """What the server reserves for the bench's chat body (the same code path)."""
    model = requested_model(CHAT_BODY, {"content-type": "application/json"})
    return estimate(PriceTable.builtin(), model, 4096).amount_nanos


AMOUNT = reservation_nanos()


def _token(n: int) -> str:
    """24 hex characters, as secrets.token_hex(12) in KeyStore.check, unique per call."""
    return f"{n:024x}"


class Pipe:
    """One connection with many calls in flight: keys/resp.py's encoding, hiredis's
    parser. Blocking, and as light per call as the client can be, so Redis is the limit."""

    def __init__(self, url: str) -> None:
        endpoint = Endpoint.from_url(url)
        self.sock = socket.create_connection((endpoint.host, endpoint.port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()

    def run(self, chunks: Sequence[tuple[bytes, int]]) -> list[Any]:
        """Sends each chunk (encoded commands, how many) and reads every reply; one chunk
        stays in flight while the replies to the one before are read."""
        replies: list[Any] = []
        sent = 0
        for payload, count in chunks:
            self.sock.sendall(payload)
            self._read(replies, sent)
            sent += count
        self._read(replies, sent)
        return replies

    def _read(self, replies: list[Any], count: int) -> None:
        while len(replies) < count:
            reply = self.reader.gets()
            if reply is False:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise ConnectionError("redis closed the connection")
                self.reader.feed(data)
            elif isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(f"redis: {reply}")
            else:
                replies.append(reply)

    def close(self) -> None:
        self.sock.close()


def chunks(command: Command, first: int, calls: int, now_ms: int) -> list[tuple[bytes, int]]:
    """Calls first..first+calls-1, encoded in advance (outside the measured time)."""
    out = []
    for start in range(first, first + calls, BATCH):
        end = min(start + BATCH, first + calls)
        out.append((b"".join(command(n, now_ms) for n in range(start, end)), end - start))
    return out


@dataclass
class Sample:
    calls: int
    wall_s: float
    cpu_s: float  # redis-server's, every thread
    script_us: float  # INFO commandstats: evalsha usec / calls (the script alone)

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.calls * 1e6


class Bench:
    """A fresh redis-server, a pipe to it, and a sync client for setup and readings."""

    def __init__(self, stack: Stack, name: str) -> None:
        self.server = stack.redis(name)
        assert self.server.process is not None
        self.pid = self.server.process.proc.pid
        self.client = redis_sync.Redis.from_url(self.server.url, decode_responses=True)
        self.pipe = Pipe(self.server.url)

    def load(self, script: Script) -> None:
        if self.client.script_load(script.text) != script.sha:
            raise RuntimeError(f"{script.name}: Redis computed another SHA1")

    def key(self, *, team_id: str = "", max_parallel: int = 0, old: bool = False) -> str:
        """A key record as CreateKey writes it (keyspace.new_record); `old`: without the
        fields the money path added, as BASELINE_COMMIT wrote it. Returns its id; the
        digest is _digest(id)."""
        key_id = keygen.new_key_id()
        now = int(time.time() * 1000)
        spec = KeySpec(
            name="bench",
            user_id=USER,
            team_id=team_id,
            expires_at_ms=now + 30 * 86_400_000,
            allowed_models=(),
            max_budget_nanos=BUDGET,
            tpm_limit=0,
            rpm_limit=0,
            max_parallel=max_parallel,
        )
        record = keyspace.new_record(spec, _digest(key_id), now)
        if old:
            for field in ("reserved", "max_parallel", "enforce"):
                del record[field]
        self.client.hset(keyspace.record_key(key_id), items=keyspace.flatten(record))
        return key_id

    def team_budget(self, team_id: str) -> None:
        """SetBudget's script: a large budget and a large max_parallel."""
        now = int(time.time() * 1000)
        args: list[Arg] = [now, BUDGET, "", 0, first_reset_ms(NO_PERIOD, now), 0, 0, PARALLEL]
        self.client.eval(scripts.SET_BUDGET.text, 1, keyspace.level_key("team", team_id), *args)

    def sample(self, command: Command, first: int, calls: int, verify: Verify) -> Sample:
        work = chunks(command, first, calls, int(time.time() * 1000))
        self.client.config_resetstat()
        cpu = cpu_seconds([self.pid])
        started = time.perf_counter()
        replies = self.pipe.run(work)
        wall = time.perf_counter() - started
        cpu = cpu_seconds([self.pid]) - cpu
        stats = self.client.info("commandstats")["cmdstat_evalsha"]
        for reply in replies:
            verify(reply)
        return Sample(calls, wall, cpu, float(stats["usec"]) / int(stats["calls"]))

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def close(self) -> None:
        self.pipe.close()
        self.client.close()


def _digest(key_id: str) -> str:
    """A fixed 64-hex digest per id: the records are written here, not by CreateKey, so
    any digest will do as long as the calls present the same one."""
    return keygen.digest(f"bench-{key_id}")


def _allowed(reply: Any) -> None:
    if int(reply[0]) != 0:
        raise RuntimeError(f"check.lua did not allow: {reply!r}")


def _level_admitted(reply: Any) -> None:
    if int(reply[0]) != 0 or int(reply[5]) != 1:
        raise RuntimeError(f"level_admit.lua did not admit: {reply!r}")


def old_check(script: Script, key_id: str) -> Command:
    """check.lua at BASELINE_COMMIT: KEYS the record; ARGV digest, now, kind, model,
    window, next month."""
    head = [keyspace.record_key(key_id)]
    digest = _digest(key_id)

    def command(_: int, now: int) -> bytes:
        args: list[Arg] = [digest, now, 1, MODEL, WINDOW_MS, next_month_start_ms(now)]
        return encode(["EVALSHA", script.sha, len(head), *head, *args])

    return command


def check(key_id: str, team_id: str = "") -> Command:
    """Today's check.lua as KeyStore.check sends it on one Redis (levels inline)."""
    head = [
        keyspace.record_key(key_id),
        keyspace.inflight_key(key_id),
        keyspace.model_windows_key(key_id),
        keyspace.level_key("user", USER),
        keyspace.level_inflight_key("user", USER),
    ]
    if team_id:
        head += [keyspace.level_key("team", team_id), keyspace.level_inflight_key("team", team_id)]
    digest = _digest(key_id)

    def command(n: int, now: int) -> bytes:
        args: list[Arg] = [
            digest,
            now,
            1,
            MODEL,
            WINDOW_MS,
            next_month_start_ms(now),
            _token(n),
            AMOUNT,
            1,
            TTL_MS,
            "inline",
            USER,
            team_id,
            "reserve",
        ]
        return encode(["EVALSHA", scripts.CHECK.sha, len(head), *head, *args])

    return command


def level_admit(team_id: str) -> Command:
    """level_admit.lua for a team's budget, as KeyStore._admit_levels sends it."""
    head = [keyspace.level_key("team", team_id), keyspace.level_inflight_key("team", team_id)]

    def command(n: int, now: int) -> bytes:
        request_id = keyspace.reservation_id(_token(n), AMOUNT)
        args: list[Arg] = [now, WINDOW_MS, next_month_start_ms(now), request_id, AMOUNT, TTL_MS]
        args += [1, "reserve", 1]
        return encode(["EVALSHA", scripts.LEVEL_ADMIT.sha, len(head), *head, *args])

    return command


LABELS = {
    "key": "check.lua, key only",
    "parallel": "  + max_parallel (ZCOUNT)",
    "team": "  + team budget inline",
    "level": "level_admit.lua alone (a team's shard, Cluster)",
}


def _rate(us: float) -> str:
    return f"{1e6 / us:,.0f} ({us:.1f} us)"


def measure_scripts(stack: Stack) -> list[Row]:
    bench = Bench(stack, "redis-scripts")
    try:
        old = baseline.check_script()
        for loaded in (old, scripts.CHECK, scripts.LEVEL_ADMIT):
            bench.load(loaded)
        for team in (TEAM, CLUSTER_TEAM):
            bench.team_budget(team)
        variants: dict[str, tuple[Command, Verify]] = {
            "baseline": (old_check(old, bench.key(old=True)), _allowed),
            "key": (check(bench.key()), _allowed),
            "parallel": (check(bench.key(max_parallel=PARALLEL)), _allowed),
            "team": (check(bench.key(max_parallel=PARALLEL, team_id=TEAM), TEAM), _allowed),
            "level": (level_admit(CLUSTER_TEAM), _level_admitted),
        }
        samples: dict[str, list[Sample]] = {name: [] for name in variants}
        calls = 0
        names = list(variants)
        for command, verify in variants.values():  # warm-up: sets created
            bench.sample(command, calls, 200, verify)
            calls += 200
        for round_ in range(ROUNDS):
            for name in names if round_ % 2 == 0 else reversed(names):
                command, verify = variants[name]
                samples[name].append(bench.sample(command, calls, CALLS, verify))
                calls += CALLS
        inflight = {
            "team (inline)": int(bench.client.zcard(keyspace.level_inflight_key("team", TEAM))),
            "team (level_admit)": int(
                bench.client.zcard(keyspace.level_inflight_key("team", CLUSTER_TEAM))
            ),
        }
    finally:
        bench.close()
    # CPU time summed over the rounds (a tick is 10 ms; one sample is ~60 ticks)
    cpu = {
        name: sum(s.cpu_s for s in runs) / sum(s.calls for s in runs) * 1e6
        for name, runs in samples.items()
    }
    script = {name: statistics.median(s.script_us for s in runs) for name, runs in samples.items()}
    wall = {
        name: sum(s.calls for s in runs) / sum(s.wall_s for s in runs)
        for name, runs in samples.items()
    }
    data = {
        "redis_cpu_us_per_call": {k: round(v, 2) for k, v in cpu.items()},
        "script_us_per_call": {k: round(v, 2) for k, v in script.items()},
        "wall_calls_per_s": {k: round(v) for k, v in wall.items()},
        "calls_per_sample": CALLS,
        "rounds": ROUNDS,
        "reservation_nanos": AMOUNT,
        "open_inflight_after": inflight,
    }
    rows = []
    for name, label in LABELS.items():
        first = name == "key"
        rows.append(
            Row(
                "10",
                (f"Redis calls/s per core (CPU us/call), pipelined: {label}" if first else label),
                _rate(cpu[name]),
                f"{_rate(cpu['baseline'])} ({baseline.BASELINE_COMMIT} check.lua)",
                ratio(1 / cpu[name], 1 / cpu["baseline"]),
                data=data if first else {},
            )
        )
    return rows


def measure_inflight(stack: Stack) -> list[Row]:
    bench = Bench(stack, "redis-inflight")
    try:
        bench.load(scripts.CHECK)
        key_id = bench.key()
        command = check(key_id)
        record, inflight = keyspace.record_key(key_id), keyspace.inflight_key(key_id)
        bench.sample(command, 0, 1, _allowed)  # the set exists, the script is compiled
        before = bench.used_memory()
        fill = bench.sample(command, 1, OPEN, _allowed)
        grown = bench.used_memory() - before
        members = int(bench.client.zcard(inflight))
        set_bytes = int(bench.client.memory_usage(inflight, samples=0) or 0)
        if members != OPEN + 1:
            raise RuntimeError(f"{members} open records, expected {OPEN + 1}")
        # the clock moves past every record's expiry: the next Checks reap them
        last = float(bench.client.zrange(inflight, -1, -1, withscores=True)[0][1])
        later = int(last) + 1
        calls = math.ceil(members / REAP_MAX)
        reaper = _at(command, later)
        reaped: list[int] = []

        def counted(reply: Any) -> None:
            _allowed(reply)
            reaped.append(int(reply[9]))  # the reservations this call found expired

        reap = bench.sample(reaper, OPEN + 1, calls, counted)
        # the reaping Checks are allowed too: each opens its own (live) record
        expired_left = int(bench.client.zcount(inflight, "-inf", later))
        live = int(bench.client.zcard(inflight))
        reserved = int(bench.client.hget(record, "reserved") or 0)
        after_reap = bench.used_memory()
    finally:
        bench.close()
    if expired_left or sum(reaped) != members or live != calls or reserved != live * AMOUNT:
        raise RuntimeError(
            f"after {calls} reaping Checks: {sum(reaped)} of {members} reaped, {expired_left} "
            f"expired left, {live} open, reserved {reserved} (expected {live * AMOUNT})"
        )
    per_record = grown / OPEN
    steady = STEADY_RATE * STEADY_TTL_S
    data = {
        "open": OPEN,
        "used_memory_growth": grown,
        "bytes_per_record": round(per_record, 1),
        "memory_usage_of_set_per_member": round(set_bytes / members, 1),
        "reservation_nanos": AMOUNT,
        "fill_redis_cpu_us_per_call": round(fill.cpu_us, 2),
        "fill_script_us_per_call": round(fill.script_us, 2),
        "reap_calls": calls,
        "reap_redis_cpu_us_per_call": round(reap.cpu_us, 2),
        "reap_script_us_per_call": round(reap.script_us, 2),
        "reap_redis_ms": round(reap.cpu_s * 1000, 1),
        "used_memory_freed_by_reap": before + grown - after_reap,
        "steady_records": steady,
        "steady_mb": round(steady * per_record / 1e6, 1),
    }
    return [
        Row(
            "11",
            f"Redis bytes per open in-flight record ({OPEN:,} open, no reports)",
            f"{per_record:,.0f}",
            "",
            "",
            data=data,
        ),
        Row(
            "11",
            f"  at {STEADY_RATE:,} req/s x {STEADY_TTL_S} s TTL, unreported: one level holds",
            f"{steady:,} records, {steady * per_record / 1e6:,.0f} MB",
            "",
            "",
        ),
        Row(
            "11",
            f"  reaping {members:,} expired: Checks, Redis CPU us each (total ms)",
            f"{calls:,}, {reap.cpu_us:.1f} ({reap.cpu_s * 1000:,.0f} ms)",
            f"{fill.cpu_us:.1f} (a Check that reaps nothing)",
            ratio(reap.cpu_us, fill.cpu_us),
        ),
    ]


def _at(command: Command, now_ms: int) -> Command:
    """The same calls at a fixed clock (the script's `now` is the caller's)."""
    return lambda n, _: command(n, now_ms)
