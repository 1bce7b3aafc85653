"""StatsD and DogStatsD ingest: the line parser and the UDP (optionally TCP) listener.

A line is ``name:value|type[|@rate][|#tag:value,...][|c:container][|T timestamp]``; a datagram
holds one or more lines separated by ``\\n``. Types: ``c`` counter (adds ``value / rate``),
``g`` gauge (sets; ``+N``/``-N`` add), ``ms`` timer (milliseconds, observed in seconds), ``h``
and ``d`` histogram and distribution (observed as sent). Timers and histograms become Prometheus
histograms; a sampled observation counts ``1 / rate`` times.

Every line is either applied to the store or counted in
``sidecar_ingest_rejected_samples_total{source="statsd",reason}``; the listener never stops on
bad input. A sample of rejected lines is logged at debug level.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import socket
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.errors import StartupError
from sidecar.fields import split_host_port
from sidecar.metrics.ingest_config import StatsdConfig
from sidecar.metrics.mapping import Mapper, sanitize_label
from sidecar.metrics.store import (
    COUNTER,
    GAUGE,
    HISTOGRAM,
    IngestStats,
    Series,
    Store,
    family_name,
)

logger = logging.getLogger(__name__)

_KINDS = {b"c": COUNTER, b"g": GAUGE, b"ms": HISTOGRAM, b"h": HISTOGRAM, b"d": HISTOGRAM}
_MAPPING_KINDS = {COUNTER: "counter", GAUGE: "gauge", HISTOGRAM: "observer"}
_RESOLVED_CACHE_SIZE = 100_000
_MAX_TCP_LINE = 64 * 1024
_UDP_READ_SIZE = 65535


class StatsdIngest:
    """Parses StatsD lines and applies them to the store.

    Calls come from one thread (the event loop); the store lock is held per datagram, so a
    scrape sees whole datagrams.
    """

    def __init__(
        self,
        store: Store,
        stats: IngestStats,
        mapper: Mapper,
        timer_buckets: Iterable[float],
    ) -> None:
        self._store = store
        self._stats = stats
        self._mapper = mapper
        self._timer_buckets = tuple(timer_buckets)
        # (name, type, tags) as received -> (series, is_timer_in_ms). Resolving a name costs
        # decoding, mapping and a store lookup; a hit costs one dict lookup.
        self._resolved: dict[tuple[bytes, bytes, bytes], tuple[Series, bool]] = {}
        self.datagrams = 0
        self.rejected_total = 0

    def handle_datagram(self, data: bytes) -> None:
        """Apply every line of one datagram; count what was applied and what was rejected."""
        self.datagrams += 1
        accepted = 0
        rejected: dict[str, int] | None = None
        now = time.monotonic()
        with self._store.lock:
            for line in data.split(b"\n"):
                if not line:
                    continue
                reason = self._apply(line, now)
                if reason is None:
                    accepted += 1
                    continue
                if rejected is None:
                    rejected = {}
                rejected[reason] = rejected.get(reason, 0) + 1
                self._log_rejected(line, reason)
        self._stats.add("statsd", accepted, rejected)

    def count_rejected(self, reason: str) -> None:
        """Count input rejected before it became a line (a TCP line past the length limit)."""
        self.rejected_total += 1
        self._stats.add("statsd", 0, {reason: 1})

    def _log_rejected(self, line: bytes, reason: str) -> None:
        self.rejected_total += 1
        count = self.rejected_total
        # The first few and then one in a thousand: enough to debug, never a flood.
        if (count <= 10 or count % 1000 == 0) and logger.isEnabledFor(logging.DEBUG):
            logger.debug("rejected statsd line (%s): %r", reason, line[:200])

    def _apply(self, line: bytes, now: float) -> str | None:
        name, separator, rest = line.partition(b":")
        if not separator or not name:
            return "malformed"
        fields = rest.split(b"|")
        if len(fields) < 2:
            return "malformed"
        value_text = fields[0].strip()
        type_text = fields[1].strip()
        rate = 1.0
        tags = b""
        for extra in fields[2:]:
            marker = extra[:1]
            if marker == b"@":
                try:
                    rate = float(extra[1:])
                except ValueError:
                    return "invalid_sample_rate"
                if not 0.0 < rate <= 1.0:
                    return "invalid_sample_rate"
            elif marker == b"#":
                tags = extra[1:]
            elif marker == b"T" or extra[:2] == b"c:":
                continue  # DogStatsD timestamp and container id: not labels, not values
            else:
                return "malformed"
        try:
            value = float(value_text)
        except ValueError:
            return "invalid_value"

        key = (name, type_text, tags)
        cached = self._resolved.get(key)
        if cached is None or not cached[0].alive:
            resolved = self._resolve(name, type_text, tags)
            if isinstance(resolved, str):
                return resolved
            cached = resolved
        series, in_milliseconds = cached
        kind = series.family.kind
        if kind == COUNTER:
            if value < 0 or not math.isfinite(value):
                return "invalid_value"
            series.value += value / rate
        elif kind == GAUGE:
            if value_text[:1] in (b"+", b"-"):
                series.value += value
            else:
                series.value = value
        else:
            if math.isnan(value):
                return "invalid_value"
            series.observe(value / 1000.0 if in_milliseconds else value, 1.0 / rate)
        series.updated = now
        return None

    def _resolve(self, name: bytes, type_text: bytes, tags: bytes) -> tuple[Series, bool] | str:
        kind = _KINDS.get(type_text)
        if kind is None:
            return "invalid_type"
        try:
            text = name.decode()
            tag_text = tags.decode()
        except UnicodeDecodeError:
            return "invalid_utf8"
        mapped = self._mapper.map(text, _MAPPING_KINDS[kind])
        if mapped.drop:
            return "mapping_drop"
        labels: dict[str, str] = {}
        if tag_text:
            for tag in tag_text.split(","):
                key, separator, value = tag.partition(":")
                # A tag without a value carries nothing a label could hold.
                if key and separator and value:
                    labels[sanitize_label(key)] = value
        labels.update(mapped.labels)
        buckets = self._timer_buckets if mapped.buckets is None else mapped.buckets
        series = self._store.series(
            kind,
            family_name(mapped.name, kind),
            labels,
            help=mapped.help or f"StatsD {_MAPPING_KINDS[kind]} {text}.",
            ttl=mapped.ttl,
            bounds=buckets,
        )
        if isinstance(series, str):
            return series
        if len(self._resolved) >= _RESOLVED_CACHE_SIZE:
            self._resolved.clear()
        result = (series, type_text == b"ms")
        self._resolved[(name, type_text, tags)] = result
        return result


class _DatagramProtocol(asyncio.DatagramProtocol):
    def __init__(self, ingest: StatsdIngest) -> None:
        self._ingest = ingest

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._ingest.handle_datagram(data)

    def error_received(self, exc: Exception) -> None:
        logger.warning("statsd socket error: %s", exc)


def open_udp_socket(address: str, receive_buffer: int) -> tuple[socket.socket, int]:
    """Bind a UDP socket with the largest receive buffer we may have; return it and the size.

    ``SO_RCVBUFFORCE`` passes ``net.core.rmem_max`` when the process has CAP_NET_ADMIN;
    otherwise ``SO_RCVBUF`` is capped there. The size returned is what the kernel reports, which
    on Linux is twice the request (it counts its own bookkeeping).
    """
    host, port = split_host_port(address)
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise StartupError(f"cannot listen for statsd on {address}: {error.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        if receive_buffer:
            force = getattr(socket, "SO_RCVBUFFORCE", None)
            try:
                if force is None:
                    raise PermissionError
                sock.setsockopt(socket.SOL_SOCKET, force, receive_buffer)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind(sockaddr)
    except OSError as error:
        sock.close()
        hint = " (another process uses it)" if error.errno == errno.EADDRINUSE else ""
        raise StartupError(
            f"cannot listen for statsd on {address}: {error.strerror}{hint}"
        ) from None
    sock.setblocking(False)
    return sock, sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


class StatsdListener:
    """The component that receives StatsD datagrams (and TCP lines) into a :class:`StatsdIngest`."""

    def __init__(self, config: StatsdConfig, ingest: StatsdIngest) -> None:
        self._config = config
        self.ingest = ingest
        self.receive_buffer = 0
        self.udp_address: tuple[str, int] | None = None
        self.tcp_address: tuple[str, int] | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._tcp_server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock, self.receive_buffer = open_udp_socket(
            self._config.listen, int(self._config.receive_buffer)
        )
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _DatagramProtocol(self.ingest), sock=sock
        )
        self.udp_address = sock.getsockname()[:2]
        logger.info(
            "statsd listening on udp %s; asked for a %d-byte receive buffer, kernel granted %d",
            self._config.listen,
            int(self._config.receive_buffer),
            self.receive_buffer,
        )
        if self._config.tcp_listen is not None:
            host, port = split_host_port(self._config.tcp_listen)
            try:
                self._tcp_server = await asyncio.start_server(
                    self._serve_connection, host, port, limit=_MAX_TCP_LINE
                )
            except OSError as error:
                self._transport.close()
                raise StartupError(
                    f"cannot listen for statsd on tcp {self._config.tcp_listen}: {error.strerror}"
                ) from None
            self.tcp_address = self._tcp_server.sockets[0].getsockname()[:2]
            logger.info("statsd listening on tcp %s", self._config.tcp_listen)

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
            for task in list(self._connections):
                task.cancel()
            await self._tcp_server.wait_closed()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as error:
                    if error.partial:
                        self.ingest.handle_datagram(error.partial)
                    return
                except asyncio.LimitOverrunError:
                    # A line longer than any StatsD client writes: count it and hang up, as
                    # the rest of the stream can no longer be split reliably.
                    self.ingest.count_rejected("line_too_long")
                    return
                self.ingest.handle_datagram(line)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()


class StatsdCollector(Collector):
    """``sidecar_statsd_datagrams_total`` and the receive buffer the kernel granted."""

    def __init__(self, listener: StatsdListener) -> None:
        self._listener = listener

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            "sidecar_statsd_datagrams",
            "StatsD datagrams (and TCP lines) received.",
            value=self._listener.ingest.datagrams,
        )
        yield GaugeMetricFamily(
            "sidecar_statsd_receive_buffer_bytes",
            "Receive buffer of the StatsD UDP socket as the kernel reports it.",
            value=self._listener.receive_buffer,
        )
