"""The run's configuration: read `configs.yaml`, merge the `--configs` blocks, apply `--key value`
overrides, validate once and freeze.

Nothing else reads `configs.yaml`. The result is a `Config`: a read-only nested mapping with attribute
access (`cfg.rssm.deter`, `cfg['rssm']['deter']`, `RSSM(**cfg.rssm)`), whose lists are tuples.
"""
from __future__ import annotations

import copy
import difflib
import io
import math
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.reader import ReaderError

CONFIGS_PATH = Path(__file__).resolve().parent / "configs.yaml"
DEBUG_BLOCK = "debug"
DEFAULTS_BLOCK = "defaults"
ENV_OPTIONS = "env"  # env.<suite>.<key>: keyword arguments of a suite's constructor, open to any suite and key

# Keys whose value is one of a fixed set of strings (checked after merging).
CHOICES: dict[str, tuple[str, ...]] = {
    "precision": ("32", "16", "bf16"),
    "envs.parallel": ("process", "thread", "none"),
    "actor_dist": ("auto", "normal", "onehot"),
    "behavior": ("greedy", "random", "plan2explore"),
    "env.atari.lives": ("unused", "discount", "reset"),
    "env.atari.resize": ("area", "pillow"),
    "env.atari.actions": ("needed", "all"),
}
# Keys that must be positive / non-negative numbers.
POSITIVE = (
    "graph_warmup",
    "steps", "train_ratio", "log_every", "eval_episode_num", "save_every", "batch_size",
    "batch_length", "replay_size", "replay_chunk", "imag_horizon", "parallel", "action_repeat",
    "envs.amount", "model_lr", "actor_lr", "critic_lr", "slow_target_update", "video_length",
    "rssm.deter", "rssm.hidden", "rssm.stoch", "rssm.classes",
    "model_eps", "ac_eps", "model_grad_clip", "ac_grad_clip", "plan2explore.lr", "return_norm.max", "actor.max_std",
    "encoder.cnn_depth", "decoder.cnn_depth", "encoder.min_res", "decoder.min_res", "encoder.mlp_units",
    "decoder.mlp_units", "reward_head.units", "cont_head.units", "actor.units", "critic.units", "plan2explore.units",
)
NON_NEGATIVE = ("prefill", "eval_every", "time_limit", "threads", "save_every_minutes", "reward_clip", "seed",
                "envs.max_restarts", "encoder.mlp_layers", "decoder.mlp_layers", "reward_head.layers",
                "cont_head.layers", "actor.layers", "critic.layers", "plan2explore.layers", "actor.min_std")
UNIT_INTERVAL = ("discount_lambda", "slow_target_fraction", "rssm.unimix", "actor.unimix", "return_norm.decay")
# Keys in (0, 1], and why 0 is out.
ABOVE_ZERO_TO_ONE = {"discount": "the imagined steps' weights divide by it; the paper's is 0.997"}
AT_LEAST_TWO = {  # key: why
    "reward_head.bins": "a two-hot target needs two bins; the paper's are 255",
    "critic.bins": "a two-hot target needs two bins; the paper's are 255",
    "plan2explore.ensemble": "the intrinsic reward is the members' disagreement; the paper's ensemble has 8",
}
# Why a key must be positive, where 0 or less would not fail at once but silently break training.
CLIP_WHY = ("0 would zero every gradient and a negative value reverse them; the paper clips at {}, and a large "
            "value such as 1e9 leaves the norm unclipped")
EPS_WHY = "Adam divides by sqrt(v) + eps, so 0 gives NaN wherever a gradient is 0; the paper's is {}"
POSITIVE_WHY = {
    "model_grad_clip": CLIP_WHY.format(1000), "ac_grad_clip": CLIP_WHY.format(100),
    "model_eps": EPS_WHY.format("1e-8"), "ac_eps": EPS_WHY.format("1e-5"),
    "return_norm.max": "the returns are divided by max(max, p95 - p5); the paper's is 1",
}


EXIT_USER_ERROR = 2  # exit status of a run stopped by an error the user fixes (config, env, checkpoint)


class ConfigError(ValueError):
    """A bad `--configs` block, key or value: the message says what and how to fix it."""


