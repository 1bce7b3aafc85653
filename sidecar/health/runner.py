"""Runs every check in the background and keeps the latest result of each in a cache.

Each check has its own task: it waits ``initial_delay``, then runs the probe every ``interval``
under its own ``timeout``. A probe that overruns is cancelled; since every check has its own
task, a hanging one delays no other and never the probes, which read only the cache.

Hysteresis: a check's reported status changes to failing only after ``failure_threshold``
consecutive failed runs, and back only after ``success_threshold`` consecutive good runs.
Until its first result a check counts as failing for readiness and passing for liveness. A
result older than three intervals plus the timeout counts as failing (reason ``stale``):
the task running it has stopped making progress.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.health.checks import (
    Check,
    CheckFailed,
    EventLoopMonitor,
    EventLoopProbe,
    FailureReason,
    Measurement,
    Outcome,
    Status,
    build_check,
)
from sidecar.health.config import BUILTIN_NAMES, CHECK_NAME, HealthConfig
from sidecar.health.probes import evaluate

logger = logging.getLogger(__name__)

STALE_INTERVALS = 3
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class CheckSpec:
    """Everything the runner needs to know about one check, configured or built in."""

    name: str
    kind: str
    check: Check
    interval: float
    timeout: float
    initial_delay: float = 0.0
    failure_threshold: int = 1
    success_threshold: int = 1
    critical: bool = True
    liveness: bool = False
    readiness: bool = True


@dataclass
class Result:
    """The latest completed run of a check."""

    status: Status
    reason: str
    duration: float
    value: float | None
    wall_time: float
    """Seconds since the epoch when the run ended, for ``time`` in health+json."""


@dataclass
class CheckState:
    """A check's cached state: what the probes read."""

    spec: CheckSpec
    created: float
    """Monotonic time the check was scheduled; its first result is due after initial_delay."""

    status: Status | None = None
    """The reported status after hysteresis; None until the first result."""

    last: Result | None = None
    updated: float | None = None
    """Monotonic time of the last completed run."""

    last_success: float | None = None
    """Seconds since the epoch of the last passing run."""

    consecutive_failures: int = 0
    consecutive_successes: int = 0
    stale_counted: bool = False

    @property
    def measurement(self) -> Measurement:
        return self.spec.check.measurement

    def deadline(self) -> float:
        """Monotonic time after which the cached result counts as stale."""
        spec = self.spec
        since = self.updated if self.updated is not None else self.created + spec.initial_delay
        return since + STALE_INTERVALS * spec.interval + spec.timeout

    def effective(self, now: float, probe: str) -> tuple[Status, str]:
        """Status and reason as ``probe`` (``liveness``/``readiness``/``all``) sees them now."""
        status, reason = self.raw_status(now, probe)
        if status == "fail" and not self.spec.critical:
            return "warn", reason
        return status, reason

    def raw_status(self, now: float, probe: str) -> tuple[Status, str]:
        """Like ``effective``, but a failing non-critical check stays ``fail``."""
        if now > self.deadline():
            interval = self.spec.interval
            return "fail", f"stale: no result for more than {STALE_INTERVALS}x {interval:g}s"
        if self.status is None:
            return ("pass" if probe == "liveness" else "fail"), "no result yet"
        return self.status, self.last.reason if self.last is not None else ""


ProbeFactory = Callable[[], Awaitable[Outcome]]


class _FunctionCheck(Check):
    def __init__(self, factory: ProbeFactory, measurement: Measurement) -> None:
        self.factory = factory
        self.measurement = measurement

    async def run(self) -> Outcome:
        return await self.factory()


