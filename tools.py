"""Small shared helpers only: symlog/symexp, seeding, device and thread set-up, durable file writes.

Anything larger (replay, logging, checkpoints, distributions) has its own module; see LAYOUT in the
README's developer section.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import random
import sys
from pathlib import Path
from typing import IO, Callable

import numpy as np
import torch


def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * log(1 + |x|): compresses large magnitudes, identity-like near zero."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: torch.Tensor) -> torch.Tensor:
    """Inverse of symlog: sign(x) * (exp(|x|) - 1)."""
    return torch.sign(x) * torch.expm1(torch.abs(x))


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); optionally make torch deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device '{name}' was asked for but CUDA is not available on this machine "
            "(torch.cuda.is_available() is False). Use --device cpu, or --device auto to pick "
            "CUDA only when present."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"device '{name}' was asked for but this machine has {torch.cuda.device_count()} CUDA "
            f"device(s), numbered from 0. Use --device cuda:0 (or --device auto).")
    return device


def use_tf32_on_cuda(device: torch.device, deterministic: bool = False) -> bool:
    """Let float32 matrix products and convolutions on a CUDA device use TF32 tensor cores (as JAX
    does by default on such GPUs; DreamerV3's official code runs there). CPU arithmetic is untouched,
    and so is a deterministic run. Returns whether TF32 is on."""
    if device.type != "cuda" or deterministic:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container or `taskset` limit), which
    os.cpu_count() ignores; the machine's count where affinity is not available."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(processes: int = 1) -> int:
    """Torch CPU threads per process when the config says 0: the cores not already busy when the run
    starts (1-minute load average), shared among the training processes; at least 1, at most 16.
    On a quiet 2-core machine two threads measured 1.5-1.7x faster than one; with another busy
    program beside it, two threads made the update several times slower than one (BENCHMARKS.md)."""
    cores = usable_cores()
    try:
        busy = min(max(round(os.getloadavg()[0]), 0), cores - 1)
    except (AttributeError, OSError):  # no load average on this platform
        busy = 0
    return max(1, min((cores - busy) // max(processes, 1), 16))


def set_threads(threads: int, processes: int = 1) -> int:
    """Set torch's intra-op threads (0 = default_threads(processes)); return the number set."""
    count = threads if threads > 0 else default_threads(processes)
    torch.set_num_threads(count)
    return count


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit machines
TRIM_THRESHOLD = 2**31 - 1  # (mallopt takes an int) give the heap top back only above 2 GiB free


def keep_freed_cpu_memory() -> bool:
    """Tell glibc's malloc to keep and reuse freed memory (torch's CPU allocator has no cache of its
    own): blocks up to 32 MB come from the heap instead of fresh mmap()s, and the heap top is only
    given back when over 2 GiB of it is free. Otherwise every update returns its large activation
    buffers to the operating system and page-faults them in again: 20,000-50,000 minor faults per
    update measured at size_xs and S (BENCHMARKS.md), none after this. Memory use stays at the peak
    of one update, as with any caching allocator. Returns whether it applied (glibc on Linux only;
    elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


class FolderLock:
    """An exclusive advisory lock on `<folder>/.lock` (fcntl.flock), held until release() or the
    process ends (kill -9 included, so it never outlives its run). The file names the holder's pid."""

    def __init__(self, folder: os.PathLike):
        self.path = os.path.join(os.fspath(folder), ".lock")
        self._file = None

    def acquire(self) -> str | None:
        """Take the lock; None on success, else what the file says about the run holding it."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return None
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            return holder
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        self._file = handle
        return None

    def holder(self) -> str | None:
        """What the lock file says about the run holding the lock, or None when it is free (or there is
        no lock file yet); creates and writes nothing."""
        try:
            import fcntl

            handle = open(self.path)
        except (ImportError, OSError):  # not POSIX, or no lock file (a new or unreadable folder)
            return None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return handle.read().strip() or "another process"
            fcntl.flock(handle, fcntl.LOCK_UN)
            return None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the flock
            self._file = None


def plural(count: int, noun: str) -> str:
    """'1 episode', '3 episodes'."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


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


def write_synced(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """`write(file)` into `path`, flushed and fsynced before returning; on any error (or Ctrl-C)
    the partial file is removed and the error raised. The caller renames it into place and then
    calls fsync_directory, so that a crash leaves either the old file or the complete new one."""
    try:
        with open(path, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
