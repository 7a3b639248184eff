"""Each wrapper of envs/wrappers.py on a tiny env: behaviour, spaces, and constructor checks."""
import gymnasium
import numpy as np
import pytest

from envs import wrappers


class TinyEnv:
    """Protocol env: reward = step number (1, 2, ...), terminates after `end` steps; records actions."""

    def __init__(self, end=5, act_space=None):
        self.end = end
        self.actions = []
        self.count = 0
        self._act_space = act_space or gymnasium.spaces.Box(-2.0, 4.0, (2,), np.float32)

    @property
    def obs_space(self):
        return {'vector': gymnasium.spaces.Box(-np.inf, np.inf, (1,), np.float32)}

    @property
    def act_space(self):
        return self._act_space

    def reset(self):
        self.count = 0
        return {'vector': np.zeros(1, np.float32)}, {}

    def step(self, action):
        self.actions.append(action)
        self.count += 1
        obs = {'vector': np.array([self.count], np.float32)}
        return obs, float(self.count), self.count >= self.end, False, {'count': self.count}


class GymnasiumEnv(gymnasium.Env):
    """A plain gymnasium.Env with array observations and an old-style render(mode)."""

    def __init__(self):
        self.observation_space = gymnasium.spaces.Box(0, 255, (4, 4, 3), np.uint8)
        low, high = np.array([0.0, -10.0], np.float32), np.array([1.0, 10.0], np.float32)
        self.action_space = gymnasium.spaces.Box(low, high, dtype=np.float32)
        self.last_action = None

    def reset(self, *, seed=None, options=None):
        return np.zeros((4, 4, 3), np.uint8), {}

    def step(self, action):
        self.last_action = action
        return np.zeros((4, 4, 3), np.uint8), 1.0, False, False, {}

    def render(self, mode):
        assert mode == 'rgb_array'
        return np.ones((4, 4, 3), np.uint8)


def run_episode(env, action):
    env.reset()
    results = []
    while True:
        obs, reward, terminated, truncated, info = env.step(action)
        results.append((reward, terminated, truncated))
        if terminated or truncated:
            return results


def test_action_repeat_sums_rewards_and_stops_at_done():
    inner = TinyEnv(end=5)
    env = wrappers.ActionRepeat(inner, repeat=2)
    results = run_episode(env, np.zeros(2))
    assert results == [(1 + 2, False, False), (3 + 4, False, False), (5, True, False)]
    assert len(inner.actions) == 5  # the third agent step stopped after one env step


def test_action_repeat_stops_at_a_truncation_too():
    inner = wrappers.TimeLimit(TinyEnv(end=100), duration=3)
    env = wrappers.ActionRepeat(inner, repeat=2)
    assert run_episode(env, np.zeros(2)) == [(1 + 2, False, False), (3, False, True)]
    assert len(inner.env.actions) == 3  # not stepped again after the truncation


def test_time_limit_truncates_without_terminating_and_resets_its_counter():
    env = wrappers.TimeLimit(TinyEnv(end=100), duration=3)
    assert run_episode(env, np.zeros(2)) == [(1, False, False), (2, False, False), (3, False, True)]
    assert run_episode(env, np.zeros(2))[-1] == (3, False, True)  # counter restarted on reset


def test_time_limit_keeps_a_real_termination_terminal():
    env = wrappers.TimeLimit(TinyEnv(end=3), duration=3)
    assert run_episode(env, np.zeros(2))[-1] == (3, True, False)


def test_clip_reward_clips_into_bounds():
    env = wrappers.ClipReward(TinyEnv(end=4), min_reward=-1, max_reward=2.5)
    assert [r for r, _, _ in run_episode(env, np.zeros(2))] == [1.0, 2.0, 2.5, 2.5]


def test_normalize_actions_maps_unit_box_onto_bounds():
    inner = TinyEnv()
    env = wrappers.NormalizeActions(inner)
    assert env.act_space == gymnasium.spaces.Box(-1, 1, (2,), np.float32)
    assert env.action_space == env.act_space  # gymnasium name too
    env.reset()
    for action, expected in [([-1, -1], [-2, -2]), ([1, 1], [4, 4]), ([0, 0.5], [1, 2.5]),
                             ([3, -7], [4, -2])]:  # out-of-range actions are clipped first
        env.step(np.array(action, np.float32))
        np.testing.assert_allclose(inner.actions[-1], expected, rtol=1e-6)
        assert inner.actions[-1].dtype == np.float32


