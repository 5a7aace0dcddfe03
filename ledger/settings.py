"""What `extauthz ledger` reads from the environment, declared like the server's
(extauthz/settings.py): one table, `VARIABLES`, that `extauthz ledger --help` prints."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from psycopg.conninfo import conninfo_to_dict

from extauthz.settings import (
    SettingsError,
    Variable,
    integer,
    parsed,
    postgres_url,
    redis_url_from,
    text,
    upper,
)


def database_url(name: str, raw: str) -> str:
    """The server's check (extauthz/settings.py `postgres_url`, so the two accept the same
    values), and required here; the error never repeats the value (it may hold a
    password)."""
    if not raw:
        raise SettingsError(f"{name} is not set: the ledger needs a postgresql:// URL")
    return postgres_url(name, raw)


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "LEDGER_DATABASE_URL",
        "database_url",
        "",
        database_url,
        "PostgreSQL of the ledger (postgresql://user:password@host:port/db)",
    ),
    Variable(
        "LEDGER_METRICS_PORT",
        "metrics_port",
        "9193",
        integer(0, 65535),
        "HTTP port of the sink's /metrics",
    ),
    Variable(
        "LEDGER_CONSUMER",
        "consumer",
        "",
        text,
        "the sink's consumer name in the `ledger` group (default: <hostname>-<pid>); pin it "
        "so a restarted sink takes its own unacknowledged entries back at once",
    ),
    Variable("EXTAUTHZ_LOG_LEVEL", "log_level", "INFO", upper, "DEBUG, INFO, WARNING, ERROR"),
)


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    database_url: str
    metrics_port: int
    consumer: str
    log_level: str
    redis_url: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LedgerSettings:
        env = os.environ if env is None else env
        values = parsed(VARIABLES, env)
        if not values["consumer"]:
            values["consumer"] = f"{socket.gethostname()}-{os.getpid()}"
        return cls(**values, redis_url=redis_url_from(env))


def database_label(url: str) -> str:
    """host:port/dbname as user, for logs: never the password."""
    try:
        parts = conninfo_to_dict(url)
    except Exception:
        return "(unreadable)"
    host = parts.get("host") or parts.get("hostaddr") or "localhost"
    return (
        f"{parts.get('user') or '-'}@{host}:{parts.get('port') or 5432}/{parts.get('dbname', '')}"
    )
