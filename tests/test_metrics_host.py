"""Host and process collectors: values against psutil, failures contained, hung mounts skipped."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from sidecar.config import parse_config
from sidecar.metrics.config import HostMetricsConfig, ProcessMetricsConfig
from sidecar.metrics.host import CPU_MODES, FilesystemSource, host_sources
from sidecar.metrics.process import ProcessSource
from sidecar.metrics.sources import SourceCollector


def samples(families: list[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.fixture
def host_registry(registry: CollectorRegistry) -> Iterator[CollectorRegistry]:
    config = HostMetricsConfig()
    filesystems = FilesystemSource(config)
    registry.register(SourceCollector(host_sources(config, filesystems)))
    yield registry
    filesystems._pool.shutdown(wait=True)


def test_cpu_seconds_cover_every_cpu_and_mode(host_registry: CollectorRegistry) -> None:
    before = psutil.cpu_times(percpu=True)

    for cpu in range(len(before)):
        for mode in CPU_MODES:
            seen = value(host_registry, "sidecar_host_cpu_seconds_total", cpu=str(cpu), mode=mode)
            assert seen is not None
            assert seen >= getattr(before[cpu], mode) - 0.01


def test_memory_matches_psutil(host_registry: CollectorRegistry) -> None:
    memory = psutil.virtual_memory()

    assert value(host_registry, "sidecar_host_memory_total_bytes") == memory.total
    available = value(host_registry, "sidecar_host_memory_available_bytes")
    assert available is not None
    assert abs(available - memory.available) < memory.total * 0.05


def test_load_and_boot_time(host_registry: CollectorRegistry) -> None:
    assert value(host_registry, "sidecar_host_boot_time_seconds") == psutil.boot_time()
    assert value(host_registry, "sidecar_host_load1") == pytest.approx(os.getloadavg()[0], abs=5)


def test_filesystem_size_matches_statvfs(host_registry: CollectorRegistry) -> None:
    mounts = FilesystemSource(HostMetricsConfig()).mounts()
    assert mounts, "this machine shows no filesystem"
    mount = mounts[0]
    stats = os.statvfs(mount.mountpoint)
    labels = mount._asdict()

    size = value(host_registry, "sidecar_host_filesystem_size_bytes", **labels)

    assert size == stats.f_blocks * stats.f_frsize
    assert value(host_registry, "sidecar_host_filesystem_device_error", **labels) == 0


def test_pseudo_filesystems_are_left_out(host_registry: CollectorRegistry) -> None:
    fstypes = {
        sample.labels["fstype"]
        for family in host_registry.collect()
        if family.name == "sidecar_host_filesystem_size_bytes"
        for sample in family.samples
    }

    assert fstypes
    assert not fstypes & {"proc", "sysfs", "cgroup2", "devpts", "mqueue"}


def test_network_counters_for_loopback(host_registry: CollectorRegistry) -> None:
    counters = psutil.net_io_counters(pernic=True)["lo"]

    received = value(host_registry, "sidecar_host_network_receive_bytes_total", device="lo")

    assert received is not None and received >= counters.bytes_recv


def test_excluded_network_device_is_absent(registry: CollectorRegistry) -> None:
    config = parse_config({"metrics": {"host": {"network": {"exclude_devices": "^lo$"}}}})
    host = config.metrics.host
    registry.register(SourceCollector(host_sources(host, FilesystemSource(host))))

    assert value(registry, "sidecar_host_network_receive_bytes_total", device="lo") is None


def test_hung_mount_is_reported_and_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(
        {"metrics": {"host": {"filesystem": {"stat_timeout": "200ms"}}}}
    ).metrics.host
    source = FilesystemSource(config)
    mounts = source.mounts()
    assert mounts, "this machine shows no filesystem"
    hung = mounts[0].mountpoint
    release = threading.Event()
    real_statvfs = os.statvfs

    def statvfs(path: str) -> os.statvfs_result:
        if path == hung:
            release.wait(30)
        return real_statvfs(path)

    monkeypatch.setattr(os, "statvfs", statvfs)
    try:
        started = time.monotonic()
        first = samples(list(source.collect()))
        elapsed = time.monotonic() - started
        second = samples(list(source.collect()))
    finally:
        release.set()
    error_key = next(
        key
        for key in first
        if key[0] == "sidecar_host_filesystem_device_error" and ("mountpoint", hung) in key[1]
    )

    assert elapsed < 5
    assert first[error_key] == 1 and second[error_key] == 1
    assert not any(
        key[0] == "sidecar_host_filesystem_size_bytes" and ("mountpoint", hung) in key[1]
        for key in first
    )
    assert len(source._stuck) == 1  # the second scrape reused the pending call
    source._pool.shutdown(wait=True)


def test_failing_source_is_contained(registry: CollectorRegistry) -> None:
    def broken() -> list[Metric]:
        raise OSError("no /proc here")

    def working() -> list[Metric]:
        return [GaugeMetricFamily("sidecar_test_value", "A value.", value=7)]

    registry.register(SourceCollector({"broken": broken, "working": working}))

    first = samples(list(registry.collect()))
    second = samples(list(registry.collect()))

    assert first[("sidecar_test_value", ())] == 7
    assert first[("sidecar_scrape_collector_success", (("collector", "broken"),))] == 0
    assert first[("sidecar_scrape_collector_success", (("collector", "working"),))] == 1
    errors = ("sidecar_collector_errors_total", (("collector", "broken"),))
    assert (first[errors], second[errors]) == (1, 2)
    assert second[("sidecar_collector_errors_total", (("collector", "working"),))] == 0


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    marker = f"sidecar-test-sleeper-{os.getpid()}"
    process = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(60)", marker])
    (tmp_path / "app.pid").write_text(f"{process.pid}\n")
    yield process
    process.kill()
    process.wait()


def process_registry(registry: CollectorRegistry, data: dict[str, object]) -> CollectorRegistry:
    config = ProcessMetricsConfig.model_validate(data)
    registry.register(SourceCollector({"process": ProcessSource(config).collect}))
    return registry


def test_self_metrics(registry: CollectorRegistry) -> None:
    process_registry(registry, {})
    me = psutil.Process()

    assert value(registry, "sidecar_process_instances", target="self") == 1
    assert value(registry, "sidecar_process_start_time_seconds", target="self") == me.create_time()
    resident = value(registry, "sidecar_process_resident_memory_bytes", target="self")
    assert resident is not None and resident > 10_000_000
    open_fds = value(registry, "sidecar_process_open_fds", target="self")
    assert open_fds is not None and open_fds >= 3
    assert (
        value(registry, "sidecar_process_max_fds", target="self")
        == (me.rlimit(psutil.RLIMIT_NOFILE)[0])
    )


def test_targets_by_pid_file_name_and_cmdline(
    registry: CollectorRegistry, sleeper: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    process_registry(
        registry,
        {
            "include_self": False,
            "targets": [
                {"name": "by-pid", "pid_file": str(tmp_path / "app.pid")},
                {"name": "by-cmdline", "cmdline": f"sidecar-test-sleeper-{os.getpid()}$"},
                {"name": "by-name", "process_name": psutil.Process(sleeper.pid).name()},
            ],
        },
    )

    for target in ("by-pid", "by-cmdline"):
        assert value(registry, "sidecar_process_instances", target=target) == 1
        assert value(registry, "sidecar_process_threads", target=target) == 1
    by_name = value(registry, "sidecar_process_instances", target="by-name")
    assert by_name is not None and by_name >= 1
    assert value(registry, "sidecar_process_instances", target="self") is None


def test_target_that_is_not_running_reports_zero(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    (tmp_path / "stale.pid").write_text("999999999\n")
    (tmp_path / "garbage.pid").write_text("not a pid\n")
    process_registry(
        registry,
        {
            "targets": [
                {"name": "stale", "pid_file": str(tmp_path / "stale.pid")},
                {"name": "garbage", "pid_file": str(tmp_path / "garbage.pid")},
                {"name": "absent", "pid_file": str(tmp_path / "absent.pid")},
                {"name": "nobody", "cmdline": "no-process-has-this-command-line-[0-9]{40}"},
            ]
        },
    )

    for target in ("stale", "garbage", "absent", "nobody"):
        assert value(registry, "sidecar_process_instances", target=target) == 0
        assert value(registry, "sidecar_process_resident_memory_bytes", target=target) is None
    assert value(registry, "sidecar_scrape_collector_success", collector="process") == 1


def test_target_that_exits_between_scrapes(
    registry: CollectorRegistry, sleeper: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    process_registry(
        registry, {"targets": [{"name": "app", "pid_file": str(tmp_path / "app.pid")}]}
    )
    assert value(registry, "sidecar_process_instances", target="app") == 1

    sleeper.kill()
    sleeper.wait()

    assert value(registry, "sidecar_process_instances", target="app") == 0
