"""Replay benchmark: sampling speed with few vs many stored episodes, and memory per step.

    python3 scripts/bench_replay.py [--batch_size 16] [--batch_length 64] [--memory_steps 100000]

Prints `replay_samples_per_second` (windows per second) and the time per sampled window with 10 and
with 10,000 stored episodes (the two must be about equal: sampling is O(1) in the episode count),
then the resident memory that `--memory_steps` steps of 64x64x3 uint8 images take, and the
estimate for 1M steps.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from replay import Replay  # noqa: E402


def fill_episodes(
    replay: Replay, episodes: int, length: int, image_shape: tuple, workers: int = 4
) -> None:
    """`episodes` episodes of `length` steps, spread over `workers` envs added round-robin (as the
    training loop does), so the memory layout is the same whatever the episode count."""
    image = np.zeros(image_shape, np.uint8)
    action = np.zeros(6, np.float32)
    for index in range(episodes * length):
        worker, t_global = index % workers, index // workers
        t = t_global % length
        replay.add(
            {"image": image, "action": action, "reward": np.float32(t_global // length),
             "is_first": t == 0, "is_last": t == length - 1, "is_terminal": False},
            worker=worker,
        )


def seconds_per_window(episodes: int, steps: int, args: argparse.Namespace) -> float:
    replay = Replay(capacity=steps, batch_length=args.batch_length, seed=0)
    fill_episodes(replay, episodes, steps // episodes, (16, 16, 3))
    replay.sample(args.batch_size)  # warm-up
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        replay.sample(args.batch_size)
        count += args.batch_size
    return (time.perf_counter() - start) / count


def resident_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * resource.getpagesize()


def memory_per_step(steps: int) -> float:
    before = resident_bytes()
    replay = Replay(capacity=steps, batch_length=64, seed=0)
    fill_episodes(replay, max(1, steps // 500), 500, (64, 64, 3))
    used = resident_bytes() - before
    assert len(replay) == steps
    return used / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--batch_length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200_000, help="stored steps when timing")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per configuration")
    parser.add_argument("--memory_steps", type=int, default=50_000)
    args = parser.parse_args()
    times = {episodes: seconds_per_window(episodes, args.steps, args) for episodes in (10, 10_000)}
    for episodes, seconds in times.items():
        print(f"episodes={episodes} replay_samples_per_second={1 / seconds:.0f} "
              f"per_sample_us={seconds * 1e6:.1f}")
    print(f"per_sample_ratio_10000_vs_10={times[10_000] / times[10]:.2f}")
    per_step = memory_per_step(args.memory_steps)
    print(f"memory_steps={args.memory_steps} bytes_per_step={per_step:.0f} "
          f"estimated_GiB_for_1M_steps={per_step * 1e6 / 2**30:.2f}")


if __name__ == "__main__":
    main()
