"""Atari on ale-py: spaces, max-pool, no-op starts, sticky actions and lives, on real frames."""
import copy

import numpy as np
import pytest

from envs.atari import NOOP, STICKY_PROBABILITY, Atari, make_emulator, max_pool, sticky_action
from helpers.paper_envs import paper_env, unwrap

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


def test_gray_frames_are_the_emulators_luminance_screen():
    env, ale = pong(gray=True), make_emulator('pong', 3)
    env.reset()
    ale.reset_game()
    for _ in range(4):
        ale.act(ale.getMinimalActionSet()[NOOP])
    screen = ale.getScreenGrayscale()  # (210, 160): ALE's palette luminance, not one RGB channel
    assert np.any(screen != ale.getScreenRGB()[..., 0])
    np.testing.assert_array_equal(env.step(0)[0]['image'][..., 0], screen)


def test_the_seed_reaches_the_emulator_and_reset_seed_restarts_the_draws():
    assert pong(seed=5).ale.getInt('random_seed') == 5
    one, other = pong(seed=1, noops=30, sticky=True), pong(seed=2, noops=30, sticky=True)
    starts = []
    for env in (one, other):
        env.reset(seed=9)  # the same no-op count and the same sticky draws, whatever the first seed
        starts.append(env.ale.getEpisodeFrameNumber())
        for index in [2, 3, 2, 3, 1, 0] * 5:
            env.step(index)
    assert starts[0] == starts[1]
    np.testing.assert_array_equal(one.ale.getRAM(), other.ale.getRAM())
    np.testing.assert_array_equal(one.render(), other.render())


def test_no_op_starts_longer_than_a_game_begin_a_fresh_one():
    env = pong(noops=5000)  # a NOOP-only Pong game is lost 21:0 after about 3,000 frames
    count = int(np.random.default_rng(0).integers(0, 5001))  # what reset(seed=0) draws
    assert count > 3500, count  # seed 0 draws a count past the end of the first game
    env.reset(seed=0)
    assert not env.ale.game_over() and env.ale.getEpisodeFrameNumber() < count
    _, _, terminated, truncated, _ = env.step(0)
    assert terminated is False and truncated is False


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
    env = pong(sticky=True, seed=12)
    env.reset()
    rng = copy.deepcopy(env._rng)  # the env's seeded generator: one uniform draw per emulator frame
    ale = make_emulator('pong', 12)
    ale.reset_game()
    actions = ale.getMinimalActionSet()
    repeats, previous = 0, actions[NOOP]
    for game, requests in enumerate([np.random.default_rng(0).integers(0, 6, size=40), [0] * 8]):
        if game:  # a new game starts from NOOP as the previous action, whatever the last one played
            env.reset()
            ale.reset_game()
            rng.integers(0, 1)  # reset's no-op count draw (noops=0)
            # seed 12 makes this case bite: game 1 ended on a non-NOOP, game 2's first frame is sticky
            assert previous != actions[NOOP] and copy.deepcopy(rng).random() < STICKY_PROBABILITY
            previous = actions[NOOP]
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
            np.testing.assert_array_equal(env.ale.getRAM(), ale.getRAM())  # the same frames were played
            assert reward == expected_reward
    assert repeats > 10  # about a quarter of the 192 frames, minus those where the action did not change


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


def test_a_life_loss_on_the_last_frame_of_the_cap_is_terminal_and_then_a_new_game_starts():
    def breakout(**kwargs):
        return Atari('breakout', action_repeat=4, size=(64, 64), noops=0, sticky=False, lives='reset', **kwargs)

    env = breakout()
    env.reset()
    breakout_until_life_loss(env)
    frames = env.ale.getEpisodeFrameNumber()  # the life is lost within the step that plays this frame
    capped = breakout(length=frames)
    capped.reset()
    _, _, terminated, truncated, info = breakout_until_life_loss(capped)
    assert (terminated, truncated, info['lives']) == (True, False, 4)  # an ending, not a cut
    capped.reset()  # the cap is reached: a new game, not the same one continued
    assert capped.ale.getEpisodeFrameNumber() == 0 and capped.ale.lives() == 5


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
    with pytest.raises(ValueError, match=r"got 'MontezumaRevenge'\. Close matches: montezuma_revenge, "):
        Atari('MontezumaRevenge')  # gym's CamelCase spelling points at ale-py's snake_case id
    with pytest.raises(ValueError, match=r"got 'Pong'\. Close matches: pong, "):
        Atari('Pong')
    with pytest.raises(ValueError, match=r"got 'PongNoFrameskip-v4'\. Close matches: pong, "):
        Atari('PongNoFrameskip-v4')  # gym's most used Atari id
    with pytest.raises(ValueError, match=r'Atari noops must be >= 0 .*; got -1\. Use 30 as in the paper'):
        Atari('pong', noops=-1)
    with pytest.raises(ValueError, match=r'must be an index in 0..5'):
        Atari('pong').step(6)


