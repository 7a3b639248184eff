"""Multi-process training on torch.distributed with gloo on CPU (`--parallel N`)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "helpers"


def run(args: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "CI": "1", **env}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=environment)


def test_two_rank_gloo_debug_run_writes_one_set_of_logs(tmp_path):
    logdir = tmp_path / "two_ranks"
    result = run(["dreamer.py", "--configs", "debug", "custom", "--task", "custom_reach", "--parallel", "2",
                  "--device", "cpu", "--steps", "300", "--eval_every", "0", "--logdir", str(logdir)])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "parallel: 2 ranks, backend gloo" in result.stdout
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
    records = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    # 2 ranks x 1 env: the step counter moves by 2 per iteration and reaches --steps
    assert records[-1]["step"] == 300
    # custom_reach episodes are 50 agent steps after the reset step: each rank's 150 steps end 2
    # episodes, and rank 0 logs the episodes of both ranks
    assert records[-1]["perf/episodes"] == 4
    assert sum("episode/return" in r for r in records) >= 2
    assert (logdir / "latest.pt").exists()
    # one replay folder; the chunk names carry the global env index of each rank's env
    assert {p.name[:4] for p in (logdir / "replay").glob("*.npz")} == {"w000", "w001"}
    log = (logdir / "train.log").read_text()
    assert log.count("finished: 300 steps") == 1

    # resume across world sizes: 2 ranks -> 1 rank (which loads both ranks' replay) -> 2 ranks
    common = ["dreamer.py", "--configs", "debug", "custom", "--task", "custom_reach", "--device", "cpu",
              "--eval_every", "0", "--logdir", str(logdir)]
    one = run([*common, "--steps", "400", "--parallel", "1"])
    assert one.returncode == 0, one.stderr[-4000:]
    log = (logdir / "train.log").read_text()
    assert "resumed from" in log and "at step 300" in log and "replay: loaded 300 steps" in log
    two = run([*common, "--steps", "500", "--parallel", "2"])
    assert two.returncode == 0, two.stderr[-4000:]
    log = (logdir / "train.log").read_text()
    assert "at step 400" in log and "finished: 500 steps" in log
    # each rank loads its own envs' chunks (w000: 150 + the 1-rank run's 100 steps, w001: 150), once
    assert log.count("replay: loaded 400 steps") == 1, log
    steps = [json.loads(line)["step"] for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 500

    # the ranks of a resumed run: rank 0's weights everywhere, but generators of their own
    ranks = set_up_two_ranks(tmp_path / "resumed", common[1:])
    assert ranks[0]["step"] == ranks[1]["step"] == 500
    assert_ranks_start_alike_and_draw_apart(ranks)


def set_up_two_ranks(out: Path, argv: list[str]) -> list[dict]:
    """What each rank of a 2-rank run starts with, after the trainer's set-up (tests/helpers/dist_ranks.py)."""
    out.mkdir()
    result = run([str(HELPERS / "dist_ranks.py"), "--out", str(out), *argv])
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def assert_ranks_start_alike_and_draw_apart(ranks: list[dict]) -> None:
    first, second = ranks
    torch.testing.assert_close(second["params"], first["params"], rtol=0, atol=0)  # rank 0's, broadcast
    for key in ("actions", "torch"):
        assert not torch.equal(first[key], second[key]), key
    assert first["python"] != second["python"] and first["numpy"] != second["numpy"]
    assert first["replay_rng"] != second["replay_rng"]
    # the return normaliser's gather: every rank's values, in rank order, on every rank
    for rank in ranks:
        assert rank["gathered"].tolist() == [0.0, 10.0, 1.0, 11.0]
        assert rank["agreed"] == [False, True]  # one rank's failed CUDA-graph capture is every rank's


def test_the_ranks_of_a_fresh_run_start_from_rank_0s_weights_with_generators_of_their_own(tmp_path):
    """Each rank seeds its generators apart (or every rank would take the same random prefill
    actions and policy noise), and so builds other initial weights: rank 0's are broadcast."""
    ranks = set_up_two_ranks(tmp_path / "fresh", ["--configs", "debug", "custom", "--task", "custom_reach",
                                                  "--device", "cpu", "--logdir", str(tmp_path / "run")])
    assert ranks[0]["step"] == ranks[1]["step"] == 0
    assert_ranks_start_alike_and_draw_apart(ranks)


