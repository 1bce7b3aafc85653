"""The shipped alert rules: valid for Prometheus, unit tested, and saying what they test."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import promql_parser
import pytest
import yaml

from tests.deploy_names import ALERT_RULES, REPO, load_rule_groups
from tests.harness import require_tool

RULE_FILE = ALERT_RULES / "sidecar.rules.yaml"
UNIT_TESTS = sorted((ALERT_RULES / "tests").glob("*.test.yaml"))
RUNBOOKS = REPO / "docs" / "runbooks.md"
COMPARISONS = {">", "<", ">=", "<=", "==", "!="}


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "alert_rules_generate", ALERT_RULES / "generate.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alerts() -> list[dict[str, Any]]:
    return [rule for group in load_rule_groups() for rule in group["rules"] if "alert" in rule]


def promtool_test(unit_test_dir: Path) -> subprocess.CompletedProcess[str]:
    files = sorted(str(path) for path in unit_test_dir.glob("*.test.yaml"))
    return subprocess.run(
        [require_tool("promtool"), "test", "rules", *files],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_rule_file_is_what_the_generator_writes() -> None:
    generator = load_generator()

    assert RULE_FILE.read_text() == generator.render(), (
        "alert_rules/sidecar.rules.yaml is stale: run python alert_rules/generate.py"
    )


def test_promtool_accepts_the_rule_file() -> None:
    result = subprocess.run(
        [require_tool("promtool"), "check", "rules", str(RULE_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool_test(ALERT_RULES / "tests")

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(UNIT_TESTS)


def test_every_alert_follows_the_conventions() -> None:
    names = [rule["alert"] for rule in alerts()]

    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in alerts():
        name = rule["alert"]
        assert re.fullmatch(r"Sidecar(?:[A-Z][a-z0-9]*)+", name), name
        assert rule.get("for"), f"{name} has no for:"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert "{{" not in annotations["summary"], f"{name}: the summary must be static"
        assert "{{" in annotations["description"], f"{name}: the description is not templated"


def test_every_alert_has_a_unit_test_that_sees_it_pending_then_firing() -> None:
    cases: dict[str, list[dict[str, Any]]] = {}
    for path in UNIT_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test["alert_rule_test"]:
                cases.setdefault(case["alertname"], []).append(case)

    for rule in alerts():
        name = rule["alert"]
        firing = [case for case in cases.get(name, []) if case["exp_alerts"]]
        quiet = [case for case in cases.get(name, []) if not case["exp_alerts"]]
        assert firing, f"no unit test sees {name} fire"
        assert quiet, f"no unit test sees {name} quiet"
        for case in firing:
            for expected in case["exp_alerts"]:
                assert expected["exp_labels"]["severity"] == rule["labels"]["severity"], name
                assert set(expected["exp_annotations"]) == set(rule["annotations"]), name


def test_unit_tests_fail_when_an_alert_waits_a_minute_longer(tmp_path: Path) -> None:
    # Every unit test checks the evaluation one minute before `for:` elapses and the one at
    # which it does, so delaying every alert by a minute must break every test file.
    rules = yaml.safe_load(RULE_FILE.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            minutes = promql_parser.parse_duration(rule["for"]).total_seconds() / 60
            rule["for"] = f"{int(minutes) + 1}m"
    mutated = copy_unit_tests(tmp_path, yaml.safe_dump(rules, sort_keys=False))

    result = promtool_test(mutated)

    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("FAILED") == len(UNIT_TESTS), output


# How to move each threshold by a quarter towards firing. The unit tests hold series just on
# the quiet side of every threshold, so each move must make one of them fire.
TOWARDS_FIRING = {
    "memory_available_warning_percent": 1.25,
    "memory_available_critical_percent": 1.25,
    "filesystem_warning_avail_percent": 1.25,
    "filesystem_warning_horizon_hours": 1.25,
    "filesystem_critical_avail_percent": 1.25,
    "filesystem_critical_horizon_hours": 1.25,
    "delivery_failure_warning_percent": 0.75,
    "delivery_failure_critical_percent": 0.75,
    "outbox_depth_warning_percent": 0.75,
    "outbox_depth_critical_percent": 0.75,
    "outbox_age_warning_seconds": 0.75,
    "outbox_age_critical_seconds": 0.75,
    "discord_rate_limited_per_10m": 0.75,
    "ingest_rejected_percent": 0.75,
    "series_warning_percent": 0.75,
    "series_critical_percent": 0.75,
}


def test_every_threshold_is_covered_by_a_mutation() -> None:
    assert set(TOWARDS_FIRING) == set(load_generator().THRESHOLDS)


@pytest.mark.parametrize("threshold", sorted(TOWARDS_FIRING))
def test_unit_tests_catch_a_threshold_moved_towards_firing(
    threshold: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = load_generator()
    moved = dict(generator.THRESHOLDS)
    moved[threshold] = generator.THRESHOLDS[threshold] * TOWARDS_FIRING[threshold]
    monkeypatch.setattr(generator, "THRESHOLDS", moved)
    mutated = copy_unit_tests(tmp_path, generator.render())

    result = promtool_test(mutated)

    assert result.returncode != 0, f"no unit test noticed {threshold} moved to {moved[threshold]}"


def copy_unit_tests(tmp_path: Path, rule_text: str) -> Path:
    """The unit tests in a temporary tree whose rule file is ``rule_text``."""
    (tmp_path / "sidecar.rules.yaml").write_text(rule_text)
    tests = tmp_path / "tests"
    shutil.copytree(ALERT_RULES / "tests", tests)
    return tests


def comparison_thresholds(node: Any) -> list[float]:
    """The numbers an expression compares against, through ``and``/``or``/``unless``."""
    if isinstance(node, promql_parser.ParenExpr):
        return comparison_thresholds(node.expr)
    if not isinstance(node, promql_parser.BinaryExpr):
        return []
    operator = str(node.op)
    if operator in {"and", "or", "unless"}:
        return comparison_thresholds(node.lhs) + comparison_thresholds(node.rhs)
    if operator in COMPARISONS and isinstance(node.rhs, promql_parser.NumberLiteral):
        return [node.rhs.val]
    return []


def prediction_horizons_hours(node: Any) -> list[float]:
    """The horizons, in hours, of every ``predict_linear`` in an expression."""
    found: list[float] = []
    if isinstance(node, promql_parser.Call) and node.func.name == "predict_linear":
        found.append(evaluate_number(node.args[1]) / 3600)
    for child in children(node):
        found.extend(prediction_horizons_hours(child))
    return found


def evaluate_number(node: Any) -> float:
    if isinstance(node, promql_parser.NumberLiteral):
        return float(node.val)
    if isinstance(node, promql_parser.ParenExpr):
        return evaluate_number(node.expr)
    assert isinstance(node, promql_parser.BinaryExpr), node
    assert str(node.op) == "*", node
    return evaluate_number(node.lhs) * evaluate_number(node.rhs)


def children(node: Any) -> list[Any]:
    if isinstance(node, promql_parser.BinaryExpr):
        return [node.lhs, node.rhs]
    if isinstance(node, promql_parser.Call):
        return list(node.args)
    if isinstance(node, promql_parser.AggregateExpr | promql_parser.ParenExpr):
        return [node.expr]
    return []


def stated(number: float) -> str:
    return f"{number:g}"


def test_each_description_states_the_thresholds_its_expression_tests() -> None:
    for rule in alerts():
        name = rule["alert"]
        expression = promql_parser.parse(rule["expr"])
        description = rule["annotations"]["description"]
        numbers = re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", description)

        thresholds = comparison_thresholds(expression)
        assert thresholds, f"{name} compares against no number"
        # The first comparison is the alert's own threshold; later ones (a read-only flag,
        # a prediction below zero) are conditions the description words out.
        assert stated(thresholds[0]) in numbers, (
            f"{name}: the description does not state the threshold {stated(thresholds[0])}"
        )
        for hours in prediction_horizons_hours(expression):
            assert f"within {stated(hours)} hours" in description, name
        minutes = re.search(r"for more than (\d+) minutes", description)
        if minutes:
            assert f"{minutes.group(1)}m" == rule["for"], f"{name}: for: and text disagree"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def runbook_anchors() -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", RUNBOOKS.read_text(), flags=re.MULTILINE)
    return {github_anchor(heading) for heading in headings}


def test_every_runbook_url_resolves_to_a_section_of_the_runbooks() -> None:
    anchors = runbook_anchors()
    generator = load_generator()

    for rule in alerts():
        url = rule["annotations"]["runbook_url"]
        base, _, anchor = url.partition("#")
        assert base == generator.RUNBOOK_URL
        assert base.endswith("/docs/runbooks.md")
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in docs/runbooks.md"


def test_every_runbook_section_belongs_to_an_alert() -> None:
    sections = set(re.findall(r"^## (\S+)$", RUNBOOKS.read_text(), flags=re.MULTILINE))

    assert sections == {rule["alert"] for rule in alerts()}


def test_runbook_links_between_sections_resolve() -> None:
    anchors = runbook_anchors()
    links = re.findall(r"\]\(#([^)]+)\)", RUNBOOKS.read_text())

    assert links
    assert set(links) <= anchors
