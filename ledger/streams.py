"""The Redis side of the sink: finding the `ledger:{<tag>}` streams, the consumer group,
reading, claiming, acknowledging, and how far behind the group is.

One stream per Cluster slot that has keys (one, `ledger:{all}`, on a single Redis). On a
single Redis one XREADGROUP blocks on all of them; on a cluster the streams sit on
different nodes and slots, so each is read without blocking (pipelined, one round trip
per node) and an empty round waits before the next.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from keys import keygen
from keys.connection import Client
from keys.keyspace import record_key
from keys.stream_groups import create_groups, forget_idle_consumers
from ledger.entries import Entry, EntryRef, parse

GROUP: Final = "ledger"
STREAM_MATCH: Final = "ledger:{*}"
RECORD_MATCH: Final = "vk:{*}"
# A consumer with nothing pending and idle this long is a sink that is gone: its name is
# dropped from the group (a live one is re-created by its next read).
SCAN_COUNT: Final = 1000


@dataclass
class Streams:
    client: Client
    consumer: str
    batch: int = 500
    block_ms: int = 1000
    claim_idle_ms: int = 30_000
    known: list[str] = field(default_factory=list)
    _next_stream: int = 0  # on a cluster, where the next read's round of streams starts

    @property
    def cluster(self) -> bool:
        return isinstance(self.client, RedisCluster)

    async def scan(self) -> list[str]:
        """Every ledger stream on every primary. A walk of the whole keyspace (1000 keys a
        call): the reason rescans are seconds apart (`--rescan-seconds`)."""
        found = self.client.scan_iter(match=STREAM_MATCH, count=SCAN_COUNT, _type="stream")
        return sorted({name async for name in found})

    async def discover(self) -> list[str]:
        """Finds the streams and gives each new one the group, created at the stream's
        first entry: nothing written before the sink first ran is skipped."""
        found = await self.scan()
        await create_groups(self.client, [name for name in found if name not in self.known], GROUP)
        self.known = found
        return found

    async def take_over(self) -> None:
        """Makes this consumer the owner of every entry another consumer (a sink that died
        between reading and acknowledging) has left pending for `claim_idle_ms`; `own()`
        then reads them. One pipelined XAUTOCLAIM per stream, more only where a stream has
        more than a batch to claim."""
        cursors = dict.fromkeys(self.known, "0-0")
        while cursors:
            pipe = self.client.pipeline()
            for stream, cursor in cursors.items():
                pipe.xautoclaim(
                    stream, GROUP, self.consumer, self.claim_idle_ms, cursor, count=self.batch
                )
            replies = await pipe.execute()
            cursors = {
                stream: str(reply[0])
                for stream, reply in zip(cursors, replies, strict=True)
                if str(reply[0]) != "0-0"
            }

    async def forget_idle_consumers(self) -> None:
        """Drops the names of sinks that stopped (a live one is re-created by its next
        read)."""
        await forget_idle_consumers(self.client, self.known, GROUP, self.consumer)

    async def own(self) -> list[Entry]:
        """Entries delivered to this consumer and not acknowledged: after a restart under
        the same name, a claim, or a reply lost with a connection."""
        if not self.known:
            return []
        if self.cluster:
            return await self._read_each("0")
        reply = await self.client.xreadgroup(
            GROUP, self.consumer, dict.fromkeys(self.known, "0"), count=self.batch
        )
        return _entries(reply)

    async def read(self, stop: asyncio.Event) -> list[Entry]:
        """New entries, waiting up to `block_ms` for some."""
        if not self.known:
            await _wait(stop, self.block_ms / 1000)
            return []
        if self.cluster:
            entries = await self._read_each(">")
            if not entries:
                await _wait(stop, self.block_ms / 1000)
            return entries
        reply = await self.client.xreadgroup(
            GROUP,
            self.consumer,
            dict.fromkeys(self.known, ">"),
            count=self.batch,
            block=self.block_ms,
        )
        return _entries(reply)

    async def _read_each(self, position: str) -> list[Entry]:
        """At most `batch` entries in all, however many streams there are (after an
        outage nearly every slot's stream has a backlog): `batch // streams` from each
        (at least 1) of up to `batch` streams a round, the rounds going round the streams
        so that each is read in turn; the first round that finds entries returns them."""
        names = self.known
        per_stream = max(1, self.batch // len(names))
        window = max(1, self.batch // per_stream)
        for _ in range(0, len(names), window):
            start = self._next_stream % len(names)
            part = (names[start:] + names[:start])[:window]
            self._next_stream = start + len(part)
            pipe = self.client.pipeline()
            for stream in part:
                pipe.xreadgroup(GROUP, self.consumer, {stream: position}, count=per_stream)
            entries = [entry for reply in await pipe.execute() for entry in _entries(reply)]
            if entries:
                return entries
        return []

    async def done(self, refs: Iterable[EntryRef]) -> None:
        """After the commit: XDEL, then XACK. Killed in between, the entry is pending
        with no content, which the next read acknowledges (a `Gone` entry); the other
        order would leave acknowledged entries in the stream for good."""
        by_stream: dict[str, list[str]] = {}
        for ref in refs:
            by_stream.setdefault(ref.stream, []).append(ref.entry_id)
        if not by_stream:
            return
        pipe = self.client.pipeline()
        for stream, ids in by_stream.items():
            pipe.xdel(stream, *ids)
        for stream, ids in by_stream.items():
            pipe.xack(stream, GROUP, *ids)
        await pipe.execute()

    async def lag(self, streams: Sequence[str] | None = None) -> int:
        """Entries not yet in the ledger: pending (delivered, not acknowledged) plus not
        yet delivered, over `streams` (default: a fresh scan). Where Redis cannot say how
        many are undelivered (XINFO's `lag` is nil after some deletions) or there is no
        group yet, the stream's length stands in: every written entry is deleted, so what
        is left is what is not written yet."""
        names = await self.scan() if streams is None else list(streams)
        if not names:
            return 0
        pipe = self.client.pipeline()
        for name in names:
            pipe.xinfo_groups(name)
            pipe.xlen(name)
        replies = await pipe.execute(raise_on_error=False)
        total = 0
        for groups, length in zip(replies[::2], replies[1::2], strict=True):
            if isinstance(groups, Exception) or isinstance(length, Exception):
                if isinstance(groups, ResponseError) and "no such key" in str(groups).lower():
                    continue  # deleted since the scan
                raise groups if isinstance(groups, Exception) else length
            group = next((g for g in groups if str(g["name"]) == GROUP), None)
            if group is None or group.get("lag") is None:
                total += int(length)
            else:
                total += int(group["pending"]) + int(group["lag"])
        return total

    async def record(self, key_id: str) -> dict[str, str] | None:
        """A key's record as Redis has it now, or None once the key is deleted."""
        fields: dict[str, str] = await self.client.hgetall(record_key(key_id))  # type: ignore[assignment]
        return fields or None


async def key_ids(client: Client) -> list[str]:
    """Every key with a record in Redis (scanned, on every primary: the indexes can miss a
    key whose CreateKey stopped between record and index)."""
    found = set()
    async for name in client.scan_iter(match=RECORD_MATCH, count=SCAN_COUNT, _type="hash"):
        inner = name[len("vk:{") : -1] if name.endswith("}") else ""
        if keygen.is_key_id(inner):
            found.add(inner)
    return sorted(found)


async def spent_totals(client: Client, ids: Sequence[str], chunk: int = 1000) -> dict[str, int]:
    """Each key's lifetime spend (`spent_total`, nano-USD); absent for a key deleted since."""
    totals: dict[str, int] = {}
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        pipe = client.pipeline()
        for key_id in part:
            pipe.hmget(record_key(key_id), ["spent_total", "hash"])
        for key_id, (spent, digest) in zip(part, await pipe.execute(), strict=True):
            if digest is not None:  # the record still exists
                totals[key_id] = int(spent or 0)
    return totals


def _entries(reply: Any) -> list[Entry]:
    """XREADGROUP's reply (RESP2 list or RESP3 map) as entries, in stream order."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    out: list[Entry] = []
    for stream, messages in pairs:
        if isinstance(reply, dict):  # RESP3: [[(id, fields), ...]]
            messages = messages[0] if messages else []
        for entry_id, fields in messages:
            if entry_id is not None:
                out.append(parse(EntryRef(stream, entry_id), fields))
    return out


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
