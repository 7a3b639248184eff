"""Replay: uniform sampling, episode boundaries, FIFO capacity, workers, dtypes, chunks on disk."""
from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.disk_events import record_disk_events
import replay as replay_lib
from replay import Prefetcher, Replay


def make_step(counter: int, worker: int = 0, first: bool = False, image: bool = True) -> dict:
    step = {
        "vector": np.full(3, counter, np.float32),
        "action": np.zeros(2, np.float32),
        "reward": np.float32(counter),
        "worker": np.int32(worker),
        "is_first": first,
        "is_last": False,
        "is_terminal": False,
        "log_debug": np.ones(5),
    }
    if image:
        step["image"] = np.full((8, 8, 3), counter % 256, np.uint8)
    return step


def fill(replay: Replay, steps: int, worker: int = 0, episode: int = 1000, offset: int = 0) -> None:
    for counter in range(offset, offset + steps):
        replay.add(make_step(counter, worker, first=counter % episode == 0), worker=worker)


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def test_window_starts_are_uniform_over_stored_steps_of_all_workers() -> None:
    replay = Replay(capacity=400, batch_length=10, seed=1)
    fill(replay, 150, worker=0)
    fill(replay, 60, worker=1, offset=1000)
    starts = replay.sample(20_000)["reward"][:, 0].astype(int)
    # Valid starts: 0..140 for worker 0 (141) and 1000..1050 for worker 1 (51): 192 cells, df = 191.
    cells = np.concatenate([np.arange(0, 141), np.arange(1000, 1051)])
    assert set(np.unique(starts)) <= set(cells)
    counts = np.array([(starts == cell).sum() for cell in cells])
    # Critical value of chi-square with 191 degrees of freedom at p = 0.001 is about 257.
    assert chi_square(counts) < 257.0, chi_square(counts)


def test_windows_mark_is_first_where_they_cross_an_episode_boundary() -> None:
    replay = Replay(capacity=500, batch_length=12, seed=0)
    fill(replay, 300, episode=7)
    batch = replay.sample(500)
    counters = batch["reward"].astype(int)  # (B, T)
    assert np.all(np.diff(counters, axis=1) == 1)  # consecutive steps of one stream
    expected_first = counters % 7 == 0
    expected_first[:, 0] = True  # every window starts from a fresh model state
    np.testing.assert_array_equal(batch["is_first"], expected_first)
    assert batch["is_first"][:, 1:].any()  # some windows did cross a boundary


def test_stored_is_first_is_not_changed_by_sampling() -> None:
    replay = Replay(capacity=100, batch_length=4, seed=0)
    fill(replay, 50, episode=1000)
    replay.sample(64)
    assert replay.sample(200)["is_first"][:, 1:].sum() == 0


def test_fifo_capacity_keeps_the_most_recent_steps() -> None:
    replay = Replay(capacity=50, batch_length=5, seed=0)
    fill(replay, 120)
    assert len(replay) == 50
    counters = replay.sample(2000)["reward"]
    assert counters.min() == 70 and counters.max() == 119
    assert replay.stats() == {"steps": 50, "capacity": 50, "windows": 46, "workers": 1, "episodes_started": 0,
                              "inserts": 120, "samples": 2000, "evictions": 70, "loaded": 0}
    replay.sample(16)
    assert replay.stats()["samples"] == 2016  # windows drawn, not calls


