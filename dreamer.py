"""DreamerV3 training command line: `python3 dreamer.py --configs BLOCK ... --key value ...`.

main() parses the config, then (optionally across `--parallel` processes) runs the loop:
random-policy prefill, then act / store / train at `train_ratio`, evaluate, log and checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional


def stop_while_starting(signum: int, _frame) -> None:
    """Ctrl-C before training has begun (the config is read, the run is prepared): nothing to save
    yet, so end at once with 128 + the signal's number, no traceback."""
    sys.stderr.write(f"\n{signal.Signals(signum).name} while starting: stopped before training began\n")
    raise SystemExit(128 + signum)


def stop_while_importing(signum: int, _frame) -> None:
    """Ctrl-C while numpy and torch load: end the process at once (an exception raised inside torch's
    half-done import can abort the interpreter as it exits, SIGABRT and a stack dump); nothing has
    been started or written yet."""
    sys.stderr.write(f"\n{signal.Signals(signum).name} while starting: stopped before training began\n")
    sys.stderr.flush()
    os._exit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, stop_while_importing)

import numpy as np
import torch

import checkpoint as ckpt
import config as config_lib
import tools
from config import EXIT_USER_ERROR, Config, ConfigError
from logger import Logger, LogWriteError, Pace, video_frame
from replay import Prefetcher, Replay, check_batch_memory, steps_stored_in

if __name__ == "__main__":  # the imports are done; until the loop's own handler (Interrupt) takes over
    signal.signal(signal.SIGINT, stop_while_starting)

if TYPE_CHECKING:  # imported late at run time (start-up speed, optional suites)
    from distributed import DistSync
    from envs.parallel import EnvPool
    from exploration import Agent, PolicyState


class RunError(RuntimeError):
    """A problem found before or while training whose message tells the user what to do."""


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is one whose message tells the user what to fix (a config value, the env or
    its options, a checkpoint, a missing optional package): reported as that one paragraph, exit
    status 2, no traceback. Anything else is a bug and keeps its traceback."""
    from envs.checker import EnvCheckError, MissingDependency
    from replay import ReplayMemoryError

    return isinstance(error, (RunError, ConfigError, ckpt.CheckpointError, EnvCheckError, MissingDependency,
                              ReplayMemoryError, LogWriteError))


# ------------------------------------------------------------------------------------------ run set-up


@dataclasses.dataclass(frozen=True)
class RunPaths:
    logdir: Path
    checkpoint: Path  # where latest.pt is written
    resume_from: Optional[Path]  # checkpoint to load at start, if any
    replay_dir: Path


def checkpoint_file(path: str) -> Path:
    """--from_checkpoint names a latest.pt, or the run folder holding one."""
    source = Path(path).expanduser()
    return source / "latest.pt" if source.is_dir() else source


def resolve_paths(config: Config) -> RunPaths:
    """The run folder: --logdir, else the folder of --from_checkpoint, else ./logdir/<task>."""
    source = checkpoint_file(config.from_checkpoint) if config.from_checkpoint else None
    if config.logdir:
        logdir = Path(config.logdir).expanduser()
    elif source is not None:
        logdir = source.parent
    else:
        logdir = Path("logdir") / config.task
    latest = logdir / "latest.pt"
    resume = source if source is not None else (latest if ckpt.has_checkpoint(latest) else None)
    return RunPaths(logdir, latest, resume, logdir / "replay")


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run (rank 0 of 1 when not parallel)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclasses.dataclass
class Counters:
    """Everything the loop counts; saved in checkpoints so a resumed run continues where it stopped."""

    step: int = 0  # agent steps summed over envs (and ranks)
    updates: int = 0  # gradient updates done
    episodes: int = 0  # finished train episodes
    train_start: int = -1  # step at which training began (-1 = not yet); moved by a resume that changes the rate
    schedule_updates: int = 0  # updates done before train_start (nonzero after such a resume)
    last_log: int = 0
    last_eval: int = 0
    last_save: int = 0
    # replay steps no checkpoint counted: collected after one by a run that then stopped without
    # saving (kill -9, a crash, a power cut); kept as training data, counted once (see count_unsaved_replay)
    replay_unsaved: int = 0
    longest_episode: int = 0  # agent steps of the longest finished train episode (rank 0's when saved): caps evaluations


# ------------------------------------------------------------------------------------------- factories


def make_env_pool(config: Config, mode: str, amount: int, first_index: int, logger: Logger,
                  seed_shift: int = 0) -> EnvPool:
    """`amount` wrapped envs of `config.task` in the configured parallel mode; env worker restarts
    are logged with the env's traceback the first time, then with its last line (a failure that
    repeats would otherwise fill the log). `seed_shift` moves the envs' seeds (envs.env_seed)."""
    import envs

    traced: set[int] = set()  # envs whose restart was logged with the whole traceback

    def log_event(event: dict) -> None:
        if event.get('kind') == 'slow':
            logger.warning(f"{mode} {event['message']}")
            return
        text = str(event.get('traceback', '')).rstrip()
        if event.get('index') in traced:
            last = text.splitlines()[-1].strip() if text else ''
            logger.warning(f"{mode} {event['message']} again: {last} (traceback as logged before)")
            return
        traced.add(event.get('index'))
        logger.warning(f"{mode} {event['message']}:\n{text}")

    ctors = [functools.partial(envs.make_env, config, mode, first_index + i, seed_shift) for i in range(amount)]
    try:
        return envs.parallel.EnvPool(ctors, config.envs.parallel, max_restarts=config.envs.max_restarts,
                                     on_event=log_event, first_index=first_index)
    except Exception as error:
        came_from_an_env = isinstance(error, envs.EnvError) or hasattr(error, "env_index")
        if is_user_error(error) or not came_from_an_env:  # a failed start-up check names the key itself
            raise
        raise env_start_failure(error, mode, first_index, logger) from None


class EnvStartError(RunError):
    """An env raised (or its worker died) while it was built or checked at start: the env's bug."""


def env_start_failure(error: Exception, mode: str, first_index: int, logger: Logger) -> EnvStartError:
    """Log the env's own traceback once (stderr and train.log) and return the paragraph that follows
    it; Python's traceback of the re-raise in this process would only repeat it."""
    index = getattr(error, "env_index", getattr(error, "index", first_index))
    text = (getattr(error, "worker_traceback", "") or "").rstrip()
    if text:
        logger.error(f"{mode} env {index} failed to start:\n{text}")
    last = [line.strip() for line in (text or str(error)).splitlines() if line.strip()][-1:] or ["?"]
    where = (f"its traceback is in {tracebacks_at(logger)}" if text else
             "no traceback: its worker process died")
    return EnvStartError(
        f"{mode} env {index} failed to start (while it was built, or in the start-up check's reset() and "
        f"one step()): {last[0]} ({where}). This is a failure of the env's own code or of the simulator "
        "it drives: fix it and run the command again.")


def make_agent(config: Config, obs_space: dict, act_space: Any, device: torch.device, seed: Optional[int] = None) -> Agent:
    """The agent; a model too large for the device's memory stops with a paragraph naming its sizes."""
    import exploration

    try:
        return exploration.make_agent(obs_space, act_space, config, device, seed)
    except (MemoryError, OverflowError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        sizes = ", ".join(f"{key} {config.get_path(key)}" for key in MODEL_SIZE_KEYS)
        raise RunError(
            f"building the model on {device} failed for want of memory ({ckpt.describe(error)}): its sizes "
            f"({sizes}) are too large for this machine. Use a smaller size block (--configs ... size_xs, size_s or "
            "size_m) or lower the sizes above, e.g. --rssm.deter 512 --rssm.hidden 512.") from None


MODEL_SIZE_KEYS = ("rssm.deter", "rssm.hidden", "rssm.stoch", "rssm.classes", "encoder.mlp_units",
                   "encoder.cnn_depth", "actor.units", "critic.units")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says an allocation failed (torch's CPU allocator raises a RuntimeError, CUDA
    an OutOfMemoryError; a size past what a shape holds, an OverflowError)."""
    if isinstance(error, (MemoryError, OverflowError)) or isinstance(error.__cause__, MemoryError):
        return True  # (the replay's prefetch thread hands its MemoryError over as the cause)
    text = str(error)
    return "can't allocate memory" in text or "out of memory" in text.lower() or "Overflow when unpacking" in text


def rank_seed(config: Config, rank: int, step: int = 0) -> int:
    """The seed of one rank's generators (python, numpy, torch, the replay sampler, the random
    actions): config.seed on rank 0 of a fresh run, 1000 apart per rank; `step` (a resumed rank other
    than 0) moves it by 100,003 per agent step, as the train envs' seeds move."""
    return int(config.seed) + 1000 * rank + 100_003 * step


def reseed_resumed_rank(config: Config, agent: Agent, replay: Replay, rank: int, step: int) -> None:
    """A checkpoint holds rank 0's generator states, and restoring them on every rank would have all
    ranks draw the same policy noise, random actions and batch positions: a resumed rank other than 0
    takes generators of its own instead."""
    seed = rank_seed(config, rank, step)
    tools.set_seed(seed, config.deterministic)
    agent.reseed_random_actions(seed)
    replay.set_rng_state(np.random.default_rng(seed).bit_generator.state)


def make_replay(config: Config, paths: RunPaths, dist: Dist, warn: Callable[[str], None],
                resumed_step: int = 0) -> Replay:
    """This rank's replay shard. Every rank writes into the one replay folder under worker ids that
    are global env indices, so a resume with another number of ranks finds every chunk.
    `resumed_step`: the step of the checkpoint the run resumes from."""
    capacity = max(min(config.replay_size, run_replay_steps(config, paths, dist, resumed_step)) // dist.world,
                   config.batch_length)
    if config.replay_size // dist.world < config.batch_length and dist.main and not config.eval_only:
        each = " per process: each process's replay" if dist.world > 1 else ": the replay"
        warn(f"replay_size {config.replay_size} holds less than one sequence of batch_length {config.batch_length}"
             f"{each} holds {config.batch_length} steps instead")
    directory = None if config.eval_only else paths.replay_dir  # an evaluation stores nothing (and makes no folder)
    return Replay(capacity, config.batch_length, directory, chunk=config.replay_chunk,
                  seed=rank_seed(config, dist.rank), warn=warn, keep_evicted=config.replay_keep_evicted)


