"""The usage journal's own guarantees: durable appends, bounded size, replay that resumes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keys.errors import NotFound, StoreUnavailable
from keys.journal import CURRENT, JournalBusy, JournalFull, UsageJournal
from keys.model import UsageReport

pytestmark = pytest.mark.unit


def report(n: int) -> UsageReport:
    return UsageReport("0123456789abcdef", f"req-{n}", "gpt-4", "p", 1, 2, 3, 1000 + n)


class Charger:
    """Records what replay charges; fails once at a chosen call."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.charged: list[UsageReport] = []
        self.calls = 0
        self.fail_at = fail_at

    async def __call__(self, r: UsageReport) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise StoreUnavailable("down again")
        self.charged.append(r)


async def test_appended_reports_are_replayed_in_order_then_gone(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path, 1 << 20)
    for n in range(5):
        journal.append(report(n))
    assert journal.pending == 5
    charge = Charger()
    assert await journal.replay(charge) == 5
    assert [r.request_id for r in charge.charged] == [f"req-{n}" for n in range(5)]
    assert journal.pending == 0
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".jsonl")]
    journal.close()


async def test_a_new_process_finds_what_the_last_one_journaled(tmp_path: Path) -> None:
    first = UsageJournal(tmp_path, 1 << 20)
    first.append(report(1))
    first.append(report(2))
    first.close()  # stands in for a process that died: the file is all that remains
    second = UsageJournal(tmp_path, 1 << 20)
    assert second.pending == 2
    charge = Charger()
    await second.replay(charge)
    assert charge.charged == [report(1), report(2)]
    second.close()


async def test_replay_interrupted_by_redis_keeps_only_what_is_left(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path, 1 << 20)
    for n in range(4):
        journal.append(report(n))
    with pytest.raises(StoreUnavailable):
        await journal.replay(Charger(fail_at=3))
    assert journal.pending == 2
    charge = Charger()
    await journal.replay(charge)
    assert [r.request_id for r in charge.charged] == ["req-2", "req-3"]
    assert journal.pending == 0
    journal.close()


async def test_reports_for_unknown_keys_are_dropped_not_retried(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path, 1 << 20)
    journal.append(report(1))

    async def unknown(_: UsageReport) -> None:
        raise NotFound("gone")

    assert await journal.replay(unknown) == 1
    assert journal.pending == 0
    journal.close()


async def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path, 1 << 20)
    journal.append(report(1))
    journal.close()
    with (tmp_path / CURRENT).open("ab") as handle:
        handle.write(b'{"key_id": "0123')  # a crash mid-write
    again = UsageJournal(tmp_path, 1 << 20)
    charge = Charger()
    await again.replay(charge)
    assert charge.charged == [report(1)]
    again.close()


def test_full_journal_refuses_instead_of_dropping(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path, 400)
    accepted = 0
    with pytest.raises(JournalFull):
        for n in range(100):
            journal.append(report(n))
            accepted += 1
    assert 0 < accepted < 100 and journal.pending == accepted
    journal.close()


def test_one_process_owns_a_directory(tmp_path: Path) -> None:
    owner = UsageJournal(tmp_path, 1 << 20)
    with pytest.raises(JournalBusy, match="EXTAUTHZ_JOURNAL_DIR"):
        UsageJournal(tmp_path, 1 << 20)
    owner.close()
    UsageJournal(tmp_path, 1 << 20).close()
