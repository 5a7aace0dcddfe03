"""Secrets are compared in constant time: the admin/usage tokens in Python, key digests in
Python (ValidateKey, self-service reads) and in Lua (every Check, keys/lua/_budget.lua).

Why digests and not secrets: Redis holds only the SHA-256 digest of each key (keys/keygen.py),
so the check script compares the digest of the presented key with the stored one. Even a
compare that leaked how many leading characters match would only tell an attacker about a
digest: choosing inputs whose digests share a prefix with the stored one does not bring
them closer to the key, whose secret carries ~256 bits from a CSPRNG. Digests are also all
the same length (64 hex characters), so the compare's early length check leaks nothing.
Comparing in constant time anyway closes the side channel outright, at no cost.

The Lua function runs against the real Redis in tests/integration/test_hostile_input.py
(`test_lua_same_digest_*`); here it is reviewed as source, with no server.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import extauthz.auth
import keys.store
from extauthz.auth import Role, role_of
from keys import keygen
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


def _function_source(module: ModuleType, qualname: str) -> str:
    """The function's current source, read from its file by name (inspect.getsource goes
    by line numbers, which go stale while the file is being edited)."""
    text = Path(inspect.getfile(module)).read_text()
    scope: list[ast.stmt] = ast.parse(text).body
    *outer, name = qualname.split(".")
    for part in outer:
        scope = next(n for n in scope if isinstance(n, ast.ClassDef) and n.name == part).body
    node = next(
        n for n in scope if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name
    )
    source = ast.get_source_segment(text, node)
    assert source is not None
    return source


def test_token_compare_has_no_plain_equality() -> None:
    source = _function_source(extauthz.auth, "_matches")
    assert "compare_digest" in source
    assert not re.search(r"[!=]=", source)


# --- Python: key digests (ValidateKey, self-service reads) ----------------------------------


KEY_ID = "a1b2c3d4e5f67890"


def test_validate_has_no_plain_equality_on_digests() -> None:
    source = _function_source(keys.store, "KeyStore.validate")
    assert "compare_digest" in source
    assert not re.search(r"(digest|hash)\S*\s*[!=]=|[!=]=\s*\S*(digest|hash)", source)


@settings(max_examples=100, deadline=None)
@given(
    secret=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", min_size=32)
)
def test_stored_digests_all_have_one_length(secret: str) -> None:
    """So the length check before the byte loop tells nothing about the stored digest."""
    assert len(keygen.digest(keygen.format_key("sk-mp", KEY_ID, secret))) == 64


# --- Lua: same_digest, reviewed as source ------------------------------------------------------


def _lua(name: str) -> str:
    return resources.files("keys").joinpath("lua", f"{name}.lua").read_text()


def _function_lines(source: str, name: str) -> list[str]:
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if f"function {name}(" in line)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].rstrip() == "end")
    return lines[start : end + 1]


def _loop(lines: list[str]) -> tuple[str, list[str], list[str]]:
    """(the `for` line, the loop body, everything before the loop)."""
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("for "))
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = next(
        i
        for i in range(start + 1, len(lines))
        if lines[i].strip() == "end" and len(lines[i]) - len(lines[i].lstrip()) == indent
    )
    return lines[start], lines[start + 1 : end], lines[1:start]


def _words(lines: list[str]) -> set[str]:
    return set(re.findall(r"[A-Za-z_]\w*", "\n".join(line.split("--")[0] for line in lines)))


def test_lua_same_digest_loop_has_no_early_exit() -> None:
    """Every byte is compared whatever the first difference: the loop runs over the whole
    length and its body has no exit and no data-dependent branch, so its running time
    does not depend on how many leading characters match."""
    header, body, _ = _loop(_function_lines(_lua("_budget"), "same_digest"))
    assert re.fullmatch(r"\s*for i = 1, #a do\s*", header), header
    assert body, "the loop has a body"
    branching = {"return", "break", "goto", "if", "while", "repeat", "and", "or", "not"}
    assert not (_words(body) & branching), body
    assert {"bor", "bxor", "byte"} <= _words(body)  # accumulates differences, bit by bit


def test_lua_same_digest_exits_early_only_on_nil_or_length() -> None:
    lines = _function_lines(_lua("_budget"), "same_digest")
    _, _, before = _loop(lines)
    assert not (_words(before) & {"byte", "sub", "find", "match"}), before
    assert lines[-2].strip() == "return diff == 0"
