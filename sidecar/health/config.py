"""Configuration of the health checks: one model per check kind, told apart by ``kind``.

The kinds form a discriminated union. Its tags are written ``tag:<kind>`` so that error paths
read ``health.checks[2].timeout`` (the config loader drops ``tag:`` segments); an unknown or
missing ``kind`` is reported on the ``kind`` field itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
    with_config,
)
from typing_extensions import TypedDict

from sidecar.fields import Duration, Secret, Section, Size, split_host_port
from sidecar.metrics.config import ProcessSelector

CHECK_NAME = r"^[A-Za-z0-9_.-]{1,64}$"
OUTBOX_CHECK = "outbox"
"""The alert outbox's built-in readiness check."""

BUILTIN_NAMES = frozenset({"event_loop", "shutdown"})
"""Checks the runner itself owns."""

RESERVED_NAMES = BUILTIN_NAMES | {OUTBOX_CHECK}
"""Names configured checks may not take: the runner's own and those other parts add."""
"""Names the sidecar's own checks use; configured checks may not take them."""

ProbeName = Literal["liveness", "readiness"]


class CheckConfig(Section):
    """What every check kind shares: its schedule, thresholds and the probes it belongs to."""

    kind: str
    """What the check does: `http`, `tcp`, `redis`, `disk`, `memory`, `process`, `command`."""

    name: Annotated[str, Field(pattern=CHECK_NAME)]
    """Unique name of the check: shown in probe output, `sidecar check` and the `check` label."""

    interval: Duration = 10.0
    """Time between the starts of two runs."""

    timeout: Duration = 2.0
    """A run that takes longer is cancelled and counts as failed; shorter than `interval`."""

    initial_delay: Duration = 0.0
    """Wait this long after start-up before the first run (a start-up grace for a slow
    dependency). Until its first result a check counts as failing for readiness and as passing
    for liveness."""

    failure_threshold: Annotated[int, Field(ge=1, le=100)] = 1
    """Consecutive failed runs needed before a passing check is reported as failing."""

    success_threshold: Annotated[int, Field(ge=1, le=100)] = 1
    """Consecutive passing runs needed before a failing check is reported as passing."""

    critical: bool = True
    """A failing critical check fails its probes (503); a non-critical one only warns (200)."""

    probes: list[ProbeName] = Field(default_factory=lambda: ["readiness"])  # type: ignore[arg-type]
    """Probes the check belongs to. Dependencies belong in `readiness` only: a liveness
    failure restarts the container, which cannot repair a dependency."""

    @field_validator("interval")
    @classmethod
    def _positive_interval(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be longer than 0s")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout_below_interval(cls, value: float, info: ValidationInfo) -> float:
        if value <= 0:
            raise ValueError("must be longer than 0s")
        interval = info.data.get("interval")
        if interval is not None and value >= interval:
            raise ValueError("must be shorter than interval")
        return value

    @field_validator("probes")
    @classmethod
    def _distinct_probes(cls, value: list[ProbeName]) -> list[ProbeName]:
        if not value:
            raise ValueError("must name liveness, readiness or both")
        if len(set(value)) != len(value):
            raise ValueError("names a probe twice")
        return value


class HttpCheck(CheckConfig):
    """An HTTP request that passes on an expected status (and body)."""

    kind: Literal["http"]
    """Selects this kind of check."""

    url: str
    """`http://` or `https://` URL to request."""

    method: Literal["GET", "HEAD", "POST", "PUT", "OPTIONS"] = "GET"
    """HTTP method."""

    headers: dict[str, str] = Field(default_factory=dict)
    """Request headers. They are never logged; keep credentials out of them where you can."""

    expected_status: list[Annotated[int, Field(ge=100, le=599)]] = Field(default_factory=list)
    """Status codes that pass; empty means any 2xx."""

    body_contains: str | None = None
    """Text the response body must contain (only the first 64 KiB are read)."""

    body_regex: re.Pattern[str] | None = None
    """Regular expression the response body must match somewhere (first 64 KiB)."""

    tls_verify: bool = True
    """Verify the server certificate of an `https://` URL."""

    ca_file: Path | None = None
    """PEM file of certificate authorities to trust instead of the system ones."""

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        import httpx

        try:
            url = httpx.URL(value)
        except (httpx.InvalidURL, TypeError) as error:
            raise ValueError(f"is not a valid URL: {error}") from None
        if url.scheme not in ("http", "https"):
            raise ValueError("must start with http:// or https://")
        if not url.host:
            raise ValueError("must name a host")
        return value

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"{name!r} is not a valid header name")
            if any(char in text for char in "\r\n\0"):
                raise ValueError(f"value of {name!r} contains a line break or NUL")
        return value


