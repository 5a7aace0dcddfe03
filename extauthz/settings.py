"""Every setting the server reads, declared once: its environment variable, default,
bounds and help, in the table `VARIABLES`. `Settings.from_env` reads that table, and
`extauthz serve --help` prints it (docs/interface.md lists the same names)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import quote, urlsplit

from keys import keygen
from keys.alert_stream import BASIS_POINTS, MAX_THRESHOLD_BP
from keys.connection import check_url
from keys.money import MAX_USD, usd_to_nanos
from keys.validation import MAX_LIMIT


class SettingsError(ValueError):
    """A variable is set to something unusable; the message names it."""


Parse = Callable[[str, str], Any]
"""(variable name, raw text) -> value, raising SettingsError with the name."""


def integer(low: int, high: int, scale: float = 1) -> Parse:
    def parse(name: str, raw: str) -> Any:
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r}: expected a whole number") from None
        if not low <= value <= high:
            raise SettingsError(f"{name}={value}: expected {low}..{high}")
        return value * scale if scale != 1 else value

    parse.__doc__ = f"{low}..{high}"
    return parse


def boolean(name: str, raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}={raw!r}: expected true or false (or 1/0, yes/no, on/off)")


def text(name: str, raw: str) -> str:
    return raw


def header_name(name: str, raw: str) -> str:
    lowered = raw.strip().lower()
    if not lowered or not all(c.isalnum() or c in "-_" for c in lowered):
        raise SettingsError(f"{name}={raw!r}: expected an HTTP header name")
    return lowered


def upper(name: str, raw: str) -> str:
    return raw.upper()


def usd(name: str, raw: str) -> int:
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise SettingsError(f"{name}={raw!r}: expected an amount in USD") from None
    if not value.is_finite() or not 0 <= value <= MAX_USD:
        raise SettingsError(f"{name}={raw!r}: expected 0..{MAX_USD} USD")
    return usd_to_nanos(value)


usd.__doc__ = f"0..{MAX_USD} USD"


def choice(*allowed: str) -> Parse:
    def parse(name: str, raw: str) -> Any:
        value = raw.strip().lower()
        if value not in allowed:
            raise SettingsError(f"{name}={raw!r}: expected one of {', '.join(allowed)}")
        return value

    parse.__doc__ = " | ".join(allowed)
    return parse


def paths(name: str, raw: str) -> frozenset[str]:
    return frozenset(p.strip() for p in raw.split(",") if p.strip())


def prefix(name: str, raw: str) -> str:
    try:
        keygen.validate_prefix(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None
    return raw


def postgres_url(name: str, raw: str) -> str:
    """'' (no ledger), or a postgresql:// (postgres://) URL. The value is never echoed:
    it usually holds a password."""
    scheme, sep, rest = raw.partition("://")
    if raw and not (sep and scheme.lower() in ("postgresql", "postgres") and rest.strip("/")):
        raise SettingsError(
            f"{name}: expected postgresql://user:password@host:port/database (or postgres://)"
        )
    return raw


def webhook_url(name: str, raw: str) -> str:
    """'' (no alerts), or an http:// or https:// URL with a host. The value is never echoed:
    a chat service's webhook URL is itself a credential."""
    if not raw:
        return raw
    try:
        parts = urlsplit(raw)
        ok = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # a port that is not a number raises
    except ValueError:
        ok = False
    if not ok:
        raise SettingsError(f"{name}: expected an http:// or https:// URL with a host")
    return raw


def thresholds(name: str, raw: str) -> tuple[int, ...]:
    """'0.5,0.8,1.0' -> (5000, 8000, 10000): fractions of max_budget in basis points,
    sorted, each once. Each is above 0, at most 10, with at most four decimals (the
    scripts compare exactly, in integer nano-USD)."""
    found: set[int] = set()
    for part in raw.split(","):
        text_value = part.strip()
        try:
            value = Decimal(text_value)
        except InvalidOperation:
            raise SettingsError(f"{name}: {text_value[:20]!r} is not a number") from None
        bp = value * BASIS_POINTS if value.is_finite() else Decimal(0)
        if not 0 < bp <= MAX_THRESHOLD_BP or bp != bp.to_integral():
            raise SettingsError(
                f"{name}: {text_value[:20]!r}: expected a fraction of max_budget above 0 and "
                "at most 10, with at most four decimals (e.g. 0.5,0.8,1.0)"
            )
        found.add(int(bp))
    return tuple(sorted(found))


