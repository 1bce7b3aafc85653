"""The outbox contract shared by the SQLite and Redis backends.

An accepted notification becomes one *delivery* per destination. A delivery is ``pending``
until a worker claims it with a lease, then ``done`` (pruned later), back to ``pending`` with a
``not_before`` time after a retryable failure, or ``dead`` with a reason. A lease that runs out
(its worker crashed) makes the delivery claimable again: delivery is at least once.

Order: for one alert group (``groupKey``) and destination, a delivery is claimable only when no
earlier delivery of the same group and destination is still pending or claimed, so a resolved
notification never overtakes the firing one it follows.

::

    SidecarError
    └── OutboxError
        ├── OutboxUnavailable   storage cannot be reached or written (answer 503)
        └── OutboxFull          max_depth reached (answer 503)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, Protocol

from sidecar.alerts.payload import Notification
from sidecar.errors import SidecarError
from sidecar.notify.base import NotifierState

State = Literal["pending", "leased", "done", "dead"]


class OutboxError(SidecarError):
    """The outbox could not do what was asked."""


class OutboxUnavailable(OutboxError):
    """Storage cannot be reached or written; the caller should retry later."""


class OutboxFull(OutboxError):
    """The outbox holds ``max_depth`` undelivered deliveries already."""


def dedup_key(receiver: str, notification: Notification) -> str:
    """Identity of a notification for deduplication.

    Receiver, groupKey, status and the sorted alert fingerprints with their statuses: HA
    Alertmanager peers send exactly this set twice, while a change in any alert's state makes
    a new notification.
    """
    # A comprehension sorted in place: a generator fed to sorted() resumes a frame per alert.
    alerts = [f"{alert.fingerprint}:{alert.status}" for alert in notification.alerts]
    alerts.sort()
    text = "\x1f".join([receiver, notification.group_key, notification.status, *alerts])
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def group_id(group_key: str) -> str:
    """A short fixed-size key for an alert group."""
    return hashlib.sha256(group_key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True)
class Claim:
    """A delivery claimed by a worker, with what it needs to attempt it."""

    delivery_id: str
    destination: str
    body: str
    attempts: int
    accepted_at: float
    trace_context: str = ""
    """The trace carrier stored with the notification (``""`` when it was not traced)."""


@dataclass(frozen=True)
class DeliveryRecord:
    """A delivery as the CLI lists it."""

    delivery_id: str
    destination: str
    state: State
    attempts: int
    accepted_at: float
    not_before: float
    last_error: str
    group_key: str


@dataclass(frozen=True)
class OutboxStats:
    depth: int
    """Deliveries not yet done or dead."""

    oldest_age: float
    """Seconds since the oldest undelivered delivery was accepted (0 if none)."""

    dead: int
    """Dead letters currently kept."""


class Outbox(Protocol):
    """What the receiver, the dispatcher and the CLI need from a backend."""

    @property
    def state(self) -> NotifierState:
        """Durable key-value memory handed to notifiers."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def enqueue(
        self,
        notification: Notification,
        destinations: list[str],
        key: str,
        body: str | None = None,
        trace_context: str = "",
    ) -> bool:
        """Store one delivery per destination durably; return False for a duplicate of ``key``
        seen within the dedup window (nothing stored). Raise OutboxFull or OutboxUnavailable.
        Returns only after the data is committed. ``body`` is the notification's JSON as
        received (already validated), which saves serialising it again. ``trace_context`` is
        an opaque string (the pipeline tracer's carrier) handed back in every ``Claim``."""
        ...

    async def claim(self, destination: str, limit: int) -> list[Claim]:
        """Claim up to ``limit`` due deliveries of a destination, in order, with a lease."""
        ...

    async def complete(self, delivery_id: str) -> None:
        """Mark a claimed delivery as delivered."""
        ...

    async def retry(self, delivery_id: str, delay: float, error: str) -> None:
        """Make a claimed delivery pending again, due ``delay`` seconds from now."""
        ...

    async def release(self, delivery_id: str) -> None:
        """Give a claimed delivery back without counting an attempt (shutdown)."""
        ...

    async def bury(self, delivery_id: str, reason: str) -> None:
        """Move a delivery to the dead letters with the reason."""
        ...

    async def requeue(self, delivery_id: str) -> bool:
        """Make a dead letter pending again with its attempts reset; False if there is none."""
        ...

    async def list(self, state: State | None = None, limit: int = 100) -> list[DeliveryRecord]:
        """Deliveries, oldest first, optionally of one state."""
        ...

    async def stats(self) -> OutboxStats: ...

    async def prune(self) -> int:
        """Delete delivered entries older than the retention; return how many."""
        ...

    async def check_storage(self) -> None:
        """Raise OutboxUnavailable if the storage cannot be read and written right now."""
        ...
