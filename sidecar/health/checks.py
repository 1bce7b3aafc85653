"""The check kinds: each turns one configured check into a probe coroutine.

A probe returns an ``Outcome`` (pass or warn, with the value it observed) or raises
``CheckFailed`` with a short reason. The runner owns timeouts and cancellation: a probe never
sets its own deadline, but each one holds what it must release on cancellation (a socket, a
child process) in a ``finally`` block. Library errors (httpx, redis, OSError) are translated
here into ``CheckFailed`` with the cause kept; their text never carries a URL or a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import psutil

from sidecar.fields import split_host_port
from sidecar.health.config import (
    CheckConfig,
    CommandCheck,
    DiskCheck,
    HttpCheck,
    MemoryCheck,
    ProcessCheck,
    RedisCheck,
    TcpCheck,
)
from sidecar.metrics.config import ProcessMetricsConfig, ProcessTarget
from sidecar.metrics.process import ProcessSource

if TYPE_CHECKING:
    import httpx

_T = TypeVar("_T")

Status = Literal["pass", "warn", "fail"]
FailureReason = Literal["timeout", "error", "threshold", "stale"]

_BODY_LIMIT = 64 * 1024
_REASON_LIMIT = 200


@dataclass(frozen=True)
class Outcome:
    """What one probe run found."""

    status: Literal["pass", "warn"] = "pass"
    reason: str = ""
    value: float | None = None
    """The observed value; None means the run's duration is the measurement."""


class CheckFailed(Exception):
    """A probe run failed; ``reason`` is short and safe to show, ``kind`` feeds the metric."""

    def __init__(self, reason: str, kind: FailureReason = "error") -> None:
        super().__init__(reason)
        self.reason = _shorten(reason)
        self.kind: FailureReason = kind


Probe = Callable[[], Awaitable[Outcome]]


@dataclass(frozen=True)
class Measurement:
    """How a kind's observed value appears in ``application/health+json``."""

    name: str
    unit: str
    component_type: str