class TcpCheck(CheckConfig):
    """A TCP connection that passes when it is accepted."""

    kind: Literal["tcp"]
    """Selects this kind of check."""

    address: str
    """`host:port` to connect to."""

    @field_validator("address")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        _, port = split_host_port(value)
        if port == 0:
            raise ValueError("port must not be 0")
        return value


class RedisCheck(CheckConfig):
    """A Redis PING (and optionally a key that must exist)."""

    kind: Literal["redis"]
    """Selects this kind of check."""

    url: str = "redis://127.0.0.1:6379/0"
    """`redis://` or `rediss://` URL, without the password."""

    password: Secret | None = None
    """Password (or `password_file`, `password_env`)."""

    key: str | None = None
    """A key that must exist, such as one the application writes when it is ready."""

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        if not re.match(r"^(redis|rediss|unix)://", value):
            raise ValueError("must start with redis://, rediss:// or unix://")
        if re.match(r"^[a-z]+://[^/@]*:[^/@]*@", value):
            raise ValueError("must not hold a password; set password_file or password_env")
        return value


class DiskCheck(CheckConfig):
    """Free space of the filesystem holding a path."""

    kind: Literal["disk"]
    """Selects this kind of check."""

    path: Path
    """Any path on the filesystem to watch."""

    warn_free_bytes: Size | None = None
    """Warn when fewer bytes than this are available."""

    fail_free_bytes: Size | None = None
    """Fail when fewer bytes than this are available."""

    warn_free_ratio: Annotated[float, Field(ge=0, le=1)] | None = None
    """Warn when the available share of the filesystem (0 to 1) falls below this."""

    fail_free_ratio: Annotated[float, Field(ge=0, le=1)] | None = 0.05
    """Fail when the available share of the filesystem (0 to 1) falls below this."""

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        _check_order(self.warn_free_bytes, self.fail_free_bytes, "free_bytes")
        _check_order(self.warn_free_ratio, self.fail_free_ratio, "free_ratio")
        return self


class MemoryCheck(CheckConfig):
    """Available memory of the host (or container, as the kernel reports it)."""

    kind: Literal["memory"]
    """Selects this kind of check."""

    warn_available_bytes: Size | None = None
    """Warn when less memory than this is available."""

    fail_available_bytes: Size | None = None
    """Fail when less memory than this is available."""

    warn_available_ratio: Annotated[float, Field(ge=0, le=1)] | None = 0.1
    """Warn when the available share of memory (0 to 1) falls below this."""

    fail_available_ratio: Annotated[float, Field(ge=0, le=1)] | None = 0.02
    """Fail when the available share of memory (0 to 1) falls below this."""

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        _check_order(self.warn_available_bytes, self.fail_available_bytes, "available_bytes")
        _check_order(self.warn_available_ratio, self.fail_available_ratio, "available_ratio")
        return self


class ProcessCheck(CheckConfig, ProcessSelector):
    """Processes chosen like the process metrics' targets; passes when enough are running."""

    kind: Literal["process"]
    """Selects this kind of check."""

    min_instances: Annotated[int, Field(ge=1)] = 1
    """Fewest matching processes that pass."""


class CommandCheck(CheckConfig):
    """A command (no shell) that passes on exit status 0, like a Kubernetes exec probe."""

    kind: Literal["command"]
    """Selects this kind of check."""

    command: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    """Program and arguments, such as `["pg_isready", "-q"]`."""

    output_limit: Size = 1024  # type: ignore[assignment]
    """Bytes of combined output kept for the failure reason; the rest is discarded."""