def test_one_update_on_two_ranks_equals_one_on_the_whole_batch(tmp_path):
    common = ["--configs", "debug", "custom", "--task", "custom_reach", "--batch_size", "4"]
    single = run([str(HELPERS / "dist_equivalence.py"), "--world", "1", "--out", str(tmp_path / "one.pt"), *common])
    assert single.returncode == 0, single.stderr[-4000:]
    double = run([str(HELPERS / "dist_equivalence.py"), "--world", "2", "--out", str(tmp_path / "two.pt"), *common])
    assert double.returncode == 0, double.stderr[-4000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    # the averaged gradients of the world model, actor and critic equal the whole-batch ones
    assert len(one["grads"]) == len(two["grads"]) == 3
    for whole, halves in zip(one["grads"], two["grads"]):
        assert whole.abs().max() > 0
        torch.testing.assert_close(halves, whole, rtol=1e-3, atol=1e-6 * float(whole.abs().max()))
    # and so do the parameters after the step; Adam's first step moves each weight by about +-lr,
    # so a gradient that is zero up to rounding may flip sign: allow 2 lr on such elements only
    lr = 1e-4
    for name, value in one["params"].items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(two["params"][name], value, rtol=0, atol=2 * lr + 1e-7, msg=name)


def test_a_failing_rank_stops_the_whole_run_with_its_message(tmp_path):
    start = time.time()
    result = run(["dreamer.py", "--configs", "debug", "gym", "--task", "gym_faulty_env:Faulty-v0",
                  "--parallel", "2", "--device", "cpu", "--prefill", "1000", "--steps", "5000",
                  "--logdir", str(tmp_path / "faulty")], timeout=120, PYTHONPATH=str(HELPERS))
    elapsed = time.time() - start
    # rank 1's env raises from its 15th step of every episode: each restart is warned about on
    # stderr (rank 1 writes no train.log), the first with its traceback; after 10 in a row rank 1
    # stops with one paragraph, and the others stop with it
    assert result.returncode == 2, result.stderr[-4000:]
    assert result.stderr.count("[rank 1] [") >= 10  # the restart warnings
    assert result.stderr.count("RuntimeError: deliberate failure inside the env of rank 1\n") >= 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: [rank 1] env 1: failed after 10 restarts in a row, each within 1000 steps of the one before "
        "(limit max_restarts=10); its last failure: RuntimeError: deliberate failure inside the env of rank 1 "
        "(the tracebacks are in this rank's errors above). Rank 0 keeps the last checkpoint: fix the env "
        f"and run the same command again (it resumes from {tmp_path / 'faulty' / 'latest.pt'} by itself), or "
        f"add --from_checkpoint {tmp_path / 'faulty' / 'latest.pt'}; or allow more restarts in a row with "
        "--envs.max_restarts N."], result.stderr[-4000:]
    assert "Connection closed" not in result.stderr  # rank 0's broken collective is not shown
    assert elapsed < 60, elapsed


def test_a_user_error_in_the_ranks_exits_2_with_its_paragraph(tmp_path):
    """The guide's placeholder task under --parallel: every rank fails with the same paragraph, which
    is printed once (no traceback), and the run exits 2, like a single-process run."""
    result = run(["dreamer.py", "--configs", "debug", "custom", "--task", "custom_task_name",
                  "--parallel", "2", "--device", "cpu", "--logdir", str(tmp_path / "run")], timeout=120)
    assert result.returncode == 2, result.stderr[-4000:]
    assert result.stderr.count("'custom_task_name' is the guide's placeholder for your task's name") == 1
    assert "(the same error stopped ranks 0, 1)" in result.stderr
    assert "Traceback" not in result.stderr and "failed:" not in result.stderr
    assert "SIGTERM" not in result.stderr and "Terminating process" not in result.stderr, result.stderr
