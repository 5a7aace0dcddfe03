"""Plain SQL migrations: ledger/migrations/NNNN_<name>.sql, applied in order, each in one
transaction that also records its number in `ledger_schema_version`, so a file is applied
completely or not at all, and a re-run applies nothing twice. No ORM: the files are what an
operator reads and could apply by hand (docs/design.md section 12)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from psycopg import AsyncConnection

MIGRATIONS: Final = Path(__file__).with_name("migrations")
_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")
# pg_advisory_xact_lock key: two `migrate` runs at once take turns instead of racing
_LOCK: Final = 0x6C6564676572  # "ledger"

_VERSION_TABLE: Final = b"""
CREATE TABLE IF NOT EXISTS ledger_schema_version (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""

Connection = AsyncConnection[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Path


class MigrationError(RuntimeError):
    """The migrations directory is inconsistent, or the schema is behind the code."""


def available(directory: Path = MIGRATIONS) -> list[Migration]:
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: expected NNNN_<name>.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migrations numbered {version}")
        found[version] = Migration(version, match.group(2), path)
    return [found[v] for v in sorted(found)]


async def migrate(conn: Connection, directory: Path = MIGRATIONS) -> list[Migration]:
    """Applies what is not applied yet; returns what it applied (nothing on a re-run)."""
    applied: list[Migration] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        await conn.execute(_VERSION_TABLE)
    for migration in available(directory):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            cur = await conn.execute(
                "SELECT 1 FROM ledger_schema_version WHERE version = %s", (migration.version,)
            )
            if await cur.fetchone() is not None:
                continue
            # bytes: the file is the query, several statements, no parameters
            await conn.execute(migration.path.read_bytes())
            await conn.execute(
                "INSERT INTO ledger_schema_version (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
        applied.append(migration)
    return applied


async def schema_version(conn: Connection) -> int:
    """The highest applied migration, 0 when none (or no version table)."""
    async with conn.transaction():
        cur = await conn.execute("SELECT to_regclass('ledger_schema_version') IS NOT NULL")
        row = await cur.fetchone()
        if row is None or not row[0]:
            return 0
        cur = await conn.execute("SELECT coalesce(max(version), 0) FROM ledger_schema_version")
        row = await cur.fetchone()
        return int(row[0]) if row is not None else 0


async def require_current(conn: Connection, directory: Path = MIGRATIONS) -> None:
    """Refuses a schema older than this code's migrations: the sink would write columns
    that are not there."""
    have = await schema_version(conn)
    want = max((m.version for m in available(directory)), default=0)
    if have < want:
        raise MigrationError(
            f"the ledger schema is at version {have}, this code needs {want}: "
            "run `extauthz ledger migrate`"
        )
