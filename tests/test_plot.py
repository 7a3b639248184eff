"""scripts/plot.py: PNG learning curves from runs' metrics.jsonl, seed grouping, resume handling."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(logdir: Path, seed: int, points: int = 30) -> Path:
    logdir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with open(logdir / "metrics.jsonl", "w") as file:
        for index in range(points):
            step = 1000 * (index + 1)
            record = {"step": step, "episode/return": float(index + rng.normal()), "loss/model": 1.0}
            if index % 5 == 4:
                record["eval/return"] = float(index)
            file.write(json.dumps(record) + "\n")
    return logdir


def test_png_from_two_runs(tmp_path: Path) -> None:
    runs = [write_run(tmp_path / "walker_seed0", 0), write_run(tmp_path / "walker_seed1", 1)]
    out = plot.plot_runs(runs, tmp_path / "out" / "curves.png", ["episode/return", "eval/return"], 5)
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert 10_000 < len(data) < 2_000_000


def test_command_line_writes_png(tmp_path: Path) -> None:
    runs = [write_run(tmp_path / "a", 0), write_run(tmp_path / "b-seed3", 1)]
    out = tmp_path / "curves.png"
    script = Path(plot.__file__)
    result = subprocess.run(
        [sys.executable, str(script), *map(str, runs), "--out", str(out), "--smooth", "3",
         "--keys", "episode/return"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"wrote {out}"
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_labels_group_seeds_and_bands_are_min_max() -> None:
    assert plot.run_label(Path("/x/walker_walk_seed12")) == "walker_walk"
    assert plot.run_label(Path("/x/cheetah-seed0")) == "cheetah"
    assert plot.run_label(Path("/x/seedless")) == "seedless"
    # one folder name in two places: two experiments, not seeds of one (they were merged into one band)
    assert plot.run_labels([Path("/a/run_a/custom"), Path("/a/run_b/custom"), Path("/a/w_seed0"), Path("/a/w_seed1")]) == [
        "run_a/custom", "run_b/custom", "w", "w"]
    curves = [(np.array([0.0, 10.0, 20.0]), np.array([0.0, 1.0, 2.0])),
              (np.array([5.0, 15.0, 25.0]), np.array([2.0, 3.0, 4.0]))]
    grid, mean, low, high = plot.group_band(curves)
    np.testing.assert_allclose(grid, [5, 10, 15, 20])
    np.testing.assert_allclose(low, [0.5, 1.0, 1.5, 2.0])
    np.testing.assert_allclose(high, [2.0, 2.5, 3.0, 3.5])
    np.testing.assert_allclose(mean, (low + high) / 2)


def test_smoothing_and_resumed_logs(tmp_path: Path) -> None:
    np.testing.assert_allclose(plot.smooth_trailing(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1, 2, 4, 6])
    logdir = tmp_path / "run"
    logdir.mkdir()
    lines = [{"step": 1, "a": 1}, {"step": 2, "a": 2}, {"step": 3, "a": 3}, {"step": 2, "a": 20}]
    (logdir / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{\"step\": 4, \"a")
    steps, values = plot.series(plot.read_metrics(logdir), "a")
    assert steps.tolist() == [1, 2, 2] and values.tolist() == [1, 2, 20]


def test_out_without_a_suffix_gets_png_and_a_folder_is_refused(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", 0)
    out = plot.plot_runs([run], tmp_path / "curves", ["episode/return"])
    assert out == tmp_path / "curves.png" and out.read_bytes().startswith(PNG_MAGIC)  # the name printed
    with pytest.raises(ValueError, match=r"--out .* is a folder; name the PNG file to write"):
        plot.plot_runs([run], tmp_path, ["episode/return"])
    with pytest.raises(SystemExit):
        plot.main([str(run), "--smooth", "0"])


def test_a_hand_edited_record_without_a_numeric_step_is_skipped(tmp_path: Path) -> None:
    logdir = tmp_path / "run"
    logdir.mkdir()
    lines = ['{"step": 1, "a": 1}', '{"step": "abc", "a": 5}', '[1, 2]', '{"step": true, "a": 6}', '{"step": 2, "a": 2}']
    (logdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    steps, values = plot.series(plot.read_metrics(logdir), "a")
    assert steps.tolist() == [1, 2] and values.tolist() == [1, 2]


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no metrics\.jsonl in .*empty"):
        plot.plot_runs([tmp_path / "empty"], tmp_path / "x.png")
    run = write_run(tmp_path / "run", 0)
    with pytest.raises(ValueError, match=r"none of the keys nope appears"):
        plot.plot_runs([run], tmp_path / "x.png", ["nope"])
    with pytest.raises(ValueError, match=r"keys eval/retrun \(closest logged: eval/return\) appears"):
        plot.plot_runs([run], tmp_path / "x.png", ["eval/retrun"])
    pattern = r"--label needs one name per logdir: got 2 labels for 1 logdirs"
    with pytest.raises(ValueError, match=pattern):
        plot.plot_runs([run], tmp_path / "x.png", labels=["a", "b"])


def test_a_key_no_run_logged_is_named_with_the_closest_logged_key(tmp_path: Path) -> None:
    """A misspelt key beside a logged one: the PNG is written, and stderr names the empty panel."""
    run = write_run(tmp_path / "run", 0)
    out = tmp_path / "curves.png"
    result = subprocess.run(
        [sys.executable, str(Path(plot.__file__)), str(run), "--out", str(out),
         "--keys", "episode/return", "eval/retrn"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"wrote {out}"
    assert result.stderr.strip() == (
        "plot.py: no run logged eval/retrn (closest logged: eval/return): its panel is empty."
    )
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_a_panel_draws_one_line_per_run_and_a_mean_with_its_band_per_seed_group() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def records(values, start=1):
        return [{"step": 10 * (start + i), "r": v, "other": None} for i, v in enumerate(values)]

    runs = [("walker", records([0.0, 2.0, 4.0, 6.0])), ("walker", records([2.0, 4.0, 6.0, 8.0])),
            ("cheetah", records([1.0, 1.0, 3.0])), ("empty", [{"step": 10, "r": None}])]
    figure, axis = plt.subplots()
    assert plot.draw_key(axis, runs, "r", smooth=2) == 2  # the run without a value draws nothing
    lines = {line.get_label(): line for line in axis.get_lines()}
    assert sorted(lines) == ["cheetah", "walker (2 runs)"]
    np.testing.assert_allclose(lines["walker (2 runs)"].get_xdata(), [10, 20, 30, 40])
    np.testing.assert_allclose(lines["walker (2 runs)"].get_ydata(), [1.0, 2.0, 4.0, 6.0])  # mean of the smoothed
    np.testing.assert_allclose(lines["cheetah"].get_ydata(), [1.0, 1.0, 2.0])  # trailing mean of 2 points
    (band,) = axis.collections  # min-max of the two walker runs
    np.testing.assert_allclose(band.get_paths()[0].vertices[:, 1].min(), 0.0)
    np.testing.assert_allclose(band.get_paths()[0].vertices[:, 1].max(), 7.0)
    assert axis.get_title() == "r (trailing mean of 2 points)"
    assert axis.get_xlabel() == "agent steps (env frames / action_repeat)"
    plt.close(figure)
    figure, axis = plt.subplots()
    assert plot.draw_key(axis, runs, "other", smooth=1) == 0
    assert axis.get_title() == "other" and [t.get_text() for t in axis.texts] == ["no other logged"]
    plt.close(figure)
