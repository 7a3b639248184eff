"""Checkpoints that survive crashes: atomic `latest.pt` with a `latest.prev.pt` fallback, RNG state
capture/restore, and shape checks that name the config key behind a mismatch.

save_checkpoint writes `<path>.tmp`, fsyncs it, renames the current file to `<stem>.prev.pt`
(not when that file is damaged: it would replace a good fallback), renames the tmp file into place
and fsyncs the folder: at every moment at least one complete checkpoint is on disk. A file counts as
intact when it is a zip whose every member passes its CRC check (torch.load itself does not check
them, so a damaged tensor would load silently). load_checkpoint falls back to the `.prev.pt` file
when the newest one is truncated or corrupt, and reads a complete `<path>.tmp` when `path` is
missing (a stop between save_checkpoint's two renames).
"""
from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from config import lookup
from tools import fsync_directory, write_synced


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable (and no fallback), or built for another model."""


class CheckpointMissing(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""


class CheckpointMismatch(CheckpointError, ValueError):
    """The checkpoint's parameters do not fit the model the config builds; `detail` names the first
    parameter that differs (for a caller that knows the cause better than the sizes do)."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (e.g. a full disk); the previous one is intact."""


def previous_path(path: Path) -> Path:
    """`latest.pt` -> `latest.prev.pt` (the fallback kept by save_checkpoint)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def has_checkpoint(path: Path) -> bool:
    """True when `path`, its `.prev.pt` fallback or a complete `.tmp` file exists (a run to resume)."""
    path = Path(path)
    return path.is_file() or previous_path(path).is_file() or is_intact(tmp_path(path))


def tmp_path(path: Path) -> Path:
    """`latest.pt` -> `latest.pt.tmp` (where save_checkpoint writes before renaming)."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def is_intact(path: Path) -> bool:
    """Whether `path` is a zip (torch.save's format) whose every member passes its CRC check."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except Exception:  # noqa: BLE001 -- not a zip, truncated, unreadable: not intact
        return False


class NotACheckpoint(CheckpointError, ValueError):
    """A complete torch file that is not a checkpoint this program wrote."""


CHECKPOINT_KEYS = ("agent", "counters", "config")  # what every checkpoint of this program holds


def read_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    """torch.load of `path` after checking its members' CRCs (ValueError naming the damage)."""
    if not is_intact(path):
        raise ValueError("not a complete checkpoint: a truncated file, or a member whose CRC check fails")
    return torch.load(path, map_location=map_location, weights_only=False)


def check_run_checkpoint(state: Any, path: Path) -> None:
    """NotACheckpoint unless `state` (read from `path`) holds what every checkpoint of a run does:
    a complete torch file of something else (a bare state_dict, another program's checkpoint)
    would otherwise fail as a KeyError."""
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, Mapping) or key not in state]
    if missing:
        found = (f"a dict with the keys {', '.join(map(str, list(state)[:8]))}{', ...' if len(state) > 8 else ''}"
                 if isinstance(state, Mapping) else f"a {type(state).__name__}")
        raise NotACheckpoint(
            f"{path} is a complete torch file but not a checkpoint of this program: it holds {found}, without "
            f"{', '.join(repr(key) for key in missing)}. --from_checkpoint takes the latest.pt (or latest.prev.pt) "
            "that a run of dreamer.py wrote in its --logdir; model weights of other DreamerV3 ports or bare "
            "state_dicts do not load. Point it at such a file, or leave it out to start a fresh run.")


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomically write `state` to `path`, keeping the previous file as `<stem>.prev.pt`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        write_synced(tmp, lambda file: torch.save(state, file))
    except (OSError, RuntimeError) as error:  # torch's zip writer reports a full disk as RuntimeError
        reason = error.strerror if isinstance(error, OSError) and error.strerror else describe(error)
        raise CheckpointWriteError(
            f"could not write checkpoint {path} ({reason}). The previous checkpoint, if any, is "
            f"left untouched at {path}. Free disk space in {path.parent} (e.g. old runs or replay "
            "chunks) or point --logdir at a disk with room, then resume."
        ) from error
    if path.exists() and is_intact(path):  # a damaged file never replaces the fallback
        os.replace(path, previous_path(path))
    os.replace(tmp, path)
    fsync_directory(path.parent)


