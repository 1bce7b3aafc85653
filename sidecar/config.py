"""The whole configuration file as one typed model, and the loader that reads it.

Every part of the sidecar owns the model of its own section; this module assembles them, reads
YAML and the environment (``SIDECAR_CONFIG``; nothing else here reads ``os.environ`` for
configuration), and turns validation failures into messages that name the field.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from sidecar.alerts.config import AlertsConfig
from sidecar.errors import ConfigError
from sidecar.fields import Duration, ListenAddress, Secret, Section
from sidecar.health.config import HealthConfig
from sidecar.metrics.config import MetricsConfig
from sidecar.metrics.ingest_config import IngestConfig
from sidecar.telemetry.config import TelemetryConfig

CONFIG_ENV = "SIDECAR_CONFIG"
MAX_CONFIG_BYTES = 4 * 1024 * 1024


class ServerConfig(Section):
    listen: ListenAddress = "127.0.0.1:9464"
    """Address of the HTTP server (`/metrics`, probes, alert webhook). A non-loopback address
    such as `0.0.0.0:9464` is needed inside a pod."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level of log lines written to standard error."""

    log_format: Literal["text", "json"] = "text"
    """`text` for a terminal, `json` (one object per line) for a log pipeline."""

    access_log: bool = False
    """Log one line per HTTP request (off: probes and scrapes would drown everything else)."""

    shutdown_delay: Duration = 0.0
    """After SIGTERM, keep serving this long with readiness failing (liveness still passing),
    so that Kubernetes takes the pod out of its Service before the listeners close. Set it a
    little above the readiness probe's `periodSeconds × failureThreshold`."""

    shutdown_timeout: Duration = 10.0
    """How long requests in flight may take to finish once the listeners are closed."""


class Config(Section):
    """The sidecar's configuration file. Every key is optional; an empty file is valid."""

    server: ServerConfig = ServerConfig()
    """HTTP server, logging and shutdown."""

    metrics: MetricsConfig = MetricsConfig()
    """Host and process metrics."""

    health: HealthConfig = HealthConfig()
    """Health checks behind `/livez`, `/readyz` and `/healthz`."""

    ingest: IngestConfig = IngestConfig()
    """Application metrics received over StatsD and OTLP/HTTP."""

    alerts: AlertsConfig = AlertsConfig()
    """Alertmanager webhook receiver, durable outbox, routing and delivery."""

    # Validated even when absent from the file: the OTEL_* environment variables fill it.
    telemetry: TelemetryConfig = Field(default_factory=dict, validate_default=True)
    """OpenTelemetry push of metrics and alert-pipeline traces over OTLP/HTTP."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration file, at a field path such as ``server.listen``."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


def format_location(location: Sequence[int | str]) -> str:
    """Write a pydantic error location as a field path: ``health.checks[2].timeout``."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif str(part).startswith("tag:"):
            # Discriminated unions add their tag to the location; the user never wrote it.
            continue
        else:
            path += f".{part}" if path else str(part)
    return path


def problems_of(error: ValidationError) -> list[Problem]:
    """Turn every error of a validation failure into a problem naming its field."""
    problems = []
    for detail in error.errors(include_url=False, include_input=False):
        message = detail["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(prefix)
        if detail["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(Problem(format_location(detail["loc"]), message))
    return problems


def parse_config(
    data: Any, *, environ: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> Config:
    """Validate an already parsed document; raise ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem("", "the file must hold a mapping of sections")])
    context = {"environ": os.environ if environ is None else environ, "base_dir": base_dir}
    try:
        return Config.model_validate(data, context=context)
    except ValidationError as error:
        raise ConfigError(problems_of(error)) from None


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load the file at ``path`` (or ``$SIDECAR_CONFIG``), or the embedded defaults if neither.

    ``overrides`` (from command-line flags) are merged over the file, section by section, and
    validated with it.
    """
    environ = os.environ if environ is None else environ
    if path is None:
        path = environ.get(CONFIG_ENV) or None
    if path is None:
        return parse_config(_merge({}, overrides), environ=environ)

    path = Path(path)
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError([Problem("", f"cannot read {path}: {error.strerror}")]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([Problem("", f"{path} is larger than {MAX_CONFIG_BYTES} bytes")])
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(
            [Problem("", f"{path} is not valid YAML: {_yaml_reason(error)}")]
        ) from None
    if data is not None and not isinstance(data, dict):
        return parse_config(data, environ=environ, base_dir=path.parent)
    return parse_config(_merge(data or {}, overrides), environ=environ, base_dir=path.parent)


def _merge(data: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    merged = dict(data)
    for key, value in (overrides or {}).items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, dict):
            merged[key] = _merge(current, value)
        else:
            merged[key] = value
    return merged


def _yaml_reason(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is None:
        return problem
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def secrets_of(config: Config) -> Iterator[Secret]:
    """Every secret value in the configuration, for the log redaction filter."""
    return config.secrets()