def run_replay_steps(config: Config, paths: RunPaths, dist: Dist, resumed_step: int) -> int:
    """How many steps the run's replay holds at most (over all ranks), so that a short run reserves
    no more than it stores: those its folder already holds (a run that stopped without saving stored
    more than its checkpoint's step, and those steps stay as training data) and those to come up to
    --steps, one iteration of every env past it."""
    stored = 0 if config.eval_only else steps_stored_in(paths.replay_dir)
    return stored + max(config.steps - resumed_step, 0) + config.envs.amount * dist.world


def lock_run_folder(paths: RunPaths, dist: Dist, eval_only: bool) -> Optional[tools.FolderLock]:
    """One training run per folder: the main rank locks it (an --eval_only run, which writes no
    checkpoint or replay, takes no lock); a second run there stops before writing anything."""
    if not dist.main or eval_only:
        return None
    lock = tools.FolderLock(paths.logdir)
    try:
        holder = lock.acquire()
        check_writable_run_folder(paths.logdir)
    except OSError as error:
        lock.release()
        raise RunError(
            f"cannot write to the run folder {paths.logdir} ({type(error).__name__}: "
            f"{error.strerror or error}): checkpoints, replay and logs go there. Pass a --logdir that "
            "is (or can be made) a writable folder: not an existing file, on a disk that is not "
            "read-only, with write permission for you. Nothing else was written there.") from None
    if holder is not None:
        raise folder_in_use(paths.logdir, holder, lock.path)
    return lock


def folder_in_use(logdir: Path, holder: str, lock_path: str) -> RunError:
    return RunError(
        f"{logdir} is in use by another run ({holder}, see {lock_path}): two runs in one folder would "
        "overwrite each other's checkpoint, replay chunks and metrics. Wait for that run to finish or "
        "stop it (Ctrl-C saves it), or use another --logdir.")


def check_writable_run_folder(logdir: Path) -> None:
    """OSError unless a file can be made and removed in `logdir` and its replay/ is a folder (or
    absent): found before training rather than at the first log or replay chunk."""
    replay = Path(logdir) / "replay"
    if replay.exists() and not replay.is_dir():
        raise NotADirectoryError(20, f"{replay} is a file, where the replay folder goes")
    probe = Path(logdir) / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def make_logger(config: Config, paths: RunPaths, dist: Dist) -> Logger:
    """The run's logs in its folder; an --eval_only run's in <logdir>/eval_only, apart from the
    training curves (TensorBoard shows it as a run of its own)."""
    return Logger(paths.logdir / "eval_only" if config.eval_only else paths.logdir, enabled=dist.main,
                  rank=dist.rank)


# ------------------------------------------------------------------------------------- episode tracking


class EpisodeTracker:
    """Per-env running return/length and `log_*` values; finished episodes become metrics."""

    def __init__(self, amount: int):
        self.returns = np.zeros(amount, np.float64)
        self.lengths = np.zeros(amount, np.int64)
        self.logs: list[dict[str, float]] = [{} for _ in range(amount)]
        self.achievement_episodes: dict[str, int] = {}
        self.episodes_seen = 0

    def add(self, index: int, obs: dict[str, Any]) -> Optional[dict[str, float]]:
        """Account one observation of env `index`; returns the episode summary when it ended."""
        if obs["is_first"]:
            self.returns[index], self.lengths[index], self.logs[index] = 0.0, 0, {}
        else:
            self.returns[index] += float(obs["reward"])
            self.lengths[index] += 1
        for key, value in obs.items():
            if key.startswith("log_"):
                self.logs[index][key[4:]] = max(self.logs[index].get(key[4:], -math.inf), float(value))
        if not obs["is_last"]:
            return None
        summary = {"return": float(self.returns[index]), "length": int(self.lengths[index])}
        summary.update(self.logs[index])
        self._count_achievements(self.logs[index])
        return summary

    def _count_achievements(self, logs: dict[str, float]) -> None:
        self.episodes_seen += 1
        for name, count in unlocked_achievements([logs]).items():
            self.achievement_episodes[name] = self.achievement_episodes.get(name, 0) + count

    def achievement_metrics(self) -> dict[str, float]:
        """Success rate (%) of every achievement over all episodes so far, and the Crafter score."""
        return achievement_metrics(self.achievement_episodes, self.episodes_seen, "achievement/")


def unlocked_achievements(episodes: list[dict[str, float]]) -> dict[str, int]:
    """{name: in how many of `episodes` (each its log_ values) achievement_<name> was unlocked}."""
    counts: dict[str, int] = {}
    for logs in episodes:
        for key, value in logs.items():
            if key.startswith("achievement_"):
                name = key[len("achievement_"):]
                counts[name] = counts.get(name, 0) + int(value > 0)
    return counts


def achievement_metrics(unlocked: dict[str, int], episodes: int, prefix: str) -> dict[str, float]:
    """`<prefix><name>`: the success rate (%) of each achievement, unlocked in `unlocked[name]` of
    `episodes` episodes, and `<prefix>crafter_score` (the Crafter paper's score of those rates)."""
    if not unlocked or not episodes:
        return {}
    from envs.crafter import crafter_score

    rates = {name: 100.0 * count / episodes for name, count in unlocked.items()}
    metrics = {f"{prefix}{name}": rate for name, rate in sorted(rates.items())}
    metrics[f"{prefix}crafter_score"] = crafter_score(rates)
    return metrics


def to_transition(obs: dict[str, Any], action: np.ndarray) -> dict[str, Any]:
    """The replay record of one observation: model keys, the action that led to it, reward, flags."""
    record = {k: v for k, v in obs.items() if not k.startswith("log_")}
    record["action"] = np.zeros_like(action) if obs["is_first"] else action
    record["reward"] = np.float32(obs["reward"])
    for flag in ("is_first", "is_last", "is_terminal"):
        record[flag] = bool(obs[flag])
    return record


def stack_obs(observations: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """List of per-env dicts -> dict of (N, ...) arrays (log_ keys dropped)."""
    keys = [k for k in observations[0] if not k.startswith("log_")]
    return {k: np.stack([np.asarray(o[k]) for o in observations]) for k in keys}


# ------------------------------------------------------------------------------------------ evaluation


def render_frame(pool: EnvPool, obs: dict[str, Any]) -> tuple[Optional[np.ndarray], bool]:
    """(an (H, W, 3) uint8 frame of eval env 0, whether it is the image observation): its render()
    (RGBA, grey and float frames converted, logger.video_frame), else its image observation, else
    (None, False). Raises envs.EnvError when the env's render() fails, ValueError when it returns
    something that is not a frame."""
    frame = pool.call_one(0, "render") if hasattr(pool, "call_one") else pool.call("render")[0]
    if frame is not None:
        return video_frame(frame), False
    image = obs.get("image")
    if image is None:
        return None, False
    return np.asarray(image if image.shape[-1] == 3 else np.repeat(image[..., :1], 3, -1), np.uint8), True


def render_failure(error: Exception) -> str:
    """One paragraph for an env whose render() raised: its last error line and what to do."""
    text = getattr(error, "worker_traceback", "") or str(error)
    last = [line for line in text.strip().splitlines() if line.strip()][-1:] or [type(error).__name__]
    return (f"no eval videos from now on: env 0's render() failed ({last[0].strip()}). Training and "
            "evaluation go on. Make render() return an (H, W, 3) uint8 frame: a gymnasium env made with "
            "render_mode='rgb_array' is rendered with render(), an old gym env with "
            "render(mode='rgb_array'); or set --video False.")


@dataclasses.dataclass
class EvalResult:
    """One rank's share of an evaluation."""

    returns: list[float] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)
    logs: list[dict[str, float]] = dataclasses.field(default_factory=list)  # each episode's log_ values
    frames: list[np.ndarray] = dataclasses.field(default_factory=list)  # env 0's first episode, (H, W, 3) each
    render_ok: bool = True  # False once render() raised (logged once by evaluate)
    frames_from_image: bool = False  # the env's render() gave no frame: the video is its 'image' observation
    completed: bool = True  # False when a stop request cut it short
    abandoned: int = 0  # > 0: the length of the episode that reached the length cap (nothing to log)


STOP_CHECK_UPDATES = 8  # updates between stop-request checks within one step's updates
EVAL_LENGTH_FACTOR = 100  # an eval episode this many times the longest train episode has got stuck
EVAL_LENGTH_MIN = 10_000  # agent steps: never cap eval episodes below this (Crafter's own limit: 10,000)
EVAL_NOTE_EVERY_S = 300.0  # a long evaluation says how far it got this often (train.log)


def eval_length_cap(time_limit: int, longest_episode: int) -> Optional[int]:
    """Agent steps after which an eval episode that has not ended abandons the evaluation: none
    where time_limit ends every episode or no train episode has ended yet (nothing to go by)."""
    if time_limit > 0 or longest_episode <= 0:
        return None
    return max(EVAL_LENGTH_FACTOR * longest_episode, EVAL_LENGTH_MIN)


def eval_share(episodes: int, rank: int, world: int) -> int:
    """Rank `rank`'s share of `episodes` eval episodes: equal parts, the first ranks one more."""
    return episodes // world + (rank < episodes % world)


