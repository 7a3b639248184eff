"""tools.keep_freed_cpu_memory: freed torch CPU buffers are reused instead of page-faulted in again."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Real updates of the size_xs model (batch 16 x 64, vector observations) in a fresh process; prints
# whether the tuning applied and the fewest and the most minor page faults of two updates in a row,
# over three such windows after three warm-up updates (the tuned process now and then faults a few
# thousand pages in one window, e.g. when another busy process on the machine makes the kernel
# reclaim memory; glibc's defaults fault in most windows, but its adaptive thresholds now and then
# keep the buffers for one: 8 to 15,000 faults measured in the fewest window).
UPDATES = """
import resource, sys, gymnasium, numpy as np, torch
import config, exploration, tools
torch.set_num_threads(1)
kept = tools.keep_freed_cpu_memory() if sys.argv[1] == "keep" else False
cfg = config.load_config(["--configs", "dmc_proprio", "size_xs", "--device", "cpu"])
obs = {"vector": gymnasium.spaces.Box(-np.inf, np.inf, (24,), np.float32)}
act = gymnasium.spaces.Box(-1.0, 1.0, (6,), np.float32)
agent = exploration.make_agent(obs, act, cfg, "cpu")
batch = exploration.synthetic_batch(obs, act, 16, 64, torch.device("cpu"))
for _ in range(3):
    agent.train_step(batch)
windows = []
for _ in range(3):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        agent.train_step(batch)
    windows.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(kept, min(windows), max(windows))
"""


def faults_of_two_updates(mode: str) -> tuple[str, int, int]:
    """(whether the tuning applied, fewest faults of a window, most faults of a window)."""
    run = subprocess.run([sys.executable, "-c", UPDATES, mode], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    kept, fewest, most = run.stdout.split()
    return kept, int(fewest), int(most)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_updates_reuse_freed_memory_without_page_faults():
    kept, faults, _ = faults_of_two_updates("keep")
    assert kept == "True"
    _, _, default_faults = faults_of_two_updates("default")
    # glibc's defaults give the update's buffers back and fault them in again (~20,000 faults per
    # update measured); kept, the second and later updates reuse them.
    assert default_faults > 5000, default_faults
    assert faults < default_faults / 20, (faults, default_faults)


@pytest.mark.parametrize("cores, load, processes, expected", [
    (2, 0.1, 1, 2), (2, 0.1, 2, 1), (2, 0.1, 4, 1), (64, 0.0, 1, 16), (16, 0.0, 4, 4),
    (2, 1.2, 1, 1),  # another busy program on a 2-core machine: one thread
    (2, 9.0, 1, 1), (16, 6.0, 1, 10),
])
def test_default_threads_use_the_idle_cores_shared_among_training_processes(monkeypatch, cores, load, processes,
                                                                            expected):
    import tools

    monkeypatch.setattr(tools.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(tools.os, "getloadavg", lambda: (load, load, load))
    assert tools.default_threads(processes) == expected


def test_usable_cores_follow_the_cpu_affinity(monkeypatch):
    """A container or `taskset` may allow fewer cores than the machine has: threads follow them."""
    import tools

    monkeypatch.setattr(tools.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(tools.os, "sched_getaffinity", lambda pid: {3})
    monkeypatch.setattr(tools.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert tools.usable_cores() == 1 and tools.default_threads() == 1
    monkeypatch.delattr(tools.os, "sched_getaffinity")  # platforms without affinity: the machine's count
    assert tools.usable_cores() == 64 and tools.default_threads() == 16


def test_set_seed_seeds_python_numpy_and_torch_alike():
    import random

    import numpy as np
    import torch

    import tools

    draws = []
    for _ in range(2):
        tools.set_seed(3)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
    assert draws[0] == draws[1]
    tools.set_seed(4)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) != draws[0]


def test_threads_zero_shares_the_idle_cores_among_the_processes(monkeypatch):
    import tools

    monkeypatch.setattr(tools.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(tools.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    before = tools.torch.get_num_threads()
    try:
        assert tools.set_threads(0, processes=4) == 2 and tools.torch.get_num_threads() == 2
        assert tools.set_threads(3, processes=4) == 3  # a number given is taken as it is
    finally:
        tools.torch.set_num_threads(before)


def test_folder_lock_writes_its_pid_over_what_an_earlier_run_left(tmp_path):
    import os

    import tools

    (tmp_path / ".lock").write_text("pid 123456789 (a run that ended long ago)\n")
    lock = tools.FolderLock(tmp_path)
    assert lock.acquire() is None
    try:
        assert (tmp_path / ".lock").read_text() == f"pid {os.getpid()}\n"
        assert tools.FolderLock(tmp_path).acquire() == f"pid {os.getpid()}"  # held: names the holder
    finally:
        lock.release()
    assert tools.FolderLock(tmp_path).acquire() is None  # released
