"""A gymnasium env for the multi-process tests: `faulty_env:Faulty-v0` raises at step 15 when it was
seeded with an odd seed (env 0 of rank 1 with one env per rank), and otherwise behaves like a tiny
continuous control task."""
import gymnasium
import numpy as np


class Faulty(gymnasium.Env):
    observation_space = gymnasium.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self):
        self._odd = False
        self._t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self._odd = seed % 2 == 1
        self._t = 0
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self._t += 1
        if self._odd and self._t >= 15:
            raise RuntimeError("deliberate failure inside the env of rank 1")
        obs = np.full(3, self._t / 100.0, np.float32)
        return obs, float(-abs(action[0])), False, self._t >= 40, {}


gymnasium.register(id="Faulty-v0", entry_point=Faulty)


class SpoilsLater(gymnasium.Env):
    """Behaves until its `spoil_at`-th step in total (over episodes), then returns observations
    that break the contract: NaN entries (`NanLater-v0`) or one more entry (`GrowsLater-v0`)."""
    observation_space = gymnasium.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, spoil: str = "nan", spoil_at: int = 260):
        self._spoil, self._spoil_at = spoil, spoil_at
        self._t = self._total = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self._t += 1
        self._total += 1
        obs = np.full(3, self._t / 100.0, np.float32)
        if self._total >= self._spoil_at:
            obs = np.full(3, np.nan, np.float32) if self._spoil == "nan" else np.zeros(4, np.float32)
        return obs, float(-abs(action[0])), False, self._t >= 40, {}


gymnasium.register(id="NanLater-v0", entry_point=SpoilsLater, kwargs={"spoil": "nan"})
gymnasium.register(id="GrowsLater-v0", entry_point=SpoilsLater, kwargs={"spoil": "grow"})
