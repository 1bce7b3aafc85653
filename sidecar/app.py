"""The composition root: builds every part from the configuration and owns their lifecycle.

Nothing in the package is a module-level singleton. ``Sidecar`` creates each part with exactly
the dependencies it needs (the registry, the lifecycle, its own config section), collects the
routes they serve and starts and stops them in order. Tests build a ``Sidecar`` from a config
and drive its ASGI app in process.
"""

from __future__ import annotations

import asyncio
import html
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sidecar import __version__
from sidecar.alerts.pipeline import build_alerts
from sidecar.config import Config
from sidecar.errors import SidecarError
from sidecar.health import CheckFailed, Outcome
from sidecar.health.config import OUTBOX_CHECK
from sidecar.health.endpoints import install_health
from sidecar.metrics.exposition import Exposition
from sidecar.metrics.host import FilesystemSource, host_sources
from sidecar.metrics.ingest import build_ingest
from sidecar.metrics.process import ProcessSource
from sidecar.metrics.sources import Source, SourceCollector
from sidecar.telemetry import build_telemetry

logger = logging.getLogger(__name__)


class Component(Protocol):
    """A part with background work: started before the listeners open, stopped after."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class Link:
    """An endpoint shown on the landing page."""

    path: str
    description: str


@dataclass
class Listener:
    """One HTTP server socket and the app it serves."""

    name: str
    address: str
    app: ASGIApp


class _Direct:
    """Hands a request to the first direct route that takes it, else to the router."""

    def __init__(self, routes: list[Callable[[Scope], ASGIApp | None]], router: ASGIApp) -> None:
        self._routes = routes
        self._router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for route in self._routes:
            app = route(scope)
            if app is not None:
                await app(scope, receive, send)
                return
        await self._router(scope, receive, send)


class Lifecycle:
    """Shared shutdown state: parts read ``draining`` (readiness fails while it is set)."""

    def __init__(self) -> None:
        self.draining = False
        self.stopping = asyncio.Event()

    def begin_drain(self) -> None:
        """Mark the process as leaving: readiness fails from now on, liveness does not."""
        self.draining = True


@dataclass
class Sidecar:
    """Every part of a running sidecar, built from one configuration."""

    config: Config
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    links: list[Link] = field(default_factory=list)
    routes: list[BaseRoute] = field(default_factory=list)
    components: list[Component] = field(default_factory=list)
    extra_listeners: list[Listener] = field(default_factory=list)
    direct_routes: list[Callable[[Scope], ASGIApp | None]] = field(default_factory=list)
    """Hot paths of the main listener: each returns the ASGI app that takes a request
    directly, ahead of the router and its middleware, or None to let the router decide."""

    def __post_init__(self) -> None:
        self.exposition = Exposition(self.registry)
        # First: the alert pipeline takes its tracer from here, and export components stop
        # last, after the parts whose final spans they flush.
        self.telemetry = build_telemetry(
            self.config.telemetry, self.exposition.families, self.registry
        )
        self.components.extend(self.telemetry.components)
        self._build_metrics()
        self.health = install_health(self)
        self.ingest = build_ingest(self)
        self.alerts = build_alerts(self)
        self._add_outbox_check()
        # The health runner starts last, so that its first results see every part running
        # (the outbox check would otherwise fail until its next interval), and stops first.
        self.components.remove(self.health)
        self.components.append(self.health)
        self._app: ASGIApp | None = None

    def _add_outbox_check(self) -> None:
        """Readiness fails while the alert outbox cannot store (Alertmanager would get 503s)."""
        alerts = self.alerts
        if alerts is None:
            return

        async def storage_answers() -> Outcome:
            try:
                await alerts.check_storage()
            except SidecarError as error:
                raise CheckFailed(f"outbox storage unavailable: {error}") from error
            return Outcome()

        self.health.add_builtin(OUTBOX_CHECK, storage_answers, interval=10.0, timeout=5.0)

    def _build_metrics(self) -> None:
        metrics = self.config.metrics
        sources: dict[str, Source] = {}
        if metrics.host.enabled:
            filesystems = FilesystemSource(metrics.host)
            self.components.append(filesystems)  # its stop() releases the statvfs threads
            sources.update(host_sources(metrics.host, filesystems))
        if metrics.process.include_self or metrics.process.targets:
            sources["process"] = ProcessSource(metrics.process).collect
        self.registry.register(SourceCollector(sources))
        self.links.append(Link("/metrics", "Metrics for Prometheus"))
        self.routes.append(Route("/metrics", self.exposition.endpoint, methods=["GET"]))

    @property
    def app(self) -> ASGIApp:
        """The ASGI app of the main listener."""
        if self._app is None:
            routes = [Route("/", self._landing, methods=["GET"]), *self.routes]
            router = Starlette(routes=routes)
            self._app = _Direct(self.direct_routes, router) if self.direct_routes else router
        return self._app

    @property
    def listeners(self) -> list[Listener]:
        """The main listener first, then any a part added (the OTLP receiver)."""
        main = Listener("http", self.config.server.listen, self.app)
        return [main, *self.extra_listeners]

    async def _landing(self, request: Request) -> Response:
        if request.headers.get("accept", "").startswith("text/plain"):
            lines = [f"{link.path}\t{link.description}" for link in self.links]
            return PlainTextResponse("\n".join(lines) + "\n")
        items = "\n".join(
            f'<li><a href="{html.escape(link.path)}">{html.escape(link.path)}</a>'
            f" — {html.escape(link.description)}</li>"
            for link in self.links
        )
        page = (
            '<!doctype html><html><head><meta charset="utf-8"><title>sidecar</title></head>'
            f"<body><h1>sidecar {html.escape(__version__)}</h1><ul>\n{items}\n</ul></body></html>"
        )
        return HTMLResponse(page)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Sidecar]:
        """Start every component in order; stop them in reverse order on the way out."""
        async with AsyncExitStack() as stack:
            for component in self.components:
                await component.start()
                stack.push_async_callback(component.stop)
            yield self
