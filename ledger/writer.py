"""One batch of stream entries, one PostgreSQL transaction.

Every insert is `ON CONFLICT DO NOTHING` on a key the entry carries (`(key_id,
request_id)` for a charge, `(key_id, version)` for a key event), and a key's `spent`,
`total_requests` and `last_used` grow only by the charges the same statement actually
inserted: a batch written twice (a sink killed between commit and XACK, or two sinks after
a claim) changes nothing the second time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from psycopg import AsyncConnection

from ledger.entries import (
    Charge,
    Entry,
    KeyEvent,
    Malformed,
    Reject,
    count,
    instant,
    key_row,
    usd,
)

log = logging.getLogger("extauthz.ledger")

Connection = AsyncConnection[tuple[Any, ...]]
RecordSource = Callable[[str], Awaitable[dict[str, str] | None]]
"""A key's record from Redis now (None once deleted): for a key the ledger has no row for."""

# One virtual_keys row from a key's record (the parameters ledger/entries.py's key_row
# makes), for both statements below.
_KEY_ROW: Final = b"""
INSERT INTO virtual_keys AS v (
    id, key_hash, name, user_id, team_id, created_at, expires_at, is_active, allowed_models,
    max_budget, tpm_limit, rpm_limit, metadata, last_used, status, deleted_at, version
) VALUES (
    %(id)s, %(key_hash)s, %(name)s, %(user_id)s, %(team_id)s, %(created_at)s, %(expires_at)s,
    %(is_active)s, %(allowed_models)s::jsonb, %(max_budget)s, %(tpm_limit)s, %(rpm_limit)s,
    %(metadata)s::jsonb, %(last_used)s, %(status)s, %(deleted_at)s, %(version)s
)
"""

# A key event replaces the row only with a newer version of the record; a deletion wins
# over any row not yet deleted. spent, total_requests stay the ledger's own sums.
UPSERT_KEY: Final = (
    _KEY_ROW
    + b"""
ON CONFLICT (id) DO UPDATE SET
    key_hash = EXCLUDED.key_hash, name = EXCLUDED.name, user_id = EXCLUDED.user_id,
    team_id = EXCLUDED.team_id, created_at = EXCLUDED.created_at,
    expires_at = EXCLUDED.expires_at, is_active = EXCLUDED.is_active,
    allowed_models = EXCLUDED.allowed_models, max_budget = EXCLUDED.max_budget,
    tpm_limit = EXCLUDED.tpm_limit, rpm_limit = EXCLUDED.rpm_limit,
    metadata = EXCLUDED.metadata, last_used = GREATEST(v.last_used, EXCLUDED.last_used),
    status = EXCLUDED.status, deleted_at = COALESCE(v.deleted_at, EXCLUDED.deleted_at),
    version = GREATEST(v.version, EXCLUDED.version)
WHERE v.version < EXCLUDED.version OR (EXCLUDED.status = 'deleted' AND v.status <> 'deleted')
RETURNING (xmax = 0) AS inserted
"""
)

# A key older than the ledger: its record as Redis has it now, unless a row came first.
INSERT_KEY: Final = (
    _KEY_ROW
    + b"""
ON CONFLICT (id) DO NOTHING
"""
)

STUB_KEY: Final = b"""
INSERT INTO virtual_keys (id, created_at, is_active, status, version)
VALUES (%s, %s, false, 'deleted', 0) ON CONFLICT (id) DO NOTHING
"""

MARK_DELETED: Final = b"""
UPDATE virtual_keys SET status = 'deleted', is_active = false,
    deleted_at = COALESCE(deleted_at, %s)
WHERE id = %s
"""

INSERT_EVENT: Final = b"""
INSERT INTO key_events (key_id, version, type, at, record) VALUES (%s, %s, %s, %s, %s::jsonb)
ON CONFLICT (key_id, version) DO NOTHING
"""

INSERT_REJECT: Final = b"""
INSERT INTO ledger_rejects (stream, entry_id, fields, reason) VALUES (%s, %s, %s::jsonb, %s)
ON CONFLICT (stream, entry_id) DO NOTHING
"""

# Every charge of the batch in one statement; only the rows it inserted reach the key.
INSERT_CHARGES: Final = b"""
WITH batch AS (
    SELECT * FROM unnest(
        %s::varchar[], %s::timestamptz[], %s::bigint[], %s::numeric[], %s::varchar[],
        %s::varchar[], %s::varchar[], %s::bigint[], %s::bigint[]
    ) AS b (key_id, ts, tokens, cost, model, provider, request_id, prompt, completion)
), inserted AS (
    INSERT INTO key_usage (key_id, timestamp, tokens, cost, model, provider, request_id,
                           prompt_tokens, completion_tokens)
    SELECT key_id, ts, tokens, cost, model, provider, request_id, prompt, completion
    FROM batch
    ON CONFLICT (key_id, request_id) DO NOTHING
    RETURNING key_id, cost, timestamp
), per_key AS (
    SELECT key_id, sum(cost) AS cost, count(*) AS n, max(timestamp) AS last
    FROM inserted GROUP BY key_id
)
UPDATE virtual_keys v
SET spent = v.spent + p.cost, total_requests = v.total_requests + p.n,
    last_used = GREATEST(v.last_used, p.last)
FROM per_key p WHERE v.id = p.key_id
RETURNING p.n
"""


