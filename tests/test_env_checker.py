"""envs.checker.check_env: every diagnosis pinned by its message."""
import re

import gymnasium
import numpy as np
import pytest

import envs
from envs.checker import EnvCheckError, check_env

IMAGE = gymnasium.spaces.Box(0, 255, (64, 64, 3), np.uint8)
VECTOR = gymnasium.spaces.Box(-1, 1, (3,), np.float32)


def good_obs():
    return {'image': np.zeros((64, 64, 3), np.uint8), 'vector': np.zeros(3, np.float32)}


class ToyEnv:
    """An env whose observations, spaces and return values each test can spoil."""

    def __init__(self, obs=good_obs, obs_space=None, act_space=None, step_result=None, reset_result=None):
        self._obs = obs
        self.obs_space = obs_space or {'image': IMAGE, 'vector': VECTOR}
        self.act_space = act_space or gymnasium.spaces.Box(-1, 1, (2,), np.float32)
        self._step_result = step_result
        self._reset_result = reset_result

    def reset(self):
        return self._reset_result if self._reset_result is not None else (self._obs(), {})

    def step(self, action):
        return self._step_result if self._step_result is not None else (self._obs(), 0.0, False, False, {})


def with_obs(**changes):
    def make():
        obs = good_obs()
        for key, value in changes.items():
            if value is None:
                del obs[key]
            else:
                obs[key] = value
        return obs
    return make


def test_a_good_env_passes_with_flags_and_log_keys():
    check_env(ToyEnv(obs=with_obs(is_first=False, log_score=np.float32(2.0))))


def test_wrong_shape_names_key_expected_and_actual():
    env = ToyEnv(obs=with_obs(image=np.zeros((64, 64), np.uint8)))
    with pytest.raises(EnvCheckError, match=(
            r"env 0 \(ToyEnv\): reset\(\) observation 'image': expected shape \(64, 64, 3\), got "
            r"\(64, 64\)\. .*A grayscale image needs a channel axis")):
        check_env(env)


def test_wrong_dtype_names_key_expected_and_actual():
    env = ToyEnv(obs=with_obs(vector=np.zeros(3, np.float64)))
    with pytest.raises(EnvCheckError, match=(
            r"observation 'vector': expected dtype float32, got float64\. Convert it in _format_obs "
            r"with \.astype\(np\.float32\)")):
        check_env(env)


def test_a_float_image_is_told_to_become_uint8_not_to_be_declared_float():
    env = ToyEnv(obs=with_obs(image=np.zeros((64, 64, 3), np.float32)))
    with pytest.raises(EnvCheckError, match=r"observation 'image': expected dtype uint8, got float32\. Convert it "
                                            r"in _format_obs with \.astype\(np\.uint8\)") as error:
        check_env(env)
    assert "declare dtype" not in str(error.value)


def test_missing_key():
    with pytest.raises(EnvCheckError, match=(
            r"reset\(\) observation is missing key\(s\) \['vector'\] that obs_space declares; got "
            r"keys \['image'\]")):
        check_env(ToyEnv(obs=with_obs(vector=None)))


def test_extra_key():
    with pytest.raises(EnvCheckError, match=(
            r"observation has key\(s\) \['depth'\] that obs_space does not declare .*'log_<name>'")):
        check_env(ToyEnv(obs=with_obs(depth=np.zeros(2, np.float32))))


def test_nan_in_a_vector():
    nan_vector = np.array([0.0, np.nan, 0.0], np.float32)
    with pytest.raises(EnvCheckError, match=(
            r"observation 'vector': contains NaN at 1 of 3 entries; expected finite values")):
        check_env(ToyEnv(obs=with_obs(vector=nan_vector)))


def test_inf_reported_as_inf():
    with pytest.raises(EnvCheckError, match=r"'vector': contains inf at 3 of 3 entries"):
        check_env(ToyEnv(obs=with_obs(vector=np.full(3, np.inf, np.float32))))