def test_normalize_actions_around_a_gymnasium_env_with_old_render():
    inner = GymnasiumEnv()
    env = wrappers.NormalizeActions(inner)
    assert env.action_space == gymnasium.spaces.Box(-1, 1, (2,), np.float32)
    assert env.observation_space == inner.observation_space
    env.reset()
    env.step(np.array([0.0, 1.0]))
    np.testing.assert_allclose(inner.last_action, [0.5, 10.0])
    assert env.np_random is inner.np_random  # unknown attributes are forwarded
    np.testing.assert_array_equal(env.render(), np.ones((4, 4, 3)))  # render() -> render(mode=...)
    np.testing.assert_array_equal(env.render(mode='rgb_array'), np.ones((4, 4, 3)))


def test_normalize_actions_leaves_infinite_dimensions_and_discrete_spaces_alone():
    low, high = np.array([0.0, -np.inf], np.float32), np.array([2.0, np.inf], np.float32)
    inner = TinyEnv(act_space=gymnasium.spaces.Box(low, high, dtype=np.float32))
    env = wrappers.NormalizeActions(inner)
    np.testing.assert_array_equal(env.act_space.low, [-1, -np.inf])
    env.reset()
    env.step(np.array([1.0, 123.0]))
    np.testing.assert_allclose(inner.actions[-1], [2.0, 123.0])
    discrete = wrappers.NormalizeActions(TinyEnv(act_space=gymnasium.spaces.Discrete(3)))
    assert discrete.act_space == gymnasium.spaces.Discrete(3)


def test_one_hot_action_takes_vectors_and_integers():
    inner = TinyEnv(act_space=gymnasium.spaces.Discrete(4))
    env = wrappers.OneHotAction(inner)
    assert env.act_space == gymnasium.spaces.Discrete(4)
    env.reset()
    env.step(np.array([0, 0, 1, 0], np.float32))
    env.step(2)
    env.step(np.int64(3))
    assert inner.actions == [2, 2, 3]
    with pytest.raises(ValueError, match=r'expected a one-hot action of shape \(4,\).*got shape \(3,\)'):
        env.step(np.zeros(3))


def test_one_hot_action_adds_the_discrete_start():
    inner = TinyEnv(act_space=gymnasium.spaces.Discrete(3, start=-1))
    env = wrappers.OneHotAction(inner)
    env.reset()
    env.step(np.array([1.0, 0.0, 0.0]))
    assert inner.actions == [-1]


def test_normalize_observation_standardises_float_vectors():
    env = wrappers.NormalizeObservation(TinyEnv(end=100))
    assert env.obs_space['vector'] == gymnasium.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    obs, _ = env.reset()
    values = [obs['vector'][0]] + [env.step(np.zeros(2))[0]['vector'][0] for _ in range(50)]
    assert values[0] == 0.0  # the first value is its own mean
    raw = np.arange(51, dtype=np.float64)
    expected_last = (50 - raw.mean()) / raw.std()
    assert values[-1] == pytest.approx(expected_last, rel=1e-4)
    assert all(isinstance(v, np.float32) for v in values)


def test_normalize_observation_does_not_blow_up_a_nearly_constant_entry():
    class Wobbles(TinyEnv):  # 0, 1e-6, 0, 1e-6, ...
        def step(self, action):
            obs, *rest = super().step(action)
            return {'vector': np.array([1e-6 * (self.count % 2)], np.float32)}, *rest

    env = wrappers.NormalizeObservation(Wobbles(end=100))
    env.reset()
    values = [env.step(np.zeros(2))[0]['vector'][0] for _ in range(20)]
    # epsilon inside the square root: a variance of 2.5e-13 gives std ~1e-4, so the 1e-6 wobble
    # stays near 0.005, not the +-1 it would become if epsilon were added to the std itself
    assert max(abs(v) for v in values) < 0.01, values
    assert values[0] == pytest.approx(1e-6 / 2 / np.sqrt(0.25e-12 + 1e-8), rel=1e-3)


def test_normalize_observation_leaves_images_alone():
    env = wrappers.NormalizeObservation(GymnasiumEnv())
    obs, _ = env.reset()
    assert obs.dtype == np.uint8
    assert env.obs_space == GymnasiumEnv().observation_space


def test_flags_own_the_episode_flags_whatever_the_env_says():
    class LyingEnv(TinyEnv):
        def step(self, action):
            obs, reward, terminated, truncated, info = super().step(action)
            obs.update(is_first=True, is_last=False, is_terminal=True)
            return obs, reward, terminated, self.count == 2, info

    env = wrappers.Flags(LyingEnv(end=3))
    obs, _ = env.reset()
    assert (obs['is_first'], obs['is_last'], obs['is_terminal'], obs['reward']) == (True, False, False, 0)
    obs, *_ = env.step(np.zeros(2))
    assert (obs['is_first'], obs['is_last'], obs['is_terminal'], obs['reward']) == (False, False, False, 1)
    obs, *_ = env.step(np.zeros(2))  # truncated: last, not terminal
    assert (obs['is_first'], obs['is_last'], obs['is_terminal']) == (False, True, False)
    obs, *_ = env.step(np.zeros(2))  # terminated
    assert (obs['is_first'], obs['is_last'], obs['is_terminal']) == (False, True, True)
    assert obs['reward'].dtype == np.float32
    assert set(env.obs_space) == {'vector'}


