"""Time DeepMind Control frame rendering: MuJoCo's default offscreen settings (the paper's frames, envs.dmc's
default) vs the fast ones of `env.dmc.fast_render: True` (no shadows, no multisampling).

Usage: python scripts/bench_render.py [--task walker_walk] [--frames 100] [--size 64]
Prints `dmc_render_ms_per_frame_default: X` and `dmc_render_ms_per_frame_fast: Y` (wall-clock ms per
frame, averaged over the frames, physics stepping excluded), plus the backend in use.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from envs.dmc import configure_fast_offscreen, select_mujoco_gl, split_task_name  # noqa: E402


def ms_per_frame(domain: str, task: str, size: int, frames: int, fast: bool) -> float:
    """Mean milliseconds per physics.render call over `frames` frames (one warm-up frame excluded)."""
    from dm_control import suite
    env = suite.load(domain, task, task_kwargs={'random': 0})
    if fast:
        configure_fast_offscreen(env.physics.model, (size, size))
    env.reset()
    env.physics.render(size, size, camera_id=0)  # creates the context: not timed
    zero_action = np.zeros(env.action_spec().shape)
    total = 0.0
    for _ in range(frames):
        env.step(zero_action)
        start = time.perf_counter()
        env.physics.render(size, size, camera_id=0)
        total += time.perf_counter() - start
    env.close()
    return 1000.0 * total / frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--task', default='walker_walk')
    parser.add_argument('--frames', type=int, default=100)
    parser.add_argument('--size', type=int, default=64)
    args = parser.parse_args()
    select_mujoco_gl()
    from dm_control import suite
    domain, task = split_task_name(args.task, list(suite.ALL_TASKS))
    default = ms_per_frame(domain, task, args.size, args.frames, fast=False)
    fast = ms_per_frame(domain, task, args.size, args.frames, fast=True)
    print(f"MUJOCO_GL: {os.environ.get('MUJOCO_GL', '(unset)')}")
    print(f'dmc_render_ms_per_frame_default: {default:.2f}')
    print(f'dmc_render_ms_per_frame_fast: {fast:.2f}')


if __name__ == '__main__':
    main()
