"""Small env wrappers, one job each.

Every wrapper works around both kinds of env the project meets: our suite protocol (`obs_space`,
`act_space`, dict observations) and a plain `gymnasium.Env` (`observation_space`, `action_space`, any
observation). A wrapper exposes both pairs of names, forwards every attribute it does not define to the
env inside, and returns gymnasium-style results: `reset() -> (obs, info)` and
`step(action) -> (obs, reward, terminated, truncated, info)`.

`Flags` is the last wrapper of every env built by `envs.make_env`; it owns the episode flags.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import gymnasium
import numpy as np

FLAG_KEYS = ('reward', 'is_first', 'is_last', 'is_terminal')


def get_obs_space(env: Any) -> Any:
    """The env's observation space: `obs_space` (our protocol) or `observation_space` (gymnasium)."""
    if hasattr(env, 'obs_space'):
        return env.obs_space
    return getattr(env, 'observation_space', None)


def get_act_space(env: Any) -> Any:
    """The env's action space: `act_space` (our protocol) or `action_space` (gymnasium)."""
    if hasattr(env, 'act_space'):
        return env.act_space
    return getattr(env, 'action_space', None)


def render_frame(env: Any, *args: Any, **kwargs: Any) -> Any:
    """Calls `env.render`, whatever its style; None when the env has no render().

    Handles gymnasium-style `render()` and old gym-style `render(mode=...)`: a method with a `mode`
    parameter gets `mode='rgb_array'` unless the caller chose a mode, and arguments that the method
    does not accept are dropped (so `render(mode='rgb_array')` works on a gymnasium env).
    """
    render = getattr(env, 'render', None)
    if render is None or not callable(render):
        return None
    try:
        signature = inspect.signature(render)
    except (TypeError, ValueError):  # builtins without a signature
        return render(*args, **kwargs)
    if 'mode' in signature.parameters and not args and 'mode' not in kwargs:
        kwargs = {**kwargs, 'mode': 'rgb_array'}
    elif (not args and 'mode' not in kwargs
          and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())):
        return _render_passing_through(render, kwargs)
    try:
        signature.bind(*args, **kwargs)
    except TypeError:
        return render()
    return render(*args, **kwargs)


def _render_passing_through(render: Any, kwargs: dict) -> Any:
    """A `render(self, *args, **kwargs)` that forwards to another env: as gymnasium's render() first;
    if that raises or gives no frame (an old gym env inside, whose default mode is 'human'), again
    with mode='rgb_array'. The first error is raised when both fail."""
    try:
        frame = render(**kwargs)
    except Exception as first:  # noqa: BLE001 -- retried with the old gym style below
        try:
            return render(**kwargs, mode='rgb_array')
        except Exception:  # noqa: BLE001
            raise first from None
    if frame is not None:
        return frame
    try:
        return render(**kwargs, mode='rgb_array')
    except Exception:  # noqa: BLE001 -- gave no frame either way
        return None


class Wrapper:
    """Base wrapper: forwards everything to `env`; exposes obs/act spaces under both names."""

    def __init__(self, env: Any):
        self._env = env

    def __getattr__(self, name: str) -> Any:
        if name.startswith('__') or name == '_env':  # keeps pickling and copying from recursing
            raise AttributeError(name)
        return getattr(self._env, name)

    @property
    def env(self) -> Any:
        return self._env

    @property
    def unwrapped(self) -> Any:
        return getattr(self._env, 'unwrapped', self._env)

    @property
    def obs_space(self) -> Any:
        return get_obs_space(self._env)

    @property
    def act_space(self) -> Any:
        return get_act_space(self._env)

    @property
    def observation_space(self) -> Any:
        return self.obs_space

    @property
    def action_space(self) -> Any:
        return self.act_space

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        return self._env.reset(**kwargs)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        return self._env.step(action)

    def render(self, *args: Any, **kwargs: Any) -> Any:
        return render_frame(self._env, *args, **kwargs)

    def close(self) -> None:
        close = getattr(self._env, 'close', None)
        if callable(close):
            close()


def _check_positive_int(wrapper: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"{wrapper}: '{name}' must be a positive integer, got {value!r}. Pass a whole number of "
            f"steps of at least 1 (for example {wrapper}(env, {name}=2)).")
    return int(value)


