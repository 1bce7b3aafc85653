"""Host metrics read with psutil: CPU, load, memory, swap, filesystems, disks, network, boot.

Each group is a *source*: a function returning metric families, run and timed by
``SourceCollector`` so that one failing group is reported without breaking the scrape. Names
mirror node_exporter's under the ``sidecar_host_`` prefix; the README lists the pairs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import NamedTuple

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidecar.metrics.config import HostMetricsConfig
from sidecar.metrics.sources import Source

# node_exporter leaves the guest modes out of node_cpu_seconds_total: they are part of user.
CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_PREFIX = "sidecar_host_"


def host_sources(config: HostMetricsConfig, filesystems: FilesystemSource) -> dict[str, Source]:
    """The host sources by collector name (named after node_exporter's collectors)."""
    return {
        "cpu": collect_cpu,
        "loadavg": collect_load,
        "meminfo": collect_memory,
        "filesystem": filesystems.collect,
        "diskstats": lambda: collect_disks(config),
        "netdev": lambda: collect_network(config),
        "boot": collect_boot_time,
    }


def collect_cpu() -> Iterable[Metric]:
    family = CounterMetricFamily(
        _PREFIX + "cpu_seconds",
        "Seconds each CPU spent in each mode (node_cpu_seconds_total).",
        labels=["cpu", "mode"],
    )
    for index, times in enumerate(psutil.cpu_times(percpu=True)):
        for mode in CPU_MODES:
            value = getattr(times, mode, None)
            if value is not None:
                family.add_metric([str(index), mode], value)
    return [family]


def collect_load() -> Iterable[Metric]:
    load1, load5, load15 = os.getloadavg()
    return [
        GaugeMetricFamily(_PREFIX + "load1", "1-minute load average (node_load1).", value=load1),
        GaugeMetricFamily(_PREFIX + "load5", "5-minute load average (node_load5).", value=load5),
        GaugeMetricFamily(
            _PREFIX + "load15", "15-minute load average (node_load15).", value=load15
        ),
    ]


def collect_memory() -> Iterable[Metric]:
    memory = psutil.virtual_memory()
    swap = psutil.swap_memory()
    gauges = [
        ("memory_total_bytes", memory.total, "Physical memory (node_memory_MemTotal_bytes)."),
        (
            "memory_available_bytes",
            memory.available,
            "Memory available to start new work without swapping (node_memory_MemAvailable_bytes).",
        ),
        ("memory_free_bytes", memory.free, "Unused memory (node_memory_MemFree_bytes)."),
        (
            "memory_buffers_bytes",
            getattr(memory, "buffers", 0),
            "Memory in block-device buffers (node_memory_Buffers_bytes).",
        ),
        (
            "memory_cached_bytes",
            getattr(memory, "cached", 0),
            "Memory in the page cache (node_memory_Cached_bytes).",
        ),
        ("swap_total_bytes", swap.total, "Swap space (node_memory_SwapTotal_bytes)."),
        ("swap_free_bytes", swap.free, "Unused swap space (node_memory_SwapFree_bytes)."),
    ]
    families: list[Metric] = [
        GaugeMetricFamily(_PREFIX + name, help_text, value=value)
        for name, value, help_text in gauges
    ]
    families.append(
        CounterMetricFamily(
            _PREFIX + "swap_in_bytes",
            "Bytes swapped in from disk (node_vmstat_pswpin, in bytes).",
            value=swap.sin,
        )
    )
    families.append(
        CounterMetricFamily(
            _PREFIX + "swap_out_bytes",
            "Bytes swapped out to disk (node_vmstat_pswpout, in bytes).",
            value=swap.sout,
        )
    )
    return families


class _Mount(NamedTuple):
    device: str
    mountpoint: str
    fstype: str


class FilesystemSource:
    """Filesystem sizes, with a timeout per scrape so that a hung mount cannot stall it.

    ``statvfs`` on a dead network mount can block forever. Calls run on a small pool; a mount
    whose call has not returned within ``stat_timeout`` is reported with
    ``device_error`` and skipped until that call comes back.
    """

    def __init__(self, config: HostMetricsConfig) -> None:
        self._config = config.filesystem
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="statvfs")
        self._stuck: dict[str, Future[os.statvfs_result]] = {}

    def mounts(self) -> list[_Mount]:
        """Mounted filesystems left after the exclusion patterns, one per mount point."""
        config = self._config
        chosen: dict[str, _Mount] = {}
        for partition in psutil.disk_partitions(all=True):
            if config.exclude_fstypes.search(partition.fstype):
                continue
            if config.exclude_mountpoints.search(partition.mountpoint):
                continue
            # The last mount on a mount point is the one a path there resolves to.
            chosen[partition.mountpoint] = _Mount(
                partition.device, partition.mountpoint, partition.fstype
            )
        return list(chosen.values())

    def collect(self) -> Iterable[Metric]:
        labels = ["device", "mountpoint", "fstype"]
        names = {
            "size_bytes": "Filesystem size (node_filesystem_size_bytes).",
            "free_bytes": "Free space, including the part reserved for root "
            "(node_filesystem_free_bytes).",
            "avail_bytes": "Space available to unprivileged users (node_filesystem_avail_bytes).",
            "files": "Inodes in the filesystem (node_filesystem_files).",
            "files_free": "Free inodes (node_filesystem_files_free).",
            "readonly": "1 if the filesystem is mounted read-only (node_filesystem_readonly).",
            "device_error": "1 if the filesystem's statistics could not be read in time "
            "(node_filesystem_device_error).",
        }
        families = {
            key: GaugeMetricFamily(f"{_PREFIX}filesystem_{key}", text, labels=labels)
            for key, text in names.items()
        }

        self._stuck = {point: call for point, call in self._stuck.items() if not call.done()}
        mounts = self.mounts()
        calls = {
            mount: self._stuck.get(mount.mountpoint)
            or self._pool.submit(os.statvfs, mount.mountpoint)
            for mount in mounts
        }
        wait(calls.values(), timeout=self._config.stat_timeout)

        for mount, call in calls.items():
            values = list(mount)
            stats = None
            if not call.done():
                self._stuck[mount.mountpoint] = call
            elif call.exception() is None:
                stats = call.result()
            families["device_error"].add_metric(values, 0 if stats else 1)
            if stats is None:
                continue
            families["size_bytes"].add_metric(values, stats.f_blocks * stats.f_frsize)
            families["free_bytes"].add_metric(values, stats.f_bfree * stats.f_frsize)
            families["avail_bytes"].add_metric(values, stats.f_bavail * stats.f_frsize)
            families["files"].add_metric(values, stats.f_files)
            families["files_free"].add_metric(values, stats.f_ffree)
            families["readonly"].add_metric(values, 1 if stats.f_flag & os.ST_RDONLY else 0)
        return list(families.values())

    async def start(self) -> None:
        """Nothing to start: the pool creates its threads on first use."""

    async def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def collect_disks(config: HostMetricsConfig) -> Iterable[Metric]:
    counters = {
        "reads_completed": (
            "read_count",
            1.0,
            "Reads completed (node_disk_reads_completed_total).",
        ),
        "writes_completed": (
            "write_count",
            1.0,
            "Writes completed (node_disk_writes_completed_total).",
        ),
        "read_bytes": ("read_bytes", 1.0, "Bytes read (node_disk_read_bytes_total)."),
        "written_bytes": ("write_bytes", 1.0, "Bytes written (node_disk_written_bytes_total)."),
        "read_time_seconds": (
            "read_time",
            0.001,
            "Seconds spent reading (node_disk_read_time_seconds_total).",
        ),
        "write_time_seconds": (
            "write_time",
            0.001,
            "Seconds spent writing (node_disk_write_time_seconds_total).",
        ),
        "io_time_seconds": (
            "busy_time",
            0.001,
            "Seconds spent doing I/O (node_disk_io_time_seconds_total).",
        ),
    }
    families = {
        key: CounterMetricFamily(f"{_PREFIX}disk_{key}", text, labels=["device"])
        for key, (_, _, text) in counters.items()
    }
    for device, stats in (psutil.disk_io_counters(perdisk=True) or {}).items():
        if config.disk.exclude_devices.search(device):
            continue
        for key, (field, scale, _) in counters.items():
            value = getattr(stats, field, None)
            if value is not None:
                families[key].add_metric([device], value * scale)
    return list(families.values())


