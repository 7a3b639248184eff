"""The config system: merge order, nested merge, typed overrides, errors, freezing, --help; and
configs.yaml as users edit it (syntax errors, blocks and keys given twice, options of their own suite),
run through dreamer.main."""
import re
from pathlib import Path

import pytest

import config as config_lib
import dreamer
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
        (["--flag", "yes"], "flag", True),
        (["--flag", "no"], "flag", False),
        (["--a", "-3"], "a", -3),  # a negative number is a value, not the next option
        (["--b", "-0.5"], "b", -0.5),
        (["--b", "-1e-3"], "b", -1e-3),
        (["--size", "(32,48)"], "size", (32, 48)),
        (["--size", "[32, 48]"], "size", (32, 48)),
        (["--size", "32,48"], "size", (32, 48)),
        (["--name", "hello"], "name", "hello"),
        (["--nest.q", "9"], "nest.q", 9),
        (["--precision", "bf16"], "precision", "bf16"),
    ],
)
def test_overrides_are_typed_by_the_default(tmp_path, argv, key, expected):
    value = load_config(argv, write_configs(tmp_path, TOY)).get_path(key)
    assert value == expected and type(value) is type(expected)


def test_configs_given_with_an_equals_sign_and_commas(tmp_path):
    path = write_configs(tmp_path, TOY)
    assert load_config(["--configs=first,second"], path).a == 3
    assert load_config(["--configs", "second,first"], path).a == 2


def test_an_empty_configs_is_an_error_even_when_a_later_one_names_blocks(tmp_path):
    with pytest.raises(ConfigError, match=r"--configs needs one or more block names"):
        load_config(["--configs", "--a", "5", "--configs", "first"], write_configs(tmp_path, TOY))


def test_block_values_keep_their_kind_and_precision_is_a_choice(tmp_path):
    path = write_configs(tmp_path, TOY + "as_bool_b:\n  b: true\nas_bool_a:\n  a: false\nhalf:\n  precision: bf16\n"
                                         "int_for_float:\n  b: 2\n")
    with pytest.raises(ConfigError, match=r"block 'as_bool_b' sets 'b' to True \(bool\), but it must be a number"):
        load_config(["--configs", "as_bool_b"], path)
    with pytest.raises(ConfigError, match=r"block 'as_bool_a' sets 'a' to False \(bool\), but it must be an integer"):
        load_config(["--configs", "as_bool_a"], path)
    assert load_config(["--configs", "half"], path).precision == "bf16"  # the default 32 is an int in YAML
    assert load_config([], path).precision == "32"  # always a string, whatever YAML made of it
    assert load_config(["--configs", "int_for_float"], path).b == 2


def test_flat_keys_lists_leaves_and_empty_groups():
    tree = {"a": 1, "env": {"custom": {}, "dmc": {"size": [64, 64]}}}
    assert config_lib.flat_keys(tree) == ["a", "env.custom", "env.dmc.size"]


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


