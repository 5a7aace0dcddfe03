"""ValidateKey and self-service reads compare key digests with hmac.compare_digest, against
real records in Redis (the Lua side is tested in test_hostile_input.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import resources

import pytest
import redis

from keys import keygen
from keys.model import KeySpec, Reason
from keys.store import KeyStore
from tests.helpers import CompareDigestSpy

pytestmark = pytest.mark.integration
SPEC = KeySpec("k", "u", "", 1_900_000_000_000, ("*",), 0, 0, 0)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[CompareDigestSpy]:
    recorder = CompareDigestSpy()
    monkeypatch.setattr("keys.store.hmac.compare_digest", recorder)
    yield recorder


async def test_validate_compares_the_stored_digest_with_compare_digest(
    store: KeyStore, spy: CompareDigestSpy
) -> None:
    full, _ = await store.create(SPEC, "sk-mp")
    parsed = keygen.parse_key(full)
    assert parsed is not None
    reason, record = await store.validate(parsed)
    assert reason is Reason.OK and record is not None
    assert (keygen.digest(full), parsed.digest) in spy.calls


async def test_a_wrong_secret_also_goes_through_compare_digest(
    store: KeyStore, spy: CompareDigestSpy
) -> None:
    full, key = await store.create(SPEC, "sk-mp")
    wrong = keygen.parse_key(f"sk-mp-{key.id}-" + "W" * 43)
    assert wrong is not None
    assert await store.validate(wrong) == (Reason.INVALID_API_KEY, None)
    assert (keygen.digest(full), wrong.digest) in spy.calls


async def test_a_rotated_out_digest_is_checked_with_compare_digest(
    store: KeyStore, spy: CompareDigestSpy
) -> None:
    old, key = await store.create(SPEC, "sk-mp")
    await store.rotate(key.id, "sk-mp", grace_ms=60_000)
    parsed = keygen.parse_key(old)
    assert parsed is not None
    reason, _ = await store.validate(parsed)
    assert reason is Reason.OK
    assert (keygen.digest(old), parsed.digest) in spy.calls


# --- Lua: keys/lua/_lib.lua's same_digest, run by the real Redis ---------------------------

# Counts string.byte calls inside same_digest: prepended, this local `string` shadows the
# global one for the library that follows.
BYTE_COUNTER = """
local reads = 0
local real_byte = string.byte
local string = setmetatable(
  {byte = function(s, i) reads = reads + 1; return real_byte(s, i) end}, {__index = string})
"""


@pytest.fixture
def byte_reads(redis_url: str) -> Iterator[Callable[[str, str], tuple[bool, int]]]:
    """same_digest(a, b) on the real Redis: (its answer, how many bytes it read)."""
    library = resources.files("keys").joinpath("lua", "_lib.lua").read_text()
    client = redis.Redis.from_url(redis_url)
    script = client.register_script(
        BYTE_COUNTER + library + "\nreturn {same_digest(ARGV[1], ARGV[2]) and 1 or 0, reads}\n"
    )

    def call(a: str, b: str) -> tuple[bool, int]:
        same, reads = script(args=[a, b])
        return bool(same), int(reads)

    yield call
    client.close()


def test_lua_same_digest_reads_every_byte_wherever_the_first_difference_is(
    byte_reads: Callable[[str, str], tuple[bool, int]],
) -> None:
    """A compare that stopped at the first difference would read fewer bytes, and so take
    less time, the earlier the presented digest goes wrong."""
    stored = keygen.digest("sk-mp-a1b2c3d4e5f67890-" + "S" * 43)
    flip = {"0": "1"}.get
    for at in (0, 1, 31, 63):
        other = stored[:at] + (flip(stored[at]) or "0") + stored[at + 1 :]
        assert byte_reads(other, stored) == (False, 2 * len(stored)), at
    assert byte_reads(stored, stored) == (True, 2 * len(stored))