# ------------------------------------------------------------------ the paper's settings, end to end


class RecordingALE:
    """Passes every call to the real ALEInterface and records the action of each act()."""

    def __init__(self, ale):
        self.ale, self.played = ale, []

    def act(self, action, *args):
        self.played.append(action)
        return self.ale.act(action, *args)

    def __getattr__(self, name):
        return getattr(self.ale, name)


def sticky_rate(env, steps=1000):
    """Fraction of frames that replayed the previous action although another one was requested."""
    env.reset()
    recorder = RecordingALE(env.ale)
    env._ale = recorder
    actions = env.ale.getMinimalActionSet()
    requested = []
    for step in range(steps):
        index = 2 + step % 2  # RIGHT, LEFT, RIGHT, ...: every step asks for another action
        env.step(index)
        requested += [actions[index]] * (len(recorder.played) - len(requested))
    previous = [actions[NOOP]] + recorder.played[:-1]
    chances = [(want, last, got) for want, last, got in zip(requested, previous, recorder.played)
               if want != last]
    return sum(got == last for _, last, got in chances) / len(chances), len(chances)


def test_sticky_actions_replay_the_previous_action_a_quarter_of_the_time():
    env = pong(sticky=True, seed=0)
    assert env.ale.getFloat('repeat_action_probability') == 0.0  # no second, hidden stickiness
    rate, chances = sticky_rate(env)
    assert chances > 1000
    assert 0.21 < rate < 0.29, rate  # 0.25 (Machado et al.); std of the estimate ~0.012
    rate, _ = sticky_rate(pong(sticky=False, seed=0), steps=200)
    assert rate == 0.0


def test_action_sets_minimal_and_full():
    minimal = Atari('pong', size=(64, 64), seed=0)
    full = Atari('pong', size=(64, 64), actions='all', seed=0)
    assert minimal.act_space.n == 6 and full.act_space.n == 18
    assert full._actions == list(full.ale.getLegalActionSet())
    import ale_py
    assert full._actions[NOOP] == minimal._actions[NOOP] == ale_py.Action.NOOP  # index 0 is NOOP
    full.reset()
    assert full.step(17)[0]['image'].shape == (64, 64, 3)  # DOWNLEFTFIRE: not in Pong's minimal set
    with pytest.raises(ValueError, match=r"actions must be one of needed, all; got 'some'"):
        Atari('pong', actions='some')


def test_games_are_cut_at_108000_frames_as_truncation():
    assert Atari('pong')._length == 108000  # 30 minutes at 60 Hz = 27,000 agent steps at repeat 4
    env = pong(length=40)
    env.reset()
    for step in range(1, 11):
        _, _, terminated, truncated, _ = env.step(0)
        assert terminated is False
        assert truncated is (step == 10), step  # 10 agent steps x 4 frames
    assert env.ale.getEpisodeFrameNumber() == 40
    env.reset()
    assert env.ale.getEpisodeFrameNumber() == 0  # a new game, whose frames are counted from 0 again
    truncations = [env.step(0)[3] for _ in range(10)]
    assert truncations == [False] * 9 + [True]
    _, _, _, truncated, _ = pong(length=0).step(0)
    assert truncated is False


@pytest.mark.parametrize('block, sticky, noops, steps', [('atari', True, 0, 50_000_000),
                                                         ('atari100k', False, 30, 100_000)])
