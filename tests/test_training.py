"""End-to-end runs of the command line: what a user sees in the logdir, train_ratio, errors, eval."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dreamer
from config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "dreamer.py"), *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, env={**__import__("os").environ, "CI": "1"},
    )


def run_faulty_env(env_id: str, *args: str) -> subprocess.CompletedProcess:
    """A debug run of tests/helpers/faulty_env.py's gym env `env_id` through the gym suite."""
    import os

    return subprocess.run(
        [sys.executable, str(ROOT / "dreamer.py"), "--configs", "debug", "gym", "--task", f"gym_faulty_env:{env_id}",
         *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "CI": "1", "PYTHONPATH": str(ROOT / "tests" / "helpers")})


def read_metrics(logdir: Path) -> list[dict]:
    return [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    """The guide's override command as a debug run (shared by the tests below)."""
    logdir = tmp_path_factory.mktemp("runs") / "custom_tuned"
    result = run_cli("--configs", "debug", "custom", "--task", "custom_reach", "--batch_size", "32",
                     "--model_lr", "5e-4", "--logdir", str(logdir))
    assert result.returncode == 0, result.stderr[-3000:]
    return logdir, result


def test_guide_override_command_writes_config_yaml(debug_run):
    logdir, result = debug_run
    text = (logdir / "config.yaml").read_text()
    assert "batch_size: 32\n" in text and "model_lr: 0.0005\n" in text
    assert "'debug' is applied after the other blocks" in result.stdout


def test_train_log_and_metrics_are_written(debug_run):
    logdir, _ = debug_run
    log = (logdir / "train.log").read_text()
    assert "step 400" in log and "finished: 400 steps" in log
    records = read_metrics(logdir)
    steps = [r["step"] for r in records]
    assert steps == sorted(steps) and steps[-1] == 400
    keys = set().union(*records)
    for name in ("episode/return", "episode/length", "eval/return", "loss/model", "loss/image",
                 "loss/reward", "loss/cont", "loss/kl_dyn", "loss/kl_rep", "loss/actor", "loss/critic",
                 "actor/entropy", "return/p5", "return/p95", "perf/fps", "perf/train_updates_per_s"):
        assert name in keys, name
    assert any(k.startswith("grad/") for k in keys)


def test_tensorboard_holds_scalars_and_videos(debug_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir, _ = debug_run
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"episode/return", "eval/return", "loss/model"} <= set(tags["scalars"])
    videos = tags["images"]  # add_video stores GIF-encoded image summaries
    assert any(t.startswith("eval/video") for t in videos), videos
    assert any(t.startswith("openloop/") for t in videos), videos


def test_train_ratio_sets_the_number_of_updates(debug_run):
    logdir, _ = debug_run
    logged = [(r["step"], r["perf/updates"]) for r in read_metrics(logdir) if "perf/updates" in r]
    # debug: prefill 100, train_ratio 32, batch 32 x 16: the first update at the step the prefill
    # ends (step 100), then one per 512 / 32 = 16 agent steps: 1 + (step - 100) * 32 / 512
    assert logged == [(100, 1), (200, 7), (300, 13), (400, 19)], logged


def test_logged_rates_are_those_of_their_own_interval(debug_run):
    """perf/fps and perf/train_updates_per_s divide the interval's own steps and updates by the same
    seconds, so their ratio is exactly the interval's steps per update (100 / 6 here, and 100 in the
    first interval, whose only update comes at the prefill's end)."""
    logdir, _ = debug_run
    records = [r for r in read_metrics(logdir) if "perf/fps" in r]
    previous = (0, 0)
    for record in records:
        steps, updates = record["step"] - previous[0], record["perf/updates"] - previous[1]
        assert record["perf/fps"] / record["perf/train_updates_per_s"] == pytest.approx(steps / updates), record
        previous = (record["step"], record["perf/updates"])
    assert len(records) == 4


def test_checkpoint_and_replay_on_disk(debug_run):
    logdir, _ = debug_run
    assert (logdir / "latest.pt").exists()
    assert list((logdir / "replay").glob("*.npz"))


def test_config_error_exits_2_and_writes_nothing(tmp_path):
    logdir = tmp_path / "never"
    result = run_cli("--configs", "debug", "custom", "--batchsize", "32", "--logdir", str(logdir))
    assert result.returncode == 2
    assert "did you mean --batch_size?" in result.stderr
    assert not logdir.exists()


def test_placeholder_task_is_one_paragraph_without_traceback(tmp_path):
    """The guide's literal `custom_task_name`: exit 2, the paragraph once on stderr and in train.log."""
    logdir = tmp_path / "x"
    result = run_cli("--configs", "debug", "custom", "--task", "custom_task_name", "--logdir", str(logdir))
    assert result.returncode == 2, result.stderr[-3000:]
    paragraph = ("error: 'custom_task_name' is the guide's placeholder for your task's name: replace it with "
                 "one of the example env's tasks, custom_reach, custom_reach_discrete, custom_catch")
    assert result.stderr.count(paragraph) == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith(paragraph)
    assert "ERROR 'custom_task_name' is the guide's placeholder" in (logdir / "train.log").read_text()


@pytest.mark.parametrize("args, message", [
    (("--task", "mine_reach"), "error: Unknown suite 'mine' in task 'mine_reach'. Registered suites: atari, crafter, custom,"),
    (("--task", "custom_reach", "--env.cutsom.size", "32,32"),
     "error: env.cutsom: there is no suite 'cutsom' in envs.REGISTRY (atari, crafter, custom, dmc, gym, memorymaze, "
     "minecraft), so its options would reach no env: did you mean env.custom?"),
    (("--task", "custom_reach", "--env.dmc.sizee", "5"),
     "error: env.dmc.sizee: DMC, the 'dmc' suite's class, takes no option 'sizee' (did you mean 'size'?), so it "
     "would do nothing (this run's task, custom_reach, is not a dmc task). Fix or drop --env.dmc.sizee or its "
     "'sizee:' entry under env: {dmc: ...} in configs.yaml; the run did not start."),
    (("--task", "custom_reach_discrete", "--actor_dist", "normal"),
     "error: The action space is Discrete(5) but actor_dist is 'normal'"),
    (("--task", "custom_reach", "--encoder.mlp_keys", "$^", "--encoder.cnn_keys", "$^"),
     "error: The encoder selects no observation key: cnn_keys='$^'"),
    (("--task", "custom_reach", "--precision", "16", "--device", "cpu"),
     "error: --precision 16 (float16 autocast with a loss scaler) is for CUDA"),
])
def test_user_errors_exit_2_with_their_paragraph_only(tmp_path, args, message):
    """Errors found in the task name (before the config is printed), the agent's construction
    (action space vs actor_dist, encoder keys): one paragraph, exit 2, no traceback."""
    result = run_cli("--configs", "debug", "custom", *args, "--logdir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count(message) == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    if args[1] == "mine_reach" or args[2].startswith(("--env.", "--precision")):  # before anything is written
        assert result.stdout == "" and not (tmp_path / "run").exists()


def test_from_checkpoint_given_another_file_of_the_run_names_the_checkpoint(tmp_path):
    """--from_checkpoint run/config.yaml (the run folder's config, not its checkpoint): one paragraph
    naming latest.pt, before anything is written (it was reported as a corrupt checkpoint)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("task: custom_reach\n")
    result = run_cli("--configs", "debug", "custom", "--task", "custom_reach", "--from_checkpoint",
                     str(run / "config.yaml"), "--logdir", str(tmp_path / "new"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: --from_checkpoint {run / 'config.yaml'} names the run's config.yaml, "
                                    f"not a checkpoint: the checkpoint of that run is {run / 'latest.pt'}")
    assert result.stdout == "" and not (tmp_path / "new").exists()
    (run / "replay").mkdir()  # a replay chunk: the run is the folder above replay/
    (run / "replay" / "w000-000000000000.npz").write_bytes(b"")
    chunk = run_cli("--configs", "debug", "custom", "--task", "custom_reach", "--from_checkpoint",
                    str(run / "replay" / "w000-000000000000.npz"), "--logdir", str(tmp_path / "new"))
    assert chunk.returncode == 2 and f"the checkpoint of that run is {run / 'latest.pt'} (or pass the folder " \
        f"{run} itself)" in chunk.stderr, chunk.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("args, message", [
    (("--device", "cuda"), "error: device 'cuda' was asked for but CUDA is not available on this machine"),
    (("--device", "cuda:3"), "error: device 'cuda:3' was asked for but CUDA is not available"),
    (("--parallel", "8"), "error: --parallel 8 trains on 8 GPUs, but this machine has no CUDA device "
                          "(torch.cuda.is_available() is False). Drop --parallel to train in one process, "
                          "or add --device cpu"),
])
def test_a_missing_gpu_stops_the_run_before_anything_is_written(tmp_path, args, message):
    """--device cuda, or the guide's --parallel 8 (which would otherwise start 8 CPU processes of the
    full model), on a machine without CUDA: one paragraph, exit 2, nothing printed or written."""
    result = run_cli("--configs", "custom", "--task", "custom_reach", *args, "--logdir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(message) and result.stderr.count("error:") == 1, result.stderr
    assert result.stdout == "" and not (tmp_path / "run").exists()


def test_help_lists_blocks_and_keys():
    result = run_cli("--help")
    assert result.returncode == 0 and "blocks:" in result.stdout and "--train_ratio" in result.stdout


def test_help_into_a_reader_that_stops_early_is_no_error():
    """`dreamer.py --help | head`: the pipe closes before the text is written; no BrokenPipeError."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before dreamer.py writes
    result = subprocess.run([sys.executable, str(ROOT / "dreamer.py"), "--help"], cwd=ROOT, stdout=write,
                            stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert result.returncode == 0 and "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_resume_continues_at_the_saved_step_and_eval_only(tmp_path):
    logdir = tmp_path / "resume"
    common = ["--configs", "debug", "custom", "--task", "custom_reach", "--logdir", str(logdir),
              "--eval_every", "0"]
    first = run_cli(*common, "--steps", "200")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(*common, "--steps", "300")
    assert second.returncode == 0, second.stderr[-3000:]
    log = (logdir / "train.log").read_text()
    assert "resumed from" in log and "at step 200" in log
    steps = [r["step"] for r in read_metrics(logdir)]
    assert steps == sorted(steps) and steps[-1] == 300
    records_before = read_metrics(logdir)
    evaluated = run_cli("--configs", "debug", "custom", "--task", "custom_reach", "--eval_only", "True",
                        "--from_checkpoint", str(logdir / "latest.pt"), "--eval_episode_num", "2")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    # logged apart from the training curves, at the checkpoint's step; the replay is not read
    assert read_metrics(logdir) == records_before
    (record,) = read_metrics(logdir / "eval_only")
    assert record["eval/episodes"] == 2 and math.isfinite(record["eval/return"]) and record["step"] == 300
    assert "replay: loaded" not in (logdir / "eval_only" / "train.log").read_text()
    assert f"loaded {logdir / 'latest.pt'} (step 300, " in evaluated.stderr and "resumed from" not in evaluated.stderr
    assert f"to evaluate it; logs in {logdir / 'eval_only'}" in evaluated.stderr
    shown = re.search(r"INFO eval_only: return (-?[\d.]+) \(min (-?[\d.]+), max (-?[\d.]+)\) over 2 episodes",
                      evaluated.stderr)  # the result on the console, not only in the logs
    assert shown and float(shown[1]) == pytest.approx(record["eval/return"], abs=0.01), evaluated.stderr[-2000:]
    assert float(shown[2]) <= float(shown[1]) <= float(shown[3])
    # one episode, with another train_ratio given: said in the singular, and no word of update rates;
    # one eval env for one episode although envs.amount is 2 (two would end together: two episodes)
    single = run_cli("--configs", "debug", "custom", "--task", "custom_reach", "--eval_only", "True",
                     "--from_checkpoint", str(logdir / "latest.pt"), "--eval_episode_num", "1",
                     "--train_ratio", "64", "--envs.amount", "2")
    assert single.returncode == 0, single.stderr[-3000:]
    eval_log = (logdir / "eval_only" / "train.log").read_text()
    assert "for 1 episode\n" in eval_log and ") over 1 episode, mean length" in eval_log, eval_log
    assert "updates per agent step" not in eval_log and "train_ratio 32 -> 64" not in eval_log, eval_log
    # logged into another folder: no replay folder is made there, and the run's replay is as it was
    chunks = sorted((path.name, path.stat().st_size) for path in (logdir / "replay").iterdir())
    elsewhere = run_cli("--configs", "debug", "custom", "--task", "custom_reach", "--eval_only", "True",
                        "--from_checkpoint", str(logdir / "latest.pt"), "--eval_episode_num", "1",
                        "--logdir", str(tmp_path / "evaluations"))
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    assert (tmp_path / "evaluations" / "eval_only" / "metrics.jsonl").exists()
    assert not (tmp_path / "evaluations" / "replay").exists()
    assert sorted((path.name, path.stat().st_size) for path in (logdir / "replay").iterdir()) == chunks


def start_debug_run_until_logged(logdir: Path, step: int, *args: str) -> subprocess.Popen:
    """A debug custom_reach run in the background, returned once train.log shows `step`."""
    import os
    import time

    process = subprocess.Popen(
        [sys.executable, str(ROOT / "dreamer.py"), "--configs", "debug", "custom", "--task", "custom_reach",
         *args, "--logdir", str(logdir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "CI": "1"},
    )
    log = logdir / "train.log"
    deadline = time.time() + 180
    while time.time() < deadline and not (log.exists() and f"step {step} |" in log.read_text()):
        time.sleep(0.1)
    assert f"step {step} |" in log.read_text()
    return process


def test_ctrl_c_stops_quickly_saves_and_says_how_to_resume(tmp_path):
    import signal
    import time

    logdir = tmp_path / "interrupted"
    process = start_debug_run_until_logged(logdir, 200, "--steps", "100000", "--save_every", "100000",
                                           "--eval_every", "0")
    log = logdir / "train.log"
    # past step 200's iteration, so that the stop falls between two logs (a SIGINT sent during that
    # iteration's log write stopped the run at step 200 itself, once in CI)
    time.sleep(1.5)
    process.send_signal(signal.SIGINT)
    start = time.time()
    _, stderr = process.communicate(timeout=60)
    assert time.time() - start < 15
    assert process.returncode == 130, stderr[-3000:]  # 128 + SIGINT: stopped, not finished
    text = log.read_text()
    assert "saved checkpoint" in text and "to resume, run the same command again" in text
    assert re.search(r"INFO SIGINT at step \d+: stopping after this step and saving\n", text)  # not only on the console
    import checkpoint

    state = checkpoint.load_checkpoint(logdir / "latest.pt")
    assert state["counters"]["step"] >= 200
    last = read_metrics(logdir)[-1]  # the partial interval before the stop is logged too
    assert last["step"] == state["counters"]["step"] and last["perf/updates"] == state["counters"]["updates"]

    # the resumed run logs (every 100 steps) and saves (every 200) at the multiples again, not
    # 100 / 200 steps after the stop's extra log and save
    stopped = state["counters"]["step"]
    assert stopped % 100, stopped  # a stop between two logs (a log every 100 steps, ~30 s of Ctrl-C delay)
    end = stopped - stopped % 100 + 300
    import os

    resumed = subprocess.run(
        [sys.executable, str(ROOT / "dreamer.py"), "--configs", "debug", "custom", "--task", "custom_reach",
         "--steps", str(end), "--save_every", "200", "--eval_every", "0", "--logdir", str(logdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "CI": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    later = [r["step"] for r in read_metrics(logdir) if r["step"] > stopped]
    assert later == [end - 200, end - 100, end], later
    saves = [int(s) for s in re.findall(r"saved checkpoint .* at step (\d+)", log.read_text())]
    due = [x for x in range(stopped + 1, end + 1) if x % 200 == 0]
    assert [s for s in saves if s > stopped] == due + ([end] if end not in due else []), saves


def test_a_disk_that_fills_up_stops_the_run_with_one_paragraph_and_keeps_its_checkpoint(tmp_path, monkeypatch,
                                                                                        capsys):
    """From step 300 metrics.jsonl is /dev/full (the kernel's ENOSPC on every write): the run stops
    with the paragraph, exit 2, no traceback; the checkpoint of step 200 stays and the same command,
    with the disk writable again, resumes from it and finishes."""
    import logger as logger_lib

    import checkpoint

    write_sinks = logger_lib.Logger._write_sinks

    def fill_the_disk_at_300(self, step):
        if step >= 300 and self._jsonl.name != "/dev/full":
            self._jsonl.close()
            self._jsonl = open("/dev/full", "a", buffering=1, encoding="utf-8")
        write_sinks(self, step)

    monkeypatch.setattr(logger_lib.Logger, "_write_sinks", fill_the_disk_at_300)
    argv = ["--configs", "debug", "custom", "--task", "custom_reach", "--logdir", str(tmp_path), "--steps", "400",
            "--envs.parallel", "none", "--device", "cpu", "--video", "False"]
    assert dreamer.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error: cannot write the run's logs in") == 1 and "Traceback" not in err, err
    assert "(OSError: No space left on device)" in err and "it resumes from the last checkpoint" in err
    assert checkpoint.load_checkpoint(tmp_path / "latest.pt")["counters"]["step"] == 200
    assert "ERROR cannot write the run's logs" in (tmp_path / "train.log").read_text()
    monkeypatch.setattr(logger_lib.Logger, "_write_sinks", write_sinks)
    assert dreamer.main(argv) == 0
    log = (tmp_path / "train.log").read_text()
    assert "at step 200" in log and "finished: 400 steps" in log
    assert [r["step"] for r in read_metrics(tmp_path)] == [100, 200, 200, 300, 400, 400]


def test_a_folder_name_longer_than_file_systems_take_is_refused_before_anything_is_written(tmp_path):
    """130 x 'ü' is 260 bytes: the OS refuses it (ENAMETOOLONG) at the first stat, deep in a check."""
    result = run_cli("--configs", "debug", "custom", "--task", "custom_reach", "--logdir", str(tmp_path / ("ü" * 130)))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: --logdir {tmp_path / ('ü' * 130)}: the name '{'ü' * 40}...' is 260 "
                                    "bytes long, and file systems take names of at most 255 bytes"), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_ends_within_the_prefill_says_why_it_trained_nothing(tmp_path):
    result = run_cli("--configs", "debug", "custom", "--task", "custom_reach", "--steps", "50", "--logdir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("finished: 50 steps, 0 updates (no training: --steps 50 ends within the prefill of 100 random agent "
            "steps; raise --steps past it, or lower --prefill)") in (tmp_path / "train.log").read_text()


def test_the_copy_paste_hints_are_quoted_for_a_logdir_with_spaces():
    """`tail -f`, `tensorboard --logdir` and --from_checkpoint, pasted into a shell, name the folder
    even when it holds spaces or quotes."""
    import shlex

    logdir = Path("/tmp/my runs/walker's 1")
    paths = dreamer.RunPaths(logdir, logdir / "latest.pt", None, logdir / "replay")
    follow = re.findall(r"`([^`]*)`", dreamer.follow_hint(paths))
    assert [shlex.split(command) for command in follow] == [
        ["tail", "-f", str(logdir / "train.log")], ["tensorboard", "--logdir", str(logdir)]]
    flag = dreamer.resume_hint(paths).split("or add ", 1)[1]
    assert shlex.split(flag) == ["--from_checkpoint", str(logdir / "latest.pt")]


def test_logs_saves_and_evaluations_keep_to_the_multiples_of_their_interval():
    passed = []
    last = 0
    for step in range(0, 1001, 7):  # 7 steps per iteration: the first step at or after each multiple
        if dreamer.passed_a_multiple(step, last, 300):
            passed.append(step)
            last = step
    assert passed == [301, 602, 903]
    assert dreamer.passed_a_multiple(1000, 937, 1000) and not dreamer.passed_a_multiple(1999, 1000, 1000)
    assert not dreamer.passed_a_multiple(1999, 1234, 1000) and dreamer.passed_a_multiple(2000, 1234, 1000)
    assert not dreamer.passed_a_multiple(10**6, 0, 0)  # every 0: never


def test_save_every_minutes_counts_minutes_since_the_last_save(monkeypatch):
    """--save_every_minutes 2: a save is due 120 s after the last one, between the step multiples too;
    0 turns the clock off."""
    from types import SimpleNamespace

    import dreamer

    monkeypatch.setattr(dreamer.time, "time", lambda: 10_000.0)
    trainer = SimpleNamespace(counters=dreamer.Counters(step=150, last_save=100),
                              config=SimpleNamespace(save_every=200, save_every_minutes=2))
    assert not dreamer.Trainer.should_save(trainer, 10_000.0 - 119)
    assert dreamer.Trainer.should_save(trainer, 10_000.0 - 120)
    trainer.config.save_every_minutes = 0
    assert not dreamer.Trainer.should_save(trainer, 0.0)
    trainer.counters.step = 200  # the step multiple, whatever the clock says
    assert dreamer.Trainer.should_save(trainer, 10_000.0)


def test_a_stop_request_is_heard_between_the_updates_of_one_step(tmp_path):
    """train_ratio 1e6 owes ~15,600 updates per agent step (minutes here): SIGTERM used to wait for
    all of them; now the run stops within a few updates, saves, and leaves the rest owed."""
    import signal
    import time

    import checkpoint

    logdir = tmp_path / "many_updates"
    process = start_debug_run_until_logged(logdir, 5, "--steps", "1000", "--prefill", "10", "--log_every", "5",
                                           "--eval_every", "0", "--train_ratio", "1e6")
    time.sleep(3)  # step 10 began its updates
    process.send_signal(signal.SIGTERM)
    start = time.time()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert time.time() - start < 30
    state = checkpoint.load_checkpoint(logdir / "latest.pt")
    counters, config = state["counters"], state["config"]
    owed = 1 + (counters["step"] - 10) * 10**6 // (config["batch_size"] * config["batch_length"])
    assert counters["step"] > 10 and counters["updates"] < owed, (counters, owed)  # stopped among them


def test_ctrl_c_while_starting_ends_at_once_without_a_traceback(tmp_path):
    """Ctrl-C while torch is still loading (before the loop's handler exists): exit 130 with one
    line, no KeyboardInterrupt traceback, and no run folder made."""
    import os
    import signal
    import time

    logdir = tmp_path / "never"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "dreamer.py"), "--configs", "debug", "custom", "--task", "custom_reach",
         "--logdir", str(logdir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "CI": "1"})
    time.sleep(0.3)  # python is importing numpy and torch (over a second here)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-3000:]
    assert "SIGINT while starting: stopped before training began" in stderr and "Traceback" not in stderr
    assert not logdir.exists()


def test_a_local_ctrl_c_after_another_ranks_stop_request_is_a_first_request(capsys):
    """Another rank's stop request reaches this rank through the all-reduce: rank 0 says so once;
    a Ctrl-C here afterwards is this rank's first request (announced, exit 130, the run still
    saves), and only a second one stops at once."""
    import signal
    from types import SimpleNamespace

    import dreamer

    said: list[str] = []
    trainer = SimpleNamespace(all_ranks=lambda flag: False,  # some rank's flag is False: it got a stop
                              dist=SimpleNamespace(main=True), logger=SimpleNamespace(info=said.append),
                              counters=SimpleNamespace(step=120))
    interrupt = dreamer.Interrupt()
    assert dreamer.Trainer.stop_requested(trainer, interrupt)
    assert said == ["another rank got a stop request (Ctrl-C or SIGTERM): every rank stops after this "
                    "step, and rank 0 saves"]
    assert interrupt.requested and interrupt.exit_code() == 0
    interrupt._handle(signal.SIGINT, None)  # no KeyboardInterrupt: a first request
    assert "SIGINT: stopping after the current step" in capsys.readouterr().err
    assert interrupt.exit_code() == 130
    with pytest.raises(KeyboardInterrupt):
        interrupt._handle(signal.SIGINT, None)
    trainer.all_ranks = lambda flag: flag  # this rank's own request: no word about another rank
    said.clear()
    assert dreamer.Trainer.stop_requested(trainer, interrupt)
    assert said == ["SIGINT at step 120: stopping after this step and saving"]  # train.log gets the notice too


def test_ctrl_c_during_an_evaluation_cuts_it_short_and_saves(tmp_path):
    """Ctrl-C (or a scheduler's SIGTERM) during a long evaluation stops it within a step, logs
    nothing for it and saves the current step, the evaluation still due (it used to run the whole
    evaluation first, then start it again as the final one)."""
    import signal
    import time

    import checkpoint

    logdir = tmp_path / "stopped_eval"
    process = start_debug_run_until_logged(
        logdir, 300, "--steps", "300", "--eval_every", "300", "--eval_episode_num", "1000", "--log_every", "100",
        "--save_every", "100000", "--save_every_minutes", "0")
    log = logdir / "train.log"
    time.sleep(1.0)  # inside the evaluation (1,000 episodes)
    process.send_signal(signal.SIGTERM)  # as a scheduler stops a job
    start = time.time()
    _, stderr = process.communicate(timeout=120)
    assert time.time() - start < 20
    assert process.returncode == 143, stderr[-3000:]  # 128 + SIGTERM
    assert "SIGTERM: stopping after the current step" in stderr and "Traceback" not in stderr
    text = log.read_text()
    assert re.search(r"evaluation stopped by the stop request after \d+ of 1000 episodes \(not logged\)", text)
    assert f"saved checkpoint {logdir}/latest.pt at step 300" in text and "stopped at step 300" in text
    assert not any("eval/return" in record for record in read_metrics(logdir))
    counters = checkpoint.load_checkpoint(logdir / "latest.pt")["counters"]
    assert (counters["step"], counters["last_save"], counters["last_eval"]) == (300, 300, 0)  # eval still due


def test_the_readme_gym_cartpole_command_trains_without_naming_actor_dist(tmp_path):
    """README's `--configs gym --task gym_CartPole-v1` (Discrete actions): the defaults' actor_dist
    auto gives a one-hot policy (it stopped asking for --actor_dist onehot)."""
    import checkpoint

    logdir = tmp_path / "cartpole"
    result = run_cli("--configs", "debug", "gym", "--task", "gym_CartPole-v1", "--steps", "150", "--logdir", str(logdir))
    assert result.returncode == 0, result.stderr[-3000:]
    state = checkpoint.load_checkpoint(logdir / "latest.pt")
    assert state["config"]["actor_dist"] == "auto"
    assert state["agent"]["task"]["actor.out.weight"].shape[0] == 2  # two logits of Discrete(2)


def test_env_without_render_trains_and_says_there_is_no_video(tmp_path):
    logdir = tmp_path / "norender"
    result = run_faulty_env("Faulty-v0", "--steps", "200", "--eval_every", "100", "--logdir", str(logdir))
    assert result.returncode == 0, result.stderr[-3000:]
    log = (logdir / "train.log").read_text()
    assert log.count("no eval video") == 1 and "finished: 200 steps" in log
    assert len([r for r in read_metrics(logdir) if "eval/return" in r]) == 2


def test_an_env_whose_render_gives_no_frame_shows_its_image_and_says_so_once(tmp_path, monkeypatch):
    """custom_reach with a render() that returns None: both evaluations write a video of the 'image'
    observation, and train.log says once where the video comes from."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from envs import custom_env

    monkeypatch.setattr(custom_env.PointTask, "render", lambda self: None)
    config = dreamer.config_lib.load_config([
        "--configs", "debug", "custom", "--task", "custom_reach", "--logdir", str(tmp_path), "--steps", "200",
        "--eval_every", "100", "--envs.parallel", "none", "--device", "cpu"])
    assert dreamer.train(config).step == 200
    log = (tmp_path / "train.log").read_text()
    assert log.count("eval video: the env has no render() (or it gives no frame), so the video shows its "
                     "'image' observation") == 1, log
    assert "no eval video" not in log and "WARNING" not in log
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    accumulator.Reload()
    videos = [tag for tag in accumulator.Tags()["images"] if tag.startswith("eval/video")]
    assert videos and len(accumulator.Images(videos[0])) == 2, accumulator.Tags()["images"]


@pytest.mark.parametrize("task, warning", [
    ("RgbaFrames-v0", None),  # RGBA frames: the alpha channel is dropped
    ("NoFrames-v0", "no eval videos from now on: env 0's render() failed (render() returned an array of shape "
                    "(16, 16, 5), not an (H, W, 3) frame)"),
    ("GrowingFrames-v0", "eval video: env 0's render() changed its frame size from (16, 16, 3) to (17, 17, 3); "
                         "this video ends there"),
])
def test_frames_that_are_not_rgb_cost_the_video_not_the_run(tmp_path, task, warning):
    """render() giving RGBA, a five-channel array or frames of changing size: the run trains,
    evaluates and saves to the end (the evaluation at step N used to crash before the save at step N)."""
    import checkpoint

    logdir = tmp_path / "frames"
    result = run_faulty_env(task, "--steps", "200", "--eval_every", "100", "--logdir", str(logdir))
    assert result.returncode == 0, result.stderr[-3000:]
    log = (logdir / "train.log").read_text()
    assert "finished: 200 steps" in log
    assert len([r for r in read_metrics(logdir) if "eval/return" in r]) == 2
    assert checkpoint.load_checkpoint(logdir / "latest.pt")["counters"]["step"] == 200
    if warning is None:
        assert "WARNING" not in log and "no eval video" not in log
    else:
        assert log.count(warning) == 1  # not again at the second evaluation
        assert "no eval video:" not in log  # the env has a render(): not told it has none


@pytest.mark.parametrize("task, message", [
    ("NanLater-v0", "error: env 0 at step 265: observation 'vector' contains NaN at 3 of 3 entries: [nan, nan, nan]; "
                    "every float observation (also one the model does not read: the replay stores it) and every "
                    "reward must be finite"),
    ("GrowsLater-v0", "error: env 0 at step 265: the step has 'vector' of shape (4,) but the first step stored "
                      "in replay had (3,)."),
])
def test_an_env_that_breaks_mid_run_stops_with_its_paragraph_and_keeps_the_checkpoint(tmp_path, task, message):
    """An env that passes the start-up check and later returns NaN, or an observation of another
    shape: one paragraph naming the env, the step and the key (not an index error from a loss, nor a
    traceback), exit 2; the checkpoint saved at step 200 stays, and no NaN reached the replay."""
    import checkpoint

    logdir = tmp_path / "spoils"
    result = run_faulty_env(task, "--logdir", str(logdir))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count(message) == 1 and result.stderr.count("error:") == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert message.removeprefix("error: ") in (logdir / "train.log").read_text()
    state = checkpoint.load_checkpoint(logdir / "latest.pt")
    assert state["counters"]["step"] == 200, state["counters"]
    vectors = [np.load(chunk)["vector"] for chunk in (logdir / "replay").rglob("*.npz")]
    assert vectors and all(np.isfinite(v).all() for v in vectors)


def faulty_env_config(env_id: str, logdir: Path, *args: str):
    """The config of a debug run of tests/helpers/faulty_env.py's gym env `env_id`, in-process."""
    import config as config_lib

    return config_lib.load_config(["--configs", "debug", "gym", "--task", f"gym_faulty_env:{env_id}", "--logdir",
                                   str(logdir), "--envs.parallel", "none", "--device", "cpu", *args])


@pytest.fixture
def short_eval_cap(monkeypatch):
    """Eval episodes capped at 10x the longest training episode, at least 1,000 agent steps (the
    run's are 100x and 10,000: too slow for a test), and faulty_env importable."""
    import dreamer

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "helpers"))
    monkeypatch.setattr(dreamer, "EVAL_LENGTH_FACTOR", 10)
    monkeypatch.setattr(dreamer, "EVAL_LENGTH_MIN", 1000)


def test_episode_figures_are_the_intervals_means_and_the_run_counts(tmp_path, monkeypatch):
    """Training episodes of 60 agent steps, then of 20: episode/length is the mean over the episodes
    finished in the log interval, perf/episodes counts every episode of the run, and the longest
    training episode (which caps evaluations) is the first one, not the last."""
    import dreamer

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "helpers"))  # faulty_env

    logdir = tmp_path / "shrinking"
    counters = dreamer.train(faulty_env_config("ShrinkingEpisodes-v0", logdir, "--steps", "300", "--eval_every", "0"))
    assert counters.longest_episode == 60
    records = [r for r in read_metrics(logdir) if "perf/episodes" in r]
    lengths = [r.get("episode/length") for r in records]
    assert lengths == [40.0, 20.0, 20.0], lengths  # steps 1-100: episodes of 60 and 20
    counts = [r["perf/episodes"] for r in records]
    assert counts == sorted(set(counts)) and counts[-1] == counters.episodes, counts


