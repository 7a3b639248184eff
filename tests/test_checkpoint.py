"""Checkpoints: atomic save with fallback, RNG round trip, pinned errors for bad files, shapes."""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
from helpers.disk_events import record_disk_events
from checkpoint import (
    capture_rng_states, check_config_sizes, check_shapes, load_checkpoint, restore_rng_states,
    save_checkpoint,
)


def make_state(step: int) -> dict:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "rng": capture_rng_states(), "config": {"rssm": {"deter": 8}}}


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_round_trip_with_rng_states(tmp_path: Path) -> None:
    path = tmp_path / "latest.pt"
    state = make_state(step=123)
    save_checkpoint(path, state)
    expected = draws()
    loaded = load_checkpoint(path, map_location="cpu")
    assert loaded["step"] == 123 and loaded["config"] == {"rssm": {"deter": 8}}
    for name, tensor in state["model"].items():
        assert torch.equal(loaded["model"][name], tensor)
    assert loaded["optimizer"]["state"][0]["exp_avg"].shape == (3, 4)
    draws()  # move every generator on
    restore_rng_states(loaded["rng"])
    assert draws() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


def test_second_save_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"step": 1})
    save_checkpoint(path, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.prev.pt", "latest.pt"]
    assert load_checkpoint(path)["step"] == 2
    assert load_checkpoint(tmp_path / "latest.prev.pt")["step"] == 1


def test_an_evaluation_falls_back_saying_it_evaluates_the_earlier_agent(tmp_path: Path) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"step": 10})
    save_checkpoint(path, {"step": 20})
    path.write_bytes(path.read_bytes()[:40])
    messages: list[str] = []
    state, source = checkpoint.load_checkpoint_and_source(path, warn=messages.append, evaluating=True)
    assert (state["step"], source) == (10, tmp_path / "latest.prev.pt")
    assert messages == [f"checkpoint {path} is truncated or corrupt (ValueError: not a complete checkpoint: a "
                        "truncated file, or a member whose CRC check fails); evaluating the previous checkpoint "
                        "latest.prev.pt instead (the agent of an earlier step)."]
    path.unlink()
    checkpoint.tmp_path(path).write_bytes((tmp_path / "latest.prev.pt").read_bytes())
    messages.clear()
    assert checkpoint.load_checkpoint_and_source(path, warn=messages.append, evaluating=True)[0]["step"] == 10
    assert messages[0].endswith("(a stop between the two renames of a save); evaluating it.")


