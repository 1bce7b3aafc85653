"""``sidecar check``: every configured check once, as a table for a terminal or a script."""

from __future__ import annotations

import asyncio
from typing import TextIO

from sidecar.config import Config
from sidecar.health.runner import HealthRunner

_HEADER = ("NAME", "KIND", "STATUS", "DURATION", "REASON")


def run_checks_once(config: Config, only: list[str], output: TextIO) -> int:
    """Run the checks (or only the named ones) once and print a table.

    Returns 0 when no critical check fails, 1 when one does, 2 when ``only`` names a check
    that does not exist (the message goes to ``output`` too). Thresholds, intervals and
    initial delays do not apply: each check runs exactly once under its timeout.
    """
    return asyncio.run(_run(config, only, output))


async def _run(config: Config, only: list[str], output: TextIO) -> int:
    runner = HealthRunner(config.health)
    unknown = [name for name in only if name not in runner.states]
    if unknown:
        await runner.close()
        known = ", ".join(runner.states)
        output.write(f"no check named {', '.join(unknown)}; configured: {known}\n")
        return 2
    try:
        results = await runner.run_once(only or None)
    finally:
        await runner.close()

    rows = [_HEADER]
    failed = False
    for state, result in results:
        status = result.status
        if status == "fail" and not state.spec.critical:
            status = "warn"
        failed = failed or status == "fail"
        rows.append(
            (
                state.spec.name,
                state.spec.kind,
                status,
                f"{result.duration * 1000:.1f}ms",
                result.reason or "-",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(_HEADER) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        output.write("  ".join([*cells, row[-1]]).rstrip() + "\n")
    return 1 if failed else 0