def test_the_progress_lines_pace_starts_again_when_the_prefill_ends(tmp_path, monkeypatch):
    """The random prefill steps many times faster than training: the progress line's rate (and its
    time left) restarts at the step the prefill ends, once, and counts only training steps after."""
    import dreamer
    from logger import Pace

    monkeypatch.syspath_prepend(str(ROOT / "tests" / "helpers"))  # faulty_env

    restarts: list[int] = []

    class RecordedPace(Pace):
        def restart(self, step: int) -> None:
            restarts.append(step)
            super().restart(step)

    monkeypatch.setattr(dreamer, "Pace", RecordedPace)
    dreamer.train(faulty_env_config("ShrinkingEpisodes-v0", tmp_path / "run", "--steps", "150", "--eval_every", "0"))
    assert restarts == [100]  # debug: prefill 100


def test_an_evaluation_whose_episode_never_ends_is_abandoned_and_training_goes_on(tmp_path, short_eval_cap):
    """Training episodes end after 20 steps, evaluation episodes never (as where an eval policy
    never reaches the goal that ends them): the evaluation gives up at the cap with one warning
    naming --time_limit and --eval_sample, logs nothing, and the run finishes (it hung for ever,
    and its step-200 checkpoint waited behind the evaluation); the final one says nothing of a
    next evaluation. An --eval_only run of it stops with the paragraph (exit 2), having evaluated
    nothing."""
    import checkpoint
    import dreamer

    logdir = tmp_path / "stuck"
    counters = dreamer.train(faulty_env_config("NeverEndsInEval-v0", logdir, "--steps", "300", "--eval_every", "200"))
    assert counters.step == 300 and counters.longest_episode == 20
    log = (logdir / "train.log").read_text()
    abandoned = re.findall(r"evaluation at step (\d+) abandoned, nothing logged: an eval episode ran (\d+) agent "
                           r"steps without ending \(10 times the longest training episode so far, 20, and at "
                           r"least 1000\)\. .*", log)
    assert [step for step, _ in abandoned] == ["200", "300"], log[-3000:]  # and the final one at step 300
    assert [int(ran) for _, ran in abandoned] == [1000, 1000]
    assert log.count("--time_limit N agent steps") == 2 and "--eval_sample True" in log
    assert log.count("Training goes on; the next evaluation is due 200 steps later.") == 1  # not at the end
    assert not [r for r in read_metrics(logdir) if "eval/return" in r]
    assert "finished: 300 steps" in log and checkpoint.load_checkpoint(logdir / "latest.pt")["counters"]["step"] == 300
    with pytest.raises(dreamer.RunError, match=r"^evaluation at step 300 abandoned, .* Nothing was evaluated\.$"):
        dreamer.train(faulty_env_config("NeverEndsInEval-v0", logdir, "--eval_only", "True", "--from_checkpoint",
                                        str(logdir / "latest.pt")))


