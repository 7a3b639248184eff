"""Checkpoints and resume that never lose a run (issue 6): an exact round trip of the agent and
every RNG, a real `kill -9` followed by the same command, a corrupt latest.pt, a checkpoint built
for another model, a missing path, --from_checkpoint without --logdir, map_location and compile.

The CLI runs share one killed-then-resumed run (module fixture); the tests that change a run work
on their own copy of its folder. tests/test_training.py already covers a clean stop/resume and
--eval_only, so they are not repeated here.
"""
from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import config as config_lib
import dreamer
import envs
import exploration
from logger import Logger
from replay import CHUNK_NAME, ORDER_KEY, Replay
from tools import set_seed

ROOT = Path(__file__).resolve().parents[1]

# A short run with frequent checkpoints and small replay chunks; train_ratio 8 keeps the updates
# cheap: (600 - 100 prefill) * 8 / (4 x 16) + 1 = 63 updates in all.
STEPS, SAVE_EVERY, LOG_EVERY = 600, 100, 20
EXPECTED_UPDATES = (STEPS - 100) * 8 // (4 * 16) + 1


def run_args(logdir: Path | None, *extra: str, steps: int = STEPS) -> list[str]:
    args = ["--configs", "debug", "custom", "--task", "custom_reach", "--steps", str(steps),
            "--save_every", str(SAVE_EVERY), "--log_every", str(LOG_EVERY), "--replay_chunk", "16",
            "--eval_every", "0", "--train_ratio", "8", "--save_every_minutes", "0"]
    if logdir is not None:
        args += ["--logdir", str(logdir)]
    return args + list(extra)


def cli_command(args: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "dreamer.py"), *args]


def cli_env() -> dict[str, str]:
    return {**os.environ, "CI": "1", "PYTHONPATH": str(ROOT)}


def run_cli(args: list[str], cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(args), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=cli_env())


