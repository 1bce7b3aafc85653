"""The logic of ``sidecar notify test RECEIVER``: prove that a receiver's destinations work.

Each destination gets a realistic two-alert notification, firing and then resolved (the
latter only where resolved notifications are sent), through the very notifier the running
sidecar would use. The outcome of every send is printed, with Discord's or the SMTP server's
own words on failure, and the exit code says whether everything was delivered.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

from sidecar.notify.base import Attempt, DeliveryError, Notifier
from sidecar.notify.sample import sample_notification

EXIT_OK = 0
EXIT_FAILED = 1


async def notify_test(
    notifiers: Sequence[Notifier],
    *,
    receiver: str,
    out: TextIO,
    now: datetime | None = None,
) -> int:
    """Send the sample through every notifier; return 0 if all were delivered, else 1.

    The notifiers stay open: the caller built them and closes them.
    """
    if not notifiers:
        out.write(f"receiver {receiver} has no destinations to test\n")
        return EXIT_FAILED
    moment = now or datetime.now(UTC)
    run = uuid.uuid4().hex[:12]
    failures = 0
    for notifier in notifiers:
        stages = [("firing", sample_notification(receiver, now=moment))]
        if notifier.send_resolved:
            stages.append(("resolved", sample_notification(receiver, now=moment, resolved=True)))
        for stage, notification in stages:
            attempt = Attempt(delivery_id=f"notify-test-{run}-{stage}", destination=notifier.name)
            label = f"{notifier.name} ({notifier.kind}) {stage}"
            try:
                delivered = await notifier.send(notification, attempt)
            except DeliveryError as error:
                failures += 1
                status = f", status {error.status}" if error.status is not None else ""
                verdict = "retryable" if error.retryable else "permanent"
                out.write(f"{label}: FAILED ({verdict}{status}): {error.reason}\n")
                # A resolved notification means little when its firing one did not arrive.
                break
            ids = ", ".join(delivered.message_ids) or "none returned"
            status = f"status {delivered.status}, " if delivered.status is not None else ""
            out.write(f"{label}: delivered ({status}message ids: {ids})\n")
        if not notifier.send_resolved:
            out.write(
                f"{notifier.name} ({notifier.kind}) resolved: skipped (send_resolved: false)\n"
            )
    summary = "all delivered" if not failures else f"{failures} failed"
    out.write(f"receiver {receiver}: {len(notifiers)} destinations, {summary}\n")
    return EXIT_OK if not failures else EXIT_FAILED