def test_an_eval_episode_that_ends_at_the_cap_is_logged(tmp_path, short_eval_cap):
    """Eval episodes of exactly the cap's 1,000 steps end there: logged, not abandoned (the ended
    episode's length counted as running until the next one began)."""
    import dreamer

    dreamer.train(faulty_env_config("EndsAt1000InEval-v0", tmp_path, "--steps", "200", "--eval_every", "200",
                                    "--eval_episode_num", "2"))
    assert "abandoned" not in (tmp_path / "train.log").read_text()
    (record,) = [r for r in read_metrics(tmp_path) if "eval/return" in r]
    assert record["eval/episodes"] == 2 and record["eval/length"] == 1000


def test_a_long_evaluation_says_how_far_it_got(tmp_path, short_eval_cap, monkeypatch):
    """An evaluation that runs for minutes says in train.log how far it got and what keeps it
    running (here every step: the interval set to 0 s)."""
    import dreamer

    monkeypatch.setattr(dreamer, "EVAL_NOTE_EVERY_S", 0.0)
    dreamer.train(faulty_env_config("NeverEndsInEval-v0", tmp_path, "--steps", "200", "--eval_every", "200"))
    notes = re.findall(r"evaluation at step 200 still running: 0 of 1 episode done, one running for (\d+) agent "
                       r"steps; an episode that never ends keeps it running \(--time_limit caps episodes; "
                       r"Ctrl-C stops the run and saves\)", (tmp_path / "train.log").read_text())
    assert notes and [int(n) for n in notes] == sorted(int(n) for n in notes) and int(notes[-1]) == 999


