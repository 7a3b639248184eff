"""The CI learning check: a tiny DreamerV3 learns custom_reach from vector observations.

What runs: the check `custom_reach` of scripts/learn.py, i.e. `dreamer.py --configs custom --task
custom_reach` with vector observations only, a tiny model (deter 64, stoch 8x8, MLPs of 64 units;
reward head 2 x 128), batch 16 x 16, 500 prefill steps, train_ratio 128, 3,000 agent steps (6,000 env
steps, ~1,250 updates), model lr 1e-3, actor and critic lr 3e-4, seed 0. The paper's learning rates
(1e-4 / 3e-5) need far more updates than a CI budget: with them the two-hot reward head is still
almost constant after 600 updates (predicted-reward std 0.007 against 1.0 in the data) and nothing is
learned. Everything else (losses, return normaliser, slow critic, imagination) is the paper's.

Figures: a uniform random policy scores about -4 per episode (envs/custom_env.py; std 39 per
episode, so about +-12 for a mean of 10 episodes); heading straight for the target about +95. The bar
is a final eval return (10 episodes, deterministic policy) of at least 60: random + 64.

Three consecutive seeds (final eval return; first eval >= 60 at step 1500 in each; about 3.5 minutes
alone on the 2-core machine): seed 0: 81.1, seed 1: 80.6, seed 2: 84.3 (since the RSSM clips
imagined actions into [-1, 1]; before that 84.2, 79.4, 80.0). Seed 0 is the one committed.

Broken on purpose once each, in a scratch copy of the tree, seed 0 (models.py):
- world model: reward head loss weight 0 (WorldModel.loss) -> final eval return -41.6: FAILS.
- actor gradient: `actor_loss = -advantage.detach()` (ActorCritic.losses, backprop branch) -> final
  eval return -41.4: FAILS.
- return normaliser: scale forced to 1e3 (ActorCritic.losses) -> the policy still learns (final
  80.9): Adam is invariant to the loss scale, so the scale only weighs the advantage against the
  entropy bonus. What breaks is the policy's confidence: its entropy stays at 1.53 (working runs:
  -1.35 to -1.44; maximum 2.84 for std 1 on 2 dims) and the logged return/scale (1e3) no longer
  matches P95 - P5 of the returns (14). The test asserts both, so it FAILS.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RANDOM_POLICY_RETURN = -4.0  # envs/custom_env.py docstring: 100 episodes through make_env, action_repeat 2
STRAIGHT_TO_TARGET_RETURN = 95.0
BAR = 60.0
MARGIN = BAR - RANDOM_POLICY_RETURN  # 64
MAX_FINAL_ENTROPY = 0.0  # nats, 2-D bounded normal: std 1 gives 2.84, std 0.1 gives -1.77


def load_learn():
    """scripts/learn.py as a module (registered in sys.modules, which its dataclasses need)."""
    if "learn" in sys.modules:
        return sys.modules["learn"]
    spec = importlib.util.spec_from_file_location("learn", ROOT / "scripts" / "learn.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["learn"] = module
    spec.loader.exec_module(module)
    return module


def test_check_bar_matches_the_stated_figures():
    learn = load_learn()
    check = learn.CHECKS["custom_reach"]
    assert check.bar == BAR == RANDOM_POLICY_RETURN + MARGIN
    assert check.cpu.steps == 3000


def test_user_overrides_replace_the_checks_own():
    learn = load_learn()
    merged = learn.merged_overrides((("seed", "0"), ("prefill", "500")), [("seed", "3"), ("batch_size", "8")])
    assert merged == [("prefill", "500"), ("seed", "3"), ("batch_size", "8")]


def test_outcome_reads_final_best_first_at_bar_and_random_return():
    learn = load_learn()
    records = [
        {"step": 500, "episode/return": -6.0},
        {"step": 1000, "episode/return": 10.0, "eval/return": 12.0},
        {"step": 1500, "eval/return": 55.0},
        {"step": 2000, "eval/return": 48.0, "achievement/collect_wood": 50.0},
    ]
    result = learn.outcome(records, bar=40.0, prefill=500)
    assert (result.final, result.final_step, result.best) == (48.0, 2000, 55.0)
    assert result.first_step_at_bar == 1500
    assert result.random_return == -6.0
    assert result.achievements == {"achievement/collect_wood": 50.0}
    crafter = learn.CHECKS["crafter"]
    assert learn.passed(crafter, learn.outcome(records, crafter.bar, prefill=500))
    # Return 12 meets the crafter bar, but no achievements were logged:
    assert not learn.passed(crafter, learn.outcome(records[:2], crafter.bar, prefill=500))
    assert not learn.passed(learn.CHECKS["dmc_cartpole_balance"], result)  # 48 < 800


def test_report_only_judges_the_runs_own_prefill_task_and_length(tmp_path, capsys):
    """--report-only on a folder: the random-policy return comes from the episodes of the run's own
    prefill (config.yaml: 100 steps; it used the check's 500, so trained episodes counted as random),
    a partial run is called partial, another task's run or a folder without metrics is refused
    (exit 2), and no command is printed as if it ran."""
    import json

    learn = load_learn()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("task: custom_reach\nprefill: 100\n")
    records = [{"step": 100, "episode/return": -4.0}, {"step": 300, "episode/return": 70.0},
               {"step": 500, "episode/return": 80.0, "eval/return": 75.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert learn.main(["custom_reach", "--report-only", "--logdir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "random-policy return (prefill episodes of this run): -4.0" in out and "$ " not in out
    assert "(a partial run: its metrics end at step 500 of the check's 3000;" in out
    assert learn.main(["crafter", "--report-only", "--logdir", str(run)]) == 2
    assert ("the run in " + str(run) + " trained task custom_reach, but check crafter is about crafter_reward"
            in capsys.readouterr().err)
    assert learn.main(["custom_reach", "--report-only", "--logdir", str(tmp_path / "none")]) == 2
    assert "no metrics.jsonl in" in capsys.readouterr().err



def test_extra_arguments_are_key_value_pairs_in_either_form():
    learn = load_learn()
    assert learn.parse_extra(["--seed", "1", "--train_ratio=256", "--envs.amount", "2"]) == [
        ("seed", "1"), ("train_ratio", "256"), ("envs.amount", "2")]
    assert learn.parse_extra(["--logdir=a=b"]) == [("logdir", "a=b")]  # only the first '=' splits
    with pytest.raises(SystemExit, match=r"unexpected argument 'seed': extra arguments are dreamer.py overrides"):
        learn.parse_extra(["seed", "1"])
    with pytest.raises(SystemExit, match=r"--seed needs a value, e.g. --seed VALUE"):
        learn.parse_extra(["--batch_size", "8", "--seed"])
    with pytest.raises(SystemExit, match=r"unexpected argument '--'"):  # no key at all
        learn.parse_extra(["--", "--seed", "1"])


def test_a_check_with_a_margin_over_random_needs_the_runs_random_return():
    """dmc_cartpole_balance_pixels: final >= 600 and >= this run's random-policy return + 250; NaN
    evaluations are left out, and only the prefill's episodes count as random."""
    learn = load_learn()
    check = learn.CHECKS["dmc_cartpole_balance_pixels"]
    assert (check.bar, check.over_random) == (600.0, 250.0)

    def result(random_return, final):
        return learn.outcome([{"step": 100, "episode/return": random_return},
                              {"step": 2600, "episode/return": 900.0},  # trained: not random
                              {"step": 5000, "eval/return": final}, {"step": 6000, "eval/return": float("nan")}],
                             check.bar, prefill=2500)

    assert result(300.0, 650.0).random_return == 300.0 and result(300.0, 650.0).final == 650.0
    assert learn.passed(check, result(300.0, 650.0))
    assert not learn.passed(check, result(420.0, 650.0))  # 650 < 420 + 250
    assert not learn.passed(check, learn.outcome([{"step": 5000, "eval/return": 650.0}], check.bar, 2500))
    assert not learn.passed(check, result(100.0, 590.0))  # below the bar itself

def test_unknown_check_names_the_choices(capsys):
    learn = load_learn()
    with pytest.raises(SystemExit):
        learn.main(["no_such_check"])
    assert "CHECK must be one of custom_reach, dmc_cartpole_balance" in capsys.readouterr().err


def test_a_run_that_stops_with_a_setting_error_is_not_judged(tmp_path, capsys):
    """--steps -5 is refused by learn.py itself; a dreamer.py that exits 2 (here an env option the
    env does not take) is passed on as exit 2, not judged FAIL on a folder with no metrics."""
    learn = load_learn()
    with pytest.raises(SystemExit) as stopped:
        learn.main(["custom_reach", "--steps", "-5", "--logdir", str(tmp_path / "neg")])
    assert stopped.value.code == 2 and "--steps must be at least 1 agent step (got -5)" in capsys.readouterr().err
    assert learn.main(["custom_reach", "--logdir", str(tmp_path / "bad"), "--env.custom.bogus", "1"]) == 2
    out, err = capsys.readouterr()
    assert "dreamer.py stopped with the error above (exit code 2)" in err and "FAIL" not in out, (out, err)


def test_ctrl_c_to_learn_py_lets_the_run_save_instead_of_killing_it(tmp_path):
    """Ctrl-C (SIGINT) or SIGTERM to scripts/learn.py reaches dreamer.py once, and learn.py waits
    while it saves: subprocess.run used to kill the training run on Ctrl-C, losing everything since
    its last checkpoint, and learn.py ended in a traceback."""
    import os
    import signal
    import subprocess
    import time

    from checkpoint import load_checkpoint

    logdir = tmp_path / "reach"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "learn.py"), "custom_reach", "--logdir", str(logdir),
         "--steps", "100000", "--log_every", "100", "--save_every", "100000", "--eval_every", "0"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "CI": "1"})
    log = logdir / "train.log"
    deadline = time.time() + 180
    while time.time() < deadline and not (log.exists() and "step 200 |" in log.read_text()):
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)  # to learn.py only, as `kill -INT` does
    stdout, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr[-3000:]
    assert process.returncode == 1  # the run stopped early: no eval return, so the check fails
    assert "saved checkpoint" in log.read_text() and "FAIL" in stdout
    assert "dreamer.py was stopped by SIGINT (exit code 130) and saved" in stdout
    assert load_checkpoint(logdir / "latest.pt")["counters"]["step"] >= 200


