"""The sink's Prometheus collectors, served on LEDGER_METRICS_PORT."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from ledger.writer import Written


class LedgerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.lag = Gauge(
            "extauthz_ledger_lag",
            "Stream entries not yet written to PostgreSQL: pending (read, not acknowledged) "
            "plus not yet read, over every ledger stream",
            registry=r,
        )
        self.rows = Counter(
            "extauthz_ledger_rows_total",
            "Rows the sink inserted, by table",
            ["table"],
            registry=r,
        )
        self.duplicates = Counter(
            "extauthz_ledger_duplicates_total",
            "Entries whose row was already there (a replay after a crash or a claim; or a "
            "request id charged again in Redis after its dedup marker expired), by table",
            ["table"],
            registry=r,
        )
        self.errors = Counter(
            "extauthz_ledger_errors_total",
            "Failures the sink retried (postgres, redis) and entries it could not read "
            "(malformed, kept in ledger_rejects)",
            ["kind"],
            registry=r,
        )
        for kind in ("postgres", "redis", "malformed"):
            self.errors.labels(kind)
        for table in ("key_usage", "key_events", "virtual_keys", "ledger_rejects"):
            self.rows.labels(table)

    def count(self, written: Written) -> None:
        self.rows.labels("key_usage").inc(written.charges)
        self.rows.labels("key_events").inc(written.events)
        self.rows.labels("virtual_keys").inc(
            written.keys_created + written.keys_copied + written.keys_stubbed
        )
        self.rows.labels("ledger_rejects").inc(written.rejects)
        self.duplicates.labels("key_usage").inc(written.charges_duplicate)
        self.duplicates.labels("key_events").inc(written.events_duplicate)
        self.errors.labels("malformed").inc(written.rejects)
