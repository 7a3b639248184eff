"""Replay: a uint8-preserving FIFO store of env steps, O(1) window sampling, chunks on disk and
a prefetch thread.

Layout in memory
    All steps of all workers (envs) share one ring of `capacity` slots; the step with global id `g`
    lives in slot `g % capacity`, so the oldest step is always the one evicted (FIFO over workers).
    Each worker keeps the ids of its own stored steps in order (`_WorkerIds`), and every position
    where `batch_length` consecutive steps of one worker are stored is a "window start" kept in a
    flat array with swap-remove (`_IndexedSet`). Sampling draws uniform indices into that array, so
    it costs the same whether replay holds 10 episodes or 10,000, one worker or 64.

Windows may cross episode boundaries: the step that begins the next episode carries is_first=True,
and the first step of every sampled window is also marked is_first=True (in the returned copy), so
the world model starts its state fresh there. Unfinished episodes are sampled like finished ones.

Layout on disk (when `directory` is given)
    Every added step is also buffered per worker and written to
    `directory/w{worker:03d}-{first:012d}.npz` (`first` = that worker's running step index of the
    chunk's first step) once `chunk` steps are buffered, atomically (tmp file, fsync, rename, then
    fsync of the folder, so the rename itself survives a power cut).
    `flush()` writes the unfinished chunks under the same names; a later flush or the full chunk
    overwrites that file, so a step is never on disk twice. Each chunk also stores `_order`, the
    global insertion counter of its steps, so `load()` rebuilds the FIFO order across workers and
    keeps only the most recent `capacity` steps. With `keep_evicted=False` a chunk file is deleted
    once every one of its steps has been evicted from memory, so the folder holds about `capacity`
    steps (plus one chunk per worker) however long the run; with True every step of the run stays
    on disk (for offline use) and disk use grows with the run. Chunks a resume does not load (older
    than its newest `capacity` steps) are never deleted: a resume with a smaller replay_size loses
    nothing on disk.
"""
from __future__ import annotations

import collections
import heapq
import os
import queue
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from tools import fsync_directory, write_synced


class ReplayMemoryError(MemoryError):
    """The replay's capacity cannot be held in this machine's memory (message names the fix)."""