def test_config_blocks_build_the_papers_env(block, sticky, noops, steps):
    config, env = paper_env(block, 'atari_pong')
    # Atari 200M = 50M agent steps; Atari100k = 100K agent steps = 400K frames (both at repeat 4)
    assert config.steps == steps and config.action_repeat == 4 and config.reward_clip == 0.0
    assert config.time_limit == 27000 and config.envs.amount == (8 if block == 'atari' else 1)
    assert config.train_ratio == (64 if block == 'atari' else 1024)
    # the paper's evaluation: Atari100k's score is 100 episodes at 100K; Atari 200M 10 every 1M
    assert (config.eval_every, config.eval_episode_num) == ((1_000_000, 10) if block == 'atari'
                                                            else (100_000, 100))
    names, atari = unwrap(env, Atari)
    assert atari._repeat == 4 and atari._sticky_probability == (0.25 if sticky else 0.0)
    assert atari._noops == noops and atari._lives_mode == 'unused' and atari._gray is False
    assert atari._length == 108000 and atari.obs_space['image'].shape == (64, 64, 3)
    # the env repeats and pools itself; no reward clipping, the time limit as truncation
    assert names == ['Flags', 'TimeLimit', 'OneHotAction']


def test_rewards_reach_the_agent_unclipped():
    """Space Invaders scores 5 to 30 points per invader: the agent's reward is the raw score."""
    _, env = paper_env('atari100k', 'atari_space_invaders')
    env.reset()
    rng = np.random.default_rng(0)
    rewards = []
    for _ in range(600):
        obs, reward, terminated, truncated, _ = env.step(int(rng.integers(env.act_space.n)))
        assert obs['reward'] == np.float32(reward)
        rewards.append(reward)
        if terminated or truncated:
            break
    assert max(rewards) >= 5.0 and sum(rewards) >= 20.0, sorted(set(rewards))


def test_a_life_loss_is_not_terminal_in_the_papers_configs():
    for lives, terminal in [('unused', False), ('discount', True)]:
        _, env = paper_env('atari100k', 'atari_breakout', **{'env.atari.lives': lives,
                                                             'env.atari.noops': 0})
        env.reset()
        env.step(1)  # FIRE serves the ball
        for _ in range(400):
            obs, _, terminated, truncated, info = env.step(0)
            if info['life_loss']:
                break
        assert info['life_loss'] and info['lives'] == 4
        assert obs['is_terminal'] is terminal and obs['is_last'] is False  # the game goes on
        assert terminated is False and truncated is False


def test_area_resize_averages_the_pixels_each_output_pixel_covers():
    """resize 'area' (the default: the paper's code resizes with OpenCV's INTER_AREA, which this
    equals without the package) averages whole blocks for integer factors and weights the pixels a
    fractional interval covers by their overlap."""
    from envs.atari import area_weights, resize_frame
    frame = np.random.default_rng(0).integers(0, 256, (210, 160, 3)).astype(np.uint8)
    half = resize_frame(frame, (105, 80), 'area').astype(int)
    blocks = frame.reshape(105, 2, 80, 2, 3).astype(float).mean((1, 3))
    assert np.abs(half - blocks).max() <= 0.5  # the 2x2 mean, rounded to the nearest level
    # 3 pixels into 2: each output covers 1.5 inputs: weights (1, 0.5, 0) / 1.5 and (0, 0.5, 1) / 1.5
    np.testing.assert_allclose(area_weights(3, 2), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])
    weights = area_weights(210, 64)
    np.testing.assert_allclose(weights.sum(1), 1.0)
    assert (np.count_nonzero(weights, 1) <= 5).all()  # an output row covers 3.28 input rows
    # the taps give the full overlap-weight product exactly, and not pillow's bilinear filter
    screen = resize_frame(frame, (64, 64), 'area')
    full = np.einsum('oh,hwc,pw->opc', weights, frame.astype(np.float64), area_weights(160, 64))
    np.testing.assert_array_equal(screen, np.clip(np.rint(full), 0, 255).astype(np.uint8))
    assert np.abs(screen.astype(int) - resize_frame(frame, (64, 64), 'pillow')).max() > 16
    gray = resize_frame(frame[..., :1], (64, 64), 'area')
    assert gray.shape == (64, 64, 1) and gray.dtype == np.uint8
    # a flat screen stays flat; alternate rows are averaged, not sampled
    assert (resize_frame(np.full((210, 160, 3), 77, np.uint8), (64, 64), 'area') == 77).all()
    stripes = np.zeros((210, 160, 3), np.uint8)
    stripes[::2] = 200
    assert np.abs(resize_frame(stripes, (64, 64), 'area').astype(int) - 100).max() <= 31
    # a size larger than the screen has no area to average: pillow's bilinear filter enlarges it
    np.testing.assert_array_equal(resize_frame(frame, (256, 192), 'area'),
                                  resize_frame(frame, (256, 192), 'pillow'))


