"""One Settings object from the environment; every name is SPEC.md's (or documented)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from urllib.parse import quote

from keys import keygen
from keys.money import MAX_USD, usd_to_nanos
from keys.validation import MAX_LIMIT


class SettingsError(ValueError):
    """A variable is set to something unusable; the message names it."""


@dataclass(frozen=True, slots=True)
class Settings:
    grpc_port: int = 9191
    http_port: int = 9192
    bind: str = "0.0.0.0"
    admin_token: str = ""
    usage_token: str = ""
    fail_open: bool = False
    public_paths: frozenset[str] = frozenset({"/healthz", "/metrics"})
    prices_path: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    redis_url: str = "redis://localhost:6379/0"
    redis_timeout_s: float = 0.15
    key_prefix: str = "sk-mp"
    default_budget_nanos: int = usd_to_nanos("100.0")
    default_tpm: int = 10_000
    default_rpm: int = 60
    max_expires_days: int = 365
    usage_dedup_ttl_s: int = 172_800
    usage_retention_days: int = 90
    log_level: str = "INFO"
    metrics_per_key: bool = True
    drain_seconds: float = 5.0
    journal_dir: str = ".extauthz/journal"
    journal_max_bytes: int = 64 << 20
    auth_uri_header: str = "x-original-uri"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        r = _Reader(env)
        redis_url = env.get("REDIS_URL") or (
            f"redis://{quote(env.get('REDIS_HOST', 'localhost'))}:"
            f"{r.integer('REDIS_PORT', 6379, 1, 65535)}/{r.integer('REDIS_DB', 0, 0, 1 << 20)}"
        )
        prefix = env.get("VIRTUAL_KEY_PREFIX", "sk-mp")
        try:
            keygen.validate_prefix(prefix)
        except ValueError as exc:
            raise SettingsError(f"VIRTUAL_KEY_PREFIX: {exc}") from None
        paths = env.get("EXTAUTHZ_PUBLIC_PATHS", "/healthz,/metrics")
        tls_cert, tls_key = env.get("EXTAUTHZ_TLS_CERT", ""), env.get("EXTAUTHZ_TLS_KEY", "")
        tls_client_ca = env.get("EXTAUTHZ_TLS_CLIENT_CA", "")
        # Half a TLS setup must not quietly serve plaintext.
        if bool(tls_cert) != bool(tls_key):
            given, missing = (
                ("EXTAUTHZ_TLS_CERT", "EXTAUTHZ_TLS_KEY")
                if tls_cert
                else ("EXTAUTHZ_TLS_KEY", "EXTAUTHZ_TLS_CERT")
            )
            raise SettingsError(f"{given} is set but {missing} is not: TLS needs both")
        if tls_client_ca and not tls_cert:
            raise SettingsError(
                "EXTAUTHZ_TLS_CLIENT_CA is set but EXTAUTHZ_TLS_CERT and EXTAUTHZ_TLS_KEY are "
                "not: mTLS needs the server's certificate and key too"
            )
        return cls(
            grpc_port=r.integer("EXTAUTHZ_GRPC_PORT", 9191, 0, 65535),
            http_port=r.integer("EXTAUTHZ_HTTP_PORT", 9192, 0, 65535),
            bind=env.get("EXTAUTHZ_BIND", "0.0.0.0"),
            admin_token=env.get("EXTAUTHZ_ADMIN_TOKEN", ""),
            usage_token=env.get("EXTAUTHZ_USAGE_TOKEN", ""),
            fail_open=r.boolean("EXTAUTHZ_FAIL_OPEN", False),
            public_paths=frozenset(p.strip() for p in paths.split(",") if p.strip()),
            prices_path=env.get("EXTAUTHZ_PRICES", ""),
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            redis_url=redis_url,
            redis_timeout_s=r.integer("EXTAUTHZ_REDIS_TIMEOUT_MS", 150, 1, 60_000) / 1000,
            key_prefix=prefix,
            default_budget_nanos=r.usd("VIRTUAL_KEY_DEFAULT_BUDGET", "100.0"),
            default_tpm=r.integer("VIRTUAL_KEY_DEFAULT_TPM", 10_000, 0, MAX_LIMIT),
            default_rpm=r.integer("VIRTUAL_KEY_DEFAULT_RPM", 60, 0, MAX_LIMIT),
            max_expires_days=r.integer("VIRTUAL_KEY_MAX_EXPIRES_DAYS", 365, 1, 36_500),
            usage_dedup_ttl_s=r.integer("EXTAUTHZ_USAGE_DEDUP_SECONDS", 172_800, 60, 1 << 31),
            usage_retention_days=r.integer("EXTAUTHZ_USAGE_RETENTION_DAYS", 90, 1, 3650),
            log_level=env.get("EXTAUTHZ_LOG_LEVEL", "INFO").upper(),
            metrics_per_key=r.boolean("EXTAUTHZ_METRICS_KEY_ID", True),
            drain_seconds=r.integer("EXTAUTHZ_DRAIN_SECONDS", 5, 0, 300),
            journal_dir=env.get("EXTAUTHZ_JOURNAL_DIR", ".extauthz/journal"),
            journal_max_bytes=r.integer("EXTAUTHZ_JOURNAL_MAX_BYTES", 64 << 20, 0, 1 << 40),
            # The one header /auth reads the original URI from (ingress-nginx: x-original-url).
            auth_uri_header=env.get("EXTAUTHZ_AUTH_URI_HEADER", "x-original-uri").strip().lower()
            or "x-original-uri",
        )


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r}: expected a whole number") from None
        if not low <= value <= high:
            raise SettingsError(f"{name}={value}: expected {low}..{high}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.env.get(name, "").strip().lower()
        if not raw:
            return default
        if raw in {"1", "true", "yes", "on"}:
            return True
        if raw in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{name}={raw!r}: expected true or false")

    def usd(self, name: str, default: str) -> int:
        raw = self.env.get(name, "").strip() or default
        try:
            value = Decimal(raw)
        except InvalidOperation:
            raise SettingsError(f"{name}={raw!r}: expected an amount in USD") from None
        if not value.is_finite() or not 0 <= value <= MAX_USD:
            raise SettingsError(f"{name}={raw!r}: expected 0..{MAX_USD} USD")
        return usd_to_nanos(value)
