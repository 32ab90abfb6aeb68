"""runtime/nn/kernels.py: the default thread count honours a cgroup CPU limit (v1 and v2)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from runtime.nn.kernels import cpu_limit, set_threads


def cgroup_tree(tmp_path, proc_lines: str, files: dict[str, str]):
    """A /proc/self/cgroup and a /sys/fs/cgroup laid out as the kernel lays them out."""
    proc = tmp_path / "cgroup"
    proc.write_text(proc_lines)
    root = tmp_path / "sys"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return str(proc), str(root)


@pytest.mark.parametrize("cpu_max,want", [("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1),
                                          ("max 100000", None), ("garbage", None)])
def test_cgroup_v2_cpu_max(tmp_path, cpu_max, want):
    proc, root = cgroup_tree(tmp_path, "0::/kubepods/pod1/ctr\n", {"kubepods/pod1/ctr/cpu.max": cpu_max})
    assert cpu_limit(proc, root) == want


@pytest.mark.parametrize("quota,period,want", [("400000", "100000", 4), ("-1", "100000", None)])
def test_cgroup_v1_cfs_quota(tmp_path, quota, period, want):
    proc, root = cgroup_tree(tmp_path, "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n",
                             {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": quota,
                              "cpu,cpuacct/docker/abc/cpu.cfs_period_us": period})
    assert cpu_limit(proc, root) == want


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cpu_limit(str(tmp_path / "missing"), str(tmp_path)) is None
    proc, root = cgroup_tree(tmp_path, "0::/\n", {})
    assert cpu_limit(proc, root) is None


def test_an_explicit_thread_count_wins():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1
    finally:
        torch.set_num_threads(before)


def test_default_threads_in_this_process_follow_this_machine():
    """In a fresh process, the default is torch's count unless this machine's cgroup caps it
    lower: what the server's start-up line reports."""
    code = ("import torch; from runtime.nn.kernels import cpu_limit, set_threads; "
            "seen = torch.get_num_threads(); lim = cpu_limit(); "
            "print(set_threads(None), min(seen, lim) if lim else seen)")
    got, want = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout.split()
    assert got == want
