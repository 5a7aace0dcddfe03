"""keys.v1.BudgetService: user and team budgets, set and read by the admin.

The caller policy is extauthz/access.py's, the checks and the store keys/budgets.py's. The
proto <-> domain mapping of budgets lives here, beside its only user, with the strict reading
of the REST body (SetBudgetRequest.spec), which Envoy's transcoder cannot give.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Final

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from extauthz.access import Context, check_budget_scope, require_admin
from extauthz.auth import metadata_value
from extauthz.errors import rpc_errors
from extauthz.settings import Settings
from keys.budgets import (
    BudgetSpec,
    BudgetStore,
    LevelBudget,
    budget_spec,
    checked_id,
    checked_scope,
)
from keys.errors import InvalidArgument
from keys.money import nanos_to_usd
from keys.v1 import keys_pb2, keys_pb2_grpc

log = logging.getLogger("extauthz.budgets")


# --- proto <-> domain ------------------------------------------------------------------


# What SetBudget configures; the rest of a Budget is counted or fixed by the server.
CONFIG_FIELDS: Final = (
    "max_budget",
    "budget_duration",
    "rpm_limit",
    "tpm_limit",
    "max_parallel_requests",
)
READ_ONLY_FIELDS: Final = tuple(
    f.name for f in keys_pb2.Budget.DESCRIPTOR.fields if f.name not in CONFIG_FIELDS
)
_MAX_NAMED = 10


def spec_from(request: keys_pb2.SetBudgetRequest) -> BudgetSpec:
    """SetBudget's typed fields (gRPC) or `spec` (the REST body), never both."""
    if request.spec.fields:  # Envoy sends an empty spec for an empty body
        typed = [f.name for f, _ in request.ListFields() if f.name not in ("scope", "id", "spec")]
        if typed:
            raise InvalidArgument(
                "send the budget either in spec or as fields, not both "
                f"(fields: {', '.join(typed)})"
            )
        config = config_from_json(json_format.MessageToDict(request.spec))
    else:
        config = {name: getattr(request, name) for name in CONFIG_FIELDS}
    return budget_spec(request.scope, request.id, **config)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _quoted(names: list[str]) -> str:
    """Names the client sent, bounded, so an error never echoes unbounded input."""
    shown = ", ".join(json.dumps(n[:64]) for n in names[:_MAX_NAMED])
    more = len(names) - _MAX_NAMED
    return shown + (f" and {more} more" if more > 0 else "")


def config_from_json(body: Mapping[str, object]) -> dict[str, Any]:
    """A REST PUT body, strictly: Envoy's transcoder would drop an unknown field silently,
    so a typo (`rpm_limitt`) would set a budget without the limit meant. Unknown fields,
    fields that cannot be set and values of the wrong JSON type are errors naming them;
    lowerCamelCase names count, as in proto3 JSON. A field left out is 0 / "", as in the
    typed request."""
    aliases = {alias: n for n in CONFIG_FIELDS + READ_ONLY_FIELDS for alias in (n, _camel(n))}
    unknown = sorted(k for k in body if k not in aliases)
    takes = f"a budget takes: {', '.join(CONFIG_FIELDS)}"
    if unknown:
        raise InvalidArgument(f"unknown fields: {_quoted(unknown)}; {takes}")
    fixed = sorted({aliases[k] for k in body if aliases[k] in READ_ONLY_FIELDS})
    if fixed:
        raise InvalidArgument(
            f"fields that cannot be set: {', '.join(fixed)} (scope and id come from the "
            f"path); {takes}"
        )
    config: dict[str, Any] = {
        "max_budget": 0.0,
        "budget_duration": "",
        "rpm_limit": 0,
        "tpm_limit": 0,
        "max_parallel_requests": 0,
    }
    seen: set[str] = set()
    for alias, value in body.items():
        name = aliases[alias]
        if name in seen:
            raise InvalidArgument(f"{name} is sent twice")
        seen.add(name)
        config[name] = _JSON_TYPES[name](name, value)
    return config


