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
    """`with_lib` prepends keys/lua/_lib.lua (roll_budget, same_digest, key_event)."""
    return Script(name, (_lua("_lib") if with_lib else "") + _lua(name))


CHECK: Final = _load("check", with_lib=True)
AUTHENTICATE: Final = _load("authenticate", with_lib=True)
REPORT_USAGE: Final = _load("report_usage", with_lib=True)
LEVEL_ADMIT: Final = _load("level_admit", with_lib=True)
LEVEL_RELEASE: Final = _load("level_release", with_lib=True)
LEVEL_SETTLE: Final = _load("level_settle", with_lib=True)
# the key events: each appends to the ledger stream when the caller passes one
CREATE: Final = _load("create", with_lib=True)
UPDATE: Final = _load("update", with_lib=True)
ROTATE: Final = _load("rotate", with_lib=True)
DELETE: Final = _load("delete", with_lib=True)
SET_BUDGET: Final = _load("set_budget")  # keys/budgets.py: create or reconfigure a budget
ALL: Final = (
    CHECK,
    AUTHENTICATE,
    REPORT_USAGE,
    LEVEL_ADMIT,
    LEVEL_RELEASE,
    LEVEL_SETTLE,
    CREATE,
    UPDATE,
    ROTATE,
    DELETE,
    SET_BUDGET,
)


# --- check.lua -----------------------------------------------------------------------


class CheckCode(IntEnum):
    ALLOWED = 0  # and counted against RPM
    UNKNOWN_KEY = 1  # no such id, or a wrong secret (the same answer, the same cost)
    REVOKED = 2
    EXPIRED = 3
    MODEL_NOT_ALLOWED = 4
    BUDGET_SPENT = 5  # the reservation does not fit (reserve mode) / spent (after mode)
    OVER_RPM = 6
    OVER_TPM = 7
    MODEL_NOT_PRICED = 8
    CONCURRENCY = 9
    NEED_LEVELS = 10  # call again with the user's and team's budgets inline


@dataclass(frozen=True, slots=True)
class Shortfall:
    """A step that failed (or, in shadow mode, would have): its code, level and details."""

    code: CheckCode
    level: str  # key, model, user, team ("level" from level_admit.lua)
    d1: str = ""  # budget: nano-USD free; rate: the limit; concurrency: the limit
    d2: int = 0  # rate: used in the window
    d3: int = 0  # rate: ms until the window resets


@dataclass(frozen=True, slots=True)
class CheckReply:
    code: CheckCode
    # For codes 0 and 4-9 (1-3 return the code alone; NEED_LEVELS the two ids):
    user_id: str = ""
    team_id: str = ""
    rpm_limit: int = 0
    requests: int = 0  # in the window, this request included when allowed
    tpm_limit: int = 0
    tokens: int = 0
    reset_ms: int = 0  # until the window closes
    request_id: str = ""  # allowed: names the reservation
    expired: int = 0  # reservations this call found expired and released
    short: Shortfall | None = None  # the denial, or in shadow mode the would-be denial
    enforce: bool = True  # False: the key is in shadow mode
    levels: tuple[str, ...] = ()  # where the request was checked (and, allowed, reserved)


def decode_check(reply: Any) -> CheckReply:
    code = CheckCode(int(reply[0]))
    if len(reply) == 1:
        return CheckReply(code)
    if code is CheckCode.NEED_LEVELS:
        return CheckReply(code, user_id=reply[1], team_id=reply[2])
    shadow = int(reply[10])
    short_code = code if code is not CheckCode.ALLOWED else CheckCode(shadow)
    return CheckReply(
        code,
        user_id=reply[1],
        team_id=reply[2],
        rpm_limit=int(reply[3]),
        requests=int(reply[4]),
        tpm_limit=int(reply[5]),
        tokens=int(reply[6]),
        reset_ms=int(reply[7]),
        request_id=reply[8],
        expired=int(reply[9]),
        short=None
        if short_code is CheckCode.ALLOWED
        else Shortfall(short_code, reply[11], str(reply[12]), int(reply[13]), int(reply[14])),
        enforce=int(reply[15]) == 1,
        levels=tuple(reply[16].split(",")),
    )


@dataclass(frozen=True, slots=True)
class LevelReply:
    """level_admit.lua: passed (admitted, or no budget there), or refused."""

    admitted: bool
    short: Shortfall | None


def decode_level_admit(reply: Any, level: str) -> LevelReply:
    code = CheckCode(int(reply[0]))
    short = (
        None
        if code is CheckCode.ALLOWED
        else Shortfall(code, level, str(reply[1]), int(reply[2]), int(reply[3]))
    )
    return LevelReply(int(reply[4]) == 1, short)


def decode_authenticate(reply: Any) -> CheckCode:
    """authenticate.lua answers with check.lua's first four codes."""
    return CheckCode(int(reply[0]))


# --- report_usage.lua ----------------------------------------------------------------


class ReportCode(IntEnum):
    UNKNOWN_KEY = 0
    CHARGED = 1
    DUPLICATE = 2  # this request id was charged before: nothing more
    OVERFLOW = 3  # refused: an int64 counter would overflow
    NEED_LEVELS = 10  # call again with the user's and team's budgets inline


class Settled(IntEnum):
    """What a report did to the reservation its request id names."""

    NONE = 0  # no open reservation had that id (usage measured elsewhere, or reaped)
    CLOSED = 1
    EXPIRED = -1  # it had expired: released; the report still charges


@dataclass(frozen=True, slots=True)
class ReportReply:
    code: ReportCode
    spent_nanos: int
    max_budget_nanos: int
    settled: Settled = Settled.NONE
    user_id: str = ""
    team_id: str = ""
    reserved_nanos: int = 0
    alerts: int = 0  # budget alert events the charge appended (key and inline levels)


def decode_report(reply: Any) -> ReportReply:
    return ReportReply(
        ReportCode(int(reply[0])),
        int(reply[1]),
        int(reply[2]),
        Settled(int(reply[3])),
        reply[4],
        reply[5],
        int(reply[6]) if len(reply) > 6 else 0,
        int(reply[7]) if len(reply) > 7 else 0,
    )


def decode_level_settle(reply: Any) -> int:
    """level_settle.lua: the budget alert events it appended (0 unless it charged)."""
    return int(reply[1])


# --- create.lua, update.lua, rotate.lua, delete.lua ----------------------------------


def decode_done(reply: Any) -> bool:
    """1: done; 0: no such key (update, rotate, delete) or the id is taken (create)."""
    return int(reply) == 1
