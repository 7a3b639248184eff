"""The run's configuration: read `configs.yaml`, merge the `--configs` blocks, apply `--key value`
overrides, validate once and freeze.

Nothing else reads `configs.yaml`. The result is a `Config`: a read-only nested mapping with attribute
access (`cfg.rssm.deter`, `cfg['rssm']['deter']`, `RSSM(**cfg.rssm)`), whose lists are tuples.
"""
from __future__ import annotations

import difflib
import io
import math
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

from ruamel.yaml import YAML

CONFIGS_PATH = Path(__file__).resolve().parent / "configs.yaml"
DEBUG_BLOCK = "debug"
DEFAULTS_BLOCK = "defaults"

# Keys whose value is one of a fixed set of strings (checked after merging).
CHOICES: dict[str, tuple[str, ...]] = {
    "precision": ("32", "16", "bf16"),
    "envs.parallel": ("process", "thread", "none"),
    "actor_dist": ("normal", "onehot"),
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
)
NON_NEGATIVE = ("prefill", "eval_every", "time_limit", "threads", "save_every_minutes", "reward_clip", "seed")
UNIT_INTERVAL = ("discount", "discount_lambda", "slow_target_fraction", "rssm.unimix", "actor.unimix")


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


def read_blocks(path: Path = CONFIGS_PATH) -> dict[str, dict[str, Any]]:
    """All blocks of configs.yaml as plain dicts, `defaults` first."""
    yaml = YAML(typ="rt")
    with open(path, encoding="utf-8") as f:
        raw = yaml.load(f)
    if not isinstance(raw, Mapping) or DEFAULTS_BLOCK not in raw:
        raise ConfigError(f"{path} must be a mapping of blocks with a '{DEFAULTS_BLOCK}' block.")
    return {name: _plain(block or {}) for name, block in raw.items()}


def key_comments(path: Path = CONFIGS_PATH) -> dict[str, str]:
    """The one-line comment of every key of `defaults` (dotted names for nested keys)."""
    comments: dict[str, str] = {}
    in_defaults = False
    for line in Path(path).read_text(encoding="utf-8").splitlines():
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
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean --{match[0]}?)" if match else ""


def merge_block(base: dict[str, Any], block: Mapping[str, Any], block_name: str, prefix: str = "") -> None:
    """Merge `block` into `base` in place, nested dicts key by key; a key `base` lacks is an error."""
    for key, value in block.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(
                f"configs.yaml block '{block_name}' sets '{dotted}', which is not a key of the "
                f"'{DEFAULTS_BLOCK}' block, so it would be silently ignored.{_closest(dotted, flat_keys(base))} "
                f"Fix the spelling in the block, or add the key with a default and a comment to "
                f"'{DEFAULTS_BLOCK}' if the program really reads it."
            )
        if isinstance(base[key], dict) and isinstance(value, Mapping):
            if not base[key]:  # an open dict (no fixed keys) takes whatever the block gives
                base[key] = dict(value)
            else:
                merge_block(base[key], value, block_name, dotted + ".")
        elif isinstance(base[key], dict):
            raise ConfigError(
                f"configs.yaml block '{block_name}' sets '{dotted}' to {value!r}, but in "
                f"'{DEFAULTS_BLOCK}' it is a group of keys ({', '.join(base[key])}); set them one by one, "
                f"e.g. '{dotted}: {{{next(iter(base[key]))}: ...}}'."
            )
        else:
            base[key] = value


def order_blocks(names: list[str]) -> tuple[list[str], bool]:
    """The merge order: as given, but `debug` moved last. Returns (order, moved)."""
    rest = [n for n in names if n != DEBUG_BLOCK]
    if DEBUG_BLOCK in names:
        order = rest + [DEBUG_BLOCK]
        return order, order != names
    return rest, False


# --------------------------------------------------------------------------------------- overrides


def parse_argv(argv: list[str]) -> tuple[list[str], list[tuple[str, str]], bool]:
    """Split argv into (block names, [(key, raw value)], help asked)."""
    blocks: list[str] = []
    overrides: list[tuple[str, str]] = []
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
            blocks.extend(v for part in values for v in part.split(",") if v)
            continue
        if not eq:
            if index + 1 >= len(argv) or (argv[index + 1].startswith("--") and not _is_number(argv[index + 1])):
                raise ConfigError(f"--{key} needs a value, e.g. --{key} VALUE or --{key}=VALUE.")
            value = argv[index + 1]
            index += 1
        overrides.append((key, value))
        index += 1
    return blocks, overrides, False


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _type_error(key: str, expected: str, raw: str) -> ConfigError:
    return ConfigError(f"--{key} expects {expected}, but got '{raw}'. Example: --{key} {_EXAMPLES[expected]}.")