thresholds.__doc__ = "comma-separated, each in (0, 10]"


@dataclass(frozen=True, slots=True)
class Variable:
    env: str
    field: str  # the Settings attribute it fills
    default: str  # as it would be written in the environment
    parse: Parse
    help: str


VARIABLES: tuple[Variable, ...] = (
    Variable("EXTAUTHZ_GRPC_PORT", "grpc_port", "9191", integer(0, 65535), "gRPC port"),
    Variable("EXTAUTHZ_HTTP_PORT", "http_port", "9192", integer(0, 65535), "HTTP port"),
    Variable("EXTAUTHZ_BIND", "bind", "0.0.0.0", text, "listen address for both ports"),
    Variable(
        "EXTAUTHZ_REUSE_PORT",
        "reuse_port",
        "false",
        boolean,
        "let other processes bind the same ports (set for --workers; a stray second "
        "server otherwise fails with 'port in use')",
    ),
    Variable("EXTAUTHZ_WORKERS", "workers", "1", integer(1, 64), "server processes"),
    Variable("EXTAUTHZ_ADMIN_TOKEN", "admin_token", "", text, "bearer token for admin calls"),
    Variable("EXTAUTHZ_USAGE_TOKEN", "usage_token", "", text, "token for ReportUsage only"),
    Variable(
        "EXTAUTHZ_FAIL_OPEN", "fail_open", "false", boolean, "allow (marked) when Redis is down"
    ),
    Variable(
        "EXTAUTHZ_PUBLIC_PATHS",
        "public_paths",
        "/healthz,/metrics",
        paths,
        "paths that need no key (GET and HEAD only)",
    ),
    Variable(
        "EXTAUTHZ_AUTH_URI_HEADER",
        "auth_uri_header",
        "x-original-uri",
        header_name,
        "the one header nginx's /auth reads the original URI from (ingress-nginx: x-original-url)",
    ),
    Variable("EXTAUTHZ_PRICES", "prices_path", "", text, "YAML/JSON price table"),
    Variable("EXTAUTHZ_TLS_CERT", "tls_cert", "", text, "gRPC TLS certificate (PEM)"),
    Variable("EXTAUTHZ_TLS_KEY", "tls_key", "", text, "gRPC TLS private key (PEM)"),
    Variable("EXTAUTHZ_TLS_CLIENT_CA", "tls_client_ca", "", text, "CA for mTLS client certs"),
    Variable(
        "EXTAUTHZ_REDIS_TIMEOUT_MS",
        "redis_timeout_s",
        "150",
        integer(1, 60_000, scale=0.001),
        "how long a Redis call may take",
    ),
    Variable("VIRTUAL_KEY_PREFIX", "key_prefix", "sk-mp", prefix, "prefix of new keys"),
    Variable(
        "VIRTUAL_KEY_DEFAULT_BUDGET",
        "default_budget_nanos",
        "100.0",
        usd,
        "USD budget of keys created without max_budget",
    ),
    Variable(
        "VIRTUAL_KEY_DEFAULT_TPM", "default_tpm", "10000", integer(0, MAX_LIMIT), "default TPM"
    ),
    Variable("VIRTUAL_KEY_DEFAULT_RPM", "default_rpm", "60", integer(0, MAX_LIMIT), "default RPM"),
    Variable(
        "VIRTUAL_KEY_DEFAULT_PARALLEL",
        "default_parallel",
        "0",
        integer(0, MAX_LIMIT),
        "max_parallel_requests of keys created without it (0: no limit)",
    ),
    Variable(
        "EXTAUTHZ_BUDGET_MODE",
        "budget_mode",
        "reserve",
        choice("reserve", "after"),
        "reserve: Check reserves an upper bound of the cost; after: budgets checked "
        "against spend only",
    ),
    Variable(
        "EXTAUTHZ_RESERVE_OUTPUT_TOKENS",
        "reserve_output_tokens",
        "4096",
        integer(1, 10_000_000),
        "output tokens reserved when neither the request nor the price table bounds them",
    ),
    Variable(
        "EXTAUTHZ_RESERVATION_TTL_SECONDS",
        "reservation_ttl_s",
        "900",
        integer(1, 86_400),
        "an unreported reservation (and its concurrency slot) is released after this",
    ),
    Variable(
        "EXTAUTHZ_CLAMP_MAX_TOKENS",
        "clamp_max_tokens",
        "true",
        boolean,
        "on routes the usage tap covers (max_tokens_clamp), lower max_tokens to what the "
        "budget covers instead of denying",
    ),
    Variable(
        "EXTAUTHZ_MIN_CLAMPED_TOKENS",
        "min_clamped_tokens",
        "16",
        integer(1, 10_000_000),
        "the fewest output tokens a clamped request may be left with (else 402)",
    ),
    Variable(
        "VIRTUAL_KEY_MAX_EXPIRES_DAYS",
        "max_expires_days",
        "365",
        integer(1, 36_500),
        "longest (and default) key lifetime, days",
    ),
    Variable(
        "EXTAUTHZ_USAGE_DEDUP_SECONDS",
        "usage_dedup_ttl_s",
        "172800",
        integer(60, 1 << 31),
        "how long a charged request id is remembered",
    ),
    Variable(
        "EXTAUTHZ_USAGE_RETENTION_DAYS",
        "usage_retention_days",
        "90",
        integer(1, 3650),
        "days of daily usage rollups kept in Redis",
    ),
    Variable("EXTAUTHZ_LOG_LEVEL", "log_level", "INFO", upper, "DEBUG, INFO, WARNING, ERROR"),
    Variable("EXTAUTHZ_METRICS_KEY_ID", "metrics_per_key", "true", boolean, "key_id metric labels"),
    Variable(
        "EXTAUTHZ_DRAIN_SECONDS",
        "drain_seconds",
        "5",
        integer(0, 300),
        "seconds to keep answering after SIGTERM",
    ),
    Variable(
        "EXTAUTHZ_JOURNAL_DIR",
        "journal_dir",
        ".extauthz/journal",
        text,
        "where usage reports wait while Redis is down ('' turns it off)",
    ),
    Variable(
        "EXTAUTHZ_JOURNAL_MAX_BYTES",
        "journal_max_bytes",
        str(64 << 20),
        integer(0, 1 << 40),
        "bound on the journal's size",
    ),
    Variable(
        "LEDGER_DATABASE_URL",
        "ledger_database_url",
        "",
        postgres_url,
        "the spend ledger's PostgreSQL (postgresql://); set: every charge and key change "
        "is appended to the ledger streams in Redis, for `extauthz ledger` to copy there",
    ),
    Variable(
        "EXTAUTHZ_ALERT_WEBHOOK_URL",
        "alert_webhook_url",
        "",
        webhook_url,
        "budget alerts: POST each threshold crossing here (http:// or https://); unset: no "
        "alerts are recorded or sent",
    ),
    Variable(
        "EXTAUTHZ_ALERT_THRESHOLDS",
        "alert_thresholds",
        "0.5,0.8,1.0",
        thresholds,
        "fractions of max_budget whose first crossing in a budget period is alerted",
    ),
    Variable(
        "EXTAUTHZ_ALERT_SECRET",
        "alert_secret",
        "",
        text,
        "signs each alert: x-extauthz-signature: sha256=<hex HMAC-SHA256 of the body>",
    ),
    Variable(
        "EXTAUTHZ_ALERT_RETRY_BASE_MS",
        "alert_retry_base_s",
        "1000",
        integer(1, 600_000, scale=0.001),
        "backoff after an alert's first failed delivery; doubles per failure, up to 300 s",
    ),
    Variable(
        "EXTAUTHZ_ALERT_TIMEOUT_MS",
        "alert_timeout_s",
        "5000",
        integer(1, 120_000, scale=0.001),
        "how long one alert POST may take; a retry waits this plus the backoff",
    ),
)

