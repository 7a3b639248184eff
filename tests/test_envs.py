"""The env registry, task parsing, make_env's wrapper stack and seeds, the guide's example env, the
shipped custom env, and the gymnasium adapter."""
import functools
import json
import inspect
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import config as config_module
import dreamer
import envs
from envs import wrappers
from helpers import guide_env
from envs.custom_env import CustomEnv
from envs.gym import GymEnv
from envs.parallel import EnvPool

ROOT = Path(__file__).resolve().parents[1]


def make_config(*argv):
    return config_module.load_config(list(argv))


# --- the guide's example, copied as written (only `from . import wrappers` becomes an absolute import)
# around a toy YourCustomEnvironment: a gymnasium.Env with image observations whose episodes end by
# termination (even episodes, after 5 steps) or truncation (odd episodes, after 8 steps).

class YourCustomEnvironment(gym.Env):
    metadata = {'render_modes': ['rgb_array']}

    def __init__(self, name, **kwargs):
        self.name = name
        self.action_space = gym.spaces.Box(0.0, 2.0, (2,), np.float32)
        self.observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self.episode = -1
        self.t = 0
        self.actions = []

    def reset(self, *, seed=None, options=None):
        self.episode += 1
        self.t = 0
        return self._image(), {}

    def step(self, action):
        self.actions.append(np.asarray(action))
        self.t += 1
        done = self.episode % 2 == 0 and self.t == 5
        truncated = self.episode % 2 == 1 and self.t == 8
        return self._image(), float(self.t), done, truncated, {}

    def render(self):
        return self._image()

    def _image(self):
        return np.full((64, 64, 3), self.t, np.uint8)


GuideCustomEnv = guide_env.GuideEnv


def expected_flags(episode_lengths_and_ends):
    """(is_first, is_last, is_terminal, reward) per pool step for episodes [(length, 'done'|'trunc')]."""
    flags = []
    for length, end in episode_lengths_and_ends:
        flags.append((True, False, False, 0.0))
        for t in range(1, length + 1):
            last = t == length
            flags.append((False, last, last and end == 'done', float(t)))
    return flags


@pytest.mark.parametrize('parallel', ['none', 'thread'])
def test_guide_example_env_runs_through_make_env_and_pool(monkeypatch, parallel):
    monkeypatch.setitem(envs.REGISTRY, 'custom', GuideCustomEnv)
    monkeypatch.setattr(guide_env, 'YourCustomEnvironment', YourCustomEnvironment)
    config = make_config('--configs', 'custom', '--task', 'custom_task_name', '--action_repeat', '1')
    ctors = [functools.partial(envs.make_env, config, 'train', i) for i in range(2)]
    pool = EnvPool(ctors, parallel)
    try:
        assert pool.obs_space == {'image': gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)}
        assert pool.act_space == gym.spaces.Box(-1, 1, (2,), np.float32)
        steps = [pool.step(np.ones((2, 2), np.float32)) for _ in range(30)]
        frames = pool.call('render')
    finally:
        pool.close()
    # env 0's start-up check (reset, step, reset) used up two inner episodes, an even number, so
    # both envs see the same pattern from their first pool step: done after 5, truncated after 8, ...
    want = expected_flags([(5, 'done'), (8, 'trunc')] * 3)[:30]
    for index in (0, 1):
        got = [(o['is_first'], o['is_last'], o['is_terminal'], float(o['reward']))
               for o in (step[index] for step in steps)]
        assert got == want
    assert frames[0].shape == (64, 64, 3) and frames[0].dtype == np.uint8


def test_guide_example_actions_reach_the_inner_env_bounds(monkeypatch):
    monkeypatch.setitem(envs.REGISTRY, 'custom', GuideCustomEnv)
    monkeypatch.setattr(guide_env, 'YourCustomEnvironment', YourCustomEnvironment)
    env = envs.make_env(make_config('--task', 'custom_x', '--action_repeat', '1'), 'train', 1)
    env.reset()
    env.step(np.array([1.0, -1.0], np.float32))
    np.testing.assert_allclose(env.unwrapped._env.unwrapped.actions[-1], [2.0, 0.0])


# --- registry and task parsing

def test_registry_holds_every_suite():
    assert envs.REGISTRY == {
        'dmc': envs.DMC, 'atari': envs.Atari, 'crafter': envs.Crafter, 'minecraft': envs.Minecraft,
        'memorymaze': envs.MemoryMaze, 'gym': GymEnv, 'custom': CustomEnv}


@pytest.mark.parametrize('task, expected', [
    ('dmc_walker_walk', ('dmc', 'walker_walk')), ('atari_pong', ('atari', 'pong')),
    ('custom_reach_discrete', ('custom', 'reach_discrete')), ('gym_CartPole-v1', ('gym', 'CartPole-v1')),
])
def test_task_splits_at_the_first_underscore(task, expected):
    assert envs.parse_task(task) == expected


