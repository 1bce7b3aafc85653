"""The SQLite outbox: one file in WAL mode, written by one thread with group commit.

Every operation is a function run on a dedicated writer thread that owns the connection. The
thread takes every operation queued while it was busy and runs them in one transaction (each in
its own savepoint, so one failing operation does not undo the others), commits once with
``synchronous=FULL`` and only then resolves their futures. Concurrent webhook requests thus
share one fsync, and none is acknowledged before the commit that holds it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

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

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS notifications (
    id INTEGER PRIMARY KEY,
    body TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    trace_context TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    notification_id INTEGER NOT NULL REFERENCES notifications(id),
    destination TEXT NOT NULL,
    group_id TEXT NOT NULL,
    group_key TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    accepted_at REAL NOT NULL,
    not_before REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    finished_at REAL,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS deliveries_queue ON deliveries(destination, state, id);
CREATE INDEX IF NOT EXISTS deliveries_open_groups ON deliveries(group_id, destination, id)
    WHERE state IN ('pending', 'leased');
CREATE INDEX IF NOT EXISTS deliveries_notification ON deliveries(notification_id);
CREATE TABLE IF NOT EXISTS dedup (key TEXT PRIMARY KEY, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS notifier_state (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, expires_at REAL
);
"""

# Walks the (destination, state, id) index in order and stops at the limit: no sort, and the
# large bodies are read only for the rows chosen. A delivery waits while an earlier one of its
# group and destination is still open.
_CLAIMABLE = """
SELECT d.id FROM deliveries d
WHERE d.destination = ?1 AND d.state = ?2 AND
  (CASE WHEN ?2 = 'pending' THEN d.not_before ELSE d.lease_until END) <= ?3
  AND NOT EXISTS (
      SELECT 1 FROM deliveries e
      WHERE e.group_id = d.group_id AND e.destination = d.destination AND e.id < d.id
        AND e.state IN ('pending', 'leased'))
ORDER BY d.id LIMIT ?4
"""

_STOP = object()


class _OperationFailed(Exception):
    """An operation of a batch raised; the batch is rolled back and run again isolated."""


class _Writer(threading.Thread):
    """Owns the connection; runs queued operations in shared transactions."""

    def __init__(self, path: Path, batch_size: int) -> None:
        super().__init__(name="sidecar-outbox-writer", daemon=True)
        self.path = path
        self.batch_size = batch_size
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.commits = 0
        self.durable = True
        self.before_rerun: Callable[[sqlite3.Connection], None] | None = None

    def run(self) -> None:
        try:
            connection = self._connect()
        except (sqlite3.Error, OSError) as error:
            self.error = error
            self.ready.set()
            return
        self.ready.set()
        try:
            while True:
                item = self.queue.get()
                if item is _STOP:
                    break
                batch = [item]
                while len(batch) < self.batch_size:
                    try:
                        more = self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is _STOP:
                        self.queue.put(_STOP)
                        break
                    batch.append(more)
                self._run_batch(connection, batch)
        finally:
            connection.close()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk when it returns, which is what the 2xx promises.
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA busy_timeout=5000")
        connection.executescript(_SCHEMA)
        _add_missing_columns(connection)
        return connection

    def _run_batch(self, connection: sqlite3.Connection, batch: list[Any]) -> None:
        try:
            results = self._run_together(connection, batch)
        except _OperationFailed:
            # Some operation raised: run them again one savepoint each, so that only the
            # failing ones fail. Savepoints cost more than half again, so only on this path.
            # Counters the rolled-back operations moved are read again from the table first.
            if self.before_rerun is not None:
                self.before_rerun(connection)
            results = self._run_isolated(connection, batch)
        except sqlite3.Error as error:
            results = self._fail(connection, batch, error)
        # One wake-up of each event loop per batch, not one per operation.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        for (_, future, loop, _), result in zip(batch, results, strict=True):
            by_loop.setdefault(loop, []).append((future, result))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, settled)
            except RuntimeError:  # the loop was closed while waiting; nobody is listening
                continue

    def _run_together(
        self, connection: sqlite3.Connection, batch: list[Any]
    ) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        self._set_durability(connection, batch)
        connection.execute("BEGIN IMMEDIATE")
        for operation, _, _, _ in batch:
            try:
                results.append((True, operation(connection)))
            except Exception as error:
                connection.execute("ROLLBACK")
                raise _OperationFailed from error
        connection.execute("COMMIT")
        self.commits += 1
        return results

    def _set_durability(self, connection: sqlite3.Connection, batch: list[Any]) -> None:
        # A batch that stores notifications (or anything else that must survive power loss)
        # commits with fsync. A batch of dispatcher bookkeeping only (claims, completions,
        # retries) does not: losing it re-delivers, which at-least-once allows, and the next
        # durable commit syncs the write-ahead log with it anyway.
        durable = any(item[3] for item in batch)
        if durable != self.durable:
            connection.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self.durable = durable

    def _run_isolated(
        self, connection: sqlite3.Connection, batch: list[Any]
    ) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        try:
            self._set_durability(connection, batch)
            connection.execute("BEGIN IMMEDIATE")
            for operation, _, _, _ in batch:
                connection.execute("SAVEPOINT op")
                try:
                    results.append((True, operation(connection)))
                    connection.execute("RELEASE op")
                except Exception as error:  # handed to the caller of this operation
                    connection.execute("ROLLBACK TO op")
                    connection.execute("RELEASE op")
                    results.append((False, error))
            connection.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as error:
            return self._fail(connection, batch, error)
        return results

    def _fail(
        self, connection: sqlite3.Connection, batch: list[Any], error: sqlite3.Error
    ) -> list[tuple[bool, Any]]:
        logger.error("outbox transaction of %d operations failed: %s", len(batch), error)
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        failure = OutboxUnavailable(f"SQLite outbox {self.path}: {error}")
        failure.__cause__ = error
        return [(False, failure)] * len(batch)


