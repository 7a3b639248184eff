"""dreamer.py's run set-up on its own: the run folder's lock, a resumed rank's own generators, the
paragraph of an env that fails to start, and where --from_checkpoint points."""
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
