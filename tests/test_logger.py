"""Logger: train.log lines, metrics.jsonl, TensorBoard scalars and videos, disabled ranks, progress."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import logger as logger_module
from logger import Logger


def read_events(logdir: Path) -> EventAccumulator:
    events = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def test_write_fills_train_log_metrics_and_tensorboard(tmp_path: Path) -> None:
    log = Logger(tmp_path)
    log.scalars({"loss/model": torch.tensor(1.25), "episode/return": np.float32(3.5),
                 "perf/fps": 120, "actor/entropy": np.array(0.5)})
    log.video("eval/video", np.zeros((6, 16, 16, 3), np.uint8))
    log.write(100)
    log.scalar("episode/return", 7.0)
    log.write(200)
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(
        r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] step 100 \| perf/fps 120 \| episode/return 3\.5 \| "
        r"loss/model 1\.25 \| actor/entropy 0\.5", lines[0]), lines[0]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [
        {"step": 100, "loss/model": 1.25, "episode/return": 3.5, "perf/fps": 120.0, "actor/entropy": 0.5},
        {"step": 200, "episode/return": 7.0},
    ]
    log.close()
    events = read_events(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("episode/return")] == [(100, 3.5), (200, 7.0)]
    assert {"loss/model", "perf/fps", "actor/entropy"} <= set(events.Tags()["scalars"])
    videos = events.Images("eval/video")  # add_video stores an animated GIF image summary
    assert len(videos) == 1 and videos[0].step == 100 and videos[0].encoded_image_string[:3] == b"GIF"


def test_tensorboard_shows_each_write_while_the_run_goes_on(tmp_path: Path) -> None:
    log = Logger(tmp_path)
    try:
        log.scalar("episode/return", 2.5)
        log.write(10)  # flushed: not only after 30 s (flush_secs) or at close
        assert [(e.step, e.value) for e in read_events(tmp_path).Scalars("episode/return")] == [(10, 2.5)]
    finally:
        log.close()


def test_batched_video_and_bad_video_shape(tmp_path: Path) -> None:
    log = Logger(tmp_path, tensorboard=True)
    log.video("openloop", np.full((2, 4, 8, 8, 3), 200, np.uint8))
    log.write(5)
    log.close()
    assert len(read_events(tmp_path).Images("openloop")) == 1
    pattern = r"video frames must be \(T,H,W,C\) or \(B,T,H,W,C\).*got shape \(8, 8\)"
    with pytest.raises(ValueError, match=pattern):
        Logger(tmp_path, tensorboard=False).video("x", np.zeros((8, 8), np.uint8))


def test_messages_are_timestamped_in_train_log_and_stderr(tmp_path: Path, capsys) -> None:
    log = Logger(tmp_path)
    log.info("resuming from step 1000")
    log.warning("disk is almost full")
    log.error("env worker 2 crashed")
    log.close()
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "INFO resuming from step 1000", "WARNING disk is almost full", "ERROR env worker 2 crashed"]
    assert "WARNING disk is almost full" in capsys.readouterr().err


def test_disabled_logger_writes_nothing(tmp_path: Path, capsys) -> None:
    logdir = tmp_path / "rank1"
    log = Logger(logdir, enabled=False)
    log.scalar("loss/model", 1.0)
    log.video("v", np.zeros((2, 4, 4, 3), np.uint8))
    log.write(1)
    log.info("hello")
    log.progress(1, 10, 5.0, 1.0)
    log.close()
    assert not logdir.exists()
    assert capsys.readouterr().err == ""


def test_non_scalar_value_gives_clear_error(tmp_path: Path) -> None:
    log = Logger(tmp_path, tensorboard=False)
    log.scalar("loss/model", torch.ones(3))
    pattern = r"logger scalars must be single numbers, got a tensor of shape \(3,\)"
    with pytest.raises(ValueError, match=pattern):
        log.write(1)
    log.close()


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_only_on_an_interactive_terminal(tmp_path: Path, monkeypatch) -> None:
    log = Logger(tmp_path, tensorboard=False)
    terminal = FakeTerminal()
    monkeypatch.setattr(logger_module.sys, "stderr", terminal)
    monkeypatch.delenv("CI", raising=False)
    log.progress(250, 1000, 50.0, 12.5)
    assert terminal.getvalue() == "\rstep 250/1000 (25.0%) | fps 50.0 | return 12.5 | left 0:00:15\x1b[K"
    monkeypatch.setenv("CI", "true")
    log.progress(500, 1000, 50.0, 12.5)
    assert terminal.getvalue().count("step ") == 1
    log.close()
    plain = io.StringIO()
    monkeypatch.setattr(logger_module.sys, "stderr", plain)
    monkeypatch.delenv("CI")
    Logger(tmp_path, tensorboard=False).progress(1, 10, 1.0)
    assert plain.getvalue() == ""


def test_video_frame_converts_rgba_grey_and_float_frames_and_names_what_it_cannot() -> None:
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 100, 7
    assert logger_module.video_frame(rgba).shape == (4, 5, 3) and (logger_module.video_frame(rgba) == 100).all()
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    frame = logger_module.video_frame(grey)
    assert frame.shape == (4, 5, 3) and (frame[..., 2] == grey).all()
    assert (logger_module.video_frame(np.full((2, 2, 3), 0.5)) == 127).all()  # float in [0, 1]: x 255
    assert (logger_module.video_frame(np.full((2, 2, 3), 300.0)) == 255).all()  # else clipped
    assert logger_module.video_frame(np.ones((2, 2, 1), np.int64)).dtype == np.uint8
    for bad, named in [(np.zeros((4, 4, 5)), r"shape \(4, 4, 5\)"), (np.zeros(7), r"shape \(7,\)"),
                       (np.array([["a"]]), "dtype <U1")]:
        with pytest.raises(ValueError, match=named):
            logger_module.video_frame(bad)


def test_a_later_rank_writes_no_files_but_shows_its_warnings(tmp_path, capsys) -> None:
    log = logger_module.Logger(tmp_path / "run", enabled=False, rank=1)
    log.info("only rank 0 says this")
    log.warning("env 3 raised; restarted it")
    log.scalar("loss", 1.0)
    log.write(10)
    err = capsys.readouterr().err
    assert re.fullmatch(r"\[rank 1\] \[[^\]]+\] WARNING env 3 raised; restarted it\n", err), err
    assert not (tmp_path / "run").exists()


def test_numbers_in_train_log_are_integers_or_four_significant_digits() -> None:
    shown = [logger_module.format_number(v) for v in (3.0, 1.23456, 2.5e-5, -7.0, 1e16, float("nan"))]
    assert shown == ["3", "1.235", "2.5e-05", "-7", "1e+16", "nan"]  # huge floats stay compact


def test_train_log_names_main_scalars_first_then_losses_then_the_rest_sorted() -> None:
    names = ["z/b", "a/c", "loss/x", "episode/return", "perf/fps", "loss/a"]
    assert logger_module.ordered_names(names) == ["perf/fps", "episode/return", "loss/a", "loss/x", "a/c", "z/b"]
    assert logger_module.is_achievement_rate("achievement/collect_wood")
    assert logger_module.is_achievement_rate("eval/achievement/place_table")
    assert not logger_module.is_achievement_rate("achievement/crafter_score")  # the line keeps the score
    assert not logger_module.is_achievement_rate("eval/achievement/crafter_score")


def test_videos_keep_height_and_width_and_float_frames_above_one_as_they_are() -> None:
    frames = np.zeros((2, 3, 5, 3), np.uint8)  # (T, H, W, C), H != W
    frames[:, 0, 4] = 9
    batch = logger_module.video_batch(frames)
    assert batch.shape == (1, 2, 3, 3, 5) and batch[0, 0, :, 0, 4].tolist() == [9, 9, 9]  # (B, T, C, H, W)
    assert (logger_module.video_frame(np.full((2, 2, 3), 100.0)) == 100).all()  # 0..255 floats: not x 255


def test_the_pace_reaches_back_to_the_last_point_before_its_window(monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr(logger_module.time, "time", lambda: now[0])
    pace = logger_module.Pace(0, window=60.0)
    for seconds, step in ((30.0, 60), (70.0, 70)):  # fast for 30 s, then slow
        now[0] = seconds
        pace.add(step)
    assert pace.rate() == pytest.approx(1.0)  # 70 steps in 70 s: the window spans at least 60 s
    now[0] = 100.0
    pace.add(100)
    assert pace.rate() == pytest.approx(40 / 70)  # from the point at 30 s, the last one 60 s back or more
    still = logger_module.Pace(5)
    now[0] = 110.0
    still.add(5)
    assert still.rate() != still.rate()  # NaN ('fps ?'): no step taken, not a measured 0
