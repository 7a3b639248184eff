"""Run logging: train.log (readable lines), metrics.jsonl (one JSON object per write), TensorBoard
scalars and videos, and a live progress line on interactive terminals.

Everything is flushed on each write(), so `tail -f <logdir>/train.log` follows a run live. A Logger
made with enabled=False (non-zero ranks of a parallel run) writes nothing and prints nothing.
"""
from __future__ import annotations

import collections
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

# TensorBoard's add_video goes through moviepy, which imports pygame when present: keep pygame from
# probing audio devices (ALSA noise on headless machines) and from printing its banner.
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import numpy as np
import torch

# Scalars shown first in a train.log line, in this order; the rest follow sorted by name.
MAIN_SCALARS = ("perf/fps", "episode/return", "episode/length", "eval/return")
MAIN_PREFIXES = ("loss/",)


class LogWriteError(RuntimeError):
    """train.log, metrics.jsonl or the TensorBoard events could not be written (a full disk, a
    removed or read-only folder); the message names the folder and the fix."""


def log_write_failure(logdir: Path, error: OSError) -> LogWriteError:
    what = error.strerror or str(error)
    return LogWriteError(
        f"cannot write the run's logs in {logdir} ({type(error).__name__}: {what}): the disk is full, or "
        "the folder was removed or made read-only while the run went on. The run stops here without a "
        "new checkpoint; the last checkpoint and the replay already on disk are kept. Free disk space "
        "(or restore the folder) and run the same command again: it resumes from the last checkpoint.")


def quiet_tensorboard_thread_errors() -> None:
    """TensorBoard's writer thread re-raises a failed write (a full disk), and threading prints its
    traceback; the next write() raises the same error in the caller, which reports it as one
    paragraph. Silence that thread's OSErrors only (installed once per process)."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook.quiets_tensorboard = True
    threading.excepthook = hook


def to_float(value: Any) -> float:
    """A python float from a python number, numpy scalar/0-dim array or 0-dim torch tensor."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.numel() != 1:
            raise ValueError(
                "logger scalars must be single numbers, got a tensor of shape "
                f"{tuple(value.shape)}; reduce it first (e.g. .mean())."
            )
        return float(value.item())
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(
            f"logger scalars must be single numbers, got an array of shape {array.shape}; reduce "
            "it first (e.g. np.mean)."
        )
    return float(array.reshape(()))


def format_number(value: float) -> str:
    """Compact text for train.log: integers as such, others with 4 significant digits."""
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"


def ordered_names(names: list[str]) -> list[str]:
    """Main scalars first (MAIN_SCALARS order, then loss/*), then the rest sorted."""
    main = [name for name in MAIN_SCALARS if name in names]
    losses = sorted(name for name in names if name.startswith(MAIN_PREFIXES))
    rest = sorted(name for name in names if name not in main and name not in losses)
    return main + losses + rest


def video_frame(frame: Any) -> np.ndarray:
    """One rendered frame as (H, W, 3) uint8: RGBA loses its alpha, grey (H, W) or (H, W, 1) is
    repeated over three channels, float frames in [0, 1] are scaled to 0..255 (others clipped).
    Raises ValueError, naming the shape or dtype, for anything else."""
    array = np.asarray(frame)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(f"render() returned an array of shape {array.shape}, not an (H, W, 3) frame")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
        raise ValueError(f"render() returned a frame of dtype {array.dtype}, not uint8")
    array = array[..., :3] if array.shape[-1] == 4 else np.repeat(array, 3, -1) if array.shape[-1] == 1 else array
    if array.dtype != np.uint8:
        array = array.astype(np.float32)
        array = np.clip(np.nan_to_num(array * 255.0 if array.max() <= 1.0 else array), 0, 255).astype(np.uint8)
    return array  # (H, W, 3)


def video_batch(frames: np.ndarray) -> np.ndarray:
    """(T,H,W,C) or (B,T,H,W,C) uint8 frames -> (B,T,C,H,W) as TensorBoard's add_video wants."""
    frames = np.asarray(frames)
    if frames.ndim == 4:
        frames = frames[None]
    if frames.ndim != 5 or frames.shape[-1] not in (1, 3):
        raise ValueError(
            f"video frames must be (T,H,W,C) or (B,T,H,W,C) with C in (1, 3), got shape "
            f"{frames.shape}; stack the rendered frames along a leading time axis."
        )
    if frames.dtype != np.uint8:
        frames = np.clip(frames * 255.0 if frames.max() <= 1.0 else frames, 0, 255).astype(np.uint8)
    return frames.transpose(0, 1, 4, 2, 3)  # (B, T, C, H, W)


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def is_achievement_rate(name: str) -> bool:
    """achievement/<name> or eval/achievement/<name>, but not the crafter_score beside them."""
    return "achievement/" in name and not name.endswith("/crafter_score")