def test_unknown_suite_lists_registered_suites():
    with pytest.raises(ValueError, match=(
            r"Unknown suite 'mujoco' in task 'mujoco_ant'\. Registered suites: atari, crafter, custom, "
            r"dmc, gym, memorymaze, minecraft\.")):
        envs.make_env(make_config('--task', 'mujoco_ant'), 'train', 0)


def test_task_without_suite_prefix_or_name():
    with pytest.raises(ValueError, match=r"Task 'pong' has no suite prefix; expected '<suite>_<name>'"):
        envs.parse_task('pong')
    with pytest.raises(ValueError, match=r"Task 'custom_' has no name after the suite prefix 'custom_'; expected"):
        envs.parse_task('custom_')


def test_a_registry_key_with_an_underscore_is_named_as_unreachable(monkeypatch):
    """'my_sim': CustomEnv can never be asked for (--task my_sim_x asks for suite 'my'), and the
    unknown-suite error listed it as registered."""
    monkeypatch.setitem(envs.REGISTRY, 'my_sim', CustomEnv)
    with pytest.raises(envs.EnvCheckError, match=(
            r"^REGISTRY in envs/__init__.py names 'my_sim', but a suite's name cannot contain '_': a task "
            r"'<suite>_<name>' is split at its first underscore, so 'my_sim_<name>' would ask for suite 'my'\. "
            r"Rename it in REGISTRY \(e.g. 'mysim'\)")):
        envs.parse_task('my_sim_x')


def test_guide_placeholder_task_lists_the_example_tasks():
    config = make_config('--configs', 'custom')
    assert config.task == 'custom_task_name'
    with pytest.raises(envs.EnvCheckError, match=(
            r"^'custom_task_name' is the guide's placeholder for your task's name: replace it with one of "
            r"the example env's tasks, custom_reach, custom_reach_discrete, custom_catch \(e\.g\. --task "
            r"custom_reach\), or put your own environment into envs/custom_env\.py")):
        envs.make_env(config, 'train', 0)
    other = make_config('--configs', 'custom', '--task', 'custom_rech')
    with pytest.raises(envs.EnvCheckError, match=(
            r"^Unknown custom task 'custom_rech'\. The example env in envs/custom_env\.py offers "
            r"custom_reach, custom_reach_discrete, custom_catch \(e\.g\. --task custom_reach\): use one")):
        envs.make_env(other, 'train', 0)


def test_missing_suite_package_names_what_to_install(monkeypatch):
    class NeedsPackage:
        def __init__(self, name):
            raise ImportError("The 'fancy' suite needs the package fancy-envs: pip install fancy-envs")

    monkeypatch.setitem(envs.REGISTRY, 'fancy', NeedsPackage)
    with pytest.raises(ImportError, match=r'pip install fancy-envs'):
        envs.make_env(make_config('--task', 'fancy_level1'), 'train', 0)
    envs.make_env(make_config('--task', 'custom_reach'), 'train', 0)  # other suites unaffected


# --- make_env: kwargs, seeds, wrapper stack

def test_seed_and_action_repeat_go_only_to_constructors_that_name_them(monkeypatch):
    received = {}

    class RepeatsItself(CustomEnv):
        def __init__(self, name, seed, action_repeat, size=(64, 64)):
            received.update(name=name, seed=seed, action_repeat=action_repeat, size=size)
            super().__init__(name, seed=seed, size=size)

    class TakesKwargs(CustomEnv):
        def __init__(self, name, **kwargs):
            received.update(kwargs)
            super().__init__(name, **kwargs)

    monkeypatch.setitem(envs.REGISTRY, 'custom', RepeatsItself)
    env = envs.make_env(make_config('--task', 'custom_reach', '--seed', '5', '--action_repeat', '3'),
                        'eval', 2)
    assert received == {'name': 'reach', 'seed': 10007, 'action_repeat': 3, 'size': (64, 64)}
    stack = []
    while isinstance(env, wrappers.Wrapper):
        stack.append(type(env).__name__)
        env = env.env
    assert stack == ['Flags', 'NormalizeActions']  # the suite repeats itself: no ActionRepeat
    received.clear()
    monkeypatch.setitem(envs.REGISTRY, 'custom', TakesKwargs)
    envs.make_env(make_config('--task', 'custom_reach'), 'train', 1)
    assert received == {}  # the defaults inject no options into the custom suite
    envs.make_env(make_config('--task', 'custom_reach', '--env.custom.size', '32,32'), 'train', 1)
    assert received == {'size': (32, 32)}


def test_constructor_option_mismatch_says_where_the_options_come_from(monkeypatch):
    class NoOptions(CustomEnv):
        def __init__(self, name):
            super().__init__(name)

    monkeypatch.setitem(envs.REGISTRY, 'custom', NoOptions)
    envs.make_env(make_config('--task', 'custom_reach'), 'train', 0)  # no options: it takes none
    with pytest.raises(envs.EnvCheckError, match=r"^NoOptions\('reach'\) does not take option 'size': drop "
                                                 r"--env.custom.size .*It was called with \*\*\{'size': \(32, 32\)\}"):
        envs.make_env(make_config('--task', 'custom_reach', '--env.custom.size', '32,32'), 'train', 0)