def _reject_kind(value: str) -> str:
    kinds = ", ".join(sorted(CHECK_KINDS))
    raise ValueError(f"unknown check kind {value!r}; expected one of {kinds}")


def _require_mapping(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ValueError("each check must be a mapping with a kind and a name")
    return value


@with_config(ConfigDict(extra="ignore"))
class _UnknownKind(TypedDict):
    """Stands in for an entry whose ``kind`` is missing or unknown, to report it on ``kind``.

    A TypedDict rather than a model, so that the configuration reference does not list it.
    """

    kind: Annotated[str, AfterValidator(_reject_kind)]


CHECK_KINDS: dict[str, type[CheckConfig]] = {
    "http": HttpCheck,
    "tcp": TcpCheck,
    "redis": RedisCheck,
    "disk": DiskCheck,
    "memory": MemoryCheck,
    "process": ProcessCheck,
    "command": CommandCheck,
}


def _kind_tag(value: Any) -> str:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return f"tag:{kind}" if isinstance(kind, str) and kind in CHECK_KINDS else "tag:unknown"


AnyCheck = Annotated[
    Annotated[HttpCheck, Tag("tag:http")]
    | Annotated[TcpCheck, Tag("tag:tcp")]
    | Annotated[RedisCheck, Tag("tag:redis")]
    | Annotated[DiskCheck, Tag("tag:disk")]
    | Annotated[MemoryCheck, Tag("tag:memory")]
    | Annotated[ProcessCheck, Tag("tag:process")]
    | Annotated[CommandCheck, Tag("tag:command")]
    | Annotated[_UnknownKind, BeforeValidator(_require_mapping), Tag("tag:unknown")],
    Discriminator(_kind_tag),
]


class EventLoopConfig(Section):
    """The built-in check of the sidecar's own event loop, part of liveness."""

    interval: Duration = 5.0
    """How often the check compares the worst lag of the last interval with the thresholds
    (the loop itself is sampled every 100ms)."""

    warn_lag: Duration = 0.1
    """Warn when the loop was late by more than this during the last interval."""

    fail_lag: Duration = 2.0
    """Fail when the loop was late by more than this during the last interval."""

    failure_threshold: Annotated[int, Field(ge=1, le=100)] = 3
    """Consecutive runs over `fail_lag` before liveness fails."""

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.fail_lag <= self.warn_lag:
            raise ValueError("fail_lag must be longer than warn_lag")
        return self


class HealthConfig(Section):
    show_reasons: bool = False
    """Show failure reasons in probe responses. Off by default, as kube-apiserver does: the
    reasons may describe internal hosts. They are always logged."""

    event_loop: EventLoopConfig = EventLoopConfig()
    """The built-in event-loop lag check."""

    checks: list[AnyCheck] = Field(default_factory=list)
    """Checks of the application and its dependencies, each with a `kind` (`http`, `tcp`,
    `redis`, `disk`, `memory`, `process`, `command`) and a unique `name`."""

    @field_validator("checks")
    @classmethod
    def _unique_names(cls, value: list[CheckConfig]) -> list[CheckConfig]:
        seen: dict[str, int] = {}
        for index, check in enumerate(value):
            if check.name in RESERVED_NAMES:
                raise ValueError(
                    f"name {check.name!r} of entry [{index}] is reserved for a built-in check"
                )
            if check.name in seen:
                first = seen[check.name]
                raise ValueError(
                    f"name {check.name!r} is used twice (entries [{first}] and [{index}])"
                )
            seen[check.name] = index
        return value

    def configured(self) -> list[CheckConfig]:
        """The checks typed as their common base (validation never lets an unknown kind in)."""
        return [check for check in self.checks if isinstance(check, CheckConfig)]


def _check_order(warn: float | None, fail: float | None, what: str) -> None:
    if warn is not None and fail is not None and warn < fail:
        raise ValueError(f"warn_{what} must not be below fail_{what}")
