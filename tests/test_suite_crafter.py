"""Crafter: a real env, achievement log keys that count up, and the paper's score formula."""
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from envs.crafter import Crafter, crafter_score

ACHIEVEMENTS = 22
ROOT = Path(__file__).resolve().parent.parent


def log_keys(obs):
    return {key: int(value) for key, value in obs.items() if key.startswith('log_achievement_')}


def run_random(env, steps, seed=0):
    """Random policy for `steps` steps (or one episode); returns the list of step results."""
    rng = np.random.default_rng(seed)
    results = []
    for _ in range(steps):
        results.append(env.step(int(rng.integers(env.act_space.n))))
        if results[-1][2] or results[-1][3]:
            break
    return results


def test_spaces_steps_and_all_achievement_keys():
    env = Crafter('reward', size=(64, 64), seed=0)
    assert list(env.obs_space) == ['image'] and env.obs_space['image'].shape == (64, 64, 3)
    assert env.act_space.n == 17
    obs, _ = env.reset()
    assert obs['image'].shape == (64, 64, 3) and obs['image'].dtype == np.uint8
    assert len(log_keys(obs)) == ACHIEVEMENTS and sum(log_keys(obs).values()) == 0
    assert 'log_achievement_collect_diamond' in obs and 'log_achievement_wake_up' in obs
    for obs, reward, terminated, truncated, info in run_random(env, 5):
        assert len(log_keys(obs)) == ACHIEVEMENTS
        assert isinstance(reward, float) and isinstance(terminated, bool) and isinstance(truncated, bool)
    assert env.render().shape == (64, 64, 3)


def test_achievement_counts_count_up_and_match_the_reward():
    env = Crafter('reward', seed=0)
    env.reset()
    previous = dict.fromkeys(env.achievements, 0)
    unlocked_rewards = []
    for obs, reward, terminated, truncated, _ in run_random(env, 400, seed=0):
        counts = {key[len('log_achievement_'):]: value for key, value in log_keys(obs).items()}
        assert len(counts) == ACHIEVEMENTS
        assert all(counts[name] >= previous[name] for name in counts)  # counts never go down
        first_unlocks = [name for name in counts if counts[name] > 0 and previous[name] == 0]
        if first_unlocks:
            unlocked_rewards.append(reward)
        previous = counts
    assert sum(previous.values()) > 0, previous
    assert previous['collect_sapling'] > 0 or previous['wake_up'] > 0, previous
    # an unlock gives +1 on top of the health term (+-0.1 per health point)
    assert all(0.5 <= reward <= 1.5 for reward in unlocked_rewards), unlocked_rewards


def test_achievement_logs_are_crafters_own_counts_and_go_past_one():
    env = Crafter('reward', seed=0)
    infos = []
    crafter_step = env._env.step

    def step_and_keep_info(action):  # crafter's own step, its info kept for the comparison
        result = crafter_step(action)
        infos.append(result[3])
        return result

    env._env.step = step_and_keep_info
    highest, steps = 0, 0
    while highest < 2 and steps < 5000:  # crafter's worlds are not reproducible across processes:
        env.reset()  # play episodes until some achievement is unlocked twice (a few hundred steps)
        for obs, *_ in run_random(env, 1000, seed=steps):
            assert log_keys(obs) == {f'log_achievement_{name}': count
                                     for name, count in infos.pop(0)['achievements'].items()}
            highest, steps = max(highest, *log_keys(obs).values()), steps + 1
    assert highest >= 2, steps  # counts, not 0/1 flags


def test_the_seed_picks_the_world():
    def first_image(seed):
        return Crafter('reward', seed=seed).reset()[0]['image']
    np.testing.assert_array_equal(first_image(3), first_image(3))
    assert np.any(first_image(3) != first_image(4))


def test_death_is_terminated():
    env = Crafter('reward', seed=0)
    env.reset()
    results = run_random(env, 10000, seed=0)
    _, _, terminated, truncated, _ = results[-1]
    assert terminated is True and truncated is False and len(results) < 10000
    # health lost costs -0.1 per point (crafter's reward): negative rewards reach the agent as they are
    losses = [reward for _, reward, *_ in results if reward < 0]
    assert losses and all(abs(10 * loss - round(10 * loss)) < 1e-6 for loss in losses), losses


def test_noreward_gives_zero_reward_but_still_logs():
    env = Crafter('noreward', seed=0)
    env.reset()
    results = run_random(env, 300, seed=0)
    assert all(reward == 0.0 for _, reward, *_ in results)
    assert sum(log_keys(results[-1][0]).values()) > 0


def test_crafter_score_hand_computed():
    assert crafter_score({'a': 0.0, 'b': 0.0}) == 0.0
    assert crafter_score({'a': 100.0, 'b': 100.0}) == pytest.approx(100.0)
    assert crafter_score({'a': 1.0, 'b': 3.0}) == pytest.approx(math.sqrt(2 * 4) - 1)  # 1.828427
    rates = dict(zip('abcd', [0.0, 10.0, 50.0, 90.0]))
    expected = (1 * 11 * 51 * 91) ** 0.25 - 1  # 51051 ** 0.25 - 1 = 14.0315
    assert crafter_score(rates) == pytest.approx(expected)
    assert crafter_score(rates) == pytest.approx(14.03146, abs=1e-4)