def test_eval_episodes_are_capped_only_without_a_time_limit_and_after_a_training_episode():
    import dreamer

    assert dreamer.eval_length_cap(100, 50) is None and dreamer.eval_length_cap(0, 0) is None
    assert dreamer.eval_length_cap(0, 50) == 10_000 and dreamer.eval_length_cap(0, 500) == 50_000


def test_an_env_that_keeps_failing_stops_the_run_with_its_progress_saved(tmp_path):
    """From its 250th step on the env raises at every step, so its restart (which checks one step)
    fails too: the run saves at the step it reached and stops with one paragraph (it was a
    traceback, and the steps after the last checkpoint were lost)."""
    import checkpoint

    logdir = tmp_path / "broken"
    result = run_faulty_env("CrashesLater-v0", "--envs.parallel", "none", "--envs.max_restarts", "3",
                            "--logdir", str(logdir))
    assert result.returncode == 2, result.stderr[-3000:]
    # the first failure's traceback is logged as the restart's warning; the end is one paragraph
    assert result.stderr.count("error:") == 1 and result.stderr.count("Traceback") == 1, result.stderr[-3000:]
    step = checkpoint.load_checkpoint(logdir / "latest.pt")["counters"]["step"]
    assert step > 200  # past the step-200 checkpoint (eval episodes count in the process too)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: env 0: failed, and then failed to restart; its last failure: RuntimeError: the simulator lost "
        "its licence server (the tracebacks "
        f"are in {logdir / 'train.log'}). The run saved its progress: {logdir / 'latest.pt'} at step {step}: fix "
        f"the env and run the same command again (it resumes from {logdir / 'latest.pt'} by itself), or add "
        f"--from_checkpoint {logdir / 'latest.pt'}.")  # no "allow more restarts": its fresh copy fails to start
    log = (logdir / "train.log").read_text()
    # the first failure's traceback (the restart's warning) and the failed restart's (before the paragraph)
    assert log.count("Traceback (most recent call last)") == 2, log
    assert "ERROR the env pool gave up: env 0: failed, and then failed to restart" in log
    # --eval_only on the same env: it saves nothing, the same paragraph without a checkpoint
    before = (logdir / "latest.pt").read_bytes()
    evaluation = run_faulty_env("CrashesLater-v0", "--envs.parallel", "none", "--eval_only", "True",
                                "--eval_episode_num", "20", "--from_checkpoint", str(logdir / "latest.pt"))
    assert evaluation.returncode == 2, evaluation.stderr[-3000:]
    assert evaluation.stderr.strip().splitlines()[-1] == (
        "error: env 0: failed, and then failed to restart; its last failure: RuntimeError: the simulator lost its "
        f"licence server (the tracebacks are in {logdir / 'eval_only' / 'train.log'}). Fix the env and run "
        "the command again.")
    assert (logdir / "latest.pt").read_bytes() == before