def test_a_wrong_key_or_value_in_a_real_block_names_its_file_line_and_spelling(monkeypatch, tmp_path):
    text = REAL_CONFIGS + "\nmine:\n  rssm: {detr: 64}\n\nmine2:\n  steps: 10\n  batch_size: many\n"
    path = use_configs(monkeypatch, tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(["--configs", "mine"], path)
    assert str(raised.value).startswith(
        f"{path}, line {line_of(text, '  rssm: {detr: 64}')}: block 'mine' sets 'rssm.detr', which is not a key of "
        "the 'defaults' block, so it would be silently ignored. (did you mean 'deter'?) Fix the spelling")
    with pytest.raises(ConfigError) as raised:
        load_config(["--configs", "mine2"], path)
    assert str(raised.value) == (
        f"{path}, line {line_of(text, '  batch_size: many')}: block 'mine2' sets 'batch_size' to 'many' (str), but "
        "it must be an integer like its default 16. Fix the value.")


def test_block_with_a_key_defaults_lacks_is_an_error(tmp_path):
    path = write_configs(tmp_path, TOY)
    with pytest.raises(ConfigError) as raised:
        load_config(["--configs", "typo"], path)
    line = TOY.splitlines().index(next(l for l in TOY.splitlines() if l.strip().startswith("nset"))) + 1
    assert str(raised.value) == (
        f"{path}, line {line}: block 'typo' sets 'nset', which is not a key of the 'defaults' block, so it would "
        "be silently ignored. (did you mean 'nest'?) Fix the spelling in the block, or add the key with a "
        "default and a comment to 'defaults' if the program really reads it.")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--a", "abc"], r"--a expects an integer \(1e6 is accepted\), but got 'abc'"),
        (["--a", "1.5"], r"--a expects an integer"),
        (["--a", "inf"], r"--a expects an integer \(1e6 is accepted\), but got 'inf'"),
        (["--a", "nan"], r"--a expects an integer \(1e6 is accepted\), but got 'nan'"),
        (["--b", "fast"], r"--b expects a number, but got 'fast'"),
        (["--b", "inf"], r"^--b is inf, but every number setting must be finite: nan and inf only break training"),
        (["--b", "-Infinity"], r"^--b is -Infinity, but every number setting must be finite"),
        (["--b", "nan"], r"^--b is nan, but every number setting must be finite"),
        (["--a", "1e16"], r"^--a is 1e16, beyond the largest integer a setting takes \(2\^53 = 9,007,199,254,740,992\)"),
        (["--a", "-1e100"], r"^--a is -1e100, beyond the largest integer"),
        (["--flag", "maybe"], r"--flag expects a boolean \(true/false/True/False/yes/no/1/0\), but got 'maybe'"),
        (["--size", "a,b"], r"--size expects a comma-separated list, but got 'a,b'"),
        (["--nest", "3"], r"--nest is a group of keys \(p, q\).*--nest.p VALUE"),
        (["--a"], r"--a needs a value"),
    ],
)
def test_wrong_types_name_key_type_and_value(tmp_path, argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv, write_configs(tmp_path, TOY))


def test_integers_up_to_2_to_the_53_and_yes_no_booleans_are_taken(tmp_path):
    path = write_configs(tmp_path, TOY)
    assert load_config(["--a", str(2 ** 53)], path).a == 2 ** 53
    assert load_config(["--flag", "yes"], path).flag is True
    assert load_config(["--flag", "No"], path).flag is False