def test_flags_obs_space_drops_flags_and_log_keys():
    class Declares(TinyEnv):
        @property
        def obs_space(self):
            box = gymnasium.spaces.Box(0, 1, (), bool)
            return {'vector': super().obs_space['vector'], 'is_first': box, 'reward': box,
                    'log_achievement_collect_wood': gymnasium.spaces.Box(0, np.inf, (), np.int64)}

    assert set(wrappers.Flags(Declares()).obs_space) == {'vector'}


def test_flags_reject_a_non_dict_observation():
    env = wrappers.Flags(GymnasiumEnv())
    with pytest.raises(TypeError, match=r"reset\(\) returned a ndarray observation; expected a dict"):
        env.reset()


def test_render_styles_and_a_missing_render():
    class NewStyle(TinyEnv):
        def render(self):
            return np.full((2, 2, 3), 7, np.uint8)

    class OldStyleRequired(TinyEnv):
        def render(self, mode):
            return np.full((2, 2, 3), 9, np.uint8) if mode == 'rgb_array' else None

    class OldStyleDefaultHuman(TinyEnv):
        def render(self, mode='human'):
            return np.full((2, 2, 3), 8, np.uint8) if mode == 'rgb_array' else None

    assert wrappers.Flags(NewStyle()).render()[0, 0, 0] == 7
    assert wrappers.Flags(OldStyleDefaultHuman()).render()[0, 0, 0] == 8
    assert wrappers.Flags(NewStyle()).render(mode='rgb_array')[0, 0, 0] == 7
    assert wrappers.Flags(OldStyleRequired()).render()[0, 0, 0] == 9
    assert wrappers.Flags(TinyEnv()).render() is None


@pytest.mark.parametrize('make, message', [
    (lambda env: wrappers.ActionRepeat(env, 0), r"ActionRepeat: 'repeat' must be a positive integer, got 0"),
    (lambda env: wrappers.ActionRepeat(env, 1.5), r"'repeat' must be a positive integer, got 1.5"),
    (lambda env: wrappers.TimeLimit(env, -1), r"TimeLimit: 'duration' must be a positive integer, got -1"),
    (lambda env: wrappers.TimeLimit(env, True), r"'duration' must be a positive integer, got True"),
    (lambda env: wrappers.ClipReward(env, 1, -1),
     r'min_reward <= max_reward, got min_reward=1, max_reward=-1'),
    (lambda env: wrappers.ClipReward(env, -np.inf, 1), r'expected finite bounds'),
    (lambda env: wrappers.OneHotAction(env), r'OneHotAction: expected an env with a Discrete action space'),
    (lambda env: wrappers.NormalizeObservation(env, epsilon=0), r"'epsilon' must be > 0, got 0"),
])
def test_constructor_arguments_are_checked(make, message):
    with pytest.raises(ValueError, match=message):
        make(TinyEnv())


def test_wrappers_forward_attributes_and_close():
    class Closable(TinyEnv):
        closed = False

        def close(self):
            self.closed = True

    inner = Closable()
    env = wrappers.Flags(wrappers.TimeLimit(wrappers.ActionRepeat(inner, 2), 10))
    assert env.end == 5  # attribute of the innermost env
    assert env.unwrapped is inner
    env.close()
    assert inner.closed
    with pytest.raises(AttributeError):
        env.no_such_attribute


def test_a_pass_through_render_reaches_an_old_gym_env_inside():
    """A user's wrapper `render(self, *args, **kwargs)` around an old gym env whose render() defaults
    to mode 'human' (and raises for it): retried with mode='rgb_array'; around a gymnasium env,
    called plainly."""
    class OldGymHuman(TinyEnv):
        def render(self, mode='human'):
            if mode != 'rgb_array':
                raise NotImplementedError(mode)
            return np.full((2, 2, 3), 5, np.uint8)

    class Gymnasium(TinyEnv):
        def render(self):
            return np.full((2, 2, 3), 6, np.uint8)

    class PassThrough(TinyEnv):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def render(self, *args, **kwargs):
            return self.inner.render(*args, **kwargs)

    assert wrappers.Flags(PassThrough(OldGymHuman())).render()[0, 0, 0] == 5
    assert wrappers.Flags(PassThrough(Gymnasium())).render()[0, 0, 0] == 6

    class Broken(TinyEnv):
        def render(self, *args, **kwargs):
            raise RuntimeError('the first error')

    with pytest.raises(RuntimeError, match='the first error'):
        wrappers.Flags(Broken()).render()