def load_checkpoint(
    path: Path,
    map_location: Any = "cpu",
    warn: Callable[[str], None] | None = None,
) -> dict:
    """Load a checkpoint; a truncated or corrupt file falls back to `<stem>.prev.pt` and calls
    `warn` with the reason (warnings.warn when not given)."""
    return load_checkpoint_and_source(path, map_location, warn)[0]


def load_checkpoint_and_source(
    path: Path,
    map_location: Any = "cpu",
    warn: Callable[[str], None] | None = None,
    evaluating: bool = False,
) -> tuple[dict, Path]:
    """load_checkpoint, and the file the state came from: `path`, or `<stem>.prev.pt` after a
    fallback (whose warning says the agent is evaluated, not resumed, when `evaluating`)."""
    path = Path(path)
    if not path.exists():
        # A stop between the two renames of save_checkpoint: the newest checkpoint is the complete
        # tmp file (the previous one already renamed to .prev.pt).
        if tmp_path(path).is_file():
            try:
                state = read_checkpoint(tmp_path(path), map_location)  # checks it is complete
            except Exception:  # noqa: BLE001 -- partial or unusable: the fallback below
                pass
            else:
                note = (f"checkpoint {path} is missing but {tmp_path(path).name} beside it is complete (a "
                        f"stop between the two renames of a save); {'evaluating' if evaluating else 'resuming from'} it.")
                _warn(warn, note)
                return state, tmp_path(path)
        if previous_path(path).is_file():
            return load_fallback(path, map_location, warn, "is missing", evaluating), previous_path(path)
        raise CheckpointMissing(missing_message(path))
    try:
        return read_checkpoint(path, map_location), path
    except Exception as error:  # noqa: BLE001 -- any unreadable file falls back the same way
        first_error = error
    fallback = previous_path(path)
    if not fallback.exists():
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({describe(first_error)}) and there is no "
            f"previous checkpoint {fallback.name} to fall back to. Start a fresh run in a new "
            "--logdir, or restore the file from a backup."
        ) from first_error
    problem = f"is truncated or corrupt ({describe(first_error)})"
    return load_fallback(path, map_location, warn, problem, evaluating), fallback


def load_fallback(
    path: Path, map_location: Any, warn: Callable[[str], None] | None, problem: str, evaluating: bool = False
) -> dict:
    """Load `<stem>.prev.pt` because `path` has `problem`; warn about it (what a resume or an
    evaluation, if `evaluating`, does instead)."""
    fallback = previous_path(path)
    try:
        state = read_checkpoint(fallback, map_location)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(
            f"checkpoint {path} {problem} and the previous checkpoint {fallback.name} is "
            f"unreadable too ({describe(error)}). Start a fresh run in a new --logdir, or restore "
            "one of the files from a backup."
        ) from error
    instead = (f"evaluating the previous checkpoint {fallback.name} instead (the agent of an earlier step)"
               if evaluating else
               f"resuming from the previous checkpoint {fallback.name} instead (the steps after it are trained again)")
    message = f"checkpoint {path} {problem}; {instead}."
    _warn(warn, message)
    return state


def _warn(warn: Callable[[str], None] | None, message: str) -> None:
    if warn is None:
        import warnings

        warnings.warn(message, stacklevel=4)
    else:
        warn(message)


def describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def missing_message(path: Path) -> str:
    folder = path.parent
    if not folder.is_dir():
        return (
            f"checkpoint {path} does not exist, and neither does its folder {folder}. Check the "
            "--from_checkpoint path (it should point at a run's latest.pt)."
        )
    entries = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in folder.iterdir()
                     if not entry.name.startswith("."))  # not the run lock
    listing = ", ".join(entries[:30])
    if len(entries) > 30:
        listing += f", ... ({len(entries)} entries)"
    return (
        f"checkpoint {path} does not exist. The folder {folder} holds: {listing or 'nothing'}. "
        "Check the --from_checkpoint path (it should point at a run's latest.pt)."
    )


