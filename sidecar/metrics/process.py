"""Process metrics of the sidecar itself and of the target processes named in the config.

A target may match several processes (a pre-forking server); its series are the sums over
them, except the file-descriptor pair, which is that of the process closest to its limit so
that ``open_fds / max_fds`` stays meaningful. A target that matches nothing is reported with
``sidecar_process_instances 0`` and no other series; it never fails the scrape.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidecar.metrics.config import SELF_TARGET, ProcessMetricsConfig, ProcessTarget

logger = logging.getLogger(__name__)

_PREFIX = "sidecar_process_"
_T = TypeVar("_T")


@dataclass
class _Totals:
    """What one target adds up to across its processes."""

    instances: int = 0
    user_seconds: float = 0.0
    system_seconds: float = 0.0
    resident_bytes: int = 0
    virtual_bytes: int = 0
    threads: int = 0
    start_time: float | None = None
    read_bytes: int | None = None
    written_bytes: int | None = None
    fds: tuple[int, int] | None = None

    def add(self, process: psutil.Process) -> None:
        with process.oneshot():
            times = process.cpu_times()
            memory = process.memory_info()
            threads = process.num_threads()
            started = process.create_time()
            io = _optional(process.io_counters)
            open_fds = _optional(process.num_fds)
            limit = _fd_limit(process)

        self.instances += 1
        self.user_seconds += times.user
        self.system_seconds += times.system
        self.resident_bytes += memory.rss
        self.virtual_bytes += memory.vms
        self.threads += threads
        self.start_time = started if self.start_time is None else min(self.start_time, started)
        if io is not None:
            self.read_bytes = (self.read_bytes or 0) + io.read_bytes
            self.written_bytes = (self.written_bytes or 0) + io.write_bytes
        if (
            open_fds is not None
            and limit
            and (self.fds is None or open_fds / limit > self.fds[0] / self.fds[1])
        ):
            self.fds = (open_fds, limit)


def _optional(read: Callable[[], _T]) -> _T | None:
    try:
        return read()
    except (psutil.AccessDenied, NotImplementedError, AttributeError):
        return None


def _fd_limit(process: psutil.Process) -> int | None:
    if process.pid == os.getpid():
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    else:
        limits = _optional(lambda: process.rlimit(psutil.RLIMIT_NOFILE))
        if limits is None:
            return None
        soft = limits[0]
    return None if soft == resource.RLIM_INFINITY else soft


class ProcessSource:
    """Finds each target's processes at every scrape and reports their resources."""

    def __init__(self, config: ProcessMetricsConfig) -> None:
        self._config = config
        self._own_pid = os.getpid()

    def find(self, target: ProcessTarget) -> list[psutil.Process]:
        """The live processes a target selects right now (never the sidecar itself)."""
        if target.pid_file is not None:
            return self._from_pid_file(target)
        found = []
        for process in psutil.process_iter(["name", "cmdline", "status"]):
            info = process.info
            if process.pid == self._own_pid or info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if target.process_name is not None:
                if info["name"] == target.process_name:
                    found.append(process)
            elif target.cmdline is not None and target.cmdline.search(
                " ".join(info["cmdline"] or ())
            ):
                found.append(process)
        return found

    def _from_pid_file(self, target: ProcessTarget) -> list[psutil.Process]:
        assert target.pid_file is not None
        try:
            pid = int(target.pid_file.read_text(encoding="ascii").strip())
            process = psutil.Process(pid)
        except (OSError, ValueError, UnicodeDecodeError, psutil.Error):
            return []
        return [process] if process.status() != psutil.STATUS_ZOMBIE else []

    def totals(self) -> dict[str, _Totals]:
        """Resource totals per target name, ``self`` first when enabled."""
        selected: dict[str, list[psutil.Process]] = {}
        if self._config.include_self:
            selected[SELF_TARGET] = [psutil.Process(self._own_pid)]
        for target in self._config.targets:
            selected[target.name] = self.find(target)

        totals = {}
        for name, processes in selected.items():
            total = _Totals()
            for process in processes:
                try:
                    total.add(process)
                except (psutil.NoSuchProcess, psutil.ZombieProcess):
                    continue  # it ended between the search and the read
            totals[name] = total
        return totals

    def collect(self) -> Iterable[Metric]:
        def gauge(name: str, text: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(_PREFIX + name, text, labels=["target"])

        def counter(
            name: str, text: str, labels: tuple[str, ...] = ("target",)
        ) -> CounterMetricFamily:
            return CounterMetricFamily(_PREFIX + name, text, labels=list(labels))

        instances = gauge("instances", "Number of running processes the target matches.")
        cpu = counter(
            "cpu_seconds", "CPU seconds used, by mode (user, system).", ("target", "mode")
        )
        resident = gauge("resident_memory_bytes", "Resident memory size.")
        virtual = gauge("virtual_memory_bytes", "Virtual memory size.")
        threads = gauge("threads", "Operating-system threads.")
        started = gauge(
            "start_time_seconds", "Start time of the oldest process, in seconds since the epoch."
        )
        open_fds = gauge("open_fds", "Open file descriptors of the process closest to its limit.")
        max_fds = gauge("max_fds", "File-descriptor limit of the process closest to its limit.")
        read = counter("read_bytes", "Bytes read from storage (needs permission to read).")
        written = counter("written_bytes", "Bytes written to storage (needs permission to read).")

        for name, total in self.totals().items():
            instances.add_metric([name], total.instances)
            if not total.instances:
                continue
            cpu.add_metric([name, "user"], total.user_seconds)
            cpu.add_metric([name, "system"], total.system_seconds)
            resident.add_metric([name], total.resident_bytes)
            virtual.add_metric([name], total.virtual_bytes)
            threads.add_metric([name], total.threads)
            if total.start_time is not None:
                started.add_metric([name], total.start_time)
            if total.fds is not None:
                open_fds.add_metric([name], total.fds[0])
                max_fds.add_metric([name], total.fds[1])
            if total.read_bytes is not None and total.written_bytes is not None:
                read.add_metric([name], total.read_bytes)
                written.add_metric([name], total.written_bytes)
        return [
            instances,
            cpu,
            resident,
            virtual,
            threads,
            started,
            open_fds,
            max_fds,
            read,
            written,
        ]