def test_crafter_score_rejects_bad_input():
    with pytest.raises(ValueError, match='empty dict'):
        crafter_score({})
    with pytest.raises(ValueError, match=r'in percent \(0..100\)'):
        crafter_score({'a': 150.0})
    with pytest.raises(ValueError, match=r'in percent \(0..100\)'):
        crafter_score({'a': -1.0, 'b': 50.0})
    assert crafter_score({'a': 0.0, 'b': 100.0}) == pytest.approx(math.sqrt(101) - 1)  # both ends taken


def test_unknown_task():
    with pytest.raises(ValueError, match="Unknown Crafter task 'crafter_hard'"):
        Crafter('hard')


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """`code` run by a new Python process in the project root (its own module table)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_importing_crafter_leaves_the_module_table_as_it_was():
    """Hiding gym while crafter imports must not leave a None entry behind: with one, any later
    `importlib.util.find_spec('gym')` raises ValueError, gym installed or not."""
    code = ("import importlib.util, sys\n"
            "from envs.crafter import Crafter\n"
            "Crafter('reward', seed=0)\n"
            "assert 'gym' not in sys.modules, sys.modules.get('gym', 'missing')\n"
            "importlib.util.find_spec('gym')\n")
    run = fresh_python(code)
    assert run.returncode == 0, run.stderr


@pytest.mark.skipif(importlib.util.find_spec("gym") is None,
                    reason="the legacy gym package is not installed: nothing to hide")
def test_no_legacy_gym_banner_and_gym_still_importable():
    """crafter imports the legacy gym package when present, which prints a deprecation banner on
    every run; the wrapper imports crafter without it and leaves gym importable for other code."""
    code = ("import importlib.util, sys\n"
            "from envs.crafter import Crafter\n"
            "env = Crafter('reward', seed=0)\n"
            "obs, _ = env.reset()\n"
            "assert env.act_space.n == 17 and obs['image'].shape == (64, 64, 3)\n"
            "assert 'gym' not in sys.modules\n"
            "importlib.util.find_spec('gym')\n")  # raises ValueError if sys.modules['gym'] were left None
    run = fresh_python(code)
    assert run.returncode == 0, run.stderr
    assert "unmaintained" not in run.stderr + run.stdout


def test_episodes_are_cut_at_10000_steps_as_truncation():
    env = Crafter('reward', seed=0)
    assert env._env._length == 10000  # the paper's (and crafter's) episode length
    env._env._length = 30  # the same mechanism, reached quickly
    env.reset()
    results = [env.step(0) for _ in range(30)]
    assert [r[3] for r in results] == [False] * 29 + [True]
    assert not any(r[2] for r in results)  # alive at the end: truncated, not terminated


def test_crafter_block_builds_the_papers_env():
    from helpers.paper_envs import paper_env, unwrap
    config, env = paper_env('crafter')  # the block's own task
    assert config.task == 'crafter_reward' and config.steps == 1_000_000
    assert config.action_repeat == 1 and config.envs.amount == 1 and config.train_ratio == 512
    assert config.reward_clip == 0.0 and config.time_limit == 0
    stack, _ = unwrap(env, Crafter)
    assert stack == ['Flags', 'OneHotAction']  # no repeat, no clipping, crafter's own length
    assert set(env.obs_space) == {'image'} and env.obs_space['image'].shape == (64, 64, 3)
    obs, _ = env.reset()
    assert len(log_keys(obs)) == ACHIEVEMENTS and obs['is_first'] is True
    obs, reward, *_ = env.step(0)
    assert obs['reward'] == np.float32(reward) and obs['is_terminal'] is False


def test_other_image_sizes_and_actions_as_arrays():
    env = Crafter('reward', size=(96, 80), seed=0)
    obs, _ = env.reset()
    assert env.obs_space['image'].shape == (96, 80, 3) and obs['image'].shape == (96, 80, 3)
    played = []
    crafter_step = env._env.step
    env._env.step = lambda action: played.append(action) or crafter_step(action)
    obs, *_ = env.step(np.array([5]))
    env.step(np.array(7))
    env.step(np.int64(3))
    assert played == [5, 7, 3] and all(type(action) is int for action in played)
    assert obs['image'].shape == (96, 80, 3)


def test_the_achievement_list_is_a_copy():
    env = Crafter('reward', seed=0)
    names = env.achievements
    names.clear()
    assert len(env.achievements) == ACHIEVEMENTS
    obs, _ = env.reset()
    assert len(log_keys(obs)) == ACHIEVEMENTS


def test_a_gym_module_imported_before_crafter_stays_in_the_module_table():
    """With a `gym` module already imported (a user's other code), crafter takes it as it is and
    the wrapper neither hides nor removes it."""
    code = ("import sys, types\n"
            "import gymnasium\n"
            "stand_in = types.ModuleType('gym')\n"
            "stand_in.spaces, stand_in.Env = gymnasium.spaces, gymnasium.Env  # what crafter takes\n"
            "stand_in.register = lambda **kwargs: None\n"
            "sys.modules['gym'] = stand_in\n"
            "from envs.crafter import import_crafter\n"
            "crafter = import_crafter()\n"
            "assert sys.modules['gym'] is stand_in\n"
            "assert crafter.env.DiscreteSpace is gymnasium.spaces.Discrete\n")
    run = fresh_python(code)
    assert run.returncode == 0, run.stderr
