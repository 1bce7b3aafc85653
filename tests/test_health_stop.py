"""The runner stops even when a probe's library swallows the cancellation meant for it."""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CollectorRegistry

from sidecar.health import Outcome
from sidecar.health.config import HealthConfig
from sidecar.health.runner import HealthRunner


async def test_stop_ends_a_probe_that_swallows_its_cancellation(
    registry: CollectorRegistry,
) -> None:
    runner = HealthRunner(HealthConfig(), registry, draining=lambda: False)
    entered = asyncio.Event()

    async def stubborn() -> Outcome:
        entered.set()
        # What Python 3.11's wait_for can do when its inner call completes at that moment.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)
        return Outcome()

    runner.add_builtin("stubborn", stubborn, interval=60.0, timeout=50.0)
    await runner.start()
    await asyncio.wait_for(entered.wait(), 5)
    tasks = list(runner._tasks.values())

    async with asyncio.timeout(10):
        await runner.stop()

    assert tasks and all(task.done() for task in tasks)