def _add_missing_columns(connection: sqlite3.Connection) -> None:
    """Bring a database written by an earlier version up to the current schema.

    ``CREATE TABLE IF NOT EXISTS`` leaves an existing table as it was, so columns added since
    are added here; their defaults give old rows the value they would have had."""
    columns = {row[1] for row in connection.execute("PRAGMA table_info(notifications)")}
    if "trace_context" not in columns:
        connection.execute(
            "ALTER TABLE notifications ADD COLUMN trace_context TEXT NOT NULL DEFAULT ''"
        )


def _settle(settled: list[tuple[asyncio.Future[Any], tuple[bool, Any]]]) -> None:
    for future, (ok, value) in settled:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class SqliteNotifierState:
    """Notifier memory in the ``notifier_state`` table; expired keys read as absent."""

    def __init__(self, outbox: SqliteOutbox) -> None:
        self._outbox = outbox

    async def get(self, key: str) -> str | None:
        def read(connection: sqlite3.Connection) -> str | None:
            row = connection.execute(
                "SELECT value, expires_at FROM notifier_state WHERE key = ?", (key,)
            ).fetchone()
            if row is None or (row[1] is not None and row[1] <= time.time()):
                return None
            return str(row[0])

        return await self._outbox.run(read, durable=False)

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        expires_at = time.time() + ttl if ttl is not None else None

        def write(connection: sqlite3.Connection) -> None:
            connection.execute(
                "INSERT OR REPLACE INTO notifier_state (key, value, expires_at) VALUES (?, ?, ?)",
                (key, value, expires_at),
            )

        await self._outbox.run(write)


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
        self.max_depth = max_depth
        self.dedup_window = dedup_window
        self.lease = lease
        self.retention = retention
        self.batch_size = batch_size
        self.recover = recover
        self._state = SqliteNotifierState(self)
        self._writer: _Writer | None = None
        self._depth = 0

    @property
    def state(self) -> SqliteNotifierState:
        """Notifier memory in this database."""
        return self._state

    @property
    def commits(self) -> int:
        """Transactions committed so far (fewer than operations thanks to group commit)."""
        return self._writer.commits if self._writer else 0

    async def start(self) -> None:
        from sidecar.errors import StartupError

        writer = _Writer(self.path, self.batch_size)
        writer.before_rerun = self._count_depth
        writer.start()
        await asyncio.to_thread(writer.ready.wait)
        if writer.error is not None:
            raise StartupError(
                f"cannot open the outbox database {self.path}: {writer.error}"
                " (set alerts.outbox.sqlite.path to a writable file)"
            ) from writer.error
        self._writer = writer

        def recover(connection: sqlite3.Connection) -> int:
            # Leases of a previous run belong to workers that no longer exist. The CLI opens
            # the file next to a running sidecar and must leave its leases alone.
            if self.recover:
                connection.execute("UPDATE deliveries SET state = 'pending' WHERE state = 'leased'")
            row = connection.execute(
                "SELECT COUNT(*) FROM deliveries WHERE state IN ('pending', 'leased')"
            ).fetchone()
            return int(row[0])

        self._depth = await self.run(recover)
        logger.info("outbox %s open with %d pending deliveries", self.path, self._depth)

    async def stop(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        writer.queue.put(_STOP)
        await asyncio.to_thread(writer.join)

    async def run(self, operation: Callable[[sqlite3.Connection], T], durable: bool = True) -> T:
        """Run ``operation`` on the writer thread, inside a transaction; wait for its commit.

        ``durable`` operations are committed with fsync before this returns; the others may be
        lost on power failure (never on a process crash)."""
        writer = self._writer
        if writer is None or not writer.is_alive():
            raise OutboxUnavailable("the SQLite outbox is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        writer.queue.put((operation, future, loop, durable))
        return await future

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
        group = group_id(notification.group_key)
        count = len(destinations)

        def write(connection: sqlite3.Connection) -> bool:
            now = time.time()
            row = connection.execute(
                "SELECT expires_at FROM dedup WHERE key = ?", (key,)
            ).fetchone()
            if row is not None and row[0] > now:
                return False
            if count and self._depth + count > self.max_depth:
                raise OutboxFull(f"the outbox holds {self._depth} deliveries (max_depth)")
            connection.execute(
                "INSERT OR REPLACE INTO dedup (key, expires_at) VALUES (?, ?)",
                (key, now + self.dedup_window),
            )
            if not count:
                return True
            cursor = connection.execute(
                "INSERT INTO notifications (body, accepted_at, trace_context) VALUES (?, ?, ?)",
                (body, now, trace_context),
            )
            connection.executemany(
                "INSERT INTO deliveries (notification_id, destination, group_id, group_key,"
                " state, accepted_at, not_before) VALUES (?, ?, ?, ?, 'pending', ?, ?)",
                [
                    (cursor.lastrowid, name, group, notification.group_key, now, now)
                    for name in destinations
                ],
            )
            self._depth += count
            return True

        return await self.run(write)

    async def claim(self, destination: str, limit: int) -> list[Claim]:
        def take(connection: sqlite3.Connection) -> list[Claim]:
            now = time.time()
            ids = [
                row[0]
                for row in connection.execute(_CLAIMABLE, (destination, "pending", now, limit))
            ]
            if len(ids) < limit:
                # Leases that ran out: their worker hung or its process died.
                expired = (destination, "leased", now, limit - len(ids))
                ids += [row[0] for row in connection.execute(_CLAIMABLE, expired)]
            if not ids:
                return []
            connection.executemany(
                "UPDATE deliveries SET state = 'leased', lease_until = ? WHERE id = ?",
                [(now + self.lease, delivery_id) for delivery_id in ids],
            )
            rows = connection.execute(
                "SELECT d.id, n.body, d.attempts, d.accepted_at, n.trace_context FROM deliveries d"
                " JOIN notifications n ON n.id = d.notification_id"
                " WHERE d.id IN (SELECT value FROM json_each(?)) ORDER BY d.id",
                (json.dumps(ids),),
            ).fetchall()
            return [Claim(str(row[0]), destination, row[1], row[2], row[3], row[4]) for row in rows]

        return await self.run(take, durable=False)

    async def _finish(
        self, delivery_id: str, sql: str, parameters: tuple[Any, ...], *, leaves: bool
    ) -> None:
        """Update a pending or claimed delivery; ``leaves`` if it is then done or dead."""

        def write(connection: sqlite3.Connection) -> None:
            cursor = connection.execute(
                sql + " WHERE id = ? AND state IN ('pending', 'leased')",
                (*parameters, int(delivery_id)),
            )
            if leaves:
                self._depth -= cursor.rowcount

        await self.run(write, durable=False)

    async def complete(self, delivery_id: str) -> None:
        await self._finish(
            delivery_id,
            "UPDATE deliveries SET state = 'done', attempts = attempts + 1, finished_at = ?",
            (time.time(),),
            leaves=True,
        )

    async def retry(self, delivery_id: str, delay: float, error: str) -> None:
        await self._finish(
            delivery_id,
            "UPDATE deliveries SET state = 'pending', attempts = attempts + 1, not_before = ?,"
            " last_error = ?",
            (time.time() + delay, error[:2000]),
            leaves=False,
        )

    async def release(self, delivery_id: str) -> None:
        await self._finish(
            delivery_id,
            "UPDATE deliveries SET state = 'pending', lease_until = ?",
            (0.0,),
            leaves=False,
        )

    async def bury(self, delivery_id: str, reason: str) -> None:
        await self._finish(
            delivery_id,
            "UPDATE deliveries SET state = 'dead', attempts = attempts + 1, finished_at = ?,"
            " last_error = ?",
            (time.time(), reason[:2000]),
            leaves=True,
        )

    async def requeue(self, delivery_id: str) -> bool:
        if not delivery_id.isdigit():
            return False

        def write(connection: sqlite3.Connection) -> bool:
            cursor = connection.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, not_before = ?,"
                " accepted_at = ?, last_error = '' WHERE id = ? AND state = 'dead'",
                (time.time(), time.time(), int(delivery_id)),
            )
            self._depth += cursor.rowcount
            return cursor.rowcount > 0

        return await self.run(write)

    async def list(self, state: State | None = None, limit: int = 100) -> list[DeliveryRecord]:
        def read(connection: sqlite3.Connection) -> list[DeliveryRecord]:
            rows = connection.execute(
                "SELECT id, destination, state, attempts, accepted_at, not_before, last_error,"
                " group_key FROM deliveries WHERE ?1 IS NULL OR state = ?1 ORDER BY id LIMIT ?2",
                (state, limit),
            ).fetchall()
            return [DeliveryRecord(str(row[0]), *row[1:]) for row in rows]

        return await self.run(read, durable=False)

    async def stats(self) -> OutboxStats:
        def read(connection: sqlite3.Connection) -> OutboxStats:
            depth, oldest = connection.execute(
                "SELECT COUNT(*), MIN(accepted_at) FROM deliveries"
                " WHERE state IN ('pending', 'leased')"
            ).fetchone()
            (dead,) = connection.execute(
                "SELECT COUNT(*) FROM deliveries WHERE state = 'dead'"
            ).fetchone()
            age = max(0.0, time.time() - oldest) if oldest is not None else 0.0
            return OutboxStats(int(depth), age, int(dead))

        return await self.run(read, durable=False)

    def _count_depth(self, connection: sqlite3.Connection) -> None:
        """Set the bound's counter from the table (on the writer thread)."""
        (self._depth,) = connection.execute(
            "SELECT COUNT(*) FROM deliveries WHERE state IN ('pending', 'leased')"
        ).fetchone()

    async def prune(self) -> int:
        def write(connection: sqlite3.Connection) -> int:
            now = time.time()
            cursor = connection.execute(
                "DELETE FROM deliveries WHERE state = 'done' AND finished_at < ?",
                (now - self.retention,),
            )
            connection.execute(
                "DELETE FROM notifications WHERE NOT EXISTS"
                " (SELECT 1 FROM deliveries d WHERE d.notification_id = notifications.id)"
            )
            connection.execute("DELETE FROM dedup WHERE expires_at <= ?", (now,))
            connection.execute(
                "DELETE FROM notifier_state WHERE expires_at IS NOT NULL AND expires_at <= ?",
                (now,),
            )
            self._count_depth(connection)
            return int(cursor.rowcount)

        return await self.run(write, durable=False)

    async def check_storage(self) -> None:
        def probe(connection: sqlite3.Connection) -> None:
            connection.execute("SELECT COUNT(*) FROM dedup").fetchone()

        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that arrives as the probe completes, and the health runner could then not stop.
        try:
            async with asyncio.timeout(5):
                await self.run(probe)
        except TimeoutError as error:
            raise OutboxUnavailable(
                f"the SQLite outbox {self.path} did not answer in 5s"
            ) from error
