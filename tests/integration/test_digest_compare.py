"""ValidateKey and self-service reads compare key digests with hmac.compare_digest, against
real records in Redis (the Lua side is tested in test_hostile_input.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
