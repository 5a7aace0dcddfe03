"""The Check decision, free of any protocol: Envoy's Check and nginx's /auth both ask
`Decider.decide` and render its `Outcome` (extauthz/responses.py).

Cost order: a request is refused as cheaply as possible. A missing or malformed key
never reaches Redis; a request whose body is large asks Redis about the key first
(`KeyStore.authenticate`) and reads the body only for a key Redis accepted, so a made-up
key with a megabyte of JSON costs one small script, not a parse.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Final, TypeVar

from extauthz.metrics import Metrics
from extauthz.request import presented_key
from keys.errors import StoreUnavailable
from keys.keygen import ParsedKey
from keys.model import BodyModel, Decision, Level, Reason, RequestedModel
from keys.pricing import PriceTable
from keys.reservation import FREE, Estimate, estimate
from keys.store import KeyStore

log = logging.getLogger("extauthz.decision")
T = TypeVar("T")

LARGE_BODY_BYTES: Final = 64 * 1024
"""Bodies above this are parsed only after Redis has accepted the key."""


class Verdict(Enum):
    PUBLIC = "public"
    ALLOW = "allow"
    DENY = "deny"
    UNVERIFIED = "unverified"  # fail-open while Redis is unreachable
    KEY_VERIFIED = "key_verified"  # the key-first phase passed; the full Check follows


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    decision: Decision
    model: RequestedModel | None = None
    estimate: Estimate = FREE  # what the Check reserved (or would have)
    # allowed with max_tokens lowered to this, so that the budget covers it (0: not)
    clamped_to: int = 0


PUBLIC: Final = Outcome(Verdict.PUBLIC, Decision(Reason.OK))
NO_KEY: Final = Outcome(Verdict.DENY, Decision(Reason.INVALID_API_KEY))
PUBLIC_METHODS: Final = frozenset({"GET", "HEAD"})


class Decider:
    def __init__(
        self,
        store: KeyStore,
        metrics: Metrics,
        prices: PriceTable,
        *,
        public_paths: frozenset[str],
        fail_open: bool,
        reserve_output_tokens: int = 4096,
        min_clamped_tokens: int = 0,
    ) -> None:
        self.reserve_output_tokens = reserve_output_tokens
        # clamping instead of 402 where the route allows it (0: never)
        self.min_clamped_tokens = min_clamped_tokens
        self.store = store
        self.metrics = metrics
        self.prices = prices
        self.public_paths = public_paths
        self.fail_open = fail_open

    def is_public(self, path: str, method: str) -> bool:
        """A public path, asked for with GET or HEAD (any other method needs a key)."""
        return path.partition("?")[0] in self.public_paths and method.upper() in PUBLIC_METHODS

    async def decide(
        self,
        path: str,
        headers: Mapping[str, str],
        model_of: Callable[[], RequestedModel],
        *,
        method: str = "GET",
        body_bytes: int = 0,
        clamp: bool = False,
    ) -> Outcome:
        """`model_of` reads the model (Envoy: from the body; nginx: from x-model); it
        runs only once a well-formed key makes it worth the work, and for a body over
        LARGE_BODY_BYTES only once Redis has accepted the key. `clamp`: the route runs
        the usage tap, which can lower the body's max_tokens (`_clamp`)."""
        started = time.perf_counter()
        outcome = await self._decide(path, headers, model_of, method, body_bytes, clamp)
        self._observe(outcome, time.perf_counter() - started)
        return outcome

    async def _decide(
        self,
        path: str,
        headers: Mapping[str, str],
        model_of: Callable[[], RequestedModel],
        method: str,
        body_bytes: int,
        clamp: bool,
    ) -> Outcome:
        key = self._key_or_outcome(path, headers, method)
        if isinstance(key, Outcome):
            return key
        model: RequestedModel | None = None
        try:
            if body_bytes > LARGE_BODY_BYTES and (refused := await self._refused(key)):
                return refused
            model = model_of()
            cost = estimate(self.prices, model, self.reserve_output_tokens)
            decision = await self._check(key, model, cost)
            if clamp and self._clampable(decision, model):
                clamped = await self._clamp(key, model, cost, decision)
                if clamped is not None:
                    return clamped
        except StoreUnavailable:
            return self._unavailable(key, Verdict.UNVERIFIED, model)
        verdict = Verdict.ALLOW if decision.allowed else Verdict.DENY
        return Outcome(verdict, decision, model, cost)

    async def _check(self, key: ParsedKey, model: RequestedModel, cost: Estimate) -> Decision:
        started = time.perf_counter()
        try:
            return await self.store.check(
                key,
                model,
                reserve_nanos=cost.amount_nanos,
                priced=cost.priced,
                family=self.prices.family(model.name) if model.name else "",
            )
        finally:
            self.metrics.redis_check_latency.observe(time.perf_counter() - started)

    def _clampable(self, decision: Decision, model: RequestedModel) -> bool:
        """A budget refusal the tap could turn into a shorter answer: the body was read
        whole (the tap rewrites what Check priced), and money is reserved (the clamp
        must fit a reservation)."""
        return (
            decision.reason is Reason.BUDGET_EXCEEDED
            and self.min_clamped_tokens > 0
            and model.kind is BodyModel.NAMED
            and self.store.budget_mode == "reserve"
        )

    async def _clamp(
        self, key: ParsedKey, model: RequestedModel, cost: Estimate, refused: Decision
    ) -> Outcome | None:
        """Ask again for the max_tokens the refusing budget still covers (each of key,
        user and team may refuse in turn, with less free), down to
        EXTAUTHZ_MIN_CLAMPED_TOKENS. None where no attempt was made (the first 402
        stands), else the last attempt's outcome. Each attempt is the same atomic Check,
        so what it reserves fits: a clamp never overshoots."""
        denied: Outcome | None = None  # the latest refusal of a clamped attempt
        decision = refused
        for _ in Level.KEY, Level.USER, Level.TEAM:
            tokens = cost.max_tokens_within(decision.free_nanos)
            if tokens < self.min_clamped_tokens or tokens >= cost.output_tokens:
                break
            model = replace(model, output_cap=tokens)
            cost = estimate(self.prices, model, self.reserve_output_tokens)
            decision = await self._check(key, model, cost)
            if decision.allowed:
                return Outcome(Verdict.ALLOW, decision, model, cost, clamped_to=tokens)
            denied = Outcome(Verdict.DENY, decision, model, cost)
            if decision.reason is not Reason.BUDGET_EXCEEDED:
                break
        return denied

    async def verify_key(
        self, path: str, headers: Mapping[str, str], *, method: str = "GET"
    ) -> Outcome:
        """The key-first phase (envoy.yaml's `key_first` filter, for requests whose body
        may be large): the key's own steps only, before Envoy buffers the body. Counts
        nothing; the full `decide` that follows counts the request."""
        started = time.perf_counter()
        outcome = await self._verify_key(path, headers, method)
        self._observe(outcome, time.perf_counter() - started)
        return outcome

    async def _verify_key(self, path: str, headers: Mapping[str, str], method: str) -> Outcome:
        key = self._key_or_outcome(path, headers, method)
        if isinstance(key, Outcome):
            return key
        try:
            refused = await self._refused(key)
        except StoreUnavailable:
            # fail-open: the full Check that follows decides, and marks, the request
            return self._unavailable(key, Verdict.KEY_VERIFIED)
        return refused or Outcome(Verdict.KEY_VERIFIED, Decision(Reason.OK, key.key_id))

    def _key_or_outcome(
        self, path: str, headers: Mapping[str, str], method: str
    ) -> ParsedKey | Outcome:
        """The steps that need no Redis: a public path, else a well-formed key."""
        if self.is_public(path, method):
            return PUBLIC
        key = presented_key(headers)
        return NO_KEY if key is None else key

    async def _refused(self, key: ParsedKey) -> Outcome | None:
        """authenticate.lua's denial for a key Redis will not accept, or None."""
        reason = await self._timed("authenticate", self.store.authenticate(key))
        return None if reason is Reason.OK else Outcome(Verdict.DENY, Decision(reason, key.key_id))

    def _unavailable(
        self, key: ParsedKey, fail_open: Verdict, model: RequestedModel | None = None
    ) -> Outcome:
        """Redis could not answer: 503, or `fail_open` when EXTAUTHZ_FAIL_OPEN is set."""
        self.metrics.redis_errors.labels("check").inc()
        if self.fail_open:
            return Outcome(fail_open, Decision(Reason.OK, key.key_id), model)
        return Outcome(Verdict.DENY, Decision(Reason.AUTH_UNAVAILABLE, key.key_id), model)

    async def _timed(self, op: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await call
        finally:
            self.metrics.redis_latency.labels(op).observe(time.perf_counter() - started)

    def _observe(self, outcome: Outcome, seconds: float) -> None:
        decision = outcome.decision
        label = outcome.verdict.value if decision.allowed else decision.reason.value
        self.metrics.observe_check(label, seconds)
        if outcome.verdict is Verdict.ALLOW:
            self.metrics.count_request(decision.key_id, self._model_label(outcome))
            self.metrics.count_reservation(decision, outcome.estimate.amount_nanos)
            if decision.would_deny is not None:
                self.metrics.shadow_denials.labels(decision.would_deny.value).inc()
            log.debug("allowed", extra={"key_id": decision.key_id})
        elif outcome.verdict is Verdict.DENY:
            self.metrics.validation_failures.labels(decision.reason.value).inc()
            self.metrics.reservations_expired.inc(decision.expired)
            log.info(
                "denied",
                extra={
                    "key_id": decision.key_id or None,
                    "reason": decision.reason.value,
                    "limit": decision.limit_hit,
                    "limit_level": decision.level.value,
                },
            )
        elif outcome.verdict is Verdict.UNVERIFIED:
            log.warning("allowed unverified (fail-open)", extra={"key_id": decision.key_id})

    def _model_label(self, outcome: Outcome) -> str:
        model = outcome.model
        if model is None or model.kind is not BodyModel.NAMED:
            return "none" if model is None or model.kind is BodyModel.NO_BODY else "unknown"
        return self.prices.label(model.name)
