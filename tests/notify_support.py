"""Helpers for the notifier tests: an in-memory notifier state and notification builders."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sidecar.alerts.payload import Notification

NOW = datetime(2026, 12, 3, 16, 30, tzinfo=UTC)


class MemoryState:
    """``NotifierState`` in a dict, with expiry, as the outbox backends provide it."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[str, float | None]] = {}

    async def get(self, key: str) -> str | None:
        entry = self.values.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and expires < time.monotonic():
            del self.values[key]
            return None
        return value

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        self.values[key] = (value, None if ttl is None else time.monotonic() + ttl)


def alert(
    name: str = "HighErrorRate",
    *,
    status: str = "firing",
    index: int = 0,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One alert in Alertmanager's JSON, with a fingerprint unique per name and index."""
    started = NOW - timedelta(minutes=12, seconds=index)
    all_labels = {
        "alertname": name,
        "instance": f"api-{index}.prod:8080",
        "job": "api",
        "severity": "critical",
        **(labels or {}),
    }
    return {
        "status": status,
        "labels": all_labels,
        "annotations": {
            "summary": f"Error rate above 5% on api-{index}",
            "description": "The 5xx ratio over 5m is 7.3%, above the 5% objective.",
            "runbook_url": "https://runbooks.example.org/api/high-error-rate",
            **(annotations or {}),
        },
        "startsAt": started.isoformat().replace("+00:00", "Z"),
        "endsAt": (
            NOW.isoformat().replace("+00:00", "Z")
            if status == "resolved"
            else "0001-01-01T00:00:00Z"
        ),
        "generatorURL": "http://prometheus.example:9090/graph?g0.expr=job%3Aerrors%3Aratio5m+%3E+0.05",
        "fingerprint": hashlib.sha256(f"{name}/{index}".encode()).hexdigest()[:16],
    }


def notification(
    alerts: list[dict[str, Any]],
    *,
    status: str | None = None,
    receiver: str = "ops",
    truncated: int = 0,
    group_labels: dict[str, str] | None = None,
) -> Notification:
    """A version 4 webhook body around ``alerts``."""
    if status is None:
        status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    groups = group_labels or {"alertname": alerts[0]["labels"]["alertname"]}
    return Notification.model_validate(
        {
            "version": "4",
            "groupKey": "{}:{" + ",".join(f'{k}="{v}"' for k, v in groups.items()) + "}",
            "truncatedAlerts": truncated,
            "status": status,
            "receiver": receiver,
            "groupLabels": groups,
            "commonLabels": {"job": "api"},
            "commonAnnotations": {},
            "externalURL": "http://alertmanager.example:9093",
            "alerts": alerts,
        }
    )
