"""keys.v1 messages <-> domain values, both ways: the one place that knows both shapes.

Requests become `validation.KeyFields` (typed proto fields, or the JSON object of a REST
POST or PATCH), so every field is checked by one rule in `keys.validation`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from extauthz import json_fields as jf
from extauthz.settings import Settings
from keys import validation
from keys.budget import NO_PERIOD
from keys.errors import InvalidArgument
from keys.model import ALL_MODELS, KeySpec, KeyUpdate, UsageSummary, VirtualKey, WindowCount
from keys.money import nanos_to_usd
from keys.v1 import keys_pb2
from keys.validation import CHANGEABLE_FIELDS, KeyFields


def timestamp(ms: int) -> Timestamp | None:
    if not ms:
        return None
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def key_data(key: VirtualKey, now_ms: int) -> keys_pb2.KeyData:
    remaining = key.budget_remaining_nanos
    return keys_pb2.KeyData(
        id=key.id,
        name=key.name,
        user_id=key.user_id,
        team_id=key.team_id,
        created_at=timestamp(key.created_at_ms),
        expires_at=timestamp(key.expires_at_ms),
        status=key.status(now_ms).value,
        allowed_models=list(key.allowed_models),
        max_budget=nanos_to_usd(key.max_budget_nanos),
        spent=nanos_to_usd(key.spent_nanos),
        budget_remaining=None if remaining is None else nanos_to_usd(remaining),
        tpm_limit=key.tpm_limit,
        rpm_limit=key.rpm_limit,
        metadata=dict(key.metadata),
        last_used=timestamp(key.last_used_ms),
        total_requests=key.total_requests,
        budget_duration=key.budget_duration,
        budget_reset_at=timestamp(key.budget_reset_at_ms),
        reserved=nanos_to_usd(key.reserved_nanos),
        in_flight=key.in_flight,
        max_parallel_requests=key.max_parallel,
        model_limits={
            m: keys_pb2.ModelLimit(rpm_limit=lim.rpm_limit, tpm_limit=lim.tpm_limit)
            for m, lim in key.model_limits.items()
        },
        enforce=key.enforce,
    )


def window_usage(window: WindowCount) -> keys_pb2.WindowUsage:
    return keys_pb2.WindowUsage(
        limit=window.limit,
        current=window.used,
        remaining=window.remaining,
        reset_ms=window.reset_ms,
    )


def usage(summary: UsageSummary) -> keys_pb2.GetUsageResponse:
    rows = [
        keys_pb2.UsageRow(
            date=row.date,
            model=row.model,
            requests=row.requests,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            cost=nanos_to_usd(row.cost_nanos),
        )
        for row in summary.rows
    ]
    prompt = sum(r.prompt_tokens for r in summary.rows)
    completion = sum(r.completion_tokens for r in summary.rows)
    totals = keys_pb2.UsageTotals(
        requests=sum(r.requests for r in summary.rows),
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cost=nanos_to_usd(sum(r.cost_nanos for r in summary.rows)),
    )
    return keys_pb2.GetUsageResponse(
        rows=rows,
        totals=totals,
        start_date=summary.start_date,
        end_date=summary.end_date,
        key_ids=list(summary.key_ids),
    )


# --- requests -> domain ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewKey:
    """A CreateKey request as sent, from either wire shape: the key's fields and the ids
    it names (the owner is checked against `x-user-id` before the key is built)."""

    fields: KeyFields
    user_id: str = ""
    team_id: str = ""


def new_key(request: keys_pb2.CreateKeyRequest) -> NewKey:
    """CreateKey's typed fields (gRPC) or `spec` (the REST body), never both."""
    if request.spec.fields:  # Envoy sends an empty spec for an empty body
        typed = [f.name for f, _ in request.ListFields() if f.name != "spec"]
        if typed:
            raise InvalidArgument(
                f"send the key either in spec or as fields, not both (fields: {', '.join(typed)})"
            )
        return new_key_from_json(json_format.MessageToDict(request.spec))
    has = request.HasField
    return NewKey(
        KeyFields(
            name=request.name,
            # a repeated field cannot say "sent empty": left out, it means every model
            allowed_models=list(request.allowed_models) or None,
            max_budget=request.max_budget if has("max_budget") else None,
            tpm_limit=request.tpm_limit if has("tpm_limit") else None,
            rpm_limit=request.rpm_limit if has("rpm_limit") else None,
            expires_days=request.expires_days if has("expires_days") else None,
            metadata=dict(request.metadata),
            budget_duration=request.budget_duration,
            max_parallel_requests=request.max_parallel_requests
            if has("max_parallel_requests")
            else None,
            model_limits=_limits(request.model_limits) or None,
            enforce=request.enforce if has("enforce") else None,
        ),
        user_id=request.user_id,
        team_id=request.team_id,
    )


