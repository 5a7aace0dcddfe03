"""keys.v1.UsageService: ReportUsage charges a completed request to its key, once."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from datetime import date, timedelta

import grpc

from extauthz import convert
from extauthz.access import readable_key, require_admin, require_reporter, scoped, usage_key_ids
from extauthz.errors import rpc_errors
from extauthz.ledger_history import MAX_DAYS, LedgerHistory
from extauthz.metrics import Metrics
from extauthz.settings import Settings
from keys import validation
from keys.errors import InvalidArgument, NotFound, StoreUnavailable
from keys.journal import UsageJournal
from keys.model import UsageReport, UsageSummary
from keys.money import nanos_to_usd
from keys.pricing import PriceTable
from keys.store import KeyStore
from keys.v1 import keys_pb2, keys_pb2_grpc

log = logging.getLogger("extauthz.usage")
Context = grpc.aio.ServicerContext[object, object]


class UsageService(keys_pb2_grpc.UsageServiceServicer):
    def __init__(
        self,
        store: KeyStore,
        settings: Settings,
        prices: PriceTable,
        metrics: Metrics,
        journal: UsageJournal | None = None,
        history: LedgerHistory | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.prices = prices
        self.metrics = metrics
        self.journal = journal
        self.history = history  # days older than Redis keeps, from the spend ledger

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
        cached = validation.tokens("cached_tokens", request.cached_tokens)
        reasoning = validation.tokens("reasoning_tokens", request.reasoning_tokens)
        total = validation.tokens("total_tokens", request.total_tokens) or prompt + completion
        if total < prompt + completion:
            raise InvalidArgument(
                "total_tokens is less than prompt_tokens + completion_tokens; send 0 to use "
                "their sum"
            )
        if request.HasField("cost"):
            cost = validation.usd("cost", request.cost)
        else:
            cost = self.prices.cost_nanos(
                model, prompt, completion, cached_tokens=cached, reasoning_tokens=reasoning
            )
        return UsageReport(
            key_id,
            request_id,
            model,
            provider,
            prompt,
            completion,
            total,
            cost,
            family=self.prices.family(model),
        )

    @rpc_errors
    async def ReportUsage(
        self, request: keys_pb2.ReportUsageRequest, context: Context
    ) -> keys_pb2.ReportUsageResponse:
        user = await require_reporter(context, self.settings)
        try:
            report = self.report_from(request)
        except InvalidArgument:
            self.metrics.usage_reports.labels("invalid").inc()
            raise
        if user is not None:
            scoped(await self.store.get(report.key_id), user)
        started = time.perf_counter()
        try:
            result = await self.store.report_usage(report)
        except NotFound:
            self.metrics.usage_reports.labels("unknown_key").inc()
            raise
        except StoreUnavailable:
            self.metrics.redis_errors.labels("report_usage").inc()
            if self.journal is None:
                raise
            await self.journal.append_async(report)  # JournalFull: UNAVAILABLE, retry later
            self.metrics.usage_reports.labels("queued").inc()
            self.metrics.journal_depth.set(self.journal.pending)
            log.warning("usage report journaled", extra={"key_id": report.key_id})
            return keys_pb2.ReportUsageResponse(
                queued=True, cost=nanos_to_usd(report.cost_nanos), total_tokens=report.total_tokens
            )
        finally:
            self.metrics.redis_latency.labels("report_usage").observe(time.perf_counter() - started)
        if result.duplicate:
            self.metrics.usage_reports.labels("duplicate").inc()
            log.info("duplicate usage report", extra={"key_id": report.key_id})
        else:
            self.metrics.usage_reports.labels("charged").inc()
            if result.settled:
                self.metrics.reservations_settled.inc()
            if result.expired:
                self.metrics.reservations_expired.inc()
            model_label = self.prices.label(report.model)
            self.metrics.count_usage(
                report.key_id, model_label, report.total_tokens, nanos_to_usd(report.cost_nanos)
            )
        remaining = result.budget_remaining_nanos
        return keys_pb2.ReportUsageResponse(
            duplicate=result.duplicate,
            cost=nanos_to_usd(result.cost_nanos),
            spent=nanos_to_usd(result.spent_nanos),
            budget_remaining=None if remaining is None else nanos_to_usd(remaining),
            total_tokens=report.total_tokens,
            settled=result.settled,
        )

    @rpc_errors
    async def GetUsage(
        self, request: keys_pb2.GetUsageRequest, context: Context
    ) -> keys_pb2.GetUsageResponse:
        chosen = [f for f in ("key_id", "user_id", "team_id") if getattr(request, f)]
        if len(chosen) != 1:
            raise InvalidArgument("send exactly one of key_id, user_id, team_id")
        retention = self.settings.usage_retention_days
        if self.history is None:
            days = validation.days(request.days, retention)
        else:
            days = validation.days(request.days, MAX_DAYS, "with the spend ledger")
        if request.key_id:
            key_id = validation.key_id("key_id", request.key_id)
            await readable_key(context, self.settings, self.store, key_id)
            key_ids = [key_id]
        else:
            user = await require_admin(context, self.settings)
            key_ids = await usage_key_ids(
                self.store, user, user_id=request.user_id, team_id=request.team_id
            )
        return convert.usage(await self._usage(key_ids, days, retention))

    async def _usage(self, key_ids: list[str], days: int, retention: int) -> UsageSummary:
        """Redis's rollups for the days it keeps; the ledger for the days before them."""
        recent = await self.store.usage(key_ids, min(days, retention))
        if days <= retention or self.history is None:
            return recent
        first_recent = date.fromisoformat(recent.start_date)
        first = first_recent - timedelta(days=days - retention)
        older = await self.history.rows(key_ids, first, first_recent - timedelta(days=1))
        return replace(recent, rows=(*older, *recent.rows), start_date=first.isoformat())
