"""The usage journal's own guarantees: durable appends, bounded size, replay that resumes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from keys.errors import NotFound, StoreUnavailable
from keys.journal import CURRENT, JournalFull, JournalUnusable, UsageJournal
from keys.model import UsageReport

pytestmark = pytest.mark.unit


def report(n: int) -> UsageReport:
    return UsageReport("0123456789abcdef", f"req-{n}", "gpt-4", "p", 1, 2, 3, 1000 + n)


def journal_files(root: Path) -> list[Path]:
    return list(root.rglob("*.jsonl"))


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
    assert not journal_files(tmp_path)
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
    with (journal.directory / CURRENT).open("ab") as handle:
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


def test_two_live_journals_share_a_directory_each_in_its_own_subdirectory(
    tmp_path: Path,
) -> None:
    first, second = UsageJournal(tmp_path, 1 << 20), UsageJournal(tmp_path, 1 << 20)
    first.append(report(1))
    second.append(report(2))
    assert first.directory != second.directory
    assert (first.adopt(), second.adopt()) == (0, 0)  # a live owner's reports stay its own
    assert (first.pending, second.pending) == (1, 1)
    first.close()
    second.close()


async def test_a_stopped_process_journal_is_adopted_by_exactly_one_live_one(
    tmp_path: Path,
) -> None:
    gone = UsageJournal(tmp_path, 1 << 20)
    for n in range(3):
        gone.append(report(n))
    gone.close()  # its flock is released, as the kernel does when a process dies
    a, b = UsageJournal(tmp_path, 1 << 20), UsageJournal(tmp_path, 1 << 20)
    assert sorted((a.pending, b.pending)) == [0, 3]
    assert not gone.directory.exists()
    charge = Charger()
    await a.replay(charge)
    await b.replay(charge)
    assert sorted(r.request_id for r in charge.charged) == ["req-0", "req-1", "req-2"]
    a.close()
    b.close()


async def test_the_single_owner_journal_of_an_earlier_version_is_adopted(
    tmp_path: Path,
) -> None:
    line = json.dumps(dataclasses.asdict(report(7))) + "\n"
    (tmp_path / CURRENT).write_text(line)
    (tmp_path / "replay-00000000000000000001.jsonl").write_text(line.replace("req-7", "req-6"))
    (tmp_path / "worker-0").mkdir()  # --workers N gave each worker a subdirectory
    (tmp_path / "worker-0" / CURRENT).write_text(line.replace("req-7", "req-8"))
    journal = UsageJournal(tmp_path, 1 << 20)
    charge = Charger()
    assert await journal.replay(charge) == 3
    assert sorted(r.request_id for r in charge.charged) == ["req-6", "req-7", "req-8"]
    journal.close()


def test_a_clean_close_with_nothing_pending_leaves_no_subdirectory(tmp_path: Path) -> None:
    UsageJournal(tmp_path, 1 << 20).close()
    assert [p.name for p in tmp_path.iterdir()] in ([], [".lock"])


def test_an_unusable_directory_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(JournalUnusable, match=r"journal directory .* is not usable"):
        UsageJournal(tmp_path / "file" / "journal", 1 << 20)


# Appends 40 reports with the process's file size limit low (writes past it fail with
# EFBIG, as on a full disk), then 5 more once the limit is lifted; exits without closing,
# as a killed process would. Prints which appends were acknowledged and how others failed.
FULL_DISK = """
import json, resource, sys
from pathlib import Path
from keys.journal import UsageJournal
from tests.unit.test_journal import report

journal = UsageJournal(Path(sys.argv[1]), 1 << 20)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
acked, errors = [], set()
for n in range(45):
    if n == 40:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # room again
    try:
        journal.append(report(n))
    except Exception as exc:
        errors.add(type(exc).__name__)
    else:
        acked.append(n)
print(json.dumps({"acked": acked, "errors": sorted(errors)}))
"""


async def test_a_failed_write_is_refused_and_leaves_nothing_a_later_write_completes(
    tmp_path: Path,
) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", FULL_DISK, str(tmp_path)],
        capture_output=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    outcome = json.loads(done.stdout)
    assert outcome["errors"] == ["JournalUnwritable"]  # a StoreUnavailable: UNAVAILABLE
    assert 0 < len(outcome["acked"]) < 45 and outcome["acked"][-5:] == [40, 41, 42, 43, 44]
    adopter = UsageJournal(tmp_path, 1 << 20)
    charge = Charger()
    await adopter.replay(charge)
    assert [r.request_id for r in charge.charged] == [f"req-{n}" for n in outcome["acked"]]
    adopter.close()
