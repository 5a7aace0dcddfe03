"""Rows 10 and 11: the money path's Redis side, on fresh redis-servers, with the scripts
called directly and many EVALSHA calls in flight on one connection, so that Redis's one
thread is what limits the rate.

What is called is what the servers send. A server of ours (and, for the baseline, the
server at BASELINE_COMMIT) makes its keys and budgets through its own gRPC API and
answers one real Check while Redis's MONITOR watches; the EVALSHA it sent is then replayed
many times, each call with a fresh request token in place of the captured one. So the
rows follow the scripts' arguments, the records' fields and the reservation amount
wherever the product takes them. level_admit.lua is what a server sends on Redis Cluster:
it is captured from a server whose Redis is a one-node cluster (Stack.cluster_node).

Row 10: how many Checks one Redis thread runs per second, from Redis's own CPU time per
call (`/proc/<pid>/stat`, every thread, so reading commands and writing replies count
too), for
- baseline: check.lua at BASELINE_COMMIT (bench/baseline.py), before the money path;
- key: today's check.lua for a key alone ($1M budget; its user has no budget);
- parallel: a key with max_parallel 1,000,000,000 (ZCOUNT runs);
- team: that key with a team whose budget is inline (one Redis: the same call reserves at
  the team, checks its concurrency and counts the request there);
- level: level_admit.lua alone, what a team's shard runs per Check on Redis Cluster.
Each sample is CALLS calls; the variants alternate for ROUNDS rounds (ABBA). Every reply
must be an allow, and every call opens its own in-flight record, so the sets grow
through the run as they do when nobody reports.

Row 11: OPEN reservations through check.lua (key only, no reports): Redis's used_memory
growth per open record; then the clock passed to the script moves past the TTL and
Checks run until every expired record has been reaped (up to 64 per call): how many
calls that takes, and what each costs in Redis next to an ordinary Check.
"""

from __future__ import annotations

import math
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import hiredis
import redis as redis_sync

from bench import baseline, payloads
from bench.stack import ADMIN_TOKEN, Ours, Stack, cpu_seconds
from bench.table import Row, ratio
from keys import keyspace, scripts
from keys.resp import Endpoint, encode

CALLS = 10_000
ROUNDS = 4
BATCH = 500  # calls per write; one batch is always in flight while the last is read
OPEN = 200_000
REAP_MAX = 64  # keys/lua/_lib.lua
STEADY_RATE, STEADY_TTL_S = 1_000, 900  # a key at 1,000 requests/s whose reports never come
BUDGET_USD = 1_000_000.0
PARALLEL = 1_000_000_000
TEAM, SHARD_TEAM = "bench-team", "bench-team-shard"

Verify = Callable[[Any], None]  # raises unless the reply is the expected allow
# the request token KeyStore.check draws (secrets.token_hex(12)), alone or in a member
_TOKEN = re.compile(rb"(?<![0-9a-f])[0-9a-f]{24}(?![0-9a-f])")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {"n": b"\n", "r": b"\r", "t": b"\t", "a": b"\a", "b": b"\b", "\\": b"\\", '"': b'"'}


# --- what the servers send -------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One EVALSHA as a server sent it, to replay with other request tokens."""

    sha: bytes
    keys: tuple[bytes, ...]
    args: tuple[bytes, ...]
    token: bytes  # the captured call's request token (b"": it has none, as before)

    def encoded(self, n: int) -> bytes:
        """The call with request token number `n` (unique per call, 24 hex characters)."""
        token = b"%024x" % n
        args = [arg.replace(self.token, token) for arg in self.args] if self.token else self.args
        return encode([b"EVALSHA", self.sha, len(self.keys), *self.keys, *args])

    def at(self, now_ms: int) -> Call:
        """The same call with another clock: ARGV[2] of check.lua is `now`."""
        args = list(self.args)
        args[1] = str(now_ms).encode()
        return replace(self, args=tuple(args))