def test_a_torch_file_of_something_else_is_named_as_not_a_checkpoint(tmp_path: Path) -> None:
    run_state = {"agent": {}, "counters": {}, "config": {}, "format": 1}
    checkpoint.check_run_checkpoint(run_state, tmp_path / "latest.pt")
    for state, holds in (({"a": 1, "model": 2}, r"a dict with the keys a, model, without 'agent', 'counters', "
                                                 r"'config'"),
                         ({"agent": {}, "config": {}}, r"a dict with the keys agent, config, without 'counters'"),
                         (torch.zeros(2), r"a Tensor, without 'agent', 'counters', 'config'")):
        with pytest.raises(checkpoint.NotACheckpoint, match=rf"^{re.escape(str(tmp_path))}/other\.pt is a complete "
                           rf"torch file but not a checkpoint of this program: it holds {holds}\. --from_checkpoint "
                           r"takes the latest\.pt"):
            checkpoint.check_run_checkpoint(state, tmp_path / "other.pt")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_falls_back_to_previous(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"step": 10})
    save_checkpoint(path, {"step": 20, "weights": torch.zeros(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    messages: list[str] = []
    state = load_checkpoint(path, map_location="cpu", warn=messages.append)
    assert state["step"] == 10
    assert len(messages) == 1
    assert messages[0].startswith(f"checkpoint {path} is truncated or corrupt (")
    assert messages[0].endswith(
        "resuming from the previous checkpoint latest.prev.pt instead "
        "(the steps after it are trained again).")
    with pytest.warns(UserWarning, match=r"resuming from the previous checkpoint latest\.prev\.pt"):
        load_checkpoint(path)


def test_both_checkpoints_corrupt_give_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "latest.pt"
    path.write_bytes(b"broken")
    (tmp_path / "latest.prev.pt").write_bytes(b"also broken")
    pattern = (r"checkpoint .*latest\.pt is truncated or corrupt \(.*\) and the previous checkpoint "
               r"latest\.prev\.pt is unreadable too \(.*\)\. Start a fresh run in a new --logdir")
    with pytest.raises(RuntimeError, match=pattern):
        load_checkpoint(path)
    (tmp_path / "latest.prev.pt").unlink()
    pattern = (r"is truncated or corrupt \(.*\) and there is no previous checkpoint "
               r"latest\.prev\.pt to fall back to")
    with pytest.raises(RuntimeError, match=pattern):
        load_checkpoint(path)


def test_missing_checkpoint_lists_the_folder(tmp_path: Path) -> None:
    (tmp_path / "train.log").write_text("")
    (tmp_path / "replay").mkdir()
    pattern = (r"checkpoint .*lastest\.pt does not exist\. The folder .* holds: "
               r"replay/, train\.log\. Check the --from_checkpoint path")
    with pytest.raises(FileNotFoundError, match=pattern):
        load_checkpoint(tmp_path / "lastest.pt")
    (tmp_path / ".lock").write_text("")  # the run lock is not the user's business
    for index in range(31):
        (tmp_path / f"eval_{index:02d}.txt").write_text("")
    with pytest.raises(FileNotFoundError) as error:
        load_checkpoint(tmp_path / "lastest.pt")
    listing = str(error.value).split(" holds: ")[1].split(". Check")[0]
    assert listing.endswith(", ... (33 entries)") and ".lock" not in listing
    assert listing.split(", ")[:2] == ["eval_00.txt", "eval_01.txt"] and len(listing.split(", ")) == 31
    pattern = r"does not exist, and neither does its folder .*nope"
    with pytest.raises(FileNotFoundError, match=pattern):
        load_checkpoint(tmp_path / "nope" / "latest.pt")


def test_failed_write_leaves_the_old_checkpoint_loadable(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"step": 5})

    def full_disk(obj, file, *args, **kwargs):
        file.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    pattern = (r"could not write checkpoint .*latest\.pt \(No space left on device\)\. "
               r"The previous checkpoint, if any, is left untouched")
    with pytest.raises(OSError, match=pattern):
        save_checkpoint(path, {"step": 6})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


def flip_bytes_inside_a_tensor(path: Path) -> None:
    """Damage `path` so that it stays a valid zip and torch.load reads it without complaint: only a
    member's CRC check shows it (torch does not check them)."""
    data = bytearray(path.read_bytes())
    start = data.find(b"\x00\x00\x80\x3f" * 8)  # inside the tensor of ones
    assert start > 0
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
    path.write_bytes(bytes(data))


def test_a_damaged_tensor_is_detected_and_never_replaces_the_good_fallback(tmp_path: Path) -> None:
    """A checkpoint damaged inside a tensor still loads with torch.load; the CRC check finds it, so
    the run resumes from latest.prev.pt, and the next save does not rotate the damaged file over
    that good fallback."""
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"step": 10, "weights": torch.ones(4096)})
    save_checkpoint(path, {"step": 20, "weights": torch.ones(4096)})
    flip_bytes_inside_a_tensor(path)
    assert torch.load(path, weights_only=False)["step"] == 20  # what torch alone would resume from
    messages: list[str] = []
    assert load_checkpoint(path, warn=messages.append)["step"] == 10
    assert "truncated or corrupt (ValueError: not a complete checkpoint" in messages[0], messages
    good = (tmp_path / "latest.prev.pt").read_bytes()
    save_checkpoint(path, {"step": 30})
    assert (tmp_path / "latest.prev.pt").read_bytes() == good  # the fallback survived the save
    assert load_checkpoint(path)["step"] == 30


def test_a_complete_tmp_file_is_the_newest_checkpoint_when_latest_is_missing(tmp_path: Path) -> None:
    """A stop between save_checkpoint's two renames leaves latest.prev.pt (the older one) and a
    complete latest.pt.tmp (the newer): resume from the tmp file; a partial tmp file is ignored."""
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"step": 100})
    save_checkpoint(path, {"step": 200})
    path.rename(tmp_path / "latest.pt.tmp")  # the state such a stop leaves
    assert checkpoint.has_checkpoint(path)
    messages: list[str] = []
    assert load_checkpoint(path, warn=messages.append)["step"] == 200
    assert messages == [f"checkpoint {path} is missing but latest.pt.tmp beside it is complete (a stop "
                        "between the two renames of a save); resuming from it."]
    tmp = tmp_path / "latest.pt.tmp"
    tmp.write_bytes(tmp.read_bytes()[:100])  # a stop while the tmp file was being written
    messages.clear()
    assert load_checkpoint(path, warn=messages.append)["step"] == 100
    assert messages[0].endswith("is missing; resuming from the previous checkpoint latest.prev.pt instead "
                                "(the steps after it are trained again).")


