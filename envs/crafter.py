"""Crafter (`crafter_reward`, `crafter_noreward`): 64x64 images, 17 discrete actions.

Every observation carries `log_achievement_<name>` for all 22 achievements: how many times the
achievement was unlocked so far in the episode (from info['achievements']); the loop aggregates
them per episode for the success rates that `crafter_score` turns into the paper's score.
Death is `terminated`; the 10000-step length limit is `truncated`.
"""
from __future__ import annotations

import math
import sys
from types import ModuleType

import gymnasium
import numpy as np
from .checker import EnvCheckError, MissingDependency

TASKS = {'reward': True, 'noreward': False}  # task name -> whether the env gives rewards
LOG_PREFIX = 'log_achievement_'


def crafter_score(success_rates_percent: dict[str, float]) -> float:
    """Crafter paper score: exp(mean_i ln(1 + s_i)) - 1, with s_i the success rates in percent.

    A geometric mean offset by 1, so every achievement counts and 0 % rates are allowed.
    """
    if not success_rates_percent:
        raise ValueError('crafter_score needs at least one achievement success rate; got an empty dict.')
    rates = np.asarray(list(success_rates_percent.values()), np.float64)
    if np.any(rates < 0) or np.any(rates > 100):
        raise ValueError('crafter_score expects success rates in percent (0..100); '
                         f'got {success_rates_percent}.')
    return float(math.exp(np.mean(np.log1p(rates))) - 1.0)


def import_crafter() -> ModuleType:
    """The crafter package, imported without the legacy `gym` package it optionally takes its space
    classes from (gym 0.26 prints a deprecation banner on import, on every run); crafter then uses
    its own plain space types, and this wrapper builds gymnasium spaces itself. sys.modules is
    restored at once, so other code can still import gym."""
    if 'crafter' in sys.modules:
        return sys.modules['crafter']
    hide_gym = 'gym' not in sys.modules
    if hide_gym:
        sys.modules['gym'] = None  # `import gym` raises ImportError inside crafter's optional import
    try:
        import crafter
    finally:
        if hide_gym:
            del sys.modules['gym']
    return crafter


def achievement_logs(achievements: dict[str, int], names: list[str]) -> dict[str, np.int64]:
    """{'log_achievement_<name>': count so far} for every achievement name (0 when absent)."""
    return {LOG_PREFIX + name: np.int64(achievements.get(name, 0)) for name in names}


class Crafter:
    """The Crafter benchmark, e.g. Crafter('reward', size=(64, 64), seed=0)."""

    def __init__(self, name: str, size: tuple[int, int] = (64, 64), seed: int = 0):
        if name not in TASKS:
            raise EnvCheckError(f"Unknown Crafter task 'crafter_{name}': expected crafter_reward or "
                             f"crafter_noreward, got {name!r}.")
        try:
            crafter = import_crafter()
        except ImportError as error:
            raise MissingDependency("Crafter tasks need the crafter package. Install it with "
                              "`pip install crafter opensimplex==0.3`.") from error
        self._size = (int(size[0]), int(size[1]))  # (H, W)
        width_height = (self._size[1], self._size[0])  # crafter's size is (W, H): its frames are (H, W, 3)
        self._env = crafter.Env(area=(64, 64), size=width_height, reward=TASKS[name], seed=seed)
        self._achievements = list(crafter.constants.achievements)  # 22 names

    @property
    def achievements(self) -> list[str]:
        return list(self._achievements)

    @property
    def obs_space(self) -> dict[str, gymnasium.spaces.Box]:
        return {'image': gymnasium.spaces.Box(0, 255, self._size + (3,), np.uint8)}

    @property
    def act_space(self) -> gymnasium.spaces.Discrete:
        return gymnasium.spaces.Discrete(self._env.action_space.n)

    def reset(self, seed: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
        del seed  # crafter reseeds every episode from its constructor seed and episode count
        image = self._env.reset()
        return self._observation(image, {}), {}

    def step(self, action) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        index = int(np.asarray(action).reshape(-1)[0]) if np.ndim(action) else int(action)
        image, reward, done, info = self._env.step(index)
        terminated = bool(done and info['discount'] == 0.0)
        truncated = bool(done and not terminated)
        return self._observation(image, info['achievements']), float(reward), terminated, truncated, {}

    def render(self, mode: str = 'rgb_array') -> np.ndarray:
        del mode
        return self._env.render()  # (H, W, 3) uint8

    def close(self) -> None:
        pass

    def _observation(self, image: np.ndarray, achievements: dict[str, int]) -> dict[str, np.ndarray]:
        logs = achievement_logs(achievements, self._achievements)
        return {'image': np.asarray(image, np.uint8), **logs}
