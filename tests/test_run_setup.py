"""dreamer.py's run set-up on its own: the run folder's lock, a resumed rank's own generators, the
paragraph of an env that fails to start, and where --from_checkpoint points."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import config as config_lib
import dreamer
import envs
from logger import Logger
from replay import Replay
from tools import FolderLock


def paths_of(logdir: Path) -> dreamer.RunPaths:
    return dreamer.RunPaths(logdir, logdir / "latest.pt", None, logdir / "replay")


def test_an_evaluation_takes_no_lock_so_it_runs_beside_the_training_run(tmp_path):
    running = FolderLock(tmp_path)  # stands for the training run in this folder
    assert running.acquire() is None
    try:
        assert dreamer.lock_run_folder(paths_of(tmp_path), dreamer.Dist(), eval_only=True) is None
        assert dreamer.lock_run_folder(paths_of(tmp_path), dreamer.Dist(1, 2), eval_only=False) is None  # rank 1
        with pytest.raises(dreamer.RunError, match=r"is in use by another run \(pid \d+"):
            dreamer.lock_run_folder(paths_of(tmp_path), dreamer.Dist(), eval_only=False)
    finally:
        running.release()


def test_the_lock_probe_names_the_holder_and_writes_nothing(tmp_path):
    assert FolderLock(tmp_path / "new").holder() is None and not (tmp_path / "new").exists()
    running = FolderLock(tmp_path)
    assert running.acquire() is None
    try:
        assert FolderLock(tmp_path).holder() == f"pid {os.getpid()}"
    finally:
        running.release()
    assert FolderLock(tmp_path).holder() is None  # free again, and the probe left it free
    assert FolderLock(tmp_path).acquire() is None


def test_a_folder_that_cannot_be_written_leaves_no_lock_behind(tmp_path):
    (tmp_path / "replay").write_text("a file where the replay folder goes")
    with pytest.raises(dreamer.RunError, match=r"cannot write to the run folder .*NotADirectoryError: .*replay is a "
                                               r"file, where the replay folder goes"):
        dreamer.lock_run_folder(paths_of(tmp_path), dreamer.Dist(), eval_only=False)
    (tmp_path / "replay").unlink()
    lock = dreamer.lock_run_folder(paths_of(tmp_path), dreamer.Dist(), eval_only=False)  # free again
    assert lock is not None
    lock.release()


def test_a_resumed_rank_other_than_0_draws_with_generators_of_its_own():
    """The checkpoint holds rank 0's generator states; ranks 1 and 2 reseeded at one step draw
    differently from each other (and as rank_seed says, repeatably)."""
    import exploration

    cfg = config_lib.load_config(["--configs", "debug", "--task", "custom_reach", "--device", "cpu"])
    env = envs.make_env(cfg, "train", 0)
    agent = exploration.make_agent(env.obs_space, env.act_space, cfg, "cpu")
    replay = Replay(64, 4)
    for t in range(20):
        replay.add({"vector": np.full(2, t, np.float32), "action": np.zeros(2, np.float32), "reward": np.float32(t),
                    "is_first": t == 0, "is_last": False, "is_terminal": False})

    def draws(rank):
        dreamer.reseed_resumed_rank(cfg, agent, replay, rank, step=300)
        return (agent.random_actions(4), replay.sample(3)["reward"].tolist(), torch.rand(3), np.random.rand(3))

    one, two, again = draws(1), draws(2), draws(1)
    for a, b, c in zip(one, two, again):
        assert not np.array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_an_env_that_fails_to_start_is_named_by_its_global_index(tmp_path):
    error = ValueError("the level file is missing")
    error.env_index, error.worker_traceback = 5, "Traceback (most recent call last):\nValueError: the level file is missing\n"
    logger = Logger(tmp_path, tensorboard=False)
    try:
        paragraph = str(dreamer.env_start_failure(error, "eval", 4, logger))
    finally:
        logger.close()
    assert paragraph.startswith("eval env 5 failed to start (while it was built, or in the start-up check's reset() "
                                "and one step()): ValueError: the level file is missing (its traceback is in ")
    assert "eval env 5 failed to start:\nTraceback" in (tmp_path / "train.log").read_text()


def test_from_checkpoint_names_a_file_or_the_run_folder_holding_latest_pt(tmp_path):
    assert dreamer.checkpoint_file(str(tmp_path)) == tmp_path / "latest.pt"
    assert dreamer.checkpoint_file(str(tmp_path / "latest.prev.pt")) == tmp_path / "latest.prev.pt"
    cfg = config_lib.load_config(["--task", "custom_reach", "--from_checkpoint", str(tmp_path)])
    paths = dreamer.resolve_paths(cfg)
    assert (paths.logdir, paths.resume_from) == (tmp_path, tmp_path / "latest.pt")  # continues in its folder


# --- what does not fit in memory: the model, the batches, an update


def test_a_model_too_large_for_memory_stops_naming_its_sizes():
    cfg = config_lib.load_config(["--configs", "debug", "--task", "custom_reach", "--device", "cpu",
                                  "--rssm.deter", "300000"])  # a 1 TB GRU weight
    env = envs.make_env(cfg, "train", 0)
    with pytest.raises(dreamer.RunError, match=r"^building the model on cpu failed for want of memory \(RuntimeError: "
                                               r".*can't allocate memory.*\): its sizes \(rssm\.deter 300000, rssm\.hidden "
                                               r"32, .*critic\.units 32\) are too large for this machine\. Use a smaller "
                                               r"size block"):
        dreamer.make_agent(cfg, env.obs_space, env.act_space, torch.device("cpu"))


def test_batches_too_large_for_memory_stop_before_the_first_update():
    from replay import ReplayMemoryError, check_batch_memory

    check_batch_memory(16, 64, 12_319)  # the paper's batch of 64x64 images: 12 MiB
    with pytest.raises(ReplayMemoryError, match=r"^a batch of batch_size 1,000,000,000 x batch_length 64 steps of "
                                                r"12,319 bytes each takes [\d.]+ GiB, and a run holds 4 at once .* Lower "
                                                r"--batch_size or --batch_length"):
        check_batch_memory(10 ** 9, 64, 12_319)
    # the replay's own step layout: uint8 image, float64 stored as float32, the action, reward and flags
    space = {"image": envs.checker.gymnasium.spaces.Box(0, 255, (64, 64, 3), np.uint8),
             "vector": envs.checker.gymnasium.spaces.Box(-1, 1, (4,), np.float64)}
    assert dreamer.stored_step_bytes(space, 6) == 64 * 64 * 3 + 4 * 4 + 6 * 4 + 4 + 3


def test_out_of_memory_errors_are_told_from_other_failures():
    caused = RuntimeError("replay prefetch thread failed: MemoryError('Unable to allocate 3 TiB')")
    caused.__cause__ = MemoryError("Unable to allocate 3 TiB")
    for error in (MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), caused,
                  RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"),
                  OverflowError("Python int too large")):
        assert dreamer.is_out_of_memory(error), error
    for error in (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("memory"), KeyError("x")):
        assert not dreamer.is_out_of_memory(error), error


def test_an_update_out_of_memory_stops_keeping_the_checkpoint_and_the_replay(tmp_path, monkeypatch, capsys):
    """The update after the checkpoint at step 200 runs out of memory (as a GPU update of too large a
    batch does): one paragraph naming the batch, exit 2, latest.pt as it was, every step on disk."""
    import exploration
    import replay as replay_lib

    logdir = tmp_path / "run"
    args = ["--configs", "debug", "custom", "--task", "custom_reach", "--logdir", str(logdir), "--device", "cpu",
            "--save_every", "100", "--eval_every", "0", "--replay_chunk", "16", "--train_ratio", "8"]
    assert dreamer.main([*args, "--steps", "200"]) == 0
    kept = (logdir / "latest.pt").read_bytes()

    def out_of_memory(self, batch, after_world_model=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(exploration.Agent, "train_step", out_of_memory)
    capsys.readouterr()
    assert dreamer.main([*args, "--steps", "400"]) == 2
    paragraph = capsys.readouterr().err.strip().splitlines()[-1]
    assert paragraph.startswith(
        "error: an update ran out of memory on cpu (OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 "
        "GiB): a batch of batch_size 4 sequences of batch_length 16 steps and the model's activations over it do "
        "not fit. "
        f"Nothing was saved over the last checkpoint {logdir / 'latest.pt'}, and the replay on disk is kept."), paragraph
    assert (logdir / "latest.pt").read_bytes() == kept
    assert replay_lib.steps_stored_in(logdir / "replay") > 200  # the steps after the checkpoint: flushed


def test_a_run_whose_sequences_are_longer_than_its_data_says_it_waits_once(tmp_path):
    """batch_length 500 in a 300-step run: no env ever holds a sequence, so nothing trains; one line
    says why (the run ended with 0 updates and nothing said)."""
    logdir = tmp_path / "run"
    assert dreamer.main(["--configs", "debug", "custom", "--task", "custom_reach", "--logdir", str(logdir),
                         "--device", "cpu", "--steps", "300", "--batch_length", "500", "--eval_every", "0"]) == 0
    log = (logdir / "train.log").read_text()
    waits = [line for line in log.splitlines() if "training waits" in line]
    assert len(waits) == 1 and waits[0].endswith(
        "INFO training waits at step 100: no env has stored a sequence of batch_length 500 steps yet (updates start "
        "once one has, and catch up on the train_ratio owed since)"), waits
    assert "finished: 300 steps, 0 updates" in log
