"""Environments: the suite registry, task parsing and the one wrap function every suite goes through.

A task `<suite>_<name>` (dmc_walker_walk, atari_pong, custom_reach, gym_CartPole-v1) is split at the
first underscore; `REGISTRY[suite](name, **config.env[suite])` builds the env. Suite classes import
their third-party packages only when constructed, so a missing package matters only to its suite.

Every env the agent sees comes from `make_env` and so has the same stack, innermost first:
ActionRepeat (unless the suite repeats itself), NormalizeActions (Box) or OneHotAction (Discrete),
TimeLimit, ClipReward, and Flags, which gives every observation dict `reward`, `is_first` (reset),
`is_last` (terminated or truncated) and `is_terminal` (terminated), whatever the suite said.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import re
from typing import Any, Mapping

import gymnasium

from . import wrappers
from .atari import Atari
from .checker import EnvCheckError, MissingDependency, check_env, check_running_step
from .crafter import Crafter
from .custom_env import CustomEnv
from .dmc import DMC
from .gym import GymEnv
from .memorymaze import MemoryMaze
from .minecraft import Minecraft
from .parallel import EnvError, EnvGaveUp, EnvPool, EnvRestartFailed

REGISTRY = {
    'dmc': DMC,
    'atari': Atari,
    'crafter': Crafter,
    'minecraft': Minecraft,
    'memorymaze': MemoryMaze,
    'gym': GymEnv,
    'custom': CustomEnv,
}

MODES = ('train', 'eval')
EVAL_SEED_OFFSET = 10000

__all__ = ['REGISTRY', 'EnvCheckError', 'EnvError', 'EnvGaveUp', 'EnvRestartFailed', 'MissingDependency', 'EnvPool',
           'check_env', 'check_running_step', 'closest_parameter', 'constructor_defaults', 'env_seed', 'make_env',
           'make_pool', 'options_note', 'options_not_taken', 'parse_task', 'plain_option', 'suite_kwargs',
           'wrap_env', 'wrappers']


def parse_task(task: str) -> tuple[str, str]:
    """'dmc_walker_walk' -> ('dmc', 'walker_walk'); checks that the suite is registered."""
    suite, underscore, name = str(task).partition('_')
    unusable = sorted(key for key in REGISTRY if '_' in key)
    if unusable:  # task names split at the first underscore: these suites can never be reached
        raise EnvCheckError(
            f"REGISTRY in envs/__init__.py names {' and '.join(map(repr, unusable))}, but a suite's name "
            f"cannot contain '_': a task '<suite>_<name>' is split at its first underscore, so "
            f"'{unusable[0]}_<name>' would ask for suite '{unusable[0].partition('_')[0]}'. Rename it in "
            f"REGISTRY (e.g. '{unusable[0].replace('_', '')}') and use that name in --task.")
    registered = ', '.join(sorted(REGISTRY))
    if not name:
        what = (f"has no name after the suite prefix '{suite}_'" if underscore else "has no suite prefix")
        raise EnvCheckError(
            f"Task '{task}' {what}; expected '<suite>_<name>' such as custom_reach, "
            f"dmc_walker_walk or gym_CartPole-v1. Registered suites: {registered}.")
    if suite not in REGISTRY:
        raise EnvCheckError(
            f"Unknown suite '{suite}' in task '{task}'. Registered suites: {registered}. Name the "
            "task '<suite>_<name>' with one of these, or add your env class to REGISTRY in "
            "envs/__init__.py (e.g. 'custom': CustomEnv for --task custom_<name>).")
    return suite, name


def env_seed(seed: int, mode: str, index: int, shift: int = 0) -> int:
    """Train env i gets seed + i, eval env i gets seed + 10000 + i; `shift` moves them (a resumed
    run's train envs, so they do not replay the first run's episodes), modulo 2**31."""
    if mode not in MODES:
        raise ValueError(f"Env mode must be one of {MODES}, got {mode!r}.")
    return (int(seed) + index + (EVAL_SEED_OFFSET if mode == 'eval' else 0) + int(shift)) % 2**31


def constructor_signature(cls: Any) -> tuple[dict[str, Any], bool]:
    """({parameter name: its default, or inspect.Parameter.empty}, whether it takes **kwargs) of a
    class's constructor; ({}, True) when its signature cannot be read."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return {}, True
    named = {p.name: p.default for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return named, any(p.kind == p.VAR_KEYWORD for p in parameters)


def constructor_parameters(cls: Any) -> set[str]:
    """Names of the parameters the class's constructor declares explicitly (not **kwargs)."""
    return set(constructor_signature(cls)[0])


def constructor_defaults(cls: Any) -> dict[str, Any]:
    """The constructor's parameters that have a default, with it (what an option not given means)."""
    return {name: default for name, default in constructor_signature(cls)[0].items()
            if default is not inspect.Parameter.empty}


def plain_option(value: Any) -> Any:
    """An option as YAML would hold it, for comparing a config value with a Python default:
    (64, 64) == [64, 64]."""
    return [plain_option(v) for v in value] if isinstance(value, (list, tuple)) else value


def options_not_taken(cls: Any, options: Mapping[str, Any]) -> list[str]:
    """The options make_env could not pass to a class's constructor: those it does not name (unless
    it takes **kwargs), and 'name', which make_env passes itself."""
    named, takes_kwargs = constructor_signature(cls)
    return [key for key in options if key == 'name' or not (takes_kwargs or key in named)]


def suite_kwargs(cls: Any, options: Mapping[str, Any], seed: int, action_repeat: int) -> dict:
    """config.env[suite], plus seed / action_repeat where the constructor names those parameters."""
    kwargs = dict(options)
    names = constructor_parameters(cls)
    if 'seed' in names:
        kwargs['seed'] = seed
    if 'action_repeat' in names:
        kwargs['action_repeat'] = action_repeat
    return kwargs


def rejected_option(error: TypeError, options: Mapping[str, Any]) -> str | None:
    """The config option a constructor's TypeError says it did not take, if it is one."""
    match = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    return match.group(1) if match and match.group(1) in options else None


def closest_parameter(cls: Any, rejected: str) -> str | None:
    """The constructor's parameter name closest to a rejected option's, if one is close."""
    close = difflib.get_close_matches(rejected, sorted(constructor_parameters(cls) - {'self', 'name'}), n=1)
    return close[0] if close else None


def spelling_hint(cls: Any, rejected: str) -> str:
    """': did you mean ...?' from the constructor's own parameter names, or ''."""
    close = closest_parameter(cls, rejected)
    return f": did you mean '{close}'?" if close else ''


def call_mismatch(cls: Any, name: str, kwargs: Mapping[str, Any]) -> str | None:
    """Why a class's constructor signature cannot take (name, **kwargs), or None where it can (or
    where its signature cannot be read)."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(name, **kwargs)
    except TypeError as error:
        return str(error)
    return None


def options_note(cls: Any, name: str, suite: str, kwargs: Mapping[str, Any], error: TypeError) -> str:
    """What a TypeError of a suite's constructor means for its options: where each comes from and the
    fix; names the option the constructor (or an env it passes **kwargs to) did not take."""
    head = (f"make_env called {cls.__name__}({name!r}, **{dict(kwargs)}): the options are config "
            f"env.{suite} (plus seed / action_repeat where the constructor names them), set by "
            f"--env.{suite}.<key> VALUE on the command line or env: {{{suite}: {{<key>: VALUE}}}} in a "
            "configs.yaml block.")
    match = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    rejected = match.group(1) if match else None
    if rejected not in kwargs or rejected in ('seed', 'action_repeat'):
        return f"{head} Make the constructor accept them, or change env.{suite} there."
    return (f"{head} Option '{rejected}' was not taken: drop --env.{suite}.{rejected} or its "
            f"'{rejected}:' entry under env: {{{suite}: ...}} (or fix its spelling), or make the "
            f"constructor, and any env it passes **kwargs to, accept '{rejected}'.")


def wrap_env(env: Any, action_repeat: int = 1, time_limit: int = 0,
             reward_clip: float = 0.0) -> wrappers.Flags:
    """The common wrapper stack (see the module docstring); action_repeat 1 means no ActionRepeat."""
    if action_repeat > 1:
        env = wrappers.ActionRepeat(env, action_repeat)
    space = wrappers.get_act_space(env)
    if isinstance(space, gymnasium.spaces.Discrete):
        env = wrappers.OneHotAction(env)
    else:
        env = wrappers.NormalizeActions(env)
    if time_limit > 0:
        env = wrappers.TimeLimit(env, time_limit)
    if reward_clip > 0:
        env = wrappers.ClipReward(env, -reward_clip, reward_clip)
    return wrappers.Flags(env)


def make_env(config: Mapping[str, Any], mode: str, index: int, seed_shift: int = 0) -> wrappers.Flags:
    """The `index`-th train or eval env of `config.task`, wrapped; every env is checked when made
    (one reset and one step: copies of one class can differ, e.g. by seed); `seed_shift` moves its
    seed (env_seed).

    Reads config keys task, seed, action_repeat, time_limit (agent steps, 0 = off), reward_clip
    (0 = off) and env.<suite>. Rewards are not scaled here (the model applies reward_scale).
    """
    suite, name = parse_task(config['task'])
    cls = REGISTRY[suite]
    seed = env_seed(config['seed'], mode, index, seed_shift)
    repeat = int(config['action_repeat'])
    options = config['env'].get(suite, {}) if 'env' in config else {}
    kwargs = suite_kwargs(cls, options, seed, repeat)
    try:
        env = cls(name, **kwargs)
    except TypeError as error:
        rejected = rejected_option(error, options)
        if rejected is not None:  # a config option the constructor does not take: the user's to fix
            raise EnvCheckError(
                f"{cls.__name__}({name!r}) does not take option '{rejected}': drop --env.{suite}.{rejected} or "
                f"its '{rejected}:' entry under env: {{{suite}: ...}} in configs.yaml (or fix its spelling"
                f"{spelling_hint(cls, rejected)}), or make the constructor, and any env it passes **kwargs "
                f"to, accept '{rejected}'. It was called with **{dict(kwargs)}: config env.{suite}, plus seed / "
                "action_repeat where the constructor names them.") from None
        unbound = call_mismatch(cls, name, kwargs)
        if unbound is not None:  # e.g. def __init__(self): the registry's calling convention is not met
            raise EnvCheckError(
                f"{cls.__name__}({name!r}{''.join(f', {k}={v!r}' for k, v in kwargs.items())}) cannot be called: "
                f"{unbound}. make_env calls a suite's class with the task's name after the suite prefix "
                f"('{name}' for task {config['task']}) as the first argument and its options as keywords: "
                "give it def __init__(self, name, **kwargs) (or name its options as parameters).") from None
        if kwargs:
            error.add_note(options_note(cls, name, suite, kwargs, error))
        raise
    check_env(env, index)
    env.reset()
    repeat_outside = 1 if 'action_repeat' in kwargs else repeat
    return wrap_env(env, repeat_outside, int(config.get('time_limit', 0)),
                    float(config.get('reward_clip', 0.0)))


def make_pool(config: Mapping[str, Any], mode: str, amount: int | None = None,
              parallel: str | None = None, **pool_kwargs: Any) -> EnvPool:
    """An EnvPool of `amount` (default envs.amount) make_env envs of `mode`, run as envs.parallel says.

    `pool_kwargs` go to EnvPool (max_restarts, on_event). The constructors are functools.partial
    objects of make_env, so they pickle for worker processes.
    """
    amount = int(config['envs']['amount'] if amount is None else amount)
    parallel = config['envs']['parallel'] if parallel is None else parallel
    ctors = [functools.partial(make_env, config, mode, index) for index in range(amount)]
    return EnvPool(ctors, parallel, **pool_kwargs)
