"""``sidecar outbox``: look at the outbox and put dead letters back in the queue.

The commands open the configured outbox next to a running sidecar (SQLite in WAL mode allows
it; Redis is shared anyway) and leave the running sidecar's claims alone.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sidecar.alerts.outbox.base import Outbox, OutboxError
from sidecar.errors import StartupError

T = TypeVar("T")
STATES = ("pending", "leased", "done", "dead")


def add_outbox_commands(
    commands: Any, add_config_argument: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add ``outbox list`` and ``outbox retry ID`` to the top-level subcommands."""
    outbox = commands.add_parser("outbox", help="inspect deliveries and retry dead letters")
    actions = outbox.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="list deliveries, oldest first")
    add_config_argument(listing)
    listing.add_argument("--state", choices=STATES, help="only deliveries in this state")
    listing.add_argument("--limit", type=int, default=100, help="most rows (default 100)")
    listing.set_defaults(handler=list_command)

    retry = actions.add_parser("retry", help="queue a dead letter again with its attempts reset")
    add_config_argument(retry)
    retry.add_argument("delivery_id", nargs="+", help="delivery id(s) as `outbox list` shows")
    retry.set_defaults(handler=retry_command)


def _with_outbox(config_path: Path | None, action: Callable[[Outbox], Awaitable[T]]) -> T:
    from sidecar.alerts.pipeline import build_outbox
    from sidecar.cli import load_or_report

    config = load_or_report(config_path)
    if config is None:
        raise SystemExit(2)

    async def run() -> T:
        outbox, _ = build_outbox(config.alerts, recover=False)
        await outbox.start()
        try:
            return await action(outbox)
        finally:
            await outbox.stop()

    return asyncio.run(run())


def _time(seconds: float) -> str:
    if not seconds:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def list_command(args: argparse.Namespace) -> int:
    async def read(outbox: Outbox) -> list[Any]:
        return list(await outbox.list(args.state, args.limit))

    try:
        records = _with_outbox(args.config, read)
    except (OutboxError, StartupError) as error:
        print(f"cannot read the outbox: {error}", file=sys.stderr)
        return 3
    print(f"{'ID':<34} {'DESTINATION':<16} {'STATE':<8} {'TRIES':>5} {'ACCEPTED':<20} ERROR")
    for record in records:
        reason = record.last_error.replace("\n", " ")[:80]
        print(
            f"{record.delivery_id:<34} {record.destination:<16} {record.state:<8}"
            f" {record.attempts:>5} {_time(record.accepted_at):<20} {reason}"
        )
    return 0


def retry_command(args: argparse.Namespace) -> int:
    async def requeue(outbox: Outbox) -> list[str]:
        return [i for i in args.delivery_id if not await outbox.requeue(i)]

    try:
        missing = _with_outbox(args.config, requeue)
    except (OutboxError, StartupError) as error:
        print(f"cannot change the outbox: {error}", file=sys.stderr)
        return 3
    for delivery_id in missing:
        print(f"{delivery_id}: no dead letter with this id", file=sys.stderr)
    queued = len(args.delivery_id) - len(missing)
    print(f"queued {queued} dead letter(s) again")
    return 1 if missing else 0
