"""Checkpoints that survive crashes: atomic `latest.pt` with a `latest.prev.pt` fallback, RNG state
capture/restore, and shape checks that name the config key behind a mismatch.

save_checkpoint writes `<path>.tmp`, fsyncs it, renames the current file to `<stem>.prev.pt`, renames
the tmp file into place and fsyncs the folder: at every moment at least one complete checkpoint is on
disk. load_checkpoint falls back to the `.prev.pt` file when the newest one is truncated or corrupt.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch


def previous_path(path: Path) -> Path:
    """`latest.pt` -> `latest.prev.pt` (the fallback kept by save_checkpoint)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def fsync_directory(directory: Path) -> None:
    """Make renames inside `directory` durable (no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomically write `state` to `path`, keeping the previous file as `<stem>.prev.pt`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OSError(
            f"could not write checkpoint {path} ({error.strerror or error}). The previous "
            f"checkpoint, if any, is left untouched at {path}. Free disk space in {path.parent} "
            "(e.g. old runs or replay chunks) or point --logdir at a disk with room, then resume."
        ) from error
    if path.exists():
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
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(missing_message(path))
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # noqa: BLE001 -- any unreadable file falls back the same way
        first_error = error
    fallback = previous_path(path)
    if not fallback.exists():
        raise RuntimeError(
            f"checkpoint {path} is truncated or corrupt ({describe(first_error)}) and there is no "
            f"previous checkpoint {fallback.name} to fall back to. Start a fresh run in a new "
            "--logdir, or restore the file from a backup."
        ) from first_error
    try:
        state = torch.load(fallback, map_location=map_location, weights_only=False)
    except Exception as error:  # noqa: BLE001
        raise RuntimeError(
            f"checkpoint {path} is truncated or corrupt ({describe(first_error)}) and the previous "
            f"checkpoint {fallback.name} is too ({describe(error)}). Start a fresh run in a new "
            "--logdir, or restore one of the files from a backup."
        ) from error
    message = (
        f"checkpoint {path} is truncated or corrupt ({describe(first_error)}); resuming from the "
        f"previous checkpoint {fallback.name} instead (the steps after it are trained again)."
    )
    if warn is None:
        import warnings

        warnings.warn(message, stacklevel=2)
    else:
        warn(message)
    return state


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
    entries = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in folder.iterdir())
    listing = ", ".join(entries[:30]) + (f", ... ({len(entries)} entries)" if len(entries) > 30 else "")
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
    """Raise ValueError when the checkpoint's parameters (`model_state`) differ in names or shapes
    from the model the config builds (`expected_state`). `hints` maps a parameter-name prefix to
    the config key that sets its size (e.g. {"rssm.": "rssm.deter"}) for the message."""
    for name, expected in expected_state.items():
        if name in model_state and tuple(model_state[name].shape) != tuple(expected.shape):
            found = tuple(model_state[name].shape)
            raise ValueError(shape_message(name, found, tuple(expected.shape), hints or {}))
    missing = [name for name in expected_state if name not in model_state]
    extra = [name for name in model_state if name not in expected_state]
    if missing or extra:
        raise ValueError(
            f"the checkpoint's model does not match the one the config builds: parameters missing "
            f"from the checkpoint: {missing[:5] or 'none'}; parameters only in the checkpoint: "
            f"{extra[:5] or 'none'}. It was probably trained with other encoder/decoder keys or "
            "model options: pass the config it was trained with (stored in the checkpoint)."
        )


def shape_message(name: str, found: tuple, expected: tuple, hints: Mapping[str, str]) -> str:
    prefixes = [prefix for prefix in hints if name.startswith(prefix)]
    key = hints[max(prefixes, key=len)] if prefixes else None
    cause = f" (set by config key {key})" if key else ""
    return (
        f"checkpoint parameter '{name}' has shape {found} but the config builds {expected}{cause}: "
        "the checkpoint was trained with a different model size. Resume with the config it was "
        f"trained with{' (the same ' + key + ')' if key else ''}, or start a fresh run in a new "
        "--logdir."
    )
