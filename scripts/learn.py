"""Named learning checks: train end to end through dreamer.py, then compare the final eval return
with the check's stated bar.

    python3 scripts/learn.py CHECK [--steps N] [--logdir D] [--gpu] [--dry-run] [--key value ...]
    python3 scripts/learn.py --list

Every check is one `dreamer.py` command (printed before it runs; `--list` prints them all). Its
`--steps` is the agent-step budget (env steps after action repeat), `--logdir` the run folder
(default ./logdir/learn/<check>), and any further `--key value` pairs are dreamer.py overrides that
replace the check's own. `--gpu` picks the check's larger GPU budget (paper-sized model and
train_ratio) instead of the CPU one. After the run the script reads <logdir>/metrics.jsonl and
prints the final eval return, the best one and the first step that met the bar, the random-policy
return of the same run (episodes finished during the prefill), and `PASS` or `FAIL`; the exit
code is 0 when the final eval return meets the bar (and, for checks that need them, achievements
were logged), else 1.
"""
from __future__ import annotations

import argparse
import math
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from logger import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METRIC = "eval/return"

# Tiny model sizes: the CI learning check's (tests/test_learning.py) and the CPU budget of the proprio
# cartpole-balance check (one update of batch 16 x 32 in 0.19 s on one core; size_xs 0.34 s).
TINY_MODEL = (
    ("rssm.deter", "64"), ("rssm.hidden", "64"), ("rssm.stoch", "8"), ("rssm.classes", "8"),
    ("encoder.mlp_units", "64"), ("encoder.mlp_layers", "2"),
    ("decoder.mlp_units", "64"), ("decoder.mlp_layers", "2"),
    ("reward_head.units", "64"), ("reward_head.layers", "1"),
    ("cont_head.units", "64"), ("cont_head.layers", "1"),
    ("actor.units", "64"), ("actor.layers", "2"),
    ("critic.units", "64"), ("critic.layers", "2"),
)
# The CI check's model: custom_reach's 'vector' observation only, through the tiny model.
CI_MODEL = (
    ("encoder.mlp_keys", "vector"), ("encoder.cnn_keys", "$^"),
    ("decoder.mlp_keys", "vector"), ("decoder.cnn_keys", "$^"),
) + TINY_MODEL
# Its schedule: ~1,250 updates of batch 16 x 16; learning rates above the paper's (1e-4 / 3e-5), which
# need far more updates than a CI budget, and a reward head that learns the distance quickly.
CI_SCHEDULE = (
    ("prefill", "500"), ("train_ratio", "128"), ("batch_size", "16"), ("batch_length", "16"),
    ("model_lr", "1e-3"), ("actor_lr", "3e-4"), ("critic_lr", "3e-4"),
    ("reward_head.units", "128"), ("reward_head.layers", "2"),
    ("log_every", "500"), ("eval_every", "500"), ("eval_episode_num", "10"),
)
# The CPU budgets of the larger checks: batch 16 x 32 (twice the updates per second of 16 x 64) and
# learning rates 3x the paper's, because a CPU hour affords ~5,000 updates where the paper does 100,000s.
CPU_RATES = (("batch_length", "32"), ("model_lr", "3e-4"), ("actor_lr", "1e-4"), ("critic_lr", "1e-4"))
# One env in the main process, no videos, checkpoints only at the end: the CPU budgets below.
CPU_RUN = (("envs.amount", "1"), ("envs.parallel", "none"), ("video", "False"))