@dataclass(frozen=True, slots=True)
class Written:
    """What one batch changed; the `*_duplicate` counts are entries already there."""

    charges: int = 0
    charges_duplicate: int = 0
    events: int = 0
    events_duplicate: int = 0
    keys_created: int = 0  # by a key event
    keys_copied: int = 0
    keys_stubbed: int = 0
    rejects: int = 0


async def write_batch(conn: Connection, entries: Sequence[Entry], records: RecordSource) -> Written:
    """Writes the batch and commits, or raises with nothing written."""
    events = [e for e in entries if isinstance(e, KeyEvent)]
    charges = [e for e in entries if isinstance(e, Charge)]
    rejects = [e for e in entries if isinstance(e, Reject)]
    async with conn.transaction():
        for reject in rejects:
            await conn.execute(
                INSERT_REJECT,
                (reject.ref.stream, reject.ref.entry_id, _json(reject.fields), reject.reason),
            )
        inserted_events = created = 0
        for event in events:  # in stream order: a key's versions arrive in order
            event_row, key_row_inserted = await _apply_event(conn, event)
            inserted_events += event_row
            created += key_row_inserted
        copied, stubbed = await _ensure_keys(conn, charges, records)
        inserted_charges = await _insert_charges(conn, charges)
    return Written(
        charges=inserted_charges,
        charges_duplicate=len(charges) - inserted_charges,
        events=inserted_events,
        events_duplicate=len(events) - inserted_events,
        keys_created=created,
        keys_copied=copied,
        keys_stubbed=stubbed,
        rejects=len(rejects),
    )


async def _apply_event(conn: Connection, event: KeyEvent) -> tuple[int, int]:
    """(1 if the event's row is new, 1 if the key's row is new)."""
    deleted = event.type == "deleted"
    if event.record:
        row = key_row(event.key_id, event.record, event.version, event.ts_ms, deleted=deleted)
        cur = await conn.execute(UPSERT_KEY, row)
        upserted = await cur.fetchone()
        key_new = int(upserted is not None and bool(upserted[0]))
    else:  # a deletion that carried no record: the row must exist for the event's key
        cur = await conn.execute(STUB_KEY, (event.key_id, instant(event.ts_ms)))
        key_new = cur.rowcount
    if deleted:  # also when its version is not newer: a deletion is final
        await conn.execute(MARK_DELETED, (instant(event.ts_ms), event.key_id))
    cur = await conn.execute(
        INSERT_EVENT,
        (event.key_id, event.version, event.type, instant(event.ts_ms), _json(event.record)),
    )
    return cur.rowcount, key_new


async def _ensure_keys(
    conn: Connection, charges: Sequence[Charge], records: RecordSource
) -> tuple[int, int]:
    """A row for every charged key: a key older than the ledger gets its record copied from
    Redis; a key already deleted there gets a stub (status deleted, no digest) that its
    `deleted` event, if one follows, fills in."""
    first_seen: dict[str, int] = {}
    for charge in charges:
        first_seen[charge.key_id] = min(first_seen.get(charge.key_id, charge.ts_ms), charge.ts_ms)
    if not first_seen:
        return 0, 0
    cur = await conn.execute("SELECT id FROM virtual_keys WHERE id = ANY(%s)", (list(first_seen),))
    missing = set(first_seen) - {row[0] for row in await cur.fetchall()}
    copied = stubbed = 0
    for key_id in sorted(missing):
        record = await records(key_id)
        row = None
        if record is not None:
            try:
                version = count(record, "ver", default="0")
                row = key_row(key_id, record, version, first_seen[key_id], deleted=False)
            except Malformed as exc:
                log.error(
                    "key record unreadable, stub row", extra={"key_id": key_id, "error": str(exc)}
                )
        if row is not None:
            await conn.execute(INSERT_KEY, row)
            copied += 1
        else:
            await conn.execute(STUB_KEY, (key_id, instant(first_seen[key_id])))
            stubbed += 1
    return copied, stubbed


async def _insert_charges(conn: Connection, charges: Sequence[Charge]) -> int:
    if not charges:
        return 0
    cur = await conn.execute(
        INSERT_CHARGES,
        (
            [c.key_id for c in charges],
            [instant(c.ts_ms) for c in charges],
            [c.total_tokens for c in charges],
            [usd(c.cost_nanos) for c in charges],
            [c.model for c in charges],
            [c.provider for c in charges],
            [c.request_id for c in charges],
            [c.prompt_tokens for c in charges],
            [c.completion_tokens for c in charges],
        ),
    )
    return sum(int(row[0]) for row in await cur.fetchall())


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))
