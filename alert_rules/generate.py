"""Write ``alert_rules/sidecar.rules.yaml``, the Prometheus alerting rules shipped with sidecar.

Run ``python alert_rules/generate.py`` after changing a threshold or an alert, and commit the
YAML it writes (here and in the Helm chart's ``files/``); a test fails when the committed file
differs from what this script produces.
Every threshold lives in ``THRESHOLDS`` below, so a description can never promise a number that
its expression does not test: both are written from the same value.

Conventions (those of the node-mixin): PascalCase alert names prefixed with ``Sidecar``,
``warning``/``critical`` pairs where a harder threshold deserves a page, ``for:`` on every
alert, a static ``summary``, a templated ``description`` and a ``runbook_url`` pointing to the
matching section of ``docs/runbooks.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

OUTPUT = Path(__file__).resolve().parent / "sidecar.rules.yaml"
# The chart can only read files inside itself, so it carries a copy for its PrometheusRule.
CHART_COPY = OUTPUT.parent.parent / "helm" / "sidecar" / "files" / "alert_rules" / OUTPUT.name

# Where docs/runbooks.md of this repository is published; a fork changes this one line (the
# Helm chart can also replace it when it installs the rules as a PrometheusRule).
RUNBOOK_URL = "https://github.com/sidecar/sidecar/blob/main/docs/runbooks.md"

# Selects the sidecar's scrape jobs for `up`, the only series Prometheus itself writes. Every
# other series is named `sidecar_*` and needs no selector.
JOB_SELECTOR = 'job=~".*sidecar.*"'

# Labels every aggregation keeps, so that an alert names the pod it comes from.
BY = "namespace, job, instance"

# Every threshold, in the unit the alert's description states it in. Percentages are written
# as 0 to 100, ages in seconds, horizons in hours.
THRESHOLDS: dict[str, float] = {
    # Memory: available memory as a percentage of the total.
    "memory_available_warning_percent": 10,
    "memory_available_critical_percent": 5,
    # Filesystems: space left (percent) below which a linear prediction is taken seriously,
    # and how far ahead (hours) it must predict zero.
    "filesystem_warning_avail_percent": 40,
    "filesystem_warning_horizon_hours": 24,
    "filesystem_critical_avail_percent": 20,
    "filesystem_critical_horizon_hours": 4,
    # Notifications: share of deliveries (percent) that did not succeed, per destination.
    "delivery_failure_warning_percent": 10,
    "delivery_failure_critical_percent": 50,
    # Outbox: pending notifications as a percentage of the configured limit.
    "outbox_depth_warning_percent": 80,
    "outbox_depth_critical_percent": 95,
    # Outbox: age (seconds) of the oldest notification not yet delivered.
    "outbox_age_warning_seconds": 600,
    "outbox_age_critical_seconds": 3600,
    # Discord: rate-limit (429) answers in the last 10 minutes, per destination.
    "discord_rate_limited_per_10m": 5,
    # Ingest: share (percent) of StatsD/OTLP samples rejected.
    "ingest_rejected_percent": 5,
    # Application series: current series as a percentage of the total cap.
    "series_warning_percent": 80,
    "series_critical_percent": 95,
}


def threshold(name: str) -> str:
    """A threshold as PromQL and prose write it (no trailing ``.0``)."""
    return f"{THRESHOLDS[name]:g}"


def runbook(alert: str) -> str:
    """The runbook section of an alert: GitHub anchors are the lower-cased heading."""
    return f"{RUNBOOK_URL}#{alert.lower()}"


def alert(
    name: str,
    expr: str,
    duration: str,
    severity: str,
    summary: str,
    description: str,
) -> dict[str, Any]:
    """One alerting rule in the shape Prometheus reads."""
    return {
        "alert": name,
        "expr": expr,
        "for": duration,
        "labels": {"severity": severity},
        "annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": runbook(name),
        },
    }


def sidecar_rules() -> list[dict[str, Any]]:
    """The sidecar itself: reachable, scraping, ready, healthy."""
    return [
        alert(
            "SidecarDown",
            f"up{{{JOB_SELECTOR}}} == 0",
            "5m",
            "critical",
            "Prometheus cannot scrape a sidecar.",
            "Prometheus has failed to scrape {{ $labels.job }} on {{ $labels.instance }} "
            "(up == 0) for more than 5 minutes.",
        ),
        alert(
            "SidecarScrapeErrors",
            "sidecar_scrape_collector_success == 0",
            "15m",
            "warning",
            "A sidecar metrics collector is failing.",
            "Collector {{ $labels.collector }} of {{ $labels.instance }} has failed every "
            "scrape (success == 0) for more than 15 minutes; its metrics are missing.",
        ),
        alert(
            "SidecarNotReady",
            'sidecar_health_probe_up{probe="readyz"} == 0',
            "5m",
            "warning",
            "A sidecar reports its application not ready.",
            "The readiness probe /readyz of {{ $labels.instance }} has been failing "
            "(probe up == 0) for more than 5 minutes.",
        ),
        alert(
            "SidecarCriticalCheckFailing",
            'sidecar_health_check_status{critical="true", status="fail"} == 1',
            "5m",
            "critical",
            "A critical health check is failing.",
            "Critical check {{ $labels.check }} ({{ $labels.kind }}) of {{ $labels.instance }} "
            "has been failing (fail == 1) for more than 5 minutes.",
        ),
        alert(
            "SidecarCheckFailing",
            'sidecar_health_check_status{critical="false", status="fail"} == 1',
            "15m",
            "warning",
            "A non-critical health check is failing.",
            "Check {{ $labels.check }} ({{ $labels.kind }}) of {{ $labels.instance }} has "
            "been failing (fail == 1) for more than 15 minutes.",
        ),
    ]


def _delivery_failure_expr(percent: str) -> str:
    deliveries = "sidecar_alerts_deliveries_total"
    failed = f'sum by ({BY}, destination) (rate({deliveries}{{result!="success"}}[10m]))'
    total = f"sum by ({BY}, destination) (rate(sidecar_alerts_deliveries_total[10m]))"
    return f"100 * {failed} / ({total} > 0) > {percent}"


def _outbox_depth_expr(percent: str) -> str:
    return f"100 * sidecar_alerts_outbox_depth / (sidecar_alerts_outbox_limit > 0) > {percent}"


def alert_pipeline_rules() -> list[dict[str, Any]]:
    """Alert delivery: failures, backlog, dead letters, Discord rate limiting."""
    warning_failure = threshold("delivery_failure_warning_percent")
    critical_failure = threshold("delivery_failure_critical_percent")
    warning_depth = threshold("outbox_depth_warning_percent")
    critical_depth = threshold("outbox_depth_critical_percent")
    warning_age = threshold("outbox_age_warning_seconds")
    critical_age = threshold("outbox_age_critical_seconds")
    limited = threshold("discord_rate_limited_per_10m")
    return [
        alert(
            "SidecarNotificationsFailing",
            _delivery_failure_expr(warning_failure),
            "15m",
            "warning",
            "Notifications to a destination are failing.",
            "{{ $value | humanize }}% of deliveries to {{ $labels.destination }} from "
            f"{{{{ $labels.instance }}}} did not succeed in the last 10 minutes (threshold "
            f"{warning_failure}%).",
        ),
        alert(
            "SidecarNotificationsFailingCritical",
            _delivery_failure_expr(critical_failure),
            "10m",
            "critical",
            "Most notifications to a destination are failing.",
            "{{ $value | humanize }}% of deliveries to {{ $labels.destination }} from "
            f"{{{{ $labels.instance }}}} did not succeed in the last 10 minutes (threshold "
            f"{critical_failure}%).",
        ),
        alert(
            "SidecarOutboxBacklog",
            _outbox_depth_expr(warning_depth),
            "15m",
            "warning",
            "The sidecar's outbox is filling up.",
            "The outbox of {{ $labels.instance }} is {{ $value | humanize }}% full "
            f"(threshold {warning_depth}%); new notifications are refused when it is full.",
        ),
        alert(
            "SidecarOutboxBacklogCritical",
            _outbox_depth_expr(critical_depth),
            "5m",
            "critical",
            "The sidecar's outbox is almost full.",
            "The outbox of {{ $labels.instance }} is {{ $value | humanize }}% full "
            f"(threshold {critical_depth}%); new notifications are refused when it is full.",
        ),
        alert(
            "SidecarOutboxOldestPending",
            f"sidecar_alerts_outbox_oldest_age_seconds > {warning_age}",
            "5m",
            "warning",
            "A notification has been waiting long for delivery.",
            "The oldest pending notification of {{ $labels.instance }} is "
            f"{{{{ $value | humanizeDuration }}}} old (threshold {warning_age} seconds).",
        ),
        alert(
            "SidecarOutboxOldestPendingCritical",
            f"sidecar_alerts_outbox_oldest_age_seconds > {critical_age}",
            "5m",
            "critical",
            "A notification has been waiting very long for delivery.",
            "The oldest pending notification of {{ $labels.instance }} is "
            f"{{{{ $value | humanizeDuration }}}} old (threshold {critical_age} seconds).",
        ),
        alert(
            "SidecarDeadLetters",
            "sidecar_alerts_dead_letters > 0",
            "1m",
            "warning",
            "Notifications were given up and kept as dead letters.",
            "{{ $labels.instance }} holds {{ $value | humanize }} dead letters (threshold 0): "
            "notifications that exhausted their retries and were not delivered.",
        ),
        alert(
            "SidecarDiscordRateLimited",
            f"sum by ({BY}, destination) "
            f"(increase(sidecar_discord_rate_limited_total[10m])) > {limited}",
            "5m",
            "warning",
            "Discord is rate limiting the sidecar.",
            "Discord answered 429 {{ $value | humanize }} times in 10 minutes to "
            f"{{{{ $labels.destination }}}} from {{{{ $labels.instance }}}} (threshold {limited}).",
        ),
    ]


def ingest_rules() -> list[dict[str, Any]]:
    """Application metrics: rejected samples and the series cap."""
    rejected = threshold("ingest_rejected_percent")
    warning_series = threshold("series_warning_percent")
    critical_series = threshold("series_critical_percent")
    rejects = f"sum by ({BY}, source) (rate(sidecar_ingest_rejected_samples_total[10m]))"
    accepted = f"sum by ({BY}, source) (rate(sidecar_ingest_samples_total[10m]))"
    series = "100 * sidecar_app_series / (sidecar_app_series_limit > 0)"
    return [
        alert(
            "SidecarIngestRejects",
            f"100 * {rejects} / (({rejects} + {accepted}) > 0) > {rejected}",
            "15m",
            "warning",
            "The sidecar rejects application samples.",
            "{{ $value | humanize }}% of {{ $labels.source }} samples sent to "
            f"{{{{ $labels.instance }}}} were rejected in the last 10 minutes (threshold "
            f"{rejected}%).",
        ),
        alert(
            "SidecarSeriesLimitNear",
            f"{series} > {warning_series}",
            "15m",
            "warning",
            "Application series are nearing the limit.",
            "{{ $labels.instance }} holds {{ $value | humanize }}% of its application series "
            f"limit (threshold {warning_series}%); new series are dropped at the limit.",
        ),
        alert(
            "SidecarSeriesLimitNearCritical",
            f"{series} > {critical_series}",
            "5m",
            "critical",
            "Application series are at the limit.",
            "{{ $labels.instance }} holds {{ $value | humanize }}% of its application series "
            f"limit (threshold {critical_series}%); new series are dropped at the limit.",
        ),
    ]


def _filesystem_expr(percent: str, hours: str) -> str:
    avail = "sidecar_host_filesystem_avail_bytes"
    size = "sidecar_host_filesystem_size_bytes"
    return (
        f"(100 * {avail} / {size} < {percent}"
        f" and predict_linear({avail}[6h], {hours} * 3600) < 0"
        " and sidecar_host_filesystem_readonly == 0)"
    )


def host_rules() -> list[dict[str, Any]]:
    """The host and the processes the sidecar watches."""
    warning_avail = threshold("filesystem_warning_avail_percent")
    warning_hours = threshold("filesystem_warning_horizon_hours")
    critical_avail = threshold("filesystem_critical_avail_percent")
    critical_hours = threshold("filesystem_critical_horizon_hours")
    warning_memory = threshold("memory_available_warning_percent")
    critical_memory = threshold("memory_available_critical_percent")
    memory = "100 * sidecar_host_memory_available_bytes / sidecar_host_memory_total_bytes"
    return [
        alert(
            "SidecarHostFilesystemPredictedFull",
            _filesystem_expr(warning_avail, warning_hours),
            "1h",
            "warning",
            "A filesystem is predicted to run out of space within a day.",
            "Filesystem {{ $labels.mountpoint }} ({{ $labels.device }}) on "
            "{{ $labels.instance }} has {{ $value | humanize }}% space left (threshold "
            f"{warning_avail}%) and is predicted to fill within {warning_hours} hours.",
        ),
        alert(
            "SidecarHostFilesystemPredictedFullCritical",
            _filesystem_expr(critical_avail, critical_hours),
            "1h",
            "critical",
            "A filesystem is predicted to run out of space within hours.",
            "Filesystem {{ $labels.mountpoint }} ({{ $labels.device }}) on "
            "{{ $labels.instance }} has {{ $value | humanize }}% space left (threshold "
            f"{critical_avail}%) and is predicted to fill within {critical_hours} hours.",
        ),
        alert(
            "SidecarHostMemoryLow",
            f"{memory} < {warning_memory}",
            "15m",
            "warning",
            "The host is running low on memory.",
            "{{ $labels.instance }} has {{ $value | humanize }}% of its memory available "
            f"(threshold {warning_memory}%).",
        ),
        alert(
            "SidecarHostMemoryLowCritical",
            f"{memory} < {critical_memory}",
            "5m",
            "critical",
            "The host is almost out of memory.",
            "{{ $labels.instance }} has {{ $value | humanize }}% of its memory available "
            f"(threshold {critical_memory}%).",
        ),
        alert(
            "SidecarTargetProcessDown",
            'sidecar_process_instances{target!="self"} == 0',
            "5m",
            "critical",
            "A watched process is not running.",
            "No process matches target {{ $labels.target }} on {{ $labels.instance }} "
            "(instances == 0) for more than 5 minutes.",
        ),
    ]


def rule_file() -> dict[str, Any]:
    """The whole rule file: one group per area, as Prometheus and PrometheusRule read it."""
    return {
        "groups": [
            {"name": "sidecar", "rules": sidecar_rules()},
            {"name": "sidecar-alert-pipeline", "rules": alert_pipeline_rules()},
            {"name": "sidecar-ingest", "rules": ingest_rules()},
            {"name": "sidecar-host", "rules": host_rules()},
        ]
    }


HEADER = (
    "# Prometheus alerting rules for sidecar.\n"
    "# Generated by alert_rules/generate.py from its THRESHOLDS; edit that file, not this one.\n"
)


def render() -> str:
    """The rule file's text, stable from run to run."""
    body = yaml.safe_dump(rule_file(), sort_keys=False, width=1000, allow_unicode=True)
    return HEADER + body


def main() -> int:
    """Write the rule file and the chart's copy; with ``--check``, only compare them."""
    text = render()
    stale = []
    for path in (OUTPUT, CHART_COPY):
        if "--check" in sys.argv[1:]:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for path in stale:
        print(f"{path} is out of date: run python alert_rules/generate.py")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