def cpu_schedule(prefill: int, train_ratio: int, log_every: int, eval_every: int, eval_episodes: int,
                 save_every: int, first: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    """The overrides of a larger check's CPU budget: one env, CPU_RATES, `first`, then its schedule."""
    return CPU_RUN + CPU_RATES + first + (
        ("prefill", str(prefill)), ("train_ratio", str(train_ratio)), ("log_every", str(log_every)),
        ("eval_every", str(eval_every)), ("eval_episode_num", str(eval_episodes)), ("save_every", str(save_every)))

@dataclass(frozen=True)
class Budget:
    """One way to run a check: config blocks, agent-step budget and overrides."""

    configs: tuple[str, ...]
    steps: int
    overrides: tuple[tuple[str, str], ...]
    time: str  # how long it took / is expected to take, in words


@dataclass(frozen=True)
class Check:
    """A named learning check: task, bar on the final eval return, and its CPU and GPU budgets."""

    name: str
    task: str
    bar: float
    about: str  # what the bar means and where it comes from
    cpu: Budget
    gpu: Budget
    needs_achievements: bool = False
    over_random: Optional[float] = None  # also needs final >= this run's random-policy return + this
    paper: str = ""  # the paper's figure at a comparable budget, where there is one


CHECKS: dict[str, Check] = {c.name: c for c in (
    Check(
        name="custom_reach",
        task="custom_reach",
        bar=60.0,
        about=("the CI check (tests/test_learning.py): tiny vector-only model; uniform random actions "
               "score about -4 per episode, heading straight for the target about +95"),
        cpu=Budget(("custom",), 3000, CI_MODEL + CPU_RUN + CI_SCHEDULE + (
            ("save_every", "100000"), ("save_every_minutes", "0"), ("seed", "0"),
        ), "about 3 minutes on 2 CPU cores"),
        gpu=Budget(("custom",), 3000, CI_MODEL + CPU_RUN + CI_SCHEDULE,
                   "a few minutes (the model is too small to gain from a GPU)"),
    ),
    Check(
        name="dmc_cartpole_balance",
        task="dmc_cartpole_balance",
        bar=800.0,
        about=("DMC cartpole-balance from proprio, action repeat 2: eval return >= 800 within 25,000 "
               "agent steps = 50,000 env steps (issue 9's bar); the random policy scores about 300"),
        cpu=Budget(("dmc_proprio", "size_xs"), 25000, TINY_MODEL + cpu_schedule(2500, 512, 500, 2500, 10, 5000),
                   "about 70 minutes on one CPU core (--threads 1): the tiny model (deter 64, 64-unit MLPs, "
                   "8x8 latents), batch 16 x 32, the paper's train_ratio 512, so 22,500 updates replay the "
                   "paper's number of steps; learning rates 3x the paper's"),
        gpu=Budget(("dmc_proprio", "size_s"), 25000, (
            ("train_ratio", "512"), ("eval_every", "2500"), ("eval_episode_num", "10"),
        ), "about 1-2 hours on one GPU (the paper's train_ratio and learning rates, size S)"),
        paper="the paper's curves solve it (near 1000) well before this budget",
    ),
    Check(
        name="dmc_cartpole_swingup_pixels",
        task="dmc_cartpole_swingup",
        bar=200.0,
        about=("DMC cartpole-swingup from 64x64 pixels, action repeat 2: clear learning on CPU, eval "
               "return >= 200 within 20,000 agent steps = 40,000 env steps (a random policy scores about "
               "50); the full comparison with the paper is the GPU budget: 500,000 agent steps = 1M env steps"),
        cpu=Budget(("dmc_vision", "size_xs"), 20000, cpu_schedule(
            2500, 512, 1000, 2500, 5, 2500, first=(("precision", "bf16"),)),
                   "about 4 hours on one CPU core with AMX (bf16 matrix products; --precision 32 elsewhere, "
                   "about 1.4x longer): size_xs, batch 16 x 32, the paper's train_ratio 512 (the sixth "
                   "session's run met the bar at 10,000 agent steps, 1.6 hours)"),
        gpu=Budget(("dmc_vision", "size_s"), 500000, (
            ("train_ratio", "512"), ("eval_every", "10000"), ("eval_episode_num", "10"),
        ), "about a day on one GPU (the paper's train_ratio and learning rates, size S, 1M env steps)"),
        paper="DMC vision 1M env steps: paper mean over 20 tasks 739.6 (per-task table in the paper)",
    ),
    Check(
        name="dmc_cartpole_balance_pixels",
        task="dmc_cartpole_balance",
        bar=600.0,
        about=("DMC cartpole-balance from 64x64 pixels, action repeat 2: the pixel task a CPU budget "
               "can show learning on: eval return >= 600 within 25,000 agent steps = 50,000 env steps "
               "and at least 250 above this run's random policy (about 300)"),
        cpu=Budget(("dmc_vision", "size_xs"), 25000, cpu_schedule(2500, 128, 500, 2500, 5, 5000),
                   "about 2 hours on one CPU core: size_xs, batch 16 x 32, train_ratio 128 so ~5,600 updates"),
        gpu=Budget(("dmc_vision", "size_s"), 250000, (
            ("train_ratio", "512"), ("eval_every", "10000"), ("eval_episode_num", "10"),
        ), "several hours on one GPU (the paper's train_ratio and learning rates, size S, 500K env steps)"),
        over_random=250.0,
        paper="the paper's DMC vision curves solve cartpole-balance (near 1000) within 1M env steps",
    ),
    Check(
        name="gym_cartpole",
        task="gym_CartPole-v1",
        bar=400.0,
        about=("gymnasium CartPole-v1 through the gym_ adapter, discrete actions (onehot): eval return "
               ">= 400 of at most 500 within 20,000 agent steps; a random policy scores about 22"),
        cpu=Budget(("gym", "size_xs"), 20000, cpu_schedule(
            1000, 512, 500, 2000, 5, 5000, first=(("actor_dist", "onehot"),)),
                   "about 1.5 hours on one CPU core: size_xs, batch 16 x 32, the paper's train_ratio 512 "
                   "(19,000 updates)"),
        gpu=Budget(("gym", "size_s"), 50000, (
            ("actor_dist", "onehot"), ("train_ratio", "512"), ("eval_every", "5000"),
        ), "about an hour on one GPU"),
    ),
    Check(
        name="crafter",
        task="crafter_reward",
        bar=2.0,
        about=("Crafter for a short budget: achievements are logged (achievement/* and "
               "achievement/crafter_score in metrics.jsonl) and the final eval return is >= 2 and at "
               "least 1 above the random policy's return in the same run (prefill episodes); the "
               "paper's 1M-step figure is 11.7 +- 1.9, far beyond this budget"),
        cpu=Budget(("crafter", "size_xs"), 20000, cpu_schedule(2500, 32, 1000, 5000, 3, 10000),
                   "a few hours on 2 CPU cores"),
        gpu=Budget(("crafter", "size_s"), 1000000, (
            ("train_ratio", "512"), ("eval_every", "50000"),
        ), "days on one GPU (the paper's train_ratio and learning rates, 1M steps; size S, where "
           "the paper's code trains Crafter at XL)"),
        needs_achievements=True,
        over_random=1.0,
        paper="Crafter 1M steps: reward 11.7 +- 1.9",
    ),
)}


@dataclass
class Outcome:
    """What a run's metrics say about a check."""

    final: Optional[float]
    final_step: Optional[int]
    best: Optional[float]
    first_step_at_bar: Optional[int]
    random_return: Optional[float]
    achievements: dict[str, float] = field(default_factory=dict)


def merged_overrides(base: tuple[tuple[str, str], ...],
                     extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The check's overrides with the user's replacing those of the same key, user's new keys last."""
    merged = dict(base)
    for key, value in extra:
        merged.pop(key, None)
        merged[key] = value
    return list(merged.items())


def command(check: Check, budget: Budget, steps: int, logdir: str, extra: list[tuple[str, str]]) -> list[str]:
    """The dreamer.py command line (argv) of one check run."""
    argv = [sys.executable, str(ROOT / "dreamer.py"), "--configs", *budget.configs, "--task", check.task,
            "--steps", str(steps), "--logdir", logdir]
    for key, value in merged_overrides(budget.overrides, extra):
        argv += [f"--{key}", value]
    return argv


def parse_extra(tokens: list[str]) -> list[tuple[str, str]]:
    """`--key value` / `--key=value` pairs for dreamer.py."""
    pairs, index = [], 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or token == "--":
            raise SystemExit(f"learn.py: unexpected argument '{token}': extra arguments are dreamer.py "
                             "overrides as '--key value' pairs, e.g. --seed 1 --train_ratio 256.")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if index + 1 >= len(tokens):
                raise SystemExit(f"learn.py: --{key} needs a value, e.g. --{key} VALUE.")
            value = tokens[index + 1]
            index += 1
        pairs.append((key, value))
        index += 1
    return pairs


def run_settings(logdir: Path) -> dict:
    """The run's own config.yaml (what dreamer.py wrote when it started), or {} if there is none."""
    path = Path(logdir) / "config.yaml"
    if not path.is_file():
        return {}
    from ruamel.yaml import YAML

    return dict(YAML(typ="safe").load(path.read_text()) or {})


def report_only_problem(check: "Check", logdir: Path, settings: dict) -> Optional[str]:
    """Why --report-only cannot judge `logdir` as `check`: no metrics, or another task's run."""
    if not (Path(logdir) / "metrics.jsonl").is_file():
        return (f"no metrics.jsonl in {logdir}: --report-only judges a run that has logged; pass the --logdir "
                f"of a {check.name} run (default ./logdir/learn/{check.name}), or drop --report-only to run it.")
    if settings.get("task") not in (None, check.task):
        return (f"the run in {logdir} trained task {settings['task']}, but check {check.name} is about "
                f"{check.task}: pass the folder of a {check.task} run, or name the check of this run.")
    return None


def read_records(logdir: Path) -> list[dict]:
    """Records of <logdir>/metrics.jsonl in step order; none while the run has not logged yet."""
    try:
        return read_metrics(logdir)
    except FileNotFoundError:
        return []


def outcome(records: list[dict], bar: float, prefill: int) -> Outcome:
    """Final, best and first-at-bar eval returns, the prefill (random-policy) episode return, and the
    last logged achievement rates."""
    evals = [(int(r["step"]), float(r[METRIC])) for r in records
             if r.get(METRIC) is not None and math.isfinite(float(r[METRIC]))]
    random_returns = [float(r["episode/return"]) for r in records
                      if r.get("episode/return") is not None and r["step"] <= prefill]
    achievements: dict[str, float] = {}
    for r in records:
        achievements.update({k: float(v) for k, v in r.items() if k.startswith("achievement/")})
    first = next((step for step, value in evals if value >= bar), None)
    return Outcome(
        final=evals[-1][1] if evals else None, final_step=evals[-1][0] if evals else None,
        best=max(v for _, v in evals) if evals else None, first_step_at_bar=first,
        random_return=sum(random_returns) / len(random_returns) if random_returns else None,
        achievements=achievements)


def passed(check: Check, result: Outcome) -> bool:
    if result.final is None or result.final < check.bar:
        return False
    if check.over_random is not None and (
            result.random_return is None or result.final < result.random_return + check.over_random):
        return False
    return bool(result.achievements) or not check.needs_achievements


def report(check: Check, result: Outcome) -> str:
    """Lines that state the figures and the verdict."""
    def fmt(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    lines = [
        f"check: {check.name} ({check.about})",
        f"final {METRIC}: {fmt(result.final)} at step {result.final_step}   bar: >= {check.bar:g}",
        f"best {METRIC}: {fmt(result.best)}; first step at the bar: {result.first_step_at_bar}",
        f"random-policy return (prefill episodes of this run): {fmt(result.random_return)}",
    ]
    if check.needs_achievements:
        score = result.achievements.get("achievement/crafter_score")
        lines.append(f"achievements logged: {len(result.achievements)} keys, crafter score {fmt(score)}%")
    if check.paper:
        lines.append(f"paper: {check.paper}")
    lines.append("PASS" if passed(check, result) else "FAIL")
    return "\n".join(lines)


def list_checks() -> str:
    out = []
    for check in CHECKS.values():
        out.append(f"{check.name}: bar final {METRIC} >= {check.bar:g}; {check.about}")
        for label, budget in (("cpu", check.cpu), ("gpu", check.gpu)):
            argv = command(check, budget, budget.steps, f"./logdir/learn/{check.name}", [])
            argv[:2] = ["python3", "dreamer.py"]
            out.append(f"  {label} ({budget.time}): {shlex.join(argv)}")
    return "\n".join(out)


def run_training(argv: list[str]) -> int:
    """Run dreamer.py to its end and return its exit code. Ctrl-C and SIGTERM sent to this script
    are passed on to it one for one while this script keeps waiting, so dreamer.py stops after its
    current step and saves its checkpoint (subprocess.run would kill it mid-save on a Ctrl-C). It
    runs in its own process group, so a terminal's Ctrl-C reaches it once, through here."""
    process = subprocess.Popen(argv, cwd=ROOT, start_new_session=True)

    def forward(signum, _frame) -> None:
        if process.poll() is None:
            process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", nargs="?", help="one of: " + ", ".join(CHECKS))
    parser.add_argument("--list", action="store_true", help="print the checks, their bars and commands")
    parser.add_argument("--steps", type=float, default=None, help="agent-step budget (default: the check's)")
    parser.add_argument("--logdir", default=None, help="run folder (default ./logdir/learn/<check>)")
    parser.add_argument("--gpu", action="store_true", help="use the check's GPU budget")
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing; judge the metrics already in --logdir")
    args, rest = parser.parse_known_args(argv)
    if args.list:
        print(list_checks())
        return 0
    if args.check not in CHECKS:
        parser.error(f"CHECK must be one of {', '.join(CHECKS)} (got {args.check!r}); "
                     "`python3 scripts/learn.py --list` prints them with their bars.")
    check = CHECKS[args.check]
    budget = check.gpu if args.gpu else check.cpu
    extra = parse_extra(rest)
    if args.steps is not None and not args.steps >= 1:
        parser.error(f"--steps must be at least 1 agent step (got {args.steps:g}); leave it out for the "
                     f"check's budget ({budget.steps}).")
    steps = int(args.steps) if args.steps is not None else budget.steps
    logdir = args.logdir or str(ROOT / "logdir" / "learn" / check.name)
    argv_run = command(check, budget, steps, logdir, extra)
    if args.report_only:
        problem = report_only_problem(check, Path(logdir), run_settings(Path(logdir)))  # read again after a run
        if problem:
            print(f"learn.py: {problem}", file=sys.stderr)
            return 2
        print(f"judging {Path(logdir) / 'metrics.jsonl'} as check {check.name} (nothing is run)")
    else:
        print("$ " + shlex.join(argv_run), flush=True)
    if args.dry_run:
        return 0
    if not args.report_only:
        code = run_training(argv_run)
        if code > 128:  # stopped by a signal after saving (dreamer.py's 128 + signal number)
            print(f"dreamer.py was stopped by {signal.Signals(code - 128).name} (exit code {code}) and saved; "
                  f"judging what {logdir}/metrics.jsonl holds (rerun this command to resume).")
        elif code == 2:  # its one-paragraph error (a setting, the env, the folder): nothing to judge
            print(f"learn.py: dreamer.py stopped with the error above (exit code 2); fix it and run the check "
                  "again.", file=sys.stderr)
            return 2
        elif code != 0:
            print(f"dreamer.py exited with code {code}; judging what {logdir}/metrics.jsonl holds.")
    settings = run_settings(Path(logdir))  # the run's own prefill: the random-policy episodes are its
    prefill = int(float(settings.get("prefill", dict(merged_overrides(budget.overrides, extra)).get("prefill", 2500))))
    records = read_records(Path(logdir))
    result = outcome(records, check.bar, prefill)
    print(report(check, result))
    last_step = max((int(r["step"]) for r in records), default=0)
    if last_step < steps:
        print(f"(a partial run: its metrics end at step {last_step} of the check's {steps}; run the check "
              "again to resume it to the end)")
    return 0 if passed(check, result) else 1


if __name__ == "__main__":
    sys.exit(main())
