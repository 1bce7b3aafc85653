"""``sidecar notify test RECEIVER``: send a sample notification through a configured receiver.

The notifiers are built exactly as the running sidecar builds them, with a fresh metrics
registry and a memory of their own (message ids of this test are not kept in the outbox), and
without the shared Redis budget: a test send is a handful of requests.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from sidecar.notify.destinations import build_notifier
from sidecar.notify.testsend import EXIT_FAILED, notify_test

EXIT_CONFIG = 2


class EphemeralState:
    """A notifier memory that lasts as long as one test send."""

    def __init__(self) -> None:
        self._values: dict[str, str] = {}

    async def get(self, key: str) -> str | None:
        return self._values.get(key)

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        self._values[key] = value


def add_notify_commands(
    commands: Any, add_config_argument: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add ``notify test RECEIVER`` to the top-level subcommands."""
    notify = commands.add_parser("notify", help="send test notifications")
    actions = notify.add_subparsers(dest="notify_command", required=True, metavar="ACTION")
    test = actions.add_parser(
        "test", help="send a sample firing then resolved notification through a receiver"
    )
    add_config_argument(test)
    test.add_argument("receiver", help="name of a receiver under alerts.receivers")
    test.set_defaults(handler=notify_test_command)


def notify_test_command(args: argparse.Namespace) -> int:
    from sidecar.cli import load_or_report

    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    alerts = config.alerts
    receiver = next((item for item in alerts.receivers if item.name == args.receiver), None)
    if receiver is None:
        names = ", ".join(item.name for item in alerts.receivers) or "none"
        print(f"no receiver named {args.receiver!r} (configured: {names})", file=sys.stderr)
        return EXIT_FAILED
    destinations = {destination.name: destination for destination in alerts.destinations}

    async def send() -> int:
        registry = CollectorRegistry()
        state = EphemeralState()
        notifiers = [
            build_notifier(destinations[name], state=state, registry=registry)
            for name in receiver.destinations
        ]
        try:
            return await notify_test(notifiers, receiver=receiver.name, out=sys.stdout)
        finally:
            for notifier in notifiers:
                await notifier.close()

    return asyncio.run(send())
