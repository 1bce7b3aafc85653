"""The SQLite outbox: one file in WAL mode, written by a process of its own with group commit.

The writer process (``sqlite_writer``) owns the connection and runs every operation; this
class is its asynchronous front. A request goes to the writer at once when it is idle, and
otherwise with the others of the loop's turn, at most ``SEND_EVERY`` held back; the writer runs
every request that reached it while it was busy in one transaction, commits once and only then
answers. A transaction holding a new notification commits with ``synchronous=FULL``; one of
dispatcher bookkeeping only (claims, completions, retries) with ``NORMAL``, whose loss on power
failure means a redelivery. Concurrent webhook requests thus share one fsync, none is
acknowledged before the commit that holds it, and the statements and commits run on another
core than the event loop.

If the writer dies, the requests waiting on it fail with ``OutboxUnavailable`` (the receiver
answers 503, the dispatcher's leases run out) and the next operation starts a new writer, at
most once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from sidecar.alerts.outbox import sqlite_writer
from sidecar.alerts.outbox.base import (
    Claim,
    DeliveryRecord,
    OutboxFull,
    OutboxStats,
    OutboxUnavailable,
    State,
    group_id,
)
from sidecar.alerts.payload import Notification

logger = logging.getLogger(__name__)

RESTART_INTERVAL = 1.0
STOP_TIMEOUT = 10.0
SEND_EVERY = 8
"""Requests held back while the writer is busy before they are written to it anyway: the loop
may take many milliseconds over one turn, and the writer can start on these meanwhile."""
MAX_UNSENT = 64 << 20
"""Bytes of requests waiting for the pipe beyond which durable requests (new notifications)
are refused (503)."""


class SqliteNotifierState:
    """Notifier memory in the ``notifier_state`` table; expired keys read as absent."""

    def __init__(self, outbox: SqliteOutbox) -> None:
        self._outbox = outbox

    async def get(self, key: str) -> str | None:
        value: str | None = await self._outbox.call("state_get", key, durable=False)
        return value

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        await self._outbox.call("state_set", key, value, ttl)


class SqliteOutbox:
    """The default outbox backend; see the module docstring."""

    def __init__(
        self,
        path: Path,
        *,
        max_depth: int,
        dedup_window: float,
        lease: float,
        retention: float,
        batch_size: int = 256,
        recover: bool = True,
    ) -> None:
        self.path = path
        self.settings = sqlite_writer.Settings(
            path=str(path),
            max_depth=max_depth,
            dedup_window=dedup_window,
            lease=lease,
            retention=retention,
            batch_size=batch_size,
            recover=recover,
        )
        self._state = SqliteNotifierState(self)
        self._writer: _WriterProcess | None = None
        self._running = False
        self._restarting = asyncio.Lock()
        self._last_start = 0.0
        self._commits_before = 0

    @property
    def state(self) -> SqliteNotifierState:
        """Notifier memory in this database."""
        return self._state

    @property
    def commits(self) -> int:
        """Transactions committed so far (fewer than operations thanks to group commit)."""
        writer = self._writer
        return self._commits_before + (writer.commits if writer else 0)

    @property
    def writer_pid(self) -> int | None:
        """The process id of the writer, or None while none runs."""
        writer = self._writer
        return writer.pid if writer is not None and writer.alive else None

    async def start(self) -> None:
        from sidecar.errors import StartupError

        try:
            self._writer, depth = await self._spawn(self.settings)
        except OutboxUnavailable as error:
            raise StartupError(
                f"cannot open the outbox database {self.path}: {error}"
                " (set alerts.outbox.sqlite.path to a writable file)"
            ) from error
        self._running = True
        logger.info("outbox %s open with %d pending deliveries", self.path, depth)

    async def stop(self) -> None:
        self._running = False
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.close()

    async def _spawn(self, settings: sqlite_writer.Settings) -> tuple[_WriterProcess, int]:
        self._last_start = time.monotonic()
        writer = _WriterProcess()
        depth = await writer.open(settings)
        return writer, int(depth)

    async def _current(self) -> _WriterProcess:
        """The running writer; a new one if the last has died (at most once a second)."""
        writer = self._writer
        if writer is not None and writer.alive:
            return writer
        if not self._running:
            raise OutboxUnavailable("the SQLite outbox is not running")
        async with self._restarting:
            writer = self._writer
            if writer is not None and writer.alive:
                return writer
            if time.monotonic() - self._last_start < RESTART_INTERVAL:
                raise OutboxUnavailable("the SQLite outbox writer is restarting")
            if writer is not None:
                self._commits_before += writer.commits
                self._writer = None
                await writer.close()
            # Deliveries claimed before the writer died are still in flight: their leases
            # stay, and run out if their workers are gone too.
            settings = sqlite_writer.Settings(**{**vars(self.settings), "recover": False})
            writer, depth = await self._spawn(settings)
            if not self._running:
                # Stopped while this writer started: it must not outlive the outbox.
                await writer.close()
                raise OutboxUnavailable("the SQLite outbox is stopped")
            self._writer = writer
            logger.warning("SQLite outbox writer restarted with %d pending deliveries", depth)
            return writer

    async def call(self, operation: str, *arguments: Any, durable: bool = True) -> Any:
        """Run one writer operation and wait for the commit that holds it.

        ``durable`` operations are committed with fsync before this returns; the others may be
        lost on power failure (never on a process crash)."""
        writer = self._writer
        if writer is None or not writer.alive:
            writer = await self._current()
        return await writer.request(operation, arguments, durable)

    async def enqueue(
        self,
        notification: Notification,
        destinations: list[str],
        key: str,
        body: str | None = None,
        trace_context: str = "",
    ) -> bool:
        if body is None:
            body = notification.to_json()
        group_key = notification.group_key
        stored: bool = await self.call(
            "enqueue", key, group_id(group_key), group_key, body, destinations, trace_context
        )
        return stored

    async def claim(self, destination: str, limit: int) -> list[Claim]:
        rows = await self.call("claim", destination, limit, durable=False)
        return [Claim(str(row[0]), destination, *row[1:]) for row in rows]

    async def complete(self, delivery_id: str) -> None:
        await self.call("complete", int(delivery_id), durable=False)

    async def retry(self, delivery_id: str, delay: float, error: str) -> None:
        await self.call("retry", int(delivery_id), delay, error, durable=False)

    async def release(self, delivery_id: str) -> None:
        await self.call("release", int(delivery_id), durable=False)

    async def bury(self, delivery_id: str, reason: str) -> None:
        await self.call("bury", int(delivery_id), reason, durable=False)

    async def requeue(self, delivery_id: str) -> bool:
        if not delivery_id.isdigit():
            return False
        requeued: bool = await self.call("requeue", int(delivery_id))
        return requeued

    async def list(self, state: State | None = None, limit: int = 100) -> list[DeliveryRecord]:
        rows = await self.call("list", state, limit, durable=False)
        return [DeliveryRecord(str(row[0]), *row[1:]) for row in rows]

    async def stats(self) -> OutboxStats:
        depth, age, dead = await self.call("stats", durable=False)
        return OutboxStats(depth, age, dead)

    async def prune(self) -> int:
        pruned: int = await self.call("prune", durable=False)
        return pruned

    async def check_storage(self) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that arrives as the probe completes, and the health runner could then not stop.
        try:
            async with asyncio.timeout(5):
                await self.call("probe")
        except TimeoutError as error:
            raise OutboxUnavailable(
                f"the SQLite outbox {self.path} did not answer in 5s"
            ) from error


_ERRORS: dict[str, type[OutboxUnavailable | OutboxFull]] = {
    "full": OutboxFull,
    "unavailable": OutboxUnavailable,
    "startup": OutboxUnavailable,
}


class _WriterProcess:
    """One writer process and the requests waiting for its answers."""

    def __init__(self) -> None:
        self.commits = 0
        self.alive = False
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._unsent: list[bytes] = []
        self._next_id = 1

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def open(self, settings: sqlite_writer.Settings) -> Any:
        """Start the process and wait until the database is open; its first answer."""
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[Any] = loop.create_future()
        self._waiting[0] = opened
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-S",
                sqlite_writer.__file__,
                settings.argument(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        except OSError as error:
            raise OutboxUnavailable(f"cannot start the SQLite outbox writer: {error}") from error
        self.alive = True
        self._reader = asyncio.create_task(self._read_answers(), name="sqlite-outbox-answers")
        try:
            return await opened
        except OutboxUnavailable:
            await self.close()
            raise
        except BaseException:
            # Cancelled while the database opened: the writer must not outlive its caller.
            # The answers' task sees it exit, reaps it and fails what waits on it.
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            raise

    def request(self, operation: str, arguments: tuple[Any, ...], durable: bool) -> Any:
        """Send one request (with the others of this turn of the loop); a future of its answer."""
        process = self._process
        if not self.alive or process is None or process.stdin is None:
            raise OutboxUnavailable("the SQLite outbox writer is not running")
        # New notifications are refused while the writer lags; the dispatcher's bookkeeping
        # is small and still goes, so that finished deliveries are not delivered again.
        if durable and process.stdin.transport.get_write_buffer_size() > MAX_UNSENT:
            raise OutboxUnavailable("the SQLite outbox writer is not keeping up")
        request_id = self._next_id
        frame = sqlite_writer.encode((request_id, operation, arguments, durable))
        self._next_id += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        self._unsent.append(frame)
        if len(self._waiting) == 1 or len(self._unsent) >= SEND_EVERY:
            # The writer has nothing to do, or enough for a transaction waits: hand it over
            # now rather than at the end of the loop's turn, so that the writer commits while
            # the loop goes on with other requests.
            self._send()
        elif len(self._unsent) == 1:
            # It is busy: what comes during this turn goes in as few writes as possible, and
            # it takes all that reached it into its next transaction.
            asyncio.get_running_loop().call_soon(self._send)
        return future

    def _send(self) -> None:
        if not self._unsent:
            return
        unsent, self._unsent = self._unsent, []
        process = self._process
        if not self.alive or process is None or process.stdin is None:
            return  # the answers' reader failed the waiting requests already
        try:
            process.stdin.write(b"".join(unsent))
        except (ConnectionError, RuntimeError) as error:
            self._fail_all(f"the SQLite outbox writer stopped reading: {error}")

    async def _read_answers(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        stdout = self._process.stdout
        header = sqlite_writer.HEADER
        try:
            while True:
                (size,) = header.unpack(await stdout.readexactly(header.size))
                commits, results, log = sqlite_writer.load(await stdout.readexactly(size))
                self.commits = commits
                for level, message in log:
                    logger.log(level, "%s", message)
                for request_id, ok, value in results:
                    future = self._waiting.pop(request_id, None)
                    if future is None or future.done():
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        kind, message = value
                        future.set_exception(_ERRORS.get(kind, OutboxUnavailable)(message))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the writer ended: its exit code says why
        except Exception:
            # The boundary of the answers' task: a reply that cannot be read leaves every
            # waiting request without an answer, so the writer is ended and replaced.
            logger.exception("unreadable answer from the SQLite outbox writer; ending it")
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
        code = await self._process.wait()
        if self.alive and self._waiting.keys() - {0}:
            logger.error("the SQLite outbox writer exited with code %s", code)
        self._fail_all(f"the SQLite outbox writer exited with code {code}")

    def _fail_all(self, reason: str) -> None:
        self.alive = False
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(OutboxUnavailable(reason))

    async def close(self) -> None:
        """Let the writer answer what it has, then end it (killed if it does not stop)."""
        process = self._process
        if process is None:
            return
        if process.stdin is not None:
            if self._unsent:
                self._send()
            with contextlib.suppress(ConnectionError, RuntimeError):
                process.stdin.close()
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()
        except TimeoutError:
            logger.error("the SQLite outbox writer did not stop in %ss; killing it", STOP_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        if self._reader is not None:
            await self._reader
        self._fail_all("the SQLite outbox is stopped")