def test_a_constructor_bug_keeps_its_traceback_with_a_note_on_the_options(monkeypatch):
    class Buggy(CustomEnv):
        def __init__(self, name, size=(64, 64)):
            super().__init__(name, size=size)
            self.radius = len(size[0])  # its own mistake, not an option's

    monkeypatch.setitem(envs.REGISTRY, 'custom', Buggy)
    with pytest.raises(TypeError, match=r"object of type 'int' has no len\(\)") as info:
        envs.make_env(make_config('--task', 'custom_reach', '--env.custom.size', '64,64'), 'train', 0)
    assert "the options are config env.custom" in info.value.__notes__[0]
    with pytest.raises(TypeError, match=r"object of type 'int' has no len\(\)") as info:
        envs.make_env(make_config('--task', 'custom_reach'), 'train', 0)
    assert not getattr(info.value, '__notes__', None)  # no options: a note on them would mislead


def test_a_constructor_that_cannot_take_the_task_name_says_so(monkeypatch):
    """def __init__(self): the TypeError said '2 positional arguments were given', and the note
    blamed options there were none of; now one paragraph with Python's reason and the convention."""
    class NoName(CustomEnv):
        def __init__(self):
            super().__init__('reach')

    monkeypatch.setitem(envs.REGISTRY, 'custom', NoName)
    with pytest.raises(envs.EnvCheckError, match=(
            r"^NoName\('reach'\) cannot be called: too many positional arguments\. make_env calls a suite's class "
            r"with the task's name after the suite prefix \('reach' for task custom_reach\) as the first argument "
            r"and its options as keywords: give it def __init__\(self, name, \*\*kwargs\)")):
        envs.make_env(make_config('--task', 'custom_reach'), 'train', 0)


def test_an_option_the_users_constructor_does_not_take_names_the_key_and_the_fix(monkeypatch, tmp_path, capsys):
    """The user's own suite, a misspelt option on the command line, a constructor without it: one
    paragraph naming the option, where it came from, the closest parameter and the fix; exit 2."""
    class Broken(CustomEnv):
        def __init__(self, name, speed=1.0):
            super().__init__('reach')

    monkeypatch.setitem(envs.REGISTRY, 'broken', Broken)
    code = dreamer.main(['--task', 'broken_x', '--env.broken.sped', '2', '--envs.parallel', 'none',
                         '--device', 'cpu', '--logdir', str(tmp_path / 'run')])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: Broken('x') does not take option 'sped': drop --env.broken.sped or its 'sped:' entry under "
        "env: {broken: ...} in configs.yaml (or fix its spelling: did you mean 'speed'?), or make the "
        "constructor, and any env it passes **kwargs to, accept 'sped'. It was called with **{'sped': 2}: "
        "config env.broken, plus seed / action_repeat where the constructor names them.")


def test_options_of_a_users_suite_from_a_block_and_the_command_line_reach_its_constructor(monkeypatch, tmp_path):
    """A new block with env: {mine: {...}} and --env.mine.<key>: every env of the run gets them, typed."""
    received = []

    class Mine(CustomEnv):
        def __init__(self, name, foo, speed, size, seed=0):
            received.append({'foo': foo, 'speed': speed, 'size': size})
            super().__init__(name, seed=seed, size=size)

    path = tmp_path / 'configs.yaml'
    path.write_text(config_module.CONFIGS_PATH.read_text(encoding='utf-8') + (
        '\nmine:\n  task: mine_reach\n  env: {mine: {foo: 1, size: [32, 32]}}\n'), encoding='utf-8')
    monkeypatch.setattr(config_module, 'CONFIGS_PATH', path)
    monkeypatch.setitem(envs.REGISTRY, 'mine', Mine)
    logdir = tmp_path / 'run'
    rc = dreamer.main(['--configs', 'debug', 'mine', '--env.mine.speed', '0.5', '--logdir', str(logdir),
                       '--steps', '40', '--prefill', '20', '--eval_every', '0', '--envs.parallel', 'none',
                       '--video', 'False', '--device', 'cpu'])
    assert rc == 0
    assert received and all(r == {'foo': 1, 'speed': 0.5, 'size': (32, 32)} for r in received), received
    assert 'finished: 40 steps' in (logdir / 'train.log').read_text()


def test_wrapper_stack_order():
    config = make_config('--task', 'custom_catch', '--time_limit', '7', '--reward_clip', '1.0')
    env = envs.make_env(config, 'train', 1)
    stack = []
    while isinstance(env, wrappers.Wrapper):
        stack.append(type(env).__name__)
        env = env.env
    assert stack == ['Flags', 'ClipReward', 'TimeLimit', 'OneHotAction', 'ActionRepeat']


