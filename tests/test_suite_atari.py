"""Atari on ale-py: spaces, max-pool, no-op starts, sticky actions and lives, on real frames."""
import copy

import numpy as np
import pytest

from envs.atari import NOOP, STICKY_PROBABILITY, Atari, make_emulator, max_pool, sticky_action

FULL = (210, 160)  # the raw screen size: no resize, so frames compare exactly


def pong(**kwargs):
    options = dict(action_repeat=4, size=FULL, noops=0, sticky=False, seed=3)
    options.update(kwargs)
    return Atari('pong', **options)


def test_spaces_and_steps():
    env = Atari('pong', action_repeat=4, size=(64, 64), seed=0)
    assert env.obs_space['image'].shape == (64, 64, 3) and env.obs_space['image'].dtype == np.uint8
    assert env.act_space.n == 6  # Pong's minimal action set
    obs, _ = env.reset()
    assert obs['image'].shape == (64, 64, 3) and obs['image'].dtype == np.uint8
    for action in [0, 1, 2, 3, 4, 5, np.int64(2)]:
        obs, reward, terminated, truncated, info = env.step(action)
        assert obs['image'].shape == (64, 64, 3) and isinstance(reward, float)
        assert terminated is False and truncated is False and info['lives'] == 0
    assert obs['image'].std() > 5.0


def test_gray_keeps_a_channel_axis():
    env = Atari('pong', size=(64, 64), gray=True, seed=0)
    assert env.obs_space['image'].shape == (64, 64, 1)
    obs, _ = env.reset()
    assert obs['image'].shape == (64, 64, 1) and obs['image'].dtype == np.uint8
    assert env.step(0)[0]['image'].shape == (64, 64, 1)


def test_max_pool_of_last_two_frames_matches_a_hand_stepped_emulator():
    env = pong(seed=3)
    ale = make_emulator('pong', 3)
    actions = env.ale.getMinimalActionSet()
    env.reset()
    ale.reset_game()
    pooled_differs_from_last = 0
    for step, index in enumerate([2, 2, 3, 0, 2, 3, 3, 1] * 8):
        obs, reward, *_ = env.step(index)
        expected_reward, frames = 0.0, []
        for _ in range(4):
            expected_reward += ale.act(actions[index])
            frames.append(ale.getScreenRGB())
        expected = np.maximum(frames[-2], frames[-1])
        np.testing.assert_array_equal(obs['image'], expected, err_msg=f'step {step}')
        assert reward == expected_reward
        pooled_differs_from_last += int(np.any(expected != frames[-1]))
    assert pooled_differs_from_last > 10  # the pooling is visible on real frames


def test_noop_starts_play_up_to_noops_noop_frames():
    env = pong(noops=30, seed=5)
    counts = []
    for _ in range(6):
        env.reset()
        frames = env.ale.getEpisodeFrameNumber()
        assert 0 <= frames <= 30
        ale = make_emulator('pong', 5)
        ale.reset_game()
        for _ in range(frames):
            ale.act(ale.getMinimalActionSet()[NOOP])
        np.testing.assert_array_equal(env.render(), ale.getScreenRGB())
        counts.append(frames)
    assert len(set(counts)) >= 3, counts
    env = pong(noops=0)
    env.reset()
    assert env.ale.getEpisodeFrameNumber() == 0


def test_sticky_actions_repeat_the_previous_action_per_frame():
    env = pong(sticky=True, seed=11)
    env.reset()
    rng = copy.deepcopy(env._rng)  # the env's seeded generator: one uniform draw per emulator frame
    ale = make_emulator('pong', 11)
    ale.reset_game()
    actions = ale.getMinimalActionSet()
    previous, repeats = actions[NOOP], 0
    requests = np.random.default_rng(0).integers(0, 6, size=40)
    for index in requests:
        obs, reward, *_ = env.step(int(index))
        expected_reward, frames = 0.0, []
        for _ in range(4):
            played = sticky_action(actions[index], previous, rng.random(), STICKY_PROBABILITY)
            repeats += int(played != actions[index])
            previous = played
            expected_reward += ale.act(played)
            frames.append(ale.getScreenRGB())
        np.testing.assert_array_equal(obs['image'], max_pool(frames[-2:]))
        assert reward == expected_reward
    assert repeats > 10  # about a quarter of the 160 frames, minus those where the action did not change


def test_sticky_action_rule():
    assert sticky_action(requested=3, previous=1, draw=0.1, probability=0.25) == 1
    assert sticky_action(requested=3, previous=1, draw=0.3, probability=0.25) == 3
    assert sticky_action(requested=3, previous=1, draw=0.0, probability=0.0) == 3


def breakout_until_life_loss(env, limit=400):
    """FIRE to serve, then NOOP until the ball is lost; returns the step results up to the loss."""
    env.step(1)
    for _ in range(limit):
        result = env.step(0)
        if result[4]['life_loss']:
            return result
    raise AssertionError('no life lost')


def test_lives_discount_marks_terminal_but_continues():
    env = Atari('breakout', action_repeat=4, size=(64, 64), noops=0, sticky=False, lives='discount')
    env.reset()
    _, _, terminated, truncated, info = breakout_until_life_loss(env)
    assert info == {'life_loss': True, 'lives': 4, 'is_terminal': True}
    assert terminated is False and truncated is False
    _, _, terminated, _, info = env.step(0)
    assert info['is_terminal'] is False and info['lives'] == 4


def test_lives_reset_ends_the_episode_and_resumes_the_game():
    env = Atari('breakout', action_repeat=4, size=(64, 64), noops=0, sticky=False, lives='reset')
    env.reset()
    _, _, terminated, _, info = breakout_until_life_loss(env)
    assert terminated is True and info['lives'] == 4
    frame = env.ale.getEpisodeFrameNumber()
    env.reset()
    assert env.ale.getEpisodeFrameNumber() == frame and env.ale.lives() == 4  # same game goes on


def test_lives_unused_ignores_life_loss():
    env = Atari('breakout', action_repeat=4, size=(64, 64), noops=0, sticky=False, lives='unused')
    env.reset()
    _, _, terminated, _, info = breakout_until_life_loss(env)
    assert terminated is False and info['is_terminal'] is False


def test_bad_options_are_explained():
    with pytest.raises(ValueError, match=r"lives must be one of unused, discount, reset; got 'some"):
        Atari('pong', lives='sometimes')
    with pytest.raises(ValueError, match=r"Unknown Atari game 'atari_pongg'.*Known games: .*pong"):
        Atari('pongg')
    with pytest.raises(ValueError, match=r'must be an index in 0..5'):
        Atari('pong').step(6)
