"""Benchmark one DreamerV3 update (world model + actor + critic) for a config, on synthetic data.

    python3 scripts/bench.py --configs dmc_proprio --batch_size 16 --batch_length 64 --device cpu --iters 3
    python3 scripts/bench.py --configs dmc_vision --iters 3 --json bench.json

Takes the same `--configs ...` and `--key value` overrides as dreamer.py, plus `--iters N` (timed
updates after one warm-up update), `--json F` and `--profile F` (a torch.profiler table of two
updates, sorted by device time on CUDA and by CPU time otherwise, written to F) and, on a CPU,
`--op-times F` (each aten op of one update timed where it runs, with its GFLOP/s, by op and by
shapes and the line or autograd node running it; torch.profiler's own bookkeeping doubles a CPU
update's time and inflated the times it reported for large memory-bound ops 10-25x, see
BENCHMARKS.md) and `--launches F` (the launch-like calls of one update, compiled code included:
what bounds a GPU update, counted where no GPU is at hand). The observation and action spaces are
those of the config's task (made once); random batches of those shapes are fed to the real agent.
Prints one `name: value` line per figure:

  seconds_per_update        median over the timed updates (world model + actor + critic)
  world_model_seconds       median of the world-model part (NaN with --cuda_graphs True)
  behavior_seconds          median of the imagination + actor + critic part (likewise)
  policy_steps_per_second   env steps per second of agent.policy on a batch of envs.amount envs
  replay_samples_per_second sequences of batch_length per second sampled from replay.Replay
  gflops_per_second         the update's FLOPs (torch FlopCounterMode) / seconds_per_update
  matmul_peak_gflops        a plain 1024x1536 @ 1536x1536 float32 matmul on the same device/threads
  peak_rss_mib              peak resident memory of this process
  cuda_max_allocated_mib    (CUDA only) peak memory allocated by torch
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import gymnasium
import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, PROJECT_ROOT)
import config as config_lib  # noqa: E402
import exploration  # noqa: E402
from tools import keep_freed_cpu_memory, resolve_device, set_seed, set_threads, use_tf32_on_cuda  # noqa: E402


BENCH_OPTIONS = {"--iters": "3", "--json": None, "--profile": None, "--op-times": None, "--launches": None}
OUTPUT_OPTIONS = ("--json", "--profile", "--op-times", "--launches")  # each names a file the run writes


class BenchUsageError(ValueError):
    """A bad benchmark option or config; main() prints it as one line and exits 2, as dreamer.py does."""


def split_argv(argv: list[str]) -> tuple[list[str], dict[str, str | None]]:
    """Take the benchmark's own options (BENCH_OPTIONS) out of argv; the rest goes to
    config.load_config."""
    rest, options = [], dict(BENCH_OPTIONS)
    i = 0
    while i < len(argv):
        if argv[i] in BENCH_OPTIONS:
            if i + 1 >= len(argv):
                example = "3" if argv[i] == "--iters" else "FILE"
                raise SystemExit(f"{argv[i]} needs a value, e.g. {argv[i]} {example}")
            options[argv[i]] = argv[i + 1]
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    return rest, options


def checked_iters(value: str) -> int:
    """--iters as a whole number >= 1 (the median needs a timed update)."""
    try:
        iters = int(value)
    except ValueError:
        iters = 0
    if iters < 1:
        raise BenchUsageError(f"--iters expects a whole number >= 1 of timed updates, got {value!r}; e.g. --iters 3.")
    return iters


def check_output_paths(options: dict[str, str | None]) -> None:
    """Every file the run will write is writable before anything is timed (a benchmark of minutes
    must not end in a failed write)."""
    for option in OUTPUT_OPTIONS:
        if options[option] is None:
            continue
        path = Path(options[option])
        if path.is_dir():
            raise BenchUsageError(f"{option} {path} is a folder; name a file in it, e.g. {option} {path / 'out.txt'}.")
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise BenchUsageError(f"{option} {path}: the folder {path.parent} does not exist or is not writable; "
                                  "create it or name a file in a writable folder.")


def task_spaces(cfg) -> tuple[dict, object]:
    """Observation and action spaces of the config's task (one env made and closed); if the env
    cannot be made here, stand-in spaces: a 64x64x3 'image' and/or a 24-d 'vector' (as the
    encoder's key patterns allow) and 6 actions (the sizes of dmc_walker_walk)."""
    try:
        import envs

        env = envs.make_env(cfg, "train", 0)
        try:
            return dict(env.obs_space), env.act_space
        finally:
            if hasattr(env, "close"):
                env.close()
    except Exception as error:  # noqa: BLE001 - any failure: benchmark on stand-in shapes
        print(f"# cannot make {cfg.task} here ({type(error).__name__}: {error}); using stand-in spaces")
    obs_space = {}
    if re.fullmatch(cfg.encoder.cnn_keys, "image"):
        obs_space["image"] = gymnasium.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    if re.fullmatch(cfg.encoder.mlp_keys, "vector") or not obs_space:
        obs_space["vector"] = gymnasium.spaces.Box(-np.inf, np.inf, (24,), np.float32)
    if cfg.actor_dist == "onehot":
        return obs_space, gymnasium.spaces.Discrete(6)
    return obs_space, gymnasium.spaces.Box(-1.0, 1.0, (6,), np.float32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_updates(agent, batch, iters: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of `iters` updates: whole, and split into world model and behaviour (the split is
    NaN when the update replays as one CUDA graph)."""
    times: dict[str, list[float]] = {"total": [], "world_model": [], "behavior": []}
    for _ in range(iters):
        middle = [float("nan")]

        def mark_middle() -> None:
            sync(device)
            middle[0] = time.perf_counter()

        sync(device)
        start = time.perf_counter()
        agent.train_step(batch, after_world_model=mark_middle)
        sync(device)
        end = time.perf_counter()
        times["total"].append(end - start)
        times["world_model"].append(middle[0] - start)
        times["behavior"].append(end - middle[0])
    return times


def warmup_updates(cfg, agent) -> int:
    """Updates before timing: one (compilation), or the CUDA graph's eager warm-up plus capture."""
    return int(cfg.graph_warmup) + 2 if agent.graph_update is not None else 1


def nan_to_none(value):
    """The value with every float NaN in it (nested in dicts and lists) replaced by None, for JSON."""
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def update_flops(agent, batch) -> float:
    """FLOPs of one update counted by torch's FlopCounterMode (NaN, with a note, where the counter
    cannot see through the update, e.g. some compiled graphs)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter:
            states, _ = agent.train_world_model(batch)
            agent.train_behavior(states, batch)
    except Exception as error:  # noqa: BLE001 - a benchmark figure, not a reason to stop
        print(f"# FLOPs not counted ({type(error).__name__}: {error})")
        return float("nan")
    return float(counter.get_total_flops())


def write_profile(agent, batch, device: torch.device, path: str, updates: int = 2) -> None:
    """torch.profiler table of `updates` updates, sorted by device time on CUDA, and the number of
    device kernels launched per update (the figure that bounds eager speed on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        time_updates(agent, batch, updates, device)
    averages = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kernels = sum(e.count for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) \
        if device.type == "cuda" else 0
    Path(path).write_text(f"device kernels per update: {kernels / updates:.0f}\n\n"
                          + averages.table(sort_by=sort, row_limit=60))
    if device.type == "cuda":
        print(f"# kernels_per_update: {kernels / updates:.0f}")


THIS_FILE = str(Path(__file__).resolve())


def op_site() -> str:
    """Where the running op comes from: "backward of <autograd node>" inside a backward pass, else
    file:line of the innermost project frame outside this script."""
    node = torch._C._current_autograd_node()
    if node is not None:
        return f"backward of {node.name()}"
    for frame in reversed(traceback.extract_stack(limit=16)):
        if frame.filename.startswith(PROJECT_ROOT) and frame.filename != THIS_FILE:
            return f"{os.path.relpath(frame.filename, PROJECT_ROOT)}:{frame.lineno}"
    return "elsewhere"


def op_flops(func, args: tuple, kwargs: dict, out) -> float:
    """FLOPs of one aten call by torch's own formulas (those FlopCounterMode uses: matrix products,
    convolutions and their backward, attention); 0 for other ops."""
    count = flop_registry.get(func.overloadpacket)
    return float(count(*args, **kwargs, out_val=out)) if count is not None else 0.0


class OpTimer(TorchDispatchMode):
    """Wall time of every aten op run under it, by op and by (op, input shapes, op_site)."""

    def __init__(self):
        super().__init__()
        self.by_op: dict[str, float] = collections.defaultdict(float)
        self.flops: dict[str, float] = collections.defaultdict(float)
        self.by_site: dict[tuple, list] = collections.defaultdict(lambda: [0, 0.0, 0.0])  # calls, s, FLOPs
        self.calls = self.views = 0  # views launch no kernel: the rest bounds an eager GPU update

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        start = time.perf_counter()
        out = func(*args, **kwargs)
        seconds = time.perf_counter() - start
        name = func.overloadpacket.__name__
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))[:3]
        flops = op_flops(func, args, kwargs, out)
        self.by_op[name] += seconds
        self.flops[name] += flops
        site = self.by_site[(name, shapes, op_site())]
        site[0] += 1
        site[1] += seconds
        site[2] += flops
        self.calls += 1
        self.views += bool(func.is_view)
        return out

    def table(self, update_seconds: float, rows: int = 50) -> str:
        total = sum(self.by_op.values())
        lines = [f"one update: {update_seconds:.3f} s under the timer; time inside aten ops: {total:.3f} s "
                 f"(the rest is Python, dispatch and autograd bookkeeping); {self.calls} aten calls, "
                 f"{self.calls - self.views} of them not views (each a kernel launch on a GPU in eager mode)", "",
                 "seconds  share  GFLOP/s  op"]
        for name, seconds in sorted(self.by_op.items(), key=lambda kv: -kv[1])[:rows]:
            rate = f"{self.flops[name] / seconds / 1e9:7.1f}" if self.flops[name] else "      -"
            lines.append(f"{seconds:7.3f} {100 * seconds / total:5.1f}% {rate}  {name}")
        lines += ["", "seconds  calls  GFLOP/s  op, input shapes, where (op_site)"]
        for (name, shapes, site), (calls, seconds, flops) in sorted(self.by_site.items(), key=lambda kv: -kv[1][1])[:rows]:
            rate = f"{flops / seconds / 1e9:7.1f}" if flops else "      -"
            lines.append(f"{seconds:7.3f} {calls:6d} {rate}  {name} {list(shapes)} {site}")
        return "\n".join(lines) + "\n"


def write_op_times(agent, batch, device: torch.device, path: str) -> None:
    """OpTimer's table of one update, written to `path` (CPU only: CUDA ops return before they run)."""
    if device.type != "cpu":
        print("# --op-times times CPU ops only (CUDA kernels run asynchronously): use --profile on CUDA")
        return
    timer = OpTimer()
    with timer:
        seconds = time_updates(agent, batch, 1, device)["total"][0]
    Path(path).write_text(timer.table(seconds))


# Calls that launch no kernel: allocations and a view whose schema does not say so (other views are
# told apart by their schema, see is_view_op).
NO_KERNEL_OPS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resize_", "aten::set_",
                 "aten::lift_fresh", "aten::_unsafe_view"}


def is_view_op(name: str) -> bool:
    """Whether the aten op `aten::name` returns a view of its input (its tensor overloads do; others,
    such as slice.t on lists, are TorchScript's)."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    return packet is not None and any(getattr(packet, o).is_view for o in packet.overloads())


def launch_like(event) -> bool:
    """A profiled CPU event that a GPU would run as (about) one kernel launch: a kernel of
    inductor's C++ code (named `*cpp_fused_*` with inductor's kernel profile on), or an aten call made
    outside any other aten call that is neither a view nor an allocation (an eager op, an autograd
    gradient sum, a library product called from compiled code)."""
    if "cpp_fused" in event.name:
        return True
    if not event.name.startswith("aten::") or event.name in NO_KERNEL_OPS or is_view_op(event.name):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def count_launches(run: Callable[[], object]) -> collections.Counter:
    """Launch-like calls (see launch_like) of run(), by op name ("inductor kernel" for compiled
    code's kernels; they are profiled only if torch._inductor.config.cpp.enable_kernel_profile was
    set before compiling)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return collections.Counter("inductor kernel" if "cpp_fused" in e.name else e.name
                               for e in prof.events() if launch_like(e))