def test_value_outside_bounds():
    with pytest.raises(EnvCheckError, match=(
            r"'vector': values outside obs_space bounds: expected \[-1\.0, 1\.0\], got min 0\.0, "
            r"max 5\.0 \(1 of 3 entries outside\)")):
        check_env(ToyEnv(obs=with_obs(vector=np.array([0, 5, 0], np.float32))))


def test_non_array_value():
    with pytest.raises(EnvCheckError, match=r"'vector': expected a numpy array, got list"):
        check_env(ToyEnv(obs=with_obs(vector=[0.0, 0.0, 0.0])))


def test_non_dict_observation():
    env = ToyEnv(obs=lambda: np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(EnvCheckError, match=(
            r"reset\(\) returned a ndarray observation; expected a dict with the keys "
            r"\['image', 'vector'\]\. Wrap the array in a dict")):
        check_env(env)


def test_problem_only_after_step_names_step():
    calls = []

    def obs():
        calls.append(1)
        return good_obs() if len(calls) == 1 else with_obs(image=np.zeros((32, 32, 3), np.uint8))()

    with pytest.raises(EnvCheckError, match=r"step\(\) observation 'image': expected shape \(64, 64, 3\)"):
        check_env(ToyEnv(obs=obs))


@pytest.mark.parametrize('space', [
    gymnasium.spaces.MultiDiscrete([2, 3]),
    gymnasium.spaces.Tuple([gymnasium.spaces.Discrete(2)]),
])
def test_unsupported_action_space(space):
    with pytest.raises(EnvCheckError, match=(
            r"unsupported action space .*; expected gymnasium.spaces.Box \(continuous\) or "
            r"gymnasium.spaces.Discrete \(discrete\)")):
        check_env(ToyEnv(act_space=space))


@pytest.mark.parametrize('space', [4, 'discrete', (2,)])
def test_an_action_space_that_is_no_space_at_all(space):
    with pytest.raises(EnvCheckError, match=r"act_space must be a gymnasium space, got .* Return e.g. "
                                            r"gymnasium.spaces.Discrete\(4\) for 4 discrete actions"):
        check_env(ToyEnv(act_space=space))


def test_action_box_with_infinite_bounds():
    with pytest.raises(EnvCheckError, match=r"act_space Box needs finite bounds, got low=\[-inf -inf\]"):
        check_env(ToyEnv(act_space=gymnasium.spaces.Box(-np.inf, np.inf, (2,), np.float32)))


def test_action_box_must_be_flat():
    with pytest.raises(EnvCheckError, match=r"act_space Box must be 1-D, got shape \(2, 2\)\. Flatten"):
        check_env(ToyEnv(act_space=gymnasium.spaces.Box(-1, 1, (2, 2), np.float32)))


def test_obs_space_must_be_a_dict_of_boxes():
    with pytest.raises(EnvCheckError, match=r"obs_space must be a dict of gymnasium.spaces.Box, got Box"):
        check_env(ToyEnv(obs_space=IMAGE))
    with pytest.raises(EnvCheckError,
                       match=r"obs_space\['vector'\] must be a gymnasium.spaces.Box, got Discrete"):
        check_env(ToyEnv(obs_space={'image': IMAGE, 'vector': gymnasium.spaces.Discrete(3)}))


def test_log_keys_are_not_allowed_in_obs_space():
    space = {'image': IMAGE, 'vector': VECTOR, 'log_x': gymnasium.spaces.Box(0, 1, (), np.float32)}
    with pytest.raises(EnvCheckError, match=r"obs_space declares 'log_x', but keys starting with 'log_'"):
        check_env(ToyEnv(obs_space=space))


def test_old_gym_step_four_tuple():
    with pytest.raises(EnvCheckError, match=(
            r"step\(\) must return \(obs, reward, terminated, truncated, info\), got a 4-tuple")):
        check_env(ToyEnv(step_result=(good_obs(), 0.0, False, {})))


def test_reset_without_info():
    with pytest.raises(EnvCheckError, match=r"reset\(\) must return \(obs, info\), got dict"):
        check_env(ToyEnv(reset_result=good_obs()))


def test_reward_must_be_a_finite_scalar():
    with pytest.raises(EnvCheckError, match=r"reward must be a finite scalar, got nan"):
        check_env(ToyEnv(step_result=(good_obs(), float('nan'), False, False, {})))


def test_reward_none_is_reported():
    with pytest.raises(EnvCheckError, match=r"reward must be a finite scalar, got None"):
        check_env(ToyEnv(step_result=(good_obs(), None, False, False, {})))


def test_message_names_the_env_index():
    with pytest.raises(EnvCheckError, match=r'^env 3 \(ToyEnv\): '):
        check_env(ToyEnv(obs=with_obs(vector=None)), index=3)


def test_make_env_checks_every_env_in_both_modes(monkeypatch):
    """Each env is checked when made, not only the first: copies of one class can differ (here the
    one made with seed 1 returns 2-d images)."""
    seeds = {}

    class BadImageForOneSeed(ToyEnv):
        def __init__(self, name, seed=0, **kwargs):
            image = np.zeros((64, 64), np.uint8) if seed == seeds['bad'] else np.zeros((64, 64, 3), np.uint8)
            super().__init__(obs=with_obs(image=image))

    monkeypatch.setitem(envs.REGISTRY, 'custom', BadImageForOneSeed)
    config = {'task': 'custom_bad', 'seed': 0, 'action_repeat': 1, 'env': {}}
    for mode in ('train', 'eval'):
        seeds['bad'] = envs.env_seed(0, mode, 1)
        envs.make_env(config, mode, 0)  # its copy is fine
        with pytest.raises(EnvCheckError, match=r"^env 1 \(BadImageForOneSeed\): .*'image': expected shape "
                                                r"\(64, 64, 3\), got \(64, 64\)"):
            envs.make_env(config, mode, 1)


@pytest.mark.parametrize('task', ['custom_reach', 'custom_reach_discrete', 'custom_catch'])
def test_example_tasks_pass_raw_and_wrapped(task):
    env = envs.make_env({'task': task, 'seed': 0, 'action_repeat': 2, 'env': {}}, 'train', 0)
    check_env(env)


def test_a_look_alike_box_is_named_with_its_module():
    """A Box from another package (e.g. the legacy gym) prints like gymnasium's; the message names
    the class's module so the difference shows."""
    LegacyBox = type('Box', (), {'__module__': 'gym.spaces.box', '__repr__': lambda self: 'Box(0, 255, (64, 64, 3), uint8)'})
    with pytest.raises(EnvCheckError, match=(
            r"obs_space\['image'\] must be a gymnasium.spaces.Box, got Box\(0, 255, \(64, 64, 3\), uint8\) of "
            r"type gym\.spaces\.box\.Box\. .*import gymnasium, not the legacy gym package")):
        check_env(ToyEnv(obs_space={'image': LegacyBox()}))


def test_running_steps_must_be_finite_and_name_where():
    """During a run each step's float inputs and reward are checked (the start-up check saw only its
    first reset and step); flags, integer images and logging keys are left alone."""
    from envs.checker import check_running_step

    obs = {**good_obs(), 'reward': np.float32(1.0), 'is_first': False, 'is_last': True, 'log_x': np.float32(2)}
    check_running_step(obs, 'env 0 at step 10')
    with pytest.raises(EnvCheckError, match=r"^env 2 at step 7: observation 'vector' contains inf at 1 of 3 "
                                            r"entries: \[0\.0, inf, 0\.0\]; every float observation \(also one "
                                            r"the model does not read: the replay stores it\) and every reward "
                                            r"must be finite"):
        check_running_step({**obs, 'vector': np.array([0, np.inf, 0], np.float32)}, 'env 2 at step 7')
    with pytest.raises(EnvCheckError, match=r"^eval env 0: returned a reward of nan; .*the same command resumes"):
        check_running_step({**obs, 'reward': float('nan')}, 'eval env 0')


def test_flags_declared_in_obs_space_are_left_alone():
    """obs_space may declare the flags (in any space type, e.g. a Discrete is_first): the training loop
    owns them, so the check neither rejects their spaces nor requires them in the observation."""
    space = {'image': IMAGE, 'vector': VECTOR, 'is_first': gymnasium.spaces.Discrete(2),
             'reward': gymnasium.spaces.Box(-np.inf, np.inf, (), np.float32)}
    check_env(ToyEnv(obs_space=space))


def test_a_gymnasium_dict_obs_space_is_taken_as_its_boxes():
    check_env(ToyEnv(obs_space=gymnasium.spaces.Dict({'image': IMAGE, 'vector': VECTOR})))
    with pytest.raises(EnvCheckError, match=r"reset\(\) observation is missing key\(s\) \['depth'\]"):
        check_env(ToyEnv(obs_space=gymnasium.spaces.Dict(
            {'image': IMAGE, 'vector': VECTOR, 'depth': gymnasium.spaces.Box(0, 1, (2,), np.float32)})))


def test_a_scalar_observation_may_be_a_numpy_scalar():
    """A 0-d Box's value may come as np.float32(x) (np.generic), as numpy arithmetic returns it."""
    space = {'image': IMAGE, 'vector': VECTOR, 'speed': gymnasium.spaces.Box(0, 10, (), np.float32)}
    check_env(ToyEnv(obs=with_obs(speed=np.float32(3.0)), obs_space=space))
    with pytest.raises(EnvCheckError, match=r"'speed': expected a numpy array, got float\. Convert it with "
                                            r"np\.asarray\(value, dtype=np\.float32\)"):
        check_env(ToyEnv(obs=with_obs(speed=3.0), obs_space=space))


def test_action_box_must_be_flat_also_when_it_is_a_scalar():
    with pytest.raises(EnvCheckError, match=r"act_space Box must be 1-D, got shape \(\)\. Flatten the action "
                                            r"into a vector of 1 values"):
        check_env(ToyEnv(act_space=gymnasium.spaces.Box(-1, 1, (), np.float32)))


def test_action_box_needs_an_upper_bound_too():
    space = gymnasium.spaces.Box(np.array([-1, -1], np.float32), np.array([1, np.inf], np.float32))
    with pytest.raises(EnvCheckError, match=r"act_space Box needs finite bounds, got low=\[-1\. -1\.\], "
                                            r"high=\[ 1\. inf\]"):
        check_env(ToyEnv(act_space=space))


@pytest.mark.parametrize('reward', [np.array([1.0]), np.zeros((1, 1)), [1.0]])
def test_reward_must_be_a_scalar_not_an_array_of_one(reward):
    with pytest.raises(EnvCheckError, match=r"step\(\) reward must be a finite scalar, got .*Return a float"):
        check_env(ToyEnv(step_result=(good_obs(), reward, False, False, {})))
    check_env(ToyEnv(step_result=(good_obs(), np.float32(1.0), False, False, {})))  # a numpy scalar is one


@pytest.mark.parametrize('position', [2, 3])
def test_terminated_and_truncated_must_be_single_bools(position):
    result = [good_obs(), 0.0, False, False, {}]
    result[position] = np.array([False])
    name = 'terminated' if position == 2 else 'truncated'
    with pytest.raises(EnvCheckError, match=rf"step\(\) '{name}' must be a bool, got array\(\[False\]\)"):
        check_env(ToyEnv(step_result=tuple(result)))
    result[position] = np.bool_(True)
    check_env(ToyEnv(step_result=tuple(result)))


def test_logging_keys_must_be_finite_scalars():
    with pytest.raises(EnvCheckError, match=r"observation 'log_score' is a logging key and must be a finite "
                                            r"scalar, got array\(\[1\., 2\.\], dtype=float32\)"):
        check_env(ToyEnv(obs=with_obs(log_score=np.array([1, 2], np.float32))))
    with pytest.raises(EnvCheckError, match=r"'log_score' is a logging key and must be a finite scalar, got nan"):
        check_env(ToyEnv(obs=with_obs(log_score=float('nan'))))
    for value in ('yes', None, b'1', 1j):  # np.isfinite itself failed on a string (a TypeError blamed on the env)
        with pytest.raises(EnvCheckError, match=rf"'log_score' is a logging key and must be a finite scalar, got "
                                                rf"{re.escape(repr(value))}\.$"):
            check_env(ToyEnv(obs=lambda: {**good_obs(), 'log_score': value}))
    for value in (3, 2.5, True, np.float32(1), np.array(4.0)):
        check_env(ToyEnv(obs=with_obs(log_score=value)))


def test_logging_keys_must_stay_finite_numbers_while_running():
    """A string or NaN given later in the run: one paragraph naming the env, step and key (a string
    failed in the episode tracker's float(), and a NaN was logged as -Infinity, not JSON)."""
    from envs.checker import check_running_step

    obs = {**good_obs(), 'reward': np.float32(1.0), 'is_first': False, 'is_last': True, 'log_success': True}
    check_running_step(obs, 'env 0 at step 10')
    for value in ('done', float('nan'), np.float32('inf'), None, np.zeros(2)):
        with pytest.raises(EnvCheckError) as raised:
            check_running_step({**obs, 'log_success': value}, 'env 3 at step 700')
        assert str(raised.value).startswith(
            f"env 3 at step 700: observation 'log_success' is a logging key and must be a finite number, got "
            f"{value!r}; it is logged as the episode's largest value (episode/success). Return a float, int or bool "
            "there at every step. The run stopped before storing the step, and nothing on disk changed")


def test_a_plain_gymnasium_env_is_pointed_at_the_gym_suite():
    with pytest.raises(EnvCheckError, match=r"must be a dict of gymnasium\.spaces\.Box, got Box .* This looks like "
                                            r"a plain gymnasium env \(observation_space, no obs_space\): register it "
                                            r"with gymnasium\.register and train it as --task gym_<its id>"):
        check_env(gymnasium.make('CartPole-v1'))
    with pytest.raises(EnvCheckError) as raised:  # our protocol's own obs_space gets no such hint
        check_env(ToyEnv(obs_space=VECTOR))
    assert 'gymnasium env' not in str(raised.value)


def test_terminated_none_is_no_bool():
    with pytest.raises(EnvCheckError, match=r"step\(\) 'terminated' must be a bool, got None"):
        check_env(ToyEnv(step_result=(good_obs(), 0.0, None, False, {})))


def test_grayscale_hint_only_for_an_image_space():
    """A 2-d value for a 1-d Box gets the plain shape message, not the image channel-axis hint."""
    with pytest.raises(EnvCheckError, match=r"'vector': expected shape \(3,\), got \(1, 3\)\.") as error:
        check_env(ToyEnv(obs=with_obs(vector=np.zeros((1, 3), np.float32))))
    assert 'grayscale' not in str(error.value)


def test_a_uint8_vector_with_the_wrong_dtype_is_not_told_it_is_an_image():
    space = {'image': IMAGE, 'vector': VECTOR, 'counts': gymnasium.spaces.Box(0, 9, (4,), np.uint8)}
    with pytest.raises(EnvCheckError, match=r"'counts': expected dtype uint8, got int64\. Convert it in "
                                            r"_format_obs with \.astype\(np\.uint8\) or declare dtype=np\.int64 "
                                            r"in obs_space\['counts'\]") as error:
        check_env(ToyEnv(obs=with_obs(counts=np.zeros(4, np.int64)), obs_space=space))
    assert 'images are used' not in str(error.value)
