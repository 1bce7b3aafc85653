"""The SQLite outbox's writer process: its failures, its end, and batches that partly fail."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from sidecar.alerts.outbox import sqlite_writer
from sidecar.alerts.outbox.base import OutboxUnavailable
from sidecar.alerts.outbox.sqlite import SqliteOutbox, _WriterProcess
from sidecar.alerts.payload import Notification
from tests.alerts_support import payload, poll


def _notification(group: str) -> Notification:
    return Notification.model_validate(payload(group))


def _outbox(path: Path, **bounds: float) -> SqliteOutbox:
    settings = {"max_depth": 100, "dedup_window": 60, "lease": 600, "retention": 60, **bounds}
    return SqliteOutbox(path, **settings)  # type: ignore[arg-type]


async def test_a_killed_writer_fails_what_waits_and_is_replaced(tmp_path: Path) -> None:
    outbox = _outbox(tmp_path / "outbox.sqlite3")
    await outbox.start()
    await outbox.enqueue(_notification("before"), ["a"], "k1")
    claimed = await outbox.claim("a", 10)
    first = outbox.writer_pid
    assert first is not None

    os.kill(first, signal.SIGKILL)
    with pytest.raises(OutboxUnavailable):
        await _enqueue_until_refused(outbox)
    stored = await poll(
        lambda: _try_enqueue(outbox, "after"), within=10, what="a new writer to take requests"
    )
    second = outbox.writer_pid
    stats = await outbox.stats()
    again = await outbox.claim("a", 10)
    await outbox.stop()

    assert len(claimed) == 1
    assert stored is True
    assert second is not None
    assert second != first
    # The lease of the delivery claimed before the crash is kept: its worker may still be
    # delivering it, and a replaced writer must not hand it out a second time at once.
    assert [claim.delivery_id for claim in again] != [claimed[0].delivery_id]
    assert stats.depth >= 2


async def _enqueue_until_refused(outbox: SqliteOutbox) -> None:
    # Until the death is noticed a request may still be sent to the dead writer; either way
    # it fails, and none is acknowledged.
    for number in range(100):
        await outbox.enqueue(_notification(f"during{number}"), ["a"], f"during{number}")
        await asyncio.sleep(0.01)


async def _try_enqueue(outbox: SqliteOutbox, group: str) -> bool | None:
    try:
        return await outbox.enqueue(_notification(group), ["a"], f"key-{group}")
    except OutboxUnavailable:
        return None


async def test_stop_answers_every_request_already_made(tmp_path: Path) -> None:
    outbox = _outbox(tmp_path / "outbox.sqlite3", max_depth=1000)
    await outbox.start()
    pending = [
        asyncio.create_task(outbox.enqueue(_notification(f"s{i}"), ["a"], f"s{i}"))
        for i in range(50)
    ]
    await asyncio.sleep(0)

    await outbox.stop()
    results = await asyncio.gather(*pending)
    reopened = _outbox(tmp_path / "outbox.sqlite3")
    await reopened.start()
    stats = await reopened.stats()
    await reopened.stop()

    assert results == [True] * 50
    assert stats.depth == 50


async def test_requests_after_stop_are_refused(tmp_path: Path) -> None:
    outbox = _outbox(tmp_path / "outbox.sqlite3")
    await outbox.start()
    await outbox.stop()

    with pytest.raises(OutboxUnavailable, match="not running"):
        await outbox.enqueue(_notification("late"), ["a"], "late")
    assert outbox.writer_pid is None


async def test_a_file_that_is_not_a_database_is_a_startup_error(tmp_path: Path) -> None:
    from sidecar.errors import StartupError

    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"this is not an SQLite database, but it is long enough to be read" * 20)
    outbox = _outbox(path)

    with pytest.raises(StartupError, match=r"not a database.*alerts\.outbox\.sqlite\.path"):
        await outbox.start()
    assert outbox.writer_pid is None


def test_the_writer_ignores_interrupts_and_ends_with_its_input(tmp_path: Path) -> None:
    settings = sqlite_writer.Settings(
        path=str(tmp_path / "outbox.sqlite3"),
        max_depth=10,
        dedup_window=60,
        lease=60,
        retention=60,
    )
    process = subprocess.Popen(
        [sys.executable, "-I", "-S", sqlite_writer.__file__, settings.argument()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    opened = _read_frame(process.stdout.raw)  # type: ignore[attr-defined]

    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGTERM)
    process.stdin.write(sqlite_writer.encode((7, "stats", (), False)))
    process.stdin.flush()
    answer = _read_frame(process.stdout.raw)  # type: ignore[attr-defined]
    process.stdin.close()
    code = process.wait(timeout=10)
    process.stdout.close()

    assert opened == (0, [(0, True, 0)], [])
    assert answer[1] == [(7, True, (0, 0.0, 0))]
    assert code == 0


def _read_frame(stream: object) -> object:
    data = bytearray()
    while True:
        messages, _ = sqlite_writer.decode(data)
        if messages:
            return messages[0]
        chunk = stream.read(65536)  # type: ignore[attr-defined]
        assert chunk, "the writer closed its output"
        data += chunk


def test_an_operation_refused_in_a_batch_fails_alone(tmp_path: Path) -> None:
    settings = sqlite_writer.Settings(
        path=str(tmp_path / "outbox.sqlite3"), max_depth=1, dedup_window=60, lease=60, retention=60
    )
    writer = sqlite_writer.Writer(settings)
    writer.open()
    body = _notification("b").to_json()
    arguments = ("g", "group", body, ["a"], "")

    results = writer.run_batch(
        [
            (1, "enqueue", ("first", *arguments), True),
            (2, "enqueue", ("second", *arguments), True),
            (3, "stats", (), False),
        ]
    )
    writer.close()

    assert results[0] == (1, True, True)
    assert results[1][:2] == (2, False)
    assert results[1][2][0] == "full"
    assert "max_depth" in results[1][2][1]
    assert results[2] == (3, True, (1, pytest.approx(0, abs=5), 0))
    assert writer.commits == 1


async def test_an_unreadable_answer_ends_the_writer_and_a_new_one_takes_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = _outbox(tmp_path / "outbox.sqlite3")
    await outbox.start()
    first = outbox.writer_pid

    def garbled(payload: bytes | bytearray) -> object:
        raise ValueError("bad marshal data")

    monkeypatch.setattr(sqlite_writer, "load", garbled)
    with pytest.raises(OutboxUnavailable, match="exited"):
        await outbox.enqueue(_notification("lost"), ["a"], "lost")
    monkeypatch.undo()
    stored = await poll(
        lambda: _try_enqueue(outbox, "later"), within=10, what="a new writer to take requests"
    )
    second = outbox.writer_pid
    await outbox.stop()

    assert stored is True
    assert second not in (None, first)
    assert "unreadable answer from the SQLite outbox writer" in caplog.text


class _FailingCommit:
    """A connection whose next COMMIT fails, as it does when the disk fills up."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection
        self.fail = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    def execute(self, sql: str, *parameters: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.fail:
            self.fail = False
            raise sqlite3.OperationalError("database or disk is full")
        return self._connection.execute(sql, *parameters)


def test_a_failed_commit_leaves_the_bound_as_it_was(tmp_path: Path) -> None:
    settings = sqlite_writer.Settings(
        path=str(tmp_path / "outbox.sqlite3"), max_depth=3, dedup_window=60, lease=60, retention=60
    )
    writer = sqlite_writer.Writer(settings)
    writer.open()
    real = writer.connection
    writer.connection = _FailingCommit(real)  # type: ignore[assignment]
    body = _notification("b").to_json()

    failed = writer.run_batch(
        [(n, "enqueue", (f"lost{n}", "g", "group", body, ["a"], ""), True) for n in (1, 2, 3)]
    )
    depth_after_failure = writer.depth
    stored = writer.run_batch(
        [(n, "enqueue", (f"kept{n}", "g", "group", body, ["a"], ""), True) for n in (4, 5, 6)]
    )
    (rows,) = real.execute("SELECT COUNT(*) FROM deliveries").fetchone()
    writer.close()

    assert [result[1] for result in failed] == [False, False, False]
    assert failed[0][2][0] == "unavailable"
    assert depth_after_failure == 0
    # The three that failed took no room: the next three fit under max_depth 3.
    assert stored == [(4, True, True), (5, True, True), (6, True, True)]
    assert rows == 3


def _lock(path: Path) -> sqlite3.Connection:
    """A connection holding the database's write lock, which stalls a starting writer."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("BEGIN EXCLUSIVE")
    return connection


async def test_a_writer_cancelled_while_it_opens_does_not_outlive_its_caller(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = _outbox(path)
    await outbox.start()
    await outbox.stop()
    lock = _lock(path)
    writer = _WriterProcess()
    # A first start releases leases, so it waits for the lock (busy_timeout) before answering.
    opening = asyncio.create_task(writer.open(outbox.settings))
    await poll(lambda: writer.pid is not None, within=10, what="the writer process to start")
    process = psutil.Process(writer.pid)

    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    # Well before the lock's wait (busy_timeout, 5 s) would end it with a startup error.
    gone = await poll(lambda: _gone(process), within=2, what="the cancelled writer to exit")
    lock.rollback()
    lock.close()

    assert gone


async def test_a_restart_under_way_when_the_outbox_stops_leaves_no_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outbox = _outbox(tmp_path / "outbox.sqlite3")
    await outbox.start()
    first = outbox.writer_pid
    assert first is not None
    gate = asyncio.Event()
    spawn = outbox._spawn

    async def held(settings: sqlite_writer.Settings) -> Any:
        await gate.wait()
        return await spawn(settings)

    monkeypatch.setattr(outbox, "_spawn", held)
    monkeypatch.setattr("sidecar.alerts.outbox.sqlite.RESTART_INTERVAL", 0.0)
    os.kill(first, signal.SIGKILL)
    await poll(lambda: outbox.writer_pid is None, within=10, what="the killed writer to be noticed")

    request = asyncio.create_task(outbox.stats())
    await poll(outbox._restarting.locked, within=10, what="the restart to begin")
    await outbox.stop()
    gate.set()
    with pytest.raises(OutboxUnavailable, match="stopped"):
        await request

    assert outbox.writer_pid is None
    assert _writers() == []


def _writers() -> list[psutil.Process]:
    """This test process's running outbox writers (session fixtures' servers are children too)."""
    return [
        child
        for child in psutil.Process().children()
        if child.status() != psutil.STATUS_ZOMBIE
        and any(part.endswith("sqlite_writer.py") for part in child.cmdline())
    ]


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_write_ahead_log_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    settings = sqlite_writer.Settings(
        path=str(path), max_depth=100_000, dedup_window=60, lease=60, retention=60
    )
    writer = sqlite_writer.Writer(settings)
    writer.open()
    body = _notification("c").to_json()
    largest = 0

    for batch in range(300):
        requests = [
            (i, "enqueue", (f"k{batch}-{i}", "g", "group", body, ["a"], ""), True)
            for i in range(10)
        ]
        assert all(ok for _, ok, _ in writer.run_batch(requests))
        largest = max(largest, os.stat(f"{path}-wal").st_size)
    # Pages reach the database file only through checkpoints.
    checkpointed = os.stat(path).st_size
    writer.close()

    # Commits checkpoint the log once it passes about 4 MB (SQLite's default of 1,000 pages),
    # so it never grows far beyond that while more than that goes through it.
    assert checkpointed > 500_000, checkpointed
    assert largest < 6_000_000, largest