def key_spec(new: NewKey, settings: Settings, now_ms: int, user_id: str) -> KeySpec:
    """CreateKey: the fields sent, checked, and the environment's defaults for the rest;
    `user_id` is the owner `access.owner_of_new_key` settled on."""
    f = new.fields
    sent = replace(
        f,
        name=f.name or "",  # required: checked, so "name is required" when left out
        expires_days=settings.max_expires_days if f.expires_days is None else f.expires_days,
    )
    c = validation.key_changes(sent, max_expires_days=settings.max_expires_days, now_ms=now_ms)
    assert c.name is not None and c.expires_at_ms is not None  # sent above, so checked
    return KeySpec(
        name=c.name,
        user_id=validation.text(
            "user_id", user_id, required=True, max_chars=validation.MAX_ID_CHARS
        ),
        team_id=validation.text(
            "team_id", new.team_id, required=False, max_chars=validation.MAX_ID_CHARS
        ),
        expires_at_ms=c.expires_at_ms,
        allowed_models=c.allowed_models or (ALL_MODELS,),
        max_budget_nanos=settings.default_budget_nanos
        if c.max_budget_nanos is None
        else c.max_budget_nanos,
        tpm_limit=settings.default_tpm if c.tpm_limit is None else c.tpm_limit,
        rpm_limit=settings.default_rpm if c.rpm_limit is None else c.rpm_limit,
        metadata=c.metadata or {},
        budget=c.budget or NO_PERIOD,
        max_parallel=settings.default_parallel if c.max_parallel is None else c.max_parallel,
        model_limits=c.model_limits or {},
        enforce=True if c.enforce is None else c.enforce,
    )


def key_update(
    request: keys_pb2.UpdateKeyRequest,
    settings: Settings,
    now_ms: int,
    metadata: Mapping[str, str],
) -> tuple[KeyUpdate, list[str]]:
    """UpdateKey: the checked changes and the names of the fields they touch (for the audit
    line). The typed fields (gRPC) or `patch` (the REST body), never both; `metadata` is
    the key's current map, which a patch merges into."""
    typed = [f.name for f, _ in request.ListFields() if f.name not in ("id", "patch")]
    if request.patch.fields:  # Envoy sends an empty patch for an empty body
        if typed:
            raise InvalidArgument(
                f"send changes either in patch or as fields, not both (fields: {', '.join(typed)})"
            )
        sent = key_fields_from_json(
            json_format.MessageToDict(request.patch), metadata, key_id=request.id
        )
    else:
        sent = _typed_fields(request)
    change = validation.key_changes(sent, max_expires_days=settings.max_expires_days, now_ms=now_ms)
    return change, sent.sent()


def _typed_fields(request: keys_pb2.UpdateKeyRequest) -> KeyFields:
    has = request.HasField
    return KeyFields(
        name=request.name if has("name") else None,
        allowed_models=list(request.allowed_models.models) if has("allowed_models") else None,
        max_budget=request.max_budget if has("max_budget") else None,
        tpm_limit=request.tpm_limit if has("tpm_limit") else None,
        rpm_limit=request.rpm_limit if has("rpm_limit") else None,
        expires_days=request.expires_days if has("expires_days") else None,
        metadata=dict(request.metadata.entries) if has("metadata") else None,
        budget_duration=request.budget_duration if has("budget_duration") else None,
        max_parallel_requests=request.max_parallel_requests
        if has("max_parallel_requests")
        else None,
        model_limits=_limits(request.model_limits.limits) if has("model_limits") else None,
        enforce=request.enforce if has("enforce") else None,
    )


def _limits(limits: Mapping[str, keys_pb2.ModelLimit]) -> dict[str, dict[str, int]]:
    return {m: {"rpm_limit": v.rpm_limit, "tpm_limit": v.tpm_limit} for m, v in limits.items()}


