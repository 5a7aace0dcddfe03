"""A local, durable journal of usage reports accepted while Redis is unreachable.

Spend is money: a report the server accepted is never dropped. While Redis is down each
report is appended to `current.jsonl` and fsync'd before the caller hears "queued". When
Redis is back, `replay` renames the file to a `replay-*.jsonl` segment and charges every
line through the normal (idempotent) usage script, so a line replayed twice — after a
crash mid-replay, or because the client also retried — charges once. The journal is
bounded in bytes; when full, reports are refused (UNAVAILABLE: the caller retries) rather
than lost. One process owns a directory (an flock on `.lock`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO

from keys.errors import InvalidArgument, NotFound, StoreUnavailable
from keys.model import UsageReport

log = logging.getLogger("keys.journal")
CURRENT = "current.jsonl"


class JournalFull(StoreUnavailable):
    pass


class JournalBusy(RuntimeError):
    """Another process holds the journal directory."""


class UsageJournal:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = (directory / ".lock").open("a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise JournalBusy(
                f"journal directory {directory} is in use by another process; give each "
                "server its own EXTAUTHZ_JOURNAL_DIR"
            ) from None
        self._write_lock = threading.Lock()
        self._replay_lock = asyncio.Lock()
        self._current: IO[bytes] | None = None
        self._bytes = sum(p.stat().st_size for p in self._segments(include_current=True))
        self._pending = sum(_count_lines(p) for p in self._segments(include_current=True))

    @property
    def pending(self) -> int:
        """Reports journaled and not yet charged."""
        return self._pending

    def _segments(self, *, include_current: bool) -> list[Path]:
        segments = sorted(self.directory.glob("replay-*.jsonl"))
        current = self.directory / CURRENT
        if include_current and current.exists():
            segments.append(current)
        return segments

    def append(self, report: UsageReport) -> None:
        """Durable on return (written and fsync'd). Blocking: call it from a thread."""
        line = (json.dumps(dataclasses.asdict(report), separators=(",", ":")) + "\n").encode()
        with self._write_lock:
            if self._bytes + len(line) > self.max_bytes:
                raise JournalFull("redis is unreachable and the usage journal is full")
            if self._current is None:
                self._current = (self.directory / CURRENT).open("ab")
                _fsync_dir(self.directory)  # the new file's name is durable too
            self._current.write(line)
            self._current.flush()
            os.fsync(self._current.fileno())
            self._bytes += len(line)
            self._pending += 1

    async def append_async(self, report: UsageReport) -> None:
        await asyncio.to_thread(self.append, report)

    def _seal_current(self) -> None:
        """Moves current.jsonl aside so appends continue in a fresh file during replay."""
        with self._write_lock:
            current = self.directory / CURRENT
            if self._current is not None:
                self._current.close()
                self._current = None
            if current.exists() and current.stat().st_size:
                current.rename(self.directory / f"replay-{time.time_ns():020d}.jsonl")
                _fsync_dir(self.directory)

    async def replay(self, charge: Callable[[UsageReport], Awaitable[object]]) -> int:
        """Charges every journaled report; returns how many were handled. Stops at the
        first StoreUnavailable, keeping what is left for the next attempt."""
        async with self._replay_lock:
            await asyncio.to_thread(self._seal_current)
            handled = 0
            for segment in self._segments(include_current=False):
                raw_lines = (await asyncio.to_thread(segment.read_bytes)).splitlines()
                lines = [line for line in raw_lines if line.strip()]
                for index, raw in enumerate(lines):
                    report = _parse(raw, segment)
                    try:
                        if report is not None:
                            await charge(report)
                    except (NotFound, InvalidArgument) as exc:
                        log.warning(
                            "journaled report dropped",
                            extra={"key_id": report.key_id if report else None, "why": str(exc)},
                        )
                    except StoreUnavailable:
                        await asyncio.to_thread(self._keep, segment, lines[index:])
                        raise
                    handled += 1
                    self._pending -= 1
                await asyncio.to_thread(self._drop, segment)
            return handled

    def _keep(self, segment: Path, remaining: list[bytes]) -> None:
        """Rewrites a segment with only the lines not yet charged (atomically)."""
        partial = segment.with_suffix(".tmp")
        with partial.open("wb") as handle:
            handle.write(b"".join(line + b"\n" for line in remaining))
            handle.flush()
            os.fsync(handle.fileno())
        with self._write_lock:
            self._bytes -= segment.stat().st_size - partial.stat().st_size
        partial.replace(segment)
        _fsync_dir(self.directory)

    def _drop(self, segment: Path) -> None:
        with self._write_lock:
            self._bytes -= segment.stat().st_size
        segment.unlink()
        _fsync_dir(self.directory)

    def close(self) -> None:
        with self._write_lock:
            if self._current is not None:
                self._current.close()
                self._current = None
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()


def _parse(raw: bytes, segment: Path) -> UsageReport | None:
    try:
        return UsageReport(**json.loads(raw))
    except (ValueError, TypeError):
        # a torn last line from a crash mid-write was never acknowledged to anyone
        log.warning("unreadable journal line skipped", extra={"segment": segment.name})
        return None


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