def test_a_complete_tmp_file_alone_is_a_run_to_resume_and_a_partial_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"step": 100})
    path.rename(tmp_path / "latest.pt.tmp")  # a first save stopped between its renames: no .prev yet
    assert checkpoint.has_checkpoint(path)
    tmp = tmp_path / "latest.pt.tmp"
    tmp.write_bytes(tmp.read_bytes()[:100])
    assert not checkpoint.has_checkpoint(path)


def test_a_full_disk_reported_by_torchs_zip_writer_is_a_write_error(tmp_path: Path, monkeypatch) -> None:
    """torch.save reports a full disk from its zip writer as a RuntimeError, not an OSError."""
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"step": 5})

    def zip_writer_fails(obj, file, *args, **kwargs):
        file.write(b"partial bytes")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 192448 vs 192336")

    monkeypatch.setattr(checkpoint.torch, "save", zip_writer_fails)
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"could not write checkpoint .*latest\.pt "
                                                              r"\(RuntimeError: \[enforce fail.*Free disk space"):
        save_checkpoint(path, {"step": 6})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]  # no partial tmp file left
    assert load_checkpoint(path)["step"] == 5


def test_shape_mismatch_names_parameter_shapes_and_config_key() -> None:
    saved = {"rssm.gru.weight": torch.zeros(512, 8), "head.bias": torch.zeros(3)}
    expected = {"rssm.gru.weight": torch.zeros(1024, 8), "head.bias": torch.zeros(3)}
    pattern = (r"checkpoint parameter 'rssm\.gru\.weight' has shape \(512, 8\) but the "
               r"config builds \(1024, 8\) \(config: rssm\.deter=1024\): the checkpoint was trained")
    with pytest.raises(ValueError, match=pattern):
        check_shapes(saved, expected, hints={"rssm": "rssm.deter=1024", "head": "heads.units=8"})
    pattern = r"has shape \(512, 8\) but the config builds \(1024, 8\): the checkpoint"
    with pytest.raises(ValueError, match=pattern):
        check_shapes(saved, expected)
    check_shapes(expected, expected)
    with pytest.raises(ValueError, match=r"\(config: rssm\.hidden=64\)"):  # the longest fragment found
        check_shapes(saved, expected, hints={"rssm": "rssm.deter=1024", "rssm.gru": "rssm.hidden=64"})
    with pytest.raises(ValueError, match=r"parameters missing from the checkpoint: \['extra'\]"):
        check_shapes(expected, {**expected, "extra": torch.zeros(1)})


def test_config_size_mismatch_names_both_values() -> None:
    keys = ["rssm.deter", "rssm.units"]
    pattern = r"the checkpoint was trained with rssm\.deter=512 but the config asks for rssm\.deter=1024"
    with pytest.raises(ValueError, match=pattern):
        check_config_sizes({"rssm": {"deter": 512}}, {"rssm": {"deter": 1024}}, keys)
    check_config_sizes({"rssm": {"deter": 512}}, {"rssm": {"deter": 512}}, keys)
    check_config_sizes({"rssm": {"deter": 512}}, {"rssm": {}}, keys)  # a key on one side only: no verdict
    check_config_sizes({"rssm": {}}, {"rssm": {"deter": 512}}, keys)


def test_config_size_mismatch_names_every_differing_key_at_once() -> None:
    """A resume without the original --configs differs in many keys: one error lists them all with
    the flags that restore them (it named one key per attempt)."""
    saved = {"rssm": {"deter": 32, "hidden": 32, "stoch": 4}, "actor": {"units": 64}}
    current = {"rssm": {"deter": 512, "hidden": 512, "stoch": 4}, "actor": {"units": 512}}
    with pytest.raises(ValueError) as error:
        check_config_sizes(saved, current, ["rssm.deter", "rssm.hidden", "rssm.stoch", "actor.units"])
    assert str(error.value) == (
        "the checkpoint was trained with rssm.deter=32 but the config asks for rssm.deter=512; also "
        "rssm.hidden=32 (config: 512), actor.units=64 (config: 512), so its parameters do not fit the model. "
        "Resume with --rssm.deter 32 --rssm.hidden 32 --actor.units 64 (or the same --configs blocks as the "
        "original run), or start a fresh run in a new --logdir.")
    with pytest.raises(ValueError) as error:  # --eval_only: no fresh run to start, the blocks to repeat
        check_config_sizes(saved, current, ["rssm.deter", "actor.units"], evaluating=True)
    assert str(error.value).endswith(
        "so its parameters do not fit the model. Evaluate with --rssm.deter 32 --actor.units 64, or with the "
        "same --configs blocks as the training run (an evaluation builds its model from the config it is given).")


