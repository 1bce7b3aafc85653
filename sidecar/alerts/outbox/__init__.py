"""Durable storage of accepted notifications until each of their deliveries is done."""

from sidecar.alerts.outbox.base import (
    Claim,
    DeliveryRecord,
    Outbox,
    OutboxFull,
    OutboxStats,
    OutboxUnavailable,
    dedup_key,
)

__all__ = [
    "Claim",
    "DeliveryRecord",
    "Outbox",
    "OutboxFull",
    "OutboxStats",
    "OutboxUnavailable",
    "dedup_key",
]
