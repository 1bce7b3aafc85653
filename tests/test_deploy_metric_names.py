"""Every metric name the shipped alert rules and dashboards use is one the sidecar exports.

The names are read from a live ``/metrics`` of a ``Sidecar`` built with every part enabled, so
a renamed metric breaks this test instead of silently emptying a panel or muting an alert.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.config import Config
from tests.deploy_names import (
    PROMETHEUS_SERIES,
    exposed_names,
    missing_names,
    render_exposition,
    used_names,
)

# The configuration that turns on every part. With no file the sidecar already runs the health
# checks, the receiver and its outbox, the log notifier, StatsD and OTLP ingest; the sections
# below turn on what needs a setting.
EVERY_PART: dict[str, Any] = {
    # OpenTelemetry export only runs with an endpoint; nothing needs to listen there for the
    # export metrics to be declared.
    "telemetry": {"endpoint": "http://127.0.0.1:9/"},
}

# Metrics of the foundation (host, process, build, scrape): present in every build.
FOUNDATION_PREFIXES = (
    "sidecar_host_",
    "sidecar_process_",
    "sidecar_build_info",
    "sidecar_scrape_",
    "sidecar_collector_",
)


def every_part_config() -> tuple[dict[str, Any], list[str]]:
    """The sections of ``EVERY_PART`` this build knows, and the names of those it does not."""
    known = {key: value for key, value in EVERY_PART.items() if key in Config.model_fields}
    unknown = sorted(set(EVERY_PART) - set(known))
    return known, unknown


async def test_every_metric_name_used_exists_in_the_exposition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Default data directories (the outbox) are relative to the working directory.
    monkeypatch.chdir(tmp_path)
    config, unknown_sections = every_part_config()

    exposition = await render_exposition(config)
    missing = missing_names(exposition)

    if missing:
        lines = [
            f"  {name}  (used by {', '.join(sorted(users))})" for name, users in missing.items()
        ]
        note = (
            f"\nconfiguration sections this build does not know yet: {', '.join(unknown_sections)}"
            if unknown_sections
            else ""
        )
        pytest.fail(
            f"{len(missing)} metric names used by alert_rules/ or dashboards/ are not in the "
            "sidecar's exposition:\n" + "\n".join(sorted(lines)) + note
        )


async def test_foundation_metric_names_used_exist_in_the_exposition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    exposed = exposed_names(await render_exposition({})) | PROMETHEUS_SERIES
    foundation = {name for name in used_names() if name.startswith(FOUNDATION_PREFIXES)}

    assert len(foundation) >= 30
    assert sorted(foundation - exposed) == []
    assert "up" in used_names()


def test_exposed_names_include_families_without_series() -> None:
    exposition = (
        "# HELP sidecar_x_total Things.\n"
        "# TYPE sidecar_x_total counter\n"
        "# HELP sidecar_y_seconds Durations.\n"
        "# TYPE sidecar_y_seconds histogram\n"
        "# HELP sidecar_z Level.\n"
        "# TYPE sidecar_z gauge\n"
        "sidecar_z 1.0\n"
    )

    names = exposed_names(exposition)

    assert {"sidecar_x_total", "sidecar_y_seconds_bucket", "sidecar_y_seconds_count"} <= names
    assert "sidecar_z" in names
    assert "sidecar_w" not in names