def test_bad_numbers_are_explained():
    with pytest.raises(ValueError, match=r'action_repeat must be >= 1; got 0'):
        Atari('pong', action_repeat=0)
    with pytest.raises(ValueError, match=r'length must be >= 0 emulator frames \(0 = no cap\); got -1'):
        Atari('pong', length=-1)
    assert Atari('pong', action_repeat=1, length=0)._length == 0  # the smallest values are taken


def test_an_action_as_a_one_element_array_plays_that_index():
    played = {}
    for name, action in [('int', 3), ('array', np.array([3])), ('0-d', np.array(3))]:
        env = pong(noops=0)
        env.reset()
        recorder = RecordingALE(env.ale)
        env._ale = recorder
        env.step(action)
        played[name] = recorder.played
    assert played['int'] == played['array'] == played['0-d'] == [env._actions[3]] * 4


def test_the_cap_stops_within_a_repeat():
    """A length that is not a multiple of the repeat stops the game at that frame, mid-repeat."""
    env = pong(length=10)
    env.reset()
    assert [env.step(0)[3] for _ in range(3)] == [False, False, True]  # frames 4, 8, then 9 and 10
    assert env.ale.getEpisodeFrameNumber() == 10


def test_game_over_is_terminal_and_the_next_reset_starts_a_new_game():
    """lives 'reset': every life loss ends an episode and the next reset() continues the game, until
    the last life: game over, terminated and is_terminal, and reset() then starts a new game."""
    env = Atari('breakout', action_repeat=4, size=(64, 64), noops=0, sticky=False, lives='reset')
    env.reset()
    for lives in [4, 3, 2, 1]:
        _, _, terminated, _, info = breakout_until_life_loss(env)
        assert terminated is True and info['lives'] == lives and not env.ale.game_over()
        env.reset()
        assert env.ale.lives() == lives and env.ale.getEpisodeFrameNumber() > 0  # the same game
    _, _, terminated, truncated, info = breakout_until_life_loss(env)
    assert env.ale.game_over() and (terminated, truncated) == (True, False)
    assert info['is_terminal'] is True
    env.reset()
    assert env.ale.getEpisodeFrameNumber() == 0 and env.ale.lives() == 5


def test_after_a_resumed_game_an_episode_without_a_life_loss_restarts_the_game():
    """lives 'reset': the reset() that resumes a game after a life loss is used up by it; an episode
    that then ends without one (a time limit outside the env) is followed by a new game."""
    env = Atari('breakout', action_repeat=4, size=(64, 64), noops=0, sticky=False, lives='reset')
    env.reset()
    breakout_until_life_loss(env)
    env.reset()  # resumes the game with 4 lives
    env.step(0)
    env.reset()  # the episode was cut by a time limit: no life lost, so a new game
    assert env.ale.getEpisodeFrameNumber() == 0 and env.ale.lives() == 5


class ScriptedLives(RecordingALE):
    """The real emulator, but lives() answers from a script (games that award extra lives)."""

    def __init__(self, ale, lives):
        super().__init__(ale)
        self.script = list(lives)

    def lives(self):
        return self.script.pop(0)


def test_only_a_drop_in_lives_is_a_life_loss_counted_from_the_games_reset():
    env = Atari('pong', action_repeat=4, size=(64, 64), noops=0, sticky=False, lives='discount')
    env._ale = ScriptedLives(env.ale, [3, 4, 4, 3])  # reset: 3; an extra life; steady; a loss
    env.reset()
    infos = [env.step(0)[4] for _ in range(3)]
    assert [info['life_loss'] for info in infos] == [False, False, True]
    assert [info['is_terminal'] for info in infos] == [False, False, True]
    env._ale = ScriptedLives(env.ale.ale, [5, 4])  # a new game's lives are counted from its reset
    env._lives = 0  # as after a game over
    env.reset()
    assert env.step(0)[4]['life_loss'] is True
