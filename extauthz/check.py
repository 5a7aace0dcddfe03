"""Authorization.Check: request attributes -> a decision from the store -> a CheckResponse.

`Decider` holds the protocol-free part so nginx's /auth answers exactly like Envoy's Check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from extauthz import responses
from extauthz.metrics import Metrics
from extauthz.request import is_public, presented_key, requested_model
from keys.errors import StoreUnavailable
from keys.model import BodyModel, Decision, Reason, RequestedModel
from keys.pricing import PriceTable
from keys.store import KeyStore

log = logging.getLogger("extauthz.check")


class Verdict(Enum):
    PUBLIC = "public"
    ALLOW = "allow"
    DENY = "deny"
    UNVERIFIED = "unverified"  # fail-open while Redis is unreachable


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    decision: Decision
    model: RequestedModel | None = None


_PUBLIC = Outcome(Verdict.PUBLIC, Decision(Reason.OK))
_NO_KEY = Outcome(Verdict.DENY, Decision(Reason.INVALID_API_KEY))


class Decider:
    def __init__(
        self,
        store: KeyStore,
        metrics: Metrics,
        prices: PriceTable,
        *,
        public_paths: frozenset[str],
        fail_open: bool,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.prices = prices
        self.public_paths = public_paths
        self.fail_open = fail_open

    async def decide(
        self,
        path: str,
        headers: Mapping[str, str],
        model_of: Callable[[], RequestedModel],
    ) -> Outcome:
        """`model_of` reads the model (Envoy: from the body; nginx: from x-model) only
        once a well-formed key makes it worth the work."""
        started = time.perf_counter()
        outcome = await self._decide(path, headers, model_of)
        self._observe(outcome, time.perf_counter() - started)
        return outcome

    async def _decide(
        self,
        path: str,
        headers: Mapping[str, str],
        model_of: Callable[[], RequestedModel],
    ) -> Outcome:
        if is_public(path, headers, self.public_paths):
            return _PUBLIC
        key = presented_key(headers)
        if key is None:
            return _NO_KEY
        model = model_of()
        started = time.perf_counter()
        try:
            decision = await self.store.check(key, model)
        except StoreUnavailable:
            self.metrics.redis_errors.labels("check").inc()
            if self.fail_open:
                return Outcome(Verdict.UNVERIFIED, Decision(Reason.OK, key.key_id), model)
            return Outcome(Verdict.DENY, Decision(Reason.AUTH_UNAVAILABLE, key.key_id), model)
        finally:
            self.metrics.redis_check_latency.observe(time.perf_counter() - started)
        verdict = Verdict.ALLOW if decision.allowed else Verdict.DENY
        return Outcome(verdict, decision, model)

    def _observe(self, outcome: Outcome, seconds: float) -> None:
        decision = outcome.decision
        label = outcome.verdict.value if decision.allowed else decision.reason.value
        self.metrics.observe_check(label, seconds)
        if outcome.verdict is Verdict.ALLOW:
            self.metrics.count_request(decision.key_id, self._model_label(outcome))
            log.debug("allowed", extra={"key_id": decision.key_id})
        elif outcome.verdict is Verdict.DENY:
            self.metrics.validation_failures.labels(decision.reason.value).inc()
            log.info(
                "denied",
                extra={
                    "key_id": decision.key_id or None,
                    "reason": decision.reason.value,
                    "limit": decision.limit_hit or None,
                },
            )
        elif outcome.verdict is Verdict.UNVERIFIED:
            log.warning("allowed unverified (fail-open)", extra={"key_id": decision.key_id})

    def _model_label(self, outcome: Outcome) -> str:
        model = outcome.model
        if model is None or model.kind is not BodyModel.NAMED:
            return "none" if model is None or model.kind is BodyModel.NO_BODY else "unknown"
        return self.prices.label(model.name)


def http_headers(http: external_auth_pb2.AttributeContext.HttpRequest) -> dict[str, str]:
    """Envoy sends `headers`, or `header_map` when configured with encode_raw_headers."""
    if http.headers:
        return dict(http.headers)
    merged: dict[str, str] = {}
    for entry in http.header_map.headers:
        value = entry.raw_value.decode(errors="replace") if entry.raw_value else entry.value
        key = entry.key.lower()
        merged[key] = f"{merged[key]},{value}" if key in merged else value
    return merged


# A CheckResponse message, or the bytes of one (xds-protos ships no type stubs).
CheckReply = Any


def _serialize(reply: CheckReply) -> bytes:
    """Allow answers arrive pre-encoded (extauthz/wire.py); the rest are messages."""
    return reply if isinstance(reply, bytes) else bytes(reply.SerializeToString())


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    SERVICE = "envoy.service.auth.v3.Authorization"

    def __init__(self, decider: Decider) -> None:
        self.decider = decider

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Like the generated add_AuthorizationServicer_to_server, with a serializer that
        also takes pre-encoded bytes."""
        handler = grpc.unary_unary_rpc_method_handler(
            self.Check,
            request_deserializer=external_auth_pb2.CheckRequest.FromString,
            response_serializer=_serialize,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(self.SERVICE, {"Check": handler}),)
        )

    async def Check(
        self,
        request: external_auth_pb2.CheckRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> CheckReply:
        http = request.attributes.request.http
        headers = http_headers(http)
        headers.setdefault(":method", http.method)  # Envoy sends it; bare test clients may not
        body = http.raw_body or http.body.encode()
        outcome = await self.decider.decide(
            http.path, headers, lambda: requested_model(body, headers)
        )
        if outcome.verdict is Verdict.ALLOW:
            return responses.envoy_allow(outcome.decision, headers)
        if outcome.verdict is Verdict.PUBLIC:
            return responses.envoy_allow_public(headers)
        if outcome.verdict is Verdict.UNVERIFIED:
            return responses.envoy_allow_unverified(outcome.decision.key_id, headers)
        return responses.envoy_deny(outcome.decision, outcome.model)
