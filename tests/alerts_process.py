"""A sidecar process whose destinations are journaling test notifiers, for crash tests.

Usage: ``python -m tests.alerts_process CONFIG JOURNAL FAILURE_RATE [DELAY]``. Every successful
delivery appends one JSON line to JOURNAL (fsynced before success is reported), a share
FAILURE_RATE of attempts fails with a retryable error, and each attempt first waits DELAY
seconds (a slow destination holds its claims).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from sidecar.app import Sidecar
from sidecar.config import load_config
from sidecar.logs import configure_logging
from sidecar.server import serve
from tests.alerts_support import RecordingNotifier


def main(argv: list[str]) -> int:
    config_path, journal, failure_rate, *rest = argv
    delay = float(rest[0]) if rest else 0.0
    config = load_config(config_path)
    configure_logging("warning", "text", secrets=[])
    sidecar = Sidecar(config)
    assert sidecar.alerts is not None
    for name in list(sidecar.alerts.notifiers):
        notifier = RecordingNotifier(
            name,
            failure_rate=float(failure_rate),
            journal=Path(journal),
            tag=str(os.getpid()),
            delay=delay,
        )
        sidecar.alerts.notifiers[name] = notifier
    asyncio.run(serve(sidecar))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