def capture_rng_states() -> dict:
    """The states of python's, numpy's and torch's (CPU and every CUDA device) generators."""
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Restore what capture_rng_states returned (CUDA states only where CUDA is present now; a
    checkpoint from a machine with another GPU count restores the devices both have)."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        cuda = [state.cpu() for state in states["cuda"]][: torch.cuda.device_count()]
        for device, state in enumerate(cuda):
            torch.cuda.set_rng_state(state, device)


def check_shapes(
    model_state: Mapping[str, torch.Tensor],
    expected_state: Mapping[str, torch.Tensor],
    hints: Mapping[str, str] | None = None,
) -> None:
    """Raise CheckpointMismatch when the checkpoint's parameters (`model_state`) differ in names or
    shapes from the model the config builds (`expected_state`). `hints` maps a fragment of
    parameter names to the config keys (and values) that set their sizes, e.g. {"rssm":
    "rssm.deter=1024"}; the longest fragment found in the parameter's name is quoted. Nested
    dicts (e.g. several modules' state dicts) are compared by dotted names; only tensors count."""
    model_state, expected_state = flat_tensors(model_state), flat_tensors(expected_state)
    for name, expected in expected_state.items():
        if name in model_state and tuple(model_state[name].shape) != tuple(expected.shape):
            found = tuple(model_state[name].shape)
            raise CheckpointMismatch(shape_message(name, found, tuple(expected.shape), hints or {}),
                                     f"'{name}' has shape {found} there and {tuple(expected.shape)} here")
    missing = [name for name in expected_state if name not in model_state]
    extra = [name for name in model_state if name not in expected_state]
    if missing or extra:
        detail = (f"parameters missing from the checkpoint: {missing[:5] or 'none'}; parameters only in the "
                  f"checkpoint: {extra[:5] or 'none'}")
        raise CheckpointMismatch(
            f"the checkpoint's model does not match the one the config builds: {detail}. It was probably "
            "trained with other encoder/decoder keys or model options: pass the config it was trained "
            "with (stored in the checkpoint).", detail)


def flat_tensors(state: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    """{dotted name: tensor} of every tensor in a nested mapping (other values are left out)."""
    flat = {}
    for key, value in state.items():
        if isinstance(value, Mapping):
            flat.update(flat_tensors(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            flat[f"{prefix}{key}"] = value
    return flat


def shape_message(name: str, found: tuple, expected: tuple, hints: Mapping[str, str]) -> str:
    fragments = [fragment for fragment in hints if fragment in name]
    hint = hints[max(fragments, key=len)] if fragments else None
    cause = f" (config: {hint})" if hint else ""
    return (
        f"checkpoint parameter '{name}' has shape {found} but the config builds {expected}{cause}: "
        "the checkpoint was trained with a different model size. Resume with the config it was "
        "trained with (saved in the checkpoint and in the run folder), or start a fresh run in a "
        "new --logdir."
    )


def check_config_sizes(saved: Mapping, current: Mapping, keys: list[str], evaluating: bool = False) -> None:
    """Raise CheckpointMismatch naming every dotted config key (e.g. 'rssm.deter') whose value in
    the config the checkpoint was trained with (`saved`) differs from the current config, with the
    flags that restore them all (`evaluating`: for an --eval_only run, which starts nothing fresh)."""
    differ = []
    for key in keys:
        old, new = lookup(saved, key, _MISSING), lookup(current, key, _MISSING)
        if old is not _MISSING and new is not _MISSING and old != new:
            differ.append((key, old, new))
    if not differ:
        return
    (key, old, new), rest = differ[0], differ[1:]
    also = ("; also " + ", ".join(f"{k}={o!r} (config: {n!r})" for k, o, n in rest)) if rest else ""
    flags = " ".join(f"--{k} {o}" for k, o, _ in differ)
    fix = (f"Evaluate with {flags}, or with the same --configs blocks as the training run (an evaluation "
           "builds its model from the config it is given)" if evaluating else
           f"Resume with {flags} (or the same --configs blocks as the original run), or start a fresh run "
           "in a new --logdir")
    raise CheckpointMismatch(
        f"the checkpoint was trained with {key}={old!r} but the config asks for {key}={new!r}{also}, "
        f"so its parameters do not fit the model. {fix}.")


_MISSING = object()
