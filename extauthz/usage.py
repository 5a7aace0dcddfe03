"""keys.v1.UsageService: ReportUsage charges a completed request to its key, once."""

from __future__ import annotations

import logging

import grpc

from extauthz.auth import bearer, metadata_value, role_of
from extauthz.errors import rpc_errors
from extauthz.metrics import Metrics
from extauthz.settings import Settings
from keys import validation
from keys.errors import InvalidArgument, NotFound
from keys.model import UsageReport
from keys.money import nanos_to_usd
from keys.pricing import PriceTable
from keys.store import KeyStore
from keys.v1 import keys_pb2, keys_pb2_grpc

log = logging.getLogger("extauthz.usage")
Context = grpc.aio.ServicerContext[object, object]


class UsageService(keys_pb2_grpc.UsageServiceServicer):
    def __init__(
        self, store: KeyStore, settings: Settings, prices: PriceTable, metrics: Metrics
    ) -> None:
        self.store = store
        self.settings = settings
        self.prices = prices
        self.metrics = metrics

    def report_from(self, request: keys_pb2.ReportUsageRequest) -> UsageReport:
        key_id = validation.key_id("key_id", request.key_id)
        request_id = validation.text(
            "request_id",
            request.request_id,
            required=True,
            max_chars=validation.MAX_REQUEST_ID_CHARS,
        )
        model = validation.text(
            "model",
            request.model,
            required=not request.HasField("cost"),
            max_chars=validation.MAX_MODEL_CHARS,
        )
        provider = validation.text("provider", request.provider, required=False, max_chars=128)
        prompt = validation.tokens("prompt_tokens", request.prompt_tokens)
        completion = validation.tokens("completion_tokens", request.completion_tokens)
        total = validation.tokens("total_tokens", request.total_tokens) or prompt + completion
        if total < prompt + completion:
            raise InvalidArgument(
                "total_tokens is less than prompt_tokens + completion_tokens; send 0 to use "
                "their sum"
            )
        if request.HasField("cost"):
            cost = validation.usd("cost", request.cost)
        else:
            cost = self.prices.cost_nanos(model, prompt, completion)
        return UsageReport(key_id, request_id, model, provider, prompt, completion, total, cost)

    @rpc_errors
    async def ReportUsage(
        self, request: keys_pb2.ReportUsageRequest, context: Context
    ) -> keys_pb2.ReportUsageResponse:
        if role_of(bearer(context), self.settings.admin_token, self.settings.usage_token) is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin or usage token required")
        try:
            report = self.report_from(request)
        except InvalidArgument:
            self.metrics.usage_reports.labels("invalid").inc()
            raise
        user = metadata_value(context, "x-user-id")
        if user is not None and (await self.store.get(report.key_id)).user_id != user:
            raise NotFound(f"key {report.key_id} not found")
        try:
            result = await self.store.report_usage(report)
        except NotFound:
            self.metrics.usage_reports.labels("unknown_key").inc()
            raise
        if result.duplicate:
            self.metrics.usage_reports.labels("duplicate").inc()
            log.info("duplicate usage report", extra={"key_id": report.key_id})
        else:
            self.metrics.usage_reports.labels("charged").inc()
            model_label = report.model if self.prices.lookup(report.model) else "other"
            self.metrics.key_tokens.labels(report.key_id, model_label).inc(report.total_tokens)
            self.metrics.key_cost.labels(report.key_id).inc(nanos_to_usd(report.cost_nanos))
        remaining = result.budget_remaining_nanos
        return keys_pb2.ReportUsageResponse(
            duplicate=result.duplicate,
            cost=nanos_to_usd(result.cost_nanos),
            spent=nanos_to_usd(result.spent_nanos),
            budget_remaining=None if remaining is None else nanos_to_usd(remaining),
            total_tokens=report.total_tokens,
        )
