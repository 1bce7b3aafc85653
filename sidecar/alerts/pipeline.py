"""Builds the alert pipeline from the configuration and plugs it into the sidecar.

``build_alerts`` is called by the composition root. It adds the webhook routes to the main
listener, and the outbox and dispatcher as components (outbox first, so it is open before the
dispatcher claims from it and closed after the dispatcher has released what it held).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from starlette.routing import Route

from sidecar.alerts.auth import Authenticator
from sidecar.alerts.config import AlertsConfig
from sidecar.alerts.dispatcher import Dispatcher
from sidecar.alerts.metrics import AlertMetrics
from sidecar.alerts.outbox.base import Outbox
from sidecar.alerts.outbox.sqlite import SqliteOutbox
from sidecar.alerts.receiver import Receiver
from sidecar.alerts.routing import Router
from sidecar.config import Config, Problem
from sidecar.errors import ConfigError
from sidecar.fields import is_loopback_host, split_host_port
from sidecar.notify.base import Notifier
from sidecar.notify.destinations import build_notifier
from sidecar.telemetry.tracing import NOOP_TRACER, PipelineTracer

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from sidecar.app import Sidecar

logger = logging.getLogger(__name__)

# Paths other parts of the sidecar serve on the main listener (some are built after this one).
RESERVED_PATHS = frozenset(
    {"/", "/metrics", "/livez", "/readyz", "/healthz", "/v1/metrics", "/v1/traces", "/v1/logs"}
)


def check_receiver_auth(config: Config) -> None:
    """Refuse an unauthenticated receiver on a non-loopback listener unless ``auth: none``."""
    alerts = config.alerts
    if not alerts.receiver.enabled or alerts.receiver.auth is not None:
        return
    host, _ = split_host_port(config.server.listen)
    if not is_loopback_host(host):
        raise ConfigError(
            [
                Problem(
                    "alerts.receiver.auth",
                    f"server.listen {config.server.listen} accepts connections from other "
                    "hosts: configure bearer_tokens or basic, or write `auth: none` to accept "
                    "unauthenticated webhooks on purpose",
                )
            ]
        )


def build_outbox(config: AlertsConfig, *, recover: bool = True) -> tuple[Outbox, Redis | None]:
    """The configured outbox backend, and the Redis client when it uses Redis."""
    outbox_config = config.outbox
    if outbox_config.backend == "redis":
        from redis.asyncio import Redis

        from sidecar.alerts.outbox.redis import RedisOutbox

        redis_config = outbox_config.redis
        client = Redis.from_url(
            redis_config.url.reveal(),
            decode_responses=True,
            socket_timeout=redis_config.timeout,
            socket_connect_timeout=redis_config.timeout,
        )
        outbox: Outbox = RedisOutbox(
            client,
            prefix=redis_config.prefix,
            destinations=[destination.name for destination in config.destinations],
            max_depth=outbox_config.max_depth,
            dedup_window=outbox_config.dedup_window,
            lease=outbox_config.lease,
            consumer=redis_config.consumer,
            park_delay=config.dispatcher.poll_interval,
        )
        return outbox, client
    sqlite = outbox_config.sqlite
    return (
        SqliteOutbox(
            sqlite.resolved_path(),
            max_depth=outbox_config.max_depth,
            dedup_window=outbox_config.dedup_window,
            lease=outbox_config.lease,
            retention=outbox_config.retention,
            batch_size=sqlite.batch_size,
            recover=recover,
        ),
        None,
    )


@dataclass
class AlertPipeline:
    """The parts of the alert pipeline of one sidecar."""

    outbox: Outbox
    dispatcher: Dispatcher
    receiver: Receiver
    notifiers: dict[str, Notifier]
    metrics: AlertMetrics

    async def check_storage(self) -> None:
        """Readiness: raise OutboxUnavailable if the outbox cannot be used right now."""
        await self.outbox.check_storage()


def build_pipeline(
    config: AlertsConfig, registry: CollectorRegistry, tracer: PipelineTracer = NOOP_TRACER
) -> AlertPipeline:
    """Every part of the pipeline, not yet started; ``tracer`` records its traces."""
    outbox, redis = build_outbox(config)
    notifiers = {
        destination.name: build_notifier(
            destination,
            state=outbox.state,
            registry=registry,
            redis=redis,
            key_prefix=config.outbox.redis.prefix + ":",
        )
        for destination in config.destinations
    }
    metrics = AlertMetrics(registry, config.outbox.max_depth)
    dispatcher = Dispatcher(outbox, notifiers, config.dispatcher, metrics, tracer)
    receiver = Receiver(
        config.receiver,
        authenticator=Authenticator(
            None if config.receiver.auth in (None, "none") else config.receiver.auth  # type: ignore[arg-type]
        ),
        router=Router(config),
        outbox=outbox,
        dispatcher=dispatcher,
        notifiers=notifiers,
        metrics=metrics,
        tracer=tracer,
        backend=config.outbox.backend,
    )
    return AlertPipeline(outbox, dispatcher, receiver, notifiers, metrics)


def build_alerts(sidecar: Sidecar) -> AlertPipeline | None:
    """Build the pipeline and register its routes and components on ``sidecar``."""
    config = sidecar.config.alerts
    if not config.receiver.enabled:
        return None
    check_receiver_auth(sidecar.config)

    from sidecar.app import Link

    path = config.receiver.path.rstrip("/") or ""
    taken = RESERVED_PATHS | {getattr(route, "path", "") for route in sidecar.routes}
    if (path or "/") in taken:
        raise ConfigError(
            [Problem("alerts.receiver.path", f"{path or '/'} is already served by the sidecar")]
        )

    pipeline = build_pipeline(config, sidecar.registry, sidecar.telemetry.tracer)
    # The router's entries answer other methods (405) and keep the paths known to other parts;
    # POSTs reach the receiver through the direct route below, before the router.
    receiver = pipeline.receiver
    sidecar.routes.append(Route(path or "/", receiver, methods=["POST"]))
    sidecar.routes.append(Route(f"{path}/{{receiver}}", receiver, methods=["POST"]))
    sidecar.links.append(Link(path or "/", "Alertmanager webhook receiver (POST)"))
    sidecar.direct_routes.append(pipeline.receiver.match)
    sidecar.components.append(pipeline.outbox)
    sidecar.components.append(pipeline.dispatcher)
    return pipeline
