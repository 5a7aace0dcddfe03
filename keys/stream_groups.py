"""Consumer-group housekeeping shared by the two readers of per-slot streams: the ledger's
sink (ledger/streams.py) and the budget alerts' deliverer (extauthz/alerts.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from keys.connection import Client

# a consumer idle this long, holding nothing, belongs to a process that stopped
FORGET_CONSUMER_MS: Final = 3_600_000


async def create_groups(
    client: Client, streams: Sequence[str], group: str, *, mkstream: bool = False
) -> None:
    """`group` on each of `streams`, at the stream's first entry (nothing appended before
    any reader ran is skipped); a group that already exists is left as it is."""
    if not streams:
        return
    pipe = client.pipeline(transaction=False)
    for name in streams:
        pipe.xgroup_create(name, group, id="0", mkstream=mkstream)
    for reply in await pipe.execute(raise_on_error=False):
        if isinstance(reply, Exception) and "BUSYGROUP" not in str(reply):
            raise reply


async def forget_idle_consumers(
    client: Client, streams: Sequence[str], group: str, keep: str, *, tolerate: bool = False
) -> None:
    """Drops every consumer of `group` but `keep` that holds nothing and has been idle
    FORGET_CONSUMER_MS: the names processes that stopped left behind. `tolerate`: a
    stream that cannot be asked about (gone since it was found) is skipped, not raised."""
    if not streams:
        return
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xinfo_consumers(stream, group)
    replies = await pipe.execute(raise_on_error=not tolerate)
    pipe = client.pipeline(transaction=False)
    for stream, consumers in zip(streams, replies, strict=True):
        if isinstance(consumers, Exception):
            continue
        for consumer in consumers:
            name = str(consumer["name"])
            if (
                name != keep
                and int(consumer["pending"]) == 0
                and int(consumer["idle"]) > FORGET_CONSUMER_MS
            ):
                pipe.xgroup_delconsumer(stream, group, name)
    await pipe.execute()