def last_with(records: list[dict], key: str) -> dict:
    return [r for r in records if key in r][-1]


def failures(records: list[dict], learn, check) -> list[str]:
    """What a run's metrics say against the check: empty when it learned as it should."""
    result = learn.outcome(records, check.bar, prefill=500)
    problems = []
    if result.final_step != check.cpu.steps:
        problems.append(f"last eval at step {result.final_step}, expected {check.cpu.steps}")
    # The prefill episodes (about 10) are this run's random policy: near -4 (+-12), far below the bar.
    if result.random_return is None or result.random_return >= BAR - 20:
        problems.append(f"random-policy return {result.random_return} is not well below the bar {BAR}")
    if result.final is None or result.final < BAR:
        problems.append(
            f"final eval return {result.final} < bar {BAR} (random policy {RANDOM_POLICY_RETURN}, "
            f"straight to the target {STRAIGHT_TO_TARGET_RETURN}); best {result.best}")
    stats = last_with(records, "return/scale")
    spread = stats["return/p95"] - stats["return/p5"]
    if abs(stats["return/scale"] - max(1.0, spread)) > 0.15 * max(1.0, spread):
        problems.append(f"return normaliser: scale {stats['return/scale']:.3g} is not max(1, P95 - P5) "
                        f"= {max(1.0, spread):.3g}")
    entropy = last_with(records, "actor/entropy")["actor/entropy"]
    if entropy >= MAX_FINAL_ENTROPY:
        problems.append(f"actor entropy {entropy:.2f} >= {MAX_FINAL_ENTROPY}: the policy never became "
                        "confident (advantages too small against the entropy bonus?)")
    return problems


@pytest.mark.first
def test_tiny_dreamer_beats_random_policy_on_custom_reach(tmp_path):
    learn = load_learn()
    check = learn.CHECKS["custom_reach"]
    logdir = tmp_path / "reach"
    argv = learn.command(check, check.cpu, check.cpu.steps, str(logdir), [("seed", "0")])
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert failures(learn.read_records(logdir), learn, check) == []


def test_every_check_command_is_a_valid_dreamer_config():
    """Each check's CPU and GPU command line loads and validates as dreamer.py would load it."""
    import config as config_lib

    learn = load_learn()
    for check in learn.CHECKS.values():
        for budget in (check.cpu, check.gpu):
            argv = learn.command(check, budget, budget.steps, "/tmp/unused", [])
            cfg = config_lib.load_config(argv[2:])  # what follows `python3 dreamer.py`
            assert (cfg.task, int(cfg.steps)) == (check.task, budget.steps), check.name
            overrides = dict(budget.overrides)
            if "train_ratio" in overrides:
                assert float(cfg.train_ratio) == float(overrides["train_ratio"]), check.name