def evaluate(agent: Agent, pool: EnvPool, episodes: int, video_length: int, warn: Callable[[str], None],
             video: bool = True, stop: Callable[[], bool] = lambda: False, max_length: Optional[int] = None,
             note: Callable[[str], None] = lambda text: None) -> EvalResult:
    """Run `episodes` episodes (at least; envs that end at the same step all count) with the
    policy's eval mode (its most likely action, or sampled with eval_sample), recording up to
    `video_length` frames of env 0's first episode if `video` (`warn` gets what goes wrong with
    them). `stop()` true (a stop request) ends it early, with `completed` False; an episode that
    reaches `max_length` agent steps without ending ends it too, with `abandoned` set to that length.
    `note` gets a progress line every EVAL_NOTE_EVERY_S seconds of a long evaluation."""
    import envs

    result = EvalResult()
    tracker = EpisodeTracker(len(pool))
    want_video = video
    actions = agent.random_actions(len(pool))  # ignored: the first step resets every env
    state = None
    last_note = time.time()
    ended = np.ones(len(pool), bool)  # envs whose last observation ended an episode (none started yet)
    while len(result.returns) < episodes:
        if stop():
            result.completed = False
            return result
        running = int(np.where(ended, 0, tracker.lengths).max())  # agent steps of the longest running episode
        if max_length is not None and running >= max_length:
            result.abandoned = running
            return result
        if time.time() - last_note >= EVAL_NOTE_EVERY_S:
            last_note = time.time()
            note(f"{len(result.returns)} of {tools.plural(episodes, 'episode')} done, one running for "
                 f"{running} agent steps")
        observations = pool.step(actions)
        ended = np.array([bool(obs["is_last"]) for obs in observations])
        for index, obs in enumerate(observations):
            envs.check_running_step(obs, f"eval env {pool.first_index + index}")
            summary = tracker.add(index, obs)
            if summary is not None:
                result.returns.append(summary.pop("return"))
                result.lengths.append(summary.pop("length"))
                result.logs.append(summary)  # the env's log_<key> values, e.g. success
        if want_video and len(result.frames) < video_length:  # env 0's first episode, its last frame included
            try:
                frame, from_image = render_frame(pool, observations[0])
                result.frames_from_image |= from_image
            except (envs.EnvError, ValueError) as error:
                warn(render_failure(error))
                frame, result.render_ok = None, False
            if frame is not None and result.frames and frame.shape != result.frames[0].shape:
                warn(f"eval video: env 0's render() changed its frame size from {result.frames[0].shape} to "
                     f"{frame.shape}; this video ends there (a video needs one frame size; make render() "
                     "return frames of one size)")
                frame = None
            want_video = frame is not None
            if frame is not None:
                result.frames.append(frame)
        want_video = want_video and not ended[0]
        actions, state = agent.policy(stack_obs(observations), state, "eval")
    return result


def eval_abandoned(config: Config, step: int, longest: int, length: int) -> str:
    """What an evaluation at `step` whose episode reached the length cap (from `longest`, the
    longest training episode) says: the warning of a training run, the error of --eval_only."""
    policy = ("sampled actions" if config.eval_sample else
              "the actor's most likely action, which can repeat one action all episode")
    fix = "" if config.eval_sample else ", or evaluate with sampled actions (--eval_sample True)"
    if config.eval_only:
        then = " Nothing was evaluated."
    elif step >= config.steps:
        then = ""
    else:
        then = f" Training goes on; the next evaluation is due {config.eval_every} steps later."
    return (f"evaluation at step {step} abandoned, nothing logged: an eval episode ran {length} agent steps "
            f"without ending ({EVAL_LENGTH_FACTOR} times the longest training episode so far, {longest}, and at "
            f"least {EVAL_LENGTH_MIN}). Its policy ({policy}) may never end it, e.g. by standing still where "
            "only reaching a goal ends an episode. Give episodes a limit (--time_limit N agent steps, or "
            f"truncated=True from the env){fix}.{then}")


def log_eval(config: Config, returns: list[float], lengths: list[int], logs: list[dict[str, float]],
             frames: list[np.ndarray], logger: Logger) -> None:
    """The evaluation's scalars (every rank's episodes; eval/<key>: the mean of an env's log_<key>
    over the episodes that had it; Crafter's achievements as eval/achievement/<name>, the success
    rate (%) over the evaluation's episodes, as training's achievement/<name>) and env 0's video."""
    metrics = {"eval/return": float(np.mean(returns)), "eval/length": float(np.mean(lengths)),
               "eval/episodes": float(len(returns))}
    for key in sorted({key for episode in logs for key in episode if not key.startswith("achievement_")}):
        metrics[f"eval/{key}"] = float(np.mean([episode[key] for episode in logs if key in episode]))
    metrics.update(achievement_metrics(unlocked_achievements(logs), len(logs), "eval/achievement/"))
    logger.scalars(metrics)
    if config.eval_only:  # the result itself, where the user looks
        logger.info(f"eval_only: return {metrics['eval/return']:.2f} (min {min(returns):.2f}, max "
                    f"{max(returns):.2f}) over {tools.plural(len(returns), 'episode')}, mean length "
                    f"{metrics['eval/length']:.0f}")
    if frames:
        logger.video("eval/video", np.stack(frames)[None])


# ------------------------------------------------------------------------------------------ checkpoints


def checkpoint_state(config: Config, agent: Agent, counters: Counters, replay: Replay,
                     replay_rng: dict | None = None, world: int = 1) -> dict[str, Any]:
    """Everything a resumed run needs. replay_rng: the sampler state after the last batch trained
    on (Prefetcher.consumed_rng_state); the replay's own state when not given. world: the number
    of data-parallel processes (under torchrun it is not in the config)."""
    return {
        "world": world,
        "agent": agent.state_dict(),
        "replay_rng": replay_rng if replay_rng is not None else replay.rng_state(),
        "counters": dataclasses.asdict(counters),
        "rng": ckpt.capture_rng_states(),
        "config": config.to_dict(),
        "spaces": describe_spaces(agent.obs_space, agent.act_space),
        "format": 1,
    }


def describe_spaces(obs_space: dict, act_space: Any) -> dict[str, Any]:
    """The env's spaces as a checkpoint records them: {"obs": {key: "(shape) dtype"}, "act": repr}."""
    return {"obs": {k: f"{tuple(v.shape)} {v.dtype}" for k, v in sorted(obs_space.items())},
            "act": repr(act_space)}


def check_same_spaces(saved: dict | None, current: dict, source: Path, saved_task: str, task: str,
                      evaluating: bool = False) -> None:
    """A checkpoint's model fits only the observation and action spaces it was trained on: the same
    task name whose env options changed (an image size, an action set), or another task to evaluate
    on, would otherwise surface as a parameter shape blamed on the model size. (Checkpoints from
    before the spaces were recorded are not checked here.)"""
    if saved is None or saved == current:
        return
    differences = [f"observation '{k}' {saved['obs'].get(k, 'absent')} then, {current['obs'].get(k, 'absent')} now"
                   for k in sorted(set(saved["obs"]) | set(current["obs"]))
                   if saved["obs"].get(k) != current["obs"].get(k)]
    if saved["act"] != current["act"]:
        differences.append(f"actions {saved['act']} then, {current['act']} now")
    if saved_task != task:  # an evaluation on another task (a training run's task was checked before)
        raise ckpt.CheckpointMismatch(
            f"the checkpoint {source} was trained on task {saved_task}, whose spaces differ from those of task "
            f"{task}: {'; '.join(differences)}. A model acts only on the spaces it was trained on: evaluate it on "
            f"{saved_task}, or on another task of the same observations and actions.")
    fix = ("Evaluate it with the options it was trained with" if evaluating else
           "Resume with the options it was trained with")
    raise ckpt.CheckpointMismatch(
        f"the checkpoint {source} was trained on other spaces of task {task}: {'; '.join(differences)}. "
        f"The env's options (env.<suite> in the config, e.g. an image size) or its code changed since, and "
        f"the model fits only the spaces it was trained on. {fix} (its config.yaml), or start a fresh run in "
        "a new --logdir.")


class UpdateOutOfMemory(RunError):
    """A batch or an update did not fit in memory: nothing more is trained or saved."""


def last_checkpoint_kept(paths: RunPaths) -> str:
    """The sentence of a stop that saves no model: the last checkpoint stays, and so does the replay."""
    kept = (f"Nothing was saved over the last checkpoint {paths.checkpoint}" if ckpt.has_checkpoint(paths.checkpoint)
            else "No checkpoint had been saved yet")
    return f"{kept}, and the replay on disk is kept"


def update_out_of_memory_message(config: Config, device: torch.device, paths: RunPaths, error: BaseException) -> str:
    return (f"an update ran out of memory on {device} ({ckpt.describe(error.__cause__ or error)}): a batch of "
            f"batch_size {config.batch_size} sequences of batch_length {config.batch_length} steps and the model's "
            f"activations over it do not fit. {last_checkpoint_kept(paths)}. Lower --batch_size or "
            "--batch_length (the paper's are 16 and 64), use a smaller model (size_xs, size_s), or on a GPU "
            "--precision bf16; then run the same command again: it resumes from the last checkpoint.")


class TrainingDiverged(RunError):
    """The agent's parameters hold NaN or inf: nothing more is trained or saved."""


def check_not_diverged(config: Config, agent: Agent, counters: Counters, paths: RunPaths,
                       nonfinite_actions: bool = False) -> None:
    """Stop with TrainingDiverged where an update left NaN or inf in the agent's parameters (or the
    policy gave such actions): a diverged model can neither learn nor act, and saving it would
    replace the last good checkpoint."""
    parts = agent.nonfinite_parts()
    if not parts and not nonfinite_actions:
        return
    what = (f"the {' and the '.join(parts)} parameters hold NaN or inf" if parts else
            "the policy gave NaN or inf actions")
    raise TrainingDiverged(
        f"training diverged by step {counters.step} ({counters.updates} updates): {what}, so the agent can "
        f"neither learn nor act any more. {last_checkpoint_kept(paths)}. Usual causes: learning rates "
        f"too high for the task (model_lr {config.model_lr}, actor_lr {config.actor_lr}, critic_lr "
        f"{config.critic_lr}; the paper's are 1e-4, 3e-5 and 3e-5), a large reward_scale ({config.reward_scale}), "
        "or rewards or observations of huge magnitude (reward_clip, or scale them in the env). Lower those and "
        "run the same command again: it resumes from the last checkpoint (or starts afresh without one).")


