"""The SQLite outbox's writer process: it owns the database and runs every operation on it.

``SqliteOutbox`` starts it as ``python -I -S sqlite_writer.py SETTINGS`` (see ``Settings``) and
talks to it over its standard input and output. It needs only the standard library, so it
starts fast and stays small.

Why a process and not a thread: the ``sqlite3`` module releases the GIL around every statement
and must take it back afterwards. Next to a busy event loop each of those hand-backs waits for
the interpreter's switch interval, so a writer thread spent most of its time waiting for the
GIL, and commits, not the disk, limited how fast webhooks were acknowledged. A process has its
own interpreter and runs beside the event loop on another core.

Protocol: every message is a frame, a 4-byte little-endian length and a ``marshal`` payload.

- A request is ``(request_id, operation, arguments, durable)``.
- A reply frame is ``(commits, results, log)``: the number of transactions committed so far,
  ``(request_id, ok, value)`` per request (``value`` is ``(kind, message)`` when not ``ok``,
  where ``kind`` is ``"full"`` or ``"unavailable"``), and ``(level, message)`` lines for the
  parent's log.
- Once the database is open the writer sends one reply for request 0: the number of
  undelivered deliveries, or the reason it could not open the file (and then exits).

Every request that arrived while the writer was busy runs in one transaction, each operation
as it would alone (group commit); the replies are written after the commit. A transaction
holding a durable request commits with ``synchronous=FULL``, so nothing durable is
acknowledged before it is on disk; one of bookkeeping only commits with ``NORMAL``. End of
input (the parent closed the pipe or died) makes the writer finish what it read and exit. It
ignores SIGINT and SIGTERM: a terminal's Ctrl-C or a signal to the whole process group must
not take it away while the parent still drains.
"""

from __future__ import annotations

import marshal
import os
import select
import signal
import sqlite3
import struct
import sys
import time
import zlib

# Only small modules of the standard library are loaded at run time: every module imported
# here stays resident in the writer for the life of the sidecar. Types are for the type
# checker alone.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Request = tuple[int, str, tuple[Any, ...], bool]
    Result = tuple[int, bool, Any]

ERROR = 40
"""The ``logging.ERROR`` level, for log lines sent to the parent."""

HEADER = struct.Struct("<I")
READ_SIZE = 1 << 20

SCHEMA = """
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


_CLAIMED = """
SELECT d.id, n.body, d.attempts, d.accepted_at, n.trace_context FROM deliveries d
JOIN notifications n ON n.id = d.notification_id WHERE d.id IN ({marks}) ORDER BY d.id
"""


class Refused(Exception):
    """An operation refused by the outbox's rules; ``kind`` tells the parent which error."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _OperationFailed(Exception):
    """An operation of a batch raised; the batch is rolled back and run again isolated."""


