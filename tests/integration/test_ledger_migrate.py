"""`extauthz ledger migrate` on a real PostgreSQL: the schema of docs/design.md section 12,
versioned, each file in one transaction, a re-run that changes nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psycopg
import pytest

from devstack.processes import executable
from ledger.migrate import MIGRATIONS, MigrationError, migrate, require_current, schema_version
from tests.ledger_support import query

pytestmark = pytest.mark.integration


def ledger_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LEDGER_DATABASE_URL": database_url}
    return subprocess.run(
        [executable("extauthz"), "ledger", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def columns(url: str, table: str) -> dict[str, str]:
    rows = await query(
        url,
        "SELECT column_name, format_type(atttypid, atttypmod) FROM information_schema.columns "
        "JOIN pg_attribute ON attrelid = %s::regclass AND attname = column_name "
        "WHERE table_name = %s",
        (table, table),
    )
    return {str(name): str(kind) for name, kind in rows}


async def test_migrate_creates_the_guides_tables_with_exact_money(ledger_db: str) -> None:
    async with await psycopg.AsyncConnection.connect(ledger_db) as conn:
        applied = await migrate(conn)
    assert [m.version for m in applied] == [1]
    keys = await columns(ledger_db, "virtual_keys")
    guide = {"id", "key_hash", "name", "user_id", "team_id", "created_at", "expires_at"}
    guide |= {"is_active", "allowed_models", "max_budget", "spent", "tpm_limit", "rpm_limit"}
    guide |= {"metadata", "last_used", "total_requests"}
    assert guide | {"status", "deleted_at", "version"} <= set(keys)
    assert keys["max_budget"] == keys["spent"] == "numeric(20,9)"
    usage = await columns(ledger_db, "key_usage")
    assert {"id", "key_id", "timestamp", "tokens", "cost", "model", "provider", "request_id"} | {
        "prompt_tokens",
        "completion_tokens",
    } <= set(usage)
    assert usage["cost"] == "numeric(20,9)"
    assert {"key_id", "version", "type", "at", "record"} <= set(
        await columns(ledger_db, "key_events")
    )
    indexes = {
        str(row[0])
        for row in await query(
            ledger_db, "SELECT indexname FROM pg_indexes WHERE schemaname='public'"
        )
    }
    assert {"idx_keys_user", "idx_keys_team", "idx_keys_status", "idx_usage_key"} <= indexes
    assert "idx_usage_time" in indexes
    uniques = await query(
        ledger_db,
        "SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE contype = 'u'",
    )
    assert ("key_usage", "UNIQUE (key_id, request_id)") in uniques
    assert ("key_events", "UNIQUE (key_id, version)") in uniques


async def test_migrate_again_applies_nothing(ledger_db: str) -> None:
    async with await psycopg.AsyncConnection.connect(ledger_db) as conn:
        await migrate(conn)
        again = await migrate(conn)
        assert again == []
        assert await schema_version(conn) == 1
    rows = await query(ledger_db, "SELECT version, name FROM ledger_schema_version")
    assert rows == [(1, "initial")]


async def test_a_failing_migration_leaves_nothing_of_itself(ledger_db: str, tmp_path: Path) -> None:
    (tmp_path / "0001_initial.sql").write_bytes((MIGRATIONS / "0001_initial.sql").read_bytes())
    (tmp_path / "0002_broken.sql").write_text(
        "CREATE TABLE half_done (x int);\nALTER TABLE no_such_table ADD COLUMN y int;\n"
    )
    async with await psycopg.AsyncConnection.connect(ledger_db) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            await migrate(conn, tmp_path)
        assert await schema_version(conn) == 1
        with pytest.raises(MigrationError, match="run `extauthz ledger migrate`"):
            await require_current(conn, tmp_path)
    assert await query(ledger_db, "SELECT to_regclass('half_done')") == [(None,)]


def test_the_migrate_command_applies_once_then_says_nothing_to_apply(ledger_db: str) -> None:
    first = ledger_cli(ledger_db, "migrate")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "applied 0001_initial"
    second = ledger_cli(ledger_db, "migrate")
    assert second.returncode == 0, second.stderr
    assert "nothing to apply" in second.stdout


def test_the_sink_refuses_a_schema_that_is_not_migrated(ledger_db: str) -> None:
    result = ledger_cli(ledger_db, "run")
    assert result.returncode == 2
    assert "run `extauthz ledger migrate`" in result.stderr
