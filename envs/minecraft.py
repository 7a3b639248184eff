"""Minecraft on MineRL 0.4.4 (`minecraft_diamond`, `minecraft_wood`, `minecraft_climb`).

Follows the paper's code (danijar/dreamerv3 v1: `embodied/envs/minecraft.py`, `minecraft_base.py`,
`minecraft_minerl.py`):
- a flat categorical action space of 25 actions (`DIAMOND_ACTIONS`: 12 movement/camera/attack/place
  actions plus 13 abstract crafting, placing, equipping and smelting actions of MineRL, in v1's order);
- observations: 64x64x3 first-person `image`, `inventory` counts, `inventory_max` (running maximum of
  the counts since the episode began), one-hot `equipped` main-hand item, and `health`, `hunger`,
  `breath` scaled to [0, 1] (vectors of shape (1,) here, scalars in v1); `log_<item>` counts for log,
  cobblestone, iron_ingot and diamond are for logging only;
- reward +1 the first time in an episode each of 12 milestone items is obtained (`DIAMOND_MILESTONES`),
  plus 0.01 times the change of the `health` observation (life / 20): -0.001 per lost heart of 2 life
  points, +0.001 per restored one;
- sticky jump: a jump action keeps jump (and forward) pressed for 10 steps; sticky attack: with
  `break_speed` 1.0 only, an attack action keeps attack pressed (and jump released) for 30 steps;
  camera pitch stays within [-60, 60] degrees (a turn beyond it is dropped);
- episodes end when MineRL says done (`terminated`, as v1 counts every MineRL end as terminal) or after
  36000 steps (`truncated`); a MineRL step that reports an error ends the episode as `truncated` with
  the last good observation (v1 resets the game there too); `break_speed` multiplies block breaking
  speed;
- before the game starts, Minecraft's options.txt gets v1's settings (`GAME_OPTIONS`: normal
  difficulty, render distance 6, gamma 5, no FOV effects, minimal ambient occlusion).
`minecraft_wood` rewards +1 per log collected (and the health term) with the 12 basic actions;
`minecraft_climb` rewards height gained (and the health term).

MineRL is imported lazily; everything except `make_minerl_env` is plain Python and is tested on
dicts shaped like MineRL observations.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Any

import gymnasium
import numpy as np
from .checker import EnvCheckError, MissingDependency

INSTALL_MESSAGE = (
    "Minecraft tasks need MineRL 0.4.4, which is not installed (or failed to import: {error}). "
    "MineRL needs a Java 8 JDK and builds Minecraft on install: `apt-get install -y openjdk-8-jdk` then "
    "`pip install minerl==0.4.4`, in a separate Python environment (MineRL 0.4.4 requires gym<0.20 "
    "and numpy<1.24; memory-maze requires gym==0.26.2). break_speed other than 1.0 needs a MineRL build "
    "whose Malmo understands the <BreakSpeedMultiplier> agent-start handler; with stock MineRL pass "
    "--env.minecraft.break_speed 1.0.")

EPISODE_LENGTH = 36000          # steps: 30 minutes at 20 Hz
STICKY_JUMP_STEPS = 10          # steps a jump action keeps jump and forward pressed (v1 sticky_jump)
STICKY_ATTACK_STEPS = 30        # steps an attack action keeps attack pressed (v1 sticky_attack) ...
STICKY_ATTACK_BREAK_SPEED = 1.0  # ... used only at this break_speed (v1 turns it off otherwise)
PITCH_LIMIT = (-60.0, 60.0)     # degrees; camera pitch changes beyond this are dropped
CAMERA_STEP = 15.0              # degrees per turn action
HEALTH_REWARD_SCALE = 0.01      # reward per unit change of the `health` observation (life / MAX_LIFE)
MAX_LIFE, MAX_FOOD, MAX_AIR = 20.0, 20.0, 300.0
LOGGED_ITEMS = ('log', 'cobblestone', 'iron_ingot', 'diamond')
# Minecraft client settings v1 writes into MineRL's options.txt before the game starts.
GAME_OPTIONS = {'difficulty': '2', 'renderDistance': '6', 'simulationDistance': '6',
                'fovEffectScale': '0.0', 'ao': '1', 'gamma': '5.0'}

NOOP_ACTION: dict[str, Any] = {
    'camera': (0.0, 0.0), 'forward': 0, 'back': 0, 'left': 0, 'right': 0, 'jump': 0, 'sneak': 0,
    'attack': 0, 'place': 'none', 'equip': 'none', 'craft': 'none',
    'nearbyCraft': 'none', 'nearbySmelt': 'none'}

BASIC_ACTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ('noop', {}),
    ('attack', {'attack': 1}),
    ('turn_up', {'camera': (-CAMERA_STEP, 0.0)}),
    ('turn_down', {'camera': (CAMERA_STEP, 0.0)}),
    ('turn_left', {'camera': (0.0, -CAMERA_STEP)}),
    ('turn_right', {'camera': (0.0, CAMERA_STEP)}),
    ('forward', {'forward': 1}),
    ('back', {'back': 1}),
    ('left', {'left': 1}),
    ('right', {'right': 1}),
    ('jump', {'jump': 1, 'forward': 1}),
    ('place_dirt', {'place': 'dirt'}),
)

DIAMOND_ACTIONS = BASIC_ACTIONS + (
    ('craft_planks', {'craft': 'planks'}),
    ('craft_stick', {'craft': 'stick'}),
    ('craft_crafting_table', {'craft': 'crafting_table'}),
    ('place_crafting_table', {'place': 'crafting_table'}),
    ('craft_wooden_pickaxe', {'nearbyCraft': 'wooden_pickaxe'}),
    ('craft_stone_pickaxe', {'nearbyCraft': 'stone_pickaxe'}),
    ('craft_iron_pickaxe', {'nearbyCraft': 'iron_pickaxe'}),
    ('equip_stone_pickaxe', {'equip': 'stone_pickaxe'}),
    ('equip_wooden_pickaxe', {'equip': 'wooden_pickaxe'}),
    ('equip_iron_pickaxe', {'equip': 'iron_pickaxe'}),
    ('craft_furnace', {'nearbyCraft': 'furnace'}),
    ('place_furnace', {'place': 'furnace'}),
    ('smelt_iron_ingot', {'nearbySmelt': 'iron_ingot'}),
)

DIAMOND_MILESTONES = (
    'log', 'planks', 'stick', 'crafting_table', 'wooden_pickaxe', 'cobblestone', 'stone_pickaxe',
    'iron_ore', 'furnace', 'iron_ingot', 'iron_pickaxe', 'diamond')

TASK_ACTIONS = {'diamond': DIAMOND_ACTIONS, 'wood': BASIC_ACTIONS, 'climb': BASIC_ACTIONS}


class ActionMapper:
    """Categorical index -> full MineRL action dict, with v1's sticky attack / jump and pitch limit.

    `sticky_attack` (0 = off) and `sticky_jump` are the number of steps, counting the one that pressed
    the key, for which an attack / jump action stays pressed; while attack is held, jump is released
    (an attack hold then a jump hold can still press jump again). `pitch_limit` None: no limit.
    """

    def __init__(self, actions: tuple[tuple[str, dict[str, Any]], ...], sticky_attack: int = 0,
                 sticky_jump: int = STICKY_JUMP_STEPS,
                 pitch_limit: tuple[float, float] | None = PITCH_LIMIT):
        self.names = tuple(name for name, _ in actions)
        self._actions = tuple({**NOOP_ACTION, **partial} for _, partial in actions)
        self._sticky_attack, self._sticky_jump = int(sticky_attack), int(sticky_jump)
        self._pitch_limit = pitch_limit
        self._attack_left = self._jump_left = 0
        self._pitch = 0.0

    def __len__(self) -> int:
        return len(self._actions)

    def reset(self) -> None:
        self._attack_left = self._jump_left = 0
        self._pitch = 0.0

    def __call__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self._actions):
            raise ValueError(f'Minecraft action must be an index in 0..{len(self._actions) - 1}; '
                             f'got {index}.')
        action = dict(self._actions[index])
        if self._sticky_attack:  # attack first: it releases jump, which a running jump hold re-presses
            if action['attack']:
                self._attack_left = self._sticky_attack
            if self._attack_left > 0:
                action['attack'], action['jump'] = 1, 0
                self._attack_left -= 1
        if self._sticky_jump:
            if action['jump']:
                self._jump_left = self._sticky_jump
            if self._jump_left > 0:
                action['jump'], action['forward'] = 1, 1
                self._jump_left -= 1
        pitch, yaw = action['camera']
        if self._pitch_limit and pitch:
            low, high = self._pitch_limit
            if not low <= self._pitch + pitch <= high:
                pitch = 0.0
            self._pitch += pitch
        action['camera'] = np.array([pitch, yaw], np.float32)
        return action


class ObservationConverter:
    """Nested MineRL observation dict -> flat observation of float32 vectors and the image."""

    def __init__(self, inventory_keys: list[str], equip_types: list[str]):
        self.inventory_keys = [key for key in inventory_keys if key != 'log2']  # log2 merges into log
        self.equip_types = list(equip_types)
        self._max_inventory: np.ndarray | None = None

    def reset(self) -> None:
        self._max_inventory = None

    def inventory(self, raw: dict[str, Any]) -> dict[str, int]:
        """Item counts with 'log2' (acacia, dark oak) added to 'log'."""
        counts = {key: int(raw['inventory'].get(key, 0)) for key in self.inventory_keys}
        if 'log' in counts:
            counts['log'] += int(raw['inventory'].get('log2', 0))
        return counts

    def __call__(self, raw: dict[str, Any]) -> dict[str, np.ndarray]:
        counts = self.inventory(raw)
        inventory = np.array([counts[key] for key in self.inventory_keys], np.float32)  # (items,)
        if self._max_inventory is None:
            self._max_inventory = inventory.copy()
        self._max_inventory = np.maximum(self._max_inventory, inventory)
        equipped = np.zeros(len(self.equip_types), np.float32)  # (types,) one-hot
        held = raw['equipped_items']['mainhand']['type']
        if held not in self.equip_types:
            held = 'other'
        if held in self.equip_types:
            equipped[self.equip_types.index(held)] = 1.0
        life = raw['life_stats']
        return {
            'image': np.asarray(raw['pov'], np.uint8),
            'inventory': inventory,
            'inventory_max': self._max_inventory.copy(),
            'equipped': equipped,
            'health': np.array([life['life'] / MAX_LIFE], np.float32),
            'hunger': np.array([life['food'] / MAX_FOOD], np.float32),
            'breath': np.array([life['air'] / MAX_AIR], np.float32),
            **{f'log_{item}': np.int64(counts.get(item, 0)) for item in LOGGED_ITEMS},
        }


class MilestoneReward:
    """+1 the first time in an episode each item's count becomes positive.

    Items already held at reset do not count.
    """

    def __init__(self, items: tuple[str, ...]):
        self.items = tuple(items)
        self._reached: set[str] = set()

    def reset(self, counts: dict[str, int]) -> None:
        self._reached = {item for item in self.items if counts.get(item, 0) > 0}

    def __call__(self, counts: dict[str, int]) -> float:
        new = {item for item in self.items if counts.get(item, 0) > 0} - self._reached
        self._reached |= new
        return float(len(new))


class CollectReward:
    """+1 per unit by which the item's count grew since the last step."""

    def __init__(self, item: str):
        self.item, self._previous = item, 0

    def reset(self, counts: dict[str, int]) -> None:
        self._previous = counts.get(self.item, 0)

    def __call__(self, counts: dict[str, int]) -> float:
        current = counts.get(self.item, 0)
        reward, self._previous = max(0, current - self._previous), current
        return float(reward)


