"""Configuration of application-metric ingest: the shared store, StatsD and OTLP/HTTP."""

from __future__ import annotations

import re
from typing import Annotated, Literal, Self

from pydantic import Field, field_validator, model_validator

from sidecar.fields import Duration, ListenAddress, Section, Size

# statsd_exporter's default timer buckets, in seconds.
DEFAULT_TIMER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

METRIC_NAME = r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"
LABEL_NAME = r"^[a-zA-Z_][a-zA-Z0-9_]*$"
# A mapped name may hold `$1` / `${1}` references to the captures of the match.
MAPPED_NAME = r"^[a-zA-Z_:$][a-zA-Z0-9_:${}]*$"


class StoreConfig(Section):
    ttl: Duration = 600.0
    """Remove a series that received no sample for this long (`0` keeps series forever). A
    StatsD mapping may set its own."""

    max_series: Annotated[int, Field(ge=1)] = 100_000
    """Most series the store holds in total; samples for new series beyond it are dropped and
    counted in `sidecar_app_series_dropped_total{reason="total_limit"}`."""

    max_series_per_family: Annotated[int, Field(ge=1)] = 10_000
    """Most series one metric family holds; beyond it new series are dropped and counted with
    `reason="family_limit"`. Existing series keep being updated."""


def _check_buckets(buckets: list[float] | None) -> list[float] | None:
    if buckets is None:
        return None
    if not buckets:
        raise ValueError("buckets must not be empty")
    if any(b != b for b in buckets):
        raise ValueError("buckets must be numbers, not NaN")
    if sorted(set(buckets)) != list(buckets):
        raise ValueError("buckets must be strictly increasing")
    return buckets


class StatsdMapping(Section):
    match: Annotated[str, Field(min_length=1)]
    """The StatsD name to match: a glob where each `*` matches one or more characters other
    than `.` (captured as `$1`, `$2`, ...), or a regular expression with `match_type: regex`
    (matched against the whole name; groups are `$1`, ...)."""

    match_type: Literal["glob", "regex"] = "glob"
    """How `match` is read."""

    match_metric_type: Literal["counter", "gauge", "observer"] | None = None
    """Only match lines of this kind (`observer`: `ms`, `h` and `d`); any kind if unset."""

    action: Literal["map", "drop"] = "map"
    """`map` renames the metric; `drop` discards matching lines (counted as rejected with reason
    `mapping_drop`)."""

    name: Annotated[str, Field(pattern=MAPPED_NAME)] | None = None
    """Prometheus metric name, with `$1`-style references to captures. Required for `map`."""

    labels: dict[Annotated[str, Field(pattern=LABEL_NAME)], str] = Field(default_factory=dict)
    """Labels to attach; values may use `$1`-style references. They override DogStatsD tags of
    the same name."""

    help: str | None = None
    """Help text of the family (a generic text when unset)."""

    ttl: Duration | None = None
    """Series of this mapping expire after this long without samples (`0`: never); the store's
    `ttl` when unset."""

    buckets: list[float] | None = None
    """Histogram buckets in seconds for timers of this mapping; `statsd.timer_buckets` when
    unset."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.action == "map" and self.name is None:
            raise ValueError("a mapping with action map needs a name")
        if self.match_type == "regex":
            try:
                re.compile(self.match)
            except re.error as error:
                raise ValueError(f"match is not a valid regular expression: {error}") from None
        elif not re.fullmatch(r"[a-zA-Z0-9_.*:-]+", self.match):
            raise ValueError("a glob may only hold letters, digits, '_', '-', ':', '.' and '*'")
        return self

    @field_validator("buckets")
    @classmethod
    def _buckets(cls, value: list[float] | None) -> list[float] | None:
        return _check_buckets(value)


class StatsdConfig(Section):
    enabled: bool = True
    """Receive StatsD and DogStatsD lines."""

    listen: ListenAddress = "127.0.0.1:8125"
    """UDP address to receive datagrams on."""

    tcp_listen: ListenAddress | None = None
    """Also accept newline-separated lines over TCP on this address (off when unset)."""

    receive_buffer: Size = 4 * 1024 * 1024  # type: ignore[assignment]
    """Socket receive buffer to ask the kernel for; bursts and slow scrapes are absorbed here
    instead of dropped. The size granted is logged and exported as
    `sidecar_statsd_receive_buffer_bytes`."""

    timer_buckets: list[float] = Field(default_factory=lambda: list(DEFAULT_TIMER_BUCKETS))
    """Histogram buckets (seconds) for `ms`, `h` and `d` lines without a mapping that sets
    them."""

    mappings: list[StatsdMapping] = Field(default_factory=list)
    """Rules applied in order; the first that matches a name decides it. Unmatched names are
    turned into valid Prometheus names (invalid characters become `_`)."""

    @field_validator("timer_buckets")
    @classmethod
    def _buckets(cls, value: list[float]) -> list[float]:
        _check_buckets(value)
        return value


class OtlpConfig(Section):
    enabled: bool = True
    """Receive OTLP/HTTP metrics at `POST /v1/metrics`."""

    listen: ListenAddress = "127.0.0.1:4318"
    """Address of the OTLP/HTTP listener (4318 is the OpenTelemetry default, so an application
    with the standard SDK settings needs no change)."""

    max_body_size: Size = 4 * 1024 * 1024  # type: ignore[assignment]
    """Largest request body accepted, both as sent and after gzip decompression; larger ones
    are answered 413."""

    max_in_flight: Annotated[int, Field(ge=1)] = 8
    """Requests handled at once; more are answered 503 with `Retry-After`."""

    exponential_histograms: Literal["convert", "reject"] = "convert"
    """`convert` turns cumulative exponential histograms into classic buckets at the
    exponential bucket boundaries; `reject` counts their points as rejected. Delta exponential
    histograms are always rejected."""


class IngestConfig(Section):
    store: StoreConfig = StoreConfig()
    """Limits and expiry of the application-metric store."""

    statsd: StatsdConfig = StatsdConfig()
    """The StatsD / DogStatsD listener."""

    otlp: OtlpConfig = OtlpConfig()
    """The OTLP/HTTP metrics receiver."""