def test_seeds_train_and_eval():
    assert envs.env_seed(3, 'train', 2) == 5
    assert envs.env_seed(3, 'eval', 2) == 10005
    with pytest.raises(ValueError, match=r"Env mode must be one of \('train', 'eval'\), got 'test'"):
        envs.env_seed(0, 'test', 0)
    config = make_config('--task', 'custom_reach', '--seed', '3')
    first = envs.make_env(config, 'eval', 1).reset()[0]['vector']
    direct_env = CustomEnv('reach', seed=10004)
    envs.check_env(direct_env, 1)  # as make_env does with every env it makes, then one reset
    direct_env.reset()
    direct = direct_env.reset()[0]['vector']
    np.testing.assert_array_equal(first, direct)
    other = envs.make_env(config, 'train', 1).reset()[0]['vector']
    assert not np.array_equal(first, other)


def test_make_env_episode_flags_time_limit_and_reward_clip():
    config = make_config('--task', 'custom_reach', '--action_repeat', '2', '--time_limit', '10',
                         '--reward_clip', '0.5')
    env = envs.make_env(config, 'train', 0)
    obs, _ = env.reset()
    assert obs['is_first'] and not obs['is_last'] and obs['reward'] == 0
    rewards = []
    for t in range(1, 11):
        obs, reward, terminated, truncated, _ = env.step(np.full(2, -1.0, np.float32))
        rewards.append(reward)
        assert obs['is_last'] == (t == 10) and not obs['is_terminal'] and not obs['is_first']
    assert truncated and not terminated
    assert max(np.abs(rewards)) <= 0.5


def test_default_episode_length_is_100_env_steps_truncated():
    env = envs.make_env(make_config('--task', 'custom_reach', '--action_repeat', '2'), 'train', 1)
    env.reset()
    for t in range(1, 51):
        obs, _, terminated, truncated, _ = env.step(np.zeros(2, np.float32))
        assert obs['is_last'] == (t == 50)
    assert truncated and not terminated and not obs['is_terminal']


# --- the shipped custom env

@pytest.mark.parametrize('task, act_space', [
    ('reach', gym.spaces.Box(-1, 1, (2,), np.float32)),
    ('reach_discrete', gym.spaces.Discrete(5)),
    ('catch', gym.spaces.Discrete(3)),
])
def test_custom_env_tasks(task, act_space):
    env = CustomEnv(task, seed=0)
    assert env.act_space == act_space
    assert env.obs_space['image'] == gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    obs, _ = env.reset()
    assert obs['image'].shape == (64, 64, 3) and obs['image'].dtype == np.uint8
    assert obs['vector'].dtype == np.float32 and obs['vector'].shape == env.obs_space['vector'].shape
    assert obs['is_first']
    frame = env.render()
    np.testing.assert_array_equal(frame, obs['image'])
    assert len(np.unique(frame.reshape(-1, 3), axis=0)) >= 3  # background and two objects drawn


def test_custom_env_reach_reward_and_motion():
    env = CustomEnv('reach', seed=1)
    obs, _ = env.reset()
    point, target = obs['vector'][:2], obs['vector'][2:]
    toward = np.clip((target - point) / 0.1, -1, 1)
    obs, reward, *_ = env.step(toward)
    distance = np.linalg.norm(obs['vector'][:2] - obs['vector'][2:])
    assert reward == pytest.approx(1 - distance, abs=1e-5)
    moved = obs['vector'][:2] - point
    assert np.all(np.abs(moved) <= 0.1 + 1e-6) and np.linalg.norm(moved) > 0.05


def test_custom_env_is_deterministic_per_seed_and_sized_by_config():
    a = CustomEnv('catch', seed=4, size=(32, 48))
    b = CustomEnv('catch', seed=4, size=(32, 48))
    assert a.obs_space['image'].shape == (32, 48, 3)
    np.testing.assert_array_equal(a.reset()[0]['image'], b.reset()[0]['image'])
    for action in [0, 2, 1, 2]:
        np.testing.assert_array_equal(a.step(action)[0]['vector'], b.step(action)[0]['vector'])
    assert a.reset()[0]['image'].shape == (32, 48, 3)


def test_custom_env_rejects_unknown_options():
    with pytest.raises(envs.EnvCheckError, match=r"CustomEnv got unknown option\(s\) \['colour'\]"):
        CustomEnv('reach', colour='red')
    with pytest.raises(envs.EnvCheckError, match=(
            r"^CustomEnv got unknown option\(s\) \['colour'\]; it accepts 'size' \(config env.custom, e.g. "
            r"--env.custom.size 64,64\) and 'seed'. Remove the others: drop their --env.custom.<key> options")):
        envs.make_env(make_config('--task', 'custom_reach', '--env.custom.colour', 'red'), 'train', 0)


def test_custom_env_keeps_its_64x64_default_and_takes_size_from_the_command_line():
    default = envs.make_env(make_config('--task', 'custom_reach'), 'train', 0)
    assert default.obs_space['image'].shape == (64, 64, 3)
    env = envs.make_env(make_config('--task', 'custom_reach', '--env.custom.size', '128,128'), 'train', 0)
    assert env.obs_space['image'].shape == (128, 128, 3)
    assert env.reset()[0]['image'].shape == (128, 128, 3)