def save(config: Config, agent: Agent, counters: Counters, replay: Replay, paths: RunPaths, dist: Dist,
         logger: Logger, prefetch: Optional[Prefetcher] = None) -> None:
    """Flush replay chunks (every rank), then rank 0 writes latest.pt atomically (never a diverged
    agent: TrainingDiverged instead)."""
    replay.flush()
    check_not_diverged(config, agent, counters, paths)
    if dist.main:
        replay_rng = prefetch.consumed_rng_state() if prefetch is not None else None
        ckpt.save_checkpoint(paths.checkpoint, checkpoint_state(config, agent, counters, replay, replay_rng, dist.world))
        logger.info(f"saved checkpoint {paths.checkpoint} at step {counters.step}")


SIZE_KEYS = ["rssm.deter", "rssm.hidden", "rssm.stoch", "rssm.classes", "encoder.cnn_depth",
             "encoder.mlp_units", "encoder.mlp_layers", "decoder.cnn_depth", "decoder.mlp_units",
             "decoder.mlp_layers", "reward_head.units", "reward_head.layers", "reward_head.bins",
             "cont_head.units", "cont_head.layers", "actor.units", "actor.layers", "critic.units",
             "critic.layers", "critic.bins"]  # actor_dist: fixed by the action space, which restore checks


def load_resume_state(paths: RunPaths, device: torch.device, logger: Logger, evaluating: bool = False
                      ) -> tuple[dict, Path]:
    """The checkpoint named by paths.resume_from (or its .prev fallback) and the file it came from."""
    state, source = ckpt.load_checkpoint_and_source(paths.resume_from, map_location=device, warn=logger.warning,
                                                    evaluating=evaluating)
    ckpt.check_run_checkpoint(state, source)
    return state, source


def restore(config: Config, agent: Agent, replay: Replay, paths: RunPaths, device: torch.device,
            logger: Logger, world: int = 1, loaded: tuple[dict, Path] | None = None) -> Counters:
    """Load the checkpoint named by paths.resume_from (or the already `loaded` state) into the
    agent; return its counters. `world`: this run's number of data-parallel processes."""
    state, source = loaded if loaded is not None else load_resume_state(paths, device, logger, config.eval_only)
    if not config.eval_only:
        check_same_task(state["config"], config, source)
    check_same_spaces(state.get("spaces"), describe_spaces(agent.obs_space, agent.act_space), source,
                      state["config"].get("task", config.task), config.task, config.eval_only)
    ckpt.check_config_sizes(state["config"], config.to_dict(), SIZE_KEYS, evaluating=config.eval_only)
    modules = ("wm", "task", "expl")  # optimizer state is shaped by these; a fresh agent has none yet
    try:
        ckpt.check_shapes({k: state["agent"].get(k) or {} for k in modules},
                          {k: agent.state_dict().get(k) or {} for k in modules}, hints=shape_hints(config))
    except ckpt.CheckpointMismatch as error:  # e.g. other encoder keys: name the settings that changed
        changes = [c for c in changed_settings(state["config"], config.to_dict()) if shapes_model(c.split(" ", 1)[0])]
        if not changes:
            raise
        raise ckpt.CheckpointMismatch(
            f"the checkpoint {source} holds a model of other shapes than this config builds, because "
            f"settings that shape the model differ from the checkpoint's: {'; '.join(changes)}. Resume "
            f"with the checkpoint's values (its config.yaml), or start a fresh run in a new --logdir. "
            f"(The first parameter that differs: {error.detail}.)") from None
    agent.load_state_dict(state["agent"])
    counters = Counters(**state["counters"])
    ckpt.restore_rng_states(state["rng"])
    replay.set_rng_state(state["replay_rng"])
    if config.eval_only:
        logger.info(f"loaded {source} (step {counters.step}, {counters.updates} updates) to evaluate it; logs in "
                    f"{paths.logdir / 'eval_only'}")
    else:
        logger.info(f"resumed from {source} at step {counters.step} ({counters.updates} updates)")
    changes = changed_settings(state["config"], config.to_dict())
    if config.eval_only:  # only what changes an evaluation (not steps, train_ratio, eval_only itself...)
        changes = [c for c in changes if changes_evaluation(c.split(" ", 1)[0])]
    if changes:
        logger.info("settings changed since the checkpoint: " + ", ".join(changes))
    saved_world = int(state.get("world", state["config"].get("parallel", 1)))
    if not config.eval_only:  # an evaluation trains nothing; a training run trains the later steps again
        restart_update_schedule(counters, state["config"], saved_world, config, world, logger)
        dropped = logger.rewind(counters.step)
        if dropped:
            logger.info(f"metrics.jsonl: moved {dropped} records logged after step {counters.step} "
                        "to metrics.dropped.jsonl")
    return counters


def keep_checkpoint_passed_over(paths: RunPaths, logger: Logger) -> list[Path]:
    """A resume from another file (e.g. --from_checkpoint <logdir>/latest.prev.pt, or another run's
    latest.pt) in a folder with checkpoints of its own would overwrite them with this run's first two
    saves (latest.pt, rotated to latest.prev.pt): keep each one that is not the file resumed from,
    under latest.step<N>.pt (a hard link, no copy), and say so. A resume from the folder's own
    latest.pt keeps nothing: its saves rotate as an uninterrupted run's do. Returns the kept paths."""
    requested = paths.resume_from
    if requested is None or requested.resolve() == paths.checkpoint.resolve():
        return []
    kept = []
    for own in (paths.checkpoint, ckpt.previous_path(paths.checkpoint)):
        if own.is_file() and requested.resolve() != own.resolve():
            kept.append(keep_checkpoint_as_step(own, requested, logger))
    return kept


def keep_checkpoint_as_step(own: Path, requested: Path, logger: Logger) -> Path:
    """Hard-link (else copy) the checkpoint `own` to latest.step<N>.pt beside it, N its step, unless
    that name exists; says so. Returns the kept path."""
    try:
        name = f"latest.step{int(ckpt.read_checkpoint(own)['counters']['step'])}.pt"
    except Exception:  # noqa: BLE001 -- unreadable: kept all the same, under a name that says so
        name = f"{own.stem}.unreadable.pt"
    kept = own.with_name(name)
    if kept.exists():
        return kept
    try:
        os.link(own, kept)
    except OSError:
        shutil.copy2(own, kept)
    logger.info(f"{own} is not the checkpoint this run resumes from ({requested}) and this run's saves would "
                f"overwrite it: it is kept as {kept}")
    return kept


def count_unsaved_replay(counters: Counters, steps_on_disk: int, logger: Optional[Logger]) -> int:
    """Every step a run takes is stored once (one per env per iteration), so at each checkpoint the
    replay folder holds counters.step steps, plus those counted here before. More on disk means the
    previous run went on after its last checkpoint and stopped without saving: those steps stay in
    the replay as training data, and the run continues from the checkpoint's step. Says so once
    (`logger`: the main rank's) and returns how many there were."""
    unsaved = steps_on_disk - counters.step - counters.replay_unsaved
    if unsaved <= 0:  # none (fewer: chunks were lost or skipped, which their own warnings report)
        return 0
    counters.replay_unsaved += unsaved
    if logger is not None:
        logger.info(
            f"replay: {unsaved} of its steps were collected after the checkpoint's step {counters.step} (by a run "
            "that stopped without saving, e.g. kill -9 or a crash, or one whose later checkpoint this resume "
            "passed over); they stay in the replay as training data, and training and the logs continue "
            f"from step {counters.step}")
    return unsaved


def stored_step_bytes(obs_space: dict, action_dim: int) -> int:
    """Bytes of one step as the replay stores it: the observations (float64 as float32), the float32
    action and reward, the three flags."""
    def stored_bytes(space: Any) -> int:
        dtype = np.dtype(np.float32 if space.dtype == np.float64 else space.dtype)
        return int(np.prod(space.shape)) * dtype.itemsize

    observations = sum(stored_bytes(space) for key, space in obs_space.items() if not key.startswith("log_"))
    return observations + 4 * action_dim + 4 + 3


def check_replay_fits(replay: Replay, obs_space: dict, action_dim: int) -> None:
    """The replay loaded from the run folder must hold the steps this run stores: the env's
    observations and this agent's actions. An earlier run in the folder with other env options or
    another task (and no checkpoint left to say so) would otherwise fail at the first step stored,
    after the folder's curves were already moved aside."""
    stored = replay.step_shapes()
    if not stored:
        return
    expected = {key: tuple(space.shape) for key, space in obs_space.items() if not key.startswith("log_")}
    expected.update({"action": (action_dim,), "reward": (), "is_first": (), "is_last": (), "is_terminal": ()})
    differ = [f"'{key}' {stored.get(key, 'absent')} in the replay, {expected.get(key, 'absent')} in this run"
              for key in sorted(set(stored) | set(expected)) if stored.get(key) != expected.get(key)]
    if differ:
        raise RunError(
            f"the replay in {replay.directory} was recorded with other observations or actions than this run's "
            f"env and agent give: {'; '.join(differ)}. It comes from an earlier run in this folder (another task, "
            "other env options or env code). Train in a new --logdir, or move that replay folder aside to start "
            "afresh here; nothing in the folder was changed.")


def check_same_task(saved: dict, config: Config, source: Path) -> None:
    """Training on from a checkpoint of another task mixes the two in one agent and one replay."""
    if saved.get("task", config.task) != config.task:
        raise ckpt.CheckpointMismatch(
            f"the checkpoint {source} was trained on task {saved['task']}, but this run asks for "
            f"--task {config.task}. Resume with --task {saved['task']}, or train {config.task} in a "
            f"new --logdir (this folder's replay holds {saved['task']}'s episodes).")


MODEL_PARTS = ("rssm.", "encoder.", "decoder.", "reward_head.", "cont_head.", "actor.", "critic.", "plan2explore.",
               f"{config_lib.ENV_OPTIONS}.")  # an env option can change the observations' shapes


