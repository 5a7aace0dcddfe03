"""Values the domain passes around: key records, check decisions, usage reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from keys.budget import NO_PERIOD, BudgetPeriod

WINDOW_MS = 60_000  # RPM and TPM are counted in one-minute windows (docs/design.md)
ALL_MODELS = "*"


class Status(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"


class Reason(StrEnum):
    """A Check outcome; the value is the `error.code` a denial carries."""

    OK = "ok"
    INVALID_API_KEY = "invalid_api_key"
    KEY_REVOKED = "key_revoked"
    KEY_EXPIRED = "key_expired"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    BUDGET_EXCEEDED = "budget_exceeded"
    MODEL_NOT_PRICED = "model_not_priced"
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    CONCURRENCY_LIMIT_EXCEEDED = "concurrency_limit_exceeded"
    AUTH_UNAVAILABLE = "auth_unavailable"


class BodyModel(Enum):
    """What the request body says about the model (SPEC: the model step)."""

    NO_BODY = 0  # e.g. GET /v1/models: passes the model step
    NAMED = 1  # a JSON body whose last "model" is a string
    UNREADABLE = 2  # not JSON, truncated, or "model" missing / not a string


@dataclass(frozen=True, slots=True)
class RequestedModel:
    """The model, and what bounds the request's cost (for its reservation): the output
    tokens it asks for at most (`max_completion_tokens`, `max_tokens`,
    `max_output_tokens`; None when it names none), the choices (`n`), the body's size."""

    kind: BodyModel
    name: str = ""
    output_cap: int | None = field(default=None, compare=False)
    choices: int = field(default=1, compare=False)  # completions: n (or best_of) x prompts
    body_bytes: int = field(default=0, compare=False)
    encoded: bool = field(default=False, compare=False)  # a Content-Encoding (gzip, ...)
    # streams (`"stream": true`) without asking for its usage chunk
    # (`stream_options.include_usage`): the usage tap asks for it on the client's behalf
    stream_without_usage: bool = field(default=False, compare=False)

    @classmethod
    def named(cls, name: str) -> RequestedModel:
        return cls(BodyModel.NAMED, name)


NO_BODY = RequestedModel(BodyModel.NO_BODY)
UNREADABLE = RequestedModel(BodyModel.UNREADABLE)


class Level(StrEnum):
    """Where a limit sits: the key, the key's limit for one model, its user, its team."""

    KEY = "key"
    MODEL = "model"
    USER = "user"
    TEAM = "team"


class LimitHit(StrEnum):
    """Which limit denied a request (on a rate-limit denial)."""

    RPM = "rpm"
    TPM = "tpm"