@pytest.mark.parametrize('size', ['128', 'a,b', '0,64', '64,64,3'])
def test_custom_env_size_must_be_two_positive_integers(size):
    with pytest.raises(envs.EnvCheckError, match=(
            r"^CustomEnv option size is .*, but it must be two positive integers \(height, width\) of the "
            r"image, e.g. --env.custom.size 64,64 \(the default\)\.$")):
        envs.make_env(make_config('--task', 'custom_reach', '--env.custom.size', size), 'train', 0)


def test_custom_env_keeps_the_guide_template_shape():
    assert list(inspect.signature(CustomEnv).parameters)[0] == 'name'
    for member in ('obs_space', 'act_space', 'step', 'reset', '_format_obs', 'render'):
        assert hasattr(CustomEnv, member)
    assert isinstance(CustomEnv('reach')._env, wrappers.NormalizeActions)


# --- the gymnasium adapter

def test_gym_cartpole_vector_and_discrete_actions():
    env = envs.make_env(make_config('--configs', 'gym', '--task', 'gym_CartPole-v1'), 'train', 0)
    assert env.obs_space == {'vector': gym.spaces.Box(
        np.array([-4.8, -np.inf, -0.41887903, -np.inf], np.float32),
        np.array([4.8, np.inf, 0.41887903, np.inf], np.float32), dtype=np.float32)}
    assert env.act_space == gym.spaces.Discrete(2)
    obs, _ = env.reset()
    assert obs['vector'].shape == (4,) and obs['vector'].dtype == np.float32
    length = 0
    while not obs['is_last']:
        obs, *_ = env.step(np.array([1.0, 0.0], np.float32))  # one-hot: always push left
        length += 1
    assert obs['is_terminal'] and 5 <= length < 100  # the pole falls: a real termination


def test_gym_pendulum_box_actions_and_truncation():
    env = envs.make_env(make_config('--task', 'gym_Pendulum-v1', '--action_repeat', '1'), 'train', 0)
    assert env.obs_space['vector'].shape == (3,)
    assert env.act_space == gym.spaces.Box(-1, 1, (1,), np.float32)
    obs, _ = env.reset()
    for t in range(200):
        obs, *_ = env.step(np.ones(1, np.float32))
    assert obs['is_last'] and not obs['is_terminal']  # gymnasium's 200-step limit is a truncation
    assert env.unwrapped._env.unwrapped.last_u == pytest.approx(2.0)  # +1 maps to the max torque


class ImageOnlyEnv(gym.Env):
    """Registered below as TestImageEnv-v0: renders frames with numpy only."""

    metadata = {'render_modes': ['rgb_array'], 'render_fps': 30}

    def __init__(self, render_mode=None):
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Discrete(3)
        self.action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state = 0
        return self.state, {}

    def step(self, action):
        self.state = (self.state + 1) % 3
        return self.state, 1.0, False, False, {}

    def render(self):
        return np.full((100, 150, 3), 60 * self.state, np.uint8)


def test_gym_image_observations_resized_and_discrete_observation_one_hot(monkeypatch):
    if 'TestImageEnv-v0' not in gym.registry:
        gym.register('TestImageEnv-v0', entry_point=ImageOnlyEnv)
    config = make_config('--task', 'gym_TestImageEnv-v0', '--env.gym.image', 'True',
                         '--env.gym.size', '[32, 40]', '--action_repeat', '1')
    env = envs.make_env(config, 'train', 0)
    assert env.obs_space['image'] == gym.spaces.Box(0, 255, (32, 40, 3), np.uint8)
    obs, _ = env.reset()
    obs, *_ = env.step(0)
    assert obs['image'].shape == (32, 40, 3) and obs['image'].dtype == np.uint8
    assert obs['image'][0, 0, 0] == 60
    np.testing.assert_array_equal(obs['vector'], [0, 1, 0])
    assert env.render().shape == (100, 150, 3)


class OffsetDiscreteEnv(gym.Env):
    """Registered below as TestOffsetDiscrete-v0: Discrete(3, start=5) observations 5, 6, 7, ..."""

    metadata = {'render_modes': ['rgb_array'], 'render_fps': 30}

    def __init__(self, render_mode=None):
        self.observation_space = gym.spaces.Discrete(3, start=5)
        self.action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state = 5
        return self.state, {}

    def step(self, action):
        self.state = 5 + (self.state - 4) % 3
        return self.state, 0.0, False, False, {}


class Float64BoxEnv(gym.Env):
    """Registered below as TestFloat64Box-v0: (2, 2) float64 observations."""

    metadata = {'render_modes': ['rgb_array'], 'render_fps': 30}

    def __init__(self, render_mode=None):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2, 2), np.float64)
        self.action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.array([[0.1, 0.2], [0.3, 0.4]]), {}

    def step(self, action):
        return np.full((2, 2), 0.5), 0.0, False, False, {}


