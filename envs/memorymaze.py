"""Memory Maze (`memorymaze_9x9`, `_11x11`, `_13x13`, `_15x15`) through its dm_env API.

Image-only observations (the target colour is drawn as the image border), Discrete(6) actions.
The maze's own time limit (1000 / 2000 / 3000 / 4000 env steps at 4 Hz) ends episodes as `truncated`;
there are no terminal states. Action repeat is applied by the generic ActionRepeat wrapper.
`import memory_maze` needs gym==0.26.2 (it registers gym envs); its gym wrapper is not used because
gym 0.26's checker fails under NumPy 2.
"""
from __future__ import annotations

import gymnasium
import numpy as np

from .checker import EnvCheckError, MissingDependency
from .dmc import select_mujoco_gl

SIZES = ('9x9', '11x11', '13x13', '15x15')
INSTALL = 'pip install memory-maze gym==0.26.2'


def import_memory_maze_tasks():
    """memory_maze.tasks, or an ImportError that says what to install."""
    select_mujoco_gl()  # before memory_maze imports dm_control (it would force egl otherwise)
    try:
        from memory_maze import tasks
    except ImportError as error:
        raise MissingDependency(f'Memory Maze tasks need the memory-maze package and gym 0.26.2 ({error}). '
                          f'Install them with `{INSTALL}`.') from error
    return tasks


class MemoryMaze:
    """One Memory Maze size, e.g. MemoryMaze('9x9', size=(64, 64), seed=0)."""

    def __init__(self, name: str, size: tuple[int, int] = (64, 64), seed: int = 0):
        if name not in SIZES:
            raise EnvCheckError(f"Unknown Memory Maze task 'memorymaze_{name}': expected one of "
                             f"{', '.join('memorymaze_' + s for s in SIZES)}, got {name!r}.")
        if int(size[0]) != int(size[1]):
            raise EnvCheckError(f'Memory Maze renders square images; env.memorymaze.size must be [N, N], '
                             f'got {list(size)}. Use [64, 64] as in the paper.')
        tasks = import_memory_maze_tasks()
        make_task = getattr(tasks, 'memory_maze_' + name)
        self._size = (int(size[0]), int(size[1]))  # (H, W)
        self._env = make_task(seed=seed, image_only_obs=True, camera_resolution=self._size[0])
        self._num_actions = int(self._env.action_spec().num_values)
        self._last_image = np.zeros(self._size + (3,), np.uint8)

    @property
    def obs_space(self) -> dict[str, gymnasium.spaces.Box]:
        return {'image': gymnasium.spaces.Box(0, 255, self._size + (3,), np.uint8)}

    @property
    def act_space(self) -> gymnasium.spaces.Discrete:
        return gymnasium.spaces.Discrete(self._num_actions)

    def reset(self, seed: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
        del seed  # each reset draws a new maze from the env's seeded random state
        time_step = self._env.reset()
        return self._observation(time_step), {}

    def step(self, action) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        index = int(np.asarray(action).reshape(-1)[0]) if np.ndim(action) else int(action)
        time_step = self._env.step(index)
        terminated = bool(time_step.last() and time_step.discount == 0.0)
        truncated = bool(time_step.last() and not terminated)
        return self._observation(time_step), float(time_step.reward or 0.0), terminated, truncated, {}

    def render(self, mode: str = 'rgb_array') -> np.ndarray:
        """The last observed first-person frame (H, W, 3) uint8."""
        del mode
        return self._last_image

    def close(self) -> None:
        self._env.close()

    def _observation(self, time_step) -> dict[str, np.ndarray]:
        self._last_image = np.asarray(time_step.observation, np.uint8)  # (H, W, 3)
        return {'image': self._last_image}