def test_an_env_that_raises_at_start_shows_its_traceback_once_then_one_paragraph(tmp_path):
    """Its constructor raises: the env's own traceback once (stderr and train.log), then one
    paragraph, exit 2 (it was the re-raise's traceback and the worker's, the same twice)."""
    logdir = tmp_path / "never"
    result = run_faulty_env("NeverBuilds-v0", "--logdir", str(logdir))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr[-3000:]
    assert "During handling of the above exception" not in result.stderr  # gym's render_mode retry
    assert "in __init__" in result.stderr and "faulty_env.py" in result.stderr  # where the env failed
    assert result.stderr.strip().splitlines()[-1] == (
        "error: train env 0 failed to start (while it was built, or in the start-up check's reset() and one "
        f"step()): OSError: the simulator's display is gone (its traceback is in {logdir / 'train.log'}). "
        "This is a failure of the env's own code or of the simulator it drives: fix it and run the command again.")
    assert "OSError: the simulator's display is gone" in (logdir / "train.log").read_text()


def test_an_eval_env_that_fails_to_start_mid_run_keeps_the_progress(tmp_path):
    """The first evaluation's env cannot be built: the run saves where it is, then one paragraph."""
    import checkpoint

    logdir = tmp_path / "evalfails"
    result = run_faulty_env("BuildsOnce-v0", "--envs.parallel", "none", "--eval_every", "300", "--logdir",
                            str(logdir))
    assert result.returncode == 2, result.stderr[-3000:]
    step = checkpoint.load_checkpoint(logdir / "latest.pt")["counters"]["step"]
    assert step >= 300
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: eval env 0 failed to start (while it was built, or in the start-up check's reset() and one "
        f"step()): OSError: the simulator's display is gone (its traceback is in {logdir / 'train.log'}). "
        "This is a failure of the env's own code or of the simulator it drives: fix it and run the command again. "
        f"The run saved its progress: {logdir / 'latest.pt'} at step {step}, and the same command resumes from it.")