def test_gym_discrete_observations_one_hot_from_the_spaces_start():
    if 'TestOffsetDiscrete-v0' not in gym.registry:
        gym.register('TestOffsetDiscrete-v0', entry_point=OffsetDiscreteEnv)
    env = envs.make_env(make_config('--task', 'gym_TestOffsetDiscrete-v0', '--action_repeat', '1'), 'train', 0)
    assert env.obs_space['vector'] == gym.spaces.Box(0, 1, (3,), np.float32)
    obs, _ = env.reset()
    np.testing.assert_array_equal(obs['vector'], [1, 0, 0])  # 5 is the first class
    obs, *_ = env.step(0)
    np.testing.assert_array_equal(obs['vector'], [0, 1, 0])
    assert obs['vector'].dtype == np.float32


def test_gym_box_observations_arrive_flat_and_float32():
    if 'TestFloat64Box-v0' not in gym.registry:
        gym.register('TestFloat64Box-v0', entry_point=Float64BoxEnv)
    env = envs.make_env(make_config('--task', 'gym_TestFloat64Box-v0', '--action_repeat', '1'), 'train', 0)
    assert env.obs_space['vector'] == gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    obs, _ = env.reset()
    assert obs['vector'].dtype == np.float32
    np.testing.assert_allclose(obs['vector'], [0.1, 0.2, 0.3, 0.4], rtol=1e-6)


def test_gym_pendulum_image():
    pytest.importorskip('pygame', reason='gymnasium classic-control rendering needs pygame')
    config = make_config('--task', 'gym_Pendulum-v1', '--env.gym.image', 'True')
    env = envs.make_env(config, 'train', 0)
    obs, _ = env.reset()
    assert obs['image'].shape == (64, 64, 3) and obs['image'].dtype == np.uint8
    assert obs['image'].std() > 0


def test_gym_unknown_id_suggests_close_matches():
    with pytest.raises(ValueError, match=(
            r"Unknown gymnasium environment 'CartPol-v1' \(task gym_CartPol-v1\).*Close matches: "
            r"CartPole-v1")):
        envs.make_env(make_config('--task', 'gym_CartPol-v1'), 'train', 0)


def test_a_deprecated_gym_id_names_its_successor():
    with pytest.raises(envs.EnvCheckError, match=(
            r"gymnasium environment 'Taxi-v3' \(task gym_Taxi-v3\) is deprecated: .*Please use `Taxi-v4` "
            r"instead\. Use the version it names")):
        envs.make_env(make_config('--task', 'gym_Taxi-v3'), 'train', 0)


def test_a_gym_env_whose_package_is_missing_names_the_install():
    import importlib.util

    if importlib.util.find_spec('Box2D') is not None:
        pytest.skip('Box2D is installed here: LunarLander builds')
    with pytest.raises(envs.MissingDependency, match=(
            r"gymnasium environment 'LunarLander-v3' \(task gym_LunarLander-v3\) needs a package that is not "
            r"installed: Box2D is not installed.*gymnasium\[box2d\]")):
        envs.make_env(make_config('--task', 'gym_LunarLander-v3'), 'train', 0)


class ScriptedGymEnv(gym.Env):
    """Registered below as TestScripted-v0: a (2, 2) Box action recorded as stepped; a seeded random
    observation; render() as `frame` says: 'rgba' (an RGBA frame), 'none' (returns None) or 'missing'
    (its rendering package is not installed)."""

    metadata = {'render_modes': ['rgb_array'], 'render_fps': 30}
    actions: list = []

    def __init__(self, render_mode=None, frame='rgba'):
        self.render_mode, self.frame = render_mode, frame
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2, 2), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.np_random.uniform(-1, 1, 2).astype(np.float32), {}

    def step(self, action):
        ScriptedGymEnv.actions.append(action)
        return np.zeros(2, np.float32), 0.0, False, False, {}

    def render(self):
        if self.frame == 'missing':
            raise gym.error.DependencyNotInstalled('pygame is not installed, run `pip install pygame`')
        if self.frame == 'none':
            return None
        frame = np.zeros((20, 30, 4), np.uint8)
        frame[..., 0], frame[..., 3] = 200, 7
        return frame


def scripted_gym_env(**options):
    for frame in ('rgba', 'none', 'missing'):
        if f'TestScripted{frame}-v0' not in gym.registry:
            gym.register(f'TestScripted{frame}-v0', entry_point=functools.partial(ScriptedGymEnv, frame=frame))
    return GymEnv(f"TestScripted{options.pop('frame', 'rgba')}-v0", **options)


def test_gym_box_actions_are_flat_for_the_agent_and_reshaped_for_the_env():
    env = scripted_gym_env()
    assert env.act_space == gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    env.reset()
    ScriptedGymEnv.actions.clear()
    env.step(np.arange(4, dtype=np.float32) / 4)
    (action,) = ScriptedGymEnv.actions
    assert action.shape == (2, 2) and action.dtype == np.float32
    np.testing.assert_array_equal(action, [[0, 0.25], [0.5, 0.75]])