def shapes_model(key: str) -> bool:
    """Whether config key `key` can change the shapes of the agent's parameters (a mismatch on resume
    names only these): the model's parts, the suite's options, the actor's distribution, the behaviour."""
    return key.startswith(MODEL_PARTS) or key in ("actor_dist", "behavior", "slow_value_target")


def changes_evaluation(key: str) -> bool:
    """Whether config key `key` can make an evaluation of a checkpoint differ from one under the
    config it was trained with (what --eval_only lists as changed)."""
    return shapes_model(key) or key in ("task", "action_repeat", "time_limit", "reward_clip", "eval_sample",
                                        "precision")


def changed_settings(saved: dict, current: dict) -> list[str]:
    """'key old -> new' for every config key whose value differs from the checkpoint's config (the
    run folder and checkpoint paths aside; keys the saved config lacks are ones an older version did
    not have), then the task's suite's env options (`changed_env_options`)."""
    changes = []
    for key in config_lib.flat_keys(current):
        if key.startswith(f"{config_lib.ENV_OPTIONS}.") or key in ("logdir", "from_checkpoint"):
            continue
        old, new = config_lib.lookup(saved, key, None), config_lib.lookup(current, key)
        if old is not None and old != new:
            changes.append(f"{key} {old} -> {new}")
    return changes + changed_env_options(saved, current)


NOT_SET = "(not set)"


def changed_env_options(saved: dict, current: dict) -> list[str]:
    """The task's suite's options (env.<suite>, an open mapping) that differ, each as its constructor
    gets it: an option given on one side only counts as the constructor's default on the other (so a
    checkpoint of a version without a later option is unchanged), '(not set)' where it has none.
    Other suites' options cannot change this run and are left out."""
    import envs

    suite = str(current.get("task", "")).partition("_")[0]
    group = f"{config_lib.ENV_OPTIONS}.{suite}"
    old_options = config_lib.lookup(saved, group, None) or {}
    new_options = config_lib.lookup(current, group, None) or {}
    defaults = envs.constructor_defaults(envs.REGISTRY[suite]) if suite in envs.REGISTRY else {}
    changes = []
    for key in dict.fromkeys([*new_options, *old_options]):
        old, new = (options.get(key, defaults.get(key, NOT_SET)) for options in (old_options, new_options))
        if envs.plain_option(old) != envs.plain_option(new):
            changes.append(f"{group}.{key} {old} -> {new}")
    return changes


def shape_hints(config: Config) -> dict[str, str]:
    """Parameter-name fragments -> config keys, so a shape mismatch names the key to change."""
    return {
        "rssm": f"rssm.deter={config.rssm.deter}, rssm.hidden={config.rssm.hidden}, "
                f"rssm.stoch={config.rssm.stoch}, rssm.classes={config.rssm.classes}",
        "encoder": f"encoder.cnn_depth={config.encoder.cnn_depth}, encoder.mlp_units={config.encoder.mlp_units}",
        "decoder": f"decoder.cnn_depth={config.decoder.cnn_depth}, decoder.mlp_units={config.decoder.mlp_units}",
        "actor": f"actor.units={config.actor.units}, actor.layers={config.actor.layers}",
        "critic": f"critic.units={config.critic.units}, critic.layers={config.critic.layers}",
    }


# ------------------------------------------------------------------------------------------- the loop


class Interrupt:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so it can stop at a clean point."""

    def __init__(self, announce: bool = True):
        self.announce = announce  # False on ranks after the first: rank 0 says it once for all
        self.requested = False
        self.signal: Optional[int] = None  # the first stop request's signal
        self.shielded = False  # while the final checkpoint is written, a further Ctrl-C waits
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.shielded:
            sys.stderr.write("\nsaving the checkpoint; the run stops when it is written\n")
            return
        if self.requested and self.signal is not None:  # a second Ctrl-C here: stop at once (the run still saves)
            raise KeyboardInterrupt
        self.requested, self.signal = True, signum
        if self.announce:
            again = "press Ctrl-C again" if signum == signal.SIGINT else "a second SIGTERM or Ctrl-C"
            sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after the current step (an "
                             f"evaluation in progress is cut short) and saving; {again} to stop at once\n")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def exit_code(self) -> int:
        """0 for a run that ended by itself; 128 + the signal's number (130 for Ctrl-C, 143 for
        SIGTERM) for one stopped by a signal, as shells report a process a signal ended, so that a
        script or scheduler can tell a stopped run (saved, resumable) from a finished one."""
        return 0 if self.signal is None else 128 + int(self.signal)


class MetricSums:
    """Sums train metrics as device tensors; one host sync per log interval."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def means(self) -> dict[str, float]:
        if not self.count:
            return {}
        keys = list(self.sums)
        values = torch.stack([self.sums[k].reshape(()) for k in keys]).cpu().numpy() / self.count
        self.sums, self.count = {}, 0
        return dict(zip(keys, values.tolist()))


def updates_due(counters: Counters, config: Config, world: int) -> int:
    """Updates owed so far: (steps since training began) x train_ratio / (batch_size x batch_length),
    with the replayed steps of all ranks counted (each rank's update consumes one batch)."""
    if counters.train_start < 0:
        return 0
    steps = counters.step - counters.train_start
    replayed_per_update = config.batch_size * config.batch_length * world
    return counters.schedule_updates + int(steps * config.train_ratio / replayed_per_update) + 1


def updates_per_step(train_ratio: float, batch_size: int, batch_length: int, world: int) -> float:
    """Gradient updates per agent step: train_ratio / (batch_size x batch_length x processes)."""
    return train_ratio / (batch_size * batch_length * world)


def restart_update_schedule(counters: Counters, saved: dict, saved_world: int, config: Config, world: int,
                            logger: Logger) -> None:
    """A resume whose train_ratio, batch size or number of processes (`saved_world` -> `world`,
    also under torchrun) changes the updates per step applies the new rate from the resume's step
    on: without this, the new rate counted from the start of training would owe (or refuse)
    thousands of updates before the next env step."""
    before = updates_per_step(saved["train_ratio"], saved["batch_size"], saved["batch_length"], saved_world)
    now = updates_per_step(config.train_ratio, config.batch_size, config.batch_length, world)
    if counters.train_start < 0 or math.isclose(before, now):
        return
    counters.train_start, counters.schedule_updates = counters.step, counters.updates - 1
    logger.info(f"updates per agent step changed from {before:.4g} to {now:.4g} (train_ratio "
                f"{saved['train_ratio']} -> {config.train_ratio}, batch {saved['batch_size']} x "
                f"{saved['batch_length']} -> {config.batch_size} x {config.batch_length}, processes "
                f"{saved_world} -> {world}): the new rate applies from step "
                f"{counters.step} on ({counters.updates} updates so far)")


def passed_a_multiple(step: int, last: int, every: int) -> bool:
    """Whether a log, save or evaluation every `every` steps is due at `step`, the last one made at
    `last`: the count has reached a multiple of `every` that it had not reached then. So they keep to
    the multiples of `every` (the first step at or after each, when several steps pass per
    iteration), also after an extra one made off the grid: the final log and save of a run stopped
    by Ctrl-C, a save after save_every_minutes. `every` 0: never."""
    return every > 0 and step // every > last // every