def test_user_errors_are_the_ones_whose_message_says_what_to_fix():
    import checkpoint
    import dreamer
    from envs.checker import EnvCheckError, MissingDependency

    for error in (dreamer.RunError("x"), ConfigError("x"), checkpoint.CheckpointError("x"),
                  EnvCheckError("x"), MissingDependency("x")):
        assert dreamer.is_user_error(error), error
    for error in (RuntimeError("x"), ValueError("x"), ImportError("x"), TypeError("x")):
        assert not dreamer.is_user_error(error), error  # bugs keep their traceback


def test_an_env_restarted_again_is_logged_in_one_line(tmp_path, monkeypatch):
    """A worker restart logs the env's traceback the first time; a second restart of the same env
    logs one line with the failure's last line, not the whole traceback again."""
    import gymnasium

    import envs
    from config import load_config
    from dreamer import make_env_pool
    from logger import Logger

    class RaisesOnStep:
        obs_space = {"vector": gymnasium.spaces.Box(-1, 1, (2,), np.float32)}
        act_space = gymnasium.spaces.Box(-1, 1, (1,), np.float32)

        def __init__(self, name, **kwargs):
            self.steps = 0

        def reset(self):
            return {"vector": np.zeros(2, np.float32)}, {}

        def step(self, action):
            self.steps += 1
            if self.steps > 1:  # the start-up check's step passes
                raise RuntimeError("the simulator lost its state")
            return {"vector": np.zeros(2, np.float32)}, 0.0, False, False, {}

    monkeypatch.setitem(envs.REGISTRY, "flaky", RaisesOnStep)
    config = load_config(["--configs", "debug", "--task", "flaky_x", "--envs.parallel", "none"])
    logger = Logger(tmp_path, tensorboard=False)
    with make_env_pool(config, "train", 1, 0, logger) as pool:
        for _ in range(4):
            pool.step(np.zeros((1, 1), np.float32))
    logger.close()
    log = (tmp_path / "train.log").read_text()
    assert log.count("Traceback (most recent call last)") == 1, log
    assert log.count("RuntimeError: the simulator lost its state") >= 3, log
    assert "train env 0 raised; restarted it and dropped its episode again: RuntimeError: the simulator lost " \
           "its state (traceback as logged before)" in log


