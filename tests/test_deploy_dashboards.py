"""The shipped Grafana dashboards: generated, well formed, and made of valid PromQL."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import promql_parser
import pytest
import yaml

from tests.deploy_names import (
    DASHBOARDS,
    REPO,
    dashboard_expressions,
    load_dashboards,
    panels_of,
    substitute_macros,
)
from tests.harness import require_tool

CHART_DASHBOARDS = REPO / "helm" / "sidecar" / "files" / "dashboards"
EXPECTED_UIDS = {
    "sidecar-overview",
    "sidecar-alert-pipeline",
    "sidecar-ingest",
    "sidecar-resources",
}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASHBOARDS / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up by name while they are created.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict[str, Any]]:
    return load_dashboards()


def test_committed_dashboards_are_what_the_generator_writes() -> None:
    rendered = load_generator().render()

    assert sorted(rendered) == sorted(path.name for path in DASHBOARDS.glob("*.json"))
    for name, text in rendered.items():
        assert (DASHBOARDS / name).read_text() == text, f"{name} is stale: run generate.py"
        assert (CHART_DASHBOARDS / name).read_text() == text, f"chart copy of {name} is stale"


def test_uids_titles_and_tags_are_stable(dashboards: dict[str, dict[str, Any]]) -> None:
    uids = {dashboard["uid"] for dashboard in dashboards.values()}

    assert uids == EXPECTED_UIDS
    for name, dashboard in dashboards.items():
        assert name == f"{dashboard['uid']}.json"
        assert dashboard["title"].startswith("Sidecar / ")
        assert "sidecar" in dashboard["tags"]
        assert isinstance(dashboard["schemaVersion"], int)


def test_panels_have_unique_ids_and_non_overlapping_positions(
    dashboards: dict[str, dict[str, Any]],
) -> None:
    for name, dashboard in dashboards.items():
        ids = [panel["id"] for panel in panels_of(dashboard)]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        assert all(isinstance(panel_id, int) and panel_id > 0 for panel_id in ids), name

        occupied: set[tuple[int, int]] = set()
        for panel in panels_of(dashboard):
            grid = panel["gridPos"]
            assert {"h", "w", "x", "y"} <= set(grid), f"{name}: {panel['title']}"
            assert grid["w"] > 0
            assert grid["h"] > 0
            assert grid["x"] >= 0
            assert grid["x"] + grid["w"] <= 24, f"{name}: {panel['title']} is too wide"
            cells = {
                (column, row)
                for column in range(grid["x"], grid["x"] + grid["w"])
                for row in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not cells & occupied, f"{name}: {panel['title']} overlaps another panel"
            occupied |= cells


def data_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return (panel for panel in panels_of(dashboard) if panel["type"] != "row")


def test_every_panel_has_queries_with_unique_ref_ids_and_a_unit(
    dashboards: dict[str, dict[str, Any]],
) -> None:
    for name, dashboard in dashboards.items():
        for panel in data_panels(dashboard):
            where = f"{name}: {panel['title']}"
            assert panel["type"] in {"timeseries", "stat"}, where
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert ref_ids, f"{where} has no query"
            assert len(ref_ids) == len(set(ref_ids)), f"{where}: duplicate refId"
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{where} has no unit"
            assert panel.get("description"), f"{where} has no description"


def datasource_references(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasource_references(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_references(item)


def test_no_datasource_uid_is_hard_coded(dashboards: dict[str, dict[str, Any]]) -> None:
    for name, dashboard in dashboards.items():
        references = list(datasource_references(dashboard))
        assert references, name
        assert all(reference == DATASOURCE for reference in references), name
        for panel in data_panels(dashboard):
            assert panel["datasource"] == DATASOURCE
            assert all(target["datasource"] == DATASOURCE for target in panel["targets"])


def test_datasource_job_and_instance_variables(dashboards: dict[str, dict[str, Any]]) -> None:
    for name, dashboard in dashboards.items():
        variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}

        assert variables["datasource"]["type"] == "datasource", name
        assert variables["datasource"]["query"] == "prometheus", name
        assert variables["job"]["type"] == "query", name
        assert variables["instance"]["type"] == "query", name
        assert '$job"' in variables["instance"]["query"], "instance must follow the job choice"
        for panel in data_panels(dashboard):
            for target in panel["targets"]:
                assert 'job=~"$job"' in target["expr"], f"{name}: {panel['title']}"
                assert 'instance=~"$instance"' in target["expr"], f"{name}: {panel['title']}"


def test_macros_and_variables_are_substituted_before_parsing() -> None:
    text = 'rate(a{job=~"$job"}[$__rate_interval]) / ${__interval}'

    assert substitute_macros(text) == 'rate(a{job=~"variable_job"}[5m]) / 1m'


def test_every_expression_parses() -> None:
    expressions = dashboard_expressions()

    assert len(expressions) > 50
    for key, expression in expressions.items():
        try:
            promql_parser.parse(expression)
        except Exception as error:  # the parser raises plain exceptions with its reason
            pytest.fail(f"{key}: {expression!r} does not parse: {error}")


def promtool_check(expressions: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``promtool check rules`` on the expressions wrapped as recording rules."""
    rules = [
        {"record": f"dashboard:expression{index}:check", "expr": expression}
        for index, expression in enumerate(expressions)
    ]
    path = tmp_path / "dashboard-expressions.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    return subprocess.run(
        [require_tool("promtool"), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_prometheus_accepts_every_expression(tmp_path: Path) -> None:
    expressions = sorted(set(dashboard_expressions().values()))

    result = promtool_check(expressions, tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in result.stdout


def test_the_promtool_check_rejects_an_expression_prometheus_does_not_know(
    tmp_path: Path,
) -> None:
    # promql-parser knows functions newer than the shipped Prometheus; promtool must catch them.
    result = promtool_check(['sort_by_label(up, "job")'], tmp_path)

    assert result.returncode != 0