def machine_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemTotal + SwapTotal from /proc/meminfo (what Linux lets one process reserve), None elsewhere."""
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        return 1024 * (int(fields["MemTotal"].split()[0]) + int(fields.get("SwapTotal", "0 kB").split()[0]))
    except (OSError, KeyError, ValueError):
        return None


def replay_memory_message(capacity: int, step_bytes: int, layout: dict, why: str) -> str:
    """One paragraph: what the replay would reserve, why it cannot, and the replay_size that fits."""
    gib = 2 ** 30
    largest = max(layout, key=lambda key: int(np.prod(layout[key][0])) * np.dtype(layout[key][1]).itemsize)
    shape, dtype = layout[largest]
    memory = machine_memory_bytes()
    fits = "" if memory is None else (f" (about {steps_in_half(memory, step_bytes):,} steps fit in half of this "
                                      f"machine's {memory / gib:.1f} GiB of memory and swap)")
    return (f"replay: holding {capacity:,} steps of {step_bytes:,} bytes each ('{largest}' {tuple(shape)} "
            f"{np.dtype(dtype).name} is the largest) needs {capacity * step_bytes / gib:.1f} GiB, and {why}. "
            f"Lower --replay_size{fits}; with --parallel N each process holds replay_size / N. "
            "Images are stored as uint8: an env that gives float images takes 4x the memory. Nothing was "
            "written to the replay folder.")


def steps_in_half(memory: int, step_bytes: int) -> int:
    """How many steps of `step_bytes` fit in half of `memory` bytes (at least one)."""
    return max(memory // 2 // step_bytes, 1)


def check_replay_memory(capacity: int, step_bytes: int, layout: dict,
                        warn: Callable[[str], None] | None = None) -> None:
    """Raises ReplayMemoryError when `capacity` steps cannot fit in memory and swap together, so the
    run stops at its start with the fix, not hours later when the replay fills up; `warn`s when
    they fit but take more than half (the model, the envs and the system need the rest)."""
    memory = machine_memory_bytes()
    if memory is None:
        return
    gib = memory / 2 ** 30
    if capacity * step_bytes > memory:
        raise ReplayMemoryError(replay_memory_message(
            capacity, step_bytes, layout, f"this machine has {gib:.1f} GiB of memory and swap"))
    if warn is not None and capacity * step_bytes > memory // 2:
        warn(f"replay: holding {capacity:,} steps needs {capacity * step_bytes / 2 ** 30:.1f} GiB once it is full, "
             f"more than half of this machine's {gib:.1f} GiB of memory and swap; the model, the envs and the "
             f"system need the rest. If the run gets killed for memory, lower --replay_size to about "
             f"{steps_in_half(memory, step_bytes):,} steps (with --parallel N each process holds replay_size / N, "
             "and all of them count).")


BATCHES_HELD = 4  # a prefetcher's 2 queued batches, the one it builds and the one the update reads


def check_batch_memory(batch_size: int, batch_length: int, step_bytes: int) -> None:
    """Raises ReplayMemoryError when the batches a run holds at once (BATCHES_HELD of batch_size x
    batch_length steps of `step_bytes` each, plus their 8-byte indices) cannot fit in memory and
    swap: such a run would thrash or be killed at its first update instead of stopping with the fix."""
    memory = machine_memory_bytes()
    need = BATCHES_HELD * batch_size * batch_length * (step_bytes + 8)
    if memory is None or need <= memory:
        return
    raise ReplayMemoryError(
        f"a batch of batch_size {batch_size:,} x batch_length {batch_length:,} steps of {step_bytes:,} bytes each "
        f"takes {need / BATCHES_HELD / 2 ** 30:.1f} GiB, and a run holds {BATCHES_HELD} at once "
        f"({need / 2 ** 30:.1f} GiB) where this machine has {memory / 2 ** 30:.1f} GiB of memory and swap. Lower "
        "--batch_size or --batch_length (the paper's are 16 and 64).")


LOG_PREFIX = "log_"
ORDER_KEY = "_order"
CHUNK_NAME = re.compile(r"^w(\d+)-(\d+)\.npz$")


class _IndexedSet:
    """Set of live step ids with O(1) add, remove and uniform random draw: a dense array of the
    ids plus, per ring slot (id % capacity), the id's index in that array (-1 when absent)."""

    def __init__(self, capacity: int) -> None:
        self._items = np.zeros(min(capacity, 1024), np.int64)
        self._size = 0
        self._capacity = capacity
        self._index = np.full(capacity, -1, np.int64)  # (capacity,)

    def __len__(self) -> int:
        return self._size

    def add(self, item: int) -> None:
        if self._size == len(self._items):
            self._items = np.concatenate([self._items, np.zeros_like(self._items)])
        self._items[self._size] = item
        self._index[item % self._capacity] = self._size
        self._size += 1

    def discard(self, item: int) -> None:
        index = int(self._index[item % self._capacity])
        if index < 0 or self._items[index] != item:
            return
        self._index[item % self._capacity] = -1
        self._size -= 1
        if index != self._size:
            last = int(self._items[self._size])
            self._items[index] = last
            self._index[last % self._capacity] = index

    def draw(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return self._items[rng.integers(0, self._size, size=count)]  # (count,)


class _WorkerIds:
    """The global ids of one worker's stored steps, oldest first, in a growable ring."""

    def __init__(self) -> None:
        self._ids = np.zeros(256, np.int64)
        self._head = 0
        self.count = 0
        self.dropped = 0  # this worker's steps evicted so far: position p is stored at p - dropped

    def append(self, gid: int) -> None:
        if self.count == len(self._ids):
            self._ids = np.concatenate([self.ordered(), np.zeros_like(self._ids)])
            self._head = 0
        self._ids[(self._head + self.count) % len(self._ids)] = gid
        self.count += 1

    def pop_oldest(self) -> int:
        gid = int(self._ids[self._head])
        self._head = (self._head + 1) % len(self._ids)
        self.count -= 1
        self.dropped += 1
        return gid

    def at(self, index: int) -> int:
        return int(self._ids[(self._head + index) % len(self._ids)])

    def window(self, position: int, length: int) -> np.ndarray:
        offsets = self._head + position - self.dropped + np.arange(length)
        return self._ids[offsets % len(self._ids)]  # (length,)

    def ordered(self) -> np.ndarray:
        return self._ids[(self._head + np.arange(self.count)) % len(self._ids)]


class _ChunkWriter:
    """Buffers one worker's steps and writes them as chunk files (see module docstring). A failed
    write (e.g. a full disk) warns, keeps the steps and tries again at the next chunk boundary.
    `closed(path, newest order)` hears of every chunk written in full (its name is final)."""

    def __init__(
        self, directory: Path, worker: int, first: int, chunk: int, warn: Callable[[str], None],
        closed: Callable[[Path, int], None],
    ) -> None:
        self.directory, self.worker, self.first, self.chunk = directory, worker, first, chunk
        self.warn, self.closed = warn, closed
        self.pending: list[dict[str, np.ndarray]] = []

    def path(self) -> Path:
        return self.directory / f"w{self.worker:03d}-{self.first:012d}.npz"

    def add(self, step: dict[str, np.ndarray]) -> None:
        self.pending.append({key: np.array(value, copy=True) for key, value in step.items()})
        if len(self.pending) % self.chunk == 0 and self.write():
            path, newest = self.path(), int(self.pending[-1][ORDER_KEY])
            self.first += len(self.pending)
            self.pending = []
            self.closed(path, newest)

    def write(self) -> bool:
        """Write the buffered steps under this chunk's name; False when the write failed."""
        if not self.pending:
            return True
        arrays = {key: np.stack([step[key] for step in self.pending]) for key in self.pending[0]}
        path = self.path()
        try:
            write_npz_atomic(path, arrays)
        except OSError as error:
            self.warn(
                f"could not write replay chunk {path} ({error}); its {len(self.pending)} steps "
                "stay in memory and the write is tried again at the next chunk or flush. Free disk "
                "space, or a resumed run will lack these steps."
            )
            return False
        return True


def same_kind_of_values(dtype: np.dtype, stored: np.dtype) -> bool:
    """A step's array can go into replay storage of dtype `stored`: the same dtype, or float into
    float (the storage is float32 when the first step held float64, e.g. python floats)."""
    return dtype == stored or (np.issubdtype(dtype, np.floating) and np.issubdtype(stored, np.floating))


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an uncompressed npz to `path` via a tmp file: fsync, rename, fsync of the folder."""
    tmp = path.with_name(path.name + ".tmp")
    write_synced(tmp, lambda file: np.savez(file, **arrays))
    os.replace(tmp, path)
    fsync_directory(path.parent)


def read_chunk(path: Path, warn: Callable[[str], None]) -> dict[str, np.ndarray] | None:
    """All arrays of one chunk file, or None (after `warn`) when it is truncated or corrupt."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        lengths = {len(value) for value in arrays.values()}
        if ORDER_KEY not in arrays or len(lengths) != 1:
            raise ValueError(f"expected key {ORDER_KEY} and equal lengths, got {sorted(arrays)}")
        return arrays
    except Exception as error:  # noqa: BLE001 -- a bad chunk must never stop a resume
        warn(bad_chunk_message(path, error))
        return None


def bad_chunk_message(path: Path, error: Exception) -> str:
    return (
        f"replay chunk {path} could not be read ({type(error).__name__}: {error}); it is "
        "skipped and left on disk. The run continues with the other chunks."
    )


def warn_with_warnings(message: str) -> None:
    warnings.warn(message, stacklevel=3)


class Replay:
    """FIFO replay of env steps with uniform sampling of `batch_length` windows of one worker.

    add(step, worker) stores one transition (dict of arrays/scalars; keys starting with 'log_' are
    dropped); sample(batch_size) returns {key: (batch_size, batch_length, ...)} arrays in the dtypes
    they were added with (images stay uint8; float64 is stored as float32). Safe to add from one
    thread while another samples. `warn` receives the messages about unreadable or unwritable
    chunk files (default: warnings.warn); pass e.g. Logger.warning to see them in train.log.
    """

    def __init__(
        self,
        capacity: int,
        batch_length: int,
        directory: Path | None = None,
        chunk: int = 1024,
        seed: int = 0,
        warn: Callable[[str], None] | None = None,
        keep_evicted: bool = True,
    ) -> None:
        if batch_length < 1 or capacity < batch_length:
            raise ValueError(
                f"Replay needs 1 <= batch_length <= capacity, got batch_length={batch_length} and "
                f"capacity={capacity}. Raise replay_size or lower batch_length in the config."
            )
        if chunk < 1:
            raise ValueError(f"Replay chunk must be >= 1 step, got {chunk}; set replay_chunk >= 1.")
        self.capacity, self.batch_length, self.chunk = int(capacity), int(batch_length), int(chunk)
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._rng = np.random.default_rng(seed)
        self._warn = warn or warn_with_warnings  # e.g. Logger.warning
        self._lock = threading.Lock()
        self._arrays: dict[str, np.ndarray] = {}
        self._slot_worker = np.zeros(self.capacity, np.int32)  # worker of the step in each slot
        self._slot_position = np.zeros(self.capacity, np.int64)  # its running index in that worker
        self._slot_order = np.zeros(self.capacity, np.int64)  # its insertion counter (as on disk)
        self.keep_evicted = bool(keep_evicted)
        self._closed: dict[int, collections.deque] = {}  # per worker: (newest order, path) of full chunks
        self._evicted_order: dict[int, int] = {}  # per worker: order of its newest evicted step
        self._delete_warned = False
        self._workers: dict[int, _WorkerIds] = {}
        self._disk_next: dict[int, int] = {}  # next on-disk step index per worker (from load)
        self._writers: dict[int, _ChunkWriter] = {}
        self._starts = _IndexedSet(self.capacity)  # global ids of steps that begin a full window
        self._next_id = 0  # global id of the next step (in-memory)
        self._next_order = 0  # global insertion counter written to disk (continues on resume)
        self._counts = {"inserts": 0, "samples": 0, "evictions": 0, "loaded": 0}
        # steps the folder's chunks have held, every worker's (set by load): each worker's running
        # index past its newest readable chunk, so chunks deleted after eviction still count
        self.steps_on_disk = 0

    # --- adding ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return min(self._next_id, self.capacity)

    def add(self, step: dict, worker: int = 0) -> None:
        """Store one transition of `worker` (and buffer it for the chunk files)."""
        stored = self._prepare(step)
        order = self._next_order
        self._next_order += 1
        with self._lock:
            self._insert(stored, worker, order)
        if self.directory is not None:
            self._writer(worker).add({**stored, ORDER_KEY: np.asarray(order, np.int64)})
        self._counts["inserts"] += 1

    def _prepare(self, step: dict) -> dict[str, np.ndarray]:
        stored = {k: np.asarray(v) for k, v in step.items() if not k.startswith(LOG_PREFIX)}
        if not self._arrays:
            self._allocate(stored)
        if stored.keys() != self._arrays.keys():
            raise KeyError(
                f"the step has keys {sorted(stored)} but the first step stored in replay had "
                f"{sorted(self._arrays)}. Every step must carry the same observation keys plus "
                "action, reward, is_first, is_last and is_terminal."
            )
        for key, value in stored.items():
            if value.shape != self._arrays[key].shape[1:]:
                raise ValueError(
                    f"the step has '{key}' of shape {value.shape} but the first step stored in replay "
                    f"had {self._arrays[key].shape[1:]}. Observations must keep one shape for the "
                    "whole run (check the env's obs_space / observation_space and its wrappers)."
                )
            if not same_kind_of_values(value.dtype, self._arrays[key].dtype):
                raise ValueError(
                    f"the step has '{key}' of dtype {value.dtype} but the first step stored in replay had "
                    f"{self._arrays[key].dtype}. Observations must keep one dtype for the whole run (a "
                    "uint8 image that turns float, e.g. after a wrapper scales it, would be stored cast "
                    "back to integers): convert it in the env the same way at every step."
                )
        return stored

    def _allocate(self, step: dict[str, np.ndarray]) -> None:
        layout = {key: (value.shape, np.float32 if value.dtype == np.float64 else value.dtype)  # python floats
                  for key, value in step.items()}
        step_bytes = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in layout.values())
        check_replay_memory(self.capacity, step_bytes, layout, self._warn)
        try:
            for key, (shape, dtype) in layout.items():
                # np.empty leaves pages untouched until written: a large capacity costs what it holds.
                self._arrays[key] = np.empty((self.capacity, *shape), dtype)  # (capacity, ...)
        except MemoryError:
            self._arrays.clear()
            raise ReplayMemoryError(replay_memory_message(self.capacity, step_bytes, layout,
                                                          "the operating system refused to reserve it")) from None

    def _insert(self, stored: dict[str, np.ndarray], worker: int, order: int) -> None:
        gid = self._next_id
        if gid >= self.capacity:
            self._evict(gid - self.capacity)
        slot = gid % self.capacity
        for key, value in stored.items():
            self._arrays[key][slot] = value
        ids = self._workers.setdefault(worker, _WorkerIds())
        position = ids.dropped + ids.count  # running index of this step in its worker's memory
        self._slot_worker[slot], self._slot_position[slot] = worker, position
        self._slot_order[slot] = order
        ids.append(gid)
        if ids.count >= self.batch_length:
            self._starts.add(ids.at(ids.count - self.batch_length))
        self._next_id += 1

    def _evict(self, gid: int) -> None:
        worker = int(self._slot_worker[gid % self.capacity])
        oldest = self._workers[worker].pop_oldest()
        assert oldest == gid, (oldest, gid)
        self._starts.discard(gid)
        self._counts["evictions"] += 1
        self._evicted_order[worker] = int(self._slot_order[gid % self.capacity])
        self._delete_evicted_chunks(worker)

    def _chunk_closed(self, worker: int, path: Path, newest: int) -> None:
        """A chunk file of `worker` holds its final steps, the newest with insertion counter `newest`
        (kept in the worker's queue for deletion; nothing is kept with keep_evicted)."""
        if self.keep_evicted:
            return
        self._closed.setdefault(worker, collections.deque()).append((newest, path))
        self._delete_evicted_chunks(worker)

    def _delete_evicted_chunks(self, worker: int) -> None:
        """Without keep_evicted, delete `worker`'s full chunk files whose steps are all evicted
        (the worker's steps are evicted oldest first, so those are the front of its queue)."""
        chunks = self._closed.get(worker)
        if not chunks:
            return
        evicted = self._evicted_order.get(worker, -1)
        while chunks and chunks[0][0] <= evicted:
            _, path = chunks.popleft()
            try:
                path.unlink(missing_ok=True)
            except OSError as error:
                if not self._delete_warned:
                    self._delete_warned = True
                    self._warn(f"could not delete replay chunk {path} ({error}), whose steps have all left the "
                               "replay; such chunks stay on disk (this is said once)")

    def _writer(self, worker: int) -> _ChunkWriter:
        if worker not in self._writers:
            first = self._disk_next.get(worker, 0)
            self._writers[worker] = _ChunkWriter(
                self.directory, worker, first, self.chunk, self._warn,
                lambda path, newest: self._chunk_closed(worker, path, newest),
            )
        return self._writers[worker]

    # --- sampling -------------------------------------------------------------------------------

    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        """`batch_size` uniform windows: {key: (batch_size, batch_length, ...)} copies."""
        batch = self.try_sample(batch_size)
        if batch is None:
            raise ValueError(
                "Replay.sample needs at least one worker with "
                f"batch_length={self.batch_length} stored steps, but replay holds {len(self)} "
                f"steps over {len(self._workers)} worker(s). Add more steps first (prefill >= "
                "batch_length per env)."
            )
        return batch

    def try_sample(self, batch_size: int) -> dict[str, np.ndarray] | None:
        """Like sample(), but None while no full window is stored."""
        with self._lock:
            if len(self._starts) == 0:
                return None
            slots = self._window_slots(self._starts.draw(self._rng, batch_size))  # (B, T)
            batch = {key: array[slots] for key, array in self._arrays.items()}  # (B, T, ...)
            self._counts["samples"] += batch_size
        if "is_first" in batch:
            batch["is_first"][:, 0] = True
        return batch

    def _window_slots(self, start_ids: np.ndarray) -> np.ndarray:
        start_slots = start_ids % self.capacity  # (B,)
        rows = []
        for slot in start_slots:
            ids = self._workers[int(self._slot_worker[slot])]
            rows.append(ids.window(int(self._slot_position[slot]), self.batch_length))
        return np.stack(rows) % self.capacity  # (B, T)

    def rng_state(self) -> dict:
        """The sampler's generator state, for checkpoints."""
        with self._lock:
            return self._rng.bit_generator.state

    def set_rng_state(self, state: dict) -> None:
        with self._lock:
            self._rng.bit_generator.state = state

    def windows(self) -> int:
        """How many distinct windows can be sampled now."""
        return len(self._starts)

    def stats(self) -> dict[str, float]:
        """Counts for logging: steps held, windows, workers, inserts, samples, evictions, loaded."""
        with self._lock:
            return {
                "steps": len(self),
                "capacity": self.capacity,
                "windows": len(self._starts),
                "workers": len(self._workers),
                "episodes_started": int(self._arrays["is_first"][: len(self)].sum())
                if "is_first" in self._arrays
                else 0,
                **self._counts,
            }

    # --- disk -----------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write every worker's unfinished chunk (overwritten when it grows): call before saving."""
        for writer in self._writers.values():
            writer.write()

    def step_shapes(self) -> dict[str, tuple[int, ...]]:
        """{key: shape of one step} of what this replay holds (empty before the first step)."""
        return {key: tuple(array.shape[1:]) for key, array in self._arrays.items()}

    def load(self, keep_worker: Callable[[int], bool] | None = None) -> int:
        """Read the chunk files of `directory` back (the most recent `capacity` steps); returns how
        many steps were loaded. Call once, on a fresh Replay, before adding. `keep_worker` picks
        whose chunks to load (a rank of a parallel run loads its share of the workers)."""
        if self.directory is None:
            return 0
        if self._next_id:
            raise RuntimeError(
                f"Replay.load must run on an empty Replay, but {self._next_id} steps were already "
                "added; loading now would mix the orders. Call load() right after construction."
            )
        headers = self._chunk_headers()
        self._resume_counters(headers)
        self.steps_on_disk = sum(self._disk_next.values())
        if keep_worker is not None:
            headers = [header for header in headers if keep_worker(header[1])]
        if not headers:
            return 0
        orders = np.concatenate([order for order, *_ in headers])  # (steps on disk,)
        newest = min(self.capacity, len(orders))
        threshold = int(np.partition(orders, -newest)[-newest])  # oldest order id to keep
        for order, worker, first, path in sorted(headers, key=lambda header: (header[1], header[2])):
            if int(order.max()) >= threshold:  # loaded: deleted once its steps are evicted again
                self._chunk_closed(worker, path, int(order.max()))
        loaded = 0
        for order, worker, arrays, index in self._steps_in_order(headers, threshold):
            if order < threshold:
                continue
            step = self._prepare({key: value[index] for key, value in arrays.items()})
            with self._lock:
                self._insert(step, worker, order)
            loaded += 1
        self._counts["loaded"] = loaded
        return loaded

    def _chunk_headers(self) -> list[tuple[np.ndarray, int, int, Path]]:
        return chunk_headers(self.directory, self._warn)

    def _resume_counters(self, headers: list) -> None:
        """New steps continue the insertion counter and each worker's running index on disk, so
        they never overwrite a chunk of the earlier run."""
        for order, worker, first, _ in headers:
            self._next_order = max(self._next_order, int(order.max()) + 1)
        self._disk_next.update(workers_next_index(headers))

    def _steps_in_order(self, headers: list, threshold: int) -> Iterator[tuple]:
        """(order id, worker, chunk arrays, index) of every stored step in chunks that hold any
        step from `threshold` on, merged across workers in insertion order; at most one chunk per
        worker is in memory at a time."""
        by_worker: dict[int, list[tuple[int, Path]]] = {}
        for order, worker, first, path in headers:
            if int(order.max()) >= threshold:
                by_worker.setdefault(worker, []).append((first, path))
        streams = [self._worker_steps_from_disk(w, sorted(c)) for w, c in by_worker.items()]
        return heapq.merge(*streams, key=lambda item: item[0])

    def _worker_steps_from_disk(
        self, worker: int, chunks: list[tuple[int, Path]]
    ) -> Iterator[tuple]:
        """One worker's steps from its chunk files in order; the first step after a gap in its
        stream (a skipped or missing chunk) is marked is_first."""
        expected, unreadable = None, False
        for first, path in chunks:
            arrays = read_chunk(path, self._warn)
            if arrays is None:
                unreadable = True  # read_chunk warned: the gap it leaves is explained
                continue
            order = arrays.pop(ORDER_KEY)
            if expected is not None and first != expected:
                if "is_first" in arrays:
                    arrays["is_first"][0] = True
                if not unreadable:
                    self._warn(f"replay: the chunk files of worker {worker} in {self.directory} skip its steps "
                               f"{expected}..{first - 1} (a chunk file was deleted or moved away, {path.name} "
                               "follows the gap); the steps around it are loaded, the gap counts as an "
                               "episode boundary.")
            expected, unreadable = first + len(order), False
            for index in range(len(order)):
                yield int(order[index]), worker, arrays, index