class Pace:
    """Agent steps per second over the last `window` seconds of stepping, for the live progress line:
    pauses (an evaluation, a checkpoint) are left out, so the rate after one is the stepping rate.
    Times are read on a clock that stops during pauses, so a pause costs nothing per point."""

    def __init__(self, step: int, window: float = 60.0):
        self.window = window
        self.paused = 0.0  # seconds of pauses so far: the stepping clock is time.time() - paused
        self.points: collections.deque[tuple[float, int]] = collections.deque([(self._clock(), step)])

    def _clock(self) -> float:
        return time.time() - self.paused

    def restart(self, step: int) -> None:
        """Forget the rate so far (e.g. the fast random steps of the prefill once training begins)."""
        self.points = collections.deque([(self._clock(), step)])

    def pause(self, seconds: float) -> None:
        """`seconds` spent without stepping: left out of the window."""
        self.paused += seconds

    def add(self, step: int) -> None:
        now = self._clock()
        self.points.append((now, step))
        while len(self.points) > 2 and now - self.points[1][0] >= self.window:
            self.points.popleft()

    def rate(self) -> float:
        (t0, s0), (t1, s1) = self.points[0], self.points[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else float("nan")


class Logger:
    """Collects scalars and videos between write() calls and writes them to every sink."""

    def __init__(self, logdir: Path, enabled: bool = True, tensorboard: bool = True, rank: int = 0) -> None:
        """`enabled` False (the ranks after the first of a data-parallel run): nothing is written, but
        warnings and errors still reach stderr, as `[rank N] WARNING ...`."""
        self.logdir, self.enabled, self.rank = Path(logdir), enabled, rank
        self._scalars: dict[str, Any] = {}
        self._videos: dict[str, np.ndarray] = {}
        self._writer = None  # made at the first write, so a rewind before it makes no extra events file
        self._tensorboard, self._purge_step = tensorboard, None
        self._progress_shown = False
        self.failed = False  # a write() failed (LogWriteError): it writes nothing from then on
        self._text_failed = False  # train.log failed: messages go to stderr only from then on
        if not enabled:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._text = open(self.logdir / "train.log", "a", buffering=1, encoding="utf-8")
        self._jsonl = open(self.logdir / "metrics.jsonl", "a", buffering=1, encoding="utf-8")

    def _tensorboard_writer(self):
        """The TensorBoard writer (None when off); it hides the events at or after a rewind's step."""
        if self._writer is None and self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            quiet_tensorboard_thread_errors()
            self._writer = SummaryWriter(log_dir=str(self.logdir), max_queue=1000, flush_secs=30,
                                         purge_step=self._purge_step)
        return self._writer

    # --- collecting -----------------------------------------------------------------------------

    def scalar(self, name: str, value: Any) -> None:
        if self.enabled:
            self._scalars[name] = value

    def scalars(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            self.scalar(name, value)

    def video(self, name: str, frames: np.ndarray) -> None:
        """Queue a video, (T,H,W,C) or (B,T,H,W,C) uint8, for the next write()."""
        if self.enabled:
            self._videos[name] = video_batch(frames)

    # --- writing --------------------------------------------------------------------------------

    def write(self, step: int) -> None:
        """Write the pending scalars and videos at `step` to all sinks, flush, and clear them; a sink
        that cannot be written raises LogWriteError."""
        if not self.enabled or self.failed:
            return
        try:
            self._write_sinks(step)
        except OSError as error:
            self.failed = True
            self._scalars, self._videos = {}, {}
            raise log_write_failure(self.logdir, error) from None

    def _write_sinks(self, step: int) -> None:
        values = {name: to_float(value) for name, value in self._scalars.items()}
        if values:
            self._write_text(step, values)
            self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        writer = self._tensorboard_writer()
        if writer is not None and (values or self._videos):
            for name, value in values.items():
                writer.add_scalar(name, value, int(step))
            for name, frames in self._videos.items():
                writer.add_video(name, torch.from_numpy(frames), int(step), fps=16)
            writer.flush()
        self._scalars, self._videos = {}, {}

    def _write_text(self, step: int, values: dict[str, float]) -> None:
        """One line per write: every scalar but the per-achievement rates (22 of them for Crafter,
        in metrics.jsonl and TensorBoard), of which the line keeps the score."""
        shown = [name for name in ordered_names(list(values)) if not is_achievement_rate(name)]
        parts = [f"{name} {format_number(values[name])}" for name in shown]
        self._clear_progress()
        self._text.write(f"[{timestamp()}] step {int(step)} | " + " | ".join(parts) + "\n")
        self._text.flush()

    def rewind(self, step: int) -> int:
        """Forget what was logged after `step`, for a run resumed from a checkpoint at `step` that
        logs those steps again: move the later records from metrics.jsonl (and a line cut short by
        a kill) to metrics.dropped.jsonl and hide the later TensorBoard events (purge_step).
        Returns the records moved."""
        if not self.enabled:
            return 0
        path = self.logdir / "metrics.jsonl"
        self._jsonl.close()
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept, dropped = [], []
        for line in lines:
            (kept if record_step(line) <= step else dropped).append(line)
        if dropped:
            with open(self.logdir / "metrics.dropped.jsonl", "a", encoding="utf-8") as aside:
                aside.write("".join(line + "\n" for line in dropped))
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)
        self._jsonl = open(path, "a", buffering=1, encoding="utf-8")
        if self._writer is not None:  # the next write opens a new events file with the purge step
            self._writer.close()
            self._writer = None
        self._purge_step = int(step) + 1
        return len(dropped)

    def info(self, message: str) -> None:
        self._message("INFO", message)

    def warning(self, message: str) -> None:
        self._message("WARNING", message)

    def error(self, message: str, echo: bool = True) -> None:
        """An ERROR line in train.log, and on stderr unless `echo` is False (the caller prints it)."""
        self._message("ERROR", message, echo)

    def _message(self, level: str, message: str, echo: bool = True) -> None:
        if not self.enabled:  # another rank writes the files; what goes wrong here is still shown
            if echo and level in ("WARNING", "ERROR"):
                print(f"[rank {self.rank}] [{timestamp()}] {level} {message}", file=sys.stderr, flush=True)
            return
        line = f"[{timestamp()}] {level} {message}"
        if not self._text_failed:
            try:
                self._text.write(line + "\n")
                self._text.flush()
            except OSError as error:  # the line still reaches stderr; write() names the failure
                self._text_failed = echo = True
                print(f"[{timestamp()}] WARNING train.log cannot be written ({error}); messages go to stderr "
                      "only from now on", file=sys.stderr, flush=True)
        if echo:
            self._clear_progress()
            print(line, file=sys.stderr, flush=True)

    def progress(self, step: int, total: int, fps: float, last_return: float | None = None,
                 estimate: bool = True) -> None:
        """A live one-line status (agent steps done/total, agent steps per second, the last training
        episode's return, time left: '?' without `estimate`, e.g. during the prefill, whose random
        steps say nothing of the training's pace) on an interactive terminal; nothing when stderr is
        not a tty or the CI environment variable is set."""
        if not self.enabled or not live_terminal():
            return
        left = (total - step) / fps if fps > 0 and estimate else float("nan")
        shown = f"{fps:.1f}" if math.isfinite(fps) else "?"
        text = f"step {int(step)}/{int(total)} ({100 * step / max(total, 1):.1f}%) | fps {shown}"
        if last_return is not None:
            text += f" | return {format_number(to_float(last_return))}"
        text += f" | left {format_duration(left) if math.isfinite(left) else '?'}"
        sys.stderr.write("\r" + text + "\x1b[K")
        sys.stderr.flush()
        self._progress_shown = True

    def _clear_progress(self) -> None:
        if self._progress_shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._progress_shown = False

    def close(self) -> None:
        if not self.enabled:
            return
        self._clear_progress()
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError:  # a full disk: what it could not write is lost, the run's error says so
                pass
            self._writer = None
        for file in (self._text, self._jsonl):
            if not file.closed:
                try:
                    file.close()
                except OSError:
                    pass


def record_step(line: str) -> float:
    """The step of one metrics.jsonl line; infinity for a line that is not a complete record."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def live_terminal() -> bool:
    """True when stderr is an interactive terminal and not under CI."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def read_metrics(logdir: Path) -> list[dict]:
    """The records of `logdir/metrics.jsonl`; an unreadable line (e.g. cut by a crash, or a record
    without a numeric step) is skipped,
    and after a resume the records logged again replace those of later steps."""
    path = Path(logdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"no metrics.jsonl in {logdir} (expected {path}). Pass run folders (the --logdir of "
            "dreamer.py runs) that have logged at least once."
        )
    records: list[dict] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
            continue  # not a record of this project (a hand edit, a line cut short)
        while records and records[-1]["step"] > record["step"]:
            records.pop()  # logged past the checkpoint before a crash: the resumed run rewrites it
        records.append(record)
    return records
