from __future__ import annotations

import re

import pytest

from keys import keygen

pytestmark = pytest.mark.unit


def test_new_key_has_spec_shape() -> None:
    key_id = keygen.new_key_id()
    key = keygen.format_key("sk-mp", key_id, keygen.new_secret())
    assert re.fullmatch(r"sk-mp-[0-9a-f]{16}-[A-Za-z0-9]{43}", key)


def test_secrets_differ_each_time() -> None:
    assert len({keygen.new_secret() for _ in range(100)}) == 100


def test_parse_returns_id_and_digest_of_the_whole_key() -> None:
    key = "sk-mp-a1b2c3d4e5f67890-xYz123AbC456DeF789GhI012JkL345MnO678PqR"
    parsed = keygen.parse_key(key)
    assert parsed is not None
    assert parsed.key_id == "a1b2c3d4e5f67890"
    assert parsed.digest == keygen.digest(key)


def test_parsed_key_repr_shows_only_the_id() -> None:
    key = "sk-mp-a1b2c3d4e5f67890-xYz123AbC456DeF789GhI012JkL345MnO678PqR"
    parsed = keygen.parse_key(key)
    assert "xYz123" not in repr(parsed) and parsed is not None and parsed.digest not in repr(parsed)


@pytest.mark.parametrize(
    "candidate",
    [
        "",
        "sk-mp",
        "sk-mp-a1b2c3d4e5f67890",
        "sk-mp-a1b2c3d4e5f67890-short",
        "sk-mp-A1B2C3D4E5F67890-xYz123AbC456DeF789GhI012JkL345MnO678PqR",  # upper-case id
        "sk-mp-a1b2c3d4e5f6789-xYz123AbC456DeF789GhI012JkL345MnO678PqR",  # 15 hex
        "sk-mp-a1b2c3d4e5f67890-xYz123AbC456DeF789GhI012JkL345MnO678Pq!",
        "sk-mp-a1b2c3d4e5f67890-xYz123AbC456DeF789GhI012JkL345MnO678PqR\n",
        "sk-mp-a1b2c3d4e5f67890-" + "a" * 300,
        "Bearer sk-mp-a1b2c3d4e5f67890-xYz123AbC456DeF789GhI012JkL345MnO678PqR",
    ],
)
def test_malformed_keys_do_not_parse(candidate: str) -> None:
    assert keygen.parse_key(candidate) is None


def test_prefix_must_be_simple() -> None:
    assert keygen.validate_prefix("sk-mp") == "sk-mp"
    with pytest.raises(ValueError):
        keygen.validate_prefix("sk mp")