def collect_network(config: HostMetricsConfig) -> Iterable[Metric]:
    counters = {
        "receive_bytes": ("bytes_recv", "Bytes received (node_network_receive_bytes_total)."),
        "transmit_bytes": ("bytes_sent", "Bytes sent (node_network_transmit_bytes_total)."),
        "receive_packets": (
            "packets_recv",
            "Packets received (node_network_receive_packets_total).",
        ),
        "transmit_packets": (
            "packets_sent",
            "Packets sent (node_network_transmit_packets_total).",
        ),
        "receive_errs": ("errin", "Receive errors (node_network_receive_errs_total)."),
        "transmit_errs": ("errout", "Transmit errors (node_network_transmit_errs_total)."),
        "receive_drop": ("dropin", "Received packets dropped (node_network_receive_drop_total)."),
        "transmit_drop": (
            "dropout",
            "Outgoing packets dropped (node_network_transmit_drop_total).",
        ),
    }
    families = {
        key: CounterMetricFamily(f"{_PREFIX}network_{key}", text, labels=["device"])
        for key, (_, text) in counters.items()
    }
    excluded = config.network.exclude_devices
    for device, stats in psutil.net_io_counters(pernic=True).items():
        if excluded is not None and excluded.search(device):
            continue
        for key, (field, _) in counters.items():
            families[key].add_metric([device], getattr(stats, field))
    return list(families.values())


def collect_boot_time() -> Iterable[Metric]:
    return [
        GaugeMetricFamily(
            _PREFIX + "boot_time_seconds",
            "Time the host booted, in seconds since the epoch (node_boot_time_seconds).",
            value=psutil.boot_time(),
        )
    ]
