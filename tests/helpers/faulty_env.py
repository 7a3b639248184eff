"""A gymnasium env for the multi-process tests: `faulty_env:Faulty-v0` raises at step 15 when it was
seeded with an odd seed (env 0 of rank 1 with one env per rank), and otherwise behaves like a tiny
continuous control task."""
import gymnasium
import numpy as np


class TinyTask(gymnasium.Env):
    """40-step episodes of a 3-d vector that grows by 0.01 per step, reward -|action|; the envs below
    change one thing about it."""
    observation_space = gymnasium.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)
    _t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self._t += 1
        return np.full(3, self._t / 100.0, np.float32), float(-abs(action[0])), False, self._t >= 40, {}


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


class OddFrames(TinyTask):
    """A TinyTask whose render() gives frames that are not (H, W, 3) uint8: RGBA (`RgbaFrames-v0`),
    five channels of float64 (`NoFrames-v0`), or a frame that grows by one pixel per step
    (`GrowingFrames-v0`)."""
    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, frames: str = "rgba", render_mode=None):
        self._frames, self.render_mode = frames, render_mode

    def render(self):
        if self._frames == "rgba":
            return np.full((16, 16, 4), 200, np.uint8)
        if self._frames == "growing":
            return np.zeros((16 + self._t, 16 + self._t, 3), np.uint8)
        return np.zeros((16, 16, 5))


for _name, _id in (("rgba", "RgbaFrames-v0"), ("growing", "GrowingFrames-v0"), ("none", "NoFrames-v0")):
    gymnasium.register(id=_id, entry_point=OddFrames, kwargs={"frames": _name})


class CrashesFromStep(TinyTask):
    """A TinyTask until the `crash_from`-th step made in this process (over episodes and restarts),
    then it raises on every step: an env that broke for good (`CrashesLater-v0`; run it with
    envs.parallel none, so that a restarted copy keeps the count)."""
    steps_in_process = 0

    def __init__(self, crash_from: int = 250):
        self._crash_from = crash_from

    def step(self, action):
        CrashesFromStep.steps_in_process += 1
        if CrashesFromStep.steps_in_process >= self._crash_from:
            raise RuntimeError("the simulator lost its licence server")
        return super().step(action)


gymnasium.register(id="CrashesLater-v0", entry_point=CrashesFromStep)


class BuildsOnce(TinyTask):
    """A TinyTask whose constructor works `builds` times in this process, then raises: the train
    env starts, and the first evaluation's env fails to start (`BuildsOnce-v0`, envs.parallel none);
    with `builds` 0 no env starts (`NeverBuilds-v0`)."""
    built = 0

    def __init__(self, builds: int = 1):
        BuildsOnce.built += 1
        if BuildsOnce.built > builds:
            raise OSError("the simulator's display is gone")


gymnasium.register(id="BuildsOnce-v0", entry_point=BuildsOnce)
gymnasium.register(id="NeverBuilds-v0", entry_point=BuildsOnce, kwargs={"builds": 0})


class NeverEndsInEval(TinyTask):
    """20-step training episodes; episodes of an env seeded as an eval env (seed 10000 and up,
    envs.env_seed) never end: a stand-in for an eval policy that never reaches the end
    (`NeverEndsInEval-v0`); with `eval_length`, they end after that many steps (`EndsAt1000InEval-v0`)."""
    _eval = False

    def __init__(self, eval_length: int = 0):
        self._eval_length = eval_length

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self._eval = seed >= 10000
        return super().reset(seed=seed, options=options)

    def step(self, action):
        self._t += 1
        ends = self._t >= self._eval_length > 0 if self._eval else self._t >= 20
        return np.full(3, 0.0, np.float32), 0.0, False, ends, {}


gymnasium.register(id="NeverEndsInEval-v0", entry_point=NeverEndsInEval)
gymnasium.register(id="EndsAt1000InEval-v0", entry_point=NeverEndsInEval, kwargs={"eval_length": 1000})


class ShrinkingEpisodes(TinyTask):
    """Training episodes of 60 agent steps, then of 20 (`ShrinkingEpisodes-v0`): the longest one is
    not the last one, and the episodes of one log interval differ in length. (The start-up check's
    reset and steps do not count: the first episode to reach 60 steps is the long one.)"""
    _long_done = False

    def step(self, action):
        self._t += 1
        ends = self._t >= (20 if self._long_done else 60)
        self._long_done = self._long_done or ends
        return np.full(3, 0.0, np.float32), 0.0, False, ends, {}


gymnasium.register(id="ShrinkingEpisodes-v0", entry_point=ShrinkingEpisodes)