def test_map_location_loads_tensors_on_cpu(tmp_path: Path) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"w": torch.ones(2)})
    assert load_checkpoint(path, map_location=torch.device("cpu"))["w"].device.type == "cpu"


def test_errors_are_checkpoint_errors_and_has_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "latest.pt"
    assert not checkpoint.has_checkpoint(path)
    with pytest.raises(checkpoint.CheckpointError):
        load_checkpoint(path)
    with pytest.raises(checkpoint.CheckpointError):
        check_shapes({"a": torch.zeros(1)}, {"a": torch.zeros(2)})
    save_checkpoint(path, {"step": 1})
    save_checkpoint(path, {"step": 2})
    assert checkpoint.has_checkpoint(path)
    path.unlink()  # as after a crash between save_checkpoint's two renames
    assert checkpoint.has_checkpoint(path)
    messages: list[str] = []
    assert load_checkpoint(path, warn=messages.append)["step"] == 1
    assert messages[0].startswith(f"checkpoint {path} is missing; resuming from the previous checkpoint")


def test_nested_state_dicts_are_compared_by_dotted_names() -> None:
    saved = {"model": {"rssm.w": torch.zeros(4)}, "optimizer": {"lr": 1e-4}, "step": 3}
    expected = {"model": {"rssm.w": torch.zeros(5)}, "optimizer": {"lr": 3e-4}, "step": 0}
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"parameter 'model\.rssm\.w' has shape \(4,\)"):
        check_shapes(saved, expected)
    check_shapes(saved, {"model": {"rssm.w": torch.zeros(4)}})


def test_a_save_reaches_the_disk_before_it_replaces_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """The new file is fsynced before any rename, the old one becomes latest.prev.pt, the new one
    latest.pt, and then the folder is fsynced so the renames survive a power loss."""
    path = (tmp_path / "latest.pt").resolve()
    save_checkpoint(path, make_state(1))
    events = record_disk_events(monkeypatch)
    save_checkpoint(path, make_state(2))
    tmp, prev = f"{path}.tmp", str(tmp_path.resolve() / "latest.prev.pt")
    assert events == [("fsync", tmp), ("replace", f"{path} -> {prev}"), ("replace", f"{tmp} -> {path}"),
                      ("fsync", str(tmp_path.resolve()))]
    assert load_checkpoint(path)["step"] == 2 and torch.load(prev, weights_only=False)["step"] == 1


def test_ctrl_c_during_a_save_leaves_the_checkpoint_and_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"step": 5})

    def interrupted(obj, file, *args, **kwargs):
        file.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 6})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]
    assert load_checkpoint(path)["step"] == 5


def test_shape_check_names_transposed_and_checkpoint_only_parameters():
    """A (2, 3) weight where the model has (3, 2) differs though the sizes agree; a parameter only
    in the checkpoint (e.g. a head the config no longer builds) is named as well."""
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"'wm\.w' has shape \(2, 3\) but the config builds \(3, 2\)"):
        checkpoint.check_shapes({"wm": {"w": torch.zeros(2, 3)}}, {"wm": {"w": torch.zeros(3, 2)}})
    with pytest.raises(checkpoint.CheckpointMismatch) as raised:
        checkpoint.check_shapes({"w": torch.zeros(2), "old_head.b": torch.zeros(1)}, {"w": torch.zeros(2)})
    assert raised.value.detail == "parameters missing from the checkpoint: none; parameters only in the checkpoint: ['old_head.b']"


def test_errors_are_described_by_type_and_first_line():
    assert checkpoint.describe(ValueError("the zip archive is short\nat offset 1234")) == "ValueError: the zip archive is short"
    assert checkpoint.describe(RuntimeError()) == "RuntimeError"
    assert checkpoint.describe(OSError("  disk full  ")) == "OSError: disk full"
