"""Which ledger stream a key writes to: Redis Cluster slots computed here, as Redis does.
(tests/integration/test_ledger_stream.py checks them against CLUSTER KEYSLOT.)"""

from __future__ import annotations

import binascii

import pytest

from keys import keygen
from keys.keyspace import record_key
from keys.ledger_stream import (
    SINGLE_STREAM,
    SLOTS,
    cluster_stream,
    hash_slot,
    slot_tags,
    stream_key,
)

pytestmark = pytest.mark.unit


def test_every_slot_has_a_tag_and_it_is_the_first_number_hashing_there() -> None:
    tags = slot_tags()
    assert len(tags) == SLOTS
    first: dict[int, str] = {}
    for n in range(max(int(t) for t in tags) + 1):
        first.setdefault(binascii.crc_hqx(str(n).encode(), 0) % SLOTS, str(n))
    assert tags == tuple(first[slot] for slot in range(SLOTS))


def test_each_slots_stream_hashes_to_that_slot() -> None:
    assert all(hash_slot(cluster_stream(slot)) == slot for slot in range(SLOTS))


@pytest.mark.parametrize(
    ("key", "slot"),
    [
        ("123456789", 12739),  # CRC16/XMODEM's check value, 0x31C3
        ("somekey", 11058),  # the examples of CLUSTER KEYSLOT's documentation
        ("foo{hash_tag}", 2515),
        ("{hash_tag}bar", 2515),
    ],
)
def test_hash_slot_agrees_with_redis_documented_values(key: str, slot: int) -> None:
    assert hash_slot(key) == slot


def test_hash_tag_rules_pick_the_first_non_empty_braces() -> None:
    whole = binascii.crc_hqx(b"foo{}{bar}", 0) % SLOTS
    assert hash_slot("foo{}{bar}") == whole  # an empty first tag: the whole key
    assert hash_slot("foo{{bar}}zap") == hash_slot("{bar")  # from the first { to the first }
    assert hash_slot("foo{bar}{zap}") == hash_slot("bar")
    assert hash_slot("foo{bar") == binascii.crc_hqx(b"foo{bar", 0) % SLOTS  # no closing }


def test_a_keys_stream_shares_its_records_slot_on_a_cluster() -> None:
    for _ in range(200):
        key_id = keygen.new_key_id()
        stream = stream_key(key_id, cluster=True)
        assert stream.startswith("ledger:{") and hash_slot(stream) == hash_slot(record_key(key_id))


def test_a_single_redis_has_one_stream() -> None:
    assert stream_key(keygen.new_key_id(), cluster=False) == SINGLE_STREAM == "ledger:{all}"
