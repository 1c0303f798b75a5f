"""What this machine can give the analysis workers: cores and memory, as Linux reports them.

Read from ``/proc`` and the cgroup (v1 or v2) files a container limits, so a server in a
container with 2 CPUs or 4 GiB sees those limits, not the host's. Elsewhere (no ``/proc``)
the memory functions answer None and callers take the cautious choice; the core count falls
back to ``os.cpu_count()``.
"""

from __future__ import annotations

import os
from pathlib import Path

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PROC_CGROUP = Path("/proc/self/cgroup")


def _cgroup(controller: str) -> Path | None:
    """This process's cgroup folder for ``controller``: cgroup v2's unified folder, else
    v1's per-controller one (a container's own cgroup shows as its root)."""
    try:
        lines = _PROC_CGROUP.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, names, rel = parts
        rel = rel.strip().lstrip("/")
        if names == "" and (_CGROUP_ROOT / "cgroup.controllers").exists():
            return _CGROUP_ROOT / rel                 # v2
        if controller in names.split(","):
            return _CGROUP_ROOT / controller / rel    # v1
    return None


def _cgroup_memory_left() -> int | None:
    """Bytes left under this cgroup's memory limit (None: no limit or unreadable). Page
    cache the kernel can drop (inactive files) does not count as used."""
    group = _cgroup("memory")
    if group is None:
        return None
    v2 = (group / "memory.max").exists()
    names = (("memory.max", "memory.current", "inactive_file") if v2 else
             ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))
    try:
        limit = (group / names[0]).read_text().strip()
        if limit == "max" or int(limit) >= 1 << 60:    # v1 writes "no limit" as ~2^63
            return None
        stat = dict(line.split()[:2] for line in
                    (group / "memory.stat").read_text().splitlines())
        used = int((group / names[1]).read_text()) - int(stat.get(names[2], 0))
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        group = _cgroup("cpu")
        if group is not None and (group / "cpu.max").exists():
            quota, period = (group / "cpu.max").read_text().split()[:2]
        elif group is not None:
            quota = (group / "cpu.cfs_quota_us").read_text().strip()
            period = (group / "cpu.cfs_period_us").read_text().strip()
        else:
            quota, period = "max", "1"
        if quota not in ("max", "-1"):
            cores = min(cores, max(1, int(quota) // max(1, int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def available_memory_bytes() -> int | None:
    """Memory that can be used without swapping: the kernel's MemAvailable, or what is left
    under this cgroup's memory limit if that is less. None where it cannot be read."""
    avail: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        return None
    left = _cgroup_memory_left()
    if left is not None and avail is not None:
        avail = min(avail, left)
    return avail


def anonymous_bytes(pid: int | None = None) -> int | None:
    """Anonymous (private, not file-backed) memory of a process, ``pid`` None = this one.

    A model's weights are a memory-mapped file, shared by every process that maps it
    through the page cache; its KV cache, compute buffers and heap are anonymous. So this
    is what one more model context of the same file costs. None where it cannot be read.
    """
    path = Path(f"/proc/{pid or 'self'}/smaps_rollup")
    try:
        for line in path.read_text().splitlines():
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