def _unrepr(text: str) -> bytes:
    """An argument as MONITOR prints it (Redis's sdscatrepr), back to its bytes."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] != "\\":
            out += text[i].encode()
            i += 1
        elif text[i + 1] == "x":
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            out += _ESCAPES[text[i + 1]]
            i += 2
    return bytes(out)


@contextmanager
def _monitor(url: str) -> Iterator[Callable[[], list[list[bytes]]]]:
    """MONITOR on `url` while the body runs; the function it yields returns every command
    seen so far (as argument lists), up to a marker it sends itself."""
    endpoint = Endpoint.from_url(url.replace("redis+cluster://", "redis://"))
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=10)
    client = redis_sync.Redis(host=endpoint.host, port=endpoint.port)
    try:
        sock.sendall(b"MONITOR\r\n")
        buffer = b""
        while b"\r\n" not in buffer:
            buffer += sock.recv(65536)
        buffer = buffer.split(b"\r\n", 1)[1]  # +OK

        def seen() -> list[list[bytes]]:
            nonlocal buffer
            marker = "bench-capture-" + secrets.token_hex(4)
            client.echo(marker)
            while marker.encode() not in buffer:
                buffer += sock.recv(65536)
            lines = buffer.decode("ascii").split("\r\n")
            return [[_unrepr(arg) for arg in _QUOTED.findall(line)] for line in lines]

        yield seen
    finally:
        client.close()
        sock.close()


def capture(url: str, sha: str, trigger: Callable[[], None], first_key: str | None = None) -> Call:
    """The last EVALSHA of `sha` (on `first_key`, if given) that `trigger` caused."""
    with _monitor(url) as seen:
        trigger()
        commands = seen()
    found = [
        c
        for c in commands
        if len(c) > 2
        and c[0].upper() == b"EVALSHA"
        and c[1] == sha.encode()
        and (first_key is None or c[3] == first_key.encode())
    ]
    if not found:
        raise RuntimeError(f"no EVALSHA {sha[:8]} seen")
    command = found[-1]
    count = int(command[2])
    keys, args = tuple(command[3 : 3 + count]), tuple(command[3 + count :])
    tokens = {t for arg in args for t in _TOKEN.findall(arg)}
    if len(tokens) > 1:
        raise RuntimeError(f"EVALSHA {sha[:8]}: {len(tokens)} request tokens in {args!r}")
    return Call(command[1], keys, args, tokens.pop() if tokens else b"")


def _checked(address: str, key: str) -> Callable[[], None]:
    request = payloads.check_request(key)
    return lambda: payloads.expect_allowed(address, request)


def capture_check(url: str, ours: Ours, key: str, sha: str = scripts.CHECK.sha) -> Call:
    return capture(url, sha, _checked(ours.address, key))


def _key(ours: Ours, **fields: Any) -> str:
    return _key_and_id(ours, **fields)[0]


def _key_and_id(ours: Ours, **fields: Any) -> tuple[str, str]:
    return payloads.create_key(ours.address, ADMIN_TOKEN, max_budget=BUDGET_USD, **fields)


def _team(ours: Ours, team_id: str) -> None:
    payloads.set_budget(
        ours.address,
        ADMIN_TOKEN,
        "team",
        team_id,
        max_budget=BUDGET_USD,
        max_parallel_requests=PARALLEL,
    )


def _stop(*servers: Ours) -> None:
    """The servers are done once their calls are captured: Redis then runs only ours."""
    for server in servers:
        for process in server.processes:
            process.stop()


# --- replaying them --------------------------------------------------------------------


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


def chunks(call: Call, first: int, calls: int) -> list[tuple[bytes, int]]:
    """Calls first..first+calls-1, encoded in advance (outside the measured time)."""
    out = []
    for start in range(first, first + calls, BATCH):
        end = min(start + BATCH, first + calls)
        out.append((b"".join(call.encoded(n) for n in range(start, end)), end - start))
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


class Replay:
    """A pipe to a redis-server, and a client for its readings."""

    def __init__(self, url: str, pid: int) -> None:
        self.pid = pid
        self.client = redis_sync.Redis.from_url(url, decode_responses=True)
        self.pipe = Pipe(url)

    def sample(self, call: Call, first: int, calls: int, verify: Verify) -> Sample:
        work = chunks(call, first, calls)
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


def _allowed(reply: Any) -> None:
    """check.lua's code 0 (allowed and counted), today's and the baseline's."""
    if int(reply[0]) != 0:
        raise RuntimeError(f"check.lua did not allow: {reply!r}")


def _level_admitted(reply: Any) -> None:
    """level_admit.lua: code 0, and `admitted` (its last field) 1."""
    if int(reply[0]) != 0 or int(reply[-1]) != 1:
        raise RuntimeError(f"level_admit.lua did not admit: {reply!r}")


# --- row 10 ----------------------------------------------------------------------------

LABELS = {
    "key": "check.lua, key only",
    "parallel": "  + max_parallel (ZCOUNT)",
    "team": "  + team budget inline",
    "level": "level_admit.lua alone (a team's shard, Cluster)",
}


def _calls(stack: Stack, url: str) -> dict[str, tuple[Call, Verify]]:
    """Each variant's call, captured from the servers (which are stopped afterwards)."""
    ours = stack.ours(url, "ours-scripts")
    tree = baseline.tree_in(stack.root)
    old = stack.ours(url, "baseline-scripts", env=baseline.python_path(tree))
    for team in (TEAM, SHARD_TEAM):  # SHARD_TEAM's record: for the replayed level_admit.lua
        _team(ours, team)
    old_key = payloads.create_key(old.address, ADMIN_TOKEN, max_budget=BUDGET_USD)[0]
    calls: dict[str, tuple[Call, Verify]] = {
        "baseline": (capture_check(url, old, old_key, baseline.check_script().sha), _allowed),
        "key": (capture_check(url, ours, _key(ours)), _allowed),
        "parallel": (
            capture_check(url, ours, _key(ours, max_parallel_requests=PARALLEL)),
            _allowed,
        ),
        "team": (
            capture_check(url, ours, _key(ours, max_parallel_requests=PARALLEL, team_id=TEAM)),
            _allowed,
        ),
    }
    cluster_url = stack.cluster_node("redis-cluster-node")
    shard = stack.ours(cluster_url, "ours-cluster")
    _team(shard, SHARD_TEAM)
    key = _key(shard, max_parallel_requests=PARALLEL, team_id=SHARD_TEAM)
    level = capture(
        cluster_url,
        scripts.LEVEL_ADMIT.sha,
        _checked(shard.address, key),
        first_key=keyspace.level_key("team", SHARD_TEAM),
    )
    calls["level"] = (level, _level_admitted)
    _stop(ours, old, shard)
    return calls