def write_launches(agent, batch, device: torch.device, path: str) -> None:
    """count_launches of one update with imagination's steps stacked as on CUDA, written to
    `path` (CPU only: on CUDA, --profile counts the device kernels themselves)."""
    if device.type != "cpu":
        print("# --launches counts on a CPU: use --profile on CUDA")
        return
    stacked = agent.task.stack_steps
    agent.set_stack_steps(True)
    time_updates(agent, batch, 1, device)  # compiles what the stacked steps add
    counts = count_launches(lambda: time_updates(agent, batch, 1, device))
    agent.set_stack_steps(stacked)
    total = sum(counts.values())
    Path(path).write_text(f"launch-like calls per update: {total}\n\n"
                          + "".join(f"{n:6d}  {name}\n" for name, n in counts.most_common()))
    print(f"# launches_per_update: {total}")


def policy_steps_per_second(agent, obs_space: dict, amount: int, seconds: float = 1.0) -> float:
    obs = {k: np.zeros((amount, *s.shape), s.dtype) for k, s in obs_space.items()}
    obs["is_first"] = np.zeros(amount, bool)
    _, state = agent.policy(obs, None, "train")
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        _, state = agent.policy(obs, state, "train")
        steps += amount
    return steps / (time.perf_counter() - start)


def replay_samples_per_second(obs_space: dict, act_space, batch_size: int, length: int,
                              seconds: float = 1.0) -> float:
    from replay import Replay

    steps = max(4 * length, 5000)
    replay = Replay(capacity=steps, batch_length=length, seed=0)
    action = np.zeros(exploration.action_size(act_space, "onehot" if hasattr(act_space, "n") else "normal"),
                      np.float32)
    for t in range(steps):
        step = {k: np.zeros(s.shape, s.dtype) for k, s in obs_space.items()
                if k not in ("is_first", "is_last", "is_terminal")}
        step.update(action=action, reward=np.float32(0), is_first=t % 500 == 0, is_last=t % 500 == 499,
                    is_terminal=False)
        replay.add(step)
    replay.sample(batch_size)
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        replay.sample(batch_size)
        count += batch_size
    return count / (time.perf_counter() - start)


