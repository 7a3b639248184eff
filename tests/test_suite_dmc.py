"""DeepMind Control suite: real dm_control envs, rendering, proprio-only, truncation, names."""
import ctypes.util
import os
import sys

import numpy as np
import pytest

from envs import dmc
from envs.dmc import DMC
from helpers.paper_envs import paper_env, unwrap


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
def test_frames_are_the_papers_unless_fast_render():
    """By default a frame is dm_control's own render (shadows, 4x multisampling), as in the paper's
    code; fast_render drops both and changes many pixels."""
    from dm_control import suite
    env = DMC('walker_walk', image=True, proprio=False, seed=0)
    vis = env._env.physics.model.vis
    assert (vis.global_.offheight, vis.global_.offwidth) == (64, 64)  # only the buffer is sized
    assert vis.quality.shadowsize == 2048 and vis.quality.offsamples == 4  # MuJoCo's defaults
    reference = suite.load('walker', 'walk', task_kwargs={'random': 0})
    reference.reset()
    paper = env.reset()[0]['image']
    np.testing.assert_array_equal(paper, reference.physics.render(64, 64, camera_id=0))
    fast = DMC('walker_walk', size=(64, 48), image=True, proprio=False, fast_render=True, seed=0)
    vis = fast._env.physics.model.vis
    assert (vis.global_.offheight, vis.global_.offwidth) == (64, 48)
    assert vis.quality.shadowsize == 0 and vis.quality.offsamples == 0
    assert fast.reset()[0]['image'].shape == (64, 48, 3)
    fast = DMC('walker_walk', image=True, proprio=False, fast_render=True, seed=0).reset()[0]['image']
    changed = np.abs(fast.astype(int) - paper.astype(int)).max(-1) > 16
    assert changed.mean() > 0.1, changed.mean()  # the walker's shadow is gone


@needs_headless_gl
def test_quadruped_is_seen_from_camera_2():
    env = DMC('quadruped_walk', image=True, proprio=False, seed=0)
    image = env.reset()[0]['image']
    physics = env._env.physics
    np.testing.assert_array_equal(image, physics.render(64, 64, camera_id=2))
    assert np.any(image != physics.render(64, 64, camera_id=0))
    assert DMC('walker_walk', image=False, camera=1)._camera == 1


@needs_headless_gl
def test_action_repeat_sums_rewards_and_renders_once_per_agent_step(monkeypatch):
    once = DMC('walker_walk', action_repeat=1, seed=3)
    twice = DMC('walker_walk', action_repeat=2, seed=3)
    calls = []
    original = twice._env.physics.render
    monkeypatch.setattr(twice._env.physics, 'render', lambda *a, **k: calls.append(a) or original(*a, **k))
    once.reset()
    twice.reset()
    rng = np.random.default_rng(0)
    for _ in range(4):
        action = rng.uniform(-1, 1, 6)
        first, second = once.step(action), once.step(action)
        calls.clear()
        obs, reward, terminated, truncated, _ = twice.step(action)
        assert len(calls) == 1  # one frame per agent step, not one per physics step
        assert reward == pytest.approx(first[1] + second[1])
        np.testing.assert_array_equal(obs['image'], second[0]['image'])
        np.testing.assert_array_equal(obs['orientations'], second[0]['orientations'])
    with pytest.raises(ValueError, match=r'action_repeat must be a whole number >= 1; got 0'):
        DMC('walker_walk', action_repeat=0)


def test_dmc_proprio_episode_is_500_agent_steps_never_terminal():
    config, env = paper_env('dmc_proprio', 'dmc_cartpole_balance')
    assert config.action_repeat == 2 and config.time_limit == 0 and config.env.dmc.image is False
    stack, inner = unwrap(env, DMC)
    assert stack == ['Flags', 'NormalizeActions'] and inner._repeat == 2  # the env repeats itself
    obs, _ = env.reset()
    assert set(obs) == {'position', 'velocity', 'reward', 'is_first', 'is_last', 'is_terminal'}
    for step in range(1, 501):
        obs, *_ = env.step(np.zeros(1))
        assert obs['is_terminal'] is False
        if obs['is_last']:
            break
    assert step == 500 and obs['is_last'] is True  # 1000 env steps at action repeat 2


@needs_headless_gl
def test_dmc_vision_sees_only_the_image():
    config, env = paper_env('dmc_vision', 'dmc_walker_walk')
    assert config.env.dmc.proprio is False and config.action_repeat == 2
    assert config.encoder.cnn_keys == 'image' and config.encoder.mlp_keys == '$^'
    obs, _ = env.reset()
    assert set(env.obs_space) == {'image'} and obs['image'].shape == (64, 64, 3)


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
    cup = DMC('cup_catch', image=False, seed=0)  # the paper's name for it
    assert (cup._domain, cup._task) == ('ball_in_cup', 'catch')
    pairs = [('point_mass', 'easy'), ('point', 'mass_easy_x')]
    assert dmc.split_task_name('point_mass_easy', pairs) == ('point_mass', 'easy')


