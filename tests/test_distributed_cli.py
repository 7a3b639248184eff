"""The multi-process path from the command line, with real processes: stop requests, a rank that
dies, a user error one rank alone sees, torchrun; and the supervisor that `--parallel N` runs the
ranks under (distributed.RankSupervisor) with stand-in ranks."""
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import distributed  # noqa: E402
from config import ConfigError  # noqa: E402

RUN = ["dreamer.py", "--configs", "debug", "custom", "--task", "custom_reach", "--parallel", "2",
       "--device", "cpu", "--eval_every", "0", "--log_every", "100", "--save_every", "100"]

# a gym env whose copies with odd seeds (env 1: rank 1's env, one env per rank) give a reset
# observation of the wrong shape: a user error (EnvCheckError) that rank 1 alone sees
ODD_ENV = '''
import gymnasium, numpy as np

class OddBad(gymnasium.Env):
    observation_space = gymnasium.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self):
        self._odd = False

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self._odd = seed % 2 == 1
        return np.zeros(4 if self._odd else 3, np.float32), {}

    def step(self, action):
        return np.zeros(3, np.float32), 0.0, False, False, {}

gymnasium.register(id="OddBad-v0", entry_point=OddBad)
'''

# ten-step episodes of return 10; every seeded reset appends its seed to $RESETS_FILE
COUNTED_ENV = '''
import os, gymnasium, numpy as np

class Counted(gymnasium.Env):
    observation_space = gymnasium.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            with open(os.environ["RESETS_FILE"], "a") as out:
                out.write(f"{seed}\\n")
        self._t = 0
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self._t += 1
        return np.zeros(3, np.float32), 1.0, self._t >= 10, False, {}

gymnasium.register(id="Counted-v0", entry_point=Counted)
'''


def environment(**extra: str) -> dict:
    return {**os.environ, "CI": "1", **extra}


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_process_left():
    """A failing test leaves no launcher or rank running."""
    yield
    while STARTED:
        launcher = STARTED.pop()
        if launcher.poll() is None:
            for pid in children(launcher.pid):
                os.kill(pid, signal.SIGKILL)
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


