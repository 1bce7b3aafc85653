"""Write the Grafana dashboards shipped with sidecar, as JSON, from code.

Run ``python dashboards/generate.py`` after a change and commit the JSON it writes (here and in
``helm/sidecar/files/dashboards/``, from which the chart builds its ConfigMaps); a test fails
when the committed files differ from what this script produces.

Every dashboard has a ``datasource`` variable (so no datasource uid is written in), ``job`` and
``instance`` variables that every query filters on, a stable ``uid``, the ``sidecar`` tag, and
a unit on every panel.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as models

HERE = Path(__file__).resolve().parent
CHART_COPY = HERE.parent / "helm" / "sidecar" / "files" / "dashboards"

DATASOURCE = models.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every query is limited to the sidecars chosen in the job and instance variables.
SELECTOR = 'job=~"$job", instance=~"$instance"'
RATE = "$__rate_interval"
TAGS = ["sidecar"]
PANEL_HEIGHT = 8


def selector(extra: str = "") -> str:
    """The label matchers of a query: the variables, then ``extra``."""
    return "{" + SELECTOR + (", " + extra if extra else "") + "}"


def query(expression: str, legend: str, ref_id: str = "A") -> prometheus.Dataquery:
    """One PromQL query of a panel."""
    return (
        prometheus.Dataquery()
        .expr(expression)
        .legend_format(legend)
        .ref_id(ref_id)
        .datasource(DATASOURCE)
    )


def quantiles(histogram: str, by: str, labels: str = "") -> list[prometheus.Dataquery]:
    """p50, p90 and p99 of a histogram, one query each."""
    grouping = f"{by}, le" if by else "le"
    legend_prefix = "{{" + by + "}} " if by else ""
    return [
        query(
            f"histogram_quantile({q}, sum by ({grouping}) "
            f"(rate({histogram}_bucket{selector(labels)}[{RATE}])))",
            f"{legend_prefix}p{round(q * 100)}",
            ref_id,
        )
        for q, ref_id in ((0.5, "A"), (0.9, "B"), (0.99, "C"))
    ]


@dataclass
class Layout:
    """Places panels left to right in rows of 24 columns and numbers them."""

    builder: builders.Dashboard
    next_id: int = 1
    x: int = 0
    y: int = 0
    rows: list[str] = field(default_factory=list)

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y = 0, self.y + PANEL_HEIGHT
        grid = models.GridPos(h=1, w=24, x=0, y=self.y)
        self.builder.with_row(builders.Row(title).id(self._id()).grid_pos(grid))
        self.y += 1
        self.rows.append(title)

    def add(self, panel: timeseries.Panel | stat.Panel, width: int = 8) -> None:
        if self.x + width > 24:
            self.x, self.y = 0, self.y + PANEL_HEIGHT
        grid = models.GridPos(h=PANEL_HEIGHT, w=width, x=self.x, y=self.y)
        self.builder.with_panel(panel.id(self._id()).grid_pos(grid).datasource(DATASOURCE))
        self.x += width

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def graph(
    title: str, description: str, unit: str, *queries: prometheus.Dataquery
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI))
    )
    for target in queries:
        panel = panel.with_target(target)
    return panel


def single(
    title: str,
    description: str,
    unit: str,
    *queries: prometheus.Dataquery,
    text_mode: common.BigValueTextMode = common.BigValueTextMode.VALUE_AND_NAME,
) -> stat.Panel:
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        .text_mode(text_mode)
    )
    for target in queries:
        panel = panel.with_target(target)
    return panel


def new_dashboard(uid: str, title: str, description: str) -> Layout:
    """A dashboard with the variables every sidecar dashboard shares."""
    datasource = builders.DatasourceVariable("datasource").label("Data source").type("prometheus")
    job = (
        builders.QueryVariable("job")
        .label("Job")
        .datasource(DATASOURCE)
        .query("label_values(sidecar_build_info, job)")
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(models.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".+")
    )
    instance = (
        builders.QueryVariable("instance")
        .label("Instance")
        .datasource(DATASOURCE)
        .query('label_values(sidecar_build_info{job=~"$job"}, instance)')
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(models.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".+")
    )
    builder = (
        builders.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .editable()
        .timezone("browser")
        .time("now-6h", "now")
        .refresh("1m")
        .tooltip(models.DashboardCursorSync.CROSSHAIR)
        .with_variable(datasource)
        .with_variable(job)
        .with_variable(instance)
        .link(
            builders.DashboardLink("Sidecar dashboards")
            .type(models.DashboardLinkType.DASHBOARDS)
            .tags(TAGS)
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )
    return Layout(builder)


def overview() -> builders.Dashboard:
    layout = new_dashboard(
        "sidecar-overview",
        "Sidecar / Overview",
        "One sidecar at a glance: reachability, version, probes and health checks.",
    )
    layout.row("Sidecar")
    layout.add(
        single(
            "Up",
            "1 when Prometheus scrapes the sidecar.",
            "none",
            query(f"up{selector()}", "{{instance}}"),
        ),
        width=6,
    )
    layout.add(
        single(
            "Version",
            "Version of the running sidecar.",
            "none",
            query(f"sidecar_build_info{selector()}", "{{instance}} {{version}}"),
            text_mode=common.BigValueTextMode.NAME,
        ),
        width=6,
    )
    layout.add(
        single(
            "Uptime",
            "Time since the sidecar process started.",
            "s",
            query(
                "time() - sidecar_process_start_time_seconds" + selector('target="self"'),
                "{{instance}}",
            ),
        ),
        width=6,
    )
    layout.add(
        single(
            "Probes",
            "1 while /livez or /readyz passes, 0 while it fails.",
            "none",
            query(f"sidecar_health_probe_up{selector()}", "{{instance}} {{probe}}"),
        ),
        width=6,
    )
    layout.row("Health checks")
    layout.add(
        graph(
            "Check status",
            "Current status of each check (1 on the status it has).",
            "none",
            query(
                f"max by (check, status) (sidecar_health_check_status{selector()})",
                "{{check}} {{status}}",
            ),
        )
    )
    layout.add(
        graph(
            "Check failures",
            "Failed check runs per second, by reason.",
            "ops",
            query(
                f"sum by (check, reason) (rate(sidecar_health_check_failures_total"
                f"{selector()}[{RATE}]))",
                "{{check}} {{reason}}",
            ),
        )
    )
    layout.add(
        graph(
            "Check duration",
            "How long checks take to run.",
            "s",
            *quantiles("sidecar_health_check_duration_seconds", "check"),
        )
    )
    layout.add(
        graph(
            "Time since last success",
            "Seconds since each check last passed.",
            "s",
            query(
                f"time() - sidecar_health_check_last_success_timestamp_seconds{selector()}",
                "{{check}}",
            ),
        )
    )
    layout.add(
        graph(
            "Event loop lag",
            "Delay of the sidecar's event loop; high values delay everything.",
            "s",
            query(
                f"max by (instance) (sidecar_event_loop_lag_seconds{selector()})", "{{instance}}"
            ),
        )
    )
    layout.row("Scrapes")
    layout.add(
        graph(
            "Scrape duration",
            "Time to render /metrics.",
            "s",
            *quantiles("sidecar_scrape_duration_seconds", ""),
        )
    )
    layout.add(
        graph(
            "Collector success",
            "1 when a collector succeeded on the last scrape.",
            "none",
            query(
                f"min by (collector) (sidecar_scrape_collector_success{selector()})",
                "{{collector}}",
            ),
        )
    )
    layout.add(
        graph(
            "Collector errors",
            "Collector failures per second.",
            "ops",
            query(
                f"sum by (collector) (rate(sidecar_collector_errors_total{selector()}[{RATE}]))",
                "{{collector}}",
            ),
        )
    )
    return layout.builder


def alert_pipeline() -> builders.Dashboard:
    layout = new_dashboard(
        "sidecar-alert-pipeline",
        "Sidecar / Alert pipeline",
        "Notifications from Alertmanager to Discord and email: intake, outbox, delivery.",
    )
    layout.row("Intake")
    layout.add(
        graph(
            "Notifications received",
            "Webhook posts per second, by outcome.",
            "reqps",
            query(
                f"sum by (receiver, outcome) (rate(sidecar_alerts_received_total"
                f"{selector()}[{RATE}]))",
                "{{receiver}} {{outcome}}",
            ),
        ),
        width=12,
    )
    layout.add(
        graph(
            "Deduplicated",
            "Notifications dropped as duplicates, per second.",
            "ops",
            query(
                f"sum by (receiver) (rate(sidecar_alerts_deduplicated_total{selector()}[{RATE}]))",
                "{{receiver}}",
            ),
        ),
        width=12,
    )
    layout.row("Outbox")
    layout.add(
        graph(
            "Outbox depth",
            "Notifications waiting for delivery, and the limit.",
            "short",
            query(
                f"sum by (instance) (sidecar_alerts_outbox_depth{selector()})", "{{instance}} depth"
            ),
            query(
                f"sum by (instance) (sidecar_alerts_outbox_limit{selector()})",
                "{{instance}} limit",
                "B",
            ),
        )
    )
    layout.add(
        graph(
            "Oldest pending",
            "Age of the oldest notification not yet delivered.",
            "s",
            query(
                f"max by (instance) (sidecar_alerts_outbox_oldest_age_seconds{selector()})",
                "{{instance}}",
            ),
        )
    )
    layout.add(
        single(
            "Dead letters",
            "Notifications given up after their retries.",
            "short",
            query(f"sum(sidecar_alerts_dead_letters{selector()})", "dead letters"),
        )
    )
    layout.row("Delivery")
    layout.add(
        graph(
            "Deliveries",
            "Deliveries per second by destination and result.",
            "ops",
            query(
                f"sum by (destination, result) (rate(sidecar_alerts_deliveries_total"
                f"{selector()}[{RATE}]))",
                "{{destination}} {{result}}",
            ),
        )
    )
    layout.add(
        graph(
            "Failed deliveries",
            "Share of deliveries that did not succeed, by destination.",
            "percentunit",
            query(
                "sum by (destination) (rate(sidecar_alerts_deliveries_total"
                + selector('result!="success"')
                + f"[{RATE}])) / sum by (destination) "
                f"(rate(sidecar_alerts_deliveries_total{selector()}[{RATE}]))",
                "{{destination}}",
            ),
        )
    )
    layout.add(
        graph(
            "Delivery attempts",
            "Requests made to deliver, retries included, per second.",
            "ops",
            query(
                f"sum by (destination) (rate(sidecar_alerts_delivery_attempts_total"
                f"{selector()}[{RATE}]))",
                "{{destination}}",
            ),
        )
    )
    layout.add(
        graph(
            "Delivery latency",
            "From acceptance to delivery.",
            "s",
            *quantiles("sidecar_alerts_delivery_latency_seconds", "destination"),
        ),
        width=12,
    )
    layout.add(
        graph(
            "Notifier requests",
            "Requests to Discord and SMTP by answer code.",
            "reqps",
            query(
                f"sum by (destination, kind, code) (rate(sidecar_notifier_requests_total"
                f"{selector()}[{RATE}]))",
                "{{destination}} {{code}}",
            ),
        ),
        width=12,
    )
    layout.row("Discord")
    layout.add(
        graph(
            "Rate limited",
            "429 answers from Discord per second, by scope.",
            "reqps",
            query(
                f"sum by (destination, scope) (rate(sidecar_discord_rate_limited_total"
                f"{selector()}[{RATE}]))",
                "{{destination}} {{scope}}",
            ),
        )
    )
    layout.add(
        graph(
            "Time waiting",
            "Share of time spent waiting for a rate limit before sending.",
            "percentunit",
            query(
                f"sum by (destination) (rate(sidecar_discord_rate_limit_wait_seconds_total"
                f"{selector()}[{RATE}]))",
                "{{destination}}",
            ),
        )
    )
    layout.add(
        graph(
            "Messages",
            "Discord messages created and edited per second.",
            "ops",
            query(
                f"sum by (destination, action) (rate(sidecar_discord_messages_total"
                f"{selector()}[{RATE}]))",
                "{{destination}} {{action}}",
            ),
        )
    )
    return layout.builder


def ingest() -> builders.Dashboard:
    layout = new_dashboard(
        "sidecar-ingest",
        "Sidecar / Application metrics",
        "StatsD and OTLP intake, the series store against its limits, and OTLP export.",
    )
    layout.row("Intake")
    layout.add(
        graph(
            "Samples",
            "Samples accepted per second, by source.",
            "ops",
            query(
                f"sum by (source) (rate(sidecar_ingest_samples_total{selector()}[{RATE}]))",
                "{{source}}",
            ),
        )
    )
    layout.add(
        graph(
            "Rejected samples",
            "Samples rejected per second, by source and reason.",
            "ops",
            query(
                f"sum by (source, reason) (rate(sidecar_ingest_rejected_samples_total"
                f"{selector()}[{RATE}]))",
                "{{source}} {{reason}}",
            ),
        )
    )
    layout.add(
        graph(
            "StatsD datagrams and OTLP requests",
            "Datagrams and requests per second.",
            "reqps",
            query(
                f"sum(rate(sidecar_statsd_datagrams_total{selector()}[{RATE}]))", "statsd datagrams"
            ),
            query(
                f"sum by (code) (rate(sidecar_otlp_requests_total{selector()}[{RATE}]))",
                "otlp {{code}}",
                "B",
            ),
        )
    )
    layout.row("Series")
    layout.add(
        graph(
            "Series against the limit",
            "Series in the store and the total cap.",
            "short",
            query(f"sum by (instance) (sidecar_app_series{selector()})", "{{instance}} series"),
            query(
                f"sum by (instance) (sidecar_app_series_limit{selector()})",
                "{{instance}} limit",
                "B",
            ),
        )
    )
    layout.add(
        graph(
            "Series dropped",
            "New series refused per second, by the limit that refused them.",
            "ops",
            query(
                f"sum by (reason) (rate(sidecar_app_series_dropped_total{selector()}[{RATE}]))",
                "{{reason}}",
            ),
        )
    )
    layout.add(
        graph(
            "Series expired",
            "Series removed after their time to live, per second.",
            "ops",
            query(f"sum(rate(sidecar_app_series_expired_total{selector()}[{RATE}]))", "expired"),
        )
    )
    layout.row("OpenTelemetry export")
    layout.add(
        graph(
            "Exports",
            "OTLP exports per second by signal and result.",
            "ops",
            query(
                f"sum by (signal, result) (rate(sidecar_otel_exports_total{selector()}[{RATE}]))",
                "{{signal}} {{result}}",
            ),
        ),
        width=12,
    )
    layout.add(
        graph(
            "Export duration",
            "Time one export takes.",
            "s",
            *quantiles("sidecar_otel_export_duration_seconds", "signal"),
        ),
        width=12,
    )
    return layout.builder


def resources() -> builders.Dashboard:
    layout = new_dashboard(
        "sidecar-resources",
        "Sidecar / Host and processes",
        "The host the sidecar runs on and the processes it watches.",
    )
    layout.row("Host")
    layout.add(
        graph(
            "CPU",
            "CPU time used per second, by mode (1 = one core busy).",
            "short",
            query(
                "sum by (instance, mode) (rate(sidecar_host_cpu_seconds_total"
                + selector('mode!="idle"')
                + f"[{RATE}]))",
                "{{instance}} {{mode}}",
            ),
        )
    )
    layout.add(
        graph(
            "Load",
            "Load averages.",
            "short",
            query(f"sidecar_host_load1{selector()}", "{{instance}} 1m"),
            query(f"sidecar_host_load5{selector()}", "{{instance}} 5m", "B"),
            query(f"sidecar_host_load15{selector()}", "{{instance}} 15m", "C"),
        )
    )
    layout.add(
        graph(
            "Memory",
            "Available memory against the total, and swap in use.",
            "bytes",
            query(f"sidecar_host_memory_total_bytes{selector()}", "{{instance}} total"),
            query(
                f"sidecar_host_memory_available_bytes{selector()}", "{{instance}} available", "B"
            ),
            query(
                f"sidecar_host_swap_total_bytes{selector()} - sidecar_host_swap_free_bytes"
                f"{selector()}",
                "{{instance}} swap used",
                "C",
            ),
        )
    )
    layout.add(
        graph(
            "Filesystem space left",
            "Space available to unprivileged users, by mount.",
            "percentunit",
            query(
                f"sidecar_host_filesystem_avail_bytes{selector()} / "
                f"sidecar_host_filesystem_size_bytes{selector()}",
                "{{instance}} {{mountpoint}}",
            ),
        )
    )
    layout.add(
        graph(
            "Disk throughput",
            "Bytes read and written per second, by device.",
            "Bps",
            query(
                f"sum by (instance, device) (rate(sidecar_host_disk_read_bytes_total"
                f"{selector()}[{RATE}]))",
                "{{instance}} {{device}} read",
            ),
            query(
                f"sum by (instance, device) (rate(sidecar_host_disk_written_bytes_total"
                f"{selector()}[{RATE}]))",
                "{{instance}} {{device}} written",
                "B",
            ),
        )
    )
    layout.add(
        graph(
            "Disk busy",
            "Share of time each device had I/O in flight.",
            "percentunit",
            query(
                f"rate(sidecar_host_disk_io_time_seconds_total{selector()}[{RATE}])",
                "{{instance}} {{device}}",
            ),
        )
    )
    layout.add(
        graph(
            "Network throughput",
            "Bytes received and sent per second, by interface.",
            "Bps",
            query(
                f"rate(sidecar_host_network_receive_bytes_total{selector()}[{RATE}])",
                "{{instance}} {{device}} received",
            ),
            query(
                f"rate(sidecar_host_network_transmit_bytes_total{selector()}[{RATE}])",
                "{{instance}} {{device}} sent",
                "B",
            ),
        )
    )
    layout.add(
        graph(
            "Network errors and drops",
            "Packets in error or dropped per second.",
            "pps",
            query(
                f"rate(sidecar_host_network_receive_errs_total{selector()}[{RATE}]) + "
                f"rate(sidecar_host_network_transmit_errs_total{selector()}[{RATE}])",
                "{{instance}} {{device}} errors",
            ),
            query(
                f"rate(sidecar_host_network_receive_drop_total{selector()}[{RATE}]) + "
                f"rate(sidecar_host_network_transmit_drop_total{selector()}[{RATE}])",
                "{{instance}} {{device}} drops",
                "B",
            ),
        )
    )
    layout.add(
        graph(
            "Host uptime",
            "Time since the host booted.",
            "s",
            query(f"time() - sidecar_host_boot_time_seconds{selector()}", "{{instance}}"),
        )
    )
    layout.row("Processes")
    layout.add(
        graph(
            "Instances",
            "Running processes matching each target.",
            "short",
            query(f"sidecar_process_instances{selector()}", "{{instance}} {{target}}"),
        )
    )
    layout.add(
        graph(
            "Process CPU",
            "CPU time used per second (1 = one core busy).",
            "short",
            query(
                f"sum by (instance, target) (rate(sidecar_process_cpu_seconds_total"
                f"{selector()}[{RATE}]))",
                "{{instance}} {{target}}",
            ),
        )
    )
    layout.add(
        graph(
            "Process memory",
            "Resident memory of each target.",
            "bytes",
            query(f"sidecar_process_resident_memory_bytes{selector()}", "{{instance}} {{target}}"),
        )
    )
    layout.add(
        graph(
            "Open files",
            "Open file descriptors as a share of the limit.",
            "percentunit",
            query(
                f"sidecar_process_open_fds{selector()} / sidecar_process_max_fds{selector()}",
                "{{instance}} {{target}}",
            ),
        )
    )
    layout.add(
        graph(
            "Threads",
            "Threads of each target.",
            "short",
            query(f"sidecar_process_threads{selector()}", "{{instance}} {{target}}"),
        )
    )
    layout.add(
        graph(
            "Process I/O",
            "Bytes read and written per second by each target.",
            "Bps",
            query(
                f"rate(sidecar_process_read_bytes_total{selector()}[{RATE}])",
                "{{instance}} {{target}} read",
            ),
            query(
                f"rate(sidecar_process_written_bytes_total{selector()}[{RATE}])",
                "{{instance}} {{target}} written",
                "B",
            ),
        )
    )
    return layout.builder


DASHBOARDS = {
    "sidecar-overview.json": overview,
    "sidecar-alert-pipeline.json": alert_pipeline,
    "sidecar-ingest.json": ingest,
    "sidecar-resources.json": resources,
}


def render() -> dict[str, str]:
    """File name to JSON text of every dashboard, stable from run to run."""
    return {
        name: json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main() -> int:
    """Write every dashboard here and into the chart; ``--check`` only compares."""
    stale = []
    for name, text in render().items():
        for directory in (HERE, CHART_COPY):
            path = directory / name
            if "--check" in sys.argv[1:]:
                if not path.exists() or path.read_text() != text:
                    stale.append(path)
                continue
            directory.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(f"{path} is out of date: run python dashboards/generate.py")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
