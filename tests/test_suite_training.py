"""Debug training runs of every suite through the command line (issues 4 and 7).

Each case runs `python3 dreamer.py --configs debug <block> --task <task> --steps 300` in a fresh
process (CI=1) and checks what a user would look at: exit code 0, the `finished:` line in train.log,
finite losses in metrics.jsonl, a finished train and eval episode, and actions of the right kind in
replay. Long-episode suites get `--time_limit 100` so train and eval episodes end inside 300 steps,
and `--eval_every 300` evaluates once, at the end.

The fastest five cases run by default (12-18 s each, about 80 s in all on the 2-core CI machine);
the others are marked slow (`pytest -m slow`, about 130 s): dmc_vision ~18-25 s, gym_Pendulum-v1
~11 s, plan2explore ~19 s, memorymaze_9x9 ~60 s (its maze resets and rendering dominate).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 300
WORLD_MODEL_LOSSES = ("loss/model", "loss/reward", "loss/cont", "loss/kl_dyn", "loss/kl_rep")
BEHAVIOUR_LOSSES = ("loss/actor", "loss/critic")


@dataclasses.dataclass(frozen=True)
class SuiteRun:
    """One debug run: its CLI arguments and what its replay and losses must look like."""

    block: str
    task: str
    extra: tuple[str, ...] = ()
    reconstruction: str = "loss/image"  # decoder loss the run must report
    action_kind: str = "box"  # box: actions in [-1, 1]; onehot: one-hot rows (zeros on is_first)
    action_size: int | None = None

    def argv(self, logdir: Path) -> list[str]:
        return ["--configs", "debug", self.block, "--task", self.task, "--logdir", str(logdir),
                "--steps", str(STEPS), "--eval_every", str(STEPS), *self.extra]


SHORT_EPISODES = ("--time_limit", "100")

RUNS = {
    "gym_cartpole": SuiteRun("gym", "gym_CartPole-v1", ("--actor_dist", "onehot"), "loss/vector",
                             "onehot", 2),
    "custom_discrete": SuiteRun("custom", "custom_reach_discrete", ("--actor_dist", "onehot"),
                                "loss/image", "onehot", 5),
    "dmc_proprio": SuiteRun("dmc_proprio", "dmc_cartpole_balance", SHORT_EPISODES, "loss/vector",
                            "box", 1),
    "crafter": SuiteRun("crafter", "crafter_reward", SHORT_EPISODES, "loss/image", "onehot", 17),
    "atari100k": SuiteRun("atari100k", "atari_pong", SHORT_EPISODES, "loss/image", "onehot", 6),
    "dmc_vision": SuiteRun("dmc_vision", "dmc_walker_walk", SHORT_EPISODES, "loss/image", "box", 6),
    "gym_pendulum": SuiteRun("gym", "gym_Pendulum-v1", SHORT_EPISODES, "loss/vector", "box", 1),
    "memorymaze": SuiteRun("memorymaze", "memorymaze_9x9", SHORT_EPISODES, "loss/image", "onehot", 6),
    "plan2explore": SuiteRun("custom", "custom_reach", ("--behavior", "plan2explore"), "loss/image",
                             "box", 2),
}

needs_memory_maze = pytest.mark.skipif(
    importlib.util.find_spec("memory_maze") is None,
    reason="memory-maze is not installed (pip install memory-maze gym==0.26.2)")

CASES = [
    pytest.param("gym_cartpole", id="gym_CartPole-v1"),
    pytest.param("custom_discrete", id="custom_reach_discrete"),
    pytest.param("dmc_proprio", id="dmc_proprio"),
    pytest.param("crafter", id="crafter"),
    pytest.param("atari100k", id="atari100k"),
    pytest.param("dmc_vision", id="dmc_vision", marks=pytest.mark.slow),
    pytest.param("gym_pendulum", id="gym_Pendulum-v1", marks=pytest.mark.slow),
    pytest.param("memorymaze", id="memorymaze", marks=[pytest.mark.slow, needs_memory_maze]),
    pytest.param("plan2explore", id="plan2explore", marks=pytest.mark.slow),
]


# ---------------------------------------------------------------------------------------- helpers


def run_cli(argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "dreamer.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CI": "1"})


def read_metrics(logdir: Path) -> list[dict]:
    lines = (logdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_replay(logdir: Path) -> dict[str, np.ndarray]:
    """Every step on disk, in insertion order: {key: (steps, ...)} (the chunk files of replay.py)."""
    chunks = []
    for path in sorted((logdir / "replay").glob("*.npz")):
        with np.load(path) as data:
            chunks.append({key: data[key] for key in data.files})
    assert chunks, f"no replay chunks under {logdir / 'replay'}"
    steps = {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}
    order = np.argsort(steps["_order"], kind="stable")
    return {key: value[order] for key, value in steps.items()}


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def assert_finished(logdir: Path, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    log = (logdir / "train.log").read_text()
    assert f"finished: {STEPS} steps" in log, log[-3000:]
    assert "ERROR" not in log, log[-3000:]


def assert_losses_finite(records: list[dict], required: tuple[str, ...]) -> None:
    logged = set().union(*records)
    missing = [name for name in required if name not in logged]
    assert not missing, f"losses {missing} never logged; logged: {sorted(logged)}"
    for record in records:
        bad = {k: v for k, v in record.items() if k.startswith("loss/") and not math.isfinite(v)}
        assert not bad, f"non-finite losses at step {record['step']}: {bad}"


def assert_episodes_logged(records: list[dict]) -> None:
    assert records[-1]["step"] == STEPS, [r["step"] for r in records]
    returns = [r["episode/return"] for r in records if "episode/return" in r]
    assert returns and all(math.isfinite(x) for x in returns), "no finished train episode logged"
    evals = [r for r in records if "eval/return" in r]
    assert len(evals) == 1 and evals[0]["step"] == STEPS, (
        f"expected one eval record, at step {STEPS} where the eval ran (eval_every {STEPS}); got "
        f"{[(r['step'], r['eval/return']) for r in evals]}")
    assert evals[0]["eval/episodes"] == 1 and math.isfinite(evals[0]["eval/return"])


def assert_actions(replay: dict[str, np.ndarray], run: SuiteRun) -> None:
    actions, first = replay["action"], replay["is_first"].astype(bool)  # (steps, A), (steps,)
    assert len(actions) == STEPS, actions.shape
    assert actions.shape[1:] == (run.action_size,), actions.shape
    assert np.all(actions[first] == 0), "the action stored with is_first must be zeros"
    taken = actions[~first]
    if run.action_kind == "onehot":
        assert np.all((taken == 0) | (taken == 1)) and np.all(taken.sum(-1) == 1), taken[:5]
    else:
        assert np.all(np.abs(taken) <= 1.0 + 1e-6) and taken.std() > 0, taken[:5]


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", CASES)
def test_debug_run_trains_and_finishes(name: str, tmp_path: Path) -> None:
    run = RUNS[name]
    logdir = tmp_path / name
    result = run_cli(run.argv(logdir))
    assert_finished(logdir, result)
    records = read_metrics(logdir)
    assert_losses_finite(records, WORLD_MODEL_LOSSES + BEHAVIOUR_LOSSES + (run.reconstruction,))
    assert_episodes_logged(records)
    assert_actions(read_replay(logdir), run)
    if name == "crafter":
        assert_crafter_achievements(logdir, records)
    if name == "plan2explore":
        assert_losses_finite(records, ("loss/expl_actor", "loss/expl_critic", "loss/expl_ensemble"))
        assert "behavior: plan2explore" in (logdir / "config.yaml").read_text()


def assert_crafter_achievements(logdir: Path, records: list[dict]) -> None:
    """achievement/<name> success rates (%) for all 22 achievements and the Crafter score, both in
    metrics.jsonl and in TensorBoard, the score being the geometric mean of the logged rates."""
    import crafter

    from envs.crafter import crafter_score

    expected = [f"achievement/{name}" for name in crafter.constants.achievements]
    assert len(expected) == 22
    last = [r for r in records if "achievement/crafter_score" in r][-1]
    missing = [tag for tag in expected if tag not in last]
    assert not missing, f"missing in metrics.jsonl: {missing}"
    rates = {tag: last[tag] for tag in expected}
    assert all(0.0 <= rate <= 100.0 for rate in rates.values()), rates
    assert last["achievement/crafter_score"] == pytest.approx(crafter_score(rates), rel=1e-6)
    # the episodes' counts are success rates only: no mean count per achievement beside them
    counts = sorted({key for r in records for key in r if key.startswith(("episode/achievement", "eval/achievement_"))})
    assert not counts, counts

    scalars = tensorboard_scalars(logdir)
    missing = [tag for tag in expected + ["achievement/crafter_score"] if tag not in scalars]
    assert not missing, f"missing in TensorBoard: {missing}"
    step, score = scalars["achievement/crafter_score"][-1]
    assert step == last["step"] and score == pytest.approx(last["achievement/crafter_score"], rel=1e-5)
    # train.log keeps the score, not 22 rates per line (lines of 1,300+ characters to tail -f)
    lines = [line for line in (logdir / "train.log").read_text().splitlines() if "achievement/crafter_score" in line]
    assert lines and not [line for line in lines if "achievement/collect_wood" in line], lines[-1][:300]
    assert "eval/achievement/crafter_score" in "".join(lines)
    eval_rates = [r for r in records if "eval/achievement/collect_wood" in r]
    assert eval_rates and 0.0 <= eval_rates[-1]["eval/achievement/collect_wood"] <= 100.0