def _rate(us: float) -> str:
    return f"{1e6 / us:,.0f} ({us:.1f} us)"


def measure_scripts(stack: Stack) -> list[Row]:
    server = stack.redis("redis-scripts")
    assert server.process is not None
    calls = _calls(stack, server.url)
    replay = Replay(server.url, server.process.proc.pid)
    try:
        samples: dict[str, list[Sample]] = {name: [] for name in calls}
        n = 0
        names = list(calls)
        for call, verify in calls.values():  # warm-up
            replay.sample(call, n, 200, verify)
            n += 200
        for round_ in range(ROUNDS):
            for name in names if round_ % 2 == 0 else reversed(names):
                call, verify = calls[name]
                samples[name].append(replay.sample(call, n, CALLS, verify))
                n += CALLS
        inflight = {
            name: int(replay.client.zcard(keyspace.level_inflight_key("team", team)))
            for name, team in (("team (inline)", TEAM), ("team (level_admit)", SHARD_TEAM))
        }
    finally:
        replay.close()
    # CPU time summed over the rounds (a tick is 10 ms; one sample is ~50 ticks)
    cpu = {
        name: sum(s.cpu_s for s in runs) / sum(s.calls for s in runs) * 1e6
        for name, runs in samples.items()
    }
    data = {
        "redis_cpu_us_per_call": {k: round(v, 2) for k, v in cpu.items()},
        "script_us_per_call": {
            name: round(sum(s.script_us for s in runs) / len(runs), 2)
            for name, runs in samples.items()
        },
        "wall_calls_per_s": {
            name: round(sum(s.calls for s in runs) / sum(s.wall_s for s in runs))
            for name, runs in samples.items()
        },
        "calls_per_sample": CALLS,
        "rounds": ROUNDS,
        "arguments": {name: len(call.args) for name, (call, _) in calls.items()},
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


# --- row 11 ----------------------------------------------------------------------------


def measure_inflight(stack: Stack) -> list[Row]:
    server = stack.redis("redis-inflight")
    assert server.process is not None
    ours = stack.ours(server.url, "ours-inflight")
    key, key_id = _key_and_id(ours)
    call = capture_check(server.url, ours, key)  # that Check opened the set's first record
    _stop(ours)
    inflight, record = keyspace.inflight_key(key_id), keyspace.record_key(key_id)
    replay = Replay(server.url, server.process.proc.pid)
    amounts: set[int] = set()

    def opened(reply: Any) -> None:
        _allowed(reply)
        amounts.add(keyspace.reservation_amount(bytes(reply[8]).decode()))  # the request id

    try:
        before = replay.used_memory()
        fill = replay.sample(call, 1, OPEN, opened)
        grown = replay.used_memory() - before
        members = int(replay.client.zcard(inflight))
        set_bytes = int(replay.client.memory_usage(inflight, samples=0) or 0)
        if members != OPEN + 1 or len(amounts) != 1:
            raise RuntimeError(f"{members} open records of {len(amounts)} amounts")
        [amount] = amounts
        # the clock moves past every record's expiry: the next Checks reap them
        last = float(replay.client.zrange(inflight, -1, -1, withscores=True)[0][1])
        later = int(last) + 1
        calls = math.ceil(members / REAP_MAX)
        reaped: list[int] = []

        def counted(reply: Any) -> None:
            _allowed(reply)
            reaped.append(int(reply[9]))  # the reservations this call found expired

        reap = replay.sample(call.at(later), OPEN + 1, calls, counted)
        # the reaping Checks are allowed too: each opens its own (live) record
        expired_left = int(replay.client.zcount(inflight, "-inf", later))
        live = int(replay.client.zcard(inflight))
        reserved = int(replay.client.hget(record, "reserved") or 0)
        after_reap = replay.used_memory()
    finally:
        replay.close()
    if expired_left or sum(reaped) != members or live != calls or reserved != live * amount:
        raise RuntimeError(
            f"after {calls} reaping Checks: {sum(reaped)} of {members} reaped, {expired_left} "
            f"expired left, {live} open, reserved {reserved} (expected {live * amount})"
        )
    per_record = grown / OPEN
    steady = STEADY_RATE * STEADY_TTL_S
    data = {
        "open": OPEN,
        "used_memory_growth": grown,
        "bytes_per_record": round(per_record, 1),
        "memory_usage_of_set_per_member": round(set_bytes / members, 1),
        "reservation_nanos": amount,
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
