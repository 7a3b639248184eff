"""Start-up check of an env against the env contract, with messages that diagnose.

`check_env(env, index)` does one reset and one step, then compares what came back with what the env
declares: the action space (Box or Discrete, finite bounds), the return shapes of reset() and step(),
and every observation key against `obs_space` (missing or extra key, shape, dtype, range, NaN/inf).
Each failure raises `EnvCheckError` naming the key, the expected and the actual value, and a likely fix.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping

import gymnasium
import numpy as np

from .wrappers import get_act_space, get_obs_space

FLAG_KEYS = ('reward', 'is_first', 'is_last', 'is_terminal')


class EnvCheckError(ValueError):
    """The env breaks the env contract, or the task / env options name something that does not exist;
    the message says where, what was expected and how to fix it (reported without a traceback)."""


class MissingDependency(ImportError):
    """A suite's optional package is not installed; the message names it and the install command
    (reported without a traceback)."""


def close_matches(name: str, known: Iterable[str], n: int = 3) -> str:
    """' Close matches: walker_walk, walker_run.' for a misspelt task or id among `known`, or ''."""
    close = difflib.get_close_matches(name, list(known), n=n, cutoff=0.5)
    return f" Close matches: {', '.join(close)}." if close else ''


def type_name(value: Any) -> str:
    """'gym.spaces.box.Box' style name, so that look-alike classes from other packages show."""
    return f"{type(value).__module__}.{type(value).__qualname__}"


def check_env(env: Any, index: int = 0) -> None:
    """Runs one reset and one step on `env` and raises EnvCheckError at the first contract breach."""
    where = f'env {index} ({type(env).__name__})'
    try:
        obs_space = _check_obs_space(get_obs_space(env), where)
    except EnvCheckError as error:
        if hasattr(env, 'obs_space') or not hasattr(env, 'observation_space'):
            raise
        raise EnvCheckError(
            f"{error} This looks like a plain gymnasium env (observation_space, no obs_space): register it "
            "with gymnasium.register and train it as --task gym_<its id> (the gym_ suite turns its "
            "observations into the dict the agent reads), or wrap it in a class with an obs_space "
            "property (README, 'Your own environment').") from None
    act_space = _check_act_space(get_act_space(env), where)
    obs = _check_reset_result(env.reset(), where)
    _check_observation(obs, obs_space, where, 'reset()')
    act_space.seed(index)
    obs = _check_step_result(env.step(act_space.sample()), where)
    _check_observation(obs, obs_space, where, 'step()')


def check_running_step(obs: Mapping, where: str) -> None:
    """The checks of an observation during a run that a start-up check cannot make once for all:
    every float model input and the reward finite. Raises EnvCheckError starting with `where` (e.g.
    'env 1 at step 3000') and naming the key (a NaN would otherwise surface as an index error deep
    in a loss)."""
    for key, value in obs.items():
        if str(key).startswith('log_') and not is_log_value(value):
            raise EnvCheckError(
                f"{where}: observation '{key}' is a logging key and must be a finite number, got {value!r}; "
                f"it is logged as the episode's largest value (episode/{str(key)[4:]}). Return a float, int or "
                f"bool there at every step. {RUN_STOPPED_CLEANLY}")
        if key == 'reward' or is_model_input(key):
            array = np.asarray(value)
            if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
                bad = 'NaN' if np.any(np.isnan(array)) else 'inf'
                count = int(np.sum(~np.isfinite(array)))
                what = ('returned a reward of' if key == 'reward' else
                        f"observation '{key}' contains {bad} at {count} of {array.size} entries:")
                raise EnvCheckError(
                    f"{where}: {what} {array.tolist() if array.size <= 8 else bad}; every float observation "
                    "(also one the model does not read: the replay stores it) and every reward must be finite. "
                    "Find where the env divides by zero or overflows, or replace the values (np.nan_to_num) "
                    f"in the env or a wrapper. {RUN_STOPPED_CLEANLY}")


RUN_STOPPED_CLEANLY = ("The run stopped before storing the step, and nothing on disk changed: once the env is "
                       "fixed, the same command resumes from the last checkpoint with its replay (or starts "
                       "afresh if none was saved yet).")


def is_log_value(value: Any) -> bool:
    """Whether a `log_` observation value is one number that can be logged: a finite real scalar."""
    if isinstance(value, (str, bytes)) or value is None or np.ndim(value) != 0:
        return False
    try:
        return bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


def is_model_input(key: str) -> bool:
    """Observation keys that must be declared in obs_space (not flags, not `log_` scalars)."""
    return key not in FLAG_KEYS and not str(key).startswith('log_')


def _check_obs_space(space: Any, where: str) -> dict:
    if isinstance(space, gymnasium.spaces.Dict):
        space = dict(space.spaces)
    if not isinstance(space, Mapping):
        raise EnvCheckError(
            f"{where}: obs_space must be a dict of gymnasium.spaces.Box, got {type(space).__name__} "
            f"({space!r}). Return e.g. {{'image': gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)}} "
            "from the obs_space property.")
    for key, box in space.items():
        if str(key).startswith('log_'):
            raise EnvCheckError(
                f"{where}: obs_space declares '{key}', but keys starting with 'log_' are logging-only "
                "scalars and must not be in obs_space. Remove it from obs_space (keep returning it "
                "in the observation if you want it logged).")
        if key in FLAG_KEYS:
            continue
        if not isinstance(box, gymnasium.spaces.Box):
            raise EnvCheckError(
                f"{where}: obs_space['{key}'] must be a gymnasium.spaces.Box, got {box!r} of type "
                f"{type_name(box)}. Describe each observation as a gymnasium.spaces.Box (import gymnasium, "
                "not the legacy gym package; a Discrete value can be sent as a one-hot float32 Box).")
    return {k: v for k, v in space.items() if is_model_input(k)}


def _check_act_space(space: Any, where: str) -> gymnasium.spaces.Space:
    if isinstance(space, gymnasium.spaces.Discrete):  # gymnasium itself ensures n >= 1
        return space
    if not isinstance(space, gymnasium.spaces.Space):
        raise EnvCheckError(
            f"{where}: act_space must be a gymnasium space, got {space!r} of type {type_name(space)}. Return "
            "e.g. gymnasium.spaces.Discrete(4) for 4 discrete actions or gymnasium.spaces.Box(-1, 1, (2,), "
            "np.float32) for 2 continuous ones from the act_space property.")
    if not isinstance(space, gymnasium.spaces.Box):
        raise EnvCheckError(
            f"{where}: unsupported action space {space!r} of type {type_name(space)}; expected "
            "gymnasium.spaces.Box (continuous) "
            "or gymnasium.spaces.Discrete (discrete). Flatten a MultiDiscrete or Tuple space into one "
            "Discrete, or describe continuous actions as a 1-D Box.")
    if len(space.shape) != 1:
        raise EnvCheckError(
            f"{where}: act_space Box must be 1-D, got shape {space.shape}. Flatten the action "
            f"into a vector of {int(np.prod(space.shape))} values and reshape it inside step().")
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise EnvCheckError(
            f"{where}: act_space Box needs finite bounds, got low={space.low}, high={space.high}. "
            "The agent acts in [-1, 1] mapped onto [low, high]; give every dimension finite bounds.")
    return space


def _check_reset_result(result: Any, where: str) -> Any:
    if not (isinstance(result, tuple) and len(result) == 2):
        got = f'a {len(result)}-tuple' if isinstance(result, tuple) else type(result).__name__
        raise EnvCheckError(
            f"{where}: reset() must return (obs, info), got {got}. Return the observation dict and "
            "an info dict: `return self._format_obs(obs), info` (gymnasium style).")
    return result[0]


def _check_step_result(result: Any, where: str) -> Any:
    if not (isinstance(result, tuple) and len(result) == 5):
        got = f'a {len(result)}-tuple' if isinstance(result, tuple) else type(result).__name__
        raise EnvCheckError(
            f"{where}: step() must return (obs, reward, terminated, truncated, info), got {got}. "
            "An old gym-style (obs, reward, done, info) becomes (obs, reward, done, False, info).")
    obs, reward, terminated, truncated, _ = result
    try:
        finite = np.ndim(reward) == 0 and bool(np.isfinite(float(reward)))
    except (TypeError, ValueError):
        finite = False
    if not finite:
        raise EnvCheckError(
            f"{where}: step() reward must be a finite scalar, got {reward!r}. Return a float.")
    for name, flag in (('terminated', terminated), ('truncated', truncated)):
        if flag is None or np.ndim(flag) != 0:  # None would pass for False unnoticed
            raise EnvCheckError(
                f"{where}: step() '{name}' must be a bool, got {flag!r}. Return a single bool.")
    return obs


def _check_observation(obs: Any, space: dict, where: str, call: str) -> None:
    if not isinstance(obs, Mapping):
        raise EnvCheckError(
            f"{where}: {call} returned a {type(obs).__name__} observation; expected a dict with the "
            f"keys {sorted(space)}. Wrap the array in a dict, e.g. {{'image': obs}}, in _format_obs.")
    missing = [k for k in space if k not in obs]
    if missing:
        raise EnvCheckError(
            f"{where}: {call} observation is missing key(s) {missing} that obs_space declares; got "
            f"keys {sorted(obs)}. Return every obs_space key in each observation or remove it from "
            "obs_space.")
    extra = [k for k in obs if is_model_input(k) and k not in space]
    if extra:
        raise EnvCheckError(
            f"{where}: {call} observation has key(s) {extra} that obs_space does not declare "
            f"(obs_space keys: {sorted(space)}). Add them to obs_space, or name logging-only values "
            "'log_<name>'.")
    for key, box in space.items():
        _check_value(key, obs[key], box, where, call)
    for key in obs:
        if str(key).startswith('log_') and not is_log_value(obs[key]):
            raise EnvCheckError(
                f"{where}: {call} observation '{key}' is a logging key and must be a finite scalar, "
                f"got {obs[key]!r}.")


def _check_value(key: str, value: Any, box: gymnasium.spaces.Box, where: str, call: str) -> None:
    name = f"{where}: {call} observation '{key}'"
    if not isinstance(value, (np.ndarray, np.generic)):
        raise EnvCheckError(
            f"{name}: expected a numpy array, got {type(value).__name__}. Convert it with "
            f"np.asarray(value, dtype=np.{box.dtype}).")
    if value.shape != box.shape:
        hint = (' A grayscale image needs a channel axis: img[..., None].repeat(3, -1).'
                if len(box.shape) == 3 and value.ndim == 2 else '')
        raise EnvCheckError(
            f"{name}: expected shape {box.shape}, got {value.shape}. Make the observation match "
            f"obs_space['{key}'] or fix obs_space.{hint}")
    if value.dtype != box.dtype:
        image = len(box.shape) == 3 and box.dtype == np.uint8
        fix = (f"Convert it in _format_obs with .astype(np.uint8) (scale [0, 1] floats by 255 first): "
               "images are used, and stored, as uint8 (a float image in obs_space is not an image to the "
               "model and would take 4x the replay memory)." if image else
               f"Convert it in _format_obs with .astype(np.{box.dtype}) or declare dtype=np.{value.dtype} "
               f"in obs_space['{key}'].")
        raise EnvCheckError(f"{name}: expected dtype {box.dtype}, got {value.dtype}. {fix}")
    if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
        bad = 'NaN' if np.any(np.isnan(value)) else 'inf'
        raise EnvCheckError(
            f"{name}: contains {bad} at {int(np.sum(~np.isfinite(value)))} of {value.size} entries; "
            "expected finite values. Find where the env divides by zero or overflows, or replace "
            "them with np.nan_to_num.")
    low, high = np.broadcast_to(box.low, box.shape), np.broadcast_to(box.high, box.shape)
    outside = (value < low) | (value > high)
    if np.any(outside):
        raise EnvCheckError(
            f"{name}: values outside obs_space bounds: expected [{np.min(low)}, {np.max(high)}], got "
            f"min {np.min(value)}, max {np.max(value)} ({int(np.sum(outside))} of {value.size} "
            "entries outside). Clip the observation or widen the Box bounds.")