def test_gym_seed_picks_the_first_episode_only():
    env = scripted_gym_env(seed=5)
    episodes = [env.reset()[0]['vector'] for _ in range(3)]
    assert not np.array_equal(episodes[0], episodes[1]) and not np.array_equal(episodes[1], episodes[2])
    np.testing.assert_array_equal(scripted_gym_env(seed=5).reset()[0]['vector'], episodes[0])
    assert not np.array_equal(scripted_gym_env(seed=6).reset()[0]['vector'], episodes[0])


@pytest.mark.filterwarnings('ignore:.*RGB-array rendering should return')
def test_gym_rgba_frames_lose_their_alpha_when_resized_and_when_not():
    image = scripted_gym_env(image=True, size=(8, 12)).reset()[0]['image']
    assert image.shape == (8, 12, 3) and (image[..., 0] == 200).all() and (image[..., 1:] == 0).all()
    image = scripted_gym_env(image=True, size=(20, 30)).reset()[0]['image']
    assert image.shape == (20, 30, 3) and (image[..., 0] == 200).all()


@pytest.mark.filterwarnings('ignore:.*RGB-array rendering should return')
def test_gym_image_observations_need_a_frame():
    with pytest.raises(envs.EnvCheckError, match=r"^gym_TestScriptednone-v0: render\(\) returned None, so "
                                                 r"image=True has no frames\. Use env\.gym\.image False"):
        scripted_gym_env(frame='none', image=True).reset()
    with pytest.raises(envs.MissingDependency, match=r"image=True renders frames, which needs a package that "
                                                     r"is not installed .*pip install"):
        scripted_gym_env(frame='missing', image=True).reset()


def test_gym_videos_without_a_rendering_package_warn_once_and_train_on():
    env = scripted_gym_env(frame='missing')
    env.reset()
    with pytest.warns(UserWarning, match=r"needs a package that is not installed .* No videos for this env"):
        assert env.render() is None
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert env.render() is None  # said once



class GoalDictEnv(gym.Env):
    """Registered below as TestGoalDict-v0: a Dict observation as gymnasium-robotics' goal envs give
    (a float64 position, a desired goal), plus a Discrete phase and a small camera image; `keys`
    renames the Dict's keys (to test reserved names). Episodes end after 20 steps (truncated)."""

    metadata = {'render_modes': ['rgb_array'], 'render_fps': 30}

    def __init__(self, render_mode=None, keys=('observation', 'desired_goal', 'phase', 'camera')):
        self.keys = keys
        self.observation_space = gym.spaces.Dict(dict(zip(keys, [
            gym.spaces.Box(-1.0, 1.0, (2, 2), np.float64), gym.spaces.Box(-1.0, 1.0, (3,), np.float64),
            gym.spaces.Discrete(4, start=1), gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)])))
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def _obs(self):
        values = [np.full((2, 2), 0.1 * self.t), np.array([0.5, -0.5, 0.25]), 1 + self.t % 4,
                  np.full((8, 8, 3), 10 * self.t, np.uint8)]
        return dict(zip(self.keys, values))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), float(-np.abs(action).sum()), False, self.t >= 20, {}


def goal_dict_task(keys=None):
    name = 'TestGoalDict-v0' if keys is None else f"TestGoalDict{'-'.join(keys)}-v0"
    if name not in gym.registry:
        gym.register(name, entry_point=GoalDictEnv if keys is None else functools.partial(GoalDictEnv, keys=keys))
    return f'gym_{name}'


def test_gym_dict_observations_keep_their_keys_vectors_flat_images_as_they_are():
    env = envs.make_env(make_config('--task', goal_dict_task(), '--action_repeat', '1'), 'train', 0)
    assert env.obs_space == {
        'observation': gym.spaces.Box(-1.0, 1.0, (4,), np.float32),
        'desired_goal': gym.spaces.Box(-1.0, 1.0, (3,), np.float32),
        'phase': gym.spaces.Box(0, 1, (4,), np.float32),
        'camera': gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)}
    env.reset()
    obs, *_ = env.step(np.zeros(2, np.float32))
    np.testing.assert_allclose(obs['observation'], [0.1] * 4, rtol=1e-6)
    assert obs['observation'].dtype == np.float32 and obs['desired_goal'].dtype == np.float32
    np.testing.assert_array_equal(obs['phase'], [0, 1, 0, 0])  # 1 + 1 % 4 = 2: the second of 1..4
    assert obs['camera'].dtype == np.uint8 and (obs['camera'] == 10).all()


def test_a_dict_observation_env_trains_with_the_gym_block(tmp_path):
    """The gym block's encoder takes every vector (mlp_keys '.*'); the camera joins with
    --encoder.cnn_keys camera."""
    config = make_config('--configs', 'debug', 'gym', '--task', goal_dict_task(), '--steps', '120', '--prefill', '100',
                         '--eval_every', '0', '--envs.parallel', 'none', '--device', 'cpu', '--logdir', str(tmp_path),
                         '--encoder.cnn_keys', 'camera', '--decoder.cnn_keys', 'camera', '--video', 'False')
    from networks import matched_keys

    space = envs.make_env(config, 'train', 0).obs_space
    assert matched_keys(space, config.encoder.cnn_keys, config.encoder.mlp_keys) == (
        ['camera'], ['desired_goal', 'observation', 'phase'])  # gymnasium's Dict sorts its keys
    counters = dreamer.train(config)
    assert counters.step == 120 and counters.updates > 0
    records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    losses = {key for record in records for key in record if key.startswith('loss/')}
    assert {'loss/image', 'loss/vector'} <= losses, losses  # the camera's and the vectors' reconstruction