REDIS_VARIABLES = (
    ("REDIS_URL", "redis://, rediss://, redis+cluster://; else built from the three below"),
    ("REDIS_HOST", "Redis host (default localhost)"),
    ("REDIS_PORT", "Redis port (default 6379)"),
    ("REDIS_DB", "Redis database number (default 0)"),
)


@dataclass(frozen=True, slots=True)
class Settings:
    grpc_port: int
    http_port: int
    bind: str
    reuse_port: bool
    workers: int
    admin_token: str
    usage_token: str
    fail_open: bool
    public_paths: frozenset[str]
    auth_uri_header: str
    prices_path: str
    tls_cert: str
    tls_key: str
    tls_client_ca: str
    redis_timeout_s: float
    key_prefix: str
    default_budget_nanos: int
    default_tpm: int
    default_rpm: int
    default_parallel: int
    budget_mode: str
    reserve_output_tokens: int
    reservation_ttl_s: int
    clamp_max_tokens: bool
    min_clamped_tokens: int
    max_expires_days: int
    usage_dedup_ttl_s: int
    usage_retention_days: int
    log_level: str
    metrics_per_key: bool
    drain_seconds: int
    journal_dir: str
    journal_max_bytes: int
    ledger_database_url: str = field(repr=False)  # holds a password
    alert_webhook_url: str = field(repr=False)  # may hold a token (chat webhooks)
    alert_thresholds: tuple[int, ...]  # basis points of max_budget, ascending
    alert_secret: str = field(repr=False)
    alert_retry_base_s: float
    alert_timeout_s: float
    redis_url: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        settings = cls(**parsed(VARIABLES, env), redis_url=redis_url_from(env))
        settings.check_tls()
        return settings

    def check_tls(self) -> None:
        """Half a TLS setup must not quietly serve plaintext."""
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = (
                ("EXTAUTHZ_TLS_CERT", "EXTAUTHZ_TLS_KEY")
                if self.tls_cert
                else ("EXTAUTHZ_TLS_KEY", "EXTAUTHZ_TLS_CERT")
            )
            raise SettingsError(f"{given} is set but {missing} is not: TLS needs both")
        if self.tls_client_ca and not self.tls_cert:
            raise SettingsError(
                "EXTAUTHZ_TLS_CLIENT_CA is set but EXTAUTHZ_TLS_CERT and EXTAUTHZ_TLS_KEY are "
                "not: mTLS needs the server's certificate and key too"
            )


