"""scripts/bench.py: the figures issue 10 names, printed as `name: value` and written with --json."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.bench_script import import_bench

ROOT = Path(__file__).resolve().parent.parent
CPU_FIGURES = ["seconds_per_update", "world_model_seconds", "behavior_seconds", "policy_steps_per_second",
               "replay_samples_per_second", "gflops_per_second", "matmul_peak_gflops", "peak_rss_mib"]


def test_bench_prints_every_figure_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--configs", "debug", "--task", "custom_reach",
         "--device", "cpu", "--threads", "1", "--iters", "2", "--json", str(out), "--op-times", str(tmp_path / "ops.txt"),
         "--launches", str(tmp_path / "launches.txt")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    printed = {}
    for line in run.stdout.splitlines():
        if not line.startswith("#") and ": " in line:
            name, value = line.split(": ", 1)
            printed[name] = float(value)
    assert list(printed) == CPU_FIGURES  # exactly these names, in this order, no CUDA figure on CPU
    assert all(math.isfinite(v) and v > 0 for v in printed.values()), printed
    # The two halves are timed inside the same updates: they add up to the whole (medians, so loosely).
    halves = printed["world_model_seconds"] + printed["behavior_seconds"]
    assert 0.7 * printed["seconds_per_update"] < halves < 1.3 * printed["seconds_per_update"]
    saved = json.loads(out.read_text())
    assert all(abs(saved[name] - printed[name]) <= 1e-3 * abs(printed[name]) + 1e-9 for name in CPU_FIGURES)
    assert len(saved["all_seconds"]["total"]) == 2  # --iters timed updates
    assert saved["argv"][-6:-4] == ["--json", str(out)]
    ops = (tmp_path / "ops.txt").read_text()
    assert "time inside aten ops" in ops and " mm\n" in ops and "backward of " in ops
    # forward ops name their project line (which file's lines reach the 50 slowest rows varies with load)
    assert re.search(r" (models|networks|distributions|exploration)\.py:\d+\n", ops), ops
    launches = (tmp_path / "launches.txt").read_text().splitlines()
    total = int(launches[0].removeprefix("launch-like calls per update: "))
    assert f"# launches_per_update: {total}" in run.stdout
    assert total == sum(int(line.split()[0]) for line in launches[2:]) and "aten::mm" in "\n".join(launches)


def test_op_timer_times_each_op_with_its_matmul_flops_and_calling_line() -> None:
    bench = import_bench()
    import torch

    a, w = torch.randn(64, 32), torch.randn(32, 16, requires_grad=True)
    timer = bench.OpTimer()
    with timer:
        (a @ w).relu().sum().backward()
    assert timer.flops["mm"] == 2.0 * 64 * 32 * 16 * 2  # forward a @ w, and a.T @ grad for w
    assert timer.flops["relu"] == 0.0 and timer.by_op["relu"] > 0
    sites = {(name, site): calls for (name, _, site), (calls, _, _) in timer.by_site.items()}
    forward_line = [site for (name, site) in sites if name == "mm" and not site.startswith("backward")]
    assert len(forward_line) == 1 and forward_line[0].startswith("tests/test_bench.py:")
    assert sites[("mm", "backward of MmBackward0")] == 1  # the weight gradient
    assert timer.calls > timer.views >= 1  # e.g. the transposed weight in mm's backward is a view
    table = timer.table(0.5)
    assert table.startswith("one update: 0.500 s") and "relu" in table


def test_launch_count_counts_eager_ops_and_compiled_kernels(monkeypatch) -> None:
    """count_launches: one per eager op (views and allocations launch nothing), one per gradient
    sum autograd makes, and one per kernel of compiled code, which fuses the three ops into one."""
    bench = import_bench()
    import torch
    import torch._inductor.config as inductor_config

    def f(x):
        return (x * 2 + 1).relu()

    x = torch.randn(8, 4)
    eager = bench.count_launches(lambda: f(x).t().reshape(-1))
    assert eager == {"aten::mul": 1, "aten::add": 1, "aten::relu": 1}, eager
    w = torch.randn(4, requires_grad=True)
    backward = bench.count_launches(lambda: ((x * w).sum() + (x + w).sum()).backward())
    # forward: mul, add, two sums, add; backward: the seed gradient (ones_like), grad * x, the two
    # paths' reductions to w's shape (sum) and autograd adding them (add)
    assert backward == {"aten::mul": 2, "aten::add": 3, "aten::sum": 4, "aten::ones_like": 1}, backward
    monkeypatch.setattr(inductor_config.cpp, "enable_kernel_profile", True)
    compiled = torch.compile(f)
    compiled(x)  # compiles
    assert bench.count_launches(lambda: compiled(x)) == {"inductor kernel": 1}


def test_unmeasured_figures_are_written_as_null() -> None:
    """A CUDA-graph update has no world-model/behaviour split (NaN): --json writes null for it, also
    inside the per-update lists (a NaN there made the H200 benchmarks exit 1 after printing)."""
    bench = import_bench()

    nan = float("nan")
    times = {"total": [0.02, 0.03], "world_model": [nan, nan]}
    assert bench.nan_to_none({"seconds_per_update": 0.02, "world_model_seconds": nan, "all_seconds": times}) == {
        "seconds_per_update": 0.02, "world_model_seconds": None,
        "all_seconds": {"total": [0.02, 0.03], "world_model": [None, None]}}
    json.dumps(bench.nan_to_none(times), allow_nan=False)


def test_bench_help_prints_usage_and_measures_nothing(tmp_path: Path) -> None:
    """--help prints the figure names and options and exits 0 (it used to run a whole benchmark)."""
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--help"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--iters N" in run.stdout and "seconds_per_update" in run.stdout
    assert not any(line.startswith("seconds_per_update: ") for line in run.stdout.splitlines())



@pytest.mark.parametrize("args, message", [
    (["--iters", "0"], "error: --iters expects a whole number >= 1 of timed updates, got '0'"),
    (["--iters", "abc"], "error: --iters expects a whole number >= 1 of timed updates, got 'abc'"),
    (["--bogus", "3"], "error: unknown option --bogus"),
    (["--json", "nodir/b.json"], "error: --json nodir/b.json: the folder nodir does not exist or is not writable"),
])
def test_bad_benchmark_options_stop_with_one_line_before_anything_is_timed(tmp_path: Path, args, message) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--configs", "debug", *args],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith(message), run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "seconds_per_update" not in run.stdout


def test_the_benchmarks_own_options_are_taken_out_of_the_command_line() -> None:
    bench = import_bench()
    rest, options = bench.split_argv(["--configs", "dmc_proprio", "--iters", "5", "--batch_size", "16",
                                      "--json", "out.json"])
    assert rest == ["--configs", "dmc_proprio", "--batch_size", "16"]
    assert options == {"--iters": "5", "--json": "out.json", "--profile": None, "--op-times": None,
                       "--launches": None}
    assert bench.split_argv([])[1]["--iters"] == "3"  # the default
    with pytest.raises(SystemExit, match=r"--iters needs a value, e.g. --iters 3"):
        bench.split_argv(["--configs", "dmc_proprio", "--iters"])
    with pytest.raises(SystemExit, match=r"--profile needs a value, e.g. --profile FILE"):
        bench.split_argv(["--profile"])


def test_a_task_that_cannot_be_made_here_is_benchmarked_on_stand_in_spaces(capsys) -> None:
    import gymnasium
    import config as config_lib

    bench = import_bench()
    cases = [(["--configs", "custom", "--task", "custom_task_name"], {"image": (64, 64, 3)}, (6,)),
             (["--configs", "dmc_proprio", "--task", "dmc_walker_fly"], {"vector": (24,)}, (6,)),
             (["--configs", "atari100k", "--task", "atari_no_such_game"], {"image": (64, 64, 3)}, 6)]
    for argv, shapes, actions in cases:  # actions: a Box's shape, or a Discrete's n
        obs_space, act_space = bench.task_spaces(config_lib.load_config(argv))
        assert {key: space.shape for key, space in obs_space.items()} == shapes, argv
        if isinstance(actions, int):
            assert isinstance(act_space, gymnasium.spaces.Discrete) and act_space.n == actions
        else:
            assert isinstance(act_space, gymnasium.spaces.Box) and act_space.shape == actions
            assert (act_space.low == -1).all() and (act_space.high == 1).all()
        assert "using stand-in spaces" in capsys.readouterr().out
    obs_space, act_space = bench.task_spaces(config_lib.load_config(["--configs", "custom", "--task",
                                                                    "custom_reach"]))
    assert obs_space["image"].shape == (64, 64, 3) and "vector" in obs_space  # the real env's spaces
