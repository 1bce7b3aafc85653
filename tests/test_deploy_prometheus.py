"""The dashboards' queries return data from a real Prometheus scraping a real sidecar.

Parsing proves a query is well formed; this proves its matchers, groupings and joins fit the
series the sidecar really writes: every dashboard query whose metrics have series in the
sidecar's exposition must return a result once Prometheus has scraped it a few times. The same
sidecar watches a process that does not exist, and the alert rule for it must select it.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy_names import (
    dashboard_expressions,
    load_dashboards,
    metric_names,
    panels_of,
    rule_expressions,
)
from tests.harness import PrometheusServer, SidecarProcess, wait_until

pytestmark = pytest.mark.integration

# Scrapes come every second here; ten seconds holds enough samples for rate().
RATE_WINDOW = "10s"


@pytest.fixture(scope="module")
def scraped_sidecar(
    prometheus: PrometheusServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SidecarProcess, str]]:
    """A sidecar subprocess that the session's Prometheus scrapes; yields it and its instance.

    The tests only read from it, so one sidecar serves the whole module.
    """
    tmp_path = tmp_path_factory.mktemp("scraped-sidecar")
    # A target that matches no process, for the alert rule that watches targets.
    ghost = {"name": "ghost", "process_name": "no-such-process-here"}
    sidecar = SidecarProcess(tmp_path, {"metrics": {"process": {"targets": [ghost]}}}).start()
    instance = f"127.0.0.1:{sidecar.port}"
    name = f"deploy-dashboards-{sidecar.port}"
    prometheus.scrape(name, sidecar.url)
    try:
        wait_until(
            lambda: bool(
                prometheus.query(
                    f'rate(sidecar_host_cpu_seconds_total{{instance="{instance}"}}[{RATE_WINDOW}])'
                )
            ),
            timeout=60,
            what="two scrapes of the sidecar",
        )
        yield sidecar, instance
    finally:
        (prometheus.targets_dir / f"{name}.json").unlink(missing_ok=True)
        sidecar.stop()


def names_with_series(exposition: str) -> set[str]:
    return {
        sample.name
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def concrete(expression: str, instance: str) -> str:
    """A dashboard query as Grafana would send it for this one sidecar."""
    expression = expression.replace("$__rate_interval", RATE_WINDOW)
    expression = expression.replace('job=~"$job"', 'job=~".+"')
    return expression.replace('instance=~"$instance"', f'instance=~"{instance}"')


def raw_dashboard_queries() -> dict[str, str]:
    """Panel queries before any substitution, keyed like ``dashboard_expressions``."""
    queries = {}
    for name, dashboard in load_dashboards().items():
        for panel in panels_of(dashboard):
            for target in panel.get("targets", []):
                queries[f"{name} / {panel.get('title')} / {target.get('refId')}"] = target["expr"]
    return queries


def test_dashboard_queries_return_data_for_a_scraped_sidecar(
    prometheus: PrometheusServer, scraped_sidecar: tuple[SidecarProcess, str]
) -> None:
    sidecar, instance = scraped_sidecar
    with_series = names_with_series(httpx.get(sidecar.url + "/metrics", timeout=10).text)
    parsed = dashboard_expressions()
    checked = []
    empty = []

    for key, expression in raw_dashboard_queries().items():
        if not metric_names(parsed[key]) <= with_series | {"up"}:
            continue  # a metric with no series here: the name test covers it
        checked.append(key)
        if not prometheus.query(concrete(expression, instance)):
            empty.append(f"{key}: {concrete(expression, instance)}")

    assert len(checked) >= 25, checked
    assert empty == []


def test_version_variable_query_finds_the_scraped_sidecar(
    prometheus: PrometheusServer, scraped_sidecar: tuple[SidecarProcess, str]
) -> None:
    _, instance = scraped_sidecar

    result = prometheus.query(f'sidecar_build_info{{instance="{instance}"}}')

    assert [series["metric"]["job"] for series in result] == ["tests"]
    assert result[0]["metric"]["version"]


def test_target_process_alert_selects_a_missing_process(
    prometheus: PrometheusServer, scraped_sidecar: tuple[SidecarProcess, str]
) -> None:
    _, instance = scraped_sidecar
    expression = rule_expressions()["SidecarTargetProcessDown"]

    result = prometheus.query(expression)

    ours = [series["metric"] for series in result if series["metric"]["instance"] == instance]
    assert [labels["target"] for labels in ours] == ["ghost"]