def test_a_workers_steps_stay_in_order_when_its_share_grows_after_evictions() -> None:
    """Worker 0's id ring grows (past 256) while its oldest entries have been evicted, i.e. when
    the ring's head is not at 0; the grown ring must keep the stream order."""
    replay = Replay(capacity=400, batch_length=8, seed=0)
    for counter in range(400):  # 200 steps each, interleaved
        worker = counter % 2
        replay.add(make_step(1000 * worker + counter // 2, worker), worker=worker)
    fill(replay, 400, worker=0, offset=200)  # evicts both workers' oldest, then worker 0 holds all
    assert stored_counters(replay) == {0: list(range(200, 600)), 1: []}
    steps = replay.sample(2000)["reward"].astype(int)
    assert np.all(np.diff(steps, axis=1) == 1) and steps.min() >= 200 and steps.max() == 599


def test_fifo_is_over_all_workers_and_windows_never_mix_workers() -> None:
    replay = Replay(capacity=90, batch_length=6, seed=0)
    rng = np.random.default_rng(0)
    counters = {0: 0, 1: 1000, 2: 2000}
    for _ in range(400):
        worker = int(rng.choice(3, p=[0.5, 0.3, 0.2]))
        replay.add(make_step(counters[worker], worker), worker=worker)
        counters[worker] += 1
    assert len(replay) == 90
    batch = replay.sample(3000)
    workers, steps = batch["worker"], batch["reward"].astype(int)
    assert np.all(workers == workers[:, :1])
    assert np.all(np.diff(steps, axis=1) == 1)
    assert np.all(steps // 1000 == workers)
    assert set(np.unique(workers[:, 0])) == {0, 1, 2}


def test_unfinished_episode_is_sampleable_and_dtypes_are_kept() -> None:
    replay = Replay(capacity=100, batch_length=8, seed=0)
    fill(replay, 8)  # one unfinished episode, exactly one window
    batch = replay.sample(3)
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (3, 8, 8, 8, 3)
    assert batch["vector"].dtype == np.float32 and batch["vector"].shape == (3, 8, 3)
    assert batch["is_last"].dtype == np.bool_ and batch["action"].shape == (3, 8, 2)
    np.testing.assert_array_equal(batch["image"][0, :, 0, 0, 0], np.arange(8))
    assert "log_debug" not in batch
    assert replay._arrays["image"].dtype == np.uint8  # no float copy kept anywhere


def test_sample_returns_copies() -> None:
    replay = Replay(capacity=20, batch_length=4, seed=0)
    fill(replay, 10)
    batch = replay.sample(2)
    batch["image"][:] = 255
    assert replay.sample(50)["image"].max() < 10


def test_bad_configuration_and_inputs_give_clear_errors() -> None:
    pattern = r"batch_length <= capacity, got batch_length=64 and capacity=10"
    with pytest.raises(ValueError, match=pattern):
        Replay(capacity=10, batch_length=64)
    replay = Replay(capacity=20, batch_length=4)
    pattern = r"needs at least one worker with batch_length=4 stored steps"
    with pytest.raises(ValueError, match=pattern):
        replay.sample(1)
    replay.add(make_step(0))
    bad = make_step(1)
    del bad["reward"]
    with pytest.raises(KeyError, match=r"but the first step stored in replay had"):
        replay.add(bad)


def stored_counters(replay: Replay) -> dict[int, list[int]]:
    """Every stored step's counter, per worker, in stream order (read through the windows API)."""
    out = {}
    for worker, ids in replay._workers.items():
        slots = ids.ordered() % replay.capacity
        out[worker] = replay._arrays["reward"][slots].astype(int).tolist()
    return out


def test_chunks_round_trip_through_flush_and_load(tmp_path: Path) -> None:
    replay = Replay(capacity=1000, batch_length=4, directory=tmp_path, chunk=8)
    fill(replay, 21, worker=0)
    fill(replay, 13, worker=1, offset=1000)
    replay.flush()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "w000-000000000000.npz", "w000-000000000008.npz", "w000-000000000016.npz",
        "w001-000000000000.npz", "w001-000000000008.npz",
    ]
    loaded = Replay(capacity=1000, batch_length=4, directory=tmp_path, chunk=8)
    assert loaded.load() == 34
    assert stored_counters(loaded) == {0: list(range(21)), 1: list(range(1000, 1013))}
    original = replay._arrays["image"][:34]
    np.testing.assert_array_equal(np.sort(loaded._arrays["image"][:34], axis=0), np.sort(original, axis=0))
    assert loaded._arrays["image"].dtype == np.uint8


def test_flush_grow_flush_never_stores_a_step_twice(tmp_path: Path) -> None:
    replay = Replay(capacity=1000, batch_length=2, directory=tmp_path, chunk=8)
    fill(replay, 10)
    replay.flush()
    fill(replay, 3, offset=10)
    replay.flush()
    fill(replay, 4, offset=13)  # completes the second chunk (8..15), starts a third
    replay.flush()
    loaded = Replay(capacity=1000, batch_length=2, directory=tmp_path, chunk=8)
    assert loaded.load() == 17
    assert stored_counters(loaded) == {0: list(range(17))}


def test_resumed_run_continues_on_disk_without_overwriting(tmp_path: Path) -> None:
    first = Replay(capacity=1000, batch_length=2, directory=tmp_path, chunk=8)
    fill(first, 11)
    first.flush()
    fill(first, 2, offset=11)  # lost: never flushed (like a kill -9)
    second = Replay(capacity=1000, batch_length=2, directory=tmp_path, chunk=8)
    assert second.load() == 11
    fill(second, 6, offset=100)
    second.flush()
    third = Replay(capacity=1000, batch_length=2, directory=tmp_path, chunk=8)
    assert third.load() == 17
    assert stored_counters(third) == {0: list(range(11)) + list(range(100, 106))}
    assert "w000-000000000011.npz" in {p.name for p in tmp_path.iterdir()}


def orders_on_disk(directory: Path) -> list[int]:
    orders = []
    for path in sorted(directory.glob("*.npz")):
        with np.load(path) as data:
            orders += data["_order"].tolist()
    return sorted(orders)


def test_evicted_chunks_are_deleted_so_the_folder_holds_about_capacity_steps(tmp_path: Path) -> None:
    replay = Replay(capacity=20, batch_length=2, directory=tmp_path, chunk=5, keep_evicted=False)
    for counter in range(103):  # two workers, interleaved unevenly
        worker = 0 if counter % 3 else 1
        replay.add(make_step(counter, worker), worker=worker)
        on_disk = orders_on_disk(tmp_path)
        assert len(on_disk) <= 20 + 2 * 5  # the replay's steps, at most a chunk more per worker
    replay.flush()
    in_memory = sorted(replay._slot_order[: len(replay)].tolist())
    assert in_memory == list(range(83, 103))
    assert set(in_memory) <= set(orders_on_disk(tmp_path))  # every step of the replay is on disk
    resumed = Replay(capacity=20, batch_length=2, directory=tmp_path, chunk=5, keep_evicted=False)
    assert resumed.load() == 20
    assert resumed.steps_on_disk == 103  # deleted chunks still count as steps the run stored
    assert stored_counters(resumed) == stored_counters(replay)


def test_kept_evicted_chunks_hold_the_whole_run(tmp_path: Path) -> None:
    replay = Replay(capacity=20, batch_length=2, directory=tmp_path, chunk=5, keep_evicted=True)
    fill(replay, 100)
    assert orders_on_disk(tmp_path) == list(range(100))


def test_a_resume_deletes_only_the_chunks_it_loaded_and_evicted(tmp_path: Path) -> None:
    """Chunks older than what a resume loads stay (a resume with a smaller replay_size loses
    nothing on disk); the loaded ones go once their steps leave the replay again."""
    first = Replay(capacity=1000, batch_length=2, directory=tmp_path, chunk=5, keep_evicted=False)
    fill(first, 50)
    first.flush()
    resumed = Replay(capacity=20, batch_length=2, directory=tmp_path, chunk=5, keep_evicted=False)
    assert resumed.load() == 20  # steps 30..49 of chunks 30..49
    assert orders_on_disk(tmp_path) == list(range(50))
    fill(resumed, 12, offset=50)  # evicts 30..41: chunks 30-34 and 35-39 go, 40-44 keeps 42..44
    assert orders_on_disk(tmp_path) == list(range(30)) + list(range(40, 60))


def test_a_resume_that_loads_only_the_last_step_of_a_chunk_deletes_that_chunk_later(tmp_path: Path) -> None:
    first = Replay(capacity=1000, batch_length=2, directory=tmp_path, chunk=5, keep_evicted=False)
    fill(first, 50)
    first.flush()
    resumed = Replay(capacity=21, batch_length=2, directory=tmp_path, chunk=5, keep_evicted=False)
    assert resumed.load() == 21  # steps 29..49: of chunk 25-29 only its newest step
    fill(resumed, 1, offset=50)  # evicts step 29, the last of chunk 25-29 in the replay
    assert orders_on_disk(tmp_path) == list(range(25)) + list(range(30, 50))  # 50 waits for its chunk


def test_load_keeps_only_the_most_recent_capacity_steps(tmp_path: Path) -> None:
    writer = Replay(capacity=1000, batch_length=2, directory=tmp_path, chunk=8)
    for counter in range(60):
        writer.add(make_step(counter, counter % 2), worker=counter % 2)
    writer.flush()
    loaded = Replay(capacity=20, batch_length=2, directory=tmp_path, chunk=8)
    assert loaded.load() == 20
    assert stored_counters(loaded) == {0: list(range(40, 60, 2)), 1: list(range(41, 60, 2))}
    assert len(list(tmp_path.glob("*.npz"))) == 8  # older chunks stay on disk


@pytest.mark.parametrize("damage", ["garbage", "truncate", "ragged"])
def test_corrupt_chunk_is_skipped_with_a_warning_and_kept(tmp_path: Path, damage: str) -> None:
    replay = Replay(capacity=1000, batch_length=2, directory=tmp_path, chunk=8)
    fill(replay, 24)
    bad = tmp_path / "w000-000000000008.npz"
    if damage == "garbage":
        bad.write_bytes(b"not a zip file at all")
    elif damage == "truncate":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:  # a readable file whose arrays disagree on the number of steps
        with np.load(bad) as data:
            arrays = {key: data[key] for key in data.files}
        arrays["image"] = arrays["image"][:5]
        with open(bad, "wb") as file:
            np.savez(file, **arrays)
    loaded = Replay(capacity=1000, batch_length=2, directory=tmp_path, chunk=8)
    pattern = r"replay chunk .*w000-000000000008\.npz could not be read .* skipped and left on disk"
    with pytest.warns(UserWarning, match=pattern):
        assert loaded.load() == 16
    assert bad.exists()
    assert stored_counters(loaded) == {0: list(range(8)) + list(range(16, 24))}
    # The first step after the gap starts a new stream segment.
    slots = loaded._workers[0].ordered() % loaded.capacity
    assert loaded._arrays["is_first"][slots].nonzero()[0].tolist() == [0, 8]


def test_a_deleted_chunk_in_the_middle_is_named_and_its_gap_starts_an_episode(tmp_path: Path) -> None:
    import warnings

    replay = Replay(capacity=1000, batch_length=2, directory=tmp_path, chunk=8)
    fill(replay, 24)
    (tmp_path / "w000-000000000008.npz").unlink()
    loaded = Replay(capacity=1000, batch_length=2, directory=tmp_path, chunk=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert loaded.load() == 16
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith(
        f"replay: the chunk files of worker 0 in {tmp_path} skip its steps 8..15 (a chunk file was deleted or "
        "moved away, w000-000000000016.npz follows the gap)"), messages
    slots = loaded._workers[0].ordered() % loaded.capacity
    assert loaded._arrays["is_first"][slots].nonzero()[0].tolist() == [0, 8]


def test_load_without_chunks_and_without_directory_loads_nothing(tmp_path: Path) -> None:
    assert Replay(capacity=10, batch_length=2, directory=tmp_path).load() == 0
    assert Replay(capacity=10, batch_length=2).load() == 0
    (tmp_path / "unrelated.txt").write_text("x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Replay(capacity=10, batch_length=2, directory=tmp_path).load() == 0


def test_prefetcher_waits_for_data_and_yields_tensors() -> None:
    replay = Replay(capacity=100, batch_length=5, seed=0)
    prefetcher = Prefetcher(replay, batch_size=4, device="cpu", depth=2)
    try:
        fill(replay, 20)
        batch = prefetcher.next()
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 5, 8, 8, 3)
        assert batch["reward"].dtype == torch.float32 and batch["is_first"].dtype == torch.bool
        for _ in range(5):
            assert prefetcher.next()["reward"].shape == (4, 5)
    finally:
        prefetcher.close()
    assert not prefetcher._thread.is_alive()


def test_prefetcher_samples_while_main_thread_adds() -> None:
    replay = Replay(capacity=64, batch_length=8, seed=0)
    fill(replay, 16)
    prefetcher = Prefetcher(replay, batch_size=8)
    try:
        for counter in range(16, 2000):
            replay.add(make_step(counter), worker=0)
            if counter % 50 == 0:
                steps = prefetcher.next()["reward"].numpy().astype(int)
                assert np.all(np.diff(steps, axis=1) == 1)
    finally:
        prefetcher.close()


def test_shape_change_is_rejected_and_python_floats_stored_as_float32() -> None:
    replay = Replay(capacity=20, batch_length=2)
    replay.add({"image": np.zeros((4, 4, 3), np.uint8), "reward": 1.0, "is_first": True})
    assert replay._arrays["reward"].dtype == np.float32
    pattern = r"has 'image' of shape \(4, 5, 3\) but the first step stored in replay had \(4, 4, 3\)"
    with pytest.raises(ValueError, match=pattern):
        replay.add({"image": np.zeros((4, 5, 3), np.uint8), "reward": 1.0, "is_first": False})
    assert len(replay) == 1


def test_a_dtype_change_is_rejected_and_floats_stay_floats(tmp_path: Path) -> None:
    """An image that turns float mid-run would be cast back into the uint8 storage (0.8 -> 0) and
    written as float chunks beside uint8 ones: refused, naming the key and both dtypes. A float32
    vector that comes as float64 later goes into its float32 storage as before."""
    replay = Replay(capacity=20, batch_length=2, directory=tmp_path, chunk=2)
    replay.add({"image": np.zeros((4, 4, 3), np.uint8), "vector": np.zeros(2, np.float32), "is_first": True})
    replay.add({"image": np.zeros((4, 4, 3), np.uint8), "vector": np.ones(2, np.float64), "is_first": False})
    assert replay._arrays["vector"].dtype == np.float32 and replay._arrays["vector"][1].tolist() == [1.0, 1.0]
    for dtype in (np.float32, np.int64):
        pattern = rf"has 'image' of dtype {np.dtype(dtype)} but the first step stored in replay had uint8"
        with pytest.raises(ValueError, match=pattern):
            replay.add({"image": np.full((4, 4, 3), 0.8, dtype), "vector": np.zeros(2, np.float32),
                        "is_first": False})
    assert len(replay) == 2
    replay.flush()
    assert {np.load(chunk)["image"].dtype for chunk in tmp_path.rglob("*.npz")} == {np.dtype(np.uint8)}


def test_failed_chunk_write_warns_keeps_steps_and_retries(tmp_path: Path, monkeypatch) -> None:
    messages: list[str] = []
    replay = Replay(capacity=100, batch_length=2, directory=tmp_path, chunk=4, warn=messages.append)
    real_savez = np.savez

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    fill(replay, 5)
    assert len(messages) == 1 and "could not write replay chunk" in messages[0]
    assert "No space left on device" in messages[0] and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(np, "savez", real_savez)
    fill(replay, 3, offset=5)  # the 8th step is the next chunk boundary: all 8 written
    assert [p.name for p in tmp_path.iterdir()] == ["w000-000000000000.npz"]
    fill(replay, 1, offset=8)
    replay.flush()  # named by the running index of its first step: 8, after the 8-step chunk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w000-000000000000.npz", "w000-000000000008.npz"]
    loaded = Replay(capacity=100, batch_length=2, directory=tmp_path, chunk=4)
    assert loaded.load() == 9
    assert stored_counters(loaded) == {0: list(range(9))}


def test_load_warnings_go_to_the_warn_callback(tmp_path: Path) -> None:
    replay = Replay(capacity=100, batch_length=2, directory=tmp_path, chunk=4)
    fill(replay, 8)
    (tmp_path / "w000-000000000004.npz").write_bytes(b"")
    messages: list[str] = []
    loaded = Replay(capacity=100, batch_length=2, directory=tmp_path, chunk=4, warn=messages.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loaded.load() == 4
    assert len(messages) == 1 and "w000-000000000004.npz could not be read" in messages[0]
    with pytest.raises(RuntimeError, match=r"Replay\.load must run on an empty Replay"):
        loaded.load()


def test_sampler_rng_state_round_trip() -> None:
    replay = Replay(capacity=100, batch_length=4, seed=3)
    fill(replay, 50)
    state = replay.rng_state()
    first = replay.sample(8)["reward"]
    replay.set_rng_state(state)
    np.testing.assert_array_equal(replay.sample(8)["reward"], first)


def test_no_window_yet_gives_none_and_prefetcher_keeps_waiting() -> None:
    replay = Replay(capacity=10, batch_length=8, seed=0)
    for counter in range(10):  # two workers of 5 steps: no worker holds a full window
        replay.add(make_step(counter, counter % 2), worker=counter % 2)
    assert replay.try_sample(2) is None
    prefetcher = Prefetcher(replay, batch_size=2)
    try:
        for counter in range(10, 20):
            replay.add(make_step(counter, 0), worker=0)
        assert prefetcher.next()["worker"].sum() == 0
    finally:
        prefetcher.close()


WRITER_SCRIPT = """
import sys
import numpy as np
from replay import Replay
replay = Replay(capacity=100_000, batch_length=2, directory=sys.argv[1], chunk=64)
for counter in range(10**9):
    replay.add({"image": np.full((8, 8, 3), counter % 256, np.uint8), "reward": np.float32(counter),
                "is_first": counter % 100 == 0}, worker=counter % 2)
    if counter % 50 == 49:
        replay.flush()
        print(counter + 1, flush=True)
"""


def test_kill_9_during_writes_keeps_every_flushed_step_once(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(tmp_path)], cwd=root,
                               stdout=subprocess.PIPE, text=True)
    flushed = 0
    while flushed < 3000:
        flushed = int(process.stdout.readline())
    process.send_signal(signal.SIGKILL)
    process.wait()
    loaded = Replay(capacity=100_000, batch_length=2, directory=tmp_path, chunk=64)
    count = loaded.load()
    assert count >= flushed
    counters = stored_counters(loaded)
    # Each worker gets back a prefix of its stream (nothing twice) that holds every flushed step.
    assert counters[0] == list(range(0, 2 * len(counters[0]), 2))
    assert counters[1] == list(range(1, 2 * len(counters[1]) + 1, 2))
    assert counters[0][-1] >= flushed - 2 and counters[1][-1] >= flushed - 1


def test_prefetcher_reports_the_sampler_state_of_the_next_unconsumed_batch() -> None:
    """The thread samples ahead; a checkpoint keeps consumed_rng_state(), so a resumed replay with
    the same contents draws exactly the batch the run would have trained on next."""
    replay = Replay(capacity=200, batch_length=5, seed=3)
    fill(replay, 100)
    prefetcher = Prefetcher(replay, batch_size=4, depth=3)
    try:
        assert prefetcher.consumed_rng_state() is None
        prefetcher.next()
        saved = prefetcher.consumed_rng_state()
        expected_next = prefetcher.next()["reward"].numpy()
        deadline = time.time() + 5
        while prefetcher._queue.qsize() < 2 and time.time() < deadline:
            time.sleep(0.01)  # the thread has sampled further ahead by now
        assert replay.rng_state() != saved
    finally:
        prefetcher.close()
    resumed = Replay(capacity=200, batch_length=5, seed=99)
    fill(resumed, 100)
    resumed.set_rng_state(saved)
    np.testing.assert_array_equal(resumed.sample(4)["reward"], expected_next)


def test_a_replay_larger_than_memory_and_swap_stops_at_its_first_step_with_the_fix(tmp_path) -> None:
    """10 million 1024x1024x3 images (31 TB) cannot be reserved anywhere: one paragraph naming
    replay_size and the memory, before anything is stored or written."""
    from replay import ReplayMemoryError, machine_memory_bytes

    assert machine_memory_bytes() > 2 ** 30  # this machine's /proc/meminfo is read
    replay = Replay(capacity=10_000_000, batch_length=4, directory=tmp_path / "replay", chunk=2)
    step = {"image": np.zeros((1024, 1024, 3), np.uint8), "action": np.zeros(2, np.float32), "reward": 0.0,
            "is_first": True, "is_last": False, "is_terminal": False}
    with pytest.raises(ReplayMemoryError, match=r"replay: holding 10,000,000 steps of 3,145,7\d\d bytes each "
                                                r"\('image' \(1024, 1024, 3\) uint8 is the largest\) needs "
                                                r"29\d\d\d\.\d GiB, and this machine has .* Lower --replay_size "
                                                r"\(about [\d,]+ steps fit in half"):
        replay.add(step)
    assert len(replay) == 0 and not list((tmp_path / "replay").iterdir())


def test_a_replay_that_fits_but_takes_most_of_memory_warns_once_with_what_fits(tmp_path, monkeypatch) -> None:
    """On a machine of 1 MiB of memory and swap, 80 steps of 10 KiB (800 KiB) fit but take more than
    half: the replay starts, with one warning that names replay_size and the steps that fit in half."""
    import replay as replay_module

    monkeypatch.setattr(replay_module, "machine_memory_bytes", lambda: 2 ** 20)
    warnings_seen: list[str] = []
    replay = Replay(capacity=80, batch_length=4, directory=tmp_path / "replay", chunk=2, warn=warnings_seen.append)
    step = {"image": np.zeros((10 * 1024 - 17,), np.uint8), "action": np.zeros(2, np.float32), "reward": 0.0,
            "is_first": True, "is_last": False, "is_terminal": False}  # 10,238 bytes a step with the rest
    replay.add(step)
    replay.add({**step, "is_first": False})
    assert len(replay) == 2 and len(warnings_seen) == 1, warnings_seen
    assert warnings_seen[0] == (
        "replay: holding 80 steps needs 0.0 GiB once it is full, more than half of this machine's 0.0 GiB of "
        "memory and swap; the model, the envs and the system need the rest. If the run gets killed for memory, "
        "lower --replay_size to about 51 steps (with --parallel N each process holds replay_size / N, and all "
        "of them count).")
    quiet: list[str] = []
    Replay(capacity=40, batch_length=4, directory=tmp_path / "other", chunk=2, warn=quiet.append).add(step)
    assert quiet == []  # 400 KiB: under half
    # the bound between a warning and the error is the memory itself: 102 steps (1,044,276 bytes)
    # still start, 103 (1,054,514 bytes > 1 MiB) stop with the paragraph
    near: list[str] = []
    Replay(capacity=102, batch_length=4, directory=tmp_path / "near", chunk=2, warn=near.append).add(step)
    assert len(near) == 1 and "lower --replay_size to about 51 steps" in near[0]
    from replay import ReplayMemoryError

    with pytest.raises(ReplayMemoryError, match=r"holding 103 steps of 10,2\d\d bytes each"):
        Replay(capacity=103, batch_length=4, directory=tmp_path / "over", chunk=2).add(step)


def test_a_run_reserves_no_more_replay_than_its_steps(tmp_path) -> None:
    import config as config_lib
    import dreamer

    def capacity(*extra: str) -> int:
        cfg = config_lib.load_config(["--configs", "debug", "custom", "--task", "custom_reach",
                                      "--logdir", str(tmp_path / "run"), *extra])
        return dreamer.make_replay(cfg, dreamer.resolve_paths(cfg), dreamer.Dist(*extra_dist), print).capacity

    extra_dist = (0, 1)
    assert capacity("--steps", "400", "--replay_size", "1000000") == 401  # 400 steps + one env's last step
    assert capacity("--steps", "5000000", "--replay_size", "1000000") == 1_000_000
    extra_dist = (1, 2)  # rank 1 of 2 holds half
    assert capacity("--steps", "400", "--replay_size", "1000000") == 201
    assert capacity("--steps", "400", "--replay_size", "100", "--batch_length", "8") == 50


def test_a_resumed_run_keeps_the_steps_stored_after_its_checkpoint_on_disk(tmp_path) -> None:
    """A short run (--steps below replay_size) killed at step 576 after its checkpoint at 400, then
    resumed: the 176 steps stored after the checkpoint stay as training data, so its replay makes
    room for them as well as for the 300 steps to come, and deletes no chunk of the folder (with
    room for --steps alone, the 175 oldest steps were evicted and their chunks deleted)."""
    import config as config_lib
    import dreamer

    cfg = config_lib.load_config(["--configs", "debug", "custom", "--task", "custom_reach", "--logdir",
                                  str(tmp_path / "run"), "--steps", "700", "--replay_chunk", "16"])
    paths = dreamer.resolve_paths(cfg)
    first = dreamer.make_replay(cfg, paths, dreamer.Dist(0, 1), print)
    assert first.capacity == 701
    fill(first, 576)
    first.flush()
    assert replay_lib.steps_stored_in(paths.replay_dir) == 576
    resumed = dreamer.make_replay(cfg, paths, dreamer.Dist(0, 1), print, resumed_step=400)
    assert resumed.capacity == 576 + 300 + 1
    assert resumed.load() == 576
    fill(resumed, 300, offset=576)
    resumed.flush()
    assert orders_on_disk(paths.replay_dir) == list(range(876))
    assert len(resumed) == 876
    assert replay_lib.steps_stored_in(tmp_path / "nothing") == 0


def test_a_runs_replay_folder_holds_about_replay_size_steps_unless_told_to_keep_all(tmp_path) -> None:
    import config as config_lib
    import dreamer

    for keep, expected in (("False", list(range(300 - 60, 300))), ("True", list(range(300)))):
        cfg = config_lib.load_config(["--configs", "debug", "custom", "--task", "custom_reach", "--logdir",
                                      str(tmp_path / keep), "--replay_size", "60", "--replay_chunk", "20",
                                      "--replay_keep_evicted", keep])
        replay = dreamer.make_replay(cfg, dreamer.resolve_paths(cfg), dreamer.Dist(0, 1), print)
        fill(replay, 300)
        assert orders_on_disk(tmp_path / keep / "replay") == expected


def test_a_replay_smaller_than_one_sequence_is_raised_to_one_with_a_warning(tmp_path) -> None:
    import config as config_lib
    import dreamer

    cfg = config_lib.load_config(["--configs", "debug", "custom", "--task", "custom_reach", "--logdir",
                                  str(tmp_path / "run"), "--replay_size", "10", "--batch_length", "16"])
    said: list[str] = []
    assert dreamer.make_replay(cfg, dreamer.resolve_paths(cfg), dreamer.Dist(0, 1), said.append).capacity == 16
    assert said == ["replay_size 10 holds less than one sequence of batch_length 16: the replay holds 16 steps "
                    "instead"]


def test_a_chunk_reaches_the_disk_before_its_rename_and_the_rename_is_synced(tmp_path: Path, monkeypatch) -> None:
    directory = tmp_path.resolve()
    replay = Replay(capacity=100, batch_length=2, directory=directory, chunk=4)
    events = record_disk_events(monkeypatch)
    fill(replay, 4)
    chunk = directory / "w000-000000000000.npz"
    assert events == [("fsync", f"{chunk}.tmp"), ("replace", f"{chunk}.tmp -> {chunk}"), ("fsync", str(directory))]
    assert sorted(p.name for p in directory.iterdir()) == [chunk.name]


def test_machine_memory_is_memory_and_swap_from_meminfo(tmp_path: Path) -> None:
    from replay import machine_memory_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nSwapTotal:       1000000 kB\n")
    assert machine_memory_bytes(meminfo) == 1024 * 25_000_000
    meminfo.write_text("MemTotal:       24000000 kB\n")  # no swap line: memory alone
    assert machine_memory_bytes(meminfo) == 1024 * 24_000_000
    meminfo.write_text("nothing useful\n")
    assert machine_memory_bytes(meminfo) is None and machine_memory_bytes(tmp_path / "absent") is None


def test_the_memory_message_names_the_largest_key_by_bytes_and_at_least_one_step(monkeypatch) -> None:
    import replay as replay_module

    monkeypatch.setattr(replay_module, "machine_memory_bytes", lambda: 2 ** 12)
    layout = {"vector": ((1000,), np.float32), "mask": ((2000,), np.uint8)}  # 4,000 bytes against 2,000
    message = replay_module.replay_memory_message(10, 6000, layout, "why")
    assert "'vector' (1000,) float32 is the largest" in message
    assert "(about 1 steps fit in half" in message  # 2 KiB holds no 6,000-byte step: said as one
    assert replay_module.steps_in_half(2 ** 12, 6000) == 1 and replay_module.steps_in_half(2 ** 12, 100) == 20


def test_indexed_set_add_discard_draw_and_growth() -> None:
    from replay import _IndexedSet

    starts = _IndexedSet(capacity=4096)
    for item in range(1025):
        starts.add(item)
    assert len(starts) == 1025 and len(starts._items) == 2048  # doubled: amortised O(1) adds
    starts.discard(1024)  # the last item
    starts.discard(1024)  # twice: the second is a no-op
    assert len(starts) == 1024
    starts.discard(5 + 4096)  # another id of item 5's ring slot: not stored, nothing removed
    assert len(starts) == 1024
    starts.discard(5)  # swap-remove: the last item moves into its place
    assert len(starts) == 1023 and sorted(starts._items[:1023].tolist()) == [i for i in range(1024) if i != 5]
    drawn = starts.draw(np.random.default_rng(0), 20000)
    assert set(drawn.tolist()) == set(range(1024)) - {5}


def test_same_kind_of_values() -> None:
    from replay import same_kind_of_values

    assert same_kind_of_values(np.dtype(np.uint8), np.dtype(np.uint8))
    assert same_kind_of_values(np.dtype(np.float64), np.dtype(np.float32))  # python floats
    assert not same_kind_of_values(np.dtype(np.int64), np.dtype(np.float32))
    assert not same_kind_of_values(np.dtype(np.float32), np.dtype(np.uint8))
    assert not same_kind_of_values(np.dtype(np.bool_), np.dtype(np.float32))


def test_a_chunk_of_zero_steps_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Replay chunk must be >= 1 step, got 0; set replay_chunk >= 1"):
        Replay(capacity=10, batch_length=2, chunk=0)
    assert Replay(capacity=10, batch_length=2, chunk=1).chunk == 1


def test_a_refused_reservation_leaves_no_half_allocated_arrays(monkeypatch) -> None:
    import replay as replay_module
    from replay import ReplayMemoryError

    calls = []
    real_empty = np.empty

    class RefusingNumpy:  # replay's numpy, whose second np.empty fails as the OS refused it
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def empty(*args, **kwargs):
            calls.append(args)
            if len(calls) == 2:
                raise MemoryError
            return real_empty(*args, **kwargs)

    monkeypatch.setattr(replay_module, "np", RefusingNumpy())
    replay = Replay(capacity=10, batch_length=2)
    with pytest.raises(ReplayMemoryError, match=r"the operating system refused to reserve it"):
        replay.add(make_step(0))
    assert replay.step_shapes() == {}  # a later add allocates all keys again
    monkeypatch.setattr(replay_module, "np", np)
    replay.add(make_step(0))
    assert set(replay.step_shapes()) == set(make_step(0)) - {"log_debug"}


def test_an_undeletable_evicted_chunk_is_warned_about_once(tmp_path: Path, monkeypatch) -> None:
    warned: list[str] = []
    replay = Replay(capacity=8, batch_length=2, directory=tmp_path, chunk=4, warn=warned.append,
                    keep_evicted=False)

    def refuse(self, missing_ok=False):
        raise PermissionError("read-only folder")

    monkeypatch.setattr(Path, "unlink", refuse)
    fill(replay, 40)  # 10 chunks, 8 of them evicted in full
    assert len(warned) == 1 and "could not delete replay chunk" in warned[0] and "said once" in warned[0]
    assert len(list(tmp_path.glob("w000-*.npz"))) == 10


def test_contiguous_chunks_mark_no_extra_episode_starts(tmp_path: Path) -> None:
    replay = Replay(capacity=100, batch_length=2, directory=tmp_path, chunk=8)
    fill(replay, 40, episode=10)
    replay.flush()
    loaded = Replay(capacity=100, batch_length=2, directory=tmp_path, chunk=8)
    assert loaded.load() == 40
    slots = loaded._workers[0].ordered() % loaded.capacity
    assert loaded._arrays["is_first"][slots].nonzero()[0].tolist() == [0, 10, 20, 30]  # not 8, 16, ...


def test_a_chunk_with_no_steps_is_skipped_with_a_warning(tmp_path: Path) -> None:
    replay = Replay(capacity=100, batch_length=2, directory=tmp_path, chunk=8)
    fill(replay, 16)
    with np.load(tmp_path / "w000-000000000008.npz") as data:
        empty = {key: data[key][:0] for key in data.files}
    with open(tmp_path / "w000-000000000016.npz", "wb") as file:
        np.savez(file, **empty)
    loaded = Replay(capacity=100, batch_length=2, directory=tmp_path, chunk=8)
    with pytest.warns(UserWarning, match=r"w000-000000000016\.npz could not be read .*_order has shape \(0,\)"):
        assert loaded.load() == 16


def test_new_steps_after_a_resume_are_newer_than_every_workers_old_ones(tmp_path: Path) -> None:
    """Worker 1 wrote first and worker 0 last: steps added after a resume are ordered after both,
    so a later resume of a small replay keeps the new steps, not worker 0's old ones."""
    replay = Replay(capacity=100, batch_length=2, directory=tmp_path, chunk=4)
    fill(replay, 8, worker=1)
    fill(replay, 8, worker=0, offset=100)
    replay.flush()
    resumed = Replay(capacity=100, batch_length=2, directory=tmp_path, chunk=4)
    assert resumed.load() == 16
    fill(resumed, 4, worker=1, offset=200)
    resumed.flush()
    newest = Replay(capacity=4, batch_length=2, directory=tmp_path, chunk=4)
    assert newest.load() == 4
    assert stored_counters(newest) == {1: [200, 201, 202, 203]}


def test_episode_starts_are_counted_over_stored_steps_only() -> None:
    replay = Replay(capacity=100, batch_length=2)
    fill(replay, 30, episode=10)
    replay._arrays["is_first"][30:] = True  # what unwritten (np.empty) slots may hold
    assert replay.stats()["episodes_started"] == 3


def test_a_closed_prefetcher_says_so_instead_of_waiting() -> None:
    replay = Replay(capacity=100, batch_length=2)
    fill(replay, 10)
    prefetcher = Prefetcher(replay, batch_size=2)
    prefetcher.close()
    for _ in range(2):  # also when the thread queued a batch before it stopped
        with pytest.raises(RuntimeError, match=r"the replay prefetcher was closed \(close\(\) was called\)"):
            prefetcher.next()


def test_the_prefetcher_samples_at_most_depth_batches_ahead() -> None:
    replay = Replay(capacity=100, batch_length=2)
    fill(replay, 10)
    prefetcher = Prefetcher(replay, batch_size=3, depth=2)
    try:
        deadline = time.monotonic() + 30
        while prefetcher._queue.qsize() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # room for a thread that would run further ahead
        assert prefetcher._queue.qsize() == 2
        assert replay.stats()["samples"] <= 3 * 3  # two queued and one waiting for room
        prefetcher.next()
        time.sleep(0.2)
        assert replay.stats()["samples"] <= 4 * 3
    finally:
        prefetcher.close()


def test_load_takes_only_the_workers_it_is_asked_for(tmp_path: Path) -> None:
    """A rank of a parallel run loads its own envs' chunks (worker % world == rank); the counters
    still continue past every worker's chunks."""
    replay = Replay(capacity=100, batch_length=2, directory=tmp_path, chunk=4)
    for worker in range(3):
        fill(replay, 8, worker=worker, offset=100 * worker)
    replay.flush()
    rank_1 = Replay(capacity=100, batch_length=2, directory=tmp_path, chunk=4)
    assert rank_1.load(keep_worker=lambda worker: worker % 2 == 1) == 8
    assert stored_counters(rank_1) == {1: list(range(100, 108))}
    assert rank_1.steps_on_disk == 24 and rank_1._next_order == 24
