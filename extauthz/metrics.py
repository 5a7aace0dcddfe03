"""Prometheus collectors: the integration guide's four, under their exact names, and ours.

Label values never carry a secret: key ids are public, reasons are a fixed set, and a
model label is a priced model's name or `other` (clients choose model strings freely).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.key_requests = Counter(
            "ailb_key_requests_total",
            "Total requests per virtual key",
            ["key_id", "model"],
            registry=r,
        )
        self.key_tokens = Counter(
            "ailb_key_tokens_total",
            "Total tokens consumed per virtual key",
            ["key_id", "model"],
            registry=r,
        )
        self.key_cost = Counter(
            "ailb_key_cost_total", "Total cost per virtual key in USD", ["key_id"], registry=r
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
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
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
