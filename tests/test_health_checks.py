"""Each check kind against a real peer: HTTP and TLS servers, Redis, a disk, processes."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from sidecar.health.config import HealthConfig
from sidecar.health.runner import CheckState, HealthRunner, Result
from tests.harness import RedisServer, free_port, wait_until
from tests.health_peers import (
    HttpPeer,
    SilentPeer,
    self_signed_certificate,
    tls_server_context,
)


def build_runner(*checks: dict[str, Any], environ: dict[str, str] | None = None) -> HealthRunner:
    config = HealthConfig.model_validate(
        {"checks": list(checks)}, context={"environ": environ or {}}
    )
    return HealthRunner(config)


async def run_one(check: dict[str, Any], **kwargs: Any) -> Result:
    runner = build_runner({"name": "probe", "interval": "5s", "timeout": "2s", **check}, **kwargs)
    try:
        (_, result), *_ = await runner.run_once(["probe"])
    finally:
        await runner.close()
    return result


@pytest.fixture
def peer() -> Iterator[HttpPeer]:
    server = HttpPeer().start()
    yield server
    server.stop()


@pytest.fixture
def silent() -> Iterator[SilentPeer]:
    server = SilentPeer().start()
    yield server
    server.stop()


async def test_http_check_passes_on_2xx_and_sends_headers(peer: HttpPeer) -> None:
    result = await run_one({"kind": "http", "url": peer.url, "headers": {"X-Probe": "sidecar"}})

    assert (result.status, result.reason) == ("pass", "")
    assert peer.last_headers["X-Probe"] == "sidecar"
    assert result.value is not None
    assert result.value == result.duration


async def test_http_check_fails_on_500_with_the_status_in_the_reason(peer: HttpPeer) -> None:
    peer.status = 500

    result = await run_one({"kind": "http", "url": peer.url})

    assert (result.status, result.reason) == ("fail", "unexpected status 500")


async def test_http_check_accepts_only_the_listed_statuses(peer: HttpPeer) -> None:
    peer.status = 503

    listed = await run_one({"kind": "http", "url": peer.url, "expected_status": [503]})
    peer.status = 200
    unlisted = await run_one({"kind": "http", "url": peer.url, "expected_status": [503]})

    assert listed.status == "pass"
    assert (unlisted.status, unlisted.reason) == ("fail", "unexpected status 200")


async def test_http_check_fails_on_a_wrong_body(peer: HttpPeer) -> None:
    peer.body = b'{"state": "starting"}'

    contains = await run_one({"kind": "http", "url": peer.url, "body_contains": '"ready"'})
    regex = await run_one({"kind": "http", "url": peer.url, "body_regex": r'"state":\s*"up"'})
    peer.body = b'{"state": "up", "ready": true}'
    good = await run_one({"kind": "http", "url": peer.url, "body_regex": r'"state":\s*"up"'})

    assert (contains.status, contains.reason) == ("fail", "response body lacks the expected text")
    assert (regex.status, regex.reason) == ("fail", "response body does not match body_regex")
    assert good.status == "pass"


async def test_http_check_reads_only_the_start_of_a_huge_body(peer: HttpPeer) -> None:
    peer.body = b"x" * (4 * 1024 * 1024) + b"needle"

    result = await run_one({"kind": "http", "url": peer.url, "body_contains": "needle"})

    assert (result.status, result.reason) == ("fail", "response body lacks the expected text")


async def test_http_check_against_a_silent_server_times_out(silent: SilentPeer) -> None:
    runner = build_runner(
        {"kind": "http", "name": "silent", "url": silent.url, "interval": "5s", "timeout": "300ms"}
    )

    try:
        started = time.monotonic()
        (_, result), *_ = await runner.run_once(["silent"])
        elapsed = time.monotonic() - started
    finally:
        await runner.close()

    assert (result.status, result.reason) == ("fail", "timed out after 0.3s")
    assert 0.3 <= elapsed < 2.0
    assert runner._failures.labels("silent", "timeout")._value.get() == 1


async def test_http_and_tcp_checks_report_a_closed_port() -> None:
    port = free_port()

    http = await run_one({"kind": "http", "url": f"http://127.0.0.1:{port}/"})
    tcp = await run_one({"kind": "tcp", "address": f"127.0.0.1:{port}"})

    assert (http.status, http.reason) == ("fail", "ConnectError: Connection refused")
    assert (tcp.status, tcp.reason) == ("fail", "connect failed: Connection refused")


async def test_tcp_check_passes_when_the_port_accepts(silent: SilentPeer) -> None:
    result = await run_one({"kind": "tcp", "address": f"127.0.0.1:{silent.port}"})

    assert result.status == "pass"


async def test_https_check_verifies_the_certificate(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    server = HttpPeer(tls=tls_server_context(cert, key)).start()

    try:
        untrusted = await run_one({"kind": "http", "url": server.url})
        trusted = await run_one({"kind": "http", "url": server.url, "ca_file": str(cert)})
        unverified = await run_one({"kind": "http", "url": server.url, "tls_verify": False})
    finally:
        server.stop()

    assert (untrusted.status, untrusted.reason) == (
        "fail",
        "ConnectError: certificate verify failed",
    )
    assert trusted.status == "pass"
    assert unverified.status == "pass"


async def test_redis_check_follows_redis_going_down_and_coming_back(
    redis_server: RedisServer,
) -> None:
    runner = build_runner(
        {"kind": "redis", "name": "redis", "url": redis_server.url, "interval": "5s"}
    )

    try:
        (_, up), *_ = await runner.run_once(["redis"])
        redis_server.stop()
        (_, dropped), *_ = await runner.run_once(["redis"])
        (_, down), *_ = await runner.run_once(["redis"])
        redis_server.start()
        (_, back), *_ = await runner.run_once(["redis"])
    finally:
        await runner.close()

    assert up.status == "pass"
    assert dropped.status == "fail"
    assert down.status == "fail"
    assert down.reason.startswith("ConnectionError: ")
    assert f"Error 111 connecting to 127.0.0.1:{redis_server.port}" in down.reason
    assert str(redis_server.port) in down.reason
    assert back.status == "pass"


async def test_redis_check_uses_the_password_and_never_shows_it(
    redis_server: RedisServer,
) -> None:
    password = "s3cret-pw-for-test"
    admin = redis.Redis(port=redis_server.port)
    admin.config_set("requirepass", password)
    admin.close()
    check = {"kind": "redis", "url": redis_server.url}

    without = await run_one(check)
    wrong = await run_one({**check, "password_env": "PW"}, environ={"PW": "nope"})
    right = await run_one({**check, "password_env": "PW"}, environ={"PW": password})

    assert without.status == "fail"
    assert wrong.status == "fail"
    assert password not in without.reason + wrong.reason
    assert right.status == "pass"


async def test_redis_check_requires_the_configured_key(redis_server: RedisServer) -> None:
    key = f"health-test:{os.getpid()}:ready"
    check = {"kind": "redis", "url": redis_server.url, "key": key}

    missing = await run_one(check)
    client = redis.Redis(port=redis_server.port)
    client.set(key, "1")
    client.close()
    present = await run_one(check)

    assert (missing.status, missing.reason) == ("fail", "the expected key does not exist")
    assert present.status == "pass"


async def test_disk_check_thresholds_on_a_real_path(tmp_path: Path) -> None:
    free = psutil.disk_usage(str(tmp_path)).free
    check = {"kind": "disk", "path": str(tmp_path), "fail_free_ratio": None}

    passing = await run_one(check)
    warning = await run_one({**check, "warn_free_bytes": free * 4, "fail_free_bytes": 1})
    failing = await run_one({**check, "fail_free_bytes": free * 4})
    by_ratio = await run_one({**check, "fail_free_ratio": 1.0})

    assert passing.status == "pass"
    assert passing.value is not None
    assert abs(passing.value - free) < free * 0.05
    assert warning.status == "warn"
    shape = r"\d+(\.\d)?(B|KiB|MiB|GiB|TiB) free \(\d+\.\d%\) on " + re.escape(str(tmp_path))
    assert re.fullmatch(shape, warning.reason), warning.reason
    assert failing.status == "fail"
    assert re.fullmatch(shape, failing.reason), failing.reason
    assert by_ratio.status == "fail"


async def test_disk_check_fails_for_a_missing_path(tmp_path: Path) -> None:
    result = await run_one({"kind": "disk", "path": str(tmp_path / "gone")})

    assert (result.status, result.reason) == (
        "fail",
        f"cannot stat {tmp_path / 'gone'}: No such file or directory",
    )


async def test_memory_check_thresholds() -> None:
    passing = await run_one(
        {"kind": "memory", "warn_available_ratio": None, "fail_available_ratio": None}
    )
    warning = await run_one(
        {"kind": "memory", "warn_available_ratio": 1.0, "fail_available_ratio": 0.0}
    )
    failing = await run_one({"kind": "memory", "fail_available_bytes": "1PiB"})

    assert passing.status == "pass"
    assert warning.status == "warn"
    assert failing.status == "fail"
    assert "available" in failing.reason


async def test_command_check_passes_on_exit_zero_and_reports_output_on_failure() -> None:
    good = await run_one({"kind": "command", "command": ["true"]})
    bad = await run_one({"kind": "command", "command": ["sh", "-c", "echo broken >&2; exit 3"]})
    chatty = await run_one(
        {
            "kind": "command",
            "command": ["sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' y; exit 1"],
            "output_limit": 10,
        }
    )
    missing = await run_one({"kind": "command", "command": ["/nonexistent/probe"]})

    assert good.status == "pass"
    assert (bad.status, bad.reason) == ("fail", "exit status 3: broken")
    assert (chatty.status, chatty.reason) == ("fail", "exit status 1: yyyyyyyyyy")
    assert (missing.status, missing.reason) == (
        "fail",
        "cannot start /nonexistent/probe: No such file or directory",
    )


async def test_a_hanging_command_is_killed_at_its_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = f"echo $$ > {pid_file}; exec sleep 60"

    result = await run_one({"kind": "command", "command": ["sh", "-c", script], "timeout": "500ms"})

    assert (result.status, result.reason) == ("fail", "timed out after 0.5s")
    pid = int(pid_file.read_text())
    assert not psutil.pid_exists(pid)


async def test_process_check_counts_matching_processes(tmp_path: Path) -> None:
    marker = f"health-check-marker-{os.getpid()}"
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import time; time.sleep(60)", marker
        )
        for _ in range(2)
    ]
    check = {"kind": "process", "cmdline": marker}

    try:
        two = await run_one({**check, "min_instances": 2})
        three = await run_one({**check, "min_instances": 3})
    finally:
        for child in children:
            child.kill()
            await child.wait()
    none = await run_one(check)

    assert (two.status, two.value) == ("pass", 2)
    assert (three.status, three.reason) == ("fail", "2 matching processes, fewer than 3")
    assert (none.status, none.reason) == ("fail", "0 matching processes, fewer than 1")


async def test_process_check_by_pid_file(tmp_path: Path) -> None:
    pid_file = tmp_path / "app.pid"
    pid_file.write_text(f"{os.getpid()}\n")

    alive = await run_one({"kind": "process", "pid_file": str(pid_file)})
    pid_file.write_text("not a pid")
    garbage = await run_one({"kind": "process", "pid_file": str(pid_file)})

    assert alive.status == "pass"
    assert garbage.status == "fail"


def _state(runner: HealthRunner, name: str) -> CheckState:
    return runner.states[name]


def _result(status: str) -> Result:
    return Result(status, f"{status} reason", 0.01, None, time.time())  # type: ignore[arg-type]


def test_thresholds_delay_each_change_of_status() -> None:
    runner = build_runner(
        {
            "kind": "tcp",
            "name": "flappy",
            "address": "127.0.0.1:1",
            "failure_threshold": 3,
            "success_threshold": 2,
        }
    )
    state = _state(runner, "flappy")
    seen = []

    for status in ["pass", "fail", "fail", "pass", "fail", "fail", "fail", "pass", "warn", "pass"]:
        runner.record(state, _result(status))
        seen.append(state.status)

    assert seen == [
        "pass",  # the first result decides at once
        "pass",
        "pass",
        "pass",  # a success resets the failure count
        "pass",
        "pass",
        "fail",  # third failure in a row
        "fail",
        "warn",  # second good run in a row
        "pass",  # pass and warn swap without delay
    ]


async def test_a_flapping_dependency_changes_status_only_past_the_thresholds(
    peer: HttpPeer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.health.runner")
    runner = build_runner(
        {
            "kind": "http",
            "name": "flappy",
            "url": peer.url,
            "interval": "300ms",
            "timeout": "250ms",
            "failure_threshold": 3,
            "success_threshold": 2,
        }
    )
    state = _state(runner, "flappy")
    await runner.start()
    try:
        await asyncio.to_thread(wait_until, lambda: state.status == "pass", what="first pass")
        peer.status = 500
        await asyncio.to_thread(wait_until, lambda: state.status == "fail", what="failing")
        failures_when_failed = state.consecutive_failures
        peer.status = 200
        await asyncio.to_thread(wait_until, lambda: state.status == "pass", what="passing again")
        successes_when_passed = state.consecutive_successes
    finally:
        await runner.stop()

    assert failures_when_failed >= 3
    assert successes_when_passed >= 2
    changes = [
        (record.levelname, record.getMessage())
        for record in caplog.records
        if record.name == "sidecar.health.runner" and "flappy" in record.getMessage()
    ]
    assert changes == [
        ("INFO", "health check flappy is now pass (was unknown): ok"),
        ("WARNING", "health check flappy is now fail (was pass): unexpected status 500"),
        ("INFO", "health check flappy is now pass (was fail): ok"),
    ]


async def test_a_check_whose_task_stops_is_reported_stale() -> None:
    runner = build_runner()
    calls = 0

    async def count() -> Any:
        nonlocal calls
        calls += 1
        from sidecar.health import Outcome

        return Outcome()

    runner.add_builtin("storage", count, interval=0.1, timeout=0.05)
    await runner.start()
    try:
        state = _state(runner, "storage")
        await asyncio.to_thread(wait_until, lambda: state.status == "pass", what="first pass")
        runner._tasks["storage"].cancel()  # the scheduling task dies: no more results

        def stale() -> bool:
            status, reason = state.effective(time.monotonic(), "readiness")
            return status == "fail" and reason.startswith("stale")

        await asyncio.to_thread(wait_until, stale, what="stale result")
        await asyncio.to_thread(
            wait_until,
            lambda: runner._failures.labels("storage", "stale")._value.get() == 1,
            what="stale counted",
        )
    finally:
        await runner.stop()


def test_before_its_first_result_a_check_fails_readiness_and_passes_liveness() -> None:
    runner = build_runner(
        {"kind": "tcp", "name": "db", "address": "127.0.0.1:1"},
        {"kind": "tcp", "name": "cache", "address": "127.0.0.1:1", "critical": False},
    )
    now = time.monotonic()

    db = _state(runner, "db")
    cache = _state(runner, "cache")

    assert db.effective(now, "readiness") == ("fail", "no result yet")
    assert db.effective(now, "liveness") == ("pass", "no result yet")
    assert cache.effective(now, "readiness") == ("warn", "no result yet")
    assert cache.raw_status(now, "readiness") == ("fail", "no result yet")


async def test_event_loop_check_sees_a_blocked_loop() -> None:
    config = HealthConfig.model_validate(
        {"event_loop": {"interval": "1s", "warn_lag": "80ms", "fail_lag": "250ms"}}
    )
    runner = HealthRunner(config)
    state = _state(runner, "event_loop")
    await runner.start()
    try:
        await asyncio.sleep(0.3)  # let the monitor take a few samples
        quiet = await runner.run_check(state)
        time.sleep(0.2)  # noqa: ASYNC251 - blocking the loop is what this test measures
        await asyncio.sleep(0.15)
        slow = await runner.run_check(state)
        time.sleep(0.5)  # noqa: ASYNC251 - blocking the loop is what this test measures
        await asyncio.sleep(0.15)
        blocked = await runner.run_check(state)
    finally:
        await runner.stop()

    assert quiet.status == "pass"
    assert slow.status == "warn"
    assert blocked.status == "fail"
    assert re.fullmatch(r"lag \d+\.\dms", blocked.reason)
    assert blocked.value is None


async def test_a_blocked_thread_call_is_not_started_again_until_it_returns() -> None:
    from sidecar.health.checks import BlockingCall, CheckFailed

    release = threading.Event()
    blocking = BlockingCall()

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await blocking.call(release.wait, 30)
    with pytest.raises(CheckFailed, match="the previous run is still blocked") as second:
        await blocking.call(lambda: "unused")
    release.set()
    await asyncio.to_thread(wait_until, lambda: blocking._pending.done(), what="thread returns")  # type: ignore[union-attr]
    third = await blocking.call(lambda: "answer")

    assert second.value.kind == "timeout"
    assert third == "answer"