class ActionRepeat(Wrapper):
    """Repeats each action `repeat` times, summing the rewards; stops early when the episode ends."""

    def __init__(self, env: Any, repeat: int):
        super().__init__(env)
        self._repeat = _check_positive_int('ActionRepeat', 'repeat', repeat)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        total = 0.0
        for _ in range(self._repeat):
            obs, reward, terminated, truncated, info = self._env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, info


class TimeLimit(Wrapper):
    """Truncates episodes after `duration` steps: sets `truncated`, never `terminated`."""

    def __init__(self, env: Any, duration: int):
        super().__init__(env)
        self._duration = _check_positive_int('TimeLimit', 'duration', duration)
        self._step = 0

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        self._step = 0
        return self._env.reset(**kwargs)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self._env.step(action)
        self._step += 1
        if self._step >= self._duration and not terminated:
            truncated = True
        return obs, reward, terminated, truncated, info


class ClipReward(Wrapper):
    """Clips every reward into [min_reward, max_reward]."""

    def __init__(self, env: Any, min_reward: float, max_reward: float):
        super().__init__(env)
        if not (np.isfinite(min_reward) and np.isfinite(max_reward) and min_reward <= max_reward):
            raise ValueError(
                f"ClipReward: expected finite bounds with min_reward <= max_reward, got "
                f"min_reward={min_reward!r}, max_reward={max_reward!r}. Pass e.g. "
                "ClipReward(env, min_reward=-1, max_reward=1).")
        self._min = float(min_reward)
        self._max = float(max_reward)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self._env.step(action)
        return obs, float(np.clip(reward, self._min, self._max)), terminated, truncated, info


class NormalizeActions(Wrapper):
    """Lets the agent act in [-1, 1] on every Box dimension with finite bounds.

    The action is clipped to [-1, 1] and mapped linearly onto [low, high] of the env's Box; dimensions
    with an infinite bound pass through unchanged. Non-Box action spaces (Discrete) pass through, so
    the wrapper may be applied to any env.
    """

    def __init__(self, env: Any):
        super().__init__(env)
        space = get_act_space(env)
        self._box = isinstance(space, gymnasium.spaces.Box)
        if self._box:
            low = np.asarray(space.low, np.float64)
            high = np.asarray(space.high, np.float64)
            self._mask = np.isfinite(low) & np.isfinite(high)  # (A,)
            self._low = np.where(self._mask, low, -1.0)
            self._high = np.where(self._mask, high, 1.0)
            self._space = gymnasium.spaces.Box(
                np.where(self._mask, -1.0, low).astype(np.float32),
                np.where(self._mask, 1.0, high).astype(np.float32), dtype=np.float32)
            self._dtype = space.dtype

    @property
    def act_space(self) -> Any:
        return self._space if self._box else get_act_space(self._env)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        if self._box:
            action = np.asarray(action, np.float64).reshape(self._mask.shape)
            scaled = self._low + (np.clip(action, -1.0, 1.0) + 1.0) / 2.0 * (self._high - self._low)
            action = np.where(self._mask, scaled, action).astype(self._dtype)
        return self._env.step(action)


class OneHotAction(Wrapper):
    """Keeps a Discrete(n) action space but also accepts a one-hot (n,) vector (converted by argmax)."""

    def __init__(self, env: Any):
        super().__init__(env)
        space = get_act_space(env)
        if not isinstance(space, gymnasium.spaces.Discrete):
            raise ValueError(
                f"OneHotAction: expected an env with a Discrete action space, got {space!r}. Apply "
                "OneHotAction only to discrete-action envs (use NormalizeActions for Box spaces).")
        self._n = int(space.n)
        self._start = int(getattr(space, 'start', 0))

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        return self._env.step(self.to_index(action))

    def to_index(self, action: Any) -> int:
        """The env's integer action from a one-hot vector (n,) or an integer."""
        array = np.asarray(action)
        if array.ndim == 0 and np.issubdtype(array.dtype, np.integer):
            return int(array)
        if array.shape != (self._n,):
            raise ValueError(
                f"OneHotAction: expected a one-hot action of shape ({self._n},) or an integer, got "
                f"shape {array.shape}. The agent must send one vector of length n per env.")
        return int(np.argmax(array)) + self._start