_EXAMPLES = {
    "a boolean (true/false/True/False/1/0)": "True",
    "an integer (1e6 is accepted)": "1000",
    "a number": "3e-4",
    "a comma-separated list": "64,64",
    "a string": "value",
}


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
        raise _type_error(key, "a boolean (true/false/True/False/1/0)", raw)
    if isinstance(default, int):
        try:
            number = float(raw)
        except ValueError:
            raise _type_error(key, "an integer (1e6 is accepted)", raw) from None
        if not math.isfinite(number) or number != int(number):
            raise _type_error(key, "an integer (1e6 is accepted)", raw)
        return int(number)
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise _type_error(key, "a number", raw) from None
    if isinstance(default, list):
        items = [item.strip() for item in raw.strip("[]()").split(",") if item.strip()]
        element = default[0] if default else ""
        try:
            return [parse_value(key, item, element) for item in items]
        except ConfigError:
            raise _type_error(key, "a comma-separated list", raw) from None
    if isinstance(default, dict):
        raise ConfigError(
            f"--{key} is a group of keys ({', '.join(default)}); override them one by one with dotted "
            f"names, e.g. --{key}.{next(iter(default))} VALUE."
        )
    return raw


def apply_override(tree: dict[str, Any], key: str, raw: str) -> None:
    """Set dotted `key` in `tree` from the command-line string `raw`."""
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(
                f"unknown option --{key}: it is not a key of configs.yaml.{_closest(key, flat_keys(tree))} "
                f"Run 'python3 dreamer.py --help' for the list of keys."
            )
        if depth < len(parts) - 1:
            node = node[part]
    node[parts[-1]] = parse_value(key, raw, node[parts[-1]])


# -------------------------------------------------------------------------------------- validation


def _check_types(tree: Mapping[str, Any], defaults: Mapping[str, Any], source: str, prefix: str = "") -> None:
    """Block values must have the default's type (ints may stand for floats)."""
    for key, value in tree.items():
        dotted, default = f"{prefix}{key}", defaults.get(key)
        if isinstance(default, dict) and isinstance(value, Mapping) and default:
            _check_types(value, default, source, dotted + ".")
            continue
        if default is None or value is None or isinstance(default, dict):
            continue
        ok = (
            isinstance(value, bool) if isinstance(default, bool)
            else isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float)
            else isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int)
            else isinstance(value, type(default))
        )
        if dotted == "precision":
            ok = True  # 32, 16 or bf16: checked as a choice
        if not ok:
            raise ConfigError(
                f"{source} sets '{dotted}' to {value!r} ({type(value).__name__}), but it must be a "
                f"{type(default).__name__} like its default {default!r}. Fix the value."
            )


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
            raise ConfigError(f"--{key} must be greater than 0, but it is {lookup(tree, key)}.")
    for key in NON_NEGATIVE:
        if lookup(tree, key) is not None and lookup(tree, key) < 0:
            raise ConfigError(f"--{key} must be 0 or greater, but it is {lookup(tree, key)}.")
    for key in UNIT_INTERVAL:
        value = lookup(tree, key)
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"--{key} must lie in [0, 1], but it is {value}.")
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

    def __init__(self, blocks: list[str], debug_moved: bool):
        self.blocks = blocks
        self.debug_moved = debug_moved


def build_config(argv: list[str], path: Path = CONFIGS_PATH) -> tuple[Config, LoadedConfig]:
    """Merge defaults, blocks and overrides from `argv`; validate; freeze."""
    blocks_available = read_blocks(path)
    names, overrides, _ = parse_argv(argv)
    for name in names:
        if name not in blocks_available or name == DEFAULTS_BLOCK:
            options = ", ".join(n for n in blocks_available if n != DEFAULTS_BLOCK)
            raise ConfigError(
                f"unknown config block '{name}' in --configs. Available blocks: {options}. "
                f"Blocks are defined in configs.yaml."
            )
    order, moved = order_blocks(names)
    tree = blocks_available[DEFAULTS_BLOCK]
    defaults_copy = read_blocks(path)[DEFAULTS_BLOCK]
    for name in order:
        merge_block(tree, blocks_available[name], name)
        _check_types(blocks_available[name], defaults_copy, f"configs.yaml block '{name}'")
    for key, raw in overrides:
        apply_override(tree, key, raw)
    return Config(validate(tree)), LoadedConfig(order, moved)


def load_config(argv: list[str], path: Path = CONFIGS_PATH) -> Config:
    """The frozen config for command-line arguments `argv` (without the program name)."""
    return build_config(argv, path)[0]


def to_yaml(config: Config) -> str:
    """The config as YAML text (what `config.yaml` in the logdir holds)."""
    yaml = YAML(typ="safe")
    yaml.default_flow_style = None
    stream = io.StringIO()
    yaml.dump(config.to_dict(), stream)
    return stream.getvalue()


def help_text(path: Path = CONFIGS_PATH) -> str:
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