@pytest.mark.parametrize('keys, named', [
    (('reward', 'desired_goal', 'phase', 'camera'), 'the episode flags'),
    (('log_x', 'desired_goal', 'phase', 'camera'), 'logging-only values'),
])
def test_gym_dict_keys_that_name_flags_or_logging_values_are_refused(keys, named):
    with pytest.raises(envs.EnvCheckError, match=rf"its Dict observation has key '{keys[0]}', which names {named} "
                                                 r"here\. Rename the key"):
        envs.make_env(make_config('--task', goal_dict_task(keys), '--action_repeat', '1'), 'train', 0)


def test_gym_dict_observation_beside_image_true_may_not_have_its_own_image_key():
    task = goal_dict_task(('observation', 'desired_goal', 'phase', 'image'))
    with pytest.raises(envs.EnvCheckError, match=r"key 'image', which names the frame of image=True here"):
        envs.make_env(make_config('--task', task, '--env.gym.image', 'True', '--action_repeat', '1'), 'train', 0)
    env = envs.make_env(make_config('--task', task, '--action_repeat', '1'), 'train', 0)  # without image=True: its own
    assert env.obs_space['image'].shape == (8, 8, 3)


def test_gym_nested_or_text_observation_spaces_are_named_with_the_fix():
    class Nested(GoalDictEnv):
        def __init__(self, render_mode=None):
            super().__init__(render_mode)
            self.observation_space = gym.spaces.Dict({'outer': gym.spaces.Dict({'inner': gym.spaces.Discrete(2)})})

    if 'TestNestedDict-v0' not in gym.registry:
        gym.register('TestNestedDict-v0', entry_point=Nested)
    with pytest.raises(envs.EnvCheckError, match=r"observation 'outer' of space Dict\('inner': Discrete\(2\)\) is "
                                                 r"not supported; .*a Dict of those .*FlattenObservation"):
        envs.make_env(make_config('--task', 'gym_TestNestedDict-v0', '--action_repeat', '1'), 'train', 0)

class YourRobotEnvironment(gym.Env):
    """What README's MyRobot wraps: a gymnasium env with a camera image and float64 joints (numpy's
    default dtype), a 2-d Box action, 30-step episodes."""
    action_space = gym.spaces.Box(-2.0, 2.0, (2,), np.float32)

    speeds: list = []  # the speed option of every one made

    def __init__(self, name, speed=1.0):
        self.name, self._t = name, 0
        YourRobotEnvironment.speeds.append(speed)

    def _obs(self):
        return {'camera': np.full((64, 64, 3), 8 * self._t, np.uint8), 'joints': np.random.randn(7)}

    def reset(self, *, seed=None, options=None):
        self._t = 0
        return self._obs(), {}

    def step(self, action):
        self._t += 1
        return self._obs(), float(-np.abs(action).sum()), False, self._t >= 30, {}

    def render(self):
        return np.zeros((64, 64, 3), np.uint8)


def readme_my_robot() -> type:
    """The MyRobot class of README's 'Your own environment' section, as written there."""
    readme = (ROOT / 'README.md').read_text()
    code = readme.split('```python\n# envs/my_robot.py\n', 1)[1].split('```', 1)[0]
    namespace = {'YourRobotEnvironment': YourRobotEnvironment}
    exec(code.replace('from . import wrappers', 'from envs import wrappers'), namespace)
    return namespace['MyRobot']


def test_the_readmes_own_env_example_trains_as_written(monkeypatch, tmp_path):
    """README's MyRobot around a gymnasium env whose joints are float64: registered as the README
    says, it trains with the flags README gives for the vector, and its option reaches the inner env."""
    monkeypatch.setitem(envs.REGISTRY, 'myrobot', readme_my_robot())
    config = config_module.load_config([
        '--configs', 'debug', 'custom', '--task', 'myrobot_reach', '--encoder.mlp_keys', 'vector',
        '--decoder.mlp_keys', 'vector', '--env.myrobot.speed', '0.5', '--steps', '150', '--prefill', '100',
        '--eval_every', '0', '--envs.parallel', 'none', '--device', 'cpu', '--logdir', str(tmp_path)])
    YourRobotEnvironment.speeds.clear()
    counters = dreamer.train(config)
    assert counters.step == 150 and counters.updates > 0
    assert YourRobotEnvironment.speeds and set(YourRobotEnvironment.speeds) == {0.5}
    assert 'WARNING' not in (tmp_path / 'train.log').read_text()
    records = [line for line in (tmp_path / 'metrics.jsonl').read_text().splitlines() if 'loss/vector' in line]
    assert records
