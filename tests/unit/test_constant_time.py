"""Secrets are compared in constant time: the admin/usage tokens in Python, key digests in
Python (ValidateKey, self-service reads) and in Lua (every Check, keys/lua/_lib.lua).

Why digests and not secrets: Redis holds only the SHA-256 digest of each key (keys/keygen.py),
so the check script compares the digest of the presented key with the stored one. Even a
compare that leaked how many leading characters match would only tell an attacker about a
digest: choosing inputs whose digests share a prefix with the stored one does not bring
them closer to the key, whose secret carries ~256 bits from a CSPRNG. Digests are also all
the same length (64 hex characters), so the compare's early length check leaks nothing.
Comparing in constant time anyway closes the side channel outright, at no cost.

Here: the tokens, with no server. The digests run against the real Redis in
tests/integration/test_digest_compare.py (Python, and Lua's `same_digest` reading every
byte) and tests/integration/test_hostile_input.py (`test_lua_same_digest_*`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.auth import Role, role_of
from tests.helpers import CompareDigestSpy

pytestmark = pytest.mark.unit

ADMIN, USAGE = "adm-0123456789abcdefghij", "use-0123456789abcdefghij"


Spy = CompareDigestSpy


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spy]:
    recorder = Spy()
    # Both modules call `hmac.compare_digest` through their module-level `hmac` import.
    monkeypatch.setattr("extauthz.auth.hmac.compare_digest", recorder)
    monkeypatch.setattr("keys.store.hmac.compare_digest", recorder)
    yield recorder


# --- Python: admin and usage tokens ----------------------------------------------------------


def test_an_admin_token_is_checked_with_compare_digest(spy: Spy) -> None:
    assert role_of(ADMIN, ADMIN, USAGE) is Role.ADMIN
    assert spy.calls == [(ADMIN.encode(), ADMIN.encode())]


def test_a_wrong_token_is_compared_with_both_configured_tokens(spy: Spy) -> None:
    assert role_of("adm-guess", ADMIN, USAGE) is None
    assert spy.calls == [(b"adm-guess", ADMIN.encode()), (b"adm-guess", USAGE.encode())]


def test_the_usage_token_is_checked_with_compare_digest(spy: Spy) -> None:
    assert role_of(USAGE, ADMIN, USAGE) is Role.USAGE
    assert (USAGE.encode(), USAGE.encode()) in spy.calls


def test_an_unset_token_matches_nothing_not_even_an_empty_one(spy: Spy) -> None:
    assert role_of("", "", "") is None
    assert role_of(None, ADMIN, USAGE) is None
    assert spy.calls == []  # nothing configured, or nothing presented: nothing to compare


@settings(max_examples=200, deadline=None)
@given(
    token=st.text(st.characters(codec="utf-8"), max_size=40)
    | st.sampled_from([ADMIN, USAGE, ADMIN[:-1], ADMIN + "x"])
)
def test_role_of_matches_equality_and_always_goes_through_compare_digest(token: str) -> None:
    recorder = Spy()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("extauthz.auth.hmac.compare_digest", recorder)
        role = role_of(token, ADMIN, USAGE)
    expected = Role.ADMIN if token == ADMIN else Role.USAGE if token == USAGE else None
    assert role is expected
    assert recorder.calls and recorder.calls[0] == (token.encode(), ADMIN.encode())
