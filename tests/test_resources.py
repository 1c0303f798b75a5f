"""What the pool reads about the machine (medmitra/jobs/resources.py): this machine's real
/proc, and cgroup v1 and v2 trees laid out as a container would show them."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from medmitra.jobs import resources

MiB = 2**20


def test_cores_and_memory_of_this_machine() -> None:
    cores = resources.usable_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    total = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal:")).split()[1]) * 1024
    avail = resources.available_memory_bytes()
    assert avail is not None and 0 < avail <= total


def test_anonymous_memory_grows_with_what_the_process_allocates() -> None:
    before = resources.anonymous_bytes()
    # A fresh anonymous mapping (malloc could hand back pages this process already had),
    # resident only once written.
    block = mmap.mmap(-1, 64 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for i in range(0, len(block), mmap.PAGESIZE):
        block[i] = 1
    after = resources.anonymous_bytes(os.getpid())
    assert before is not None and after is not None
    assert after - before >= 60 * MiB
    block.close()
    assert resources.anonymous_bytes(2**22 + 12345) is None   # no such process


def _tree(tmp_path: Path, monkeypatch, proc_cgroup: str) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir()
    (tmp_path / "self-cgroup").write_text(proc_cgroup)
    monkeypatch.setattr(resources, "_CGROUP_ROOT", root)
    monkeypatch.setattr(resources, "_PROC_CGROUP", tmp_path / "self-cgroup")
    return root


def test_cgroup_v2_limits(tmp_path: Path, monkeypatch) -> None:
    root = _tree(tmp_path, monkeypatch, "0::/system.slice/medmitra.service\n")
    (root / "cgroup.controllers").write_text("cpu memory\n")
    group = root / "system.slice" / "medmitra.service"
    group.mkdir(parents=True)
    (group / "cpu.max").write_text("150000 100000\n")                # 1.5 CPUs
    (group / "memory.max").write_text(f"{4096 * MiB}\n")
    (group / "memory.current").write_text(f"{1500 * MiB}\n")
    (group / "memory.stat").write_text(f"anon {900 * MiB}\ninactive_file {500 * MiB}\n")
    assert resources.usable_cores() == 1
    # 4096 - (1500 - 500 reclaimable page cache) = 3096 MiB left, well under MemAvailable.
    assert resources.available_memory_bytes() == 3096 * MiB
    (group / "memory.max").write_text("max\n")
    (group / "cpu.max").write_text("max 100000\n")
    assert resources._cgroup_memory_left() is None
    assert resources.usable_cores() == len(os.sched_getaffinity(0))


def test_cgroup_v1_limits(tmp_path: Path, monkeypatch) -> None:
    root = _tree(tmp_path, monkeypatch, "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n"
                                        "1:name=systemd:/docker/abc\n")
    mem, cpu = root / "memory" / "docker" / "abc", root / "cpu" / "docker" / "abc"
    mem.mkdir(parents=True)
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    (mem / "memory.limit_in_bytes").write_text(f"{2048 * MiB}\n")
    (mem / "memory.usage_in_bytes").write_text(f"{1024 * MiB}\n")
    (mem / "memory.stat").write_text(f"total_inactive_file {24 * MiB}\n")
    assert resources.usable_cores() == len(os.sched_getaffinity(0))
    assert resources.available_memory_bytes() == 1048 * MiB
    (cpu / "cpu.cfs_quota_us").write_text("100000\n")
    assert resources.usable_cores() == 1
    (mem / "memory.limit_in_bytes").write_text("9223372036854771712\n")   # "no limit"
    assert resources._cgroup_memory_left() is None


@pytest.mark.parametrize("content", ["", "garbage\n", "0::\n"])
def test_unreadable_cgroup_files_mean_no_limit(tmp_path: Path, monkeypatch,
                                                content: str) -> None:
    _tree(tmp_path, monkeypatch, content)
    assert resources._cgroup_memory_left() is None
    assert resources.usable_cores() >= 1