def start(args: list[str], logdir: Path) -> subprocess.Popen:
    """dreamer.py in a session of its own (a terminal's process group: Ctrl-C goes to all of it)."""
    out = open(logdir.parent / f"{logdir.name}.stderr", "w")
    launcher = subprocess.Popen([sys.executable, *args, "--logdir", str(logdir)], cwd=ROOT, env=environment(),
                                stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
    STARTED.append(launcher)
    return launcher


def stderr_of(logdir: Path) -> str:
    return (logdir.parent / f"{logdir.name}.stderr").read_text()


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def log_text(logdir: Path) -> str:
    path = logdir / "train.log"
    return path.read_text() if path.exists() else ""


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def ranks_of(launcher: subprocess.Popen, logdir: Path) -> tuple[int, int]:
    """(rank 0's pid, rank 1's pid): rank 0 holds the run folder's lock, which names its pid."""
    def both() -> bool:
        return len([p for p in children(launcher.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]) == 2
    wait_for(both, 60, "two ranks")
    wait_for(lambda: (logdir / ".lock").exists() and (logdir / ".lock").read_text().startswith("pid "), 60,
             "rank 0 to lock the run folder")
    spawned = [p for p in children(launcher.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    rank0 = int((logdir / ".lock").read_text().split()[1])
    assert rank0 in spawned, (rank0, spawned)
    return rank0, next(p for p in spawned if p != rank0)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def lock_is_free(logdir: Path) -> bool:
    with open(logdir / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def checkpoint_step(logdir: Path) -> int:
    return int(torch.load(logdir / "latest.pt", map_location="cpu", weights_only=False)["counters"]["step"])


def saved_steps(logdir: Path) -> list[int]:
    return [int(s) for s in re.findall(r"saved checkpoint \S+ at step (\d+)", log_text(logdir))]


def first_checkpoint(logdir: Path) -> None:
    wait_for(lambda: saved_steps(logdir), 120, "the first checkpoint")


# ------------------------------------------------------------------------------------ stop requests


def test_ctrl_c_to_the_group_stops_every_rank_saves_once_and_the_rerun_resumes(tmp_path):
    logdir = tmp_path / "run"
    launcher = start([*RUN, "--steps", "100000"], logdir)
    rank0, rank1 = ranks_of(launcher, logdir)
    first_checkpoint(logdir)
    os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert launcher.wait(timeout=60) == 130  # as a single process stopped by Ctrl-C
    err = stderr_of(logdir)
    assert err.count("SIGINT: stopping after the current step") == 1, err  # rank 0 alone got it
    assert "Traceback" not in err and "error:" not in err, err
    assert not alive(rank0) and not alive(rank1)
    assert lock_is_free(logdir)
    stopped = int(re.search(r"stopped at step (\d+)", log_text(logdir)).group(1))
    assert saved_steps(logdir)[-1] == stopped == checkpoint_step(logdir)
    assert saved_steps(logdir).count(stopped) == 1

    # the same command resumes there and counts on
    again = subprocess.run([sys.executable, *RUN, "--steps", str(stopped + 100), "--logdir", str(logdir)],
                           cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    log = log_text(logdir)
    assert f"at step {stopped} " in log and f"finished: {stopped + 100} steps" in log
    steps = [json.loads(line)["step"] for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == stopped + 100  # no interval logged twice
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2  # one per process that logged: rank 0's


def test_sigterm_to_the_launcher_alone_reaches_the_ranks(tmp_path):
    logdir = tmp_path / "run"
    launcher = start([*RUN, "--steps", "100000"], logdir)
    rank0, rank1 = ranks_of(launcher, logdir)
    first_checkpoint(logdir)
    launcher.send_signal(signal.SIGTERM)  # e.g. `kill PID` or a scheduler: the ranks get no signal of their own
    assert launcher.wait(timeout=60) == 143
    err = stderr_of(logdir)
    assert err.count("SIGTERM: stopping after the current step (an evaluation in progress is cut short) and "
                     "saving; a second SIGTERM or Ctrl-C to stop at once") == 1, err
    assert "Traceback" not in err, err
    assert not alive(rank0) and not alive(rank1)
    assert lock_is_free(logdir)
    assert "stopped at step" in log_text(logdir) and saved_steps(logdir)[-1] == checkpoint_step(logdir)


def test_sigterm_to_rank_1_alone_stops_the_run_as_a_stop_and_counts_every_ranks_replay(tmp_path):
    """A scheduler may signal one rank: every rank stops at the same iteration, and rank 0 reports a
    stop (it said 'finished' when the request came from another rank). The logged replay size is
    both ranks' steps, the whole run's (it was rank 0's share)."""
    logdir = tmp_path / "run"
    launcher = start([*RUN, "--steps", "100000"], logdir)
    rank0, rank1 = ranks_of(launcher, logdir)
    first_checkpoint(logdir)
    os.kill(rank1, signal.SIGTERM)
    assert launcher.wait(timeout=60) == 143
    log = log_text(logdir)
    stopped = int(re.search(r"stopped at step (\d+); to resume", log).group(1))
    assert "finished:" not in log and saved_steps(logdir)[-1] == stopped == checkpoint_step(logdir)
    assert log.count("INFO another rank got a stop request (Ctrl-C or SIGTERM): every rank stops after this "
                     "step, and rank 0 saves") == 1  # rank 0 says why it stops
    records = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "perf/replay_steps" in r][-1]
    assert last["perf/replay_steps"] == last["step"]  # every step of both ranks is in the replay
    assert not alive(rank0) and not alive(rank1) and lock_is_free(logdir)


def test_kill_9_of_one_rank_stops_the_others_and_names_it(tmp_path):
    logdir = tmp_path / "run"
    launcher = start([*RUN, "--steps", "100000"], logdir)
    rank0, rank1 = ranks_of(launcher, logdir)
    first_checkpoint(logdir)
    killed_at = time.time()
    os.kill(rank1, signal.SIGKILL)
    assert launcher.wait(timeout=60) == 1
    assert time.time() - killed_at < distributed.PEER_GRACE_S  # rank 0 did not wait for a timeout
    err = stderr_of(logdir)
    assert f"error: rank 1 (pid {rank1}) was ended by SIGKILL" in err, err
    assert "is kept: the same command resumes from it" in err
    assert "Traceback" not in err and "Connection" not in err, err  # not rank 0's broken collective
    assert not alive(rank0)
    assert lock_is_free(logdir)
    assert checkpoint_step(logdir) == saved_steps(logdir)[-1]  # the last checkpoint, intact
    assert f"ERROR rank 1 (pid {rank1}) was ended by SIGKILL" in log_text(logdir)  # the log says why too


# ------------------------------------------------------------------------------------------ evaluation


def test_rank_seeds_are_the_seed_plus_1000_per_rank_as_the_readme_says():
    import config
    import dreamer

    cfg = config.load_config(["--seed", "5"])
    assert [dreamer.rank_seed(cfg, rank) for rank in range(3)] == [5, 1005, 2005]
    assert dreamer.rank_seed(cfg, 1, step=2) == 1005 + 2 * 100_003  # a resumed rank: moved by its step
    # a run with --seed 6 shares no rank's seed with this one (seeds one apart would collide)
    other = config.load_config(["--seed", "6"])
    assert not {dreamer.rank_seed(cfg, r) for r in range(4)} & {dreamer.rank_seed(other, r) for r in range(4)}


def test_eval_shares_split_the_episodes_over_the_ranks():
    import dreamer

    assert [dreamer.eval_share(10, rank, 4) for rank in range(4)] == [3, 3, 2, 2]
    assert [dreamer.eval_share(3, rank, 2) for rank in range(2)] == [2, 1]
    assert [dreamer.eval_share(1, rank, 2) for rank in range(2)] == [1, 0]  # rank 1 makes no eval envs
    assert dreamer.eval_share(7, 0, 1) == 7


def test_every_rank_evaluates_its_share_and_rank_0_logs_them_all(tmp_path):
    import envs

    (tmp_path / "countedenv.py").write_text(COUNTED_ENV)
    resets = tmp_path / "resets.txt"
    logdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "dreamer.py", "--configs", "debug", "gym", "--task", "gym_countedenv:Counted-v0",
         "--parallel", "2", "--device", "cpu", "--seed", "5", "--steps", "60", "--eval_every", "40",
         "--eval_episode_num", "3", "--log_every", "20", "--logdir", str(logdir)],
        cwd=ROOT, env=environment(PYTHONPATH=str(tmp_path), RESETS_FILE=str(resets)),
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/return" in r]
    # at step 40 and at the end (60): rank 0's 2 episodes and rank 1's 1, each of return 10
    assert [r["step"] for r in evals] == [40, 60]
    assert all(r["eval/episodes"] == 3 and r["eval/return"] == 10.0 and r["eval/length"] == 10 for r in evals)
    seeds = [int(line) for line in resets.read_text().split()]
    # one env per rank: rank 0's eval env is eval env 0, rank 1's eval env 1 (a one-rank run
    # would make eval env 0 alone); each evaluation makes fresh eval envs with the same seeds
    eval_seeds = [envs.env_seed(5, "eval", index) for index in (0, 1)]
    assert sorted(s for s in seeds if s in eval_seeds) == sorted(eval_seeds * 2)
    assert (logdir / "train.log").read_text().count("finished: 60 steps") == 1


# ---------------------------------------------------------------------------------------- user errors


def test_a_user_error_only_rank_1_sees_is_one_paragraph(tmp_path):
    (tmp_path / "oddenv.py").write_text(ODD_ENV)
    start_time = time.time()
    result = subprocess.run(
        [sys.executable, "dreamer.py", "--configs", "debug", "gym", "--task", "gym_oddenv:OddBad-v0",
         "--parallel", "2", "--device", "cpu", "--logdir", str(tmp_path / "run")],
        cwd=ROOT, env=environment(PYTHONPATH=str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert time.time() - start_time < 60
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: [rank 1] env 1 (GymEnv): reset() observation 'vector': expected "
                                "shape (3,), got (4,)")
    # rank 0's broken collective and the stop it was sent are consequences, not shown
    for noise in ("Traceback", "Connection closed", "SIGTERM", "failed:"):
        assert noise not in result.stderr, result.stderr


def test_supervisor_prints_an_error_of_every_rank_once():
    out = Output()
    code = distributed.RankSupervisor(2, same_user_error, grace=5, out=out).run()
    assert code == 2
    assert out.text.count("error:") == 1, out.text
    assert out.text.strip() == ("error: env 0 is not there: check the task name. "
                                "(the same error stopped ranks 0, 1)")


def test_group_user_errors_counts_messages_that_differ_in_numbers_as_one():
    groups = distributed.group_user_errors({1: "env 1 gave shape (4,)", 0: "env 0 gave shape (4,)",
                                            2: "a checkpoint is damaged"})
    assert groups == [([0, 1], "env 0 gave shape (4,)"), ([2], "a checkpoint is damaged")]


# ----------------------------------------------------------------------------- failures, hangs, exits


def test_supervisor_kills_a_rank_left_waiting_after_another_crashed():
    out = Output()
    begin = time.time()
    supervisor = distributed.RankSupervisor(2, crash_or_wait, grace=1.0, out=out)
    code = supervisor.run()
    assert code == 1
    assert time.time() - begin < 30  # not rank 0's 600 s
    assert supervisor.killed == {0: "it was still running 1 s after rank 1 ended"}
    assert "[rank 1] failed:\nTraceback" in out.text and "RuntimeError: a bug in rank 1" in out.text
    assert "error: rank 1 failed (its traceback is above); every rank stopped." in out.text
    assert "(rank 0 was killed: it was still running 1 s after rank 1 ended)" in out.text


def test_a_broken_collective_is_told_apart_from_a_bug():
    assert distributed.is_peer_lost(torch.distributed.DistNetworkError("store gone"))
    try:
        raise RuntimeError("a bug")
    except RuntimeError as error:
        assert not distributed.is_peer_lost(error)
    with pytest.raises((RuntimeError, ValueError)) as raised:  # a plain exception raised inside
        torch.distributed.all_reduce(torch.zeros(1))  # torch.distributed, as gloo reports a closed connection
    assert not isinstance(raised.value, torch.distributed.DistError)
    assert distributed.is_peer_lost(raised.value)
    assert distributed.short_reason(RuntimeError(
        "[/x/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:20134. This is "
        "typically caused by a remote worker crashing.")) == "Connection closed by peer [127.0.0.1]:20134"


# ------------------------------------------------------------------------------------------ torchrun


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", str(distributed.free_port())]


def test_torchrun_rank_errors_are_one_line_each(tmp_path):
    (tmp_path / "oddenv.py").write_text(ODD_ENV)
    result = subprocess.run(
        [*torchrun(), "dreamer.py", "--configs", "debug", "gym", "--task", "gym_oddenv:OddBad-v0",
         "--device", "cpu", "--logdir", str(tmp_path / "run")],
        cwd=ROOT, env=environment(PYTHONPATH=str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "error: [rank 1] env 1 (GymEnv): reset() observation 'vector'" in result.stderr, result.stderr
    assert "[rank 0] stopped: its connection to the other ranks broke (" in result.stderr, result.stderr
    assert "[rank0]: Traceback" not in result.stderr and "[rank 0] failed" not in result.stderr


@pytest.mark.slow
def test_torchrun_launch_as_the_readme_shows_on_cpu(tmp_path):
    logdir = tmp_path / "run"
    result = subprocess.run(
        [*torchrun(), "dreamer.py", "--configs", "debug", "custom", "--task", "custom_reach", "--device",
         "cpu", "--steps", "200", "--eval_every", "0", "--logdir", str(logdir)],
        cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("parallel: 2 ranks, backend gloo") == 1
    log = log_text(logdir)
    assert log.count("finished: 200 steps") == 1
    steps = [json.loads(line)["step"] for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [100, 200]
    assert {p.name[:4] for p in (logdir / "replay").glob("*.npz")} == {"w000", "w001"}


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_once_and_is_announced_once(tmp_path):
    """torchrun passes the signal to every rank: rank 0 says so once, they stop at one iteration and
    rank 0 saves once (torchrun itself then ends with its own SignalException, exit 1)."""
    logdir = tmp_path / "run"
    with open(tmp_path / "run.stderr", "w") as out:
        launcher = subprocess.Popen(
            [*torchrun(), "dreamer.py", "--configs", "debug", "custom", "--task", "custom_reach", "--device",
             "cpu", "--steps", "100000", "--eval_every", "0", "--save_every", "100", "--logdir", str(logdir)],
            cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
        STARTED.append(launcher)
        first_checkpoint(logdir)
        os.killpg(launcher.pid, signal.SIGINT)
        launcher.wait(timeout=90)
    err = (tmp_path / "run.stderr").read_text()
    assert err.count("SIGINT: stopping after the current step") == 1, err
    stopped = int(re.search(r"stopped at step (\d+)", log_text(logdir)).group(1))
    assert saved_steps(logdir).count(stopped) == 1 and checkpoint_step(logdir) == stopped
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err, err


# ------------------------------------------------------------------------- stand-in ranks (spawned)


class Output:
    def __init__(self):
        self.text = ""

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def same_user_error(rank: int, world: int) -> None:
    raise ConfigError(f"env {rank} is not there: check the task name.")


def crash_or_wait(rank: int, world: int) -> None:
    if rank == 1:
        time.sleep(0.5)
        raise RuntimeError("a bug in rank 1")
    time.sleep(600)  # e.g. waiting in a collective for rank 1


def test_a_collective_waits_three_hours_unless_told_otherwise(monkeypatch):
    """Rank 0 evaluates alone while the others wait in a collective: torch's 30 minutes ended long
    evaluations, so the default is 3 hours and DREAMER_COLLECTIVE_TIMEOUT_S sets it."""
    monkeypatch.delenv("DREAMER_COLLECTIVE_TIMEOUT_S", raising=False)
    assert distributed.collective_timeout().total_seconds() == 3 * 3600
    monkeypatch.setenv("DREAMER_COLLECTIVE_TIMEOUT_S", "90")
    assert distributed.collective_timeout().total_seconds() == 90
