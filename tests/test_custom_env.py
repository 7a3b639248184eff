"""The shipped example tasks' dynamics, as envs/custom_env.py's docstring and README describe them
(their random-policy and heading-for-the-goal scores are the learning checks' bars), and the
template's own flags and seeding."""
import numpy as np
import pytest

import envs
from envs.custom_env import EPISODE_LENGTH, Catch, CustomEnv, Reach, ReachDiscrete, draw_disk, image_size


def grid(height, width):
    return np.mgrid[0:height, 0:width]


def test_draw_disk_maps_the_square_onto_the_image_with_y_up():
    """(-1, 1) is the top-left pixel, (1, -1) the bottom-right, for any image size."""
    for center, pixel in (((-1, 1), (0, 0)), ((1, 1), (0, 47)), ((-1, -1), (31, 0)), ((1, -1), (31, 47)),
                          ((0, 0), (15.5, 23.5))):
        image = np.zeros((32, 48, 3), np.uint8)
        draw_disk(image, grid(32, 48), np.array(center, float), 0.8, (255, 0, 0))
        rows, cols = np.nonzero(image[..., 0])
        assert (rows.mean(), cols.mean()) == pixel, center
        assert image[..., 1:].max() == 0


def test_reach_moves_by_at_most_the_speed_and_stays_in_the_square():
    env = Reach((16, 16))
    env.reset(seed=0)
    start = env._point.copy()
    env.step(np.array([5.0, -5.0]))  # a raw action beyond the task's Box is clipped to +-0.1
    np.testing.assert_allclose(env._point - start, [0.1, -0.1], atol=1e-12)
    for _ in range(25):
        env.step(np.array([0.1, 0.1]))
    np.testing.assert_array_equal(env._point, [1.0, 1.0])  # pushed into the corner, not past it
    _, reward, terminated, truncated, _ = env.step(np.zeros(2))
    assert reward == pytest.approx(1 - np.linalg.norm(env._point - env._target))
    assert not terminated and not truncated


def test_reach_targets_keep_inside_0_8_points_start_anywhere():
    env = Reach((16, 16))
    targets, points = [], []
    for seed in range(300):
        obs, _ = env.reset(seed=seed)
        points.append(obs['vector'][:2])
        targets.append(obs['vector'][2:])
    assert 0.75 < np.abs(targets).max() <= 0.8
    assert np.abs(points).max() > 0.95


def test_reach_discrete_actions_are_stay_up_down_left_right():
    env = ReachDiscrete((16, 16))
    env.reset(seed=0)
    env._point = np.zeros(2)
    moves = []
    for action in range(5):
        before = env._point.copy()
        env.step(action)
        moves.append(np.round(env._point - before, 6).tolist())
    assert moves == [[0, 0], [0, 0.1], [0, -0.1], [-0.1, 0], [0.1, 0]]


def catch_at(paddle, ball):
    env = Catch((64, 64))
    env.reset(seed=0)
    env._paddle, env._ball = paddle, np.array(ball, float)
    return env


def test_catch_paddle_moves_left_stays_right_and_stops_at_the_walls():
    for action, expected in ((0, -0.1), (1, 0.0), (2, 0.1)):
        env = catch_at(0.0, (0.5, 1.0))
        env.step(action)
        assert env._paddle == pytest.approx(expected)
    env = catch_at(0.95, (0.5, 1.0))
    env.step(2)
    assert env._paddle == 1.0


def test_catch_ball_falls_by_the_speed_and_lands_with_a_bonus_or_a_penalty():
    env = catch_at(0.0, (0.3, 1.0))
    _, reward, *_ = env.step(1)
    assert env._ball[1] == pytest.approx(0.9) and reward == pytest.approx(1 - 0.3)  # no landing yet
    caught = catch_at(0.0, (0.1, -0.85))  # within the paddle's half width 0.15
    _, reward, *_ = caught.step(1)
    assert reward == pytest.approx(1 - 0.1 + 1)
    assert caught._ball[1] == 1.0 and -0.9 <= caught._ball[0] <= 0.9  # a new ball at the top
    missed = catch_at(0.0, (0.2, -0.85))
    _, reward, *_ = missed.step(1)
    assert reward == pytest.approx(1 - 0.2 - 1) and missed._ball[1] == 1.0


def test_catch_draws_the_paddle_also_at_the_left_wall():
    image = catch_at(-1.0, (0.5, 1.0))._draw()
    row = int(round((1 + 0.9) / 2 * 63))
    assert (image[row, 0] == 230).all() and (image[row, :4] == 230).all()
    assert (image[row, 6:] == 40).all()  # the background beyond the paddle's right end


def test_the_template_sets_its_own_flags_and_truncates_after_100_steps():
    env = CustomEnv('reach', seed=0)
    obs, _ = env.reset()
    assert obs['is_first'] and not obs['is_last'] and not obs['is_terminal']
    for t in range(1, EPISODE_LENGTH + 1):
        obs, _, terminated, truncated, _ = env.step(np.zeros(2, np.float32))
        assert not obs['is_first'] and obs['is_last'] == (t == EPISODE_LENGTH)
        assert not terminated and truncated == (t == EPISODE_LENGTH) and not obs['is_terminal']


def test_the_seed_picks_the_first_episode_and_later_resets_continue_its_draws():
    first = CustomEnv('reach', seed=3)
    episodes = [first.reset()[0]['vector'] for _ in range(3)]
    assert not np.array_equal(episodes[0], episodes[1]) and not np.array_equal(episodes[1], episodes[2])
    again = CustomEnv('reach', seed=3)
    np.testing.assert_array_equal([again.reset()[0]['vector'] for _ in range(3)], episodes)


@pytest.mark.parametrize('size', [(True, 64), (64, False), (64.0, 64), (-1, 64)])
def test_image_size_takes_positive_integers_only(size):
    with pytest.raises(envs.EnvCheckError, match=r"option size is .* must be two positive integers"):
        image_size(size)
    assert image_size((np.int64(32), 48)) == (32, 48)
