"""Every Redis key name and field layout the store uses, in one place.

A key's state sits under one hash tag, `vk:{<id>}`, so each operation on one key touches
one Redis Cluster slot and runs as one Lua script. Indexes (admin paths only) sit under
their own tag, `{vkidx}`. The Lua scripts in keys/lua/ read the same field names; this
module is the Python side of that contract (docs/design.md draws the whole layout).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Final

from keys import keygen
from keys.budget import current_reset_ms, first_reset_ms
from keys.errors import InvalidArgument
from keys.model import ALL_MODELS, KeySpec, KeyUpdate, ModelLimit, VirtualKey

# --- key names -----------------------------------------------------------------------


def record_key(key_id: str) -> str:
    """The key's record: one hash with every field below."""
    return f"vk:{{{key_id}}}"


def request_marker_key(key_id: str, request_id: str) -> str:
    """Set once a request id has been charged (idempotent ReportUsage)."""
    return f"vk:{{{key_id}}}:req:{request_id}"


def usage_day_key(key_id: str, day: date) -> str:
    """The key's rollup for one UTC day: `<metric>:<model>` -> integer."""
    return f"vk:{{{key_id}}}:usage:{day.strftime('%Y%m%d')}"


def inflight_key(key_id: str) -> str:
    """The key's open reservations: a sorted set, member = request id, score = the
    instant (ms) the reservation expires. Its own request count is the concurrency slots
    in use; the amounts it holds sum to the record's `reserved`."""
    return f"vk:{{{key_id}}}:inflight"


def model_windows_key(key_id: str) -> str:
    """Per-model RPM/TPM windows (`model_limits`): `s:<model>`, `r:<model>`, `t:<model>`."""
    return f"vk:{{{key_id}}}:mwin"


# --- budgets above the key: users and teams ------------------------------------------

SCOPES: Final = ("user", "team")


def level_key(scope: str, scope_id: str) -> str:
    """A user's or team's budget record (the same money and window fields as a key's,
    `max_parallel` and `created_at`). One hash tag per budget: its own Cluster slot."""
    return f"vb:{{{scope}:{scope_id}}}"


def level_inflight_key(scope: str, scope_id: str) -> str:
    """The budget's open reservations, as `inflight_key` (members are request ids)."""
    return f"vb:{{{scope}:{scope_id}}}:inflight"


def level_marker_key(scope: str, scope_id: str, key_id: str, request_id: str) -> str:
    """Set once a request has been charged at this level (Cluster: each level settles in
    its own script, so each remembers what it charged)."""
    return f"vb:{{{scope}:{scope_id}}}:req:{key_id}:{request_id}"


def budgets_index_key(scope: str) -> str:
    """Every budget of a scope: id -> created_at ms (ListBudgets)."""
    return f"{{vkidx}}:budgets:{scope}"


# --- reservations --------------------------------------------------------------------


def reservation_id(token: str, amount_nanos: int) -> str:
    """`<random>-<nano-USD reserved>`: the id carries its own amount, so an open
    reservation costs one sorted-set entry and nothing else (docs/design.md)."""
    return f"{token}-{amount_nanos}"


def level_keys(scope: str, scope_id: str) -> list[str]:
    """A budget's record and its in-flight set: the keys every level script takes first."""
    return [level_key(scope, scope_id), level_inflight_key(scope, scope_id)]


def scopes_of(user_id: str, team_id: str) -> list[tuple[str, str]]:
    """The budgets a key may sit under, in the order they are checked: (scope, id)."""
    return [(scope, i) for scope, i in (("user", user_id), ("team", team_id)) if i]


def level_member(key_id: str, request_id: str) -> str:
    """A request's in-flight record in a user's or team's set: it names the key, so a
    report under another key of the team cannot close it."""
    return f"{key_id}:{request_id}"


def reservation_amount(request_id: str) -> int:
    """The nano-USD a reservation id holds (0 for an id this server did not issue)."""
    _, sep, amount = request_id.rpartition("-")
    return int(amount) if sep and amount.isdigit() and len(amount) <= 19 else 0


def utc_day(now_ms: int) -> date:
    return datetime.fromtimestamp(now_ms / 1000, tz=UTC).date()


