"""A realistic notification, used to check templates at load time and by the test command."""

from __future__ import annotations

from datetime import datetime, timedelta

from sidecar.alerts.payload import Notification


def sample_notification(
    receiver: str = "sample", *, now: datetime, resolved: bool = False
) -> Notification:
    """A two-alert group as Alertmanager would send it; ``resolved`` ends both alerts."""
    started = now - timedelta(minutes=7)
    ended = now if resolved else None
    status = "resolved" if resolved else "firing"
    common = {"alertname": "SidecarTestNotification", "job": "sidecar", "severity": "warning"}
    alerts = []
    for index, instance in enumerate(("app-0:8080", "app-1:8080")):
        alerts.append(
            {
                "status": status,
                "labels": {**common, "instance": instance},
                "annotations": {
                    "summary": f"Test notification from the sidecar ({instance})",
                    "description": (
                        "This is a test sent by `sidecar notify test`. "
                        "Nothing is wrong; it checks that delivery works end to end."
                    ),
                    "runbook_url": "https://example.org/runbooks/sidecar-test",
                },
                "startsAt": started.isoformat(),
                "endsAt": ended.isoformat() if ended else "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus.example:9090/graph?g0.expr=up+%3D%3D+0",
                "fingerprint": f"5e1dca{index:010x}",
            }
        )
    return Notification.model_validate(
        {
            "version": "4",
            "groupKey": '{}:{alertname="SidecarTestNotification"}',
            "status": status,
            "receiver": receiver,
            "groupLabels": {"alertname": "SidecarTestNotification"},
            "commonLabels": common,
            "commonAnnotations": {},
            "externalURL": "http://alertmanager.example:9093",
            "alerts": alerts,
        }
    )