def health_reward(previous_life: float, life: float) -> float:
    """0.01 times the change of the health observation (life / 20), in float32 like v1.

    A lost heart (2 life points) gives -0.001, a restored one +0.001.
    """
    health, previous = np.float32(life / MAX_LIFE), np.float32(previous_life / MAX_LIFE)
    return float(np.float32(HEALTH_REWARD_SCALE * (health - previous)))


class Minecraft:
    """One Minecraft task, e.g. Minecraft('diamond', size=(64, 64), break_speed=100.0, seed=0)."""

    def __init__(self, name: str, size: tuple[int, int] = (64, 64), break_speed: float = 100.0,
                 seed: int = 0, length: int = EPISODE_LENGTH):
        if name not in TASK_ACTIONS:
            raise EnvCheckError(f"Unknown Minecraft task 'minecraft_{name}': expected one of "
                             f"{', '.join('minecraft_' + task for task in TASK_ACTIONS)}, got {name!r}.")
        self._task, self._size, self._length = name, (int(size[0]), int(size[1])), int(length)
        self._env = self._make_backend(self._size, float(break_speed))
        self._env.seed(seed)
        spaces = self._env.observation_space
        self._convert = ObservationConverter(list(spaces['inventory'].spaces.keys()),
                                             list(spaces['equipped_items']['mainhand']['type'].values))
        sticky_attack = STICKY_ATTACK_STEPS if float(break_speed) == STICKY_ATTACK_BREAK_SPEED else 0
        self._mapper = ActionMapper(TASK_ACTIONS[name], sticky_attack=sticky_attack)
        self._milestones = MilestoneReward(DIAMOND_MILESTONES)
        self._logs = CollectReward('log')
        self._life = self._height = 0.0
        self._step = 0
        self._last_image = np.zeros(self._size + (3,), np.uint8)  # (H, W, 3)
        self._last_obs: dict[str, np.ndarray] | None = None

    def _make_backend(self, size: tuple[int, int], break_speed: float):
        """The MineRL gym env (old gym API: reset() -> obs, step() -> obs, reward, done, info)."""
        return make_minerl_env(size, break_speed)

    @property
    def action_names(self) -> tuple[str, ...]:
        return self._mapper.names

    @property
    def obs_space(self) -> dict[str, gymnasium.spaces.Box]:
        items, types = len(self._convert.inventory_keys), len(self._convert.equip_types)
        unit = gymnasium.spaces.Box(0.0, 1.0, (1,), np.float32)
        return {
            'image': gymnasium.spaces.Box(0, 255, self._size + (3,), np.uint8),
            'inventory': gymnasium.spaces.Box(0.0, np.inf, (items,), np.float32),
            'inventory_max': gymnasium.spaces.Box(0.0, np.inf, (items,), np.float32),
            'equipped': gymnasium.spaces.Box(0.0, 1.0, (types,), np.float32),
            'health': unit, 'hunger': unit, 'breath': unit,
        }

    @property
    def act_space(self) -> gymnasium.spaces.Discrete:
        return gymnasium.spaces.Discrete(len(self._mapper))

    def reset(self, seed: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
        if seed is not None:
            self._env.seed(seed)
        raw = self._env.reset()
        self._mapper.reset()
        self._convert.reset()
        counts = self._convert.inventory(raw)
        self._milestones.reset(counts)
        self._logs.reset(counts)
        self._life = float(raw['life_stats']['life'])
        self._height = float(raw.get('location_stats', {}).get('ypos', 0.0))
        self._step = 0
        self._last_image = np.asarray(raw['pov'], np.uint8)
        self._last_obs = self._convert(raw)
        return self._last_obs, {}

    def step(self, action) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        index = int(np.asarray(action).reshape(-1)[0]) if np.ndim(action) else int(action)
        raw, _, done, info = self._env.step(self._mapper(index))
        info = dict(info or {})
        self._step += 1
        if 'error' in info:  # v1 restarts the game here; the caller's reset() does that
            return dict(self._last_obs), 0.0, False, True, info
        reward = self._reward(raw)
        self._last_image = np.asarray(raw['pov'], np.uint8)
        self._last_obs = self._convert(raw)
        terminated = bool(done)  # v1 (from_gym.py): every MineRL end is terminal
        truncated = bool(not terminated and self._step >= self._length)
        return self._last_obs, reward, terminated, truncated, info

    def render(self, mode: str = 'rgb_array') -> np.ndarray:
        del mode
        return self._last_image

    def close(self) -> None:
        self._env.close()

    def _reward(self, raw: dict[str, Any]) -> float:
        counts = self._convert.inventory(raw)
        life = float(raw['life_stats']['life'])
        reward = health_reward(self._life, life)
        self._life = life
        if self._task == 'diamond':
            reward += self._milestones(counts)
        elif self._task == 'wood':
            reward += self._logs(counts)
        else:  # climb: height gained
            height = float(raw.get('location_stats', {}).get('ypos', self._height))
            reward += height - self._height
            self._height = height
        return float(reward)


def edit_game_options(text: str, options: dict[str, str] = GAME_OPTIONS) -> str:
    """Minecraft options.txt text with each `key:value` line of `options` set (appended if missing)."""
    lines = text.splitlines()
    for key, value in options.items():
        found = [i for i, line in enumerate(lines) if line.split(':', 1)[0] == key]
        for i in found:
            lines[i] = f'{key}:{value}'
        if not found:
            lines.append(f'{key}:{value}')
    return '\n'.join(lines) + '\n'


def apply_game_options(path: pathlib.Path, options: dict[str, str] = GAME_OPTIONS) -> None:
    """Write `options` into the options.txt at `path` (created if missing), atomically and only on change.

    Many env processes may start at once, so the file is replaced whole, never rewritten in place.
    """
    path = pathlib.Path(path)
    old = path.read_text() if path.exists() else ''
    new = edit_game_options(old, options)
    if new == old:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix='.options.', suffix='.txt')
    try:
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with os.fdopen(handle, 'w') as file:
            file.write(new)
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise


