"""Prometheus collectors: the integration guide's four, under their exact names, and ours.

Label values never carry a secret: key ids are public, reasons are a fixed set, and a
model label is the price-table entry that priced the model, or `other` (clients choose
model strings freely, so the label never repeats one).
Fleets with many keys can drop the `key_id` label (EXTAUTHZ_METRICS_KEY_ID=false).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from keys.model import Decision
from keys.money import NANOS_PER_USD

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, per_key: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        self.per_key = per_key
        r = self.registry
        key = ["key_id"] if per_key else []
        self.key_requests = Counter(
            "ailb_key_requests_total",
            "Total requests per virtual key",
            [*key, "model"],
            registry=r,
        )
        self.key_tokens = Counter(
            "ailb_key_tokens_total",
            "Total tokens consumed per virtual key",
            [*key, "model"],
            registry=r,
        )
        self.key_cost = Counter(
            "ailb_key_cost_total", "Total cost per virtual key in USD", key, registry=r
        )
        self.validation_failures = Counter(
            "ailb_key_validation_failures_total",
            "Total key validation failures",
            ["reason"],
            registry=r,
        )
        self.check_duration = Histogram(
            "extauthz_check_duration_seconds",
            "Check latency by decision",
            ["decision"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.usage_reports = Counter(
            "extauthz_usage_reports_total",
            "ReportUsage calls by outcome",
            ["outcome"],
            registry=r,
        )
        self.redis_errors = Counter(
            "extauthz_redis_errors_total",
            "Store calls that failed to reach Redis",
            ["op"],
            registry=r,
        )
        self.redis_latency = Histogram(
            "extauthz_redis_latency_seconds",
            "Store call latency (one script call each)",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.journal_depth = Gauge(
            "extauthz_usage_journal_depth",
            "Usage reports waiting in the local journal for Redis to return",
            registry=r,
        )
        self.redis_up = Gauge(
            "extauthz_redis_up", "1 while the health watcher reaches Redis", registry=r
        )

        self.reservations_opened = Counter(
            "extauthz_reservations_opened_total",
            "Reservations (in-flight records) opened by allowed Checks",
            registry=r,
        )
        self.reservations_settled = Counter(
            "extauthz_reservations_settled_total",
            "Reservations closed by a usage report",
            registry=r,
        )
        self.reservations_expired = Counter(
            "extauthz_reservations_expired_total",
            "Reservations released unreported after EXTAUTHZ_RESERVATION_TTL_SECONDS",
            registry=r,
        )
        self.reserved_usd = Counter(
            "extauthz_reserved_usd_total",
            "USD reserved by allowed Checks, per level (key, user, team)",
            [*key, "level"],
            registry=r,
        )
        self.tap_unmetered = Counter(
            "extauthz_tap_unmetered_total",
            "Responses the usage tap charged without the upstream's usage (an estimate, or "
            "nothing), by reason",
            ["reason"],
            registry=r,
        )
        self.tap_responses = Counter(
            "extauthz_tap_responses_total",
            "Responses the usage tap settled, by basis: usage (the upstream's), estimate, "
            "released (nothing generated), failed (not charged)",
            ["basis"],
            registry=r,
        )
        self.shadow_denials = Counter(
            "extauthz_shadow_denials_total",
            "Requests a key in shadow mode (enforce: false) let through that would be denied",
            ["reason"],
            registry=r,
        )
        self.alerts_sent = Counter(
            "extauthz_alerts_sent_total",
            "Budget alert events the webhook acknowledged (2xx)",
            registry=r,
        )
        self.alerts_retried = Counter(
            "extauthz_alerts_retried_total",
            "Budget alert delivery attempts that retry an event an earlier attempt did not deliver",
            registry=r,
        )
        self.alerts_failed = Counter(
            "extauthz_alerts_failed_total",
            "Budget alert delivery attempts that failed (no answer, or not 2xx); the event "
            "stays in Redis and is retried",
            registry=r,
        )
        self.alerts_pending = Gauge(
            "extauthz_alerts_pending",
            "Budget alert events in Redis the webhook has not acknowledged yet (the "
            "streams this server watches, as of its last look)",
            registry=r,
        )

        # children looked up once: labels() costs more than the increment itself
        self._request_children: dict[tuple[str, str], Counter] = {}
        self._check_children: dict[str, Histogram] = {}
        self._reserved_children: dict[tuple[str, str], Counter] = {}
        self.redis_check_latency = self.redis_latency.labels("check")

    def observe_check(self, decision: str, seconds: float) -> None:
        child = self._check_children.get(decision)
        if child is None:
            child = self._check_children[decision] = self.check_duration.labels(decision)
        child.observe(seconds)

    def _key(self, key_id: str) -> list[str]:
        return [key_id] if self.per_key else []

    def count_request(self, key_id: str, model: str) -> None:
        child = self._request_children.get((key_id, model))
        if child is None:
            child = self.key_requests.labels(*self._key(key_id), model)
            self._request_children[(key_id, model)] = child
        child.inc()

    def count_reservation(self, decision: Decision, amount_nanos: int) -> None:
        """An allowed Check opened a reservation at each of `decision.levels`."""
        self.reservations_opened.inc()
        if decision.expired:
            self.reservations_expired.inc(decision.expired)
        if amount_nanos:
            usd = amount_nanos / NANOS_PER_USD  # a metric: a double is exact enough
            for level in decision.levels:
                label = (decision.key_id if self.per_key else "", level.value)
                child = self._reserved_children.get(label)
                if child is None:
                    child = self.reserved_usd.labels(*self._key(label[0]), label[1])
                    self._reserved_children[label] = child
                child.inc(usd)

    def count_usage(self, key_id: str, model: str, tokens: int, cost_usd: float) -> None:
        self.key_tokens.labels(*self._key(key_id), model).inc(tokens)
        cost = self.key_cost.labels(key_id) if self.per_key else self.key_cost
        cost.inc(cost_usd)