def matmul_peak_gflops(device: torch.device, repeats: int = 30) -> float:
    a = torch.randn(1024, 1536, device=device)
    b = torch.randn(1536, 1536, device=device)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * 1024 * 1536 * 1536 / best / 1e9


def main(argv: list[str]) -> dict[str, float]:
    if {"-h", "--help"} & set(argv):
        print(__doc__.strip())
        raise SystemExit(0)
    rest, options = split_argv(argv)
    try:
        iters, json_path = checked_iters(options["--iters"]), options["--json"]
        check_output_paths(options)
        cfg = config_lib.load_config(rest)
        resolve_device(cfg.device)
    except ValueError as error:  # BenchUsageError, config.ConfigError, resolve_device's: each one line
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    threads = set_threads(int(cfg.threads))
    if options["--launches"]:  # before anything compiles: inductor's C++ kernels then show in the profile
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    keep_freed_cpu_memory()  # as dreamer.py does
    device = resolve_device(cfg.device)
    use_tf32_on_cuda(device, bool(cfg.deterministic))
    set_seed(int(cfg.seed))
    obs_space, act_space = task_spaces(cfg)
    agent = exploration.make_agent(obs_space, act_space, cfg, device)
    batch = exploration.synthetic_batch(obs_space, act_space, int(cfg.batch_size), int(cfg.batch_length), device)
    print(f"# task {cfg.task}, obs {({k: tuple(s.shape) for k, s in obs_space.items()})}, act {act_space}, "
          f"device {device}, threads {threads}, precision {cfg.precision}, compile {cfg.compile}, "
          f"cuda_graphs {agent.graph_update is not None}", flush=True)
    time_updates(agent, batch, warmup_updates(cfg, agent), device)  # warm-up (compilation, graph capture)
    times = time_updates(agent, batch, iters, device)
    if options["--profile"]:  # before the FLOP count: compiled code runs eagerly after a FlopCounterMode
        write_profile(agent, batch, device, options["--profile"])
    if options["--op-times"]:
        write_op_times(agent, batch, device, options["--op-times"])
    if options["--launches"]:
        write_launches(agent, batch, device, options["--launches"])
    seconds = statistics.median(times["total"])
    figures = {
        "seconds_per_update": lambda: seconds,
        "world_model_seconds": lambda: statistics.median(times["world_model"]),
        "behavior_seconds": lambda: statistics.median(times["behavior"]),
        "policy_steps_per_second": lambda: policy_steps_per_second(agent, obs_space, int(cfg.envs.amount)),
        "replay_samples_per_second": lambda: replay_samples_per_second(
            obs_space, act_space, int(cfg.batch_size), int(cfg.batch_length)),
        "gflops_per_second": lambda: update_flops(agent, batch) / seconds / 1e9,
        "matmul_peak_gflops": lambda: matmul_peak_gflops(device),
        "peak_rss_mib": lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        figures["cuda_max_allocated_mib"] = lambda: torch.cuda.max_memory_allocated(device) / 2**20
    results = {}
    for name, figure in figures.items():  # printed as measured, so a cut-off run still reports
        results[name] = figure()
        print(f"{name}: {results[name]:.4g}", flush=True)
    if json_path:  # a figure not measured (NaN) is null
        Path(json_path).write_text(json.dumps({**nan_to_none(results), "argv": argv,
                                               "all_seconds": nan_to_none(times)}, indent=2, allow_nan=False))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
