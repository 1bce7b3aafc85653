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
import sys
import time
from collections.abc import Iterable, Sequence

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
# Python's socket module does not export SO_RCVBUFFORCE; this is its value on Linux.
_LINUX_SO_RCVBUFFORCE = 33 if sys.platform == "linux" else None
_UDP_READ_SIZE = 65535
_DRAIN_LIMIT = 256


class _Target:
    """What lines with one name and one text after the value mean: a series and how to apply."""

    __slots__ = ("factor", "kind", "scale", "series")

    def __init__(self, series: Series, kind: int, factor: float, scale: float) -> None:
        self.series = series
        self.kind = kind  # _COUNTER, _GAUGE or _OBSERVER
        self.factor = factor  # 1 / sample rate
        self.scale = scale  # 0.001 for `ms`, so that timers are observed in seconds


_COUNTER, _GAUGE, _OBSERVER = 0, 1, 2
_KIND_CODES = {COUNTER: _COUNTER, GAUGE: _GAUGE, HISTOGRAM: _OBSERVER}
_INF = math.inf


class StatsdIngest:
    """Parses StatsD lines and applies them to the store.

    Calls come from one thread (the event loop); the store lock is held per batch of
    datagrams, so a scrape sees whole datagrams.
    """

    def __init__(
        self,
        store: Store,
        stats: IngestStats,
        mapper: Mapper,
        timer_buckets: Iterable[float],
    ) -> None:
        self._store = store
        self._mapper = mapper
        self._timer_buckets = tuple(timer_buckets)
        # (name, text after the value) -> target. Resolving costs parsing the type, rate and
        # tags, decoding, mapping and a store lookup; a hit costs one dict lookup. Lines with a
        # DogStatsD timestamp miss every time (the timestamp is part of the key) but still work.
        self._resolved: dict[tuple[bytes, bytes], _Target] = {}
        self.datagrams = 0
        self.accepted = 0
        self.rejected: dict[str, int] = {}
        self.rejected_total = 0
        stats.add_reader("statsd", self._counts)

    def _counts(self) -> tuple[int, dict[str, int]]:
        return self.accepted, dict(self.rejected)

    def handle_datagram(self, data: bytes) -> None:
        """Apply every line of one datagram; count what was applied and what was rejected."""
        self.handle_batch((data,))

    def handle_batch(self, datagrams: Sequence[bytes]) -> None:
        """Apply every line of several datagrams under one acquisition of the store lock."""
        accepted = 0
        now = time.monotonic()
        resolved = self._resolved
        with self._store.lock:
            for data in datagrams:
                for line in data.split(b"\n"):
                    if not line:
                        continue
                    name, separator, rest = line.partition(b":")
                    value_text, _, tail = rest.partition(b"|")
                    target = resolved.get((name, tail))
                    if target is None or not target.series.alive:
                        found = self._resolve_line(name, separator, tail)
                        if isinstance(found, str):
                            self._reject(line, found)
                            continue
                        target = found
                    try:
                        value = float(value_text)
                    except ValueError:
                        self._reject(line, "invalid_value")
                        continue
                    series = target.series
                    kind = target.kind
                    if kind == _COUNTER:
                        if not 0.0 <= value < _INF:
                            self._reject(line, "invalid_value")
                            continue
                        series.value += value * target.factor
                    elif kind == _GAUGE:
                        sign = value_text[:1]
                        if sign == b"+" or sign == b"-":
                            series.value += value
                        else:
                            series.value = value
                    else:
                        if value != value:  # NaN cannot be placed in a bucket
                            self._reject(line, "invalid_value")
                            continue
                        series.observe(value * target.scale, target.factor)
                    series.updated = now
                    accepted += 1
        self.datagrams += len(datagrams)
        self.accepted += accepted

    def count_rejected(self, reason: str) -> None:
        """Count input rejected before it became a line (a TCP line past the length limit)."""
        self.rejected_total += 1
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def _reject(self, line: bytes, reason: str) -> None:
        self.count_rejected(reason)
        count = self.rejected_total
        # The first few and then one in a thousand: enough to debug, never a flood.
        if (count <= 10 or count % 1000 == 0) and logger.isEnabledFor(logging.DEBUG):
            logger.debug("rejected statsd line (%s): %r", reason, line[:200])

    def _resolve_line(self, name: bytes, separator: bytes, tail: bytes) -> _Target | str:
        if not separator or not name:
            return "malformed"
        fields = tail.split(b"|")
        type_text = fields[0].strip()
        if not type_text:
            return "malformed"
        rate = 1.0
        tags = b""
        for extra in fields[1:]:
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
        found = self._resolve(name, type_text, tags)
        if isinstance(found, str):
            return found
        series, in_milliseconds = found
        kind = _KIND_CODES[series.family.kind]
        target = _Target(series, kind, 1.0 / rate, 0.001 if in_milliseconds else 1.0)
        if len(self._resolved) >= _RESOLVED_CACHE_SIZE:
            self._resolved.clear()
        self._resolved[(name, tail)] = target
        return target

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
        return series, type_text == b"ms"


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
            force = getattr(socket, "SO_RCVBUFFORCE", _LINUX_SO_RCVBUFFORCE)
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
        self._socket: socket.socket | None = None
        self._tcp_server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock, self.receive_buffer = open_udp_socket(
            self._config.listen, int(self._config.receive_buffer)
        )
        self._socket = sock
        # A reader callback that drains the socket handles a burst of datagrams per wake-up
        # and per store-lock acquisition; a datagram protocol pays both for every datagram.
        loop.add_reader(sock.fileno(), self._drain)
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
                self._close_udp()
                raise StartupError(
                    f"cannot listen for statsd on tcp {self._config.tcp_listen}: {error.strerror}"
                ) from None
            self.tcp_address = self._tcp_server.sockets[0].getsockname()[:2]
            logger.info("statsd listening on tcp %s", self._config.tcp_listen)

    def _drain(self) -> None:
        assert self._socket is not None
        receive = self._socket.recv
        batch: list[bytes] = []
        try:
            # Bounded, so that a flood cannot starve the HTTP listeners on the same loop.
            for _ in range(_DRAIN_LIMIT):
                batch.append(receive(_UDP_READ_SIZE))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as error:
            logger.warning("statsd socket error: %s", error)
        if batch:
            self.ingest.handle_batch(batch)

    def _close_udp(self) -> None:
        if self._socket is not None:
            asyncio.get_running_loop().remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None

    async def stop(self) -> None:
        self._close_udp()
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