def test_unknown_task_error_lists_tasks():
    with pytest.raises(ValueError, match=r"Unknown DeepMind Control task 'dmc_walker_fly'.*walker_walk"):
        DMC('walker_fly')


def test_a_misspelt_task_is_answered_with_the_closest_names_first():
    with pytest.raises(ValueError, match=r"got 'walker_wakl'\. Close matches: dmc_walker_walk, .*Pick one of"):
        DMC('walker_wakl')
    with pytest.raises(ValueError, match=r"got 'Walker_Walk'\. Close matches: dmc_walker_walk,"):
        DMC('Walker_Walk')


def test_a_camera_the_model_lacks_is_refused_naming_the_option_and_the_ids():
    """walker has two cameras: 7 would fail only at the first frame, in a worker, as MuJoCo's error."""
    for camera in (7, 2, -2):
        with pytest.raises(ValueError, match=rf"'walker_walk' has 2 camera\(s\), ids 0\.\.1; got "
                                             rf"--env\.dmc\.camera {camera}\. .*-1 for the paper's view"):
            DMC('walker_walk', camera=camera, image=False)
    assert DMC('walker_walk', camera=1, image=False)._camera == 1
    assert DMC('quadruped_walk', camera=-1, image=False)._camera == 2


def test_empty_observation_is_rejected():
    with pytest.raises(ValueError, match=r'image=False and proprio=False'):
        DMC('walker_walk', image=False, proprio=False)


def test_default_camera_is_papers_choice():
    assert dmc.default_camera('quadruped', -1) == 2
    assert dmc.default_camera('walker', -1) == 0
    assert dmc.default_camera('quadruped', 1) == 1
    assert dmc.default_camera('quadruped', 0) == 0  # an explicit camera 0 is kept, not replaced by 2


def test_an_action_repeat_that_does_not_divide_the_time_limit_still_ends_the_episode():
    env = DMC('cartpole_balance', image=False, proprio=True, action_repeat=3, seed=0)
    env.reset()
    for step in range(1, 400):
        _, reward, terminated, truncated, _ = env.step(np.zeros(1))
        if truncated or terminated:
            break
    # 1000 physics steps = 333 full repeats and one of a single step; that last agent step ends the
    # episode (no step past the end, which would silently restart the task)
    assert (step, truncated, terminated) == (334, True, False)
    assert 0.0 < reward <= 1.0  # one physics step's reward, not three


def first_observation(env: DMC, seed=None) -> np.ndarray:
    obs, _ = env.reset() if seed is None else env.reset(seed=seed)
    return np.concatenate([obs['position'], obs['velocity']])


def test_the_seed_picks_the_initial_state_at_construction_and_at_reset():
    one, again, other = (DMC('cartpole_swingup', image=False, seed=seed) for seed in (1, 1, 2))
    starts = [first_observation(env) for env in (one, again, other)]  # each env's first episode
    np.testing.assert_array_equal(starts[0], starts[1])
    assert np.any(starts[0] != starts[2])  # seed=, not a fixed 0
    np.testing.assert_array_equal(first_observation(one, seed=7), first_observation(other, seed=7))
    np.testing.assert_array_equal(first_observation(one, seed=7), first_observation(again, seed=7))


def test_user_mujoco_gl_is_respected(monkeypatch):
    monkeypatch.setenv('MUJOCO_GL', 'osmesa')
    assert dmc.select_mujoco_gl() == 'osmesa'


@needs_headless_gl
def test_a_headless_backend_works_here():
    assert dmc.backend_opens_context('egl') or dmc.backend_opens_context('osmesa')
    assert not dmc.backend_opens_context('no_such_backend')


def test_matrix_observations_are_flattened_and_action_bounds_are_the_tasks():
    """manipulator's arm_pos is an (8, 2) array: a (16,) vector in the space and the observation;
    quadruped's actuators have their own ranges (not all -1..1), which the action space keeps."""
    env = DMC('manipulator_bring_ball', image=False, seed=0)
    obs, _ = env.reset()
    assert env.obs_space['arm_pos'].shape == (16,) and obs['arm_pos'].shape == (16,)
    np.testing.assert_array_equal(obs['arm_pos'], env._env.physics.bounded_joint_pos(
        ['arm_root', 'arm_shoulder', 'arm_elbow', 'arm_wrist', 'finger', 'fingertip', 'thumb',
         'thumbtip']).astype(np.float32).reshape(-1))
    check_obs(obs, env.obs_space)
    quadruped = DMC('quadruped_walk', image=False, seed=0)
    spec = quadruped._env.action_spec()
    assert quadruped.act_space.low.min() == -1.0 and quadruped.act_space.high.max() > 1.0  # ranges differ
    np.testing.assert_array_equal(quadruped.act_space.low, spec.minimum.astype(np.float32))
    np.testing.assert_array_equal(quadruped.act_space.high, spec.maximum.astype(np.float32))


