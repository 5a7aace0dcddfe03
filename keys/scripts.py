"""The Lua scripts (keys/lua/) and typed decoders for their replies.

Each script returns a code first; the codes are the enums below, and each reply is
decoded once, here, into a dataclass, so no caller reads a bare integer by position.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import IntEnum
from importlib import resources
from typing import Any, Final


class Script:
    """A Lua script and its SHA1, the id Redis caches it under."""

    __slots__ = ("name", "sha", "text")

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 (not for security)


def _lua(name: str) -> str:
    return resources.files("keys").joinpath("lua", f"{name}.lua").read_text()


def _load(name: str, *, with_lib: bool = False) -> Script:
    """`with_lib` prepends keys/lua/_lib.lua (roll_budget, same_digest)."""
    return Script(name, (_lua("_lib") if with_lib else "") + _lua(name))


CHECK: Final = _load("check", with_lib=True)
AUTHENTICATE: Final = _load("authenticate", with_lib=True)
REPORT_USAGE: Final = _load("report_usage", with_lib=True)
CREATE: Final = _load("create")
UPDATE: Final = _load("update")
ROTATE: Final = _load("rotate")
ALL: Final = (CHECK, AUTHENTICATE, REPORT_USAGE, CREATE, UPDATE, ROTATE)


# --- check.lua -----------------------------------------------------------------------


class CheckCode(IntEnum):
    ALLOWED = 0  # and counted against RPM
    UNKNOWN_KEY = 1  # no such id, or a wrong secret (the same answer, the same cost)
    REVOKED = 2
    EXPIRED = 3
    MODEL_NOT_ALLOWED = 4
    BUDGET_SPENT = 5
    OVER_RPM = 6
    OVER_TPM = 7


@dataclass(frozen=True, slots=True)
class CheckReply:
    code: CheckCode
    # Only for ALLOWED, OVER_RPM and OVER_TPM (the rest return the code alone):
    user_id: str = ""
    team_id: str = ""
    rpm_limit: int = 0
    requests: int = 0  # in the window, this request included when allowed
    tpm_limit: int = 0
    tokens: int = 0
    reset_ms: int = 0  # until the window closes


def decode_check(reply: Any) -> CheckReply:
    code = CheckCode(int(reply[0]))
    if len(reply) == 1:
        return CheckReply(code)
    return CheckReply(
        code,
        user_id=reply[1],
        team_id=reply[2],
        rpm_limit=int(reply[3]),
        requests=int(reply[4]),
        tpm_limit=int(reply[5]),
        tokens=int(reply[6]),
        reset_ms=int(reply[7]),
    )


def decode_authenticate(reply: Any) -> CheckCode:
    """authenticate.lua answers with check.lua's first four codes."""
    return CheckCode(int(reply[0]))


# --- report_usage.lua ----------------------------------------------------------------


class ReportCode(IntEnum):
    UNKNOWN_KEY = 0
    CHARGED = 1
    DUPLICATE = 2  # this request id was charged before: nothing more
    OVERFLOW = 3  # refused: an int64 counter would overflow


@dataclass(frozen=True, slots=True)
class ReportReply:
    code: ReportCode
    spent_nanos: int
    max_budget_nanos: int


def decode_report(reply: Any) -> ReportReply:
    return ReportReply(ReportCode(int(reply[0])), int(reply[1]), int(reply[2]))


# --- create.lua, update.lua, rotate.lua ----------------------------------------------


def decode_done(reply: Any) -> bool:
    """1: done; 0: no such key (update, rotate) or the id is taken (create)."""
    return int(reply) == 1
