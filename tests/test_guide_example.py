"""The guide's example env, copied as written, trains correctly (issue 4, SPEC.md).

`GuideEnv` below is the guide's `CustomEnv` (seed-custom-env-guide.ja.md, section 1) with only its name
changed. It wraps `YourCustomEnvironment`, here a toy gymnasium-style env: 64x64x3 uint8 frames whose
red channel counts the env steps of the episode, Box(2) actions in [-2, 2], reward 1 per env step.
Two variants: `guide_toy` ends every episode by `truncated` after 30 env steps and renders
gymnasium-style (`render()`); `guide_toydone` ends by `done` (terminated) after 20 env steps and
renders old-gym-style (`render(mode=...)`, refusing anything but 'rgb_array').

The guide's example says `is_first: False` on every observation, omits `is_last` / `is_terminal` and
renders with `render(mode='rgb_array')`; each variant is registered as suite `guide` and run in-process
through `dreamer.train`, then the replay chunks on disk and the TensorBoard video are checked.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

import config as config_lib
import dreamer
import envs
from envs import wrappers
from helpers import guide_env

STEPS = 200
RENDER_RED_GREEN = (20, 200)  # render() frames: solid red and green, blue = 8 x env step;
                               # observations have green 0


# --- the user's environment ------------------------------------------------------------------------


class ToyEnv:
    """Episodes of `length` env steps that end with `truncated` or with `done`."""

    ending = 'truncated'
    length = 30

    def __init__(self) -> None:
        self.action_space = gym.spaces.Box(-2.0, 2.0, (2,), np.float32)
        self.observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        self._t = 0
        return self._frame(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        action = np.asarray(action)
        if action.shape != (2,) or np.any(np.abs(action) > 2.0):
            raise ValueError(f'ToyEnv expects 2 numbers in [-2, 2], got {action!r}')
        self._t += 1
        over = self._t >= self.length
        done, truncated = over and self.ending == 'done', over and self.ending == 'truncated'
        return self._frame(), 1.0, done, truncated, {}

    def _frame(self) -> np.ndarray:
        frame = np.zeros((64, 64, 3), np.uint8)  # (H, W, 3)
        frame[..., 0] = self._t  # red channel: env steps since reset
        return frame

    def _picture(self) -> np.ndarray:
        color = np.array([*RENDER_RED_GREEN, 8 * self._t], np.uint8)
        return np.broadcast_to(color, (64, 64, 3)).copy()  # (H, W, 3)


class TruncatingToy(ToyEnv):
    """Ends by `truncated` after 30 env steps; gymnasium-style render()."""

    def render(self) -> np.ndarray:
        return self._picture()


class TerminatingToy(ToyEnv):
    """Ends by `done` after 20 env steps; old gym-style render(mode=...)."""

    ending = 'done'
    length = 20

    def render(self, mode: str = 'human') -> np.ndarray:
        if mode != 'rgb_array':
            raise ValueError(f"TerminatingToy renders only mode='rgb_array', got {mode!r}")
        return self._picture()


VARIANTS = {'toy': TruncatingToy, 'toydone': TerminatingToy}


def YourCustomEnvironment(name: str, **kwargs: Any) -> ToyEnv:  # noqa: N802 -- the guide's name
    return VARIANTS[name]()


# --- the guide's example, as written (class renamed) -----------------------------------------------


GuideEnv = guide_env.GuideEnv


# --- one training run per variant ------------------------------------------------------------------


def read_replay(replay_dir: Path) -> dict[str, np.ndarray]:
    """Every step on disk in insertion order: {key: (steps, ...)} from the npz chunks of replay.py."""
    chunks = []
    for path in sorted(replay_dir.glob('*.npz')):
        with np.load(path) as data:
            chunks.append({key: data[key] for key in data.files})
    assert chunks, f'no replay chunks under {replay_dir}'
    steps = {key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]}
    order = np.argsort(steps['_order'], kind='stable')
    return {key: value[order] for key, value in steps.items()}


@pytest.fixture(scope='module', params=sorted(VARIANTS), ids=['truncated', 'done'])
def guide_run(request, tmp_path_factory):
    """Trains `guide_<variant>` for STEPS agent steps in this process; returns (config, logdir, counters)."""
    variant = request.param
    logdir = tmp_path_factory.mktemp(f'guide_{variant}')
    config = config_lib.load_config(['--configs', 'debug', 'custom', '--task', f'guide_{variant}',
                                     '--logdir', str(logdir), '--steps', str(STEPS),
                                     '--envs.parallel', 'none'])
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(envs.REGISTRY, 'guide', GuideEnv)
        patch.setattr(guide_env, 'YourCustomEnvironment', YourCustomEnvironment)
        counters = dreamer.train(config)
    return config, logdir, VARIANTS[variant], counters


def test_run_finishes(guide_run):
    config, logdir, _, counters = guide_run
    assert counters.step == STEPS and counters.updates > 0
    assert f'finished: {STEPS} steps' in (logdir / 'train.log').read_text()


def test_replay_flags_follow_the_episode_not_the_env(guide_run):
    """is_first exactly at each reset, is_last at each episode end, is_terminal only for `done`."""
    config, logdir, toy, _ = guide_run
    replay = read_replay(logdir / 'replay')
    env_step = replay['image'][:, 0, 0, 0].astype(int)  # (N,) red channel = env steps since reset
    first, last, terminal = (replay[k].astype(bool) for k in ('is_first', 'is_last', 'is_terminal'))
    assert len(env_step) == STEPS

    per_episode = toy.length // config.action_repeat + 1  # the reset plus the agent steps
    assert np.flatnonzero(first).tolist() == list(range(0, STEPS, per_episode))
    assert np.array_equal(first, env_step == 0)
    assert np.array_equal(last, env_step == toy.length)
    assert np.flatnonzero(last).tolist() == list(range(per_episode - 1, STEPS, per_episode))
    if toy.ending == 'done':
        assert np.array_equal(terminal, last)
    else:
        assert not terminal.any(), 'truncated episodes must never be marked is_terminal'


def test_replay_rewards_and_actions(guide_run):
    """Rewards are summed over the action repeat (none on the reset step); actions stay in [-1, 1]."""
    config, logdir, _, _ = guide_run
    replay = read_replay(logdir / 'replay')
    first = replay['is_first'].astype(bool)
    assert np.all(replay['reward'][first] == 0.0)
    assert np.all(replay['reward'][~first] == float(config.action_repeat))
    actions = replay['action']  # (N, 2)
    assert actions.shape == (STEPS, 2) and np.all(actions[first] == 0)
    assert np.all(np.abs(actions) <= 1.0 + 1e-6) and actions[~first].std() > 0


def test_eval_video_comes_from_render(guide_run):
    """The eval video is written and shows render(mode='rgb_array') frames, not observations."""
    from PIL import Image, ImageSequence
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, logdir, _, _ = guide_run
    accumulator = EventAccumulator(str(logdir), size_guidance={'images': 0})
    accumulator.Reload()
    tags = [tag for tag in accumulator.Tags()['images'] if tag.startswith('eval/video')]
    assert tags, f"no eval video in TensorBoard; image tags: {accumulator.Tags()['images']}"
    video = accumulator.Images(tags[0])[-1]
    gif = Image.open(io.BytesIO(video.encoded_image_string))
    frames = np.stack([np.asarray(f.convert('RGB')) for f in ImageSequence.Iterator(gif)])
    assert frames.shape[1:] == (64, 64, 3) and len(frames) > 1, frames.shape  # (T, H, W, 3)
    colors = frames.reshape(len(frames), -1, 3)[:, 0].astype(int)  # (T, 3): frames are solid
    assert np.abs(colors[:, :2] - RENDER_RED_GREEN).max() <= 4, colors
    assert len(np.unique(colors[:, 2])) > 1, colors  # successive render() frames, not one repeated


class RaisingRenderToy(TruncatingToy):
    """render() raises, as the guide's `self._env.render(mode='rgb_array')` does when it reaches a
    gymnasium-style render() without a project wrapper in between."""

    def render(self) -> np.ndarray:
        raise TypeError("RaisingRenderToy.render() got an unexpected keyword argument 'mode'")


def test_a_render_that_raises_costs_the_videos_not_the_run(tmp_path):
    """Both evaluations (steps 200 and 400) run; the failure is logged once; no video is written."""
    config = config_lib.load_config(['--configs', 'debug', 'custom', '--task', 'guide_broken',
                                     '--logdir', str(tmp_path), '--steps', '400', '--envs.parallel', 'none'])
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(envs.REGISTRY, 'guide', GuideEnv)
        patch.setattr(guide_env, 'YourCustomEnvironment', lambda name, **kwargs: RaisingRenderToy())
        counters = dreamer.train(config)
    assert counters.step == 400
    log = (tmp_path / 'train.log').read_text()
    expected = ("WARNING no eval videos from now on: env 0's render() failed (TypeError: "
                "RaisingRenderToy.render() got an unexpected keyword argument 'mode'). Training and evaluation go on.")
    assert log.count(expected) == 1, log
    evals = [line for line in log.splitlines() if 'eval/return' in line]
    assert len(evals) == 2, evals
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path), size_guidance={'images': 0})
    acc.Reload()
    assert not [tag for tag in acc.Tags()['images'] if tag.startswith('eval/video')]


def test_guide_env_forwarding_kwargs_to_an_env_that_takes_only_name_trains(tmp_path):
    """The guide's step 1 literally: its CustomEnv, registered as 'custom' (step 2), passes **kwargs
    on to `YourCustomEnvironment(name, **kwargs)`, whose constructor takes only `name`. The defaults
    give the custom suite no options, so the guide's own commands run."""
    names = []

    def only_name(name):  # the user's environment: no options
        names.append(name)
        return TruncatingToy()

    logdir = tmp_path / 'custom_debug'
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(envs.REGISTRY, 'custom', GuideEnv)
        patch.setattr(guide_env, 'YourCustomEnvironment', only_name)
        rc = dreamer.main(['--configs', 'debug', 'custom', '--task', 'custom_toy', '--logdir', str(logdir),
                           '--steps', '40', '--prefill', '20', '--eval_every', '0', '--envs.parallel', 'none',
                           '--device', 'cpu'])
    assert rc == 0
    assert names and set(names) == {'toy'}
    assert 'finished: 40 steps' in (logdir / 'train.log').read_text()