# Live indexes list existing keys (ListKeys); history indexes keep every key a user or
# team ever had, so their usage totals survive DeleteKey.
INDEX_ALL: Final = "{vkidx}:all"


def index_key(kind: str, value: str) -> str:
    """kind: user, team (live keys) or user-hist, team-hist (every key ever)."""
    return f"{{vkidx}}:{kind}:{value}"


def live_indexes(user_id: str, team_id: str) -> list[str]:
    """The indexes that list a live key (removed again by DeleteKey)."""
    return [INDEX_ALL, index_key("user", user_id)] + (
        [index_key("team", team_id)] if team_id else []
    )


def history_indexes(user_id: str, team_id: str) -> list[str]:
    return [index_key("user-hist", user_id)] + (
        [index_key("team-hist", team_id)] if team_id else []
    )


# --- the record's fields -------------------------------------------------------------


def encode_models(models: tuple[str, ...]) -> str:
    """`*`, or the names framed by newlines so the check script can match exactly."""
    if not models or ALL_MODELS in models:
        return ALL_MODELS
    return "\n" + "\n".join(models) + "\n"


def decode_models(stored: str) -> tuple[str, ...]:
    if stored == ALL_MODELS:
        return (ALL_MODELS,)
    return tuple(m for m in stored.split("\n") if m)


MODEL_LIMIT_PREFIX: Final = "ml:"
CLEAR_MODEL_LIMITS: Final = "-ml"  # keys/lua/update.lua: drop every ml: field first


def model_limit_fields(limits: Mapping[str, ModelLimit]) -> dict[str, str]:
    """`ml:<model>` -> "<rpm> <tpm>": check.lua reads one model's limits with one HGET."""
    return {
        f"{MODEL_LIMIT_PREFIX}{model}": f"{limit.rpm_limit} {limit.tpm_limit}"
        for model, limit in limits.items()
    }


def decode_model_limits(f: Mapping[str, str]) -> dict[str, ModelLimit]:
    limits: dict[str, ModelLimit] = {}
    for name, value in f.items():
        if name.startswith(MODEL_LIMIT_PREFIX):
            rpm, _, tpm = value.partition(" ")
            limits[name[len(MODEL_LIMIT_PREFIX) :]] = ModelLimit(int(rpm), int(tpm or 0))
    return dict(sorted(limits.items()))


def live_reserved(reserved_field: str | None, expired_ids: list[str]) -> int:
    """What open reservations hold: the record's `reserved` less what expired ones still
    in the set hold (the scripts release those at the next call)."""
    held = int(reserved_field or 0) - sum(reservation_amount(m) for m in expired_ids)
    return max(held, 0)


def _metadata(values: Mapping[str, str]) -> str:
    return json.dumps(dict(values), separators=(",", ":"))


def new_record(spec: KeySpec, digest: str, now_ms: int) -> dict[str, str | int]:
    """Every field of a new key. `hash` comes first: keys/lua/create.lua reads its value
    (after `now`) as ARGV[3]. `ver` is not here: create.lua's key event sets it to 1."""
    return {
        "hash": digest,
        "name": spec.name,
        "user_id": spec.user_id,
        "team_id": spec.team_id,
        "created_at": now_ms,
        "expires_at": spec.expires_at_ms,
        "status": "active",
        "models": encode_models(spec.allowed_models),
        "max_budget": spec.max_budget_nanos,
        "spent": 0,
        "spent_total": 0,
        "rpm_limit": spec.rpm_limit,
        "tpm_limit": spec.tpm_limit,
        "metadata": _metadata(spec.metadata),
        "last_used": 0,
        "total_requests": 0,
        "win_start": 0,
        "win_requests": 0,
        "win_tokens": 0,
        "budget_duration": spec.budget.duration,
        "budget_period_ms": spec.budget.period_ms,
        "budget_reset_at": first_reset_ms(spec.budget, now_ms),
        "prev_hash": "",
        "prev_hash_until": 0,
        "reserved": 0,
        "max_parallel": spec.max_parallel,
        "enforce": 1 if spec.enforce else 0,
        **model_limit_fields(spec.model_limits),
    }