@dataclass(frozen=True, slots=True)
class WindowCount:
    """One rate limit's state in the current window; limit 0 means unlimited."""

    limit: int
    used: int
    reset_ms: int  # until the window closes; 0 when none is open

    @property
    def remaining(self) -> int | None:
        """None when unlimited; never negative."""
        return None if self.limit == 0 else max(self.limit - self.used, 0)

    @property
    def reset_s(self) -> int:
        """Whole seconds until the window closes, rounded up (0 when none is open)."""
        return -(-self.reset_ms // 1000)


UNLIMITED = WindowCount(0, 0, 0)


@dataclass(frozen=True, slots=True)
class Decision:
    reason: Reason
    key_id: str = ""
    user_id: str = ""
    team_id: str = ""
    rpm: WindowCount = UNLIMITED
    tpm: WindowCount = UNLIMITED
    limit_hit: LimitHit | None = None  # on a rate-limit denial
    # Names the request's reservation (its in-flight record); set when allowed.
    request_id: str = ""
    # Where the (would-be) denial's limit sits, and what it says:
    level: Level = Level.KEY
    window: WindowCount | None = None  # a rate denial's window (at `level`)
    free_nanos: int = 0  # a budget denial: what the budget still has free
    parallel_limit: int = 0  # a concurrency denial's limit
    # Shadow mode (the key's `enforce` off): allowed, but this is what it would have got.
    would_deny: Reason | None = None
    expired: int = 0  # reservations found expired (and released) by this Check
    levels: tuple[Level, ...] = ()  # allowed: where it was reserved (key, user, team)

    @property
    def allowed(self) -> bool:
        return self.reason is Reason.OK

    @property
    def denying_window(self) -> WindowCount:
        """The window that denied the request (a rate-limit denial)."""
        if self.window is not None:
            return self.window
        return self.rpm if self.limit_hit is LimitHit.RPM else self.tpm

    @property
    def retry_after_s(self) -> int:
        """Whole seconds until the window that denied the request closes (at least 1)."""
        return max(1, self.denying_window.reset_s)


@dataclass(frozen=True, slots=True)
class ModelLimit:
    """A key's RPM and TPM for one model (0: no limit), in addition to its own."""

    rpm_limit: int = 0
    tpm_limit: int = 0


@dataclass(frozen=True, slots=True)
class KeySpec:
    """Everything CreateKey stores, after defaults and validation."""

    name: str
    user_id: str
    team_id: str
    expires_at_ms: int
    allowed_models: tuple[str, ...]
    max_budget_nanos: int
    tpm_limit: int
    rpm_limit: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    budget: BudgetPeriod = NO_PERIOD
    max_parallel: int = 0
    model_limits: Mapping[str, ModelLimit] = field(default_factory=dict)
    enforce: bool = True


@dataclass(frozen=True, slots=True)
class KeyUpdate:
    """UpdateKey: None leaves a field as it is."""

    name: str | None = None
    allowed_models: tuple[str, ...] | None = None
    max_budget_nanos: int | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    expires_at_ms: int | None = None
    metadata: Mapping[str, str] | None = None
    budget: BudgetPeriod | None = None
    max_parallel: int | None = None
    model_limits: Mapping[str, ModelLimit] | None = None
    enforce: bool | None = None


@dataclass(frozen=True, slots=True)
class VirtualKey:
    id: str
    name: str
    user_id: str
    team_id: str
    created_at_ms: int
    expires_at_ms: int  # 0: never
    revoked: bool
    allowed_models: tuple[str, ...]
    max_budget_nanos: int  # 0: no budget
    spent_nanos: int
    tpm_limit: int
    rpm_limit: int
    metadata: Mapping[str, str]
    last_used_ms: int  # 0: never used
    total_requests: int
    window_start_ms: int
    window_requests: int
    window_tokens: int
    budget_duration: str = ""
    budget_reset_at_ms: int = 0  # 0: spend never resets
    reserved_nanos: int = 0  # held by open reservations
    in_flight: int = 0  # open reservations (requests allowed and not yet reported)
    max_parallel: int = 0
    model_limits: Mapping[str, ModelLimit] = field(default_factory=dict)
    enforce: bool = True

    def status(self, now_ms: int) -> Status:
        if self.revoked:
            return Status.REVOKED
        if self.expires_at_ms and now_ms >= self.expires_at_ms:
            return Status.EXPIRED
        return Status.ACTIVE

    @property
    def budget_remaining_nanos(self) -> int | None:
        """What new requests may still reserve: budget - spent - reserved."""
        if self.max_budget_nanos == 0:
            return None
        return max(self.max_budget_nanos - self.spent_nanos - self.reserved_nanos, 0)

    def windows(self, now_ms: int) -> tuple[WindowCount, WindowCount]:
        """(rpm, tpm) as a Check at `now_ms` would see them, without counting."""
        open_ = self.window_start_ms and now_ms < self.window_start_ms + WINDOW_MS
        reset = self.window_start_ms + WINDOW_MS - now_ms if open_ else 0
        requests = self.window_requests if open_ else 0
        tokens = self.window_tokens if open_ else 0
        return (
            WindowCount(self.rpm_limit, requests, reset),
            WindowCount(self.tpm_limit, tokens, reset),
        )


@dataclass(frozen=True, slots=True)
class UsageReport:
    key_id: str
    request_id: str
    model: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_nanos: int
    # the price-table entry of `model` (PriceTable.family), which a per-model limit may name
    family: str = ""


@dataclass(frozen=True, slots=True)
class UsageRow:
    date: str  # YYYY-MM-DD, UTC
    model: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_nanos: int = 0


@dataclass(frozen=True, slots=True)
class UsageSummary:
    rows: tuple[UsageRow, ...]
    key_ids: tuple[str, ...]
    start_date: str
    end_date: str


@dataclass(frozen=True, slots=True)
class ReportResult:
    duplicate: bool
    cost_nanos: int
    spent_nanos: int
    max_budget_nanos: int
    total_tokens: int
    settled: bool = False  # closed the reservation its request id named
    expired: bool = False  # its reservation had expired (released; charged anyway)
    reserved_nanos: int = 0  # what the key's open reservations hold after this report

    @property
    def budget_remaining_nanos(self) -> int | None:
        if self.max_budget_nanos == 0:
            return None
        return max(self.max_budget_nanos - self.spent_nanos - self.reserved_nanos, 0)