def test_an_action_of_any_shape_with_the_right_size_is_taken():
    env = DMC('cartpole_balance', image=False, seed=0)
    env.reset()
    _, reward, _, _, _ = env.step(np.zeros((1, 1), np.float32))  # e.g. a batch of one
    assert 0.0 < reward <= 1.0
    env.step([0.5])


def test_a_terminating_task_is_terminated_not_truncated():
    """No Control Suite task terminates, but dm_env's termination (discount 0) would be terminated
    and end the repeat there; a last step with discount 1 is a truncation."""
    import dm_env
    env = DMC('cartpole_balance', image=False, action_repeat=4, seed=0)
    env.reset()
    calls = []

    def step(action):
        real = type(env._env).step(env._env, action)
        calls.append(action)
        return dm_env.termination(0.25, real.observation) if len(calls) == 2 else real

    env._env.step = step
    _, reward, terminated, truncated, info = env.step(np.zeros(1))
    assert (terminated, truncated, info['discount'], len(calls)) == (True, False, 0.0, 2)
    assert 0.25 < reward <= 1.25  # the first physics step's reward and the termination's 0.25


def test_bad_action_repeats_are_refused_before_loading():
    for bad in (0, 1.5, True, -2):
        with pytest.raises(ValueError, match=rf'action_repeat must be a whole number >= 1; got {bad!r}'):
            DMC('walker_walk', action_repeat=bad)
    assert DMC('cartpole_balance', image=False, action_repeat=2.0)._repeat == 2


def test_task_name_resolution():
    tasks = [('ball_in_cup', 'catch'), ('walker', 'walk'), ('a_b', 'c'), ('a', 'b_c')]
    assert dmc.split_task_name('cup_catch', tasks) == ('ball_in_cup', 'catch')
    assert dmc.split_task_name('ball_in_cup_catch', tasks) == ('ball_in_cup', 'catch')
    with pytest.raises(ValueError, match=r"Unknown DeepMind Control task 'dmc_cup'"):
        dmc.split_task_name('cup', tasks)  # the alias alone is no task, and the error says 'cup'
    with pytest.raises(ValueError, match=r"'dmc_a_b_c'.*Pick one of: dmc_a_b_c, dmc_a_b_c, "):
        dmc.split_task_name('a_b_c', tasks)  # two pairs give one name: ambiguous, not the first


def test_a_render_failure_names_the_backend_and_the_fix():
    env = DMC('cartpole_balance', image=False, seed=0)

    def render(*args, **kwargs):
        raise RuntimeError('gladLoadGL error')

    env._env.physics.render = render
    with pytest.raises(RuntimeError, match=r'MUJOCO_GL=.*gladLoadGL error.*apt-get install -y libegl1'
                                           r'.*env.dmc.image False'):
        env.render()


def test_close_closes_the_dm_control_env():
    env = DMC('cartpole_balance', image=False, seed=0)
    closed = []
    env._env.close = lambda: closed.append(True)
    env.close()
    assert closed == [True]


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='the backend is chosen on Linux only')
def test_the_backend_is_left_alone_once_dm_controls_renderer_is_imported(monkeypatch):
    monkeypatch.delenv('MUJOCO_GL', raising=False)
    probed = []
    monkeypatch.setattr(dmc, 'backend_opens_context', lambda backend: probed.append(backend) or True)
    monkeypatch.setitem(sys.modules, 'dm_control._render', sys.modules.get('dm_control._render', object()))
    assert dmc.select_mujoco_gl() == '' and probed == [] and 'MUJOCO_GL' not in os.environ
    monkeypatch.delitem(sys.modules, 'dm_control._render')
    assert dmc.select_mujoco_gl() == 'egl' and probed == ['egl'] and os.environ['MUJOCO_GL'] == 'egl'


def test_the_probe_sets_both_gl_variables(monkeypatch):
    import subprocess
    seen = []

    def run(command, env, **kwargs):
        seen.append((command[-1], env['MUJOCO_GL'], env['PYOPENGL_PLATFORM']))
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(dmc.subprocess, 'run', run)
    assert dmc.backend_opens_context('osmesa') is False
    assert seen == [('osmesa', 'osmesa', 'osmesa')]


@needs_headless_gl
def test_a_non_square_size_is_height_by_width():
    env = DMC('walker_walk', size=(48, 80), proprio=False, seed=0)
    obs, _ = env.reset()
    assert env.obs_space['image'].shape == obs['image'].shape == env.render().shape == (48, 80, 3)
