"""DeepMind Control suite: real dm_control envs, rendering, proprio-only, truncation, names."""
import ctypes.util
import os

import numpy as np
import pytest

from envs import dmc
from envs.dmc import DMC


def gl_libraries_present() -> bool:
    """True when the loader finds libEGL or libOSMesa (scripts/install.sh checks `ldconfig -p` alike)."""
    return any(ctypes.util.find_library(name) for name in ('EGL', 'OSMesa'))


# The tests that render skip only on a non-root machine without any GL library: install.sh could not
# apt-get them there and printed the command. As root (CI) install.sh installs them, so a broken
# backend still fails these tests.
needs_headless_gl = pytest.mark.skipif(
    not gl_libraries_present() and getattr(os, 'geteuid', lambda: -1)() != 0,
    reason=f'no EGL or OSMesa library and not root: run `sudo {dmc.APT_RENDER_LIBS}` (scripts/install.sh '
           'printed it) for headless DMC rendering')


def check_obs(obs, space):
    assert set(obs) == set(space), (sorted(obs), sorted(space))
    for key, box in space.items():
        assert obs[key].shape == box.shape and obs[key].dtype == box.dtype, (key, obs[key].shape, box)


@needs_headless_gl
def test_walker_walk_spaces_and_steps():
    env = DMC('walker_walk', size=(64, 64), camera=-1, image=True, proprio=True, seed=0)
    space = env.obs_space
    assert space['image'].shape == (64, 64, 3) and space['image'].dtype == np.uint8
    assert space['orientations'].shape == (14,) and space['height'].shape == (1,)  # scalar -> (1,)
    assert space['velocity'].shape == (9,) and space['velocity'].dtype == np.float32
    assert env.act_space.shape == (6,)
    np.testing.assert_array_equal(env.act_space.low, -np.ones(6, np.float32))
    obs, info = env.reset()
    check_obs(obs, space)
    rng = np.random.default_rng(0)
    for _ in range(5):
        obs, reward, terminated, truncated, info = env.step(rng.uniform(-1, 1, 6))
        check_obs(obs, space)
        assert isinstance(reward, float) and 0.0 <= reward <= 1.0
        assert terminated is False and truncated is False
    env.close()


@needs_headless_gl
def test_pixels_are_a_real_frame():
    env = DMC('cartpole_balance', image=True, proprio=False, seed=0)
    obs, _ = env.reset()
    assert list(obs) == ['image']
    image = obs['image']
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert image.std() > 10.0, 'frame is (nearly) blank'
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20
    np.testing.assert_array_equal(env.render(), image)


@needs_headless_gl
def test_fast_offscreen_settings_are_applied():
    env = DMC('cartpole_balance', size=(64, 48), image=True, proprio=False)
    vis = env._env.physics.model.vis
    assert (vis.global_.offheight, vis.global_.offwidth) == (64, 48)
    assert vis.quality.shadowsize == 0 and vis.quality.offsamples == 0
    assert env.reset()[0]['image'].shape == (64, 48, 3)


def test_proprio_only_never_renders(monkeypatch):
    env = DMC('walker_walk', image=False, proprio=True, seed=0)
    calls = []
    original = env._env.physics.render
    monkeypatch.setattr(env._env.physics, 'render', lambda *a, **k: calls.append(a) or original(*a, **k))
    obs, _ = env.reset()
    for _ in range(3):
        obs, *_ = env.step(np.zeros(6))
    assert 'image' not in obs and 'image' not in env.obs_space
    assert calls == []
    assert env.render().shape == (64, 64, 3)  # on demand (eval videos) it still renders
    assert len(calls) == 1


def test_time_limit_is_truncation_not_termination():
    env = DMC('cartpole_balance', image=False, proprio=True, seed=1)
    env.reset()
    for step in range(1, 1001):
        _, _, terminated, truncated, info = env.step(np.zeros(1))
        assert terminated is False
        if truncated:
            break
    assert step == 1000 and truncated is True and info['discount'] == 1.0


def test_task_names_with_underscores_resolve():
    env = DMC('ball_in_cup_catch', image=False, seed=0)
    assert (env._domain, env._task) == ('ball_in_cup', 'catch')
    assert set(env.obs_space) == {'position', 'velocity'}
    pairs = [('point_mass', 'easy'), ('point', 'mass_easy_x')]
    assert dmc.split_task_name('point_mass_easy', pairs) == ('point_mass', 'easy')


def test_unknown_task_error_lists_tasks():
    with pytest.raises(ValueError, match=r"Unknown DeepMind Control task 'dmc_walker_fly'.*walker_walk"):
        DMC('walker_fly')


def test_empty_observation_is_rejected():
    with pytest.raises(ValueError, match=r'image=False and proprio=False'):
        DMC('walker_walk', image=False, proprio=False)


def test_default_camera_is_papers_choice():
    assert dmc.default_camera('quadruped', -1) == 2
    assert dmc.default_camera('walker', -1) == 0
    assert dmc.default_camera('quadruped', 1) == 1


def test_user_mujoco_gl_is_respected(monkeypatch):
    monkeypatch.setenv('MUJOCO_GL', 'osmesa')
    assert dmc.select_mujoco_gl() == 'osmesa'


@needs_headless_gl
def test_a_headless_backend_works_here():
    assert dmc.backend_opens_context('egl') or dmc.backend_opens_context('osmesa')
    assert not dmc.backend_opens_context('no_such_backend')
