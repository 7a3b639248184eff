"""Learning curves as PNG from the metrics.jsonl of one or more run folders.

    python3 scripts/plot.py LOGDIR [LOGDIR ...] --out curves.png \\
        [--keys episode/return eval/return] [--smooth 10] [--label NAME [NAME ...]]

One panel per key, the key against agent steps, one line per run, each smoothed with a trailing mean
over `--smooth` logged points. Runs that share a label are drawn as their mean with a min-max band;
a run's label is its folder name without a trailing `_seed<N>` or `-seed<N>` (`walker_seed0` and
`walker_seed1` form one group; folders of one name in different places are labelled with their
parent's name too, `run_a/custom`), or the matching `--label` entry when given.
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from logger import read_metrics  # noqa: E402

DEFAULT_KEYS = ("episode/return", "eval/return")
SEED_SUFFIX = re.compile(r"[_-]seed\d+$")


def run_label(logdir: Path) -> str:
    """Folder name without a trailing `_seed<N>` / `-seed<N>`."""
    return SEED_SUFFIX.sub("", Path(logdir).resolve().name)


def run_labels(logdirs: list[Path]) -> list[str]:
    """Each run's label (run_label); folders of one name in different places (run_a/custom and
    run_b/custom, two experiments) are told apart by their parent's name instead of merged."""
    paths = [Path(logdir).resolve() for logdir in logdirs]
    names = [path.name for path in paths]
    return [f"{path.parent.name}/{run_label(path)}" if names.count(path.name) > 1
            and len({p.parent for p in paths if p.name == path.name}) > 1 else run_label(path) for path in paths]


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key`, in step order."""
    points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = np.array(points, dtype=np.float64).T  # (N,), (N,)
    return steps, values


def smooth_trailing(values: np.ndarray, window: int) -> np.ndarray:
    """Mean over the last `window` points (fewer at the start)."""
    if window <= 1 or len(values) == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))  # (N+1,)
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def group_band(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """Mean, min and max of several runs' curves on the steps all of them cover (interpolated)."""
    low = max(steps[0] for steps, _ in curves)
    high = min(steps[-1] for steps, _ in curves)
    grid = np.unique(np.concatenate([s[(s >= low) & (s <= high)] for s, _ in curves]))  # (G,)
    stacked = np.stack([np.interp(grid, steps, values) for steps, values in curves])  # (R, G)
    return grid, stacked.mean(0), stacked.min(0), stacked.max(0)


def logged_keys(runs: list[tuple[str, list[dict]]]) -> set[str]:
    """Every metric name that some record of some run holds a value for."""
    return {key for _, records in runs for r in records for key, v in r.items() if v is not None}


def missing_key_note(key: str, logged: set[str]) -> str:
    """`key` was logged by no run: its name and the closest logged names."""
    close = difflib.get_close_matches(key, sorted(logged - {"step"}), n=3, cutoff=0.6)
    hint = f" (closest logged: {', '.join(close)})" if close else ""
    return f"{key}{hint}"


def plot_runs(
    logdirs: list[Path],
    out: Path,
    keys: list[str] | tuple[str, ...] = DEFAULT_KEYS,
    smooth: int = 10,
    labels: list[str] | None = None,
) -> Path:
    """Draw `keys` of every run in `logdirs` into the PNG `out`; returns `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels is not None and len(labels) != len(logdirs):
        raise ValueError(
            f"--label needs one name per logdir: got {len(labels)} labels for {len(logdirs)} "
            "logdirs. Give as many labels as logdirs, or leave --label out."
        )
    labels = labels or run_labels(logdirs)
    runs = [(label, read_metrics(Path(logdir))) for label, logdir in zip(labels, logdirs)]
    logged = logged_keys(runs)
    missing = [missing_key_note(key, logged) for key in keys if key not in logged]
    if len(missing) == len(keys):
        raise ValueError(
            f"none of the keys {'; '.join(missing)} appears in the metrics.jsonl of "
            f"{list(map(str, logdirs))}. Pass --keys with names that the runs logged "
            "(e.g. episode/return)."
        )
    if missing:
        print(
            f"plot.py: no run logged {'; '.join(missing)}: "
            f"{'its panel is' if len(missing) == 1 else 'their panels are'} empty.",
            file=sys.stderr,
        )
    figure, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for axis, key in zip(axes[0], keys):
        draw_key(axis, runs, key, smooth)
    figure.tight_layout()
    out = png_path(Path(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def png_path(out: Path) -> Path:
    """--out as the file savefig writes: 'curves' -> 'curves.png'; a folder is refused."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the PNG file to write, e.g. --out {out / 'curves.png'}")
    return out if out.suffix else out.with_suffix(".png")


def draw_key(axis, runs: list[tuple[str, list[dict]]], key: str, smooth: int) -> int:
    """One panel: a line (or mean + min-max band) per label; returns how many were drawn."""
    groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for label, records in runs:
        steps, values = series(records, key)
        if len(steps):
            groups.setdefault(label, []).append((steps, smooth_trailing(values, smooth)))
    for label, curves in groups.items():
        if len(curves) == 1:
            axis.plot(*curves[0], label=label)
            continue
        grid, mean, low, high = group_band(curves)
        line = axis.plot(grid, mean, label=f"{label} ({len(curves)} runs)")[0]
        axis.fill_between(grid, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    axis.set_title(key if smooth <= 1 else f"{key} (trailing mean of {smooth} points)")
    axis.set_xlabel("agent steps (env frames / action_repeat)")
    axis.grid(alpha=0.3)
    if groups:
        axis.legend(fontsize="small")
    else:
        axis.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=axis.transAxes)
    return len(groups)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logdirs", nargs="+", type=Path, help="run folders holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG file to write")
    parser.add_argument("--keys", nargs="+", default=list(DEFAULT_KEYS), help="metrics to plot")
    parser.add_argument("--smooth", type=int, default=10,
                        help="trailing mean over N logged points (default 10; 1 draws the points as logged)")
    parser.add_argument("--label", nargs="+", default=None,
                        help="one group name per logdir (default: the folder's name without _seed<N>; runs "
                             "with one name are drawn as their mean and min-max band)")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error(f"--smooth must be at least 1 logged point (1 draws them as logged), got {args.smooth}")
    try:
        out = plot_runs(args.logdirs, args.out, args.keys, args.smooth, args.label)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"plot.py: {error}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
