"""Configuration of the host and process collectors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Self

from pydantic import Field, model_validator

from sidecar.fields import Duration, Section

# The same defaults node_exporter uses, so both exporters show the same mounts and disks.
DEFAULT_EXCLUDED_FSTYPES = (
    r"^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|fusectl|hugetlbfs"
    r"|iso9660|mqueue|nsfs|overlay|proc|procfs|pstore|rpc_pipefs|securityfs|selinuxfs"
    r"|squashfs|sysfs|tracefs)$"
)
DEFAULT_EXCLUDED_MOUNTPOINTS = (
    r"^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)"
)
DEFAULT_EXCLUDED_DISKS = r"^(ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\d+n\d+p)\d+$"

TARGET_NAME = r"^[A-Za-z0-9_.-]{1,64}$"
SELF_TARGET = "self"


class FilesystemConfig(Section):
    exclude_fstypes: re.Pattern[str] = re.compile(DEFAULT_EXCLUDED_FSTYPES)
    """Filesystem types to leave out (regular expression, fully anchored by the default)."""

    exclude_mountpoints: re.Pattern[str] = re.compile(DEFAULT_EXCLUDED_MOUNTPOINTS)
    """Mount points to leave out (regular expression)."""

    stat_timeout: Duration = 1.0
    """How long one scrape waits for a mount's statistics; a mount that takes longer is reported
    with `sidecar_host_filesystem_device_error` and skipped until its call returns."""


class DiskConfig(Section):
    exclude_devices: re.Pattern[str] = re.compile(DEFAULT_EXCLUDED_DISKS)
    """Block devices to leave out of the disk I/O metrics (regular expression; partitions by
    default)."""


class NetworkConfig(Section):
    exclude_devices: re.Pattern[str] | None = None
    """Network interfaces to leave out (regular expression); none by default."""


class HostMetricsConfig(Section):
    enabled: bool = True
    """Export CPU, load, memory, filesystem, disk, network and boot-time metrics of the host."""

    filesystem: FilesystemConfig = FilesystemConfig()
    """Which mounts the filesystem metrics cover."""

    disk: DiskConfig = DiskConfig()
    """Which block devices the disk I/O metrics cover."""

    network: NetworkConfig = NetworkConfig()
    """Which interfaces the network metrics cover."""


class ProcessSelector(Section):
    """How processes are chosen, by exactly one of three ways; shared with the process check."""

    pid_file: Path | None = None
    """Select the process whose id this file holds."""

    process_name: str | None = None
    """Select processes whose name (as `ps -o comm` shows it) equals this."""

    cmdline: re.Pattern[str] | None = None
    """Select processes whose command line (arguments joined by spaces) this regular
    expression matches anywhere."""

    @model_validator(mode="after")
    def _one_selector(self) -> Self:
        chosen = [
            key for key in ("pid_file", "process_name", "cmdline") if getattr(self, key) is not None
        ]
        if len(chosen) != 1:
            raise ValueError("set exactly one of pid_file, process_name and cmdline")
        return self


class ProcessTarget(ProcessSelector):
    name: Annotated[str, Field(pattern=TARGET_NAME)]
    """Value of the `target` label; unique, and not `self` (the sidecar's own)."""

    @model_validator(mode="after")
    def _not_self(self) -> Self:
        if self.name == SELF_TARGET:
            raise ValueError("the target name 'self' is reserved for the sidecar's own process")
        return self


class ProcessMetricsConfig(Section):
    include_self: bool = True
    """Export the sidecar's own process metrics, with `target="self"`."""

    targets: list[ProcessTarget] = []
    """Processes to watch, such as the application in a pod that shares its process
    namespace."""

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        seen: set[str] = set()
        for target in self.targets:
            if target.name in seen:
                raise ValueError(f"target name {target.name!r} is used twice")
            seen.add(target.name)
        return self


class MetricsConfig(Section):
    host: HostMetricsConfig = HostMetricsConfig()
    """Host metrics collected with psutil."""

    process: ProcessMetricsConfig = ProcessMetricsConfig()
    """Process metrics of the sidecar and of target processes."""