def chunk_headers(directory: Path, warn: Callable[[str], None]) -> list[tuple[np.ndarray, int, int, Path]]:
    """(order ids, worker, first index, path) of every readable chunk file in `directory`; only
    the small `_order` array is read here. Unreadable chunks are passed to `warn`."""
    headers = []
    for path in sorted(directory.iterdir()):
        match = CHUNK_NAME.match(path.name)
        if not match:
            continue
        try:
            with np.load(path, allow_pickle=False) as data:
                order = data[ORDER_KEY]  # (chunk,)
            if order.ndim != 1 or len(order) == 0:
                raise ValueError(f"{ORDER_KEY} has shape {order.shape}")
        except Exception as error:  # noqa: BLE001 -- a bad chunk must never stop a resume
            warn(bad_chunk_message(path, error))
            continue
        headers.append((order, int(match.group(1)), int(match.group(2)), path))
    return headers


def workers_next_index(headers: list) -> dict[int, int]:
    """Each worker's running index past its newest chunk among `headers`: how many steps it has
    stored in the folder's lifetime (chunks deleted after eviction count too)."""
    next_index: dict[int, int] = {}
    for order, worker, first, _ in headers:
        next_index[worker] = max(next_index.get(worker, 0), first + len(order))
    return next_index


def steps_stored_in(directory: Path) -> int:
    """How many steps the replay folder `directory` has stored over its lifetime, every worker's
    (0 where it does not exist); what Replay.load sets steps_on_disk to, read without loading."""
    if not directory.is_dir():
        return 0
    return sum(workers_next_index(chunk_headers(directory, lambda message: None)).values())