class NormalizeObservation(Wrapper):
    """Standardises float vector observations with a running mean and variance (images untouched).

    Works on dict observations (every floating-point entry whose key is not a flag or `log_` key) and
    on plain array observations. The normalised entries' spaces become unbounded float32 Boxes.
    """

    def __init__(self, env: Any, epsilon: float = 1e-8):
        super().__init__(env)
        if not epsilon > 0:
            raise ValueError(f"NormalizeObservation: 'epsilon' must be > 0, got {epsilon!r}.")
        self._epsilon = float(epsilon)
        self._stats: dict[Any, list] = {}  # key -> [count, mean, sum of squared deviations]

    @staticmethod
    def _normalised(key: Any, space: Any) -> bool:
        is_box = isinstance(space, gymnasium.spaces.Box)
        is_model_input = key is None or (key not in FLAG_KEYS and not str(key).startswith('log_'))
        return is_box and is_model_input and np.issubdtype(space.dtype, np.floating)

    @property
    def obs_space(self) -> Any:
        space = get_obs_space(self._env)
        if isinstance(space, Mapping) or isinstance(space, gymnasium.spaces.Dict):
            return {k: self._unbounded(v) if self._normalised(k, v) else v for k, v in space.items()}
        return self._unbounded(space) if self._normalised(None, space) else space

    @staticmethod
    def _unbounded(space: gymnasium.spaces.Box) -> gymnasium.spaces.Box:
        return gymnasium.spaces.Box(-np.inf, np.inf, space.shape, np.float32)

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        obs, info = self._env.reset(**kwargs)
        return self._normalise(obs), info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self._env.step(action)
        return self._normalise(obs), reward, terminated, truncated, info

    def _normalise(self, obs: Any) -> Any:
        space = get_obs_space(self._env)
        if isinstance(obs, Mapping):
            return {k: self._update_and_scale(k, v) if self._normalised(k, space.get(k)) else v
                    for k, v in obs.items()}
        return self._update_and_scale(None, obs) if self._normalised(None, space) else obs

    def _update_and_scale(self, key: Any, value: Any) -> np.ndarray:
        value = np.asarray(value, np.float64)
        count, mean, m2 = self._stats.get(key, (0, np.zeros_like(value), np.zeros_like(value)))
        count += 1
        delta = value - mean
        mean = mean + delta / count
        m2 = m2 + delta * (value - mean)  # Welford's running sum of squared deviations
        self._stats[key] = [count, mean, m2]
        std = np.sqrt(m2 / count + self._epsilon)
        return ((value - mean) / std).astype(np.float32)


class Flags(Wrapper):
    """The last wrapper: every observation dict gets `reward`, `is_first`, `is_last`, `is_terminal`.

    The flags are set here from the call and the 5-tuple, whatever the env inside said about them:
    `is_first` on reset only, `is_last` when terminated or truncated, `is_terminal` when terminated.
    `obs_space` lists the model inputs only (no flags, no `log_` keys).
    """

    @property
    def obs_space(self) -> dict:
        space = get_obs_space(self._env)
        return {k: v for k, v in dict(space).items()
                if k not in FLAG_KEYS and not str(k).startswith('log_')}

    def reset(self, **kwargs: Any) -> tuple[dict, dict]:
        obs, info = self._env.reset(**kwargs)
        return self._with_flags(obs, 0.0, True, False, False, 'reset()'), info

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self._env.step(action)
        terminated, truncated = bool(terminated), bool(truncated)
        # A suite may mark a step terminal while the episode goes on (Atari `lives: discount`).
        terminal = terminated or bool(isinstance(info, Mapping) and info.get('is_terminal', False))
        obs = self._with_flags(obs, reward, False, terminated or truncated, terminal, 'step()')
        return obs, float(reward), terminated, truncated, info

    def _with_flags(self, obs: Any, reward: float, first: bool, last: bool, terminal: bool,
                    call: str) -> dict:
        if not isinstance(obs, Mapping):
            raise TypeError(
                f"{call} returned a {type(obs).__name__} observation; expected a dict of named arrays "
                "such as {'image': ...}. Wrap the array in a dict in the env's _format_obs.")
        obs = {k: np.asarray(v) for k, v in obs.items()}
        obs['reward'] = np.float32(reward)
        obs['is_first'] = first
        obs['is_last'] = last
        obs['is_terminal'] = terminal
        return obs