class Config(Mapping):
    """A frozen, nested view of the merged configuration."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]):
        object.__setattr__(self, "_data", {k: _freeze(v) for k, v in data.items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"config has no key '{name}'") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"config is frozen: cannot set '{name}'; derive a new named value instead")

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"

    def __reduce__(self):  # pickles as plain data (env worker processes receive the config)
        return (Config, (self.to_dict(),))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists (for YAML, checkpoints, logging)."""
        return {k: _thaw(v) for k, v in self._data.items()}

    def get_path(self, dotted: str) -> Any:
        """Value of a dotted key, e.g. 'rssm.deter'."""
        value: Any = self
        for part in dotted.split("."):
            value = value[part]
        return value


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return Config(value)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------- reading


def _plain(value: Any) -> Any:
    """ruamel's commented containers and scalars -> plain python values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value


def read_blocks(path: Path | None = None, notes: list[str] | None = None,
                key_lines: dict[str, dict[str, int]] | None = None) -> dict[str, dict[str, Any]]:
    """All blocks of configs.yaml as plain dicts, in file order.

    A YAML syntax error, a key set twice inside a block, or a block defined twice with other contents
    is a ConfigError naming the file and lines. A block defined twice with the same contents (the
    guide's `custom` block appended to a configs.yaml that ships it) keeps the first copy and adds one
    line saying so to `notes`. `key_lines` gets each block's {dotted key: line}.
    """
    path = CONFIGS_PATH if path is None else Path(path)
    text = path.read_text(encoding="utf-8")
    yaml = YAML(typ="rt")
    root = _compose(yaml, text, path)
    if not isinstance(root, MappingNode):
        raise ConfigError(f"{path} must be a mapping of blocks with a '{DEFAULTS_BLOCK}' block.")
    blocks: dict[str, dict[str, Any]] = {}
    first_lines: dict[str, int] = {}
    for key_node, value_node in root.value:
        name, line = str(key_node.value), key_node.start_mark.line + 1
        lines: dict[str, int] = {}
        _check_duplicate_keys(value_node, path, name, lines=lines)
        block = _plain(_construct(yaml, value_node, text, path))
        if block is None:
            block = {}
        if not isinstance(block, dict):
            raise ConfigError(
                f"{path}, line {line}: block '{name}' is {block!r}, but a block is a mapping of keys "
                f"(e.g. '{name}: {{batch_size: 16}}', or one 'key: value' per indented line). Fix the block."
            )
        if name in blocks:
            note = _same_block_twice(path, name, first_lines[name], line, blocks[name], block)
            if notes is not None:
                notes.append(note)
            continue
        blocks[name], first_lines[name] = block, line
        if key_lines is not None:
            key_lines[name] = lines
    if DEFAULTS_BLOCK not in blocks:
        raise ConfigError(f"{path} must be a mapping of blocks with a '{DEFAULTS_BLOCK}' block.")
    return blocks


def _compose(yaml: YAML, text: str, path: Path) -> Node | None:
    """The node tree of `text` (nothing constructed, so duplicate keys are still there to be found)."""
    try:
        return yaml.compose(text)
    except YAMLError as error:
        raise _syntax_error(error, text, path) from None


def _construct(yaml: YAML, node: Node, text: str, path: Path) -> Any:
    try:
        return yaml.constructor.construct_object(node, deep=True)
    except YAMLError as error:
        raise _syntax_error(error, text, path) from None


def _syntax_error(error: YAMLError, text: str, path: Path) -> ConfigError:
    """One paragraph for ruamel's error: file, line and column, its problem in its own words, and the
    line to fix (where ruamel's context starts when that is what it scanned, e.g. a key without ':')."""
    if isinstance(error, ReaderError):  # a character YAML does not allow (a control character)
        line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        code = error.character if isinstance(error.character, int) else ord(str(error.character)[:1] or " ")
        return ConfigError(
            f"{path}, line {line}, column {column}: not valid YAML: {error.reason} (character "
            f"U+{code:04X}). The run did not start: delete that character."
        )
    if not isinstance(error, MarkedYAMLError) or (error.problem_mark or error.context_mark) is None:
        what = " ".join(str(error).split())
        return ConfigError(f"{path} is not valid YAML: {what}. The run did not start: fix the file.")
    mark = error.problem_mark or error.context_mark
    line, column = mark.line + 1, mark.column + 1
    problem, context = error.problem or error.context, ""
    culprit = line
    if error.problem and error.context and error.context_mark is not None:
        context = f" ({error.context} at line {error.context_mark.line + 1})"
        if error.context.startswith(("while scanning", "while parsing a flow")):
            culprit = error.context_mark.line + 1  # the key without ':', the unclosed '{' or quote
    lines = text.splitlines()
    if error.problem == "mapping values are not allowed here":
        culprit = _key_without_colon_before(lines, culprit, column)
    source = lines[culprit - 1] if 0 < culprit <= len(lines) else ""
    hint = ("indent with spaces, not tabs" if "\t" in source else
            "every key needs a colon and a space ('batch_size: 16'), indents are spaces (never tabs), and "
            "every '{', '[' and quote must be closed")
    shown = f"line {culprit} reads '{source.strip()}': fix it" if source.strip() else f"fix line {culprit}"
    return ConfigError(
        f"{path}, line {line}, column {column}: not valid YAML: {problem}{context}. The run did not "
        f"start: {shown} ({hint})."
    )


def _key_without_colon_before(lines: list[str], line: int, column: int) -> int:
    """The line to blame for 'mapping values are not allowed here' at `line`, `column` (1-based):
    YAML reads a key line without ':' (e.g. 'batch_size 16') as the start of a plain scalar that the
    next lines of the same indent continue, and reports the colon of the next key. When the error
    is at that colon (the line's first), the first line of the run of lines without ':' just above,
    at the same indent, is the one to fix; otherwise `line` itself."""
    def indent(text: str) -> int:
        return len(text) - len(text.lstrip(" "))

    current = lines[line - 1] if 0 < line <= len(lines) else ""
    if ":" not in current or current.index(":") + 1 != column:
        return line
    blamed, index = line, line - 2  # 0-based index of the line above
    while index >= 0 and lines[index].strip() and ":" not in lines[index] \
            and indent(lines[index]) == indent(current) and not lines[index].lstrip().startswith(("#", "-")):
        blamed, index = index + 1, index - 1
    return blamed


def _check_duplicate_keys(node: Node, path: Path, block: str, prefix: str = "",
                          lines: dict[str, int] | None = None) -> None:
    """A key given twice in one mapping of a block: ConfigError naming the file, both lines and the key.
    `lines` gets the line of every dotted key, for the errors found later (a misspelt key, a bad value)."""
    if isinstance(node, SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, path, block, prefix, lines)
    if not isinstance(node, MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, ScalarNode) or key_node.value == "<<":  # merge keys are not keys
            continue
        key, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
        if key in seen:
            lines = f"on line {line}" if seen[key] == line else f"(line {seen[key]} and line {line})"
            raise ConfigError(
                f"{path}, line {line}: block '{block}' sets '{key}' twice {lines}, and only one value can "
                f"hold. Delete one of the two (keep the value you want); the run did not start."
            )
        seen[key] = line
        if lines is not None:
            lines[key] = line
        _check_duplicate_keys(value_node, path, block, key + ".", lines)


def _same_block_twice(path: Path, name: str, first: int, second: int, kept: dict, other: dict) -> str:
    """The note for a block defined twice with the same contents; a ConfigError if they differ."""
    if kept == other:
        return (f"note: {path} defines block '{name}' twice (line {first} and line {second}) with the "
                f"same contents; the second copy is ignored.")
    differences = _differences(kept, other)
    shown = "; ".join(differences[:3]) + ("; ..." if len(differences) > 3 else "")
    kept_names = {DEBUG_BLOCK: f"'{DEBUG_BLOCK}' is the one block applied after the others",
                  DEFAULTS_BLOCK: f"every other block is merged over '{DEFAULTS_BLOCK}'"}
    rename = (f" ({kept_names[name]}, so keep that name)" if name in kept_names else
              f", or give yours another name (e.g. '{name}_mine:' at line {second}) and pass it with "
              f"--configs {name}_mine")
    raise ConfigError(
        f"{path} defines block '{name}' twice, at line {first} and at line {second}, with different "
        f"contents ({shown}), and a block name can hold only one of them. Edit the first one (line {first}) "
        f"instead of adding a second{rename}. The run did not start."
    )


_UNSET = object()


def _differences(first: Mapping, second: Mapping, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two copies of a block, short values shown."""
    found: list[str] = []
    for key in list(first) + [k for k in second if k not in first]:
        a, b = first.get(key, _UNSET), second.get(key, _UNSET)
        if isinstance(a, dict) and isinstance(b, dict):
            found.extend(_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            found.append(f"'{prefix}{key}' {_shown(a)} vs {_shown(b)}")
    return found


def _shown(value: Any) -> str:
    text = "unset" if value is _UNSET else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def key_comments(path: Path | None = None) -> dict[str, str]:
    """The one-line comment of every key of `defaults` (dotted names for nested keys)."""
    comments: dict[str, str] = {}
    in_defaults = False
    for line in Path(CONFIGS_PATH if path is None else path).read_text(encoding="utf-8").splitlines():
        if re.match(r"^\S", line):
            in_defaults = line.startswith(f"{DEFAULTS_BLOCK}:")
            continue
        match = re.match(r"^  (\w+):(.*?)(?:\s+#\s*(.*))?$", line) if in_defaults else None
        if match and match.group(3):
            comments[match.group(1)] = match.group(3).strip()
    return comments


# ----------------------------------------------------------------------------------------- merging


def flat_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of every leaf key (dict-valued keys are descended, not listed)."""
    keys: list[str] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            keys.extend(flat_keys(value, name + "."))
        else:
            keys.append(name)
    return keys


def _closest(name: str, candidates: list[str]) -> str:
    """' (did you mean --rssm.deter?)' for a command-line option."""
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean --{match[0]}?)" if match else ""


def _closest_key(key: str, keys: list[str]) -> str:
    """" (did you mean 'deter'?)" for a key of a block, spelt there as it is, among its mapping's keys."""
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


class BlockKeyError(ConfigError):
    """A key of a configs.yaml block that is wrong (misspelt, of the wrong type): build_config puts the
    file and line of `key` in front of the message."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def is_suite_options(dotted: str) -> bool:
    """Whether `dotted` is `env.<suite>`: the keyword arguments of one suite's constructor."""
    parts = dotted.split(".")
    return len(parts) == 2 and parts[0] == ENV_OPTIONS


def is_open(dotted: str) -> bool:
    """Whether `dotted` lies under `env.<suite>`, where every key is open (any suite, any option)."""
    parts = dotted.split(".")
    return len(parts) >= 3 and parts[0] == ENV_OPTIONS


def merge_block(base: dict[str, Any], block: Mapping[str, Any], block_name: str, prefix: str = "") -> None:
    """Merge `block` into `base` in place, nested dicts key by key; a key `base` lacks is an error,
    except under `env.<suite>` (a suite's constructor options, any suite's, any key)."""
    for key, value in block.items():
        dotted = f"{prefix}{key}"
        if key not in base and is_suite_options(dotted) and isinstance(value, Mapping):
            base[key] = {}  # a suite the defaults give no options, e.g. the user's own
        if key not in base and not is_open(dotted):
            raise _unknown_block_key(base, block_name, dotted, value)
        if isinstance(base.get(key), dict) and isinstance(value, Mapping):
            merge_block(base[key], value, block_name, dotted + ".")
        elif isinstance(base.get(key), dict) and not is_open(dotted):
            example = next(iter(base[key]), "KEY")
            listed = f" ({', '.join(base[key])})" if base[key] else ""
            raise BlockKeyError(
                f"block '{block_name}' sets '{dotted}' to {value!r}, but in "
                f"'{DEFAULTS_BLOCK}' it is a group of keys{listed}; set them one by one, "
                f"e.g. '{dotted}: {{{example}: ...}}'.", dotted)
        else:
            base[key] = copy.deepcopy(value)


def _unknown_block_key(base: dict[str, Any], block_name: str, dotted: str, value: Any) -> BlockKeyError:
    if is_suite_options(dotted):
        return BlockKeyError(
            f"block '{block_name}' sets '{dotted}' to {value!r}, but env.<suite> holds the "
            f"keyword arguments of that suite's constructor, a mapping: write e.g. "
            f"'env: {{{dotted.split('.')[1]}: {{size: [64, 64]}}}}'.", dotted)
    closest = _closest_key(dotted.rpartition(".")[2], list(base))
    return BlockKeyError(
        f"block '{block_name}' sets '{dotted}', which is not a key of the '{DEFAULTS_BLOCK}' block, so it "
        f"would be silently ignored.{closest} Fix the spelling in the block, or add the key with a default "
        f"and a comment to '{DEFAULTS_BLOCK}' if the program really reads it.", dotted)


def order_blocks(names: list[str]) -> tuple[list[str], bool]:
    """The merge order: as given, but `debug` moved last. Returns (order, moved)."""
    rest = [n for n in names if n != DEBUG_BLOCK]
    if DEBUG_BLOCK in names:
        order = rest + [DEBUG_BLOCK]
        return order, order != names
    return rest, False


# --------------------------------------------------------------------------------------- overrides


def parse_argv(argv: list[str], path: Path | None = None) -> tuple[list[str], list[tuple[str, str]], bool]:
    """Split argv into (block names, [(key, raw value)], help asked)."""
    blocks: list[str] = []
    overrides: list[tuple[str, str]] = []
    empty_configs = False
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in ("-h", "--help"):
            return blocks, overrides, True
        if not token.startswith("--") or token == "--":
            raise ConfigError(
                f"unexpected argument '{token}': arguments are '--configs BLOCK [BLOCK ...]' and "
                f"'--key value' (or '--key=value') pairs, e.g. --configs debug custom --task custom_reach."
            )
        key, eq, value = token[2:].partition("=")
        if key == "configs":
            index += 1
            values = [value] if eq else []
            while not eq and index < len(argv) and not argv[index].startswith("--"):
                values.append(argv[index])
                index += 1
            named = [v for part in values for v in part.split(",") if v]
            empty_configs = empty_configs or not named
            blocks.extend(named)
            continue
        if not eq:
            if index + 1 >= len(argv) or argv[index + 1].startswith("--"):  # '-3' is a value, '--x' is not
                raise ConfigError(f"--{key} needs a value, e.g. --{key} VALUE or --{key}=VALUE.")
            value = argv[index + 1]
            index += 1
        overrides.append((key, value))
        index += 1
    if empty_configs:
        raise _no_block_named(path)
    return blocks, overrides, False


def _no_block_named(path: Path | None) -> ConfigError:
    names = ", ".join(n for n in read_blocks(path) if n != DEFAULTS_BLOCK)
    return ConfigError(
        f"--configs needs one or more block names, e.g. --configs debug custom; the blocks of "
        f"configs.yaml are {names}. Name the blocks to merge, or leave out --configs to run on the "
        f"'{DEFAULTS_BLOCK}' block alone. The run did not start."
    )


def _type_error(key: str, expected: str, raw: str) -> ConfigError:
    return ConfigError(f"--{key} expects {expected}, but got '{raw}'. Example: --{key} {_EXAMPLES[expected]}.")


_EXAMPLES = {
    "a boolean (true/false/True/False/yes/no/1/0)": "True",
    "an integer (1e6 is accepted)": "1000",
    "a number": "3e-4",
    "a comma-separated list": "64,64",
    "a string": "value",
}


# Integers are read through a float (1e6 is accepted), which holds every integer exactly up to 2^53.
LARGEST_INTEGER = 2 ** 53


def too_large_message(where: str, raw: Any) -> str:
    return (f"{where} is {raw}, beyond the largest integer a setting takes (2^53 = {LARGEST_INTEGER:,}). "
            "Give a realistic value (the paper's sizes and budgets are all below 1e9).")


def not_finite_message(where: str, raw: Any) -> str:
    return (f"{where} is {raw}, but every number setting must be finite: nan and inf only break training "
            "(a learning rate or scale of inf turns the weights into NaN at the first update). Give a finite "
            "value, e.g. 1e9 for a gradient clip that never bites.")


def parse_value(key: str, raw: str, default: Any) -> Any:
    """Convert a command-line string to the type of the key's default."""
    if key in CHOICES:
        return raw
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise _type_error(key, "a boolean (true/false/True/False/yes/no/1/0)", raw)
    if isinstance(default, int):
        try:
            number = float(raw)
        except ValueError:
            raise _type_error(key, "an integer (1e6 is accepted)", raw) from None
        if not math.isfinite(number) or number != int(number):
            raise _type_error(key, "an integer (1e6 is accepted)", raw)
        if abs(number) > LARGEST_INTEGER:
            raise ConfigError(too_large_message(f"--{key}", raw))
        return int(number)
    if isinstance(default, float):
        try:
            number = float(raw)
        except ValueError:
            raise _type_error(key, "a number", raw) from None
        if not math.isfinite(number):
            raise ConfigError(not_finite_message(f"--{key}", raw))
        return number
    if isinstance(default, list):
        items = [item.strip() for item in raw.strip("[]()").split(",") if item.strip()]
        element = default[0] if default else ""
        try:
            return [parse_value(key, item, element) for item in items]
        except ConfigError:
            raise _type_error(key, "a comma-separated list", raw) from None
    if isinstance(default, dict):
        raise _group_error(key, default)
    return raw


def _group_error(key: str, group: Mapping[str, Any]) -> ConfigError:
    if is_suite_options(key):
        return ConfigError(
            f"--{key} holds the keyword arguments of the {key.split('.')[1]} suite's constructor; set "
            f"them one by one with dotted names, e.g. --{key}.{next(iter(group), 'size')} VALUE."
        )
    return ConfigError(
        f"--{key} is a group of keys ({', '.join(group)}); override them one by one with dotted "
        f"names, e.g. --{key}.{next(iter(group), 'KEY')} VALUE."
    )


def parse_open_value(raw: str) -> Any:
    """A value for a key without a default (an option of a suite's constructor), read as YAML:
    '1' -> 1, '0.5' -> 0.5, 'true' -> True, 'null' -> None, 'abc' -> 'abc'; '128,128' or
    '[128, 128]' -> [128, 128]."""
    text = raw.strip()
    if "," in text or (text[:1], text[-1:]) in (("[", "]"), ("(", ")")):
        return [_yaml_scalar(item.strip()) for item in text.strip("[]()").split(",") if item.strip()]
    return _yaml_scalar(raw)


def _yaml_scalar(text: str) -> Any:
    """`text` as a YAML scalar (bool, int, float, null), else the string itself."""
    if not text.strip():
        return text
    try:
        value = YAML(typ="safe").load(text)
    except YAMLError:
        return text
    if value is None and text.strip() not in ("null", "Null", "NULL", "~"):
        return text  # e.g. '#red' (a YAML comment)
    return value if value is None or isinstance(value, (bool, int, float, str)) else text


def apply_override(tree: dict[str, Any], key: str, raw: str, defaults: Mapping[str, Any] | None = None) -> None:
    """Set dotted `key` in `tree` from the command-line string `raw`, typed by the key's value in
    `defaults` (default: `tree`). Under `env.<suite>` every suite and key is accepted; a key there
    that `defaults` lacks is read by parse_open_value."""
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        dotted = ".".join(parts[: depth + 1])
        if isinstance(node, dict) and part not in node and (is_suite_options(dotted) or is_open(dotted)):
            node[part] = {}  # a suite (or a group of its options) that the defaults do not name
        if not isinstance(node, dict) or part not in node:
            raise _unknown_option(tree, key)
        node = node[part]
    last = parts[-1]
    if isinstance(node, dict) and is_open(key):
        default = lookup(tree if defaults is None else defaults, key, _UNSET)
        node[last] = parse_open_value(raw) if default is _UNSET else parse_value(key, raw, default)
        return
    if not isinstance(node, dict) or last not in node:
        if is_suite_options(key):
            raise _group_error(key, {})
        raise _unknown_option(tree, key)
    node[last] = parse_value(key, raw, node[last])


def _unknown_option(tree: dict[str, Any], key: str) -> ConfigError:
    return ConfigError(
        f"unknown option --{key}: it is not a key of configs.yaml.{_closest(key, flat_keys(tree))} "
        f"Run 'python3 dreamer.py --help' for the list of keys."
    )


# -------------------------------------------------------------------------------------- validation


TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}


def _check_types(tree: Mapping[str, Any], defaults: Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Block values must have the default's type (ints may stand for floats)."""
    for key, value in tree.items():
        dotted, default = f"{prefix}{key}", defaults.get(key)
        if isinstance(default, dict) and isinstance(value, Mapping):
            _check_types(value, default, source, dotted + ".")
            continue
        if default is None or isinstance(default, dict):
            continue
        if value is None:
            raise BlockKeyError(f"{source} gives '{dotted}' no value (a key written with nothing after its colon, "
                                f"or null), but it must be {_type_name(default)} like its default {default!r}. "
                                "Give it a value, or delete the line to keep the default.", dotted)
        if isinstance(value, float) and isinstance(default, float) and not math.isfinite(value):
            raise BlockKeyError(not_finite_message(f"{source} sets '{dotted}', which", value), dotted)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > LARGEST_INTEGER:
            raise BlockKeyError(too_large_message(f"{source} sets '{dotted}', which", value), dotted)
        ok = (
            isinstance(value, bool) if isinstance(default, bool)
            else isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float)
            else isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int)
            else isinstance(value, type(default))
        )
        if dotted == "precision":
            ok = True  # 32, 16 or bf16: checked as a choice
        if not ok:
            raise BlockKeyError(f"{source} sets '{dotted}' to {value!r} ({type(value).__name__}), but it must "
                                f"be {_type_name(default)} like its default {default!r}. Fix the value.", dotted)


