"""A working custom env in the shape of the guide's template, on small built-in tasks in pure numpy.

Copy this file's `CustomEnv` as the starting point for your own env: replace `make_task` with your
environment and keep the rest. Tasks (`--task custom_<name>`), each 100 env steps long (the end is
reported as `truncated`, never `terminated`), observations `image` (64x64x3 uint8 by default;
`--env.custom.size 128,128` for other sizes) and `vector` (float32 state):

- `reach`: continuous, Box(2): move a red point toward a green target in the square [-1, 1]^2 by up
  to 0.1 per step and axis. Reward per step `1 - distance`. Uniform random actions score -4 per
  episode (std 39; 100 episodes through make_env with action_repeat 2; -3 with action_repeat 1);
  heading straight for the target scores about 95.
- `reach_discrete`: the same with Discrete(5) actions (stay, up, down, left, right; 0.1 per step).
  Random policy: -2 per episode (std 37; same measure; +3 with action_repeat 1).
- `catch`: Discrete(3) (left, stay, right): a paddle at the bottom follows falling balls (a new ball
  at the top when one lands). Reward per step `1 - |ball x - paddle x|`, plus 1 for each catch and
  -1 for each miss. Random policy: 31 per episode (std 20; same measure; 34 with action_repeat 1);
  following the ball scores about 92.
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from . import wrappers
from .checker import EnvCheckError

EPISODE_LENGTH = 100  # env steps per episode, for every task
DEFAULT_SIZE = (64, 64)  # image height, width (config env.custom.size changes it; the defaults set none)
SPEED = 0.1  # distance moved per env step


def draw_disk(image: np.ndarray, grid: tuple[np.ndarray, np.ndarray], center: np.ndarray,
              radius: float, color: tuple[int, int, int]) -> None:
    """Paints a disk into `image` (H, W, 3) at `center` in [-1, 1]^2 (x right, y up), radius in pixels."""
    height, width = image.shape[:2]
    col = (center[0] + 1) / 2 * (width - 1)
    row = (1 - center[1]) / 2 * (height - 1)
    rows, cols = grid
    image[(rows - row) ** 2 + (cols - col) ** 2 <= radius ** 2] = color


class PointTask(gym.Env):
    """Base of the built-in tasks: a gymnasium.Env with a dict observation {image, vector}."""

    metadata = {'render_modes': ['rgb_array']}

    def __init__(self, size: tuple[int, int], vector_size: int):
        self.render_mode = 'rgb_array'
        self._size = (int(size[0]), int(size[1]))
        self._grid = np.mgrid[0:self._size[0], 0:self._size[1]]  # (2, H, W): rows, cols
        self.observation_space = gym.spaces.Dict({
            'image': gym.spaces.Box(0, 255, self._size + (3,), np.uint8),
            'vector': gym.spaces.Box(-1, 1, (vector_size,), np.float32),
        })
        self._step = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self._step = 0
        self._reset_state()
        return self._observation(), {}

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        reward = self._advance(action)
        self._step += 1
        truncated = self._step >= EPISODE_LENGTH
        return self._observation(), float(reward), False, truncated, {}

    def render(self) -> np.ndarray:
        return self._draw()

    def _observation(self) -> dict:
        return {'image': self._draw(), 'vector': self._state_vector()}

    def _reset_state(self) -> None:
        raise NotImplementedError

    def _advance(self, action: Any) -> float:
        raise NotImplementedError

    def _state_vector(self) -> np.ndarray:
        raise NotImplementedError

    def _draw(self) -> np.ndarray:
        raise NotImplementedError


class Reach(PointTask):
    """Move the point to the target; continuous displacement actions in [-SPEED, SPEED]^2."""

    def __init__(self, size: tuple[int, int]):
        super().__init__(size, vector_size=4)
        self.action_space = self._make_action_space()
        self._point = np.zeros(2)
        self._target = np.zeros(2)

    def _make_action_space(self) -> gym.spaces.Space:
        return gym.spaces.Box(-SPEED, SPEED, (2,), np.float32)

    def _displacement(self, action: Any) -> np.ndarray:
        return np.clip(np.asarray(action, np.float64), -SPEED, SPEED)

    def _reset_state(self) -> None:
        self._point = self.np_random.uniform(-1, 1, 2)
        self._target = self.np_random.uniform(-0.8, 0.8, 2)

    def _advance(self, action: Any) -> float:
        self._point = np.clip(self._point + self._displacement(action), -1, 1)
        return 1.0 - float(np.linalg.norm(self._point - self._target))

    def _state_vector(self) -> np.ndarray:
        return np.concatenate([self._point, self._target]).astype(np.float32)  # (4,)

    def _draw(self) -> np.ndarray:
        image = np.full(self._size + (3,), 40, np.uint8)  # (H, W, 3)
        draw_disk(image, self._grid, self._target, 0.08 * self._size[0], (60, 200, 60))
        draw_disk(image, self._grid, self._point, 0.05 * self._size[0], (230, 60, 60))
        return image


class ReachDiscrete(Reach):
    """Reach with Discrete(5) actions: stay, up, down, left, right."""

    MOVES = SPEED * np.array([[0, 0], [0, 1], [0, -1], [-1, 0], [1, 0]], np.float64)  # (5, 2)

    def _make_action_space(self) -> gym.spaces.Space:
        return gym.spaces.Discrete(len(self.MOVES))

    def _displacement(self, action: Any) -> np.ndarray:
        return self.MOVES[int(action)]


class Catch(PointTask):
    """A paddle at the bottom follows falling balls; Discrete(3) actions: left, stay, right."""

    PADDLE_Y = -0.9
    PADDLE_HALF_WIDTH = 0.15

    def __init__(self, size: tuple[int, int]):
        super().__init__(size, vector_size=3)
        self.action_space = gym.spaces.Discrete(3)
        self._paddle = 0.0
        self._ball = np.zeros(2)

    def _reset_state(self) -> None:
        self._paddle = float(self.np_random.uniform(-0.8, 0.8))
        self._drop_ball()

    def _drop_ball(self) -> None:
        self._ball = np.array([self.np_random.uniform(-0.9, 0.9), 1.0])

    def _advance(self, action: Any) -> float:
        self._paddle = float(np.clip(self._paddle + SPEED * (int(action) - 1), -1, 1))
        self._ball[1] -= SPEED
        reward = 1.0 - abs(self._ball[0] - self._paddle)
        if self._ball[1] <= self.PADDLE_Y:
            caught = abs(self._ball[0] - self._paddle) <= self.PADDLE_HALF_WIDTH
            reward += 1.0 if caught else -1.0
            self._drop_ball()
        return reward

    def _state_vector(self) -> np.ndarray:
        return np.array([self._paddle, *self._ball], np.float32)  # (3,)

    def _draw(self) -> np.ndarray:
        image = np.full(self._size + (3,), 40, np.uint8)  # (H, W, 3)
        height, width = self._size
        row = int(round((1 - self.PADDLE_Y) / 2 * (height - 1)))
        left = int(round((self._paddle - self.PADDLE_HALF_WIDTH + 1) / 2 * (width - 1)))
        right = int(round((self._paddle + self.PADDLE_HALF_WIDTH + 1) / 2 * (width - 1)))
        image[row:row + 2, max(left, 0):right + 1] = (230, 230, 230)
        draw_disk(image, self._grid, self._ball, 0.05 * height, (230, 60, 60))
        return image


TASKS = {'reach': Reach, 'reach_discrete': ReachDiscrete, 'catch': Catch}


def make_task(name: str, size: tuple[int, int]) -> gym.Env:
    """The built-in task `name`; an unknown name gets one paragraph listing the tasks."""
    if name not in TASKS:
        listed = ', '.join(f'custom_{task}' for task in TASKS)
        if name == 'task_name':
            what = ("'custom_task_name' is the guide's placeholder for your task's name: replace it with "
                    f"one of the example env's tasks, {listed} (e.g. --task custom_reach)")
        else:
            what = (f"Unknown custom task 'custom_{name}'. The example env in envs/custom_env.py offers "
                    f"{listed} (e.g. --task custom_reach): use one of these")
        raise EnvCheckError(
            f"{what}, or put your own environment into envs/custom_env.py (class CustomEnv, following "
            "the guide's template) and give its task name after the 'custom_' prefix.")
    return TASKS[name](size)


def image_size(size: Any) -> tuple[int, int]:
    """The option `size` as (height, width); anything but two positive integers is an EnvCheckError."""
    ok = isinstance(size, (list, tuple)) and len(size) == 2 and all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size)
    if not ok:
        raise EnvCheckError(
            f"CustomEnv option size is {size!r}, but it must be two positive integers (height, width) "
            "of the image, e.g. --env.custom.size 64,64 (the default).")
    return int(size[0]), int(size[1])


class CustomEnv:
    """The guide's template, filled in: a built-in task behind wrappers.NormalizeActions."""

    def __init__(self, name: str, seed: int = 0, size: tuple[int, int] = DEFAULT_SIZE, **kwargs: Any):
        if kwargs:
            raise EnvCheckError(
                f"CustomEnv got unknown option(s) {sorted(kwargs)}; it accepts 'size' (config "
                "env.custom, e.g. --env.custom.size 64,64) and 'seed'. Remove the others: drop their "
                "--env.custom.<key> options, or their entries under env: {custom: ...} in configs.yaml.")
        self._size = image_size(size)
        self._env = make_task(name, self._size)
        self._env = wrappers.NormalizeActions(self._env)
        self._seed = seed  # used by the first reset only; later resets continue the env's RNG

    @property
    def obs_space(self) -> dict[str, gym.spaces.Box]:
        spaces = {
            'image': gym.spaces.Box(0, 255, self._size + (3,), dtype=np.uint8),
            'vector': self._env.observation_space['vector'],
        }
        return spaces

    @property
    def act_space(self) -> gym.spaces.Space:
        return self._env.action_space

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        obs, reward, done, truncated, info = self._env.step(action)
        return self._format_obs(obs, is_last=done or truncated, is_terminal=done), reward, done, \
            truncated, info

    def reset(self) -> tuple[dict, dict]:
        obs, info = self._env.reset(seed=self._seed)
        self._seed = None
        return self._format_obs(obs, is_first=True), info

    def _format_obs(self, obs: dict, is_first: bool = False, is_last: bool = False,
                    is_terminal: bool = False) -> dict:
        return {'image': obs['image'], 'vector': obs['vector'], 'is_first': is_first,
                'is_last': is_last, 'is_terminal': is_terminal}

    def render(self) -> np.ndarray:
        return self._env.render()  # (H, W, 3) uint8

    def close(self) -> None:
        self._env.close()
