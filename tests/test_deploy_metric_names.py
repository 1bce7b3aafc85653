"""Every metric name the shipped alert rules and dashboards use is one the sidecar exports.

The names are read from a live ``/metrics`` of a ``Sidecar`` built with every part enabled, so
a renamed metric breaks this test instead of silently emptying a panel or muting an alert. The
paths the Helm chart probes and scrapes are checked the same way, against the same sidecar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helm_python import Chart

from sidecar.app import Sidecar
from sidecar.config import Config, parse_config
from tests.deploy_names import (
    PROMETHEUS_SERIES,
    REPO,
    exposed_names,
    missing_names,
    render_exposition,
    used_names,
)

# The configuration that turns on every part. With no file the sidecar already runs the health
# checks, the receiver and its outbox, the log notifier, StatsD and OTLP ingest; the sections
# below turn on what needs a setting.
EVERY_PART: dict[str, Any] = {
    # A Discord destination beside the default log one, so that the notifier families exist.
    # Nothing is sent: no alert reaches the receiver during the test.
    "alerts": {
        "destinations": [
            {"kind": "log", "name": "log"},
            {
                "kind": "discord",
                "name": "ops",
                "webhook_url": "https://discord.com/api/webhooks/123456789012345678/not-a-real-token-0123456789",
            },
        ],
    },
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


def chart_http_paths() -> set[str]:
    """The paths the chart's probes and ServiceMonitor call on the sidecar's HTTP port."""
    rendered = Chart.load(REPO / "helm" / "sidecar").render(
        {"serviceMonitor": {"enabled": True}}, name="obs", namespace="monitoring"
    )
    paths = set()
    for template, text in rendered.items():
        if template.endswith("NOTES.txt"):
            continue
        for manifest in yaml.safe_load_all(text):
            if not manifest:
                continue
            if manifest["kind"] == "Deployment":
                (container,) = manifest["spec"]["template"]["spec"]["containers"]
                for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                    paths.add(container[probe]["httpGet"]["path"])
            if manifest["kind"] == "ServiceMonitor":
                paths.update(endpoint["path"] for endpoint in manifest["spec"]["endpoints"])
    return paths


async def test_paths_the_chart_probes_and_scrapes_are_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config, unknown_sections = every_part_config()
    paths = chart_http_paths()
    sidecar = Sidecar(parse_config(config))

    async with sidecar.running():
        transport = httpx.ASGITransport(app=sidecar.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
            statuses = {path: (await client.get(path)).status_code for path in sorted(paths)}

    assert {"/livez", "/readyz", "/metrics"} <= paths
    unserved = sorted(path for path, status in statuses.items() if status in {404, 405})
    assert unserved == [], (
        f"the chart calls paths the sidecar does not serve: {unserved} "
        f"(sections this build does not know yet: {unknown_sections})"
    )