class Prefetcher:
    """Samples batches in a background thread and hands them over as torch tensors on `device`
    (dtypes kept: uint8 images stay uint8; pinned memory and non-blocking copies on CUDA).

    next() waits for the next batch (re-raising any error of the thread); close() stops the thread.
    Until the replay holds a full window the thread waits instead of failing. The thread samples
    `depth` batches ahead, so the replay's own RNG state runs ahead of what was used;
    consumed_rng_state() is the state right after the last batch handed out, the one a checkpoint
    must keep for a resumed run to draw the very next batch.
    """

    def __init__(
        self, replay: Replay, batch_size: int, device: torch.device | str = "cpu", depth: int = 2
    ) -> None:
        self.replay, self.batch_size, self.device = replay, batch_size, torch.device(device)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._consumed_rng_state: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replay-prefetch", daemon=True)
        self._thread.start()

    def next(self) -> dict[str, torch.Tensor]:
        closed = "the replay prefetcher was closed (close() was called): make a new Prefetcher"
        while True:
            if self._stop.is_set():  # a batch the thread queued before it stopped is not handed out
                raise RuntimeError(closed)
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError(closed)
                continue
            if isinstance(item, BaseException):
                raise RuntimeError(f"replay prefetch thread failed: {item!r}") from item
            batch, self._consumed_rng_state = item
            return batch

    __next__ = next

    def consumed_rng_state(self) -> dict | None:
        """The replay sampler's RNG state right after the last batch next() returned (None before
        the first)."""
        return self._consumed_rng_state

    def __iter__(self) -> "Prefetcher":
        return self

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()  # unblock a put() waiting for room
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                sample = self.replay.try_sample(self.batch_size)
                if sample is None:
                    time.sleep(0.01)
                    continue
                item = (self._to_device(sample), self.replay.rng_state())  # state after this batch
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # noqa: BLE001 -- handed to the consumer by next()
            self._queue.put(error)

    def _to_device(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        tensors = {key: torch.from_numpy(value) for key, value in batch.items()}
        if self.device.type != "cuda":
            return {key: value.to(self.device) for key, value in tensors.items()}
        return {
            key: value.pin_memory().to(self.device, non_blocking=True)
            for key, value in tensors.items()
        }
