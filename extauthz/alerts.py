"""Budget alert delivery (docs/design.md section 13): a background task that POSTs each
event the charge scripts appended to an `alerts:{<tag>}` stream to the operator's webhook,
at least once, and removes it from Redis only once the webhook answered 2xx.

Every server with EXTAUTHZ_ALERT_WEBHOOK_URL runs one; they share the consumer group
`alerts`, so each event goes to one of them at a time. The retry schedule lives in Redis,
not in memory: an event stays in the group's pending list until acknowledged, and any
server claims it again (XCLAIM with a minimum idle time, which only one claimer can win)
once `timeout + backoff(attempts)` has passed since the last attempt began. A server that
stops or dies loses nothing: the others, or its successor, retry what it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from extauthz.metrics import Metrics
from keys.alert_stream import GROUP, SINGLE_STREAM, STREAM_MATCH, AlertEvent
from keys.connection import REDIS_ERRORS, Client
from keys.errors import StoreUnavailable
from keys.stream_groups import create_groups, forget_idle_consumers

log = logging.getLogger("extauthz.alerts")

RETRY_CAP_S: Final = 300.0  # the longest backoff between two attempts at one event
SWEEP_S: Final = 30.0  # every stream's length looked at: events no hint told us about
RESCAN_S: Final = 600.0  # Redis Cluster: SCAN for streams (also at start)
BATCH: Final = 100  # entries read or claimed per stream per round
CONCURRENCY: Final = 4  # webhook requests at once (and events taken from Redis at once)
USER_AGENT: Final = "extauthz-alerts"


def signature(secret: str, body: bytes) -> str:
    """The `x-extauthz-signature` value: `sha256=` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def webhook_host(url: str) -> str:
    """What the logs say about the webhook: scheme and host, never a path or query (a
    chat webhook's path is its secret) nor credentials."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")


def backoff_s(entry_id: str, attempts: int, base_s: float) -> float:
    """The wait after the `attempts`-th failed attempt: base x 2^(attempts-1), at most
    RETRY_CAP_S, times a jitter in [0.5, 1) drawn from the entry id and attempt number, so
    every server computes the same one and events that failed together spread out."""
    doublings: int = min(max(attempts - 1, 0), 30)
    raw = min(base_s * (1 << doublings), RETRY_CAP_S)
    jitter = zlib.crc32(f"{entry_id}:{attempts}".encode()) / 2**32
    return raw * (0.5 + 0.5 * jitter)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx is an answer that is not 2xx: the event is retried, never re-sent elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Deadline:
    """The end of one attempt: at `timeout` after it began, the connection's socket is shut
    down, so a webhook that trickles its answer a byte at a time (each read within the
    socket's own timeout) cannot hold an attempt, its slot and its thread for longer."""

    def __init__(self, timeout_s: float) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._timer = threading.Timer(timeout_s, self.expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        _current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        _current.deadline = None

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            expired = self._expired
        if expired:
            _shut(sock)

    def expire(self) -> None:
        with self._lock:
            self._expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    # the plain socket's shutdown, also under TLS: the blocked read returns, nothing else
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


_current = threading.local()


def _watched(base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
    class Watched(base):  # type: ignore[valid-type,misc]
        def connect(self) -> None:
            super().connect()
            deadline: _Deadline | None = getattr(_current, "deadline", None)
            if deadline is not None and self.sock is not None:
                deadline.watch(self.sock)

    return Watched


class _WatchedHTTP(urllib.request.HTTPHandler):
    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        return super().do_open(_watched(http_class), req, **kwargs)


class _WatchedHTTPS(urllib.request.HTTPSHandler):
    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        return super().do_open(_watched(http_class), req, **kwargs)


_OPENER = urllib.request.build_opener(_NoRedirect, _WatchedHTTP, _WatchedHTTPS)


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """One POST (blocking: run in a thread), over in `timeout_s` at most (name resolution
    aside); the status, or an OSError or http.client.HTTPException for no answer. Once the
    status is in, a body that breaks off or runs late does not change it."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310 (http(s) only: settings.webhook_url)
    with _Deadline(timeout_s):
        try:
            with _OPENER.open(request, timeout=timeout_s) as response:
                with contextlib.suppress(OSError, http.client.HTTPException):
                    response.read(65_536)
                return int(response.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return int(exc.code)


@dataclass(frozen=True, slots=True)
class Held:
    stream: str
    entry_id: str
    fields: dict[str, str] | None  # None: the entry is gone (deleted after its delivery)
    retry: bool  # an attempt after one that failed (claimed from the pending list)


class AlertDeliverer:
    def __init__(
        self,
        client: Client,
        *,
        cluster: bool,
        url: str,
        secret: str,
        metrics: Metrics,
        retry_base_s: float = 1.0,
        timeout_s: float = 5.0,
        consumer: str = "",
    ) -> None:
        self.client = client
        self.cluster = cluster
        self.url = url
        self.secret = secret
        self.metrics = metrics
        self.retry_base_s = retry_base_s
        self.timeout_s = timeout_s
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.known: set[str] = set()  # streams with the group
        self.active: set[str] = set()  # streams that held events at the last look
        self._hinted: set[str] = set()
        self._in_flight: set[tuple[str, str]] = set()
        # where the next look at a stream's pending list starts: after a full page, the
        # next round reads the next page, so entries past the first BATCH get their turn
        self._pending_from: dict[str, str] = {}
        self._attempts: set[asyncio.Task[None]] = set()
        self._limit = asyncio.Semaphore(CONCURRENCY)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._redis_failing = False

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="alerts")
        log.info(
            "delivering budget alerts",
            extra={
                "webhook": webhook_host(self.url),
                "signed": bool(self.secret),
                "consumer": self.consumer,
            },
        )

    async def stop(self) -> None:
        """Stops reading and claiming, and gives attempts in flight until their timeout:
        one cut short leaves its event pending, for the next attempt by any server."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._attempts:
            await asyncio.wait(self._attempts, timeout=self.timeout_s)
        for attempt in list(self._attempts):
            attempt.cancel()

    def notify(self, stream: str) -> None:
        """A charge appended events to `stream` (MoneyPath.on_alert): read it now."""
        self._hinted.add(stream)
        self._wake.set()

    # --- the loop -------------------------------------------------------------------

    @property
    def tick_s(self) -> float:
        """How often the streams holding events are looked at for retries that are due."""
        return max(min(self.retry_base_s, 1.0), 0.02)

    def retry_after_s(self, entry_id: str, attempts: int) -> float:
        """Since the last attempt began: its timeout (it may still be running), then the
        backoff."""
        return self.timeout_s + backoff_s(entry_id, attempts, self.retry_base_s)

    async def _run(self) -> None:
        next_sweep = next_scan = 0.0
        next_forget = time.monotonic() + RESCAN_S
        while True:
            try:
                now = time.monotonic()
                if now >= next_scan:
                    await self._discover()
                    next_scan = now + RESCAN_S
                if now >= next_sweep:
                    await self._sweep()
                    next_sweep = now + SWEEP_S
                if now >= next_forget:
                    await self._forget_idle_consumers()
                    next_forget = now + RESCAN_S
                await self._round()
                if self._redis_failing:
                    log.info("alert streams reachable again")
                    self._redis_failing = False
            except (*REDIS_ERRORS, StoreUnavailable) as exc:
                if not self._redis_failing:
                    log.warning("alert streams unreachable", extra={"error": type(exc).__name__})
                    self._redis_failing = True
            except Exception:
                log.exception("alert delivery round failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_s)

    async def _discover(self) -> None:
        """The streams there are: one on a single Redis; on a cluster every `alerts:{*}`
        on every primary (SCAN walks the keyspace, hence RESCAN_S)."""
        if not self.cluster:
            found = {SINGLE_STREAM}
        else:
            scan = self.client.scan_iter(match=STREAM_MATCH, count=1000, _type="stream")
            found = {name async for name in scan}
        await self._join(found)

    async def _join(self, streams: Iterable[str]) -> None:
        """Joins the group on streams not seen before (created at their first entry)."""
        new = sorted(set(streams) - self.known)
        if not new:
            return
        await create_groups(self.client, new, GROUP, mkstream=True)
        self.known.update(new)
        self.active.update(new)

    async def _sweep(self) -> None:
        """Which known streams hold events (XLEN: delivered events are deleted)."""
        names = sorted(self.known)
        if not names:
            return
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.xlen(name)
        lengths = await pipe.execute()
        self.active |= {name for name, n in zip(names, lengths, strict=True) if int(n)}

    async def _forget_idle_consumers(self) -> None:
        """Drops the names of servers that stopped (every server that read a stream left
        its name there)."""
        await forget_idle_consumers(
            self.client, sorted(self.known), GROUP, self.consumer, tolerate=True
        )

    async def _round(self) -> None:
        """On the streams that hold events or were just written: new entries, and pending
        ones whose retry is due (claimed: only one server wins each claim). No more are
        taken than can be attempted at once: an event waiting here for a free slot would
        age in the pending list, and another server could claim it meanwhile."""
        hinted, self._hinted = self._hinted, set()
        await self._join(hinted)
        streams = sorted(self.active | hinted)
        if not streams:
            self.metrics.alerts_pending.set(0)
            return
        room = CONCURRENCY - len(self._in_flight)
        min_idle_ms = int(self.retry_after_s("", 1) * 500)  # below any retry's wait
        pipe = self.client.pipeline(transaction=False)
        for name in streams:
            if room > 0:
                pipe.xreadgroup(GROUP, self.consumer, {name: ">"}, count=room)
            start = self._pending_from.get(name, "-")
            pipe.xpending_range(name, GROUP, start, "+", BATCH, idle=min_idle_ms)
            pipe.xlen(name)
        replies = iter(await pipe.execute(raise_on_error=False))
        held: list[Held] = []
        claims: list[tuple[str, str, int]] = []
        pending = 0
        for name in streams:
            fresh = next(replies) if room > 0 else []
            due, length = next(replies), next(replies)
            failed = next((r for r in (fresh, due, length) if isinstance(r, Exception)), None)
            if failed is not None:
                if "NOGROUP" not in str(failed):
                    raise failed
                # the stream was removed (and maybe written again): join it again
                self.known.discard(name)
                self.active.discard(name)
                self._hinted.add(name)
                continue
            held += [Held(name, entry_id, fields, False) for entry_id, fields in _messages(fresh)]
            page_done = True
            for entry in due:
                entry_id = str(entry["message_id"])
                wait_ms = int(self.retry_after_s(entry_id, int(entry["times_delivered"])) * 1000)
                idle_ms = int(entry["time_since_delivered"])
                if (name, entry_id) in self._in_flight or idle_ms < wait_ms:
                    continue
                if len(held) + len(claims) >= room:
                    page_done = False  # no slot for it now: this page again next round
                    break
                claims.append((name, entry_id, wait_ms))
            if page_done and len(due) == BATCH:
                self._pending_from[name] = "(" + str(due[-1]["message_id"])
            elif page_done:
                self._pending_from.pop(name, None)
            pending += int(length)
            if int(length) == 0 and not any(s == name for s, _ in self._in_flight):
                self.active.discard(name)
            else:
                self.active.add(name)
        self.metrics.alerts_pending.set(pending)
        if claims:
            pipe = self.client.pipeline(transaction=False)
            for name, entry_id, wait_ms in claims:
                pipe.xclaim(name, GROUP, self.consumer, wait_ms, [entry_id])
            for (name, entry_id, _), claimed in zip(claims, await pipe.execute(), strict=True):
                # Redis before 7 answers a deleted entry as nil (and keeps it pending)
                held += [Held(name, cid or entry_id, fields, True) for cid, fields in claimed]
        for item in held:
            key = (item.stream, item.entry_id)
            if key in self._in_flight:
                continue
            self._in_flight.add(key)
            attempt = asyncio.create_task(self._attempt(item), name="alert-attempt")
            self._attempts.add(attempt)
            attempt.add_done_callback(self._attempts.discard)

    # --- one attempt ----------------------------------------------------------------

    async def _attempt(self, item: Held) -> None:
        try:
            async with self._limit:
                await self._deliver(item)
        except (*REDIS_ERRORS, StoreUnavailable) as exc:
            # delivered or not, the entry stays pending and is attempted again
            log.warning("alert acknowledgement failed", extra={"error": type(exc).__name__})
        finally:
            self._in_flight.discard((item.stream, item.entry_id))
            self._wake.set()  # a slot is free: the next round may take another event

    async def _deliver(self, item: Held) -> None:
        if item.fields is None:  # deleted by the server that delivered it: acknowledge
            await self._done(item)
            return
        try:
            event = AlertEvent.from_fields(item.fields)
        except (KeyError, ValueError):
            log.error(
                "dropping an alert stream entry that is not an event",
                extra={"stream": item.stream, "entry_id": item.entry_id},
            )
            await self._done(item)
            return
        if item.retry:
            self.metrics.alerts_retried.inc()
        body = json.dumps(event.payload(), separators=(",", ":")).encode()
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "x-extauthz-event-id": event.event_id,
        }
        if self.secret:
            headers["x-extauthz-signature"] = signature(self.secret, body)
        try:
            status = await asyncio.to_thread(post, self.url, body, headers, self.timeout_s)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # no answer, or not HTTP
            reason = getattr(exc, "reason", None) or exc  # URLError wraps the OSError
            status, error = 0, f"{type(exc).__name__}: {reason}"[:200]
        else:
            error = ""
        if 200 <= status < 300:
            await self._done(item)
            self.metrics.alerts_sent.inc()
            log.info(
                "budget alert delivered",
                extra={
                    "event_id": event.event_id,
                    "scope": event.scope,
                    "id": event.id,
                    "threshold": event.threshold_bp / 10_000,
                },
            )
            return
        self.metrics.alerts_failed.inc()
        log.warning(
            "budget alert not delivered; it will be retried",
            extra={
                "event_id": event.event_id,
                "webhook": webhook_host(self.url),
                "status": status or None,
                "error": error or None,
            },
        )

    async def _done(self, item: Held) -> None:
        """XDEL, then XACK (as the ledger sink does): stopped in between, the entry is
        pending without content, and its next claim finds it gone and acknowledges it."""
        pipe = self.client.pipeline(transaction=False)
        pipe.xdel(item.stream, item.entry_id)
        pipe.xack(item.stream, GROUP, item.entry_id)
        await pipe.execute()


def _messages(reply: Any) -> list[tuple[str, dict[str, str] | None]]:
    """XREADGROUP's reply for one stream (RESP2 list or RESP3 map) as (id, fields)."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    out: list[tuple[str, dict[str, str] | None]] = []
    for _, messages in pairs:
        if isinstance(reply, dict):
            messages = messages[0] if messages else []
        out += [(str(entry_id), fields) for entry_id, fields in messages if entry_id]
    return out
