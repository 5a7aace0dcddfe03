"""A local, durable journal of usage reports accepted while Redis is unreachable.

Spend is money: a report the server accepted is never dropped. While Redis is down each
report is appended to `current.jsonl` and fsync'd before the caller hears "queued". When
Redis is back, `replay` renames the file to a `replay-*.jsonl` segment and charges every
line through the normal (idempotent) usage script, so a line replayed twice — after a
crash mid-replay, or because the client also retried — charges once. The journal is
bounded in bytes; when full, or when the disk refuses a write, reports are refused
(UNAVAILABLE: the caller retries) rather than lost, and a refused write leaves nothing behind.

Many processes share one directory (replicas, `--workers`, pods on one volume): each writes
in its own subdirectory, which it holds an flock on while it lives. A subdirectory whose
lock can be taken belongs to a process that died; a live process adopts it by moving its
segments into its own subdirectory while holding that lock, so one adopter charges them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from keys.errors import InvalidArgument, NotFound, StoreUnavailable
from keys.model import UsageReport

log = logging.getLogger("keys.journal")
CURRENT = "current.jsonl"
LOCK = ".lock"
_CREATING = ".new-"  # a subdirectory not yet locked by its owner: never adopted


class JournalFull(StoreUnavailable):
    pass


class JournalUnwritable(StoreUnavailable):
    """The disk refused a write (full, quota, I/O error): nothing of it was kept."""


class JournalUnusable(RuntimeError):
    """The journal directory cannot be used at start (not writable, not a directory)."""


JournalBusy = JournalUnusable  # its earlier name, which the server's wiring catches


class UsageJournal:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.root = directory
        self.max_bytes = max_bytes
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self.directory, self._lock_fd = _own_subdirectory(directory)
        except OSError as exc:
            raise JournalUnusable(
                f"journal directory {directory} is not usable: {exc.strerror or exc}"
            ) from None
        self._write_lock = threading.Lock()
        self._replay_lock = asyncio.Lock()
        self._fd: int | None = None
        self._offset = 0  # end of the last acknowledged line in the current file
        self._torn = False  # bytes past _offset that a failed write left and truncate could not
        self._seq = 0
        self._bytes = 0
        self._pending = 0
        self.adopt()

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

    def _segment_name(self) -> Path:
        self._seq += 1
        return self.directory / f"replay-{time.time_ns():020d}-{self._seq:06d}.jsonl"

    def adopt(self) -> int:
        """Moves here the journals of processes that died (and of the single-owner layout
        of earlier versions); returns how many reports came with them. Blocking."""
        moved = 0
        with contextlib.suppress(OSError), _locked(self.root / LOCK) as free:
            if free:  # no server of an earlier version owns the top level
                moved += self._take(_journal_files(self.root), self.root)
        for entry in sorted(self.root.iterdir()):
            if entry == self.directory or entry.name.startswith(".") or not entry.is_dir():
                continue
            with contextlib.suppress(OSError), _locked(entry / LOCK) as free:
                if free:  # its owner is gone
                    moved += self._take(_journal_files(entry), entry)
                    for leftover in (*entry.glob("*.tmp"), entry / LOCK):
                        leftover.unlink(missing_ok=True)
                    entry.rmdir()
        return self._recount() if moved else 0

    def _take(self, files: list[Path], source: Path) -> int:
        """Renames another owner's files into this subdirectory (under that owner's lock,
        so no other adopter can take them too)."""
        if not files:
            return 0
        with self._write_lock:
            for path in files:
                path.rename(self._segment_name())
        _fsync_dir(self.directory)
        _fsync_dir(source)
        log.warning("adopted a journal left by a stopped process", extra={"files": len(files)})
        return len(files)

    def _recount(self) -> int:
        with self._write_lock:
            before = self._pending
            segments = self._segments(include_current=True)
            self._bytes = sum(p.stat().st_size for p in segments)
            self._pending = sum(_count_lines(p) for p in segments)
            return self._pending - before

    async def adopt_async(self) -> int:
        async with self._replay_lock:
            return await asyncio.to_thread(self.adopt)

    def append(self, report: UsageReport) -> None:
        """Durable on return (written and fsync'd); on any failure nothing of the line is
        kept, so no later write can complete it. Blocking: call it from a thread."""
        line = (json.dumps(dataclasses.asdict(report), separators=(",", ":")) + "\n").encode()
        with self._write_lock:
            if self._bytes + len(line) > self.max_bytes:
                raise JournalFull("redis is unreachable and the usage journal is full")
            try:
                fd = self._current_fd()
                if self._torn:
                    os.ftruncate(fd, self._offset)
                    self._torn = False
                written = 0
                while written < len(line):
                    count = os.pwrite(fd, line[written:], self._offset + written)
                    if count <= 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    written += count
                os.fsync(fd)
            except OSError as exc:
                self._undo_write()
                log.warning(
                    "usage journal write failed",
                    extra={"error": errno.errorcode.get(exc.errno or 0, str(exc.errno))},
                )
                raise JournalUnwritable(
                    "redis is unreachable and the usage journal cannot be written; retry later"
                ) from None
            self._offset += len(line)
            self._bytes += len(line)
            self._pending += 1

    def _current_fd(self) -> int:
        if self._fd is None:
            path = self.directory / CURRENT
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                _fsync_dir(self.directory)  # the new file's name is durable too
            except OSError:
                os.close(fd)
                raise
            self._fd, self._offset = fd, os.fstat(fd).st_size
        return self._fd

    def _undo_write(self) -> None:
        """Cuts the file back to its last acknowledged line (a failed fsync leaves the
        written bytes' fate unknown: they must not survive as a report)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._offset)
            os.fsync(self._fd)
        except OSError:
            self._torn = True  # truncate again before the next write, or refuse it

    async def append_async(self, report: UsageReport) -> None:
        await asyncio.to_thread(self.append, report)

    def _seal_current(self) -> None:
        """Moves current.jsonl aside so appends continue in a fresh file during replay."""
        with self._write_lock:
            current = self.directory / CURRENT
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    if self._torn:
                        os.ftruncate(self._fd, self._offset)
                os.close(self._fd)
                self._fd, self._offset, self._torn = None, 0, False
            if current.exists() and current.stat().st_size:
                current.rename(self._segment_name())
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
        """Releases the subdirectory: removed if nothing is left in it, else left for a
        live process (or the next one) to adopt."""
        with self._write_lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    if self._torn:
                        os.ftruncate(self._fd, self._offset)
                os.close(self._fd)
                self._fd = None
            with contextlib.suppress(OSError):
                current = self.directory / CURRENT
                if current.exists() and not current.stat().st_size:
                    current.unlink()
                if not _journal_files(self.directory):
                    for leftover in (*self.directory.glob("*.tmp"), self.directory / LOCK):
                        leftover.unlink(missing_ok=True)
                    self.directory.rmdir()
            os.close(self._lock_fd)  # closing releases the flock


def _own_subdirectory(root: Path) -> tuple[Path, int]:
    """Creates this process's subdirectory, locked before it has its final name, so no
    other process ever sees it unlocked while its owner lives."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "host"
    name = f"{host}-{os.getpid()}-{secrets.token_hex(4)}"
    creating = root / f"{_CREATING}{name}"
    creating.mkdir()
    fd = os.open(creating / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        final = root / name
        creating.rename(final)
        _fsync_dir(root)
    except OSError:
        os.close(fd)
        raise
    return final, fd


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """Tries an exclusive flock on `path` without waiting; yields whether it was taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _journal_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("replay-*.jsonl"))
    current = directory / CURRENT
    if current.exists() and current.stat().st_size:
        files.append(current)
    return files


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