def make_minerl_env(size: tuple[int, int], break_speed: float):
    """A MineRL 0.4.4 env built from a custom herobraine EnvSpec with the paper's handlers."""
    try:
        import minerl
        from minerl.herobraine.env_spec import EnvSpec
        from minerl.herobraine.hero import handler, handlers, mc
    except ImportError as error:
        raise MissingDependency(INSTALL_MESSAGE.format(error=error)) from error
    apply_game_options(pathlib.Path(minerl.__file__).parent / 'Malmo' / 'Minecraft' / 'run' / 'options.txt')

    class BreakSpeed(handler.Handler):
        def to_string(self) -> str:
            return f'break_speed({break_speed})'

        def xml_template(self) -> str:
            return f'<BreakSpeedMultiplier>{break_speed}</BreakSpeedMultiplier>'

    items = ['none'] + list(mc.ALL_ITEMS)
    choice = {'_other': 'none', '_default': 'none'}

    class DiamondSpec(EnvSpec):
        def __init__(self):
            super().__init__(name='DreamerMinecraft-v0')

        def create_observables(self):
            width_height = (size[1], size[0])  # MineRL's video_resolution is (W, H); its frames (H, W, 3)
            return [handlers.POVObservation(width_height), handlers.FlatInventoryObservation(mc.ALL_ITEMS),
                    handlers.EquippedItemObservation(mc.ALL_ITEMS, _default='air', _other='other'),
                    handlers.ObservationFromCurrentLocation(), handlers.ObservationFromLifeStats()]

        def create_actionables(self):
            keys = [handlers.KeybasedCommandAction(key, mc.INVERSE_KEYMAP[key])
                    for key in ('forward', 'back', 'left', 'right', 'jump', 'sneak', 'attack')]
            return keys + [handlers.CameraAction(), handlers.PlaceBlock(items, **choice),
                           handlers.EquipAction(items, **choice), handlers.CraftAction(items, **choice),
                           handlers.CraftNearbyAction(items, **choice),
                           handlers.SmeltItemNearby(items, **choice)]

        def create_agent_start(self):
            return [BreakSpeed()] if break_speed != 1.0 else []

        def create_agent_handlers(self):
            return []

        def create_rewardables(self):
            return []

        def create_server_world_generators(self):
            return [handlers.DefaultWorldGenerator(force_reset=True)]

        def create_server_quit_producers(self):
            return [handlers.ServerQuitWhenAnyAgentFinishes()]

        def create_server_decorators(self):
            return []

        def create_server_initial_conditions(self):
            return [handlers.TimeInitialCondition(allow_passage_of_time=True, start_time=0),
                    handlers.SpawningInitialCondition(allow_spawning=True)]

        def create_mission_handlers(self):
            return []

        def create_monitors(self):
            return []

        def determine_success_from_rewards(self, rewards):
            return True

        def is_from_folder(self, folder: str) -> bool:
            return folder == 'none'

        def get_docstring(self) -> str:
            return 'DreamerV3 Minecraft Diamond environment.'

    return DiamondSpec().make()
