"""What ``GET /metrics`` serves: a registry of collectors plus pre-rendered text sources.

The Prometheus text format 0.0.4 is the default; OpenMetrics 1.0 when the scraper's ``Accept``
header asks for it (Prometheus does), gzip when ``Accept-Encoding`` allows it. Rendering runs on
a worker thread so that psutil reads and text generation never block the event loop.
"""

from __future__ import annotations

import asyncio
import gzip
import platform
import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from sidecar import __version__

TextSource = Callable[[bool], bytes]
"""Renders extra exposition text; the argument tells whether OpenMetrics is wanted."""

FamilySource = Callable[[], Iterable[Metric]]
"""The same data as a text source, as metric families, for consumers other than /metrics."""

_EOF = b"# EOF\n"
# Scrapes are small and frequent: the cheapest level already shrinks text about 8 times.
_GZIP_LEVEL = 1


class BuildInfoCollector(Collector):
    """``sidecar_build_info``: always 1, with the version as labels."""

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "sidecar_build_info",
            "Version of the running sidecar; always 1.",
            labels=["version", "python_version", "python_implementation"],
        )
        family.add_metric(
            [__version__, platform.python_version(), platform.python_implementation()], 1
        )
        yield family


class Exposition:
    """Owns the registry behind ``/metrics`` and renders it on request."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # `_created` series add about 40% to a scrape and no query of ours uses them. The
        # switch is process-wide in prometheus_client; the sidecar never wants them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        self._text_sources: list[TextSource] = []
        self._family_sources: list[FamilySource] = []
        # One render at a time: concurrent scrapes wait instead of multiplying the work.
        self._render_lock = threading.Lock()
        registry.register(BuildInfoCollector())
        self._duration = Histogram(
            "sidecar_scrape_duration_seconds",
            "Seconds taken to render /metrics.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )

    def add_text_source(self, source: TextSource, families: FamilySource) -> None:
        """Append text rendered outside prometheus_client (the application metric store).

        ``families`` yields the same series as metric families, so that exporters other than
        ``/metrics`` (OTLP push) see exactly what Prometheus sees.
        """
        self._text_sources.append(source)
        self._family_sources.append(families)

    def families(self) -> Iterable[Metric]:
        """Every metric family ``/metrics`` shows: the registry's, then the text sources'."""
        yield from self.registry.collect()
        for source in self._family_sources:
            yield from source()

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """Return the exposition body and its content type for an ``Accept`` header."""
        encoder, content_type = choose_encoder(accept)
        openmetrics = content_type.startswith("application/openmetrics-text")
        started = time.perf_counter()
        with self._render_lock:
            body = encoder(self.registry)
            if self._text_sources:
                extra = b"".join(source(openmetrics) for source in self._text_sources)
                body = body.removesuffix(_EOF) + extra + _EOF if openmetrics else body + extra
        self._duration.observe(time.perf_counter() - started)
        return body, content_type

    async def endpoint(self, request: Request) -> Response:
        """The Starlette endpoint for ``GET /metrics``."""
        body, content_type = await asyncio.to_thread(self.render, request.headers.get("accept", ""))
        headers = {"Vary": "Accept, Accept-Encoding"}
        if _accepts_gzip(request.headers.get("accept-encoding", "")):
            body = gzip.compress(body, compresslevel=_GZIP_LEVEL)
            headers["Content-Encoding"] = "gzip"
        return Response(body, media_type=content_type, headers=headers)


def _accepts_gzip(header: str) -> bool:
    for coding in header.split(","):
        name, _, params = coding.strip().partition(";")
        if name.strip().lower() == "gzip":
            return params.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False
