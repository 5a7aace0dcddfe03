"""Key format `{prefix}-{id}-{secret}`: generation, parsing and the stored digest.

Only the SHA-256 digest of the whole key is stored. The secret carries ~256 bits from
a CSPRNG, so an unsalted fast hash cannot be brute-forced; the digest is compared in
constant time inside the check script (keys/lua/check.lua).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
from dataclasses import dataclass

ID_HEX_CHARS = 16
SECRET_CHARS = 43  # 43 * log2(62) ~ 256 bits
MIN_SECRET_CHARS = 32
MAX_KEY_CHARS = 256
_ALPHABET = string.ascii_letters + string.digits
_PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_KEY_RE = re.compile(
    r"(?P<prefix>[A-Za-z0-9][A-Za-z0-9_-]{0,31})-(?P<id>[0-9a-f]{16})-(?P<secret>[A-Za-z0-9]{32,})"
)
_ID_RE = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True, slots=True)
class ParsedKey:
    key_id: str
    digest: str

    def __repr__(self) -> str:  # never show more than the id
        return f"ParsedKey(key_id={self.key_id!r})"


def validate_prefix(prefix: str) -> str:
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError("key prefix must be 1-32 characters of [A-Za-z0-9_-]")
    return prefix


def is_key_id(value: str) -> bool:
    return bool(_ID_RE.fullmatch(value))


def new_key_id() -> str:
    return secrets.token_hex(ID_HEX_CHARS // 2)


def new_secret() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(SECRET_CHARS))


def format_key(prefix: str, key_id: str, secret: str) -> str:
    return f"{prefix}-{key_id}-{secret}"


def digest(full_key: str) -> str:
    return hashlib.sha256(full_key.encode()).hexdigest()


def parse_key(candidate: str) -> ParsedKey | None:
    """The key's id and digest, or None when it is not shaped like a key of ours."""
    if len(candidate) > MAX_KEY_CHARS:
        return None
    match = _KEY_RE.fullmatch(candidate)
    if match is None:
        return None
    return ParsedKey(key_id=match["id"], digest=digest(candidate))
