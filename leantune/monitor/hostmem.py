"""Host memory as the training process may use it: the tighter of the machine's RAM and its cgroup's limit.

In a container (Docker, Kubernetes, a batch scheduler's job) psutil reports the whole host's memory,
while the kernel kills the process when its cgroup's limit is reached: a 16 GiB container on a
512 GiB host would look nearly empty. `host_memory()` reads the cgroup's limit and usage, cgroup v2
(memory.max, memory.current) or v1 (memory.limit_in_bytes, memory.usage_in_bytes), for the
process's cgroup and every cgroup above it (their limits apply too), and returns whichever of host
and cgroup leaves less available.

Usage counts as the kernel's working set: usage minus inactive file cache (memory.stat's
inactive_file, v1 total_inactive_file), which the kernel reclaims before it kills anything, so an
idle page cache does not read as memory in use (the same figure as `docker stats` and the kubelet).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class HostMemory:
    total_bytes: int
    available_bytes: int
    source: str  # "host", "cgroup v2" or "cgroup v1": which of them is the tighter


@dataclass(frozen=True)
class _Level:
    directory: Path
    limit: str  # file names of this cgroup version
    usage: str
    inactive: str  # the memory.stat key of reclaimable file cache
    version: str


def cgroup_dirs(root: Path | None = None, proc_cgroup: Path | None = None) -> list[_Level]:
    """The memory cgroups of this process, its own first, then every one above it up to `root`."""
    root, proc_cgroup = root or CGROUP_ROOT, proc_cgroup or PROC_CGROUP
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    levels: list[_Level] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2 (unified hierarchy); in a hybrid set-up it may lack the memory controller
            version, base, files = "cgroup v2", root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            version, base = "cgroup v1", root / "memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        own = base / path.lstrip("/")
        # Inside a container with its own mount the host-side path is not visible: the mount is its cgroup.
        directory = own if own.is_dir() else base
        while True:
            if (directory / files[0]).is_file():
                levels.append(_Level(directory, *files, version))
            if directory == base or base not in directory.parents:
                break
            directory = directory.parent
    return levels


@functools.cache
def _own_cgroup_dirs(root: Path, proc_cgroup: Path) -> tuple[_Level, ...]:
    """This process's cgroups, found once per (root, proc entry): a process does not move between cgroups,
    and the monitor reads host memory every sample."""
    return tuple(cgroup_dirs(root, proc_cgroup))


def _read_level(level: _Level) -> tuple[int, int] | None:
    """(limit, working set) of one cgroup, or None when it has no limit or cannot be read."""
    try:
        limit_text = (level.directory / level.limit).read_text().strip()
        if limit_text == "max":
            return None
        usage = int((level.directory / level.usage).read_text())
        inactive = 0
        for line in (level.directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == level.inactive:
                inactive = int(value)
                break
    except (OSError, ValueError):
        return None
    return int(limit_text), max(0, usage - inactive)


def host_memory(root: Path | None = None, proc_cgroup: Path | None = None) -> HostMemory:
    """Total and available host memory for this process: the host's (psutil) or its cgroup's, whichever is tighter."""
    import psutil

    ram = psutil.virtual_memory()
    best = HostMemory(ram.total, ram.available, "host")
    levels = (_own_cgroup_dirs(CGROUP_ROOT, PROC_CGROUP) if root is None and proc_cgroup is None
              else cgroup_dirs(root, proc_cgroup))
    for level in levels:
        read = _read_level(level)
        # v1 writes "no limit" as a huge number; a limit above the host's RAM does not bind either.
        if read is None or read[0] >= ram.total:
            continue
        limit, used = read
        available = max(0, limit - used)
        if available < best.available_bytes:
            best = HostMemory(limit, available, level.version)
    return best