class HealthRunner:
    """Schedules the checks, caches their results and exports their metrics.

    A component of the sidecar: ``start()`` launches one task per check, ``stop()`` cancels
    them and closes the clients the checks hold.
    """

    def __init__(
        self,
        config: HealthConfig,
        registry: CollectorRegistry | None = None,
        draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.config = config
        self.draining = draining
        self.states: dict[str, CheckState] = {}
        self.monitor = EventLoopMonitor(window=config.event_loop.interval)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running = False
        self._duration = Histogram(
            "sidecar_health_check_duration_seconds",
            "Seconds taken by each health check run, including failed ones.",
            ["check"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self._failures = Counter(
            "sidecar_health_check_failures",
            "Failed health check runs, by reason (timeout, error, threshold, stale).",
            ["check", "reason"],
            registry=registry,
        )
        if registry is not None:
            registry.register(_HealthCollector(self))

        loop = config.event_loop
        self._add(
            CheckSpec(
                name="event_loop",
                kind="builtin",
                check=EventLoopProbe(self.monitor, loop.warn_lag, loop.fail_lag, loop.interval),
                interval=loop.interval,
                timeout=min(1.0, loop.interval / 2),
                failure_threshold=loop.failure_threshold,
                liveness=True,
                readiness=True,
            )
        )
        for check_config in config.configured():
            self._add(
                CheckSpec(
                    name=check_config.name,
                    kind=check_config.kind,
                    check=build_check(check_config),
                    interval=check_config.interval,
                    timeout=check_config.timeout,
                    initial_delay=check_config.initial_delay,
                    failure_threshold=check_config.failure_threshold,
                    success_threshold=check_config.success_threshold,
                    critical=check_config.critical,
                    liveness="liveness" in check_config.probes,
                    readiness="readiness" in check_config.probes,
                )
            )

    def add_builtin(
        self,
        name: str,
        probe: ProbeFactory,
        *,
        interval: float,
        timeout: float,
        liveness: bool = False,
        readiness: bool = True,
        critical: bool = True,
        failure_threshold: int = 1,
        success_threshold: int = 1,
        measurement: Measurement | None = None,
    ) -> None:
        """Add a check of the sidecar itself, such as "the alert outbox's storage answers".

        ``probe`` is called for every run and returns an ``Outcome`` (pass or warn) or raises
        ``CheckFailed``; any other exception also counts as a failure. The check may be added
        before or after ``start()``. Raises ValueError for a duplicate or malformed name or a
        timeout not shorter than the interval.
        """
        if not re.fullmatch(CHECK_NAME, name) or name in BUILTIN_NAMES:
            raise ValueError(f"invalid built-in check name {name!r}")
        if not 0 < timeout < interval:
            raise ValueError(f"timeout of {name!r} must be positive and shorter than interval")
        if not (liveness or readiness):
            raise ValueError(f"check {name!r} must belong to liveness or readiness")
        check = _FunctionCheck(probe, measurement or Measurement("responseTime", "s", "system"))
        self._add(
            CheckSpec(
                name=name,
                kind="builtin",
                check=check,
                interval=interval,
                timeout=timeout,
                failure_threshold=failure_threshold,
                success_threshold=success_threshold,
                critical=critical,
                liveness=liveness,
                readiness=readiness,
            )
        )

    def _add(self, spec: CheckSpec) -> None:
        if spec.name in self.states:
            raise ValueError(f"a health check named {spec.name!r} already exists")
        state = CheckState(spec, created=time.monotonic())
        self.states[spec.name] = state
        if self._running:
            self._launch(state)

    async def start(self) -> None:
        """Start the event-loop monitor and one task per check."""
        self._running = True
        self.monitor.start()
        now = time.monotonic()
        for state in self.states.values():
            state.created = now
            self._launch(state)
        self._tasks["<stale-watch>"] = asyncio.create_task(self._watch_staleness())

    def _launch(self, state: CheckState) -> None:
        self._tasks[state.spec.name] = asyncio.create_task(
            self._schedule(state), name=f"health-check-{state.spec.name}"
        )

    async def stop(self) -> None:
        """Cancel every check and release what the checks hold."""
        self._running = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        # A probe's library may swallow a cancellation (Python 3.11's wait_for can when the
        # awaited call completes at the same moment): cancel again until every task is done.
        pending = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=1.0)
            for task in pending:
                task.cancel()
        await self.monitor.stop()
        await self.close()

    async def close(self) -> None:
        """Close the clients of every check (also after a one-shot ``run_once``)."""
        for state in self.states.values():
            try:
                await state.spec.check.close()
            except Exception:
                logger.exception("closing health check %s failed", state.spec.name)

    async def _schedule(self, state: CheckState) -> None:
        spec = state.spec
        if spec.initial_delay:
            await asyncio.sleep(spec.initial_delay)
        while self._running:
            started = time.monotonic()
            try:
                result = await self.run_check(state)
                self.record(state, result)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The loop must survive anything a probe or the bookkeeping throws.
                logger.exception("health check %s crashed", spec.name)
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, spec.interval - elapsed))

    async def run_check(self, state: CheckState) -> Result:
        """Run the probe once under its timeout; never raises for a failing probe."""
        spec = state.spec
        started = time.monotonic()
        failure: FailureReason | None = None
        value: float | None = None
        try:
            async with asyncio.timeout(spec.timeout):
                outcome = await spec.check.run()
            status: Status = outcome.status
            reason = outcome.reason
            value = outcome.value
        except TimeoutError:
            status, failure = "fail", "timeout"
            reason = f"timed out after {spec.timeout:g}s"
        except CheckFailed as error:
            status, failure, reason = "fail", error.kind, error.reason
        except Exception as error:
            status, failure = "fail", "error"
            reason = f"{type(error).__name__}: {error}"[:200]
            logger.warning("health check %s raised %s", spec.name, reason, exc_info=True)
        duration = time.monotonic() - started

        self._duration.labels(spec.name).observe(duration)
        if failure is not None:
            self._failures.labels(spec.name, failure).inc()
        if value is None and status != "fail":
            value = duration
        return Result(status, reason, duration, value, time.time())

    def record(self, state: CheckState, result: Result) -> None:
        """Store a result and apply the thresholds; log every change of reported status."""
        spec = state.spec
        previous = state.status
        state.last = result
        state.updated = time.monotonic()
        state.stale_counted = False
        if result.status == "fail":
            state.consecutive_failures += 1
            state.consecutive_successes = 0
        else:
            state.consecutive_successes += 1
            state.consecutive_failures = 0
            state.last_success = result.wall_time

        if previous is None:
            # The first result decides at once; thresholds apply to changes of a known state.
            state.status = result.status
        elif result.status == "fail":
            if previous == "fail" or state.consecutive_failures >= spec.failure_threshold:
                state.status = "fail"
        elif previous != "fail" or state.consecutive_successes >= spec.success_threshold:
            state.status = result.status

        if state.status != previous:
            level = logging.WARNING if state.status == "fail" else logging.INFO
            logger.log(
                level,
                "health check %s is now %s (was %s): %s",
                spec.name,
                state.status,
                previous or "unknown",
                result.reason or "ok",
            )

    async def _watch_staleness(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for state in self.states.values():
                if not state.stale_counted and now > state.deadline():
                    state.stale_counted = True
                    self._failures.labels(state.spec.name, "stale").inc()
                    logger.warning("health check %s has no recent result", state.spec.name)

    async def run_once(self, names: Iterable[str] | None = None) -> list[tuple[CheckState, Result]]:
        """Run the chosen checks (all by default) once, concurrently, ignoring thresholds."""
        wanted = set(names or self.states)
        chosen = [state for name, state in self.states.items() if name in wanted]
        results = await asyncio.gather(*(self.run_check(state) for state in chosen))
        return list(zip(chosen, results, strict=True))

    def selected(self, probe: str) -> Iterator[CheckState]:
        """The checks that belong to ``probe`` (``liveness``, ``readiness`` or ``all``)."""
        for state in self.states.values():
            spec = state.spec
            if (
                probe == "all"
                or (probe == "liveness" and spec.liveness)
                or (probe == "readiness" and spec.readiness)
            ):
                yield state


class _HealthCollector(Collector):
    """Per-check status, last success and probe results, read from the cache at scrape time."""

    def __init__(self, runner: HealthRunner) -> None:
        self.runner = runner

    def collect(self) -> Iterable[Metric]:
        now = time.monotonic()
        status = GaugeMetricFamily(
            "sidecar_health_check_status",
            "Current status of each health check: 1 on the status it has, 0 on the others.",
            labels=["check", "kind", "critical", "status"],
        )
        last_success = GaugeMetricFamily(
            "sidecar_health_check_last_success_timestamp_seconds",
            "When each health check last passed, in seconds since the epoch.",
            labels=["check"],
        )
        for state in self.runner.states.values():
            spec = state.spec
            # The metric keeps a failing non-critical check visible as failing.
            current, _ = state.raw_status(now, "all")
            critical = "true" if spec.critical else "false"
            for name in ("pass", "warn", "fail"):
                status.add_metric([spec.name, spec.kind, critical, name], float(name == current))
            if state.last_success is not None:
                last_success.add_metric([spec.name], state.last_success)

        probe_up = GaugeMetricFamily(
            "sidecar_health_probe_up",
            "Whether each probe endpoint passes right now (1) or fails (0).",
            labels=["probe"],
        )
        for probe, selection in (("livez", "liveness"), ("readyz", "readiness")):
            evaluation = evaluate(self.runner, selection, now=now)
            probe_up.add_metric([probe], float(evaluation.status != "fail"))

        lag = GaugeMetricFamily(
            "sidecar_event_loop_lag_seconds",
            "How late the event loop last woke a sleeping task.",
        )
        lag.add_metric([], self.runner.monitor.last_lag)
        return [status, last_success, probe_up, lag]