class Check:
    """A probe plus the resources it reuses between runs."""

    measurement = Measurement("responseTime", "s", "component")

    async def run(self) -> Outcome:
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the check holds (HTTP client, Redis connections)."""


class HttpProbe(Check):
    def __init__(self, config: HttpCheck) -> None:
        self.config = config
        verify: bool | str = config.tls_verify
        if config.tls_verify and config.ca_file is not None:
            verify = str(config.ca_file)
        if isinstance(verify, str):
            import ssl

            verify_context: bool | ssl.SSLContext = ssl.create_default_context(cafile=verify)
        else:
            verify_context = verify
        # httpx is imported only when an HTTP check exists (it costs about 3 MB resident).
        import httpx

        self._httpx = httpx
        # One client per check, reused for every run: connections stay pooled between runs.
        self.client = httpx.AsyncClient(
            verify=verify_context,
            # The runner cancels a run at the check's timeout; this only bounds a stray request.
            timeout=config.timeout + 1.0,
            follow_redirects=False,
            headers=config.headers,
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=1),
        )

    async def run(self) -> Outcome:
        config = self.config
        try:
            async with self.client.stream(config.method, config.url) as response:
                body = await _read_limited(response)
        except self._httpx.TimeoutException as error:
            raise CheckFailed("request timed out", "timeout") from error
        except self._httpx.HTTPError as error:
            raise CheckFailed(_describe_http_error(error)) from error

        expected = config.expected_status
        if (expected and response.status_code not in expected) or (
            not expected and not 200 <= response.status_code < 300
        ):
            raise CheckFailed(f"unexpected status {response.status_code}")
        text = body.decode("utf-8", errors="replace")
        if config.body_contains is not None and config.body_contains not in text:
            raise CheckFailed("response body lacks the expected text")
        if config.body_regex is not None and not config.body_regex.search(text):
            raise CheckFailed("response body does not match body_regex")
        return Outcome()

    async def close(self) -> None:
        await self.client.aclose()


async def _read_limited(response: httpx.Response) -> bytes:
    chunks = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= _BODY_LIMIT:
            break
    return b"".join(chunks)[:_BODY_LIMIT]


def _describe_http_error(error: httpx.HTTPError) -> str:
    # The exception text of httpx may quote the URL (with its credentials); describe the
    # failure by its class and the innermost OS error instead.
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and (cause.errno or cause.strerror):
            return f"{type(error).__name__}: {_os_reason(cause)}"
        text = str(cause)
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return f"{type(error).__name__}: certificate verify failed"
        cause = cause.__cause__ or cause.__context__
    return type(error).__name__


class TcpProbe(Check):
    measurement = Measurement("connectTime", "s", "component")

    def __init__(self, config: TcpCheck) -> None:
        self.host, self.port = split_host_port(config.address)

    async def run(self) -> Outcome:
        writer = None
        try:
            _, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as error:
            raise CheckFailed(f"connect failed: {_os_reason(error)}") from error
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        return Outcome()


class RedisProbe(Check):
    measurement = Measurement("responseTime", "s", "datastore")

    def __init__(self, config: RedisCheck) -> None:
        # redis-py costs about 10 MB resident: imported only when a Redis check exists.
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        self._redis_errors = RedisError
        self.config = config
        password = config.password.reveal() if config.password is not None else None
        self.client = aioredis.Redis.from_url(
            config.url,
            password=password,
            socket_timeout=config.timeout,
            socket_connect_timeout=config.timeout,
            max_connections=2,
            retry=None,
        )

    async def run(self) -> Outcome:
        try:
            await self.client.ping()
            if self.config.key is not None and not await self.client.exists(self.config.key):
                raise CheckFailed("the expected key does not exist")
        except self._redis_errors as error:
            # redis-py names host and port in its messages, never the password.
            raise CheckFailed(f"{type(error).__name__}: {_first_line(error)}") from error
        except OSError as error:
            raise CheckFailed(f"{type(error).__name__}: {error.strerror or error}") from error
        return Outcome()

    async def close(self) -> None:
        await self.client.aclose()


class BlockingCall:
    """Runs a blocking function on a worker thread, never more than one call at a time.

    A call that overruns its check's timeout cannot be stopped: its thread stays blocked (a
    hung network mount). Rather than piling up one stuck thread per run until the shared pool
    is exhausted for everyone, later runs fail at once while the first call is still blocked.
    """

    def __init__(self) -> None:
        self._pending: asyncio.Future[Any] | None = None

    async def call(self, function: Callable[..., _T], *args: Any) -> _T:
        if self._pending is not None and not self._pending.done():
            raise CheckFailed("the previous run is still blocked", "timeout")
        if self._pending is not None and not self._pending.cancelled():
            self._pending.exception()  # mark an abandoned call's error as seen
        loop = asyncio.get_running_loop()
        self._pending = loop.run_in_executor(None, function, *args)
        # Shielded, so that a cancelled run leaves the future to finish and be seen above.
        return await asyncio.shield(self._pending)


class DiskProbe(Check):
    measurement = Measurement("freeBytes", "bytes", "system")

    def __init__(self, config: DiskCheck) -> None:
        self.config = config
        self.blocking = BlockingCall()

    async def run(self) -> Outcome:
        config = self.config
        try:
            # statvfs on a hung network mount blocks; a thread keeps the loop free, and the
            # runner's timeout stops waiting for it.
            stats = await self.blocking.call(os.statvfs, config.path)
        except OSError as error:
            raise CheckFailed(f"cannot stat {config.path}: {error.strerror}") from error
        free = stats.f_bavail * stats.f_frsize
        total = stats.f_blocks * stats.f_frsize
        ratio = free / total if total else 0.0
        described = f"{_bytes(free)} free ({ratio:.1%})"
        if _below(free, config.fail_free_bytes) or _below(ratio, config.fail_free_ratio):
            raise CheckFailed(f"{described} on {config.path}", "threshold")
        if _below(free, config.warn_free_bytes) or _below(ratio, config.warn_free_ratio):
            return Outcome("warn", f"{described} on {config.path}", free)
        return Outcome("pass", described, free)


class MemoryProbe(Check):
    measurement = Measurement("availableBytes", "bytes", "system")

    def __init__(self, config: MemoryCheck) -> None:
        self.config = config

    async def run(self) -> Outcome:
        config = self.config
        memory = psutil.virtual_memory()
        ratio = memory.available / memory.total if memory.total else 0.0
        described = f"{_bytes(memory.available)} available ({ratio:.1%})"
        if _below(memory.available, config.fail_available_bytes) or _below(
            ratio, config.fail_available_ratio
        ):
            raise CheckFailed(described, "threshold")
        if _below(memory.available, config.warn_available_bytes) or _below(
            ratio, config.warn_available_ratio
        ):
            return Outcome("warn", described, memory.available)
        return Outcome("pass", described, memory.available)


class ProcessProbe(Check):
    measurement = Measurement("instances", "processes", "system")

    def __init__(self, config: ProcessCheck) -> None:
        self.config = config
        self.target = ProcessTarget(
            name="check",
            pid_file=config.pid_file,
            process_name=config.process_name,
            cmdline=config.cmdline,
        )
        self.source = ProcessSource(ProcessMetricsConfig(include_self=False))
        self.blocking = BlockingCall()

    async def run(self) -> Outcome:
        # Walking /proc for every process takes milliseconds; keep it off the loop.
        found = await self.blocking.call(self.source.find, self.target)
        count = len(found)
        if count < self.config.min_instances:
            raise CheckFailed(
                f"{count} matching processes, fewer than {self.config.min_instances}", "threshold"
            )
        return Outcome("pass", f"{count} running", count)


class CommandProbe(Check):
    def __init__(self, config: CommandCheck) -> None:
        self.config = config

    async def run(self) -> Outcome:
        config = self.config
        try:
            # A session of its own lets a cancelled run kill the command and its children.
            process = await asyncio.create_subprocess_exec(
                *config.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as error:
            raise CheckFailed(f"cannot start {config.command[0]}: {error.strerror}") from error
        try:
            assert process.stdout is not None
            output = await _read_output(process.stdout, int(config.output_limit))
            code = await process.wait()
        finally:
            if process.returncode is None:
                _kill_group(process.pid)
                # Reap it so no zombie is left; SIGKILL makes this quick.
                with contextlib.suppress(ProcessLookupError):
                    await asyncio.shield(process.wait())
        if code != 0:
            text = output.decode("utf-8", errors="replace").strip()
            detail = f": {text}" if text else ""
            raise CheckFailed(f"exit status {code}{detail}")
        return Outcome()


async def _read_output(stream: asyncio.StreamReader, limit: int) -> bytes:
    kept = bytearray()
    while chunk := await stream.read(65536):
        # Keep reading past the limit so that a chatty command never blocks on a full pipe.
        if len(kept) < limit:
            kept += chunk[: limit - len(kept)]
    return bytes(kept)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class EventLoopMonitor:
    """Measures how late the event loop wakes up a sleeping task (its lag).

    It samples every ``tick`` seconds and keeps the samples of the last ``window`` seconds, so
    that any number of readers can ask for the worst lag of a recent period.
    """

    def __init__(self, tick: float = 0.1, window: float = 300.0) -> None:
        self.tick = tick
        self.last_lag = 0.0
        self._samples: deque[tuple[float, float]] = deque(maxlen=math.ceil(window / tick) + 1)
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._measure(), name="event-loop-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def worst_since(self, seconds: float) -> float:
        """The worst lag sampled in the last ``seconds`` (0 when there is no sample)."""
        cutoff = time.monotonic() - seconds
        return max((lag for when, lag in reversed(self._samples) if when >= cutoff), default=0.0)

    async def _measure(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            self.last_lag = max(0.0, now - started - self.tick)
            self._samples.append((now, self.last_lag))


class EventLoopProbe(Check):
    measurement = Measurement("lag", "s", "system")

    def __init__(
        self, monitor: EventLoopMonitor, warn_lag: float, fail_lag: float, window: float
    ) -> None:
        self.monitor = monitor
        self.warn_lag = warn_lag
        self.fail_lag = fail_lag
        self.window = window

    async def run(self) -> Outcome:
        if not self.monitor.running:
            # No monitor running (a one-shot `sidecar check`): measure one short sleep.
            started = time.monotonic()
            await asyncio.sleep(0.01)
            lag = max(0.0, time.monotonic() - started - 0.01)
        else:
            lag = self.monitor.worst_since(self.window)
        described = f"lag {lag * 1000:.1f}ms"
        if lag > self.fail_lag:
            raise CheckFailed(described, "threshold")
        if lag > self.warn_lag:
            return Outcome("warn", described, lag)
        return Outcome("pass", described, lag)


def build_check(config: CheckConfig) -> Check:
    """The probe of one configured check."""
    kinds: dict[type[CheckConfig], Callable[[CheckConfig], Check]] = {
        HttpCheck: HttpProbe,  # type: ignore[dict-item]
        TcpCheck: TcpProbe,  # type: ignore[dict-item]
        RedisCheck: RedisProbe,  # type: ignore[dict-item]
        DiskCheck: DiskProbe,  # type: ignore[dict-item]
        MemoryCheck: MemoryProbe,  # type: ignore[dict-item]
        ProcessCheck: ProcessProbe,  # type: ignore[dict-item]
        CommandCheck: CommandProbe,  # type: ignore[dict-item]
    }
    return kinds[type(config)](config)


def _below(value: float, threshold: float | None) -> bool:
    return threshold is not None and value < threshold


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f}{unit}" if unit == "B" else f"{count:.1f}{unit}"
        count /= 1024
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns at TiB


def _os_reason(error: OSError) -> str:
    # asyncio words a refused connection "Connect call failed (host, port)"; the errno's own
    # text is what an operator searches for.
    if error.errno:
        return os.strerror(error.errno)
    return error.strerror or type(error).__name__


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _REASON_LIMIT else text[: _REASON_LIMIT - 1] + "…"