def read_metrics(logdir: Path) -> list[dict]:
    text = (logdir / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def saved_steps(log: str) -> list[int]:
    return [int(s) for s in re.findall(r"INFO saved checkpoint \S+latest\.pt at step (\d+)\n", log)]


def resumed_step(log: str) -> int:
    match = re.search(r"INFO resumed from \S+ at step (\d+) \((\d+) updates\)\n", log)
    assert match, log[-3000:]
    return int(match.group(1))


def steps_on_disk(replay_dir: Path) -> np.ndarray:
    """The `_order` ids of every step in the replay chunk files (tmp files of a killed write are
    not chunks)."""
    orders = []
    for path in sorted(replay_dir.iterdir()):
        if CHUNK_NAME.match(path.name):
            with np.load(path) as data:
                orders.append(data[ORDER_KEY])
    return np.concatenate(orders) if orders else np.zeros(0, np.int64)


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# ------------------------------------------------------------------------- kill -9, then resume


def wait_for_logged_step(process: subprocess.Popen, train_log: Path, step: int,
                         timeout: float = 180.0) -> None:
    """Wait until train.log shows the metrics line of `step`."""
    pattern = re.compile(rf"\] step {step} \|")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if train_log.exists() and pattern.search(train_log.read_text()):
            return
        assert process.poll() is None, f"the run ended (code {process.returncode}) before step {step}"
        time.sleep(0.02)
    raise AssertionError(f"step {step} was not logged within {timeout} s")


KILLED_RUN_EXTRA = ("--replay_keep_evicted", "True")  # the whole run stays on disk, so every step can be counted


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> dict:
    """A run killed with SIGKILL at a random moment after its first checkpoint, then resumed with
    the very same command (no --from_checkpoint: the logdir's latest.pt is found by itself)."""
    logdir = tmp_path_factory.mktemp("kill") / "run"
    args = run_args(logdir, *KILLED_RUN_EXTRA)
    out = open(logdir.parent / "first.out", "w")
    process = subprocess.Popen(cli_command(args), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                               env=cli_env())
    chance = random.SystemRandom()
    # an arbitrary moment after the first checkpoint (step 100): a little after a random log step
    # in (100, 240], so the kill lands mid-step, mid-update, mid-save or between a log and a save
    logged = 100 + LOG_EVERY * chance.randint(1, 7)
    delay = chance.uniform(0.0, 0.4)
    try:
        wait_for_logged_step(process, logdir / "train.log", logged)
        time.sleep(delay)
        assert process.poll() is None, "the run finished before it could be killed"
        process.kill()  # SIGKILL: no handler, no final save, no flush
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        out.close()
    assert process.returncode == -9
    log_before = (logdir / "train.log").read_text()
    metrics_before = read_metrics(logdir)
    disk_before = steps_on_disk(logdir / "replay")
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log_after = (logdir / "train.log").read_text()
    return {
        "logdir": logdir, "moment": f"{delay:.2f} s after step {logged} was logged",
        "log_before": log_before, "metrics_before": metrics_before, "disk_before": disk_before,
        "new_log": log_after[len(log_before):], "metrics_after": read_metrics(logdir),
    }


def test_kill_9_then_same_command_resumes_from_the_last_saved_step(killed_run):
    saves, new_log = saved_steps(killed_run["log_before"]), killed_run["new_log"]
    step = resumed_step(new_log)
    assert step > 0, f"resumed from zero (killed {killed_run['moment']})"
    # the save logged last, or a later one whose write finished just before the kill
    assert step in (saves[-1], saves[-1] + SAVE_EVERY), (step, saves, killed_run["moment"])
    assert step % SAVE_EVERY == 0
    assert re.search(rf"resumed from \S*{re.escape(str(killed_run['logdir']))}/latest\.pt at step {step}",
                     new_log)
    # counters continue: the run ends with the updates an uninterrupted run does, not more or fewer
    assert f"INFO finished: {STEPS} steps, {EXPECTED_UPDATES} updates" in new_log
    checkpoint_state = checkpoint.load_checkpoint(killed_run["logdir"] / "latest.pt")
    assert checkpoint_state["counters"]["step"] == STEPS
    assert checkpoint_state["counters"]["updates"] == EXPECTED_UPDATES


def test_replay_after_a_kill_holds_every_step_written_before_it_once(killed_run):
    new_log, disk_before = killed_run["new_log"], killed_run["disk_before"]
    step = resumed_step(new_log)
    match = re.search(r"INFO replay: loaded (\d+) steps from ", new_log)
    assert match, new_log[-3000:]
    loaded = int(match.group(1))
    # chunks are flushed before every save, so the steps up to the checkpoint are all on disk, and
    # the full chunks written between that save and the kill come back too
    assert loaded == len(disk_before) >= step, (loaded, len(disk_before), step)
    assert len(np.unique(disk_before)) == len(disk_before)
    # the steps written after the checkpoint are kept, and the resume says how many (once)
    unsaved = len(disk_before) - step
    said = re.findall(r"replay: (\d+) of its steps were collected after the checkpoint's step (\d+)", new_log)
    assert said == ([(str(unsaved), str(step))] if unsaved else []), (said, unsaved, killed_run["moment"])
    final = checkpoint.load_checkpoint(killed_run["logdir"] / "latest.pt")["counters"]
    assert final["replay_unsaved"] == unsaved
    # the resumed run adds its own steps after them and never rewrites or repeats one
    disk_after = steps_on_disk(killed_run["logdir"] / "replay")
    assert len(disk_after) == len(disk_before) + (STEPS - step)
    assert len(np.unique(disk_after)) == len(disk_after)
    assert set(disk_before.tolist()) <= set(disk_after.tolist())


def test_unsaved_replay_steps_are_counted_once_across_resumes():
    """Steps a killed run stored after its checkpoint are counted at the resume that finds them and
    carried in the counters, so a later resume (the disk then holds them plus every counted step)
    does not report them again; fewer steps on disk than counted (lost chunks) count as none."""
    counters = dreamer.Counters(step=300)
    assert dreamer.count_unsaved_replay(counters, 340, None) == 40 and counters.replay_unsaved == 40
    counters.step = 500  # trained on; saved; killed right after that save; resumed again
    assert dreamer.count_unsaved_replay(counters, 540, None) == 0 and counters.replay_unsaved == 40
    assert dreamer.count_unsaved_replay(counters, 560, None) == 20 and counters.replay_unsaved == 60
    assert dreamer.count_unsaved_replay(dreamer.Counters(step=300), 200, None) == 0


def episode_starts(replay_dir: Path) -> dict[int, bytes]:
    """The first `vector` observation of every episode in the replay chunks, by its `_order` id."""
    starts = {}
    for path in sorted(replay_dir.iterdir()):
        if CHUNK_NAME.match(path.name):
            with np.load(path) as data:
                for order, first, vector in zip(data[ORDER_KEY], data["is_first"], data["vector"]):
                    if first:
                        starts[int(order)] = vector.tobytes()
    return starts


def test_resumed_train_envs_do_not_replay_the_first_runs_episodes(killed_run):
    """Train env seeds are moved on resume (envs.env_seed's shift): the episodes started after the
    resume begin from other initial states than the killed run's (which all came from one seed)."""
    disk_before = set(killed_run["disk_before"].tolist())
    starts = episode_starts(killed_run["logdir"] / "replay")
    before = {v for order, v in starts.items() if order in disk_before}
    after = {v for order, v in starts.items() if order not in disk_before}
    assert len(before) >= 3 and len(after) >= 3, (len(before), len(after))
    assert not before & after


def test_logged_step_never_goes_backwards_across_a_kill(killed_run):
    """What is asserted: after the resume, metrics.jsonl holds each log step exactly once, in
    increasing order (LOG_EVERY, 2 LOG_EVERY, ..., STEPS): the records of the killed run up to the
    checkpoint's step S are kept as they were, the ones it logged after S are dropped (the resumed
    run logs those steps again, and train.log says how many were dropped), and perf/updates
    continues from the checkpoint instead of restarting near zero."""
    before, final = killed_run["metrics_before"], killed_run["metrics_after"]
    step, new_log = resumed_step(killed_run["new_log"]), killed_run["new_log"]
    steps_before = [r["step"] for r in before]
    assert steps_before == sorted(steps_before) and steps_before[-1] >= step, (steps_before, step)
    assert [r["step"] for r in final] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert final[: step // LOG_EVERY] == [r for r in before if r["step"] <= step]
    relogged = sum(r["step"] > step for r in before)
    if relogged:
        assert (f"INFO metrics.jsonl: moved {relogged} records logged after step {step} to "
                "metrics.dropped.jsonl\n") in new_log
        aside = [json.loads(line) for line in (killed_run["logdir"] / "metrics.dropped.jsonl").read_text().splitlines()]
        assert aside == [r for r in before if r["step"] > step]
    else:
        assert "metrics.jsonl: moved" not in new_log
    updates = [r["perf/updates"] for r in final]
    assert updates == sorted(updates) and updates[-1] == EXPECTED_UPDATES


def test_logger_rewind_drops_later_records_and_a_cut_line(tmp_path):
    logger = Logger(tmp_path)
    for step in (10, 20, 30):
        logger.scalar("loss/model", float(step))
        logger.write(step)
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 40, "loss/mo')  # a record cut short by kill -9
    # a resume rewinds in a new process, seconds after the first run wrote; TensorBoard orders a
    # folder's events files by name (creation second first), so keep the two files a second apart
    time.sleep(1.05)
    assert logger.rewind(20) == 2
    assert (tmp_path / "metrics.dropped.jsonl").read_text() == '{"step": 30, "loss/model": 30.0}\n{"step": 40, "loss/mo\n'
    logger.scalar("loss/model", 31.0)
    logger.write(30)
    logger.close()
    assert read_metrics(tmp_path) == [{"step": 10, "loss/model": 10.0}, {"step": 20, "loss/model": 20.0},
                                      {"step": 30, "loss/model": 31.0}]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss/model")] == [(10, 10.0), (20, 20.0), (30, 31.0)]


# ------------------------------------------------------------------------- damaged or wrong runs


def test_corrupt_latest_falls_back_to_the_previous_checkpoint(killed_run, tmp_path):
    logdir = copy_run(killed_run["logdir"], tmp_path / "run")
    latest = logdir / "latest.pt"
    previous_step = checkpoint.load_checkpoint(logdir / "latest.prev.pt")["counters"]["step"]
    assert previous_step == STEPS - SAVE_EVERY
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 3])  # truncated, as by a full disk or a dying node
    log_start = len((logdir / "train.log").read_text())
    result = run_cli(run_args(logdir))
    assert result.returncode == 0, result.stderr[-3000:]
    new_log = (logdir / "train.log").read_text()[log_start:]
    assert re.search(
        rf"WARNING checkpoint \S+/latest\.pt is truncated or corrupt \(\w+: .*\); resuming from the "
        r"previous checkpoint latest\.prev\.pt instead \(the steps after it are trained again\)\.\n",
        new_log), new_log[-3000:]
    assert resumed_step(new_log) == previous_step
    assert re.search(r"INFO resumed from \S+/latest\.prev\.pt at step", new_log)  # the file it really used
    assert saved_steps(new_log) == [STEPS]
    # the fallback is still there after the next save: the corrupt file never replaces it
    assert checkpoint.load_checkpoint(latest)["counters"]["step"] == STEPS
    assert checkpoint.load_checkpoint(logdir / "latest.prev.pt")["counters"]["step"] == previous_step


