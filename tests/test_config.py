"""The config system: merge order, nested merge, typed overrides, errors, freezing, --help."""
from pathlib import Path

import pytest

import config as config_lib
from config import ConfigError, load_config


def write_configs(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "configs.yaml"
    path.write_text(text)
    return path


TOY = """
defaults:
  a: 1             # an int
  b: 0.5           # a float
  flag: False      # a bool
  name: x          # a string
  size: [64, 64]   # a list
  task: custom_reach  # task
  device: auto     # device
  precision: 32    # precision
  eval_only: False  # eval
  from_checkpoint: ''  # path
  encoder: {mlp_keys: '.*', cnn_keys: 'image'}
  decoder: {mlp_keys: '.*', cnn_keys: 'image'}
  nest: {p: 1, q: 2}  # a group
first:
  a: 2
  nest: {p: 10}
second:
  a: 3
debug:
  a: 99
typo:
  nset: {p: 1}
"""


def test_blocks_merge_in_order_later_wins(tmp_path):
    path = write_configs(tmp_path, TOY)
    assert load_config(["--configs", "first", "second"], path).a == 3
    assert load_config(["--configs", "second", "first"], path).a == 2


def test_nested_dicts_merge_key_by_key(tmp_path):
    cfg = load_config(["--configs", "first"], write_configs(tmp_path, TOY))
    assert cfg.nest.p == 10 and cfg.nest.q == 2


def test_debug_is_applied_last_wherever_it_appears(tmp_path):
    path = write_configs(tmp_path, TOY)
    cfg, loaded = config_lib.build_config(["--configs", "debug", "second"], path)
    assert cfg.a == 99
    assert loaded.blocks == ["second", "debug"] and loaded.debug_moved
    # command-line overrides still come last of all
    assert load_config(["--configs", "debug", "second", "--a", "5"], path).a == 5


def test_guide_debug_custom_is_a_small_model():
    cfg = load_config(["--configs", "debug", "custom", "--task", "custom_reach"])
    assert cfg.rssm.deter == 32  # not the custom block's 4096
    assert cfg.encoder.cnn_keys == "image" and cfg.encoder.mlp_keys == "$^"  # custom's keys stay


@pytest.mark.parametrize(
    "argv, key, expected",
    [
        (["--a", "1e6"], "a", 1_000_000),
        (["--a=7"], "a", 7),
        (["--b", "5e-4"], "b", 5e-4),
        (["--b", "2"], "b", 2.0),
        (["--flag", "true"], "flag", True),
        (["--flag", "True"], "flag", True),
        (["--flag", "1"], "flag", True),
        (["--flag", "False"], "flag", False),
        (["--flag", "0"], "flag", False),
        (["--size", "32,48"], "size", (32, 48)),
        (["--name", "hello"], "name", "hello"),
        (["--nest.q", "9"], "nest.q", 9),
        (["--precision", "bf16"], "precision", "bf16"),
    ],
)
def test_overrides_are_typed_by_the_default(tmp_path, argv, key, expected):
    value = load_config(argv, write_configs(tmp_path, TOY)).get_path(key)
    assert value == expected and type(value) is type(expected)


def test_real_config_dotted_overrides():
    cfg = load_config(["--rssm.deter", "1024", "--envs.amount", "8", "--steps", "1e5"])
    assert (cfg.rssm.deter, cfg.envs.amount, cfg.steps) == (1024, 8, 100000)


def test_unknown_block_lists_the_available_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config block 'nope'.*Available blocks: first, second, debug"):
        load_config(["--configs", "nope"], write_configs(tmp_path, TOY))


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown option --batchsize.*did you mean --batch_size\?"):
        load_config(["--batchsize", "32"])
    with pytest.raises(ConfigError, match=r"did you mean --rssm.deter\?"):
        load_config(["--rssm.detr", "32"])


def test_block_with_a_key_defaults_lacks_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"block 'typo' sets 'nset'.*not a key of the 'defaults' block.*did you mean --nest"):
        load_config(["--configs", "typo"], write_configs(tmp_path, TOY))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--a", "abc"], r"--a expects an integer \(1e6 is accepted\), but got 'abc'"),
        (["--a", "1.5"], r"--a expects an integer"),
        (["--b", "fast"], r"--b expects a number, but got 'fast'"),
        (["--flag", "maybe"], r"--flag expects a boolean \(true/false/True/False/1/0\), but got 'maybe'"),
        (["--size", "a,b"], r"--size expects a comma-separated list, but got 'a,b'"),
        (["--nest", "3"], r"--nest is a group of keys \(p, q\).*--nest.p VALUE"),
        (["--a"], r"--a needs a value"),
    ],
)
def test_wrong_types_name_key_type_and_value(tmp_path, argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv, write_configs(tmp_path, TOY))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--precision", "8"], r"--precision is '8', which is not one of 32, 16, bf16"),
        (["--envs.parallel", "fork"], r"--envs.parallel is 'fork', which is not one of process, thread, none"),
        (["--batch_size", "0"], r"--batch_size must be greater than 0"),
        (["--discount", "1.5"], r"--discount must lie in \[0, 1\]"),
        (["--task", "pong"], r"--task 'pong' must be <suite>_<name>"),
        (["--device", "gpu"], r"--device 'gpu' must be auto, cpu, cuda or cuda:N"),
        (["--encoder.cnn_keys", "("], r"--encoder.cnn_keys '\(' is not a valid regular expression"),
        (["--eval_only", "True"], r"--eval_only True needs --from_checkpoint PATH"),
    ],
)
def test_bad_values_are_rejected(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_config_is_frozen_and_a_mapping():
    cfg = load_config([])
    with pytest.raises(AttributeError, match="frozen"):
        cfg.batch_size = 3
    with pytest.raises(TypeError):
        cfg.rssm["deter"] = 3  # type: ignore[index]
    assert dict(**cfg.rssm)["deter"] == 512
    assert isinstance(cfg.to_dict()["rssm"], dict)
    assert isinstance(cfg.env.dmc.size, tuple)


def test_defaults_keys_all_have_comments():
    blocks = config_lib.read_blocks()
    comments = config_lib.key_comments()
    assert set(blocks["defaults"]) <= set(comments), set(blocks["defaults"]) - set(comments)


def test_every_shipped_block_merges_and_validates():
    names = [n for n in config_lib.read_blocks() if n != "defaults"]
    for name in names:
        load_config(["--configs", name, "--task", "custom_reach"])
    assert {"debug", "custom", "dmc_proprio", "dmc_vision", "atari100k", "crafter", "minecraft",
            "size_xs", "size_s", "size_m", "size_l", "size_xl"} <= set(names)


def test_size_presets_follow_the_paper():
    expected = {"size_s": (512, 32, 512, 2), "size_m": (1024, 48, 640, 3),
                "size_l": (2048, 64, 768, 4), "size_xl": (4096, 96, 1024, 5)}
    for name, (deter, depth, units, layers) in expected.items():
        cfg = load_config(["--configs", "dmc_vision", name])
        assert (cfg.rssm.deter, cfg.encoder.cnn_depth, cfg.actor.units, cfg.critic.layers) == (deter, depth, units, layers)


def test_help_lists_blocks_and_keys_with_comments():
    text = config_lib.help_text()
    assert "blocks: dmc_proprio" in text and "debug" in text
    assert "--batch_size" in text and "sequences per update" in text
    assert "--train_ratio" in text and "replayed steps" in text
