"""The metric names that the shipped alert rules and dashboards use, and those /metrics serves.

Shared by the deployment tests, and a script: ``python -m tests.deploy_names`` lists every
name the rules and dashboards use and marks those that the sidecar's exposition (built from the
configuration of this checkout) does not serve.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
ALERT_RULES = REPO / "alert_rules"
DASHBOARDS = REPO / "dashboards"

# Series that Prometheus itself writes for every target; no exporter serves them.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

# What Grafana substitutes before it sends a query; a fixed stand-in of the same kind is
# enough to parse and check the expression.
GRAFANA_MACROS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${__rate_interval}": "5m",
    "${__interval}": "1m",
    "${__range}": "1h",
}
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<expr>.+),\s*)?(?P<label>\w+)\)$")

# Suffixes a family's samples carry, by family type, in the text format.
_SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


def substitute_macros(expression: str) -> str:
    """Replace Grafana's interval macros and template variables with plain values."""
    for macro, value in GRAFANA_MACROS.items():
        expression = expression.replace(macro, value)
    # A variable only ever stands inside a label matcher's string in our dashboards.
    return _VARIABLE.sub(lambda match: f"variable_{match.group(1)}", expression)


def variable_query_expression(query: str) -> str | None:
    """The PromQL inside a ``label_values(expr, label)`` variable query, if it has one."""
    match = _LABEL_VALUES.match(query.strip())
    if match is None:
        return query
    return match.group("expr")


def metric_names(expression: str) -> set[str]:
    """Every metric name a PromQL expression selects; raises ValueError if it does not parse."""
    tree = promql_parser.parse(expression)
    names: set[str] = set()
    _collect_names(tree, names)
    return names


def _collect_names(node: Any, names: set[str]) -> None:
    if isinstance(node, promql_parser.VectorSelector):
        if node.name:
            names.add(node.name)
        names.update(
            matcher.value for matcher in node.matchers.matchers if matcher.name == "__name__"
        )
    elif isinstance(node, promql_parser.MatrixSelector):
        _collect_names(node.vector_selector, names)
    elif isinstance(node, promql_parser.BinaryExpr):
        _collect_names(node.lhs, names)
        _collect_names(node.rhs, names)
    elif isinstance(node, promql_parser.AggregateExpr):
        _collect_names(node.expr, names)
        if node.param is not None:
            _collect_names(node.param, names)
    elif isinstance(node, promql_parser.Call):
        for argument in node.args:
            _collect_names(argument, names)
    elif isinstance(
        node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr
    ):
        _collect_names(node.expr, names)


def load_rule_groups() -> list[dict[str, Any]]:
    """Every rule group of every rule file in ``alert_rules/``."""
    groups: list[dict[str, Any]] = []
    for path in sorted(ALERT_RULES.glob("*.rules.yaml")):
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    return groups


def rule_expressions() -> dict[str, str]:
    """Alert (or recording rule) name to its expression."""
    expressions = {}
    for group in load_rule_groups():
        for rule in group["rules"]:
            expressions[rule.get("alert") or rule["record"]] = rule["expr"]
    return expressions


def load_dashboards() -> dict[str, dict[str, Any]]:
    """Every committed dashboard, by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panels_of(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel of a dashboard, rows included and panels inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions() -> dict[str, str]:
    """``file / panel title / refId`` (or ``file / $variable``) to its PromQL, macros replaced."""
    expressions = {}
    for name, dashboard in load_dashboards().items():
        for panel in panels_of(dashboard):
            for target in panel.get("targets", []):
                key = f"{name} / {panel.get('title')} / {target.get('refId')}"
                expressions[key] = substitute_macros(target["expr"])
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") != "query":
                continue
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            expression = variable_query_expression(text)
            if expression is not None:
                expressions[f"{name} / ${variable['name']}"] = substitute_macros(expression)
    return expressions


def used_names() -> dict[str, set[str]]:
    """Metric name to the rules and dashboard queries that use it."""
    users: dict[str, set[str]] = {}
    for source in (rule_expressions(), dashboard_expressions()):
        for key, expression in source.items():
            for name in metric_names(expression):
                users.setdefault(name, set()).add(key)
    return users


def exposed_names(exposition: str) -> set[str]:
    """Every family and sample name an exposition declares, even a family with no series yet.

    A labelled counter or histogram with no child still writes its ``# TYPE`` line, so the
    names come from the families and their types rather than from the samples seen.
    """
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        for suffix in _SAMPLE_SUFFIXES.get(family.type, ()):
            names.add(family.name + suffix)
        names.update(sample.name for sample in family.samples)
    return names


async def render_exposition(config: Mapping[str, Any]) -> str:
    """Start a ``Sidecar`` built from ``config`` in process and return its ``/metrics`` text."""
    import httpx

    from sidecar.app import Sidecar
    from sidecar.config import parse_config

    sidecar = Sidecar(parse_config(dict(config)))
    async with sidecar.running():
        transport = httpx.ASGITransport(app=sidecar.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
            response = await client.get("/metrics")
            response.raise_for_status()
            return response.text


def missing_names(exposition: str) -> dict[str, set[str]]:
    """Names used by rules or dashboards that the exposition does not declare, with users."""
    exposed = exposed_names(exposition) | PROMETHEUS_SERIES
    return {name: users for name, users in used_names().items() if name not in exposed}


def main() -> int:
    """Print every used name, marking those missing from the default exposition."""
    exposition = asyncio.run(render_exposition({}))
    exposed = exposed_names(exposition) | PROMETHEUS_SERIES
    missing = 0
    for name, users in sorted(used_names().items()):
        mark = "ok     " if name in exposed else "MISSING"
        missing += name not in exposed
        print(f"{mark} {name}  ({len(users)} uses)")
    print(f"{missing} of {len(used_names())} names are not in this build's exposition")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
