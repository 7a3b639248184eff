"""Memory Maze: a real 9x9 maze (when memory-maze is installed), names, and the install message."""
import sys

import numpy as np
import pytest

from envs.memorymaze import MemoryMaze

def memory_maze_installed() -> bool:
    try:
        import memory_maze  # noqa: F401
    except ImportError:
        return False
    return True


installed = pytest.mark.skipif(not memory_maze_installed(),
                               reason='needs `pip install memory-maze gym==0.26.2`')


@pytest.fixture(scope='module')
def maze():
    env = MemoryMaze('9x9', size=(64, 64), seed=0)
    yield env
    env.close()


@installed
def test_spaces_and_real_steps(maze):
    assert maze.obs_space['image'].shape == (64, 64, 3) and maze.obs_space['image'].dtype == np.uint8
    assert maze.act_space.n == 6
    obs, _ = maze.reset()
    assert obs['image'].shape == (64, 64, 3) and obs['image'].dtype == np.uint8
    assert obs['image'].std() > 5.0, 'first-person frame is blank'
    images = [obs['image']]
    for action in [1, 1, 2, 3, 0, np.int64(4)]:
        obs, reward, terminated, truncated, _ = maze.step(action)
        assert isinstance(reward, float) and reward in (0.0, 1.0)
        assert terminated is False and truncated is False
        images.append(obs['image'])
    assert any(np.any(a != b) for a, b in zip(images, images[1:])), 'the view never changed'
    np.testing.assert_array_equal(maze.render(), obs['image'])


@installed
@pytest.mark.slow
def test_time_limit_is_truncation(maze):
    maze.reset()
    for step in range(1, 1001):
        _, _, terminated, truncated, _ = maze.step(0)
        assert terminated is False
        if truncated:
            break
    assert step == 1000 and truncated is True  # 250 s at 4 Hz


def test_unknown_size():
    with pytest.raises(ValueError, match=r"Unknown Memory Maze task 'memorymaze_7x7'.*memorymaze_9x9"):
        MemoryMaze('7x7')


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'memory_maze', None)  # makes `import memory_maze` fail
    with pytest.raises(ImportError, match=r'pip install memory-maze gym==0\.26\.2'):
        MemoryMaze('9x9')


def test_a_non_square_size_is_refused_before_the_package_is_needed():
    with pytest.raises(ValueError, match=r'square images; env.memorymaze.size must be \[N, N\], got \[64, 48\]'):
        MemoryMaze('9x9', size=(64, 48))


def test_the_headless_backend_is_chosen_before_memory_maze_imports(monkeypatch):
    import envs.memorymaze as memorymaze
    calls = []
    monkeypatch.setattr(memorymaze, 'select_mujoco_gl', lambda: calls.append('gl'))
    monkeypatch.setitem(sys.modules, 'memory_maze', None)
    with pytest.raises(ImportError):
        memorymaze.import_memory_maze_tasks()
    assert calls == ['gl']


@installed
def test_size_and_seed_reach_the_maze():
    def first_frame(seed, size=(64, 64)):
        env = MemoryMaze('9x9', size=size, seed=seed)
        try:
            return env.reset()[0]['image']
        finally:
            env.close()
    assert first_frame(0, size=(32, 32)).shape == (32, 32, 3)
    np.testing.assert_array_equal(first_frame(5), first_frame(5))
    assert np.any(first_frame(5) != first_frame(6))


@installed
def test_an_action_as_a_one_element_array_is_that_index():
    frames = []
    for action in (2, np.array([2])):
        env = MemoryMaze('9x9', seed=1)
        env.reset()
        frames.append([env.step(action)[0]['image'] for _ in range(3)])
        env.close()
    np.testing.assert_array_equal(frames[0], frames[1])


@installed
def test_time_steps_map_to_terminated_truncated_and_rewards(maze):
    """dm_env's termination (discount 0) is terminated, its truncation (a last step with discount 1)
    truncated, and a target reached gives its reward of 1."""
    import dm_env
    maze.reset()
    image = maze.step(0)[0]['image']
    for make, expected in [(lambda: dm_env.transition(1.0, image), (1.0, False, False)),
                           (lambda: dm_env.termination(0.0, image), (0.0, True, False)),
                           (lambda: dm_env.truncation(0.0, image), (0.0, False, True))]:
        maze._env.step = lambda action, make=make: make()
        _, reward, terminated, truncated, _ = maze.step(0)
        assert (reward, terminated, truncated) == expected
    del maze._env.step  # the maze's own step again, for the other tests of this module
    assert maze.step(0)[0]['image'].shape == (64, 64, 3)


@installed
def test_close_closes_the_maze():
    env = MemoryMaze('9x9', seed=0)
    closed = []
    real_close = env._env.close
    env._env.close = lambda: closed.append(True) or real_close()
    env.close()
    assert closed == [True]