# A key's other fields, as GetKey shows them: sending one back is a clear error, not a no-op.
READ_ONLY_FIELDS = tuple(
    f.name for f in keys_pb2.KeyData.DESCRIPTOR.fields if f.name not in CHANGEABLE_FIELDS
)
_HINTS = {
    "expires_at": "send expires_days",
    "status": "revoke with POST /api/keys/{id}/revoke",
}


def key_fields_from_json(
    body: Mapping[str, object], metadata: Mapping[str, str] | None = None, key_id: str = ""
) -> KeyFields:
    """A REST PATCH body: the JSON shapes CreateKey takes and GetKey returns, strictly.
    Unknown fields and fields that cannot change are errors that name them (`id` may be
    sent if it is the key's own). `metadata` merges into the key's current map (RFC 7396:
    an entry set to null is removed), so nothing is erased that the body does not name."""
    fields = jf.by_name(
        body,
        CHANGEABLE_FIELDS + READ_ONLY_FIELDS,
        "fields that can change",
        offered=CHANGEABLE_FIELDS,
    )
    if key_id and fields.get("id") == key_id:
        del fields["id"]  # a key's data sent back as GetKey returned it
    fixed = [n for n in fields if n in READ_ONLY_FIELDS]
    if fixed:
        hints = [f"{n}: {_HINTS[n]}" for n in fixed if n in _HINTS]
        raise InvalidArgument(
            f"fields that cannot be changed: {', '.join(fixed)}"
            + (f" ({'; '.join(hints)})" if hints else "")
        )
    parsed = {n: _JSON_TYPES[n](n, v) for n, v in fields.items()}
    if "metadata" in parsed:
        merged = dict(metadata or {})
        for k, v in parsed["metadata"].items():
            if v is None:
                merged.pop(k, None)
            else:
                merged[k] = v
        parsed["metadata"] = merged
    return KeyFields(**parsed)


# What a new key takes: its changeable fields and the ids that place it.
CREATE_FIELDS = ("name", "user_id", "team_id", *(n for n in CHANGEABLE_FIELDS if n != "name"))


def new_key_from_json(body: Mapping[str, object]) -> NewKey:
    """A REST POST body: the JSON shapes of CreateKeyRequest's fields, strictly. An unknown
    field (a typo like `rpm_limitt`) is an error naming it, never a key whose limit quietly
    took the default."""
    fields = jf.by_name(body, CREATE_FIELDS, "fields a new key takes")
    user_id = jf.string("user_id", fields.pop("user_id", ""))
    team_id = jf.string("team_id", fields.pop("team_id", ""))
    parsed = {n: _CREATE_TYPES.get(n, _JSON_TYPES[n])(n, v) for n, v in fields.items()}
    return NewKey(KeyFields(**parsed), user_id=user_id, team_id=team_id)


def _metadata_patch(field: str, value: object) -> dict[str, str | None]:
    if not isinstance(value, dict) or not all(
        v is None or isinstance(v, str) for v in value.values()
    ):
        raise InvalidArgument(
            f'{field} must be an object of strings (null removes an entry), like {{"env": "prod"}}'
        )
    return {str(k): v for k, v in value.items()}


def _metadata(field: str, value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidArgument(f'{field} must be an object of strings, like {{"env": "prod"}}')
    return {str(k): v for k, v in value.items()}


def _model_limits(field: str, value: object) -> dict[str, dict[str, int]]:
    example = '{"gpt-4o": {"rpm_limit": 10, "tpm_limit": 20000}}'
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise InvalidArgument(f"{field} must be an object like {example}")
    return {
        str(model): {str(k): jf.whole(f"{field} {k}", v) for k, v in limits.items()}
        for model, limits in value.items()
    }


_JSON_TYPES: dict[str, Callable[[str, object], Any]] = {
    "name": jf.string,
    "allowed_models": jf.strings,
    "max_budget": jf.number,
    "tpm_limit": jf.whole,
    "rpm_limit": jf.whole,
    "expires_days": jf.whole,
    "metadata": _metadata_patch,
    "budget_duration": jf.string,
    "max_parallel_requests": jf.whole,
    "model_limits": _model_limits,
    "enforce": jf.boolean,
}
# A new key's map has nothing to merge into: a null entry is a wrong type, not a removal.
_CREATE_TYPES: dict[str, Callable[[str, object], Any]] = {"metadata": _metadata}