class Settings:
    """What the writer is started with (``SETTING_NAMES``, passed as a marshalled dict)."""

    def __init__(
        self,
        path: str,
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

    def argument(self) -> str:
        """The settings as the writer's command-line argument."""
        return marshal.dumps(vars(self)).hex()

    @classmethod
    def from_argument(cls, argument: str) -> Settings:
        return cls(**load(bytes.fromhex(argument)))


class Writer:
    """The connection and the outbox's operations on it, run in shared transactions."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.commits = 0
        self.depth = 0
        self._depth_before = 0
        self.durable = True
        self.log: list[tuple[int, str]] = []
        self.connection = self._connect(settings.path)

    def _connect(self, path: str) -> sqlite3.Connection:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        connection = sqlite3.connect(path, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk when it returns, which is what the 2xx promises.
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA busy_timeout=5000")
            connection.executescript(SCHEMA)
            _add_missing_columns(connection)
        except sqlite3.Error:
            connection.close()
            raise
        return connection

    def open(self) -> int:
        """Recover leases of a previous run if asked; the number of undelivered deliveries."""
        if self.settings.recover:
            # Leases of a previous run belong to workers that no longer exist. The CLI opens
            # the file next to a running sidecar and must leave its leases alone.
            self.connection.execute(
                "UPDATE deliveries SET state = 'pending' WHERE state = 'leased'"
            )
        self.count_depth()
        return self.depth

    def close(self) -> None:
        self.connection.close()

    def count_depth(self) -> None:
        """Set the bound's counter from the table."""
        (self.depth,) = self.connection.execute(
            "SELECT COUNT(*) FROM deliveries WHERE state IN ('pending', 'leased')"
        ).fetchone()

    def run_batch(self, batch: list[Request]) -> list[Result]:
        """Run the requests in one transaction and commit it; one result per request."""
        try:
            outcomes = self._run_together(batch)
        except _OperationFailed:
            # Some operation raised: run them again one savepoint each, so that only the
            # failing ones fail. Savepoints cost more than half again, so only on this path.
            # Counters the rolled-back operations moved are read again from the table first.
            self.count_depth()
            outcomes = self._run_isolated(batch)
        except sqlite3.Error as error:
            outcomes = self._fail(batch, error)
        return [
            (request[0], ok, value) for request, (ok, value) in zip(batch, outcomes, strict=True)
        ]

    def _run_together(self, batch: list[Request]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        self._depth_before = self.depth
        self._set_durability(batch)
        self.connection.execute("BEGIN IMMEDIATE")
        for _, name, arguments, _ in batch:
            try:
                outcomes.append((True, OPERATIONS[name](self, *arguments)))
            except Exception as error:
                self.connection.execute("ROLLBACK")
                raise _OperationFailed from error
        self.connection.execute("COMMIT")
        self.commits += 1
        return outcomes

    def _run_isolated(self, batch: list[Request]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        connection = self.connection
        self._depth_before = self.depth
        try:
            self._set_durability(batch)
            connection.execute("BEGIN IMMEDIATE")
            for _, name, arguments, _ in batch:
                connection.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, OPERATIONS[name](self, *arguments)))
                    connection.execute("RELEASE op")
                except Exception as error:  # handed to the caller of this operation
                    connection.execute("ROLLBACK TO op")
                    connection.execute("RELEASE op")
                    outcomes.append((False, _refusal(error)))
            connection.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as error:
            return self._fail(batch, error)
        return outcomes

    def _set_durability(self, batch: list[Request]) -> None:
        # A batch that stores notifications (or anything else that must survive power loss)
        # commits with fsync. A batch of dispatcher bookkeeping only (claims, completions,
        # retries) does not: losing it re-delivers, which at-least-once allows, and the next
        # durable commit syncs the write-ahead log with it anyway.
        durable = any(request[3] for request in batch)
        if durable != self.durable:
            self.connection.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self.durable = durable

    def _fail(self, batch: list[Request], error: sqlite3.Error) -> list[tuple[bool, Any]]:
        self.log.append((ERROR, f"outbox transaction of {len(batch)} operations failed: {error}"))
        if self.connection.in_transaction:
            self.connection.execute("ROLLBACK")
        # Nothing of the batch stays, so neither does what it did to the bound's counter.
        self.depth = self._depth_before
        reason = ("unavailable", f"SQLite outbox {self.settings.path}: {error}")
        return [(False, reason)] * len(batch)


def _refusal(error: Exception) -> tuple[str, str]:
    if isinstance(error, Refused):
        return error.kind, str(error)
    if isinstance(error, sqlite3.Error):
        return "unavailable", f"SQLite outbox: {error}"
    return "unavailable", f"SQLite outbox operation failed: {type(error).__name__}: {error}"


def _add_missing_columns(connection: sqlite3.Connection) -> None:
    """Bring a database written by an earlier version up to the current schema.

    ``CREATE TABLE IF NOT EXISTS`` leaves an existing table as it was, so columns added since
    are added here; their defaults give old rows the value they would have had."""
    columns = {row[1] for row in connection.execute("PRAGMA table_info(notifications)")}
    if "trace_context" not in columns:
        connection.execute(
            "ALTER TABLE notifications ADD COLUMN trace_context TEXT NOT NULL DEFAULT ''"
        )


def compress(body: str) -> bytes:
    """A notification's JSON as stored: compressed, since it is written twice (to the
    write-ahead log, then by the checkpoint to the database) and most of its size is labels
    repeated in every alert. Even the fastest level makes it several times smaller, and
    writing pages cost the writer more than compressing them."""
    return zlib.compress(body.encode("utf-8", "surrogatepass"), 1)


def expand(stored: str | bytes) -> str:
    """The JSON of a stored notification (bodies stored before compression are text)."""
    if isinstance(stored, str):
        return stored
    return zlib.decompress(stored).decode("utf-8", "surrogatepass")


# The operations. Each runs inside the batch's transaction and returns only what marshal can
# carry (None, numbers, strings, tuples and lists of them).


def enqueue(
    writer: Writer,
    key: str,
    group: str,
    group_key: str,
    body: str,
    destinations: list[str],
    trace_context: str,
) -> bool:
    connection = writer.connection
    now = time.time()
    # One statement both tests and records the key: it changes no row for a key seen within
    # the window. A refusal below rolls the record back with the rest.
    recorded = connection.execute(
        "INSERT INTO dedup (key, expires_at) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE"
        " SET expires_at = ?2 WHERE dedup.expires_at <= ?3",
        (key, now + writer.settings.dedup_window, now),
    ).rowcount
    if not recorded:
        return False
    count = len(destinations)
    if count and writer.depth + count > writer.settings.max_depth:
        raise Refused("full", f"the outbox holds {writer.depth} deliveries (max_depth)")
    if not count:
        return True
    cursor = connection.execute(
        "INSERT INTO notifications (body, accepted_at, trace_context) VALUES (?, ?, ?)",
        (compress(body), now, trace_context),
    )
    connection.executemany(
        "INSERT INTO deliveries (notification_id, destination, group_id, group_key,"
        " state, accepted_at, not_before) VALUES (?, ?, ?, ?, 'pending', ?, ?)",
        [(cursor.lastrowid, name, group, group_key, now, now) for name in destinations],
    )
    writer.depth += count
    return True


def claim(writer: Writer, destination: str, limit: int) -> list[tuple[Any, ...]]:
    connection = writer.connection
    now = time.time()
    ids = [row[0] for row in connection.execute(_CLAIMABLE, (destination, "pending", now, limit))]
    if len(ids) < limit:
        # Leases that ran out: their worker hung or its process died.
        expired = (destination, "leased", now, limit - len(ids))
        ids += [row[0] for row in connection.execute(_CLAIMABLE, expired)]
    if not ids:
        return []
    connection.executemany(
        "UPDATE deliveries SET state = 'leased', lease_until = ? WHERE id = ?",
        [(now + writer.settings.lease, delivery_id) for delivery_id in ids],
    )
    marks = ",".join("?" * len(ids))  # only placeholders are formatted into the query
    rows = connection.execute(
        _CLAIMED.format(marks=marks),
        ids,
    ).fetchall()
    return [(row[0], expand(row[1]), *row[2:]) for row in rows]


def _finish(writer: Writer, delivery_id: int, sql: str, parameters: tuple[Any, ...]) -> int:
    """Update a pending or claimed delivery; the number of rows changed (0 or 1)."""
    cursor = writer.connection.execute(
        sql + " WHERE id = ? AND state IN ('pending', 'leased')", (*parameters, delivery_id)
    )
    return cursor.rowcount


def complete(writer: Writer, delivery_id: int) -> None:
    writer.depth -= _finish(
        writer,
        delivery_id,
        "UPDATE deliveries SET state = 'done', attempts = attempts + 1, finished_at = ?",
        (time.time(),),
    )


def retry(writer: Writer, delivery_id: int, delay: float, error: str) -> None:
    _finish(
        writer,
        delivery_id,
        "UPDATE deliveries SET state = 'pending', attempts = attempts + 1, not_before = ?,"
        " last_error = ?",
        (time.time() + delay, error[:2000]),
    )


def release(writer: Writer, delivery_id: int) -> None:
    _finish(writer, delivery_id, "UPDATE deliveries SET state = 'pending', lease_until = ?", (0.0,))


def bury(writer: Writer, delivery_id: int, reason: str) -> None:
    writer.depth -= _finish(
        writer,
        delivery_id,
        "UPDATE deliveries SET state = 'dead', attempts = attempts + 1, finished_at = ?,"
        " last_error = ?",
        (time.time(), reason[:2000]),
    )


def requeue(writer: Writer, delivery_id: int) -> bool:
    now = time.time()
    cursor = writer.connection.execute(
        "UPDATE deliveries SET state = 'pending', attempts = 0, not_before = ?,"
        " accepted_at = ?, last_error = '' WHERE id = ? AND state = 'dead'",
        (now, now, delivery_id),
    )
    writer.depth += cursor.rowcount
    return cursor.rowcount > 0


def list_deliveries(writer: Writer, state: str | None, limit: int) -> list[tuple[Any, ...]]:
    rows = writer.connection.execute(
        "SELECT id, destination, state, attempts, accepted_at, not_before, last_error,"
        " group_key FROM deliveries WHERE ?1 IS NULL OR state = ?1 ORDER BY id LIMIT ?2",
        (state, limit),
    ).fetchall()
    return [tuple(row) for row in rows]


def stats(writer: Writer) -> tuple[int, float, int]:
    depth, oldest = writer.connection.execute(
        "SELECT COUNT(*), MIN(accepted_at) FROM deliveries WHERE state IN ('pending', 'leased')"
    ).fetchone()
    (dead,) = writer.connection.execute(
        "SELECT COUNT(*) FROM deliveries WHERE state = 'dead'"
    ).fetchone()
    age = max(0.0, time.time() - oldest) if oldest is not None else 0.0
    return int(depth), age, int(dead)


def prune(writer: Writer) -> int:
    connection = writer.connection
    now = time.time()
    cursor = connection.execute(
        "DELETE FROM deliveries WHERE state = 'done' AND finished_at < ?",
        (now - writer.settings.retention,),
    )
    connection.execute(
        "DELETE FROM notifications WHERE NOT EXISTS"
        " (SELECT 1 FROM deliveries d WHERE d.notification_id = notifications.id)"
    )
    connection.execute("DELETE FROM dedup WHERE expires_at <= ?", (now,))
    connection.execute(
        "DELETE FROM notifier_state WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
    )
    writer.count_depth()
    return int(cursor.rowcount)


def probe(writer: Writer) -> None:
    writer.connection.execute("SELECT COUNT(*) FROM dedup").fetchone()


def state_get(writer: Writer, key: str) -> str | None:
    row = writer.connection.execute(
        "SELECT value, expires_at FROM notifier_state WHERE key = ?", (key,)
    ).fetchone()
    if row is None or (row[1] is not None and row[1] <= time.time()):
        return None
    return str(row[0])


def state_set(writer: Writer, key: str, value: str, ttl: float | None) -> None:
    expires_at = time.time() + ttl if ttl is not None else None
    writer.connection.execute(
        "INSERT OR REPLACE INTO notifier_state (key, value, expires_at) VALUES (?, ?, ?)",
        (key, value, expires_at),
    )


OPERATIONS: dict[str, Callable[..., Any]] = {
    "enqueue": enqueue,
    "claim": claim,
    "complete": complete,
    "retry": retry,
    "release": release,
    "bury": bury,
    "requeue": requeue,
    "list": list_deliveries,
    "stats": stats,
    "prune": prune,
    "probe": probe,
    "state_get": state_get,
    "state_set": state_set,
}


def encode(message: Any) -> bytes:
    """One frame: the length, then the marshalled message."""
    payload = marshal.dumps(message)
    return HEADER.pack(len(payload)) + payload


def load(payload: bytes | bytearray) -> Any:
    """One marshalled message (from the other end of our own pipe, never from the network)."""
    return marshal.loads(payload)  # noqa: S302 - written by the same code on the same host


def decode(buffer: bytearray) -> tuple[list[Any], int]:
    """The complete frames at the start of ``buffer`` and how many bytes they took."""
    messages: list[Any] = []
    offset = 0
    while len(buffer) - offset >= HEADER.size:
        (size,) = HEADER.unpack_from(buffer, offset)
        end = offset + HEADER.size + size
        if end > len(buffer):
            break
        messages.append(load(buffer[offset + HEADER.size : end]))
        offset = end
    return messages, offset


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def serve(writer: Writer, source: int, sink: int) -> None:
    """Answer requests from ``source`` on ``sink`` until the end of ``source``."""
    buffer = bytearray()
    open_input = True
    while open_input:
        chunk = os.read(source, READ_SIZE)
        open_input = bool(chunk)
        buffer += chunk
        # Whatever else is already waiting joins this batch: one commit for all of it.
        while open_input and select.select([source], [], [], 0)[0]:
            chunk = os.read(source, READ_SIZE)
            open_input = bool(chunk)
            buffer += chunk
        requests, used = decode(buffer)
        del buffer[:used]
        size = writer.settings.batch_size
        for start in range(0, len(requests), size):
            results = writer.run_batch(requests[start : start + size])
            log, writer.log = writer.log, []
            _write_all(sink, encode((writer.commits, results, log)))


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    settings = Settings.from_argument(argv[1])
    source, sink = sys.stdin.fileno(), sys.stdout.fileno()
    try:
        writer = Writer(settings)
        depth = writer.open()
    except (sqlite3.Error, OSError) as error:
        _write_all(sink, encode((0, [(0, False, ("startup", str(error)))], [])))
        return 1
    _write_all(sink, encode((0, [(0, True, depth)], [])))
    try:
        serve(writer, source, sink)
    except BrokenPipeError:
        pass  # the parent is gone; everything acknowledged was committed
    finally:
        writer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
