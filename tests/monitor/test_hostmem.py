"""Host memory in a container: the cgroup's limit (v2 and v1) against the host's RAM, on a fake cgroup tree."""

from types import SimpleNamespace

import pytest

from leantune.monitor import hostmem
from leantune.monitor.hostmem import HostMemory, host_memory

GIB = 1 << 30
HOST = SimpleNamespace(total=64 * GIB, available=48 * GIB)  # what psutil says about the machine


@pytest.fixture(autouse=True)
def fake_host(monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: HOST)


def write(directory, **files):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text)


def fake_v2(tmp_path, path="/job/step", **levels):
    """A cgroup v2 tree; levels: directory (relative to the root) -> (memory.max, memory.current, inactive_file)."""
    (tmp_path / "cgroup").write_text(f"0::{path}\n")
    for rel, (limit, current, inactive) in levels.items():
        write(tmp_path / "root" / rel, memory_max=f"{limit}\n", memory_current=f"{current}\n",
              memory_stat=f"anon 1\ninactive_file {inactive}\nactive_file 5\n")
    return tmp_path / "root", tmp_path / "cgroup"


def test_v2_limit_below_the_host_gives_the_cgroups_figures(tmp_path):
    root, proc = fake_v2(tmp_path, **{"job/step": (16 * GIB, 6 * GIB, 2 * GIB)})
    # available = limit - (usage - inactive file cache) = 16 - (6 - 2) GiB
    assert host_memory(root, proc) == HostMemory(16 * GIB, 12 * GIB, "cgroup v2")


def test_v2_the_tightest_level_of_the_hierarchy_binds(tmp_path):
    root, proc = fake_v2(tmp_path, **{"job/step": ("max", 3 * GIB, 0), "job": (8 * GIB, 7 * GIB, 1 * GIB),
                                      ".": (32 * GIB, 10 * GIB, 0)})
    assert host_memory(root, proc) == HostMemory(8 * GIB, 2 * GIB, "cgroup v2")


def test_v2_without_a_limit_or_above_the_host_keeps_the_host_figures(tmp_path):
    root, proc = fake_v2(tmp_path, **{"job/step": ("max", 6 * GIB, 0), "job": (128 * GIB, 6 * GIB, 0)})
    assert host_memory(root, proc) == HostMemory(64 * GIB, 48 * GIB, "host")


def test_v2_limit_with_more_room_than_the_host_has_free_keeps_the_host_figures(tmp_path):
    root, proc = fake_v2(tmp_path, **{"job/step": (60 * GIB, 1 * GIB, 0)})
    assert host_memory(root, proc).source == "host"


def test_v1_container_mount_and_its_no_limit_value(tmp_path):
    # Inside a container the host-side path of /proc/self/cgroup is not mounted: the mount is the cgroup.
    (tmp_path / "cgroup").write_text("5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    memory = tmp_path / "root" / "memory"
    write(memory, memory_limit_in_bytes=f"{4 * GIB}\n", memory_usage_in_bytes=f"{3 * GIB}\n",
          memory_stat=f"inactive_file 7\ntotal_inactive_file {GIB // 2}\n")
    assert host_memory(tmp_path / "root", tmp_path / "cgroup") == HostMemory(4 * GIB, 4 * GIB - 5 * GIB // 2,
                                                                              "cgroup v1")
    # v1 says "no limit" with a number near 2**63.
    (memory / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert host_memory(tmp_path / "root", tmp_path / "cgroup").source == "host"


def test_no_cgroup_files_or_proc_entry_keeps_the_host_figures(tmp_path):
    assert host_memory(tmp_path / "nothing", tmp_path / "no-proc-cgroup") == HostMemory(64 * GIB, 48 * GIB, "host")
    (tmp_path / "cgroup").write_text("0::/\n")  # hybrid: the v2 root without the memory controller
    (tmp_path / "root").mkdir()
    assert host_memory(tmp_path / "root", tmp_path / "cgroup").source == "host"


def test_the_sampler_and_the_probe_read_the_cgroup(tmp_path, monkeypatch):
    from leantune.config import MonitorConfig
    from leantune.monitor.sampler import Monitor
    from leantune.probe import free_memory_bytes

    root, proc = fake_v2(tmp_path, **{"job/step": (16 * GIB, 6 * GIB, 2 * GIB)})
    monkeypatch.setattr(hostmem, "CGROUP_ROOT", root)
    monkeypatch.setattr(hostmem, "PROC_CGROUP", proc)
    monitor = Monitor(MonitorConfig(backend="psutil"), tmp_path / "monitor.csv", device_type="cpu")
    sample = monitor.sample_once()
    monitor.stop()
    assert (sample.ram_total_mb, sample.ram_available_mb) == (16 * 1024, 12 * 1024)
    assert sample.free_fraction == 0.75
    assert free_memory_bytes("cpu") == 12 * GIB