def _number(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{field} must be a number")
    return float(value)


def _whole(field: str, value: object) -> int:
    number = _number(field, value)
    if not math.isfinite(number) or not number.is_integer():
        raise InvalidArgument(f"{field} must be a whole number")
    return int(number)


def _string(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{field} must be a string")
    return value


_JSON_TYPES: Final[dict[str, Callable[[str, object], Any]]] = {
    "max_budget": _number,
    "budget_duration": _string,
    "rpm_limit": _whole,
    "tpm_limit": _whole,
    "max_parallel_requests": _whole,
}


def _timestamp(ms: int) -> Timestamp | None:
    if not ms:
        return None
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def budget_message(budget: LevelBudget) -> keys_pb2.Budget:
    remaining = budget.budget_remaining_nanos
    return keys_pb2.Budget(
        scope=budget.scope,
        id=budget.id,
        max_budget=nanos_to_usd(budget.max_budget_nanos),
        budget_duration=budget.budget.duration,
        rpm_limit=budget.rpm_limit,
        tpm_limit=budget.tpm_limit,
        max_parallel_requests=budget.max_parallel,
        spent=nanos_to_usd(budget.spent_nanos),
        reserved=nanos_to_usd(budget.reserved_nanos),
        in_flight=budget.in_flight,
        budget_remaining=None if remaining is None else nanos_to_usd(remaining),
        budget_reset_at=_timestamp(budget.budget_reset_at_ms),
        created_at=_timestamp(budget.created_at_ms),
    )


# --- the servicer ----------------------------------------------------------------------


class BudgetService(keys_pb2_grpc.BudgetServiceServicer):
    def __init__(self, store: BudgetStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def _audit(self, context: Context, action: str, scope: str, scope_id: str) -> None:
        """Who (the admin token's holder, from this peer), what, which budget."""
        log.info(
            action,
            extra={
                "action": action,
                "budget_scope": scope,
                "budget_id": scope_id,
                "actor": "admin",
                "on_behalf_of": metadata_value(context, "x-user-id"),
                "peer": context.peer(),
            },
        )

    @rpc_errors
    async def SetBudget(
        self, request: keys_pb2.SetBudgetRequest, context: Context
    ) -> keys_pb2.Budget:
        user = await require_admin(context, self.settings)
        spec = spec_from(request)
        await check_budget_scope(context, user)
        budget = await self.store.set(spec)
        self._audit(context, "budget set", spec.scope, spec.id)
        return budget_message(budget)

    @rpc_errors
    async def GetBudget(
        self, request: keys_pb2.GetBudgetRequest, context: Context
    ) -> keys_pb2.Budget:
        user = await require_admin(context, self.settings)
        scope, scope_id = checked_scope(request.scope), checked_id(request.id)
        await check_budget_scope(context, user, reads=(scope, scope_id))
        return budget_message(await self.store.get(scope, scope_id))

    @rpc_errors
    async def ListBudgets(
        self, request: keys_pb2.ListBudgetsRequest, context: Context
    ) -> keys_pb2.ListBudgetsResponse:
        user = await require_admin(context, self.settings)
        scope = checked_scope(request.scope)
        await check_budget_scope(context, user)
        budgets = await self.store.list(scope)
        return keys_pb2.ListBudgetsResponse(budgets=[budget_message(b) for b in budgets])

    @rpc_errors
    async def DeleteBudget(
        self, request: keys_pb2.DeleteBudgetRequest, context: Context
    ) -> keys_pb2.DeleteBudgetResponse:
        user = await require_admin(context, self.settings)
        scope, scope_id = checked_scope(request.scope), checked_id(request.id)
        await check_budget_scope(context, user)
        await self.store.delete(scope, scope_id)
        self._audit(context, "budget deleted", scope, scope_id)
        return keys_pb2.DeleteBudgetResponse(scope=scope, id=scope_id)