def test_a_block_key_without_a_value_or_out_of_range_names_the_file_and_line(tmp_path):
    """A key written with nothing after its colon reads as null: it got past the type check (a
    TypeError deep in the optimizer's set-up); inf and huge integers likewise."""
    extra = ["empty:", "  b: 0.1", "  a:", "null_b:", "  b: null", "infinite:", "  b: .inf",
             "huge:", "  a: 100000000000000000000"]
    path = write_configs(tmp_path, TOY + "\n".join(extra) + "\n")
    line = {text: number for number, text in enumerate(path.read_text().splitlines(), 1)}
    cases = {
        "empty": (line["  a:"], r"block 'empty' gives 'a' no value \(a key written with nothing after its colon, "
                                r"or null\), but it must be an integer like its default 1\. Give it a value, or "
                                r"delete the line to keep the default\."),
        "null_b": (line["  b: null"], r"block 'null_b' gives 'b' no value .* must be a number like its default 0\.5"),
        "infinite": (line["  b: .inf"], r"block 'infinite' sets 'b', which is inf, but every number setting must be "
                                        r"finite"),
        "huge": (line["  a: 100000000000000000000"], r"block 'huge' sets 'a', which is 100000000000000000000, "
                                                     r"beyond the largest integer"),
    }
    for block, (number, message) in cases.items():
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}, line {number}: {message}"):
            load_config(["--configs", block], path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--precision", "8"], r"--precision is '8', which is not one of 32, 16, bf16"),
        (["--envs.parallel", "fork"], r"--envs.parallel is 'fork', which is not one of process, thread, none"),
        (["--batch_size", "0"], r"--batch_size must be greater than 0"),
        (["--discount", "1.5"], r"--discount must lie in \(0, 1\], but it is 1.5"),
        (["--task", "pong"], r"--task 'pong' must be <suite>_<name>"),
        (["--device", "gpu"], r"--device 'gpu' must be auto, cpu, cuda or cuda:N"),
        (["--encoder.cnn_keys", "("], r"--encoder.cnn_keys '\(' is not a valid regular expression"),
        (["--eval_only", "True"], r"--eval_only True needs --from_checkpoint PATH"),
        # values that trained silently into nothing or crashed deep inside (the config-edge audit)
        (["--model_grad_clip", "0"], r"--model_grad_clip must be greater than 0, but it is 0.0 \(0 would zero every "
                                     r"gradient and a negative value reverse them; the paper clips at 1000"),
        (["--ac_grad_clip", "-1"], r"--ac_grad_clip must be greater than 0, but it is -1.0 \(0 would zero"),
        (["--model_eps", "0"], r"--model_eps must be greater than 0, but it is 0.0 \(Adam divides by sqrt\(v\) \+ eps"),
        (["--discount", "0"], r"--discount must lie in \(0, 1\], but it is 0.0 \(the imagined steps' weights divide"),
        (["--plan2explore.ensemble", "1"], r"--plan2explore.ensemble must be at least 2, but it is 1 \(the intrinsic "
                                           r"reward is the members' disagreement"),
        (["--critic.bins", "1"], r"--critic.bins must be at least 2, but it is 1 \(a two-hot target needs two bins"),
        (["--reward_head.bins", "0"], r"--reward_head.bins must be at least 2"),
        (["--encoder.cnn_depth", "0"], r"--encoder.cnn_depth must be greater than 0, but it is 0\.$"),
        (["--decoder.kernel", "3"], r"--decoder.kernel must be an even number of at least 2, but it is 3"),
        (["--encoder.kernel", "0"], r"--encoder.kernel must be an even number of at least 2, but it is 0"),
        (["--return_norm.low", "95", "--return_norm.high", "5"], r"percentiles with 0 <= low < high <= 100, but "
                                                                 r"they are 95.0 and 5.0"),
        (["--return_norm.max", "0"], r"--return_norm.max must be greater than 0"),
        (["--actor.min_std", "2"], r"--actor.min_std \(2.0\) must not exceed --actor.max_std \(1.0\)"),
        (["--reward_scale", "0"], r"--reward_scale must not be 0: it multiplies every reward"),
        (["--discount_lambda", "1.01"], r"--discount_lambda must lie in \[0, 1\], but it is 1.01"),
        (["--return_norm.low", "5", "--return_norm.high", "5"], r"0 <= low < high <= 100, but they are 5.0 and 5.0"),
        (["--device", "cuda:x"], r"--device 'cuda:x' must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_values_are_rejected(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_values_on_the_edges_of_their_ranges_are_accepted():
    cfg = load_config(["--discount_lambda", "1", "--rssm.unimix", "0", "--discount", "1", "--actor.min_std", "0.5",
                       "--actor.max_std", "0.5", "--device", "cuda:1", "--return_norm.low", "0",
                       "--return_norm.high", "100"])
    assert (cfg.discount_lambda, cfg.rssm.unimix, cfg.discount) == (1.0, 0.0, 1.0)
    assert (cfg.actor.min_std, cfg.actor.max_std, cfg.device) == (0.5, 0.5, "cuda:1")
    assert (cfg.return_norm.low, cfg.return_norm.high) == (0.0, 100.0)


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


def test_suites_build_the_paper_codes_model_size():
    """v1's configs shrink DMC and Atari100k to S; Atari 200M, Crafter and Minecraft keep its
    default XL. Every model-size setting of the XL suites equals size_xl's, and a size block after
    the suite shrinks it."""
    def sizes(*blocks):
        cfg = load_config(["--configs", *blocks])
        return {"deter": cfg.rssm.deter, "hidden": cfg.rssm.hidden, "encoder": cfg.encoder.cnn_depth,
                "decoder": cfg.decoder.cnn_depth, **{part: (cfg[part].units, cfg[part].layers) for part in
                ("reward_head", "cont_head", "actor", "critic", "plan2explore")}}
    for suite in ("dmc_proprio", "dmc_vision", "atari100k"):
        assert sizes(suite) == sizes(suite, "size_s"), suite
    for suite in ("atari", "crafter", "minecraft"):
        assert sizes(suite) == sizes(suite, "size_xl"), suite
        assert sizes(suite)["deter"] == 4096 and sizes(suite)["actor"] == (1024, 5)
        assert sizes(suite, "size_s") == sizes("dmc_vision"), suite
        assert load_config(["--configs", suite])["encoder"].cnn_keys == "image"


def test_help_lists_blocks_and_keys_with_comments():
    text = config_lib.help_text()
    assert "blocks: dmc_proprio" in text and "debug" in text
    assert "--batch_size" in text and "sequences per update" in text
    assert "--train_ratio" in text and "replayed steps" in text


# --- configs.yaml as the user edits it, through dreamer.main (exit status, stderr, logdir) ----------

REAL_CONFIGS = config_lib.CONFIGS_PATH.read_text(encoding="utf-8")
# The guide's step 3 (seed-custom-env-guide.ja.md), verbatim: what "configs.yaml に追加" appends.
GUIDE_BLOCK = """# configs.yaml に追加
custom:
  # 環境設定
  task: custom_task_name
  envs: {amount: 4, parallel: process}
  
  # 観測空間の設定
  encoder: {mlp_keys: '$^', cnn_keys: 'image'}
  decoder: {mlp_keys: '$^', cnn_keys: 'image'}
  
  # ハイパーパラメータ
  train_ratio: 64
  batch_size: 16
  batch_length: 64
  
  # モデル設定
  rssm: {deter: 4096, hidden: 1024, stoch: 32, classes: 32}
  
  # 学習設定
  model_lr: 1e-4
  actor_lr: 3e-5
  critic_lr: 3e-5
  
  # その他の設定
  actor_dist: normal
  imag_horizon: 15
  slow_value_target: True
  slow_target_update: 1
"""
TINY_RUN = ["--steps", "40", "--prefill", "20", "--eval_every", "0", "--envs.parallel", "none",
            "--video", "False", "--device", "cpu"]


def use_configs(monkeypatch, tmp_path: Path, text: str) -> Path:
    """`text` as the configs.yaml that dreamer.main reads."""
    path = write_configs(tmp_path, text)
    monkeypatch.setattr(config_lib, "CONFIGS_PATH", path)
    return path


def line_of(text: str, line: str, after: int = 0) -> int:
    """1-based number of the first line of `text` equal to `line`, after line `after`."""
    lines = text.splitlines()
    return next(i + 1 for i in range(after, len(lines)) if lines[i] == line)


def stopped_with_one_paragraph(capsys, rc: int, logdir: Path) -> str:
    """The run stopped before it started: exit 2, one 'error:' line on stderr, nothing written."""
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    assert not logdir.exists()
    return err.strip()


def test_guide_block_appended_verbatim_runs_with_one_note(monkeypatch, tmp_path, capsys):
    """The guide's step 3 done literally: configs.yaml then holds `custom` twice, equal after loading."""
    text = REAL_CONFIGS + "\n" + GUIDE_BLOCK
    path = use_configs(monkeypatch, tmp_path, text)
    first = line_of(text, "custom:")
    second = line_of(text, "custom:", after=first)
    logdir = tmp_path / "run"
    rc = dreamer.main(["--configs", "debug", "custom", "--task", "custom_reach", "--logdir", str(logdir), *TINY_RUN])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    assert err.splitlines()[0] == (
        f"note: {path} defines block 'custom' twice (line {first} and line {second}) with the same "
        f"contents; the second copy is ignored.")
    assert err.count("defines block") == 1 and "Traceback" not in err
    assert "finished: 40 steps" in (logdir / "train.log").read_text()


def test_a_block_defined_twice_with_other_contents_names_both_lines_and_the_fix(monkeypatch, tmp_path, capsys):
    mine = GUIDE_BLOCK.replace("task: custom_task_name", "task: custom_catch")
    text = REAL_CONFIGS + "\n" + mine
    path = use_configs(monkeypatch, tmp_path, text)
    first = line_of(text, "custom:")
    second = line_of(text, "custom:", after=first)
    logdir = tmp_path / "run"
    rc = dreamer.main(["--configs", "custom", "--task", "custom_reach", "--logdir", str(logdir)])
    assert stopped_with_one_paragraph(capsys, rc, logdir) == (
        f"error: {path} defines block 'custom' twice, at line {first} and at line {second}, with different "
        f"contents ('task' 'custom_task_name' vs 'custom_catch'), and a block name can hold only one of "
        f"them. Edit the first one (line {first}) instead of adding a second, or give yours another name "
        f"(e.g. 'custom_mine:' at line {second}) and pass it with --configs custom_mine. The run did not start.")


def test_the_debug_block_twice_is_not_told_to_take_another_name(monkeypatch, tmp_path):
    text = REAL_CONFIGS + "\ndebug:\n  steps: 50\n"
    path = use_configs(monkeypatch, tmp_path, text)
    first, second = line_of(text, "debug:"), line_of(text, "debug:", after=line_of(text, "debug:"))
    with pytest.raises(ConfigError) as raised:
        load_config(["--configs", "debug"], path)
    assert str(raised.value).endswith(
        f"Edit the first one (line {first}) instead of adding a second ('debug' is the one block applied "
        "after the others, so keep that name). The run did not start.")
    assert f"line {second}" in str(raised.value) and "debug_mine" not in str(raised.value)


def test_a_key_twice_in_a_block_names_file_line_and_key(monkeypatch, tmp_path, capsys):
    text = REAL_CONFIGS.replace("\ncustom:\n", "\ncustom:\n  batch_size: 8\n", 1)
    path = use_configs(monkeypatch, tmp_path, text)
    first = line_of(text, "  batch_size: 8")
    second = line_of(text, "  batch_size: 16", after=first)
    logdir = tmp_path / "run"
    rc = dreamer.main(["--configs", "custom", "--task", "custom_reach", "--logdir", str(logdir)])
    assert stopped_with_one_paragraph(capsys, rc, logdir) == (
        f"error: {path}, line {second}: block 'custom' sets 'batch_size' twice (line {first} and line "
        f"{second}), and only one value can hold. Delete one of the two (keep the value you want); the run "
        f"did not start.")


def test_a_nested_key_twice_names_its_dotted_name(tmp_path):
    path = write_configs(tmp_path, TOY.replace("nest: {p: 1, q: 2}", "nest: {p: 1, q: 2, p: 3}"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}, line 15: block 'defaults' sets 'nest.p' "
                                          r"twice on line 15, and only one value can hold\."):
        load_config([], path)


def custom_block_line(old: str, new: str) -> tuple[str, int]:
    """configs.yaml with the line `old` of the `custom` block replaced by `new`; its line number."""
    start = line_of(REAL_CONFIGS, "custom:")
    number = line_of(REAL_CONFIGS, old, after=start)
    lines = REAL_CONFIGS.splitlines(keepends=True)
    lines[number - 1] = new + "\n"
    return "".join(lines), number


@pytest.mark.parametrize("old, new, where, problem", [
    ("  batch_size: 16", "  batch_size 16", (1, 3),
     r"could not find expected ':' \(while scanning a simple key at line {n}\)\. The run did not start: "
     r"line {n} reads 'batch_size 16': fix it \(every key needs a colon and a space \('batch_size: 16'\)"),
    ("  batch_size: 16", "\tbatch_size: 16", (0, 1),
     r"found character '\\t' that cannot start any token\. The run did not start: line {n} reads "
     r"'batch_size: 16': fix it \(indent with spaces, not tabs\)"),
    ("  rssm: {deter: 4096, hidden: 1024, stoch: 32, classes: 32}",
     "  rssm: {deter: 4096, hidden: 1024, stoch: 32, classes: 32", (3, 3),
     r"expected ',' or '}}', but got '\?' \(while parsing a flow mapping at line {n}\)\. The run did not "
     r"start: line {n} reads 'rssm: {{deter: 4096, hidden: 1024, stoch: 32, classes: 32': fix it"),
    ("  task: custom_task_name", "  task custom_task_name", (1, 7),
     r"mapping values are not allowed here\. The run did not start: line {n} reads 'task custom_task_name': "
     r"fix it "
     r"\(every key needs a colon"),
], ids=["missing colon", "tab", "unclosed brace", "missing colon before a key"])
def test_yaml_syntax_errors_stop_with_one_paragraph(monkeypatch, tmp_path, capsys, old, new, where, problem):
    """`where`: (lines after the bad one, column) at which ruamel notices the problem."""
    text, number = custom_block_line(old, new)
    path = use_configs(monkeypatch, tmp_path, text)
    logdir = tmp_path / "run"
    rc = dreamer.main(["--configs", "debug", "custom", "--task", "custom_reach", "--logdir", str(logdir)])
    message = stopped_with_one_paragraph(capsys, rc, logdir)
    line, column = number + where[0], where[1]
    assert re.fullmatch(
        rf"error: {re.escape(str(path))}, line {line}, column {column}: not valid YAML: "
        + problem.format(n=number) + r".*\.", message), message


def test_a_syntax_error_also_stops_help_and_the_block_list(monkeypatch, tmp_path, capsys):
    text, number = custom_block_line("  batch_size: 16", "  batch_size 16")
    use_configs(monkeypatch, tmp_path, text)
    for argv in (["--help"], ["--configs"]):
        assert dreamer.main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and f"line {number} reads" in err, err


# --- options of a user's own suite: env.<suite>.<key> is open ---------------------------------------


def test_env_options_of_any_suite_are_open_and_typed_like_yaml():
    cfg = load_config(["--env.broken.foo", "1", "--env.broken.rate", "0.5", "--env.broken.name", "abc",
                       "--env.broken.on", "true", "--env.broken.size", "128,128", "--env.broken.ids", "[1, 2]",
                       "--env.broken.none", "null", "--env.broken.color", "#red", "--env.custom.size", "128,128",
                       "--env.dmc.extra", "1e3"])
    assert cfg.env.broken.to_dict() == {"foo": 1, "rate": 0.5, "name": "abc", "on": True,
                                        "size": [128, 128], "ids": [1, 2], "none": None, "color": "#red"}
    assert cfg.env.custom.size == (128, 128) and cfg.env.dmc.extra == 1000.0
    assert cfg.env.dmc.size == (64, 64)  # the shipped suites keep their options


def test_env_options_from_a_new_block_merge_key_by_key(tmp_path):
    path = write_configs(tmp_path, REAL_CONFIGS + """
mine:
  task: mine_reach
  env: {mine: {foo: 1, opts: {a: 1}}, custom: {size: [32, 32]}}
mine_more:
  env: {mine: {bar: [1, 2], opts: {b: 2}}}
""")
    cfg = load_config(["--configs", "mine", "mine_more", "--env.mine.foo", "abc"], path)
    assert cfg.env.mine.to_dict() == {"foo": "abc", "bar": [1, 2], "opts": {"a": 1, "b": 2}}
    assert cfg.env.custom.size == (32, 32)


@pytest.mark.parametrize("argv, message", [
    (["--env.atari.resize", "bilinear"], r"--env.atari.resize is 'bilinear', which is not one of area, pillow"),
    (["--env.atari.lives", "x"], r"--env.atari.lives is 'x', which is not one of unused, discount, reset"),
    (["--env.atari.size", "a,b"], r"--env.atari.size expects a comma-separated list, but got 'a,b'"),
    (["--env.dmc.camera", "top"], r"--env.dmc.camera expects an integer"),
    (["--env.broken", "3"], r"^--env.broken holds the keyword arguments of the broken suite's constructor; "
                            r"set them one by one with dotted names, e.g. --env.broken.size VALUE\.$"),
    (["--env.custom", "3"], r"^--env.custom holds the keyword arguments of the custom suite's constructor"),
])
def test_known_options_of_the_shipped_suites_are_still_checked(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_block_values_of_known_env_options_are_still_type_checked(tmp_path):
    path = write_configs(tmp_path, REAL_CONFIGS + "\nbad:\n  env: {atari: {size: 64}}\nflat:\n  env: {mine: 3}\n")
    with pytest.raises(ConfigError, match=r"block 'bad' sets 'env.atari.size' to 64 \(int\), but it must be a list"):
        load_config(["--configs", "bad"], path)
    with pytest.raises(ConfigError, match=r"block 'flat' sets 'env.mine' to 3, but env.<suite> holds the keyword "
                                          r"arguments of that suite's constructor, a mapping"):
        load_config(["--configs", "flat"], path)


def test_the_defaults_inject_no_options_into_the_custom_suite():
    assert load_config([]).env.custom.to_dict() == {}
    assert load_config(["--configs", "custom", "debug"]).env.custom.to_dict() == {}


# --- --configs without a block name -----------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--configs", "--task", "custom_reach"], ["--task", "custom_reach", "--configs"], ["--configs="],
])
def test_configs_without_a_block_lists_the_blocks(capsys, tmp_path, argv):
    logdir = tmp_path / "run"
    rc = dreamer.main([*argv, "--logdir", str(logdir)] if argv[-1] != "--configs" else argv)
    blocks = ", ".join(n for n in config_lib.read_blocks() if n != "defaults")
    assert stopped_with_one_paragraph(capsys, rc, logdir) == (
        f"error: --configs needs one or more block names, e.g. --configs debug custom; the blocks of "
        f"configs.yaml are {blocks}. Name the blocks to merge, or leave out --configs to run on the "
        f"'defaults' block alone. The run did not start.")