def changed_fields(change: KeyUpdate, now_ms: int) -> dict[str, str | int]:
    """The fields an UpdateKey rewrites; only what `change` names."""
    fields: dict[str, str | int] = {}
    if change.name is not None:
        fields["name"] = change.name
    if change.allowed_models is not None:
        fields["models"] = encode_models(change.allowed_models)
    if change.max_budget_nanos is not None:
        fields["max_budget"] = change.max_budget_nanos
    if change.tpm_limit is not None:
        fields["tpm_limit"] = change.tpm_limit
    if change.rpm_limit is not None:
        fields["rpm_limit"] = change.rpm_limit
    if change.expires_at_ms is not None:
        fields["expires_at"] = change.expires_at_ms
    if change.metadata is not None:
        fields["metadata"] = _metadata(change.metadata)
    if change.budget is not None:
        fields["budget_duration"] = change.budget.duration
        fields["budget_period_ms"] = change.budget.period_ms
        fields["budget_reset_at"] = first_reset_ms(change.budget, now_ms)
    if change.max_parallel is not None:
        fields["max_parallel"] = change.max_parallel
    if change.enforce is not None:
        fields["enforce"] = 1 if change.enforce else 0
    if change.model_limits is not None:
        fields[CLEAR_MODEL_LIMITS] = 1
        fields.update(model_limit_fields(change.model_limits))
    return fields


REVOKED_FIELDS: Final[Mapping[str, str | int]] = {"status": "revoked"}
# what keys/lua/update.lua tells the ledger a change was (docs/design.md section 12)
UPDATED_EVENT: Final = "updated"
REVOKED_EVENT: Final = "revoked"


def flatten(fields: Mapping[str, str | int]) -> list[str | int]:
    """field, value, field, value, ... as HSET and the scripts take them."""
    return [item for pair in fields.items() for item in pair]


def to_virtual_key(
    key_id: str,
    f: Mapping[str, str],
    now_ms: int,
    *,
    in_flight: int = 0,
    expired_ids: list[str] | None = None,
) -> VirtualKey:
    """The record as of `now_ms`: a budget period that has ended reads as reset, and
    reservations that have expired as released, as the next script call will make them.
    `in_flight` and `expired_ids` come from the key's in-flight set."""
    reset_at = int(f.get("budget_reset_at") or 0)
    rolled = reset_at != 0 and now_ms >= reset_at
    return VirtualKey(
        id=key_id,
        name=f.get("name", ""),
        user_id=f.get("user_id", ""),
        team_id=f.get("team_id", ""),
        created_at_ms=int(f.get("created_at", 0)),
        expires_at_ms=int(f.get("expires_at", 0)),
        revoked=f.get("status") == "revoked",
        allowed_models=decode_models(f.get("models", ALL_MODELS)),
        max_budget_nanos=int(f.get("max_budget", 0)),
        spent_nanos=0 if rolled else int(f.get("spent", 0)),
        tpm_limit=int(f.get("tpm_limit", 0)),
        rpm_limit=int(f.get("rpm_limit", 0)),
        metadata=json.loads(f.get("metadata", "{}")),
        last_used_ms=int(f.get("last_used", 0)),
        total_requests=int(f.get("total_requests", 0)),
        window_start_ms=int(f.get("win_start", 0)),
        window_requests=int(f.get("win_requests", 0)),
        window_tokens=int(f.get("win_tokens", 0)),
        budget_duration=f.get("budget_duration", ""),
        budget_reset_at_ms=current_reset_ms(reset_at, int(f.get("budget_period_ms") or 0), now_ms),
        reserved_nanos=live_reserved(f.get("reserved"), expired_ids or []),
        in_flight=in_flight,
        max_parallel=int(f.get("max_parallel") or 0),
        model_limits=decode_model_limits(f),
        enforce=f.get("enforce", "1") != "0",
    )


# --- ListKeys cursors ----------------------------------------------------------------


def encode_cursor(score: int, key_id: str) -> str:
    """A (created_at, id) position in an index, opaque to callers."""
    return base64.urlsafe_b64encode(f"{score}:{key_id}".encode()).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        score, key_id = raw.split(":", 1)
        if not keygen.is_key_id(key_id):
            raise ValueError(key_id)
        return int(score), key_id
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidArgument("page_token is not one this server issued") from None