def _type_name(default: Any) -> str:
    return TYPE_NAMES.get(type(default), type(default).__name__)


def validate(tree: dict[str, Any]) -> dict[str, Any]:
    """Check choices and ranges; normalise choice values to strings and floats to float."""
    tree["precision"] = str(tree["precision"])
    for key, allowed in CHOICES.items():
        value = lookup(tree, key)
        if value is not None and str(value) not in allowed:
            raise ConfigError(
                f"--{key} is '{value}', which is not one of {', '.join(allowed)}. Pick one of those."
            )
    for key in POSITIVE:
        if lookup(tree, key) is not None and not lookup(tree, key) > 0:
            why = f" ({POSITIVE_WHY[key]})" if key in POSITIVE_WHY else ""
            raise ConfigError(f"--{key} must be greater than 0, but it is {lookup(tree, key)}{why}.")
    for key, why in AT_LEAST_TWO.items():
        if lookup(tree, key) is not None and lookup(tree, key) < 2:
            raise ConfigError(f"--{key} must be at least 2, but it is {lookup(tree, key)} ({why}).")
    for key in NON_NEGATIVE:
        if lookup(tree, key) is not None and lookup(tree, key) < 0:
            raise ConfigError(f"--{key} must be 0 or greater, but it is {lookup(tree, key)}.")
    for key in UNIT_INTERVAL:
        value = lookup(tree, key)
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"--{key} must lie in [0, 1], but it is {value}.")
    for key, why in ABOVE_ZERO_TO_ONE.items():
        value = lookup(tree, key)
        if value is not None and not 0 < value <= 1:
            raise ConfigError(f"--{key} must lie in (0, 1], but it is {value} ({why}).")
    check_related_values(tree)
    if "_" not in tree["task"]:
        raise ConfigError(
            f"--task '{tree['task']}' must be <suite>_<name>, e.g. dmc_walker_walk, atari_pong, "
            f"custom_reach or gym_CartPole-v1."
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", tree["device"]):
        raise ConfigError(f"--device '{tree['device']}' must be auto, cpu, cuda or cuda:N.")
    for side in ("encoder", "decoder"):
        for kind in ("mlp_keys", "cnn_keys"):
            try:
                re.compile(tree[side][kind])
            except re.error as err:
                raise ConfigError(
                    f"--{side}.{kind} '{tree[side][kind]}' is not a valid regular expression ({err}). "
                    f"Use e.g. 'image', '.*' (all keys) or '$^' (no key)."
                ) from None
    if tree["eval_only"] and not tree["from_checkpoint"]:
        raise ConfigError("--eval_only True needs --from_checkpoint PATH (the agent to evaluate).")
    return tree


def check_related_values(tree: dict[str, Any]) -> None:
    """Values that are fine alone but not together, or need more than a sign: the conv kernels,
    the return percentiles, the actor's std range and the reward scale."""
    for side in ("encoder", "decoder"):
        kernel = lookup(tree, f"{side}.kernel")
        if kernel is not None and (kernel < 2 or kernel % 2):
            raise ConfigError(f"--{side}.kernel must be an even number of at least 2, but it is {kernel}: its "
                              "stride-2 convolutions halve (and the decoder's double) the image exactly only with "
                              "even kernels; the paper's is 4.")
    low, high = lookup(tree, "return_norm.low"), lookup(tree, "return_norm.high")
    if low is not None and high is not None and not 0 <= low < high <= 100:
        raise ConfigError(f"--return_norm.low and --return_norm.high are percentiles with 0 <= low < high <= 100, "
                          f"but they are {low} and {high} (the paper's are 5 and 95).")
    low, high = lookup(tree, "actor.min_std"), lookup(tree, "actor.max_std")
    if low is not None and high is not None and low > high:
        raise ConfigError(f"--actor.min_std ({low}) must not exceed --actor.max_std ({high}) (the paper's are 0.1 "
                          "and 1).")
    if lookup(tree, "reward_scale") == 0:
        raise ConfigError("--reward_scale must not be 0: it multiplies every reward, so the model would learn "
                          "from none (1 keeps them; below 1 shrinks large rewards, above 1 grows tiny ones).")


def lookup(tree: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """tree['a']['b'] for 'a.b', or `default` when any part is absent."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


# -------------------------------------------------------------------------------------------- entry


class LoadedConfig:
    """What load_config produced besides the config itself (for the start-up message)."""

    def __init__(self, blocks: list[str], debug_moved: bool, notes: list[str] | None = None):
        self.blocks = blocks
        self.debug_moved = debug_moved
        self.notes = notes or []  # one line each for the user (e.g. a block defined twice)


def build_config(argv: list[str], path: Path | None = None) -> tuple[Config, LoadedConfig]:
    """Merge defaults, blocks and overrides from `argv`; validate; freeze. Notes on configs.yaml
    (a block defined twice with the same contents) go to LoadedConfig.notes, one line each."""
    notes: list[str] = []
    key_lines: dict[str, dict[str, int]] = {}
    blocks_available = read_blocks(path, notes, key_lines)
    names, overrides, _ = parse_argv(argv, path)
    for name in names:
        if name not in blocks_available or name == DEFAULTS_BLOCK:
            options = ", ".join(n for n in blocks_available if n != DEFAULTS_BLOCK)
            raise ConfigError(
                f"unknown config block '{name}' in --configs. Available blocks: {options}. "
                f"Blocks are defined in configs.yaml."
            )
    order, moved = order_blocks(names)
    defaults_copy = copy.deepcopy(blocks_available[DEFAULTS_BLOCK])
    tree = blocks_available[DEFAULTS_BLOCK]
    for name in order:
        try:
            merge_block(tree, blocks_available[name], name)
            _check_types(blocks_available[name], defaults_copy, f"block '{name}'")
        except BlockKeyError as error:
            line = key_lines.get(name, {}).get(error.key)
            where = f", line {line}" if line else ""
            raise ConfigError(f"{CONFIGS_PATH if path is None else path}{where}: {error}") from None
    for key, raw in overrides:
        apply_override(tree, key, raw, defaults_copy)
    return Config(validate(tree)), LoadedConfig(order, moved, notes)


def load_config(argv: list[str], path: Path | None = None) -> Config:
    """The frozen config for command-line arguments `argv` (without the program name)."""
    return build_config(argv, path)[0]


def to_yaml(config: Config) -> str:
    """The config as YAML text (what `config.yaml` in the logdir holds)."""
    yaml = YAML(typ="safe")
    yaml.default_flow_style = None
    yaml.width = 4096  # one line per nested block: a block broken mid-entry is hard to read
    stream = io.StringIO()
    yaml.dump(config.to_dict(), stream)
    return stream.getvalue()


def help_text(path: Path | None = None) -> str:
    """`dreamer.py --help`: usage, the blocks, and every key with its comment and default."""
    blocks = read_blocks(path)
    comments = key_comments(path)
    lines = [
        "usage: python3 dreamer.py [--configs BLOCK [BLOCK ...]] [--key value ...]",
        "",
        "Train DreamerV3. Blocks of configs.yaml are merged over 'defaults' in the order given (debug is",
        "always applied last); then every --key value overrides (dotted for nested keys: --rssm.deter 1024).",
        "",
        "blocks: " + ", ".join(n for n in blocks if n != DEFAULTS_BLOCK),
        "",
        "keys:",
    ]
    for key, value in blocks[DEFAULTS_BLOCK].items():
        shown = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else repr(value)
        lines.append(f"  --{key:<22} {comments.get(key, '')}")
        lines.append(f"  {'':<24} default: {shown}")
    return "\n".join(lines)