class Trainer:
    """Owns the run's objects and runs the act / store / train loop."""

    def __init__(self, config: Config, dist: Dist = Dist(), sync: Optional[DistSync] = None):
        self.config, self.dist, self.sync = config, dist, sync
        self.paths = resolve_paths(config)
        self.lock = lock_run_folder(self.paths, dist, config.eval_only)  # before anything is written there
        self.logger = make_logger(config, self.paths, dist)
        self.device = tools.resolve_device(config.device)
        self.threads = tools.set_threads(config.threads, processes=dist.world)
        self.keeps_freed_memory = tools.keep_freed_cpu_memory()
        tools.use_tf32_on_cuda(self.device, config.deterministic)
        tools.set_seed(rank_seed(config, dist.rank), config.deterministic)
        self.pool = None
        self.wants_video = bool(config.video)  # False once render() has raised or given no frame
        self.warned: set[str] = set()  # warnings and notes given (each evaluation would repeat them)

    def compute_summary(self) -> str:
        """One line: where the update runs and how (threads picked, CUDA graphs)."""
        if self.device.type == "cpu":
            how = f"torch threads {self.threads}" + (" (--threads 0: the cores idle at start)"
                                                     if self.config.threads == 0 else "")
            how += ", freed memory kept for reuse" if self.keeps_freed_memory else ""
        else:
            how = "CUDA graphs" if self.agent.graph_update is not None else "eager updates"
        return f"training on {self.device}: {how}, precision {self.config.precision}"

    def setup(self) -> None:
        config, dist = self.config, self.dist
        self.first_env = dist.rank * config.envs.amount  # global index of this rank's first env
        resumed = (None if self.paths.resume_from is None else
                   load_resume_state(self.paths, self.device, self.logger, config.eval_only))
        self.loaded_from = None if resumed is None else resumed[1]  # the file read (a .prev after a fallback)
        resumed_step = 0 if resumed is None else int(resumed[0]["counters"]["step"])
        # a resumed run's train envs get new seeds, or they would replay the first run's episodes
        seed_shift = 100_003 * resumed_step
        if config.eval_only:  # one env for the spaces; each evaluation makes its own eval envs
            self.pool = make_env_pool(config, "eval", 1, 0, self.logger)
        else:
            self.pool = make_env_pool(config, "train", config.envs.amount, self.first_env, self.logger, seed_shift)
        self.agent = make_agent(config, self.pool.obs_space, self.pool.act_space, self.device,
                                rank_seed(config, dist.rank))
        if not config.eval_only:
            check_batch_memory(config.batch_size, config.batch_length,
                               stored_step_bytes(self.pool.obs_space, self.agent.action_dim))
        from networks import unusable_keys_warning, unused_keys_note

        warning = unusable_keys_warning(self.pool.obs_space, config.encoder)
        note = unused_keys_note(self.pool.obs_space, config.encoder)
        if warning and dist.main:
            self.logger.warning(warning)
        if note and dist.main:
            self.logger.info(note)
        if self.sync is not None:  # data-parallel: act as one learner over all ranks' batches
            # its collectives run between the CUDA graphs of a captured update (or at once, eagerly)
            self.agent.set_grad_sync(self.sync.grads, graph_safe=True)
            self.agent.set_return_gather(self.sync.gather, graph_safe=True)
            self.agent.set_capture_agreement(lambda ok: self.sync.agree(ok, self.device))
            self.sync.broadcast([m for m in (self.agent.wm, self.agent.task, self.agent.expl) if m is not None])
        self.logger.info(self.compute_summary())
        self.replay = make_replay(config, self.paths, dist, self.logger.warning, resumed_step)
        self.counters = Counters()
        if resumed is not None:
            self.counters = restore(config, self.agent, self.replay, self.paths, self.device, self.logger,
                                    dist.world, resumed)
            if dist.rank > 0:
                reseed_resumed_rank(config, self.agent, self.replay, dist.rank, self.counters.step)
        # an --eval_only run trains nothing: its replay stays on disk, unread
        loaded = 0 if config.eval_only else self.replay.load(keep_worker=lambda worker: worker % dist.world == dist.rank)
        loaded = self.sum_over_ranks(loaded)  # every rank's share
        check_replay_fits(self.replay, self.pool.obs_space, self.agent.action_dim)
        if resumed is None and not config.eval_only:  # a fresh run in a folder an earlier one left
            dropped = self.logger.rewind(0)  # without a checkpoint: its curves are not this run's
            if dropped:
                self.logger.info(f"metrics.jsonl: moved {dropped} records of an earlier run in this folder, "
                                 "which left no checkpoint, to metrics.dropped.jsonl; this run starts at step 0")
        if loaded:
            self.logger.info(f"replay: loaded {loaded} steps from {self.replay.directory}")
        if resumed is not None and not config.eval_only and dist.main:
            keep_checkpoint_passed_over(self.paths, self.logger)
        if resumed is not None and not config.eval_only and self.replay.steps_on_disk:
            count_unsaved_replay(self.counters, self.replay.steps_on_disk, self.logger if dist.main else None)
        elif resumed is not None and self.counters.step > 0 and not config.eval_only:
            self.logger.warning(
                f"resumed at step {self.counters.step} but {self.replay.directory} holds no replay: "
                "training waits for batch_length new steps and then trains on those alone. A run "
                "resumed from another folder's checkpoint does not bring its replay along: copy that "
                "run's replay/ folder into this one to keep it.")
        self.prefetch: Optional[Prefetcher] = None
        self.metrics = MetricSums()
        self.tracker = EpisodeTracker(len(self.pool))

    # -- schedule
    def should_eval(self) -> bool:
        return passed_a_multiple(self.counters.step, self.counters.last_eval, self.config.eval_every)

    def should_eval_at_end(self) -> bool:
        c = self.config
        return c.eval_every > 0 and self.counters.last_eval < self.counters.step >= c.steps

    def should_log(self) -> bool:
        return passed_a_multiple(self.counters.step, self.counters.last_log, self.config.log_every)

    def should_save(self, last_save_time: float) -> bool:
        c = self.config
        by_steps = passed_a_multiple(self.counters.step, self.counters.last_save, c.save_every)
        by_time = c.save_every_minutes > 0 and time.time() - last_save_time >= 60 * c.save_every_minutes
        return by_steps or by_time

    # -- parts of one iteration
    def act(self, observations: list[dict], state: Optional[PolicyState], prefill: bool
            ) -> tuple[np.ndarray, Optional[PolicyState]]:
        if prefill:
            return self.agent.random_actions(len(self.pool)), state
        actions, state = self.agent.policy(stack_obs(observations), state, "train")
        if not np.all(np.isfinite(actions)):  # on the host already: no sync of its own
            check_not_diverged(self.config, self.agent, self.counters, self.paths, nonfinite_actions=True)
        return actions, state

    def store(self, observations: list[dict], actions: np.ndarray) -> list[dict[str, float]]:
        import envs

        finished = []
        for index, obs in enumerate(observations):
            where = f"env {self.first_env + index} at step {self.counters.step}"
            envs.check_running_step(obs, where)
            try:
                self.replay.add(to_transition(obs, actions[index]), worker=self.first_env + index)
            except (KeyError, ValueError) as error:  # its keys or shapes changed during the run
                raise envs.EnvCheckError(f"{where}: {error.args[0]}") from None
            summary = self.tracker.add(index, obs)
            if summary is not None:
                finished.append(summary)
                self.counters.longest_episode = max(self.counters.longest_episode, int(summary["length"]))
        return finished

    def train(self, stop: Callable[[], bool] = lambda: False) -> int:
        """Do the updates owed by train_ratio; returns how many were done. A stop request (`stop()`
        on any rank, checked every STOP_CHECK_UPDATES updates) leaves the rest owed, so a large
        train_ratio cannot hold a Ctrl-C back for the many updates of one step."""
        if self.counters.train_start < 0:
            if self.counters.step < self.config.prefill:
                return 0
            self.counters.train_start = self.counters.step
        if not self.all_ranks(bool(self.replay.windows())):  # e.g. a resume whose replay was lost
            if self.dist.main and "waiting for a sequence" not in self.warned:
                self.warned.add("waiting for a sequence")
                self.logger.info(
                    f"training waits at step {self.counters.step}: no env has stored a sequence of batch_length "
                    f"{self.config.batch_length} steps yet (updates start once one has, and catch up on the "
                    "train_ratio owed since)")
            return 0
        done = 0
        while self.counters.updates < updates_due(self.counters, self.config, self.dist.world):
            if done and done % STOP_CHECK_UPDATES == 0 and not self.all_ranks(not stop()):
                break  # every rank at the same count: the same check, the same break
            if self.prefetch is None:
                self.prefetch = Prefetcher(self.replay, self.config.batch_size, self.device)
            try:
                self.metrics.add(self.agent.train_step(self.prefetch.next()))
            except (MemoryError, RuntimeError) as error:
                if not is_out_of_memory(error):
                    raise
                raise UpdateOutOfMemory(update_out_of_memory_message(self.config, self.device, self.paths, error)) from None
            self.counters.updates += 1
            done += 1
        return done


    def write_log(self, episode_stats: list, interval_start: tuple[float, int, int]) -> None:
        start_time, start_step, start_updates = interval_start
        elapsed = max(time.time() - start_time, 1e-9)
        logger = self.logger
        logger.scalar("perf/fps", (self.counters.step - start_step) / elapsed)
        logger.scalar("perf/train_updates_per_s", (self.counters.updates - start_updates) / elapsed)
        logger.scalar("perf/updates", self.counters.updates)
        logger.scalar("perf/replay_steps", self.sum_over_ranks(len(self.replay)))
        stats = self.gather_episode_stats(episode_stats)
        self.counters.episodes += len(stats)
        logger.scalar("perf/episodes", self.counters.episodes)
        if stats:
            logger.scalar("episode/return", float(np.mean([s["return"] for s in stats])))
            logger.scalar("episode/length", float(np.mean([s["length"] for s in stats])))
            for key in sorted({k for s in stats for k in s if k not in ("return", "length")}):
                if not key.startswith("achievement_"):
                    logger.scalar(f"episode/{key}", float(np.mean([s[key] for s in stats if key in s])))
        logger.scalars(self.tracker.achievement_metrics())
        logger.scalars(self.metrics.means())
        logger.write(self.counters.step)
        episode_stats.clear()

    def gather_episode_stats(self, episode_stats: list) -> list:
        """Episode summaries of every rank (rank 0 logs them)."""
        if self.dist.world == 1:
            return list(episode_stats)
        import torch.distributed as torch_dist

        gathered: list = [None] * self.dist.world
        torch_dist.all_gather_object(gathered, list(episode_stats))
        return [s for part in gathered for s in part]

    def make_eval_pool(self, amount: int) -> EnvPool:
        """This rank's eval envs (indices from rank x envs.amount, like its train envs'). Any failure
        to start them is an EnvStartError, which a training run saves its progress for before it
        stops (a failed start-up check keeps its own paragraph)."""
        from envs.checker import EnvCheckError, MissingDependency

        try:
            return make_env_pool(self.config, "eval", amount, self.dist.rank * self.config.envs.amount, self.logger)
        except (EnvCheckError, MissingDependency) as error:
            raise EnvStartError(str(error)) from None

    def run_eval(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Evaluate on fresh eval envs (the same seeds every time, apart from the train envs'), each
        rank its share of the episodes (`eval_share`) on its own envs; rank 0 logs the returns of
        all, env 0's video and the world model's open-loop predictions. A stop request (`stop()`)
        on any rank cuts it short: nothing is logged and the evaluation stays due."""
        config, dist = self.config, self.dist
        share = eval_share(config.eval_episode_num, dist.rank, dist.world)
        result = EvalResult()
        longest = int(self._reduce_over_ranks(self.counters.longest_episode, "MAX"))  # one cap for all ranks
        if share:
            step, on_rank = self.counters.step, f" on rank {dist.rank}" if dist.world > 1 else ""
            say = self.logger.info if dist.main else self.logger.warning  # other ranks log warnings only
            with self.make_eval_pool(min(config.envs.amount, share)) as pool:
                result = evaluate(self.agent, pool, share, config.video_length, self.warn_once,
                                  self.wants_video and dist.main, stop, eval_length_cap(config.time_limit, longest),
                                  lambda text: say(
                                      f"evaluation at step {step} still running{on_rank}: {text}; "
                                      "an episode that never ends keeps it running (--time_limit caps "
                                      "episodes; Ctrl-C stops the run and saves)"))
        gathered = self.gather_eval(result)
        if not gathered.completed:
            self.logger.info(f"evaluation stopped by the stop request after {len(gathered.returns)} of "
                             f"{config.eval_episode_num} episodes (not logged)")
            return
        if gathered.abandoned:
            message = eval_abandoned(config, self.counters.step, longest, gathered.abandoned)
            if config.eval_only:  # the evaluation was the whole run
                raise RunError(message)
            if dist.main:
                self.logger.warning(message)
            self.counters.last_eval = self.counters.step  # tried: the next one is due eval_every later
            return
        log_eval(config, gathered.returns, gathered.lengths, gathered.logs, result.frames, self.logger)
        if self.wants_video and result.render_ok and not result.frames and dist.main:
            self.logger.info("no eval video: the env has no render() (or it gives no frame) and no 'image' "
                             "observation (training is not affected)")
        if result.frames_from_image and dist.main:
            self.warn_once("eval video: the env has no render() (or it gives no frame), so the video shows its "
                           "'image' observation; give the env a render() returning an (H, W, 3) uint8 frame "
                           "for another view", level="info")
        if not (result.render_ok and result.frames):  # a raising render() is logged once by evaluate
            self.wants_video = False  # later evaluations record no video
        if config.video and self.prefetch is not None and dist.main:
            for name, video in self.agent.report(self.prefetch.next()).items():
                self.logger.video(name, video[None] if video.ndim == 4 else video)
        self.counters.last_eval = self.counters.step
        self.logger.write(self.counters.step)

    def warn_once(self, text: str, level: str = "warning") -> None:
        """A warning (or an info line: level 'info') into train.log, the first time only."""
        if text not in self.warned:
            self.warned.add(text)
            getattr(self.logger, level)(text)

    def gather_eval(self, result: EvalResult) -> EvalResult:
        """Every rank's returns, lengths and log_ values; completed if every rank completed its
        share, abandoned if one did (the longest such episode). Frames stay this rank's."""
        if self.dist.world == 1:
            return result
        import torch.distributed as torch_dist

        gathered: list = [None] * self.dist.world
        torch_dist.all_gather_object(
            gathered, (result.returns, result.lengths, result.logs, result.completed, result.abandoned))
        return EvalResult(returns=[r for part in gathered for r in part[0]],
                          lengths=[n for part in gathered for n in part[1]],
                          logs=[e for part in gathered for e in part[2]], frames=result.frames,
                          render_ok=result.render_ok, frames_from_image=result.frames_from_image,
                          completed=all(part[3] for part in gathered),
                          abandoned=max(part[4] for part in gathered))

    def loop(self, interrupt: Interrupt) -> None:
        config, counters, logger = self.config, self.counters, self.logger
        steps_per_iter = len(self.pool) * self.dist.world
        state = None
        actions = self.agent.random_actions(len(self.pool))
        observations = None
        episode_stats: list = []
        interval = (time.time(), counters.step, counters.updates)
        last_save_time = time.time()
        last_return: Optional[float] = None  # of the last finished training episode
        pace = Pace(counters.step)  # the progress line's rate: stepping only
        while counters.step < config.steps and not self.stop_requested(interrupt):
            observations = self.pool.step(actions)
            finished = self.store(observations, actions)
            if finished:
                last_return = finished[-1]["return"]
            episode_stats.extend(finished)
            was_prefill = counters.step < config.prefill
            counters.step += steps_per_iter
            prefill = counters.step < config.prefill
            if was_prefill and not prefill:
                pace.restart(counters.step)  # the random steps' pace says nothing of the training's
            self.train(stop=lambda: interrupt.requested)
            actions, state = self.act(observations, state, prefill)
            pace.add(counters.step)
            paused = time.time()
            if self.should_log():
                self.write_log(episode_stats, interval)  # the NaN losses, if any, reach the curves first
                check_not_diverged(config, self.agent, counters, self.paths)
                interval = (time.time(), counters.step, counters.updates)
                counters.last_log = counters.step
            if self.should_eval():
                self.run_eval(stop=lambda: interrupt.requested)
            if self.should_save(last_save_time):
                counters.last_save = counters.step
                save(config, self.agent, counters, self.replay, self.paths, self.dist, logger, self.prefetch)
                last_save_time = time.time()
            pace.pause(time.time() - paused)
            if self.dist.main:
                logger.progress(counters.step, config.steps, pace.rate(), last_return, estimate=not prefill)
        if counters.step > max(counters.last_log, interval[1]):  # the same on every rank
            self.write_log(episode_stats, interval)  # the last, partial interval (a stop request)
            counters.last_log = counters.step

    def stop_requested(self, interrupt: Interrupt) -> bool:
        """Ctrl-C/SIGTERM on any rank stops all ranks at the same iteration (each then reports a
        stop, not a finished run)."""
        stop = not self.all_ranks(not interrupt.requested)
        if stop and not interrupt.requested:  # e.g. SIGTERM to one rank's pid: say it once, on rank 0
            if self.dist.main:
                self.logger.info("another rank got a stop request (Ctrl-C or SIGTERM): every rank stops after "
                                 "this step, and rank 0 saves")
        elif stop and interrupt.signal is not None and self.dist.main:  # the console's notice, into train.log
            self.logger.info(f"{signal.Signals(interrupt.signal).name} at step {self.counters.step}: stopping "
                             "after this step and saving")
        interrupt.requested = interrupt.requested or stop
        return stop

    def _reduce_over_ranks(self, value: float, op: str) -> float:
        """`value` reduced over the ranks with torch.distributed.ReduceOp.<op> (itself in one process)."""
        if self.dist.world == 1:
            return value
        import torch.distributed as torch_dist

        tensor = torch.tensor([float(value)], dtype=torch.float64)
        torch_dist.all_reduce(tensor, op=getattr(torch_dist.ReduceOp, op))
        return float(tensor.item())

    def all_ranks(self, flag: bool) -> bool:
        """True when `flag` holds on every rank (so all ranks take the same branch together)."""
        return self._reduce_over_ranks(float(flag), "MIN") > 0

    def sum_over_ranks(self, count: int) -> int:
        """`count` summed over the ranks (each rank's replay holds its own envs' steps)."""
        return int(self._reduce_over_ranks(count, "SUM"))

    def close(self) -> None:
        for thing in (getattr(self, "prefetch", None), self.pool):
            if thing is not None:
                thing.close()
        self.logger.close()
        if self.lock is not None:
            self.lock.release()


def train(config: Config, dist: Dist = Dist(), sync: Optional[DistSync] = None,
          interrupt: Optional[Interrupt] = None) -> Counters:
    """Set up, resume if there is a checkpoint, run the loop, save at the end (and on Ctrl-C).
    `interrupt` (made here if not given) tells the caller afterwards whether a signal stopped it."""
    trainer = Trainer(config, dist, sync)
    logger = trainer.logger
    with (interrupt or Interrupt()) as interrupt:  # Ctrl-C / SIGTERM from here on: stop at a clean point and save
        try:
            return run_training(trainer, interrupt)
        except Exception as error:
            if is_user_error(error):  # into train.log; main() prints it once on stderr
                logger.error(str(error), echo=False)
            else:  # into train.log; Python prints the traceback once on stderr
                logger.error(f"{type(error).__name__}: {error}\n{traceback.format_exc()}", echo=False)
            raise
        finally:
            interrupt.shielded = True  # a late Ctrl-C does not cut the closing of envs and logs
            trainer.close()


def run_training(trainer: Trainer, interrupt: Interrupt) -> Counters:
    """setup, then evaluate only, or train to config.steps (or a stop request) and save."""
    from envs import EnvGaveUp

    config, dist, logger = trainer.config, trainer.dist, trainer.logger
    trainer.setup()
    if dist.main and not config.eval_only:  # after resume accepted the checkpoint
        write_config(config, trainer.paths.logdir)
        logger.info(f"logs in {trainer.paths.logdir.resolve()}: {follow_hint(trainer.paths)}")
    if config.eval_only:
        episodes = tools.plural(config.eval_episode_num, "episode")
        logger.info(f"eval_only: evaluating {trainer.loaded_from} for {episodes}")
        try:
            trainer.run_eval(stop=lambda: interrupt.requested)
        except EnvGaveUp as error:  # an --eval_only run saves nothing: only the paragraph
            log_gave_up(trainer, error)
            raise RunError(f"{failure_summary(error)} (the tracebacks are in {tracebacks_at(trainer.logger)}). Fix "
                           f"the env and run the command again{more_restarts_hint(error)}.") from None
        return trainer.counters
    if trainer.counters.step >= config.steps:
        logger.info(f"nothing to train: the run is at step {trainer.counters.step}, at or past --steps "
                    f"{config.steps}; raise --steps to train further")
    try:
        trainer.loop(interrupt)
        if trainer.should_eval_at_end() and not interrupt.requested:  # every rank: each evaluates its share
            trainer.run_eval(stop=lambda: interrupt.requested)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, but still save
        interrupt.requested = True
    except EnvGaveUp as error:  # an env that keeps failing: keep the progress, then say so
        interrupt.shielded = True
        raise env_gave_up(trainer, error) from None
    except (TrainingDiverged, UpdateOutOfMemory, LogWriteError):  # the env's steps are good data: on disk, the model unsaved
        interrupt.shielded = True
        trainer.replay.flush()
        raise
    except EnvStartError as error:  # e.g. an evaluation's env that fails to start: keep the progress too
        interrupt.shielded = True
        raise RunError(f"{error} {save_progress(trainer)}, and the same command resumes from it.") from None
    interrupt.shielded = True
    if trainer.counters.last_save != trainer.counters.step:  # else saved at this very step
        trainer.counters.last_save = trainer.counters.step
        save(config, trainer.agent, trainer.counters, trainer.replay, trainer.paths, dist, logger, trainer.prefetch)
    if interrupt.requested and not ckpt.has_checkpoint(trainer.paths.checkpoint):
        logger.info(f"stopped at step {trainer.counters.step}, before the first checkpoint: nothing to "
                    "resume; the same command starts the run afresh")
    elif interrupt.requested:
        logger.info(f"stopped at step {trainer.counters.step}; to resume, {resume_hint(trainer.paths)}")
    else:
        logger.info(f"finished: {trainer.counters.step} steps, {trainer.counters.updates} updates"
                    f"{no_updates_hint(config, trainer.counters)}")
    return trainer.counters


def no_updates_hint(config: Config, counters: Counters) -> str:
    """Why a finished run trained nothing: its steps ended within the random prefill, or before one
    sequence of batch_length steps was stored; '' for a run that trained."""
    if counters.updates or config.eval_only:
        return ""
    if counters.step <= int(config.prefill):
        return (f" (no training: --steps {config.steps} ends within the prefill of {config.prefill} random "
                "agent steps; raise --steps past it, or lower --prefill)")
    return (f" (no training: no env stored a sequence of --batch_length {config.batch_length} steps; raise "
            "--steps or lower --batch_length)")


def env_gave_up(trainer: Trainer, error: Exception) -> RunError:
    """Save what the run has (rank 0: the checkpoint; every rank: its replay) after an env failed
    `envs.max_restarts` times in a row, and the paragraph that says so."""
    log_gave_up(trainer, error)  # first: a save that fails (a full disk) must not lose the traceback
    kept = save_progress(trainer)
    return RunError(f"{failure_summary(error)} (the tracebacks are in {tracebacks_at(trainer.logger)}). {kept}: "
                    f"fix the env and {resume_hint(trainer.paths)}{more_restarts_hint(error)}.")


def save_progress(trainer: Trainer) -> str:
    """Save the run where it stands (rank 0: the checkpoint; every rank: its replay) before it stops
    for a failure; the sentence that says what is kept."""
    counters, paths = trainer.counters, trainer.paths
    if counters.last_save != counters.step:
        counters.last_save = counters.step
        save(trainer.config, trainer.agent, counters, trainer.replay, paths, trainer.dist, trainer.logger,
             trainer.prefetch)
    if not trainer.dist.main:
        return "Rank 0 keeps the last checkpoint"
    return f"The run saved its progress: {paths.checkpoint} at step {counters.step}"


def log_gave_up(trainer: Trainer, error: Exception) -> None:
    """The last failure's traceback into train.log (on stderr too on the ranks that write no log)."""
    trainer.logger.error(f"the env pool gave up: {error}", echo=not trainer.dist.main)


def tracebacks_at(logger: Logger) -> str:
    """Where a failure's tracebacks were written: the run's train.log, or stderr on the ranks that
    write no log."""
    return str(logger.logdir / "train.log") if logger.enabled else "this rank's errors above"


def more_restarts_hint(error: Exception) -> str:
    """More restarts help an env that fails now and then, not one whose fresh copy fails to start."""
    from envs import EnvRestartFailed

    if isinstance(error, EnvRestartFailed):
        return ""
    return "; or allow more restarts in a row with --envs.max_restarts N"


def failure_summary(error: Exception) -> str:
    """'env N: failed after ...; its last failure: <the traceback's last line>' of an EnvGaveUp."""
    text = getattr(error, "worker_traceback", "") or str(error)
    last = [line.strip() for line in text.strip().splitlines() if line.strip()][-1:] or ["?"]
    head = str(error).split("\n", 1)[0].removesuffix(" last failure:").rstrip(";")
    return f"{head}; its last failure: {last[0]}"


def follow_hint(paths: RunPaths) -> str:
    """The commands that watch a run, quoted for a shell (a logdir may hold spaces)."""
    return (f"follow with `tail -f {shlex.quote(str(paths.logdir / 'train.log'))}` or "
            f"`tensorboard --logdir {shlex.quote(str(paths.logdir))}`")


def resume_hint(paths: RunPaths) -> str:
    return (f"run the same command again (it resumes from {paths.checkpoint} by itself), or add "
            f"--from_checkpoint {shlex.quote(str(paths.checkpoint))}")


# ---------------------------------------------------------------------------------------------- main


def print_config(config: Config, loaded: config_lib.LoadedConfig) -> None:
    print(f"configs: {' '.join(loaded.blocks) or '(defaults only)'}")
    if loaded.debug_moved:
        print("note: 'debug' is applied after the other blocks (so the run stays tiny); "
              "command-line overrides still come last.")
    print(config_lib.to_yaml(config), end="")


def write_config(config: Config, logdir: Path) -> None:
    logdir.mkdir(parents=True, exist_ok=True)
    (logdir / "config.yaml").write_text(config_lib.to_yaml(config), encoding="utf-8")


def print_help() -> int:
    """--help's text on stdout; a reader that stops early (`--help | head`) is no error."""
    try:
        print(config_lib.help_text(), flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error at exit's flush
        os.close(devnull)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _, _, wants_help = config_lib.parse_argv(argv)
        if wants_help:
            return print_help()
        config, loaded = config_lib.build_config(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    for note in loaded.notes:  # about configs.yaml itself, e.g. a block defined twice
        print(note, file=sys.stderr)
    try:
        check_run_inputs(config)
        if config.parallel > 1 or "WORLD_SIZE" in os.environ:
            import distributed

            return distributed.launch(config, loaded)
        print_config(config, loaded)
        interrupt = Interrupt()
        train(config, interrupt=interrupt)
        return interrupt.exit_code()
    except Exception as error:
        if not is_user_error(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR


NOT_CHECKPOINT_SUFFIXES = {".yaml", ".yml", ".log", ".jsonl", ".json", ".npz", ".txt"}  # a run folder's other files


def check_options_taken(suite: str, cls: Any, options: dict, task: str) -> None:
    """An option for another suite than the task's that its constructor would not take: a misspelling
    that would do nothing in this run and break the next run on that suite."""
    import envs

    rejected = envs.options_not_taken(cls, options)
    if not rejected:
        return
    key = rejected[0]
    close = envs.closest_parameter(cls, key)
    raise RunError(
        f"env.{suite}.{key}: {cls.__name__}, the '{suite}' suite's class, takes no option '{key}'"
        f"{f' (did you mean {close!r}?)' if close else ''}, so it would do nothing (this run's task, {task}, "
        f"is not a {suite} task). Fix or drop --env.{suite}.{key} or its '{key}:' entry under env: "
        f"{{{suite}: ...}} in configs.yaml; the run did not start.")


NAME_MAX_BYTES = 255  # the longest file or folder name Linux, macOS and Windows file systems take


def check_path_names(path: Path, option: str) -> None:
    """A folder or file name longer than the file system allows (in bytes: 'ü' takes two) stops the
    run before anything is written, naming the part; the OS would refuse it deep inside a check."""
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX_BYTES:
            raise RunError(
                f"{option} {path}: the name '{part[:40]}...' is {size} bytes long, and file systems take "
                f"names of at most {NAME_MAX_BYTES} bytes (each non-ASCII letter takes 2-4). Pass a "
                f"{option} with shorter folder names.")


def check_run_inputs(config: Config) -> None:
    """Problems that need no env or model, found before anything is printed or written: a task whose
    suite is not registered, a device this machine lacks, --parallel without GPUs (unless the CPU is
    asked for), a run folder another training run holds, a resume path that does not exist (nor its
    .prev.pt), options for a suite that is
    not registered (a misspelt --env.<suite>.<key> would do nothing)."""
    import difflib

    import envs

    task_suite, _ = envs.parse_task(config.task)
    for suite, options in config.to_dict().get("env", {}).items():
        if suite in envs.REGISTRY and suite != task_suite:  # the task's own suite says so when it is built
            check_options_taken(suite, envs.REGISTRY[suite], options or {}, config.task)
        if suite not in envs.REGISTRY:
            close = difflib.get_close_matches(suite, list(envs.REGISTRY), n=1)
            raise RunError(
                f"env.{suite}: there is no suite '{suite}' in envs.REGISTRY ({', '.join(sorted(envs.REGISTRY))}), "
                f"so its options would reach no env{f': did you mean env.{close[0]}?' if close else '.'} Fix the "
                f"--env.{suite}.<key> option or the env: {{{suite}: ...}} entry in configs.yaml, or register the "
                f"suite in envs/__init__.py.")
    for option, value in (("--logdir", config.logdir), ("--from_checkpoint", config.from_checkpoint)):
        if value:
            check_path_names(Path(value).expanduser(), option)
    # A folder another run holds, said before the config is printed (lock_run_folder takes the lock
    # later; a torchrun rank after the first would find rank 0's lock, so it does not look).
    if not config.eval_only and os.environ.get("RANK", "0") == "0":
        logdir = resolve_paths(config).logdir
        lock = tools.FolderLock(logdir)
        holder = lock.holder()
        if holder is not None:
            raise folder_in_use(logdir, holder, lock.path)
    try:
        device = tools.resolve_device(config.device)
    except ValueError as error:
        raise RunError(str(error)) from None
    if config.precision == "16" and device.type == "cpu":
        raise RunError(
            "--precision 16 (float16 autocast with a loss scaler) is for CUDA: CPUs have no fast float16 "
            "matrix products (a debug run took 3x as long as in float32 here) and the scaler's skipped "
            "steps left the logged gradient norms NaN. On a CPU use --precision bf16 (fast on CPUs with "
            "AMX: amx_bf16 in lscpu) or --precision 32.")
    if int(config.parallel) > 1 and config.device == "auto" and device.type == "cpu":
        raise RunError(
            f"--parallel {config.parallel} trains on {config.parallel} GPUs, but this machine has no CUDA "
            f"device (torch.cuda.is_available() is False). Drop --parallel to train in one process, or "
            f"add --device cpu to run {config.parallel} data-parallel processes on the CPU anyway (gloo; "
            f"each holds its own model, envs and replay, so memory grows {config.parallel}-fold).")
    if config.from_checkpoint:
        path = checkpoint_file(config.from_checkpoint)
        if path.suffix.lower() in NOT_CHECKPOINT_SUFFIXES:  # another file of a run folder
            run = path.parent.parent if path.parent.name == "replay" else path.parent  # a replay chunk's run
            raise RunError(
                f"--from_checkpoint {config.from_checkpoint} names the run's {path.name}, not a checkpoint: "
                f"the checkpoint of that run is {run / 'latest.pt'} (or pass the folder {run} itself).")
        if not ckpt.has_checkpoint(path):
            raise RunError(ckpt.missing_message(path))


if __name__ == "__main__":
    sys.exit(main())
