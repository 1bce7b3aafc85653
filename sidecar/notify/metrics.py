"""Metrics shared by every notifier of one registry.

Several destinations of the same kind write to the same families with their own
``destination`` label, so the families are created once per registry and looked up again by
the next notifier. The cache is keyed weakly by the registry: it dies with the sidecar that
owns it, and two sidecars in one process (as in the tests) never share a family.
"""

from __future__ import annotations

from dataclasses import dataclass
from weakref import WeakKeyDictionary

from prometheus_client import CollectorRegistry, Counter


@dataclass(frozen=True)
class NotifierMetrics:
    """The notifier families: requests by answer code, Discord rate limiting and messages."""

    requests: Counter
    rate_limited: Counter
    rate_limit_wait: Counter
    messages: Counter


_BY_REGISTRY: WeakKeyDictionary[CollectorRegistry, NotifierMetrics] = WeakKeyDictionary()


def notifier_metrics(registry: CollectorRegistry) -> NotifierMetrics:
    """The notifier families registered in ``registry``, created on first use."""
    existing = _BY_REGISTRY.get(registry)
    if existing is not None:
        return existing
    metrics = NotifierMetrics(
        requests=Counter(
            "sidecar_notifier_requests",
            "Requests made by notifiers, by destination, kind and answer "
            "(HTTP status, SMTP reply code, or error for a network failure).",
            ["destination", "kind", "code"],
            registry=registry,
        ),
        rate_limited=Counter(
            "sidecar_discord_rate_limited",
            "Discord answers 429 Too Many Requests, by scope (route, global, shared).",
            ["destination", "scope"],
            registry=registry,
        ),
        rate_limit_wait=Counter(
            "sidecar_discord_rate_limit_wait_seconds",
            "Seconds spent waiting for a Discord rate-limit bucket before sending.",
            ["destination"],
            registry=registry,
        ),
        messages=Counter(
            "sidecar_discord_messages",
            "Discord messages created or edited, by action (create, edit).",
            ["destination", "action"],
            registry=registry,
        ),
    )
    _BY_REGISTRY[registry] = metrics
    return metrics
