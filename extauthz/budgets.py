"""keys.v1.BudgetService: user and team budgets, set and read by the admin.

The caller policy is extauthz/access.py's, the checks and the store keys/budgets.py's. The
proto <-> domain mapping of budgets lives here, beside its only user, with the strict reading
of the REST body (SetBudgetRequest.spec), which Envoy's transcoder cannot give.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

from google.protobuf import json_format

from extauthz import convert
from extauthz import json_fields as jf
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


def config_from_json(body: Mapping[str, object]) -> dict[str, Any]:
    """A REST PUT body, strictly: Envoy's transcoder would drop an unknown field silently,
    so a typo (`rpm_limitt`) would set a budget without the limit meant. Unknown fields,
    fields that cannot be set and values of the wrong JSON type are errors naming them;
    lowerCamelCase names count, as in proto3 JSON. A field left out is 0 / "", as in the
    typed request."""
    fields = jf.by_name(
        body, CONFIG_FIELDS + READ_ONLY_FIELDS, "a budget takes", offered=CONFIG_FIELDS
    )
    fixed = sorted(n for n in fields if n in READ_ONLY_FIELDS)
    if fixed:
        raise InvalidArgument(
            f"fields that cannot be set: {', '.join(fixed)} (scope and id come from the "
            f"path); a budget takes: {', '.join(CONFIG_FIELDS)}"
        )
    config: dict[str, Any] = {
        "max_budget": 0.0,
        "budget_duration": "",
        "rpm_limit": 0,
        "tpm_limit": 0,
        "max_parallel_requests": 0,
    }
    for name, value in fields.items():
        config[name] = _JSON_TYPES[name](name, value)
    return config


_JSON_TYPES: Final[dict[str, Callable[[str, object], Any]]] = {
    "max_budget": jf.number,
    "budget_duration": jf.string,
    "rpm_limit": jf.whole,
    "tpm_limit": jf.whole,
    "max_parallel_requests": jf.whole,
}


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
        budget_reset_at=convert.timestamp(budget.budget_reset_at_ms),
        created_at=convert.timestamp(budget.created_at_ms),
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
