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
