"""Which Redis Stream a key's ledger entries go to (docs/design.md section 12).

A Lua script may only touch keys of one Redis Cluster slot, and a key's state sits under
`vk:{<id>}`; so the script that charges a key or changes it appends to a stream in that
same slot: `ledger:{<tag>}`, `<tag>` being the first of "0", "1", "2", ... that hashes to
the slot. One stream per slot (not per key) keeps the streams few enough for the sink to
find and read. A single Redis has no slots: every key writes `ledger:{all}`.
"""

from __future__ import annotations

import binascii
from functools import cache
from typing import Final

from keys.keyspace import record_key

SLOTS: Final = 16384
SINGLE_STREAM: Final = "ledger:{all}"
STREAM_PATTERN: Final = "ledger:{*}"  # what the sink SCANs for, on every primary


def hash_slot(key: str) -> int:
    """The Redis Cluster slot of `key`: CRC16 (XMODEM) mod 16384 of its hash tag (the
    text between the first `{` and the first `}` after it, if not empty), else of the
    whole key, as CLUSTER KEYSLOT computes it."""
    data = key.encode()
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS


@cache
def slot_tags() -> tuple[str, ...]:
    """slot -> the first decimal tag that hashes to it. Built once, on first use: about
    110 000 CRCs (tens of ms), tags of at most six digits."""
    tags: list[str | None] = [None] * SLOTS
    missing = SLOTS
    n = 0
    while missing:
        slot = binascii.crc_hqx(str(n).encode(), 0) % SLOTS
        if tags[slot] is None:
            tags[slot] = str(n)
            missing -= 1
        n += 1
    return tuple(tag for tag in tags if tag is not None)


def cluster_stream(slot: int) -> str:
    """The ledger stream of one Cluster slot."""
    return f"ledger:{{{slot_tags()[slot]}}}"


def stream_key(key_id: str, *, cluster: bool) -> str:
    """The stream a key's entries go to: in the slot of its record `vk:{<id>}` on a
    cluster, else the one stream."""
    if not cluster:
        return SINGLE_STREAM
    return cluster_stream(hash_slot(record_key(key_id)))
