"""Checks on what admins and reporters send, before anything is stored.

Each failure is an InvalidArgument whose message says what to fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from keys.budget import parse_duration
from keys.errors import InvalidArgument
from keys.keygen import is_key_id
from keys.model import ALL_MODELS, KeyUpdate, ModelLimit
from keys.money import MAX_USD, usd_to_nanos

MAX_NAME_CHARS = 256
MAX_ID_CHARS = 128
MAX_MODELS = 1000
MAX_MODEL_CHARS = 256
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_VALUE_CHARS = 1024
MAX_REQUEST_ID_CHARS = 256
MAX_LIMIT = 2**31 - 1
MAX_TOKENS = 10**12
DAY_MS = 86_400_000


def _printable(value: str) -> bool:
    return value.isprintable()


def text(field: str, value: str, *, required: bool, max_chars: int) -> str:
    value = value.strip()
    if required and not value:
        raise InvalidArgument(f"{field} is required")
    if len(value) > max_chars:
        raise InvalidArgument(f"{field} is longer than {max_chars} characters")
    if not _printable(value):
        raise InvalidArgument(f"{field} contains control characters")
    return value


def key_id(field: str, value: str) -> str:
    if not is_key_id(value):
        raise InvalidArgument(f"{field} must be 16 lowercase hex characters (a key id)")
    return value


def usd(field: str, value: float) -> int:
    if not math.isfinite(value) or value < 0 or value > MAX_USD:
        raise InvalidArgument(f"{field} must be a number of USD from 0 to {MAX_USD}")
    return usd_to_nanos(value)


def budget(field: str, value: float) -> int:
    """Like usd(), but a positive budget never rounds to 0, which would mean "no budget"."""
    nanos = usd(field, value)
    if value > 0 and nanos == 0:
        raise InvalidArgument(f"{field} is below 1e-9 USD; use 0 for no budget")
    return nanos


def limit(field: str, value: int) -> int:
    if not 0 <= value <= MAX_LIMIT:
        raise InvalidArgument(f"{field} must be from 0 (no limit) to {MAX_LIMIT}")
    return value


def tokens(field: str, value: int) -> int:
    if not 0 <= value <= MAX_TOKENS:
        raise InvalidArgument(f"{field} must be from 0 to {MAX_TOKENS}")
    return value


def models(values: Sequence[str]) -> tuple[str, ...]:
    if len(values) > MAX_MODELS:
        raise InvalidArgument(f"allowed_models has more than {MAX_MODELS} entries")
    cleaned = [
        text("allowed_models entry", v, required=True, max_chars=MAX_MODEL_CHARS) for v in values
    ]
    if not cleaned:
        # "clear the list" must not read as "allow everything": that is said with "*"
        raise InvalidArgument('allowed_models is empty: send ["*"] to allow every model')
    if ALL_MODELS in cleaned:
        return (ALL_MODELS,)
    return tuple(dict.fromkeys(cleaned))


def model_limits(values: Mapping[str, Mapping[str, int]]) -> dict[str, ModelLimit]:
    """`model_limits`: exact model name -> {rpm_limit, tpm_limit} (0 or left out: none)."""
    if len(values) > MAX_MODELS:
        raise InvalidArgument(f"model_limits has more than {MAX_MODELS} entries")
    checked: dict[str, ModelLimit] = {}
    for model, limits in values.items():
        name = text("model_limits model", model, required=True, max_chars=MAX_MODEL_CHARS)
        if name == ALL_MODELS:
            raise InvalidArgument(
                "model_limits names exact models; the key's own rpm_limit and tpm_limit "
                "cover every model"
            )
        unknown = sorted(set(limits) - {"rpm_limit", "tpm_limit"})
        if unknown:
            raise InvalidArgument(
                f"model_limits[{name[:64]!r}] takes rpm_limit and tpm_limit, not "
                + ", ".join(repr(u[:64]) for u in unknown[:5])
            )
        checked[name] = ModelLimit(
            limit("model_limits rpm_limit", limits.get("rpm_limit", 0)),
            limit("model_limits tpm_limit", limits.get("tpm_limit", 0)),
        )
    return checked


def metadata(values: Mapping[str, str]) -> dict[str, str]:
    if len(values) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(f"metadata has more than {MAX_METADATA_ENTRIES} entries")
    for k, v in values.items():
        text("metadata key", k, required=True, max_chars=MAX_METADATA_KEY_CHARS)
        if len(v) > MAX_METADATA_VALUE_CHARS:
            raise InvalidArgument(
                f"metadata value for {k!r} is longer than {MAX_METADATA_VALUE_CHARS} characters"
            )
    return dict(values)


def expires_days(value: int | None, max_days: int) -> int:
    if value is None:
        return max_days
    if not 1 <= value <= max_days:
        raise InvalidArgument(
            f"expires_days must be from 1 to {max_days} (VIRTUAL_KEY_MAX_EXPIRES_DAYS)"
        )
    return value


def page_size(value: int, default: int = 50, maximum: int = 500) -> int:
    if value == 0:
        return default
    if not 1 <= value <= maximum:
        raise InvalidArgument(f"page_size must be from 1 to {maximum} (0 means {default})")
    return value


def grace_seconds(value: int, maximum: int = 30 * 86_400) -> int:
    if not 0 <= value <= maximum:
        raise InvalidArgument(f"grace_seconds must be from 0 to {maximum}")
    return value


def days(
    value: int, maximum: int, bound: str = "EXTAUTHZ_USAGE_RETENTION_DAYS", default: int = 30
) -> int:
    if value == 0:
        return min(default, maximum)
    if not 1 <= value <= maximum:
        raise InvalidArgument(f"days must be from 1 to {maximum} ({bound}); 0 means {default}")
    return value


@dataclass(frozen=True, slots=True)
class KeyFields:
    """A key's changeable fields as a caller sent them, whatever the wire shape; None: not
    sent. CreateKey and UpdateKey (typed or JSON) both end here, so a field is checked by
    the same rule wherever it came from."""

    name: str | None = None
    allowed_models: Sequence[str] | None = None
    max_budget: float | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    expires_days: int | None = None
    metadata: Mapping[str, str] | None = None
    budget_duration: str | None = None
    max_parallel_requests: int | None = None
    model_limits: Mapping[str, Mapping[str, int]] | None = None
    enforce: bool | None = None

    def sent(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


CHANGEABLE_FIELDS = tuple(f.name for f in fields(KeyFields))


def key_changes(sent: KeyFields, *, max_expires_days: int, now_ms: int) -> KeyUpdate:
    """The checked domain values of the fields sent; the others stay None."""
    days = sent.expires_days
    return KeyUpdate(
        name=None
        if sent.name is None
        else text("name", sent.name, required=True, max_chars=MAX_NAME_CHARS),
        allowed_models=None if sent.allowed_models is None else models(sent.allowed_models),
        max_budget_nanos=None if sent.max_budget is None else budget("max_budget", sent.max_budget),
        tpm_limit=None if sent.tpm_limit is None else limit("tpm_limit", sent.tpm_limit),
        rpm_limit=None if sent.rpm_limit is None else limit("rpm_limit", sent.rpm_limit),
        expires_at_ms=None
        if days is None
        else now_ms + expires_days(days, max_expires_days) * DAY_MS,
        metadata=None if sent.metadata is None else metadata(sent.metadata),
        budget=None if sent.budget_duration is None else parse_duration(sent.budget_duration),
        max_parallel=None
        if sent.max_parallel_requests is None
        else limit("max_parallel_requests", sent.max_parallel_requests),
        model_limits=None if sent.model_limits is None else model_limits(sent.model_limits),
        enforce=sent.enforce,
    )