@pytest.mark.parametrize("make_bad", ["logdir_is_a_file", "replay_is_a_file"])
def test_a_run_folder_that_cannot_be_written_stops_before_training(tmp_path, make_bad):
    """A --logdir that is a file, or whose replay/ is a file: one paragraph, exit 2, the file intact
    (it was an OS error's traceback, or a crash at the first replay chunk)."""
    logdir = tmp_path / "run"
    if make_bad == "logdir_is_a_file":
        logdir.write_text("my notes")
        bad = logdir
    else:
        logdir.mkdir()
        bad = logdir / "replay"
        bad.write_text("my notes")
    result = run_cli("--configs", "debug", "custom", "--task", "custom_reach", "--logdir", str(logdir))
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(rf"^error: cannot write to the run folder {re.escape(str(logdir))} \((FileExistsError|"
                     r"NotADirectoryError): .*\): checkpoints, replay and logs go there\. Pass a --logdir",
                     result.stderr, re.M), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and bad.read_text() == "my notes"


def test_a_stop_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path, monkeypatch):
    """Ctrl-C during start-up (before a step is taken) must not point at a latest.pt that was never
    written."""
    import dreamer
    from config import load_config

    class StopAtOnce(dreamer.Interrupt):
        def __enter__(self):
            self.requested = True  # as if Ctrl-C came during set-up
            return super().__enter__()

    monkeypatch.setattr(dreamer, "Interrupt", StopAtOnce)
    config = load_config(["--configs", "debug", "custom", "--task", "custom_reach", "--logdir", str(tmp_path),
                          "--envs.parallel", "none"])
    counters = dreamer.train(config)
    log = (tmp_path / "train.log").read_text()
    assert counters.step == 0 and not (tmp_path / "latest.pt").exists()
    assert "INFO stopped at step 0, before the first checkpoint: nothing to resume; the same command starts " \
           "the run afresh" in log and "to resume, run the same command" not in log, log


class SucceedsLate:
    """20-step episodes of a 2-d vector; `log_success` is 0 until step 10, then 1 (a logging-only key)."""

    def __init__(self, name, **kwargs):
        import gymnasium

        self._t = 0
        self.obs_space = {"vector": gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32)}
        self.act_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def _obs(self):
        return {"vector": np.full(2, self._t / 20.0, np.float32), "log_success": float(self._t >= 10)}

    def reset(self):
        self._t = 0
        return self._obs(), {}

    def step(self, action):
        self._t += 1
        return self._obs(), 0.0, False, self._t >= 20, {}


def test_log_keys_reach_the_training_and_the_evaluation_metrics(tmp_path, monkeypatch):
    """log_success: episode/success for training episodes, eval/success (mean over the evaluation's
    episodes) for evaluations; it was training episodes only."""
    import config as config_lib
    import dreamer
    import envs

    monkeypatch.setitem(envs.REGISTRY, "succ", SucceedsLate)
    config = config_lib.load_config(["--configs", "debug", "--task", "succ_late", "--logdir", str(tmp_path),
                                     "--steps", "200", "--eval_every", "200", "--eval_episode_num", "2",
                                     "--envs.parallel", "none", "--device", "cpu"])
    dreamer.train(config)
    records = read_metrics(tmp_path)
    evals = [r for r in records if "eval/return" in r]
    assert evals and all(r["eval/success"] == 1.0 for r in evals), evals
    assert any(r.get("episode/success") == 1.0 for r in records), records