def parsed(variables: Iterable[Variable], env: Mapping[str, str]) -> dict[str, Any]:
    """Each variable's value from `env` (its default where unset or blank), parsed: the
    fields of a settings class. A bad value raises SettingsError naming the variable."""
    return {
        var.field: var.parse(var.env, env.get(var.env, "").strip() or var.default)
        for var in variables
    }


def redis_url_from(env: Mapping[str, str]) -> str:
    """REDIS_URL, else the integration guide's REDIS_HOST / REDIS_PORT / REDIS_DB."""
    url = env.get("REDIS_URL", "").strip()
    if url:
        try:  # a bad scheme, port, db or option is one line here, not a traceback later
            check_url(url)
        except ValueError as exc:
            raise SettingsError(f"REDIS_URL: {exc}") from None
        return url
    host = env.get("REDIS_HOST", "").strip() or "localhost"
    port = integer(1, 65535)("REDIS_PORT", env.get("REDIS_PORT", "").strip() or "6379")
    db = integer(0, 1 << 20)("REDIS_DB", env.get("REDIS_DB", "").strip() or "0")
    return f"redis://{quote(host)}:{port}/{db}"


def help_table(variables: tuple[Variable, ...] = VARIABLES) -> str:
    """The variables, their meaning, bounds and defaults, for `extauthz serve --help` (and
    `extauthz ledger --help`, with its own)."""
    rows = []
    for v in variables:
        bounds = v.parse.__doc__ or ""  # integer() and usd() state their range there
        notes = [bounds] if ".." in bounds else []
        notes.append(f"default {v.default}" if v.default else "none")
        rows.append((v.env, f"{v.help} ({', '.join(notes)})"))
    rows += list(REDIS_VARIABLES)
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {meaning}" for name, meaning in rows)