@pytest.mark.parametrize("tmp_file", ["complete", "partial"])
def test_from_checkpoint_resumes_when_a_save_stopped_between_its_renames(killed_run, tmp_path, tmp_file):
    """A kill between save_checkpoint's two renames leaves latest.prev.pt and a complete
    latest.pt.tmp but no latest.pt: the guide's --from_checkpoint .../latest.pt resumes from the
    tmp file, the newest checkpoint; a kill while the tmp file was written (partial) from prev."""
    logdir = copy_run(killed_run["logdir"], tmp_path / "run")
    (logdir / "latest.pt").rename(logdir / "latest.pt.tmp")
    if tmp_file == "partial":
        data = (logdir / "latest.pt.tmp").read_bytes()
        (logdir / "latest.pt.tmp").write_bytes(data[: len(data) // 2])
    result = run_cli(run_args(None, "--from_checkpoint", str(logdir / "latest.pt")))
    assert result.returncode == 0, result.stderr[-3000:]
    log = (logdir / "train.log").read_text()
    if tmp_file == "complete":
        assert re.search(r"WARNING checkpoint \S+/latest\.pt is missing but latest\.pt\.tmp beside it is "
                         r"complete \(a stop between the two renames of a save\); resuming from it\.", log), log[-3000:]
        assert re.search(r"INFO resumed from \S+/latest\.pt\.tmp at step", log)
        assert resumed_step(log.split("WARNING checkpoint")[-1]) == STEPS
    else:
        assert re.search(r"WARNING checkpoint \S+/latest\.pt is missing; resuming from the previous "
                         r"checkpoint latest\.prev\.pt instead", log), log[-3000:]
        assert re.search(r"INFO resumed from \S+/latest\.prev\.pt at step", log)
        assert resumed_step(log.split("WARNING checkpoint")[-1]) == STEPS - SAVE_EVERY


def test_other_env_spaces_under_the_same_task_name_are_named(killed_run, tmp_path):
    """The same task with another image size (an env option): the error names the observation that
    changed, not the model size, and nothing of the run is touched."""
    logdir = copy_run(killed_run["logdir"], tmp_path / "run")
    def files() -> dict[str, bytes]:  # all but the log (which records the error) and the lock
        return {path.name: path.read_bytes() for path in logdir.iterdir()
                if path.is_file() and path.name not in ("train.log", ".lock")}

    before = files()
    result = run_cli(run_args(logdir, "--env.custom.size", "32,32"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.fullmatch(
        r"error: the checkpoint \S+/latest\.pt was trained on other spaces of task custom_reach: observation "
        r"'image' \(64, 64, 3\) uint8 then, \(32, 32, 3\) uint8 now\. The env's options \(env\.<suite> in the "
        r"config, e\.g\. an image size\) or its code changed since.*a new --logdir\.", last_line(result.stderr)), \
        result.stderr[-3000:]
    assert files() == before


@pytest.mark.parametrize("extra, differs", [
    (("--env.custom.size", "32,32"), r"'image' \(64, 64, 3\) in the replay, \(32, 32, 3\) in this run"),
    # another task of other actions (a continuous reach's 2 against a discrete one's 5 one-hot)
    (("--task", "custom_reach_discrete", "--actor_dist", "onehot"), r"'action' \(2,\) in the replay, \(5,\) in this run"),
], ids=["image_size", "action_space"])
def test_a_replay_left_without_checkpoints_must_fit_the_env(killed_run, tmp_path, extra, differs):
    """A folder whose checkpoints were deleted but whose replay stayed, trained again with another
    image size or another task's actions: one paragraph naming the replay and the shapes, exit 2,
    and the folder's curves and config are not moved aside or rewritten first."""
    logdir = copy_run(killed_run["logdir"], tmp_path / "run")
    for stale in logdir.glob("latest*.pt"):
        stale.unlink()
    def kept_files() -> dict[str, bytes | None]:
        return {name: (logdir / name).read_bytes() if (logdir / name).exists() else None
                for name in ("metrics.jsonl", "metrics.dropped.jsonl", "config.yaml")}

    kept = kept_files()
    assert kept["metrics.jsonl"] and kept["config.yaml"]
    result = run_cli(run_args(logdir, *extra))
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.fullmatch(
        r"error: the replay in \S+/replay was recorded with other observations or actions than this run's env "
        rf"and agent give: {differs}\. It comes from an earlier run in this folder.*nothing in the folder was "
        r"changed\.", last_line(result.stderr)), result.stderr[-3000:]
    assert kept_files() == kept


def test_a_diverging_run_stops_keeping_its_last_checkpoint_and_all_its_replay(tmp_path):
    """Resumed with a learning rate that blows the weights up to NaN: one paragraph (exit 2) naming the
    step, the parts and the learning rates; latest.pt and latest.prev.pt keep their bytes (a save at the
    stop would have replaced them with the NaN model), and the steps stepped since are on disk."""
    logdir = tmp_path / "run"
    assert run_cli(run_args(logdir, steps=200)).returncode == 0
    kept = {name: (logdir / name).read_bytes() for name in ("latest.pt", "latest.prev.pt")}
    result = run_cli(run_args(logdir, "--model_lr", "1e6", steps=400))
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.fullmatch(
        r"error: training diverged by step (\d+) \((\d+) updates\): the world model( and the task actor and critic)? "
        r"parameters hold NaN or inf, so the agent can neither learn nor act any more\. Nothing was saved over the "
        rf"last checkpoint {re.escape(str(logdir / 'latest.pt'))}, and the replay on disk is kept\. Usual causes: "
        r"learning rates too high for the task \(model_lr 1000000\.0, actor_lr 3e-05, critic_lr 3e-05; .*it resumes "
        r"from the last checkpoint \(or starts afresh without one\)\.", last_line(result.stderr)), result.stderr[-3000:]
    stopped_at = int(re.search(r"diverged by step (\d+)", result.stderr).group(1))
    assert 200 < stopped_at < 400
    assert {name: (logdir / name).read_bytes() for name in kept} == kept
    assert not [line for line in (logdir / "train.log").read_text().splitlines()
                if "saved checkpoint" in line and f"at step {stopped_at}" in line]
    assert replay_steps_on_disk(logdir) == stopped_at  # every step taken, flushed at the stop


def test_a_foreign_torch_file_and_an_evaluation_of_a_damaged_checkpoint_are_named(tmp_path):
    """--from_checkpoint of a torch file that is no checkpoint of this program: one paragraph, exit 2
    (it was a KeyError). --eval_only of a truncated latest.pt evaluates latest.prev.pt, and every
    line says so (the warning spoke of training again, the summary named the damaged file)."""
    logdir = tmp_path / "run"
    assert run_cli(run_args(logdir, steps=200)).returncode == 0
    foreign = tmp_path / "weights.pt"
    torch.save({"encoder": torch.zeros(2), "decoder": torch.zeros(2)}, foreign)
    result = run_cli(run_args(tmp_path / "other", "--from_checkpoint", str(foreign)))
    assert result.returncode == 2, result.stderr[-3000:]
    assert last_line(result.stderr).startswith(
        f"error: {foreign} is a complete torch file but not a checkpoint of this program: it holds a dict with the "
        "keys encoder, decoder, without 'agent', 'counters', 'config'."), result.stderr[-3000:]
    latest = logdir / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:100])
    result = run_cli(run_args(None, "--eval_only", "True", "--from_checkpoint", str(latest),
                              "--eval_episode_num", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    log = (logdir / "eval_only" / "train.log").read_text()
    prev = logdir / "latest.prev.pt"
    assert "; evaluating the previous checkpoint latest.prev.pt instead (the agent of an earlier step)." in log
    assert f"INFO loaded {prev} (step 100, " in log
    assert f"INFO eval_only: evaluating {prev} for 1 episode" in log
    assert "trained again" not in log


def replay_steps_on_disk(logdir: Path) -> int:
    import replay as replay_lib

    return replay_lib.steps_stored_in(logdir / "replay")


def test_other_model_size_stops_with_exit_2_naming_both_values(killed_run, tmp_path):
    logdir = copy_run(killed_run["logdir"], tmp_path / "run")
    checkpoint_bytes = (logdir / "latest.pt").read_bytes()
    config_text = (logdir / "config.yaml").read_text()
    result = run_cli(run_args(logdir, "--rssm.deter", "64"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.fullmatch(
        r"error: the checkpoint was trained with rssm\.deter=32 but the config asks for "
        r"rssm\.deter=64, so its parameters do not fit the model\. Resume with --rssm\.deter 32 "
        r"\(or the same --configs blocks as the original run\), or start a fresh run in a new "
        r"--logdir\.", last_line(result.stderr)), result.stderr[-3000:]
    # nothing of the run is touched: its checkpoint and the config it was trained with stay
    assert (logdir / "latest.pt").read_bytes() == checkpoint_bytes
    assert (logdir / "config.yaml").read_text() == config_text
    assert "deter: 32" in config_text


def test_other_encoder_keys_stop_naming_the_changed_setting(killed_run, tmp_path):
    """Trained on the image alone (`custom`'s mlp_keys '$^'), resumed with the vector added: the
    mismatched parameter and the setting that made it, both values."""
    logdir = copy_run(killed_run["logdir"], tmp_path / "run")
    checkpoint_bytes = (logdir / "latest.pt").read_bytes()
    result = run_cli(run_args(logdir, "--encoder.mlp_keys", "vector", "--steps", "700", "--action_repeat", "1",
                              "--model_lr", "1e-3"))
    assert result.returncode == 2, result.stderr[-3000:]
    line = last_line(result.stderr)
    assert line.startswith(
        f"error: the checkpoint {logdir / 'latest.pt'} holds a model of other shapes than this config builds, "
        "because settings that shape the model differ from the checkpoint's: encoder.mlp_keys $^ -> vector. "
        "Resume with the checkpoint's values (its config.yaml), or start a fresh run in a new --logdir. (The "
        "first parameter that differs: 'wm."), line
    assert "model size" not in line  # the sizes did not change
    assert "steps 600 -> 700" not in line and "action_repeat" not in line and "model_lr" not in line  # shape nothing
    assert (logdir / "latest.pt").read_bytes() == checkpoint_bytes


def test_missing_checkpoint_stops_with_exit_2_listing_the_folder(tmp_path):
    folder = tmp_path / "run"
    (folder / "replay").mkdir(parents=True)
    (folder / "latest.pt").write_bytes(b"")
    (folder / "train.log").write_text("")
    result = run_cli(run_args(None, "--from_checkpoint", str(folder / "lastest.pt")))
    assert result.returncode == 2
    assert re.fullmatch(
        rf"error: checkpoint {re.escape(str(folder))}/lastest\.pt does not exist\. The folder "
        rf"{re.escape(str(folder))} holds: latest\.pt, replay/, train\.log\. Check the "
        r"--from_checkpoint path \(it should point at a run's latest\.pt\)\.",
        last_line(result.stderr)), result.stderr[-3000:]
    assert sorted(p.name for p in folder.iterdir()) == ["latest.pt", "replay", "train.log"]


def test_from_checkpoint_without_logdir_continues_in_its_folder(killed_run, tmp_path):
    logdir = copy_run(killed_run["logdir"], tmp_path / "run")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    records_before = len(read_metrics(logdir))
    result = run_cli(run_args(None, "--from_checkpoint", str(logdir / "latest.pt"),
                              steps=STEPS + SAVE_EVERY), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(workdir.iterdir()) == []  # no ./logdir/<task> next to where it was started
    log = (logdir / "train.log").read_text()
    assert re.search(rf"resumed from {re.escape(str(logdir))}/latest\.pt at step {STEPS} ", log)
    assert f"INFO saved checkpoint {logdir}/latest.pt at step {STEPS + SAVE_EVERY}\n" in log
    new_records = read_metrics(logdir)[records_before:]
    assert new_records and all(r["step"] > STEPS for r in new_records)
    assert checkpoint.load_checkpoint(logdir / "latest.pt")["counters"]["step"] == STEPS + SAVE_EVERY


def test_resume_from_the_previous_checkpoint_keeps_the_newer_one(killed_run, tmp_path):
    """--from_checkpoint <logdir>/latest.prev.pt (step 500) in a folder whose latest.pt is at step
    600: the run's saves would rotate the step-600 checkpoint away; it is kept as latest.step600.pt,
    the same file, and the log says so."""
    logdir = copy_run(killed_run["logdir"], tmp_path / "run")
    newer = (logdir / "latest.pt").read_bytes()
    result = run_cli(run_args(logdir, "--from_checkpoint", str(logdir / "latest.prev.pt"), steps=STEPS + 200))
    assert result.returncode == 0, result.stderr[-3000:]
    log = (logdir / "train.log").read_text()
    assert resumed_step(log[log.rindex("INFO resumed from"):]) == STEPS - SAVE_EVERY
    assert f"{logdir}/latest.pt is not the checkpoint this run resumes from ({logdir}/latest.prev.pt) and this " \
           f"run's saves would overwrite it: it is kept as {logdir}/latest.step{STEPS}.pt" in log
    assert (logdir / f"latest.step{STEPS}.pt").read_bytes() == newer
    assert checkpoint.load_checkpoint(logdir / "latest.pt")["counters"]["step"] == STEPS + 200


def test_resume_without_its_replay_warns_once(killed_run, tmp_path):
    logdir = copy_run(killed_run["logdir"], tmp_path / "run")
    shutil.rmtree(logdir / "replay")
    result = run_cli(run_args(logdir, steps=STEPS + 100))
    assert result.returncode == 0, result.stderr[-3000:]
    log = (logdir / "train.log").read_text()
    assert log.count(f"resumed at step {STEPS} but {logdir}/replay holds no replay: training waits") == 1
    assert "finished: 700 steps" in log


def test_resume_with_a_new_train_ratio_applies_it_from_the_resume_step(killed_run, tmp_path):
    """The finished run (600 steps, 63 updates at train_ratio 8) resumed to 700 steps at
    train_ratio 32 makes 100 x 32 / (4 x 16) = 50 more updates, not the 301 - 63 = 238 that the new
    ratio counted from the start of training would owe before the next env step."""
    logdir = copy_run(killed_run["logdir"], tmp_path / "run")
    args = run_args(logdir, *KILLED_RUN_EXTRA, steps=STEPS + 100)
    args[args.index("--train_ratio") + 1] = "32"
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (logdir / "train.log").read_text()
    assert (f"INFO updates per agent step changed from 0.125 to 0.5 (train_ratio 8 -> 32, batch 4 x 16 "
            f"-> 4 x 16, processes 1 -> 1): the new rate applies from step {STEPS} on "
            f"({EXPECTED_UPDATES} updates so far)") in log
    assert f"INFO settings changed since the checkpoint: steps {STEPS} -> {STEPS + 100}, train_ratio 8 -> 32\n" in log
    counters = checkpoint.load_checkpoint(logdir / "latest.pt")["counters"]
    assert counters["step"] == STEPS + 100
    assert counters["updates"] == EXPECTED_UPDATES + 50


def test_second_run_in_a_folder_stops_before_writing_anything(killed_run, tmp_path):
    logdir = copy_run(killed_run["logdir"], tmp_path / "run")
    from tools import FolderLock
    lock = FolderLock(logdir)
    assert lock.acquire() is None  # stands for a run that is still going
    before = {p.name: p.stat().st_mtime_ns for p in logdir.iterdir()}
    try:
        result = run_cli(run_args(logdir, steps=STEPS + 100))
    finally:
        lock.release()
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.fullmatch(
        rf"error: {re.escape(str(logdir))} is in use by another run \(pid {os.getpid()}, see "
        rf"{re.escape(str(logdir))}/\.lock\): two runs in one folder would overwrite each other's "
        r"checkpoint, replay chunks and metrics\. Wait for that run to finish or stop it \(Ctrl-C "
        r"saves it\), or use another --logdir\.", last_line(result.stderr)), result.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in logdir.iterdir()} == before  # train.log included
    assert result.stdout == ""  # said before the merged config is printed
    again = run_cli(run_args(logdir, steps=STEPS))  # the lock is gone with its holder
    assert again.returncode == 0, again.stderr[-3000:]
    assert (f"nothing to train: the run is at step {STEPS}, at or past --steps {STEPS}; raise --steps "
            "to train further") in (logdir / "train.log").read_text()


def test_changed_settings_name_the_task_suites_options_added_or_removed_as_its_constructor_sees_them():
    """env.<suite> is an open mapping: an option given before and not now (or the reverse) changes
    the env, so it is listed, against the constructor's default where it has one; other suites'
    options cannot change the run; a top-level key the saved config lacks is a newer version's."""
    saved = {**debug_config("--env.custom.size", "32,32").to_dict(), "steps": 400}
    saved["env"]["custom"]["mode"] = "crash_after"
    saved["env"]["dmc"]["camera"] = 2
    del saved["eval_every"]
    current = debug_config("--env.custom.size", "48,48", "--steps", "420", "--env.custom.length", "60").to_dict()
    assert dreamer.changed_settings(saved, current) == [
        "steps 400 -> 420", "env.custom.size [32, 32] -> [48, 48]", "env.custom.length (not set) -> 60",
        "env.custom.mode crash_after -> (not set)"]
    # an older checkpoint without a later option of the task's suite: the constructor's default, unchanged
    dmc_now = debug_config("--task", "dmc_walker_walk").to_dict()
    dmc_then = copy.deepcopy(dmc_now)
    del dmc_then["env"]["dmc"]["fast_render"]
    assert dreamer.changed_settings(dmc_then, dmc_now) == []
    dmc_then["env"]["dmc"]["size"] = (32, 32)
    assert dreamer.changed_settings(dmc_then, dmc_now) == ["env.dmc.size (32, 32) -> [64, 64]"]


def test_resume_checks_the_task_and_reports_changed_settings(tmp_path):
    cfg = debug_config("--model_lr", "3e-4")
    saved = {**cfg.to_dict(), "model_lr": 1e-4, "logdir": "elsewhere"}
    assert dreamer.changed_settings(saved, cfg.to_dict()) == ["model_lr 0.0001 -> 0.0003"]
    dreamer.check_same_task(saved, cfg, tmp_path / "latest.pt")  # same task: accepted
    with pytest.raises(checkpoint.CheckpointMismatch) as raised:
        dreamer.check_same_task({**saved, "task": "gym_CartPole-v1"}, cfg, tmp_path / "latest.pt")
    assert str(raised.value) == (
        f"the checkpoint {tmp_path}/latest.pt was trained on task gym_CartPole-v1, but this run asks "
        "for --task custom_reach. Resume with --task gym_CartPole-v1, or train custom_reach in a new "
        "--logdir (this folder's replay holds gym_CartPole-v1's episodes).")


def test_torchrun_world_size_is_saved_and_a_change_restarts_the_schedule():
    """Under torchrun the config's `parallel` stays 1, so the checkpoint records the real number of
    processes; going from 2 to 1 halves the replayed steps per update's worth of updates per step."""
    cfg = debug_config()
    state = dreamer.checkpoint_state(cfg, exploration.make_agent(*spaces(cfg), cfg, torch.device("cpu")),
                                     dreamer.Counters(), filled_replay(cfg, 0), world=2)
    assert state["world"] == 2 and state["config"]["parallel"] == 1
    counters = dreamer.Counters(step=400, updates=76, train_start=100)
    messages = []
    logger = type("Log", (), {"info": lambda self, text: messages.append(text)})()
    dreamer.restart_update_schedule(counters, state["config"], state["world"], cfg, 1, logger)
    assert (counters.train_start, counters.schedule_updates) == (400, 75)
    assert dreamer.updates_due(counters, cfg, world=1) == 76 and "processes 2 -> 1" in messages[0]


def test_fresh_run_in_a_folder_left_without_a_checkpoint_sets_the_old_curves_aside(tmp_path):
    """A run that crashed before its first save leaves metrics but no checkpoint; a new run there
    starts at step 0, so the old records move to metrics.dropped.jsonl instead of zigzagging."""
    logdir = tmp_path / "run"
    logdir.mkdir()
    old = [{"step": s, "perf/updates": s} for s in (100, 200, 300)]
    (logdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    result = run_cli(run_args(logdir, steps=200))
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("INFO metrics.jsonl: moved 3 records of an earlier run in this folder, which left no checkpoint, "
            "to metrics.dropped.jsonl; this run starts at step 0") in (logdir / "train.log").read_text()
    assert [r["step"] for r in read_metrics(logdir)] == list(range(LOG_EVERY, 201, LOG_EVERY))
    aside = [json.loads(line) for line in (logdir / "metrics.dropped.jsonl").read_text().splitlines()]
    assert aside == old


def test_updates_owed_count_the_replayed_steps_of_every_process():
    """train_ratio is replayed steps per agent step over the whole run: with `world` processes each
    update of each process replays one batch, so each process owes 1/world of the updates."""
    cfg = debug_config("--train_ratio", "8")  # batch 4 x 16 = 64 replayed steps per update
    counters = dreamer.Counters(step=100 + 64 * 10, updates=0, train_start=100)
    assert dreamer.updates_due(counters, cfg, world=1) == 8 * 10 // 1 + 1
    assert dreamer.updates_due(counters, cfg, world=2) == 8 * 10 // 2 + 1
    assert dreamer.updates_due(counters, cfg, world=4) == 8 * 10 // 4 + 1
    assert dreamer.updates_per_step(8, 4, 16, 2) == 8 / (4 * 16 * 2)


def test_lowered_train_ratio_keeps_training_after_a_resume():
    """A lower rate counted from the start of training would owe fewer updates than were done, so
    training would pause for thousands of steps; restarted at the resume step, it goes on at once."""
    cfg = debug_config("--train_ratio", "2")  # 2 / (4 x 16) updates per step
    saved = {**cfg.to_dict(), "train_ratio": 8}
    counters = dreamer.Counters(step=600, updates=63, train_start=100)
    messages = []
    logger = type("Log", (), {"info": lambda self, text: messages.append(text)})()
    dreamer.restart_update_schedule(counters, saved, 1, cfg, 1, logger)
    assert (counters.train_start, counters.schedule_updates) == (600, 62)
    assert dreamer.updates_due(counters, cfg, world=1) == 63  # nothing owed at the resume step
    counters.step = 600 + 64
    assert dreamer.updates_due(counters, cfg, world=1) == 65  # then 2 per 64 steps
    assert len(messages) == 1 and "train_ratio 8 -> 2" in messages[0]
    unchanged = dreamer.Counters(step=600, updates=63, train_start=100)
    dreamer.restart_update_schedule(unchanged, cfg.to_dict(), 1, cfg, 1, logger)
    assert (unchanged.train_start, unchanged.schedule_updates, len(messages)) == (100, 0, 1)


# ---------------------------------------------------------------------------- in-process round trip


@pytest.fixture
def deterministic_torch():
    """--deterministic True switches torch's deterministic algorithms on; switch them back after."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def debug_config(*extra: str) -> config_lib.Config:
    return config_lib.load_config(["--configs", "debug", "custom", "--task", "custom_reach",
                                   "--device", "cpu", "--deterministic", "True", *extra])


def spaces(cfg) -> tuple:
    env = envs.make_env(cfg, "train", 0)
    try:
        return env.obs_space, env.act_space
    finally:
        getattr(env, "close", lambda: None)()


def filled_replay(cfg, seed: int) -> Replay:
    """A replay of 40 fixed steps (no directory): only its sampler state differs between runs."""
    replay = Replay(64, cfg.batch_length, seed=seed)
    for t in range(40):
        replay.add({"vector": np.full(3, t, np.float32), "action": np.zeros(2, np.float32),
                    "reward": np.float32(t), "is_first": t % 20 == 0, "is_last": t % 20 == 19,
                    "is_terminal": False})
    return replay


def policy_obs(batch: dict[str, torch.Tensor], agent) -> dict[str, np.ndarray]:
    keys = agent.wm.encoder.cnn_keys + agent.wm.encoder.mlp_keys + ["is_first"]
    return {key: batch[key][:, 0].cpu().numpy() for key in keys}  # (B, ...)


def draws(agent, replay: Replay, batch: dict[str, torch.Tensor]) -> dict:
    """Everything random a run does next: a sampled train action, a random action, a replay
    window, and python / numpy / torch draws."""
    actions, _ = agent.policy(policy_obs(batch, agent), None, "train")
    return {"policy": actions, "random_actions": agent.random_actions(3),
            "replay": replay.sample(2)["reward"], "python": random.random(),
            "numpy": np.random.rand(3), "torch": torch.rand(3)}


def agent_tensors(agent) -> dict[str, torch.Tensor]:
    """Every tensor of the agent's checkpoint: parameters, slow critics, return normalisers,
    optimizer moments and steps."""
    return checkpoint.flat_tensors(agent.state_dict())


def restore_into_fresh_agent(cfg, path: Path, tmp_path: Path, obs_space, act_space):
    set_seed(12345, True)  # a fresh process: other seeds, other initial weights
    agent = exploration.make_agent(obs_space, act_space, cfg, "cpu")
    replay = filled_replay(cfg, seed=99)
    paths = dreamer.RunPaths(tmp_path, path, path, tmp_path / "replay")
    logger = Logger(tmp_path / "resumed", tensorboard=False)
    try:
        counters = dreamer.restore(cfg, agent, replay, paths, torch.device("cpu"), logger)
    finally:
        logger.close()
    return agent, replay, counters


@pytest.mark.parametrize("part, named", [("wm", "world model"), ("task", "task actor and critic")])
def test_a_diverged_agent_is_never_saved_over_the_last_checkpoint(tmp_path, part, named):
    """A NaN in any part's parameters (discrete actors still act then: their samples stay one-hot,
    so only the log and save checks see it): save() flushes the replay and raises TrainingDiverged
    naming that part, and latest.pt keeps its bytes."""
    cfg = debug_config()
    obs_space, act_space = spaces(cfg)
    agent = exploration.make_agent(obs_space, act_space, cfg, "cpu")
    replay = filled_replay(cfg, seed=cfg.seed)
    paths = dreamer.RunPaths(tmp_path, tmp_path / "latest.pt", None, tmp_path / "replay")
    counters = dreamer.Counters(step=300, updates=3)
    logger = Logger(tmp_path, tensorboard=False)
    try:
        dreamer.save(cfg, agent, counters, replay, paths, dreamer.Dist(), logger)
        kept = paths.checkpoint.read_bytes()
        assert agent.nonfinite_parts() == []
        with torch.no_grad():
            next(getattr(agent, part).parameters()).view(-1)[0] = float("nan")
        assert agent.nonfinite_parts() == [named]
        counters.step = 400
        with pytest.raises(dreamer.TrainingDiverged, match=rf"^training diverged by step 400 \(3 updates\): the {named} "
                           rf"parameters hold NaN or inf.* Nothing was saved over the last checkpoint "):
            dreamer.save(cfg, agent, counters, replay, paths, dreamer.Dist(), logger)
    finally:
        logger.close()
    assert paths.checkpoint.read_bytes() == kept


def test_round_trip_continues_exactly_like_an_uninterrupted_run(tmp_path, deterministic_torch):
    cfg = debug_config()
    obs_space, act_space = spaces(cfg)
    set_seed(cfg.seed, True)
    agent = exploration.make_agent(obs_space, act_space, cfg, "cpu")
    batch = exploration.synthetic_batch(obs_space, act_space, cfg.batch_size, cfg.batch_length, seed=1)
    replay = filled_replay(cfg, seed=cfg.seed)
    for _ in range(3):  # N updates
        agent.train_step(batch)
    replay.sample(2)
    counters = dreamer.Counters(step=300, updates=3, episodes=6, train_start=100, last_log=300,
                                last_eval=200, last_save=300)
    path = tmp_path / "latest.pt"
    checkpoint.save_checkpoint(path, dreamer.checkpoint_state(cfg, agent, counters, replay))

    for _ in range(3):  # the uninterrupted run: K more updates, then everything random it does next
        agent.train_step(batch)
    expected_tensors, expected_draws = agent_tensors(agent), draws(agent, replay, batch)

    resumed, resumed_replay, resumed_counters = restore_into_fresh_agent(
        cfg, path, tmp_path, obs_space, act_space)
    assert resumed_counters == counters
    assert resumed.updates == 3
    for _ in range(3):
        resumed.train_step(batch)
    tensors = agent_tensors(resumed)
    assert tensors.keys() == expected_tensors.keys()
    assert any("slow_critic" in name for name in tensors) and any("optimizers" in name for name in tensors)
    for name, value in expected_tensors.items():
        assert torch.equal(tensors[name], value), name  # bit for bit on CPU in deterministic mode
    got = draws(resumed, resumed_replay, batch)
    for key, value in expected_draws.items():
        assert np.array_equal(np.asarray(got[key]), np.asarray(value)), key


def test_restore_loads_with_the_run_device_as_map_location(tmp_path, monkeypatch, deterministic_torch):
    cfg = debug_config()
    obs_space, act_space = spaces(cfg)
    set_seed(cfg.seed, True)
    agent = exploration.make_agent(obs_space, act_space, cfg, "cpu")
    path = tmp_path / "latest.pt"
    state = dreamer.checkpoint_state(cfg, agent, dreamer.Counters(), filled_replay(cfg, 0))
    checkpoint.save_checkpoint(path, state)
    calls = []
    original = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("map_location", "not given"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    restore_into_fresh_agent(cfg, path, tmp_path, obs_space, act_space)
    assert calls == [torch.device("cpu")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (checkpoints across devices)")
@pytest.mark.parametrize("saved_on, loaded_on", [("cuda", "cpu"), ("cpu", "cuda")])
def test_checkpoint_moves_between_cuda_and_cpu(tmp_path, saved_on, loaded_on):
    cfg = config_lib.load_config(["--configs", "debug", "custom", "--task", "custom_reach",
                                  "--device", saved_on])
    obs_space, act_space = spaces(cfg)
    set_seed(cfg.seed)
    agent = exploration.make_agent(obs_space, act_space, cfg, saved_on)
    batch = exploration.synthetic_batch(obs_space, act_space, cfg.batch_size, cfg.batch_length, saved_on)
    agent.train_step(batch)
    path = tmp_path / "latest.pt"
    checkpoint.save_checkpoint(path, dreamer.checkpoint_state(cfg, agent, dreamer.Counters(step=7),
                                                               filled_replay(cfg, 0)))
    target = config_lib.load_config(["--configs", "debug", "custom", "--task", "custom_reach",
                                     "--device", loaded_on])
    resumed = exploration.make_agent(obs_space, act_space, target, loaded_on)
    paths = dreamer.RunPaths(tmp_path, path, path, tmp_path / "replay")
    logger = Logger(tmp_path / "resumed", tensorboard=False)
    try:
        counters = dreamer.restore(target, resumed, filled_replay(target, 1), paths,
                                   torch.device(loaded_on), logger)
    finally:
        logger.close()
    assert counters.step == 7
    expected = agent_tensors(agent)
    for name, value in agent_tensors(resumed).items():
        assert value.device.type == loaded_on, name
        assert torch.equal(value.cpu(), expected[name].cpu()), name
    resumed.train_step(exploration.synthetic_batch(obs_space, act_space, 4, 16, loaded_on))


def test_compile_and_eager_checkpoints_have_the_same_layout(tmp_path, deterministic_torch):
    """--compile True compiles functions, not modules: the parameter names, and so checkpoints,
    are the same either way and one loads into the other (compiling itself happens on first use;
    see the slow test below for an update after loading)."""
    eager_cfg, compiled_cfg = debug_config(), debug_config("--compile", "True")
    obs_space, act_space = spaces(eager_cfg)
    set_seed(0, True)
    eager = exploration.make_agent(obs_space, act_space, eager_cfg, "cpu")
    compiled = exploration.make_agent(obs_space, act_space, compiled_cfg, "cpu")
    assert agent_tensors(eager).keys() == agent_tensors(compiled).keys()
    path = tmp_path / "latest.pt"
    checkpoint.save_checkpoint(path, dreamer.checkpoint_state(eager_cfg, eager, dreamer.Counters(step=5),
                                                               filled_replay(eager_cfg, 0)))
    resumed, _, counters = restore_into_fresh_agent(compiled_cfg, path, tmp_path, obs_space, act_space)
    assert counters.step == 5
    expected = agent_tensors(eager)
    for name, value in agent_tensors(resumed).items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.slow
def test_compiled_agent_trains_after_loading_an_eager_checkpoint(tmp_path, deterministic_torch):
    """Slow: torch.compile takes ~35 s for the first update on a 2-core CPU (cold compile cache)."""
    eager_cfg, compiled_cfg = debug_config(), debug_config("--compile", "True")
    obs_space, act_space = spaces(eager_cfg)
    set_seed(0, True)
    eager = exploration.make_agent(obs_space, act_space, eager_cfg, "cpu")
    batch = exploration.synthetic_batch(obs_space, act_space, 4, 16, seed=1)
    eager.train_step(batch)
    path = tmp_path / "latest.pt"
    checkpoint.save_checkpoint(path, dreamer.checkpoint_state(eager_cfg, eager, dreamer.Counters(),
                                                               filled_replay(eager_cfg, 0)))
    resumed, _, _ = restore_into_fresh_agent(compiled_cfg, path, tmp_path, obs_space, act_space)
    rng = checkpoint.capture_rng_states()  # the same random draws for both updates
    eager_metrics = eager.train_step(batch)
    checkpoint.restore_rng_states(rng)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled_metrics = resumed.train_step(batch)
    fallbacks = [str(w.message) for w in caught if "torch.compile" in str(w.message)]
    assert not fallbacks, fallbacks  # the update really ran compiled, not in the eager fallback
    assert torch.allclose(compiled_metrics["loss/model"], eager_metrics["loss/model"], rtol=1e-4)
    compiled_tensors, eager_tensors = agent_tensors(resumed), agent_tensors(eager)
    for name, value in eager_tensors.items():
        assert torch.allclose(compiled_tensors[name], value, rtol=1e-3, atol=1e-5), name


# --- restore's checks and the checkpoint a resume passes over, each on its own

SPACES = {"obs": {"image": "(64, 64, 3) uint8", "vector": "(4,) float32"}, "act": "Box(-1.0, 1.0, (2,), float32)"}


def test_other_spaces_are_each_named_observations_on_either_side_and_actions():
    source = Path("/runs/a/latest.pt")
    same = (source, "custom_reach", "custom_reach")
    dreamer.check_same_spaces(None, SPACES, *same)  # a checkpoint from before spaces were saved
    dreamer.check_same_spaces(copy.deepcopy(SPACES), SPACES, *same)
    current = {"obs": {"depth": "(2,) float32", "image": "(64, 64, 3) uint8"}, "act": "Discrete(5)"}
    with pytest.raises(checkpoint.CheckpointMismatch) as raised:
        dreamer.check_same_spaces(SPACES, current, *same)
    assert str(raised.value).startswith(
        "the checkpoint /runs/a/latest.pt was trained on other spaces of task custom_reach: observation 'depth' "
        "absent then, (2,) float32 now; observation 'vector' (4,) float32 then, absent now; actions "
        "Box(-1.0, 1.0, (2,), float32) then, Discrete(5) now. The env's options")
    assert "Resume with the options it was trained with (its config.yaml)" in str(raised.value)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"other spaces of task custom_reach: actions Box"):
        dreamer.check_same_spaces(SPACES, {**SPACES, "act": "Discrete(5)"}, *same)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"\. Evaluate it with the options it was trained with "
                       r"\(its config\.yaml\)"):
        dreamer.check_same_spaces(SPACES, {**SPACES, "act": "Discrete(5)"}, *same, evaluating=True)
    # evaluated on another task (a training run stops at the task before): both tasks named, each its own
    with pytest.raises(checkpoint.CheckpointMismatch) as raised:
        dreamer.check_same_spaces(SPACES, {**SPACES, "act": "Discrete(5)"}, source, "custom_reach",
                                  "custom_reach_discrete", evaluating=True)
    assert str(raised.value) == (
        "the checkpoint /runs/a/latest.pt was trained on task custom_reach, whose spaces differ from those of task "
        "custom_reach_discrete: actions Box(-1.0, 1.0, (2,), float32) then, Discrete(5) now. A model acts only on "
        "the spaces it was trained on: evaluate it on custom_reach, or on another task of the same observations "
        "and actions.")


def test_settings_compared_on_resume_leave_out_the_paths_and_keys_an_older_config_lacked():
    cfg = debug_config("--from_checkpoint", "/runs/b/latest.pt")
    saved = {**cfg.to_dict(), "logdir": "/runs/a", "from_checkpoint": "/runs/a/latest.pt"}
    del saved["video_length"]  # a key of a later version
    assert dreamer.changed_settings(saved, cfg.to_dict()) == []
    dreamer.check_same_task({k: v for k, v in saved.items() if k != "task"}, cfg, Path("old.pt"))  # no task saved


def test_which_settings_shape_the_model_and_which_change_an_evaluation():
    keys = ["rssm.deter", "env.custom.size", "actor_dist", "behavior", "slow_value_target", "task", "precision",
            "action_repeat", "time_limit", "reward_clip", "eval_sample", "train_ratio", "model_lr", "steps"]
    assert [k for k in keys if dreamer.shapes_model(k)] == keys[:5]
    assert [k for k in keys if dreamer.changes_evaluation(k)] == keys[:11]


def saved_agent_state(cfg, tmp_path: Path, world: int = 1, **config_changes) -> tuple[Path, tuple]:
    """A checkpoint of a fresh agent for `cfg` (its saved config changed as given), and the spaces."""
    obs_space, act_space = spaces(cfg)
    agent = exploration.make_agent(obs_space, act_space, cfg, "cpu")
    state = dreamer.checkpoint_state(cfg, agent, dreamer.Counters(step=300, updates=40, train_start=100),
                                     filled_replay(cfg, 0), world=world)
    state["config"].update(config_changes)
    path = tmp_path / "saved" / "latest.pt"
    checkpoint.save_checkpoint(path, state)
    return path, (obs_space, act_space)


def restore_log(cfg, path: Path, tmp_path: Path, obs_space, act_space) -> str:
    restore_into_fresh_agent(cfg, path, tmp_path, obs_space, act_space)
    return (tmp_path / "resumed" / "train.log").read_text()


def test_eval_only_evaluates_a_checkpoint_of_another_task_with_the_same_spaces(tmp_path):
    """Training on would mix two tasks in one replay; an evaluation on another task of the same spaces
    (a zero-shot test, e.g. walker_walk's agent on walker_run) is allowed. It lists only settings that
    change an evaluation (eval_sample here, not train_ratio)."""
    cfg = debug_config()
    path, (obs_space, act_space) = saved_agent_state(cfg, tmp_path, task="custom_other", train_ratio=4,
                                                     eval_sample=True)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"was trained on task custom_other"):
        restore_into_fresh_agent(cfg, path, tmp_path, obs_space, act_space)
    log = restore_log(debug_config("--eval_only", "True", "--from_checkpoint", str(path)), path, tmp_path,
                      obs_space, act_space)
    assert "(step 300, 40 updates) to evaluate it" in log
    assert "settings changed since the checkpoint: task custom_other -> custom_reach, eval_sample True -> False\n" in log


def test_a_resume_reads_the_saved_number_of_processes_not_the_configs(tmp_path):
    """Under torchrun the config says parallel 1; the checkpoint's `world` (2) is what changed."""
    cfg = debug_config()
    path, (obs_space, act_space) = saved_agent_state(cfg, tmp_path, world=2)
    log = restore_log(cfg, path, tmp_path, obs_space, act_space)
    assert "processes 2 -> 1" in log


def test_a_shape_mismatch_with_no_setting_changed_keeps_its_own_message(tmp_path):
    """A checkpoint whose parameters do not fit though no model setting differs (e.g. edited code):
    the first differing parameter is named, not an empty list of changed settings."""
    cfg = debug_config()
    path, (obs_space, act_space) = saved_agent_state(cfg, tmp_path)
    state = checkpoint.load_checkpoint(path)
    name = next(k for k, v in state["agent"]["wm"].items() if torch.is_tensor(v) and v.ndim == 2)
    state["agent"]["wm"][name] = torch.zeros(3, 3)
    checkpoint.save_checkpoint(path, state)
    with pytest.raises(checkpoint.CheckpointMismatch) as raised:
        restore_into_fresh_agent(cfg, path, tmp_path, obs_space, act_space)
    assert "settings that shape the model differ" not in str(raised.value)
    assert name in str(raised.value) and "(3, 3)" in str(raised.value)


def passed_over_paths(tmp_path: Path, own_bytes: bytes | None = None) -> dreamer.RunPaths:
    """This run's folder holding latest.pt at step 300 (or `own_bytes`), resuming from another run's
    latest.pt: the same file name in another folder."""
    own, other = tmp_path / "here" / "latest.pt", tmp_path / "other" / "latest.pt"
    checkpoint.save_checkpoint(other, {"counters": {"step": 100}})
    if own_bytes is None:
        checkpoint.save_checkpoint(own, {"counters": {"step": 300}})
    else:
        own.parent.mkdir(parents=True)
        own.write_bytes(own_bytes)
    return dreamer.RunPaths(own.parent, own, other, own.parent / "replay")


class Said:
    def __init__(self):
        self.lines = []

    def info(self, text):
        self.lines.append(text)

    warning = info


def test_a_checkpoint_of_the_same_name_elsewhere_keeps_this_folders_own_once(tmp_path):
    paths, said = passed_over_paths(tmp_path), Said()
    kept = dreamer.keep_checkpoint_passed_over(paths, said)
    assert kept == [paths.checkpoint.with_name("latest.step300.pt")]
    assert os.path.samefile(kept[0], paths.checkpoint)  # a hard link, no copy
    assert len(said.lines) == 1 and f"it is kept as {kept[0]}" in said.lines[0]
    assert dreamer.keep_checkpoint_passed_over(paths, said) == kept and len(said.lines) == 1  # kept already
    same = dreamer.RunPaths(paths.logdir, paths.checkpoint, paths.logdir / "." / "latest.pt", paths.replay_dir)
    assert dreamer.keep_checkpoint_passed_over(same, said) == []  # resuming from it: nothing to keep
    checkpoint.save_checkpoint(paths.checkpoint, {"counters": {"step": 400}})  # 300 -> latest.prev.pt
    assert dreamer.keep_checkpoint_passed_over(same, said) == []  # nor its latest.prev.pt: a plain resume
    assert sorted(path.name for path in paths.logdir.iterdir()) == ["latest.prev.pt", "latest.pt", "latest.step300.pt"]


def test_a_resume_from_elsewhere_keeps_both_of_this_folders_checkpoints_through_two_saves(tmp_path):
    """Another run's latest.pt resumed in a folder holding latest.pt (step 300) and latest.prev.pt
    (step 200): the run's first two saves rotate both away, so both are kept, under their steps; a
    corrupt latest.pt is kept under a name that says so, not under its fallback's step."""
    paths, said = passed_over_paths(tmp_path), Said()
    checkpoint.save_checkpoint(paths.checkpoint, {"counters": {"step": 400}})  # 300 -> latest.prev.pt
    before = {name: (paths.logdir / name).read_bytes() for name in ("latest.pt", "latest.prev.pt")}
    kept = dreamer.keep_checkpoint_passed_over(paths, said)
    assert [path.name for path in kept] == ["latest.step400.pt", "latest.step300.pt"] and len(said.lines) == 2
    for step in (101, 102):  # this run's saves
        checkpoint.save_checkpoint(paths.checkpoint, {"counters": {"step": step}})
    assert [path.read_bytes() for path in kept] == [before["latest.pt"], before["latest.prev.pt"]]
    assert checkpoint.read_checkpoint(paths.checkpoint)["counters"]["step"] == 102
    paths.checkpoint.write_bytes(b"cut sho")  # a corrupt latest.pt beside a readable latest.prev.pt
    kept = dreamer.keep_checkpoint_passed_over(paths, said)
    assert [path.name for path in kept] == ["latest.unreadable.pt", "latest.step101.pt"]
    assert kept[0].read_bytes() == b"cut sho"


def test_a_passed_over_checkpoint_is_copied_where_links_fail_and_kept_unreadable(tmp_path, monkeypatch):
    paths, said = passed_over_paths(tmp_path / "a"), Said()

    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    [kept] = dreamer.keep_checkpoint_passed_over(paths, said)
    assert kept.read_bytes() == paths.checkpoint.read_bytes() and not os.path.samefile(kept, paths.checkpoint)
    paths = passed_over_paths(tmp_path / "b", own_bytes=b"not a checkpoint")
    [kept] = dreamer.keep_checkpoint_passed_over(paths, said)
    assert kept.name == "latest.unreadable.pt" and kept.read_bytes() == b"not a checkpoint"