def test_video_false_logs_no_video_at_all(tmp_path):
    """--video False: neither the eval episode's video nor the world model's open-loop predictions
    (an image env, evaluated after training started, would log both)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import config as config_lib
    import dreamer

    config = config_lib.load_config(["--configs", "debug", "--task", "custom_reach", "--logdir", str(tmp_path),
                                     "--steps", "150", "--prefill", "100", "--eval_every", "150",
                                     "--envs.parallel", "none", "--device", "cpu", "--video", "False"])
    assert dreamer.train(config).updates > 0
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "eval/return" in events.Tags()["scalars"] and events.Tags()["images"] == []


def test_an_evaluations_achievements_are_success_rates_as_in_training():
    """Crafter's log_achievement_<name> counts: an evaluation logs eval/achievement/<name>, the
    share (%) of its episodes that unlocked it, and eval/achievement/crafter_score, as training logs
    achievement/<name> (it logged the mean count as eval/achievement_<name>); other log_ keys stay
    means."""
    from types import SimpleNamespace

    import dreamer
    from envs.crafter import crafter_score

    logged: dict[str, float] = {}
    logger = SimpleNamespace(scalars=logged.update, info=None, video=None)
    logs = [{"achievement_collect_wood": 3.0, "achievement_eat_cow": 0.0, "success": 1.0},
            {"achievement_collect_wood": 1.0, "achievement_eat_cow": 0.0, "success": 0.0},
            {"achievement_collect_wood": 0.0, "achievement_eat_cow": 2.0, "success": 0.5},
            {"achievement_collect_wood": 5.0, "achievement_eat_cow": 0.0, "success": 0.5}]
    config = SimpleNamespace(eval_only=False)
    dreamer.log_eval(config, [1.0, 2.0, 3.0, 4.0], [10, 10, 10, 10], logs, [], logger)
    assert logged["eval/achievement/collect_wood"] == 75.0 and logged["eval/achievement/eat_cow"] == 25.0
    assert logged["eval/achievement/crafter_score"] == pytest.approx(crafter_score({"a": 75.0, "b": 25.0}))
    assert logged["eval/success"] == 0.5 and logged["eval/return"] == 2.5 and logged["eval/episodes"] == 4
    assert not [key for key in logged if key.startswith("eval/achievement_")]


def test_the_progress_lines_pace_leaves_out_evaluations_and_saves(monkeypatch):
    """After an evaluation or a checkpoint the line showed 'fps 0.2 | left 0:07:44' for a run that
    ended 16 s later: the pause counted as stepping time. Pace leaves pauses out and forgets old
    points after its window."""
    import logger as logger_lib

    now = [1000.0]
    monkeypatch.setattr(logger_lib.time, "time", lambda: now[0])
    pace = logger_lib.Pace(0, window=60.0)
    for step in range(1, 11):  # 10 steps per second
        now[0] += 0.1
        pace.add(step)
    assert pace.rate() == pytest.approx(10.0)
    now[0] += 30.0  # a 30 s evaluation
    pace.pause(30.0)
    now[0] += 0.1
    pace.add(11)
    assert pace.rate() == pytest.approx(10.0)
    pace.restart(11)
    assert pace.rate() != pace.rate()  # NaN: nothing measured since the restart
    for step in range(12, 1000):
        now[0] += 0.5  # slower now: the window of 60 s holds only the slow steps
        pace.add(step)
    assert pace.rate() == pytest.approx(2.0, rel=0.02)


def test_the_live_progress_line_keeps_its_speed_at_a_log_step(tmp_path, monkeypatch, capsys):
    """On a terminal the progress line is redrawn every step; at a log step the interval restarts,
    and the line showed 'fps 0.0 | ... | left ?' there (the last one of a run among them)."""
    import config as config_lib
    import dreamer
    import logger as logger_lib

    monkeypatch.setattr(logger_lib, "live_terminal", lambda: True)
    config = config_lib.load_config(["--configs", "debug", "custom", "--task", "custom_reach", "--logdir",
                                     str(tmp_path), "--steps", "200", "--log_every", "50", "--eval_every", "0",
                                     "--envs.parallel", "none", "--device", "cpu"])
    dreamer.train(config)
    lines = [part for part in capsys.readouterr().err.split("\r") if part.startswith("step ")]
    assert len(lines) > 100 and any(line.startswith("step 199/200 ") for line in lines), lines[-3:]
    training = [line for line in lines if int(line.split()[1].split("/")[0]) > 100]  # from the 2nd training step
    assert training and not [line for line in training if "fps 0.0 " in line or "left ?" in line], training[-3:]
    assert all("left ?" in line for line in lines if int(line.split()[1].split("/")[0]) < 100)  # random steps
    assert not [line for line in lines if "nan" in line], lines[:3]  # no 'return nan' before an episode ends


def test_episode_returns_and_lengths_restart_at_each_episode():
    tracker = dreamer.EpisodeTracker(2)
    steps = [(True, 0.0, False), (False, 1.0, False), (False, 2.0, True),  # episode 1: return 3, length 2
             (True, 0.0, False), (False, 5.0, True)]  # episode 2: return 5, length 1
    summaries = [tracker.add(0, {"is_first": f, "reward": r, "is_last": last}) for f, r, last in steps]
    assert [s for s in summaries if s] == [{"return": 3.0, "length": 2}, {"return": 5.0, "length": 1}]
    assert tracker.add(1, {"is_first": True, "reward": 0.0, "is_last": False}) is None


def test_a_replay_record_holds_the_action_that_led_to_its_step():
    action = np.array([0.5, -1.0], np.float32)
    obs = {"vector": np.ones(3, np.float32), "reward": 2.0, "is_first": np.bool_(True), "is_last": False,
           "is_terminal": False, "log_success": 1.0}
    first = dreamer.to_transition(obs, action)
    assert set(first) == {"vector", "action", "reward", "is_first", "is_last", "is_terminal"}  # no log_ keys
    np.testing.assert_array_equal(first["action"], np.zeros(2, np.float32))  # no action led to a first step
    assert first["reward"].dtype == np.float32 and first["is_first"] is True
    later = dreamer.to_transition({**obs, "is_first": False}, action)
    np.testing.assert_array_equal(later["action"], action)


def test_an_episodes_log_value_is_the_highest_it_reached():
    tracker = dreamer.EpisodeTracker(1)
    steps = [(True, 0.0, False), (False, 1.0, False), (False, 0.5, True),  # README: the highest value
             (True, 0.0, False), (False, 0.25, True)]  # the next episode starts afresh
    summaries = [tracker.add(0, {"is_first": f, "reward": 0.0, "is_last": last, "log_success": v})
                 for f, v, last in steps]
    assert [s["success"] for s in summaries if s] == [1.0, 0.25]


def test_logged_train_metrics_are_means_over_the_interval():
    sums = dreamer.MetricSums()
    for value in (1.0, 2.0, 6.0):
        sums.add({"loss/model": torch.tensor(value), "grad/model_norm": torch.tensor(2 * value)})
    assert sums.means() == {"loss/model": 3.0, "grad/model_norm": 6.0}
    assert sums.means() == {}  # reset for the next interval
