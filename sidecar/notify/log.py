"""The ``log`` destination: one log line per alert, so alerts show before anything else is set up.

It never fails, which makes it the default destination of a sidecar without a configuration
file and a safe place to route alerts while Discord or email is being configured.
"""

from __future__ import annotations

import logging
from typing import Literal

from sidecar.alerts.payload import Notification
from sidecar.notify.base import Attempt, Delivered, DestinationConfig

logger = logging.getLogger(__name__)


class LogDestination(DestinationConfig):
    """Write each alert of a notification as one INFO line of the sidecar's log."""

    kind: Literal["log"] = "log"
    """Selects this destination type."""


class LogNotifier:
    """Logs ``status alertname labels summary`` for every alert of a notification."""

    kind = "log"

    def __init__(self, config: LogDestination) -> None:
        self.name = config.name
        self.send_resolved = config.send_resolved

    async def send(self, notification: Notification, attempt: Attempt) -> Delivered:
        for alert in notification.alerts:
            labels = ",".join(f"{key}={value}" for key, value in sorted(alert.labels.items()))
            logger.info(
                "alert %s %s destination=%s receiver=%s labels={%s} summary=%r",
                alert.status,
                alert.name or "(no alertname)",
                self.name,
                notification.receiver,
                labels,
                alert.annotations.get("summary", ""),
            )
        return Delivered()

    async def close(self) -> None:
        return None
