"""Minecraft without the game: action mapping, observation conversion and rewards on MineRL-shaped dicts.

MineRL 0.4.4 cannot be installed here, so the real env is not run; `minerl_obs` builds observations
shaped like MineRL's (nested dicts: pov, inventory, equipped_items.mainhand.type, life_stats,
location_stats) and `ScriptedMineRL` replays them through the real `Minecraft` class.
"""
import numpy as np
import pytest

from envs.minecraft import (BASIC_ACTIONS, DIAMOND_ACTIONS, DIAMOND_MILESTONES, JUMP_HOLD_STEPS,
                            NOOP_ACTION, ActionMapper, CollectReward, MilestoneReward, Minecraft,
                            ObservationConverter, health_reward)

ITEMS = ['air', 'coal', 'cobblestone', 'crafting_table', 'diamond', 'dirt', 'furnace', 'iron_ingot',
         'iron_ore', 'iron_pickaxe', 'log', 'log2', 'planks', 'stick', 'stone', 'stone_pickaxe',
         'wooden_pickaxe']
EQUIP_TYPES = ['air', 'iron_pickaxe', 'stone_pickaxe', 'wooden_pickaxe', 'other']


def minerl_obs(life=20.0, food=20.0, air=300.0, held='air', ypos=64.0, **inventory):
    """One observation shaped like MineRL 0.4.4's for the paper's env spec."""
    counts = dict.fromkeys(ITEMS, 0)
    counts.update(inventory)
    return {
        'pov': np.full((64, 64, 3), 7, np.uint8),
        'inventory': {key: np.array(value) for key, value in counts.items()},
        'equipped_items': {'mainhand': {'type': held, 'damage': np.array(0), 'maxDamage': np.array(0)}},
        'life_stats': {'life': np.array(life), 'food': np.array(food), 'air': np.array(air)},
        'location_stats': {'xpos': np.array(0.0), 'ypos': np.array(ypos), 'zpos': np.array(0.0)},
    }


def test_action_sets_match_the_paper():
    assert len(DIAMOND_ACTIONS) == 25 and len(BASIC_ACTIONS) == 12
    names = ActionMapper(DIAMOND_ACTIONS).names
    assert names[:3] == ('noop', 'attack', 'turn_up') and names[-1] == 'smelt_iron_ingot'
    assert len(set(names)) == 25


def test_action_mapping_fills_every_minerl_key():
    mapper = ActionMapper(DIAMOND_ACTIONS)
    noop = mapper(0)
    assert set(noop) == set(NOOP_ACTION)
    np.testing.assert_array_equal(noop['camera'], [0.0, 0.0])
    planks = mapper(DIAMOND_ACTIONS.index(('craft_planks', {'craft': 'planks'})))
    assert planks['craft'] == 'planks' and planks['nearbyCraft'] == 'none' and planks['attack'] == 0
    pickaxe = mapper(mapper.names.index('craft_wooden_pickaxe'))
    assert pickaxe['nearbyCraft'] == 'wooden_pickaxe' and pickaxe['craft'] == 'none'
    assert mapper(mapper.names.index('smelt_iron_ingot'))['nearbySmelt'] == 'iron_ingot'
    assert mapper(mapper.names.index('equip_stone_pickaxe'))['equip'] == 'stone_pickaxe'
    assert mapper(mapper.names.index('place_furnace'))['place'] == 'furnace'
    np.testing.assert_array_equal(mapper(mapper.names.index('turn_left'))['camera'], [0.0, -15.0])
    with pytest.raises(ValueError, match=r'must be an index in 0..24; got 25'):
        mapper(25)


def test_jump_is_held_for_200ms():
    mapper = ActionMapper(BASIC_ACTIONS)
    jump, noop = mapper.names.index('jump'), mapper.names.index('noop')
    actions = [mapper(jump)] + [mapper(noop) for _ in range(5)]
    assert [a['jump'] for a in actions] == [1] * JUMP_HOLD_STEPS + [0] * (6 - JUMP_HOLD_STEPS)
    assert [a['forward'] for a in actions] == [1] * JUMP_HOLD_STEPS + [0] * (6 - JUMP_HOLD_STEPS)
    mapper.reset()
    assert mapper(noop)['jump'] == 0


def test_camera_pitch_is_limited():
    mapper = ActionMapper(BASIC_ACTIONS)
    up = mapper.names.index('turn_up')
    pitches = [float(mapper(up)['camera'][0]) for _ in range(6)]
    assert pitches == [-15.0] * 4 + [0.0, 0.0]  # stops at -60 degrees
    assert float(mapper(mapper.names.index('turn_down'))['camera'][0]) == 15.0


def test_observation_conversion():
    convert = ObservationConverter(ITEMS, EQUIP_TYPES)
    assert 'log2' not in convert.inventory_keys and len(convert.inventory_keys) == len(ITEMS) - 1
    raw = minerl_obs(life=10.0, food=5.0, air=150.0, held='wooden_pickaxe', log=2, log2=3, planks=4)
    obs = convert(raw)
    log = convert.inventory_keys.index('log')
    assert obs['inventory'].dtype == np.float32 and obs['inventory'].shape == (16,)
    assert obs['inventory'][log] == 5.0  # log2 (acacia, dark oak) counts as log
    assert obs['inventory'][convert.inventory_keys.index('planks')] == 4.0
    np.testing.assert_array_equal(obs['equipped'], [0, 0, 0, 1, 0])
    assert obs['health'].shape == (1,) and obs['health'][0] == pytest.approx(0.5)
    assert obs['hunger'][0] == pytest.approx(0.25) and obs['breath'][0] == pytest.approx(0.5)
    assert obs['image'].shape == (64, 64, 3) and obs['image'].dtype == np.uint8
    assert obs['log_log'] == 5 and obs['log_diamond'] == 0 and obs['log_cobblestone'] == 0
    later = convert(minerl_obs(held='unknown_sword', log=0, planks=8))
    assert later['inventory'][log] == 0.0 and later['inventory_max'][log] == 5.0  # running maximum
    assert later['inventory_max'][convert.inventory_keys.index('planks')] == 8.0
    np.testing.assert_array_equal(later['equipped'], [0, 0, 0, 0, 1])  # unknown item -> 'other'
    convert.reset()
    assert convert(minerl_obs())['inventory_max'][log] == 0.0


def test_milestones_are_rewarded_once_per_episode():
    milestones = MilestoneReward(DIAMOND_MILESTONES)
    milestones.reset({'dirt': 3})
    assert milestones({'log': 1}) == 1.0
    assert milestones({'log': 4}) == 0.0  # more logs: no second reward
    assert milestones({'log': 0, 'planks': 4, 'stick': 2}) == 2.0  # two milestones in one step
    assert milestones({'log': 1, 'planks': 0, 'stick': 0}) == 0.0  # lost and regained: still once
    assert milestones({'dirt': 9, 'coal': 1}) == 0.0  # not milestones
    milestones.reset({'log': 2})  # a new episode; items held at the start do not count
    assert milestones({'log': 3}) == 0.0 and milestones({'planks': 1}) == 1.0
    total = MilestoneReward(DIAMOND_MILESTONES)
    total.reset({})
    assert total(dict.fromkeys(DIAMOND_MILESTONES, 1)) == 12.0


def test_collect_and_health_rewards():
    logs = CollectReward('log')
    logs.reset({'log': 1})
    assert logs({'log': 3}) == 2.0 and logs({'log': 2}) == 0.0 and logs({'log': 3}) == 1.0
    assert health_reward(20.0, 18.0) == pytest.approx(-0.01)  # one heart lost
    assert health_reward(16.0, 20.0) == pytest.approx(0.02)   # two hearts restored


class Space:
    """Just enough of gym's Dict / Enum spaces for Minecraft.__init__."""

    def __init__(self, spaces=None, values=None):
        self.spaces, self.values = spaces, values

    def __getitem__(self, key):
        return self.spaces[key]


class ScriptedMineRL:
    """Replays MineRL-shaped observations (old gym API) and records the actions it was given."""

    def __init__(self, script):
        self.script, self.actions, self.seeds = list(script), [], []
        self.observation_space = Space({
            'inventory': Space(dict.fromkeys(ITEMS)),
            'equipped_items': Space({'mainhand': Space({'type': Space(values=np.array(EQUIP_TYPES))})}),
        })

    def seed(self, seed):
        self.seeds.append(seed)

    def reset(self):
        return minerl_obs()

    def step(self, action):
        self.actions.append(action)
        obs, done = self.script.pop(0)
        return obs, 0.0, done, {}

    def close(self):
        pass


def scripted_minecraft(script, name='diamond', **kwargs):
    class ScriptedMinecraft(Minecraft):
        def _make_backend(self, size, break_speed):
            return ScriptedMineRL(script)
    return ScriptedMinecraft(name, seed=4, **kwargs)


def test_diamond_episode_rewards_and_death():
    script = [
        (minerl_obs(log=1), False),                         # +1 log
        (minerl_obs(log=3, life=18.0), False),              # -0.01: one heart lost
        (minerl_obs(log=2, planks=4, stick=1, life=18.0), False),  # +2 planks, stick
        (minerl_obs(log=2, planks=4, stick=1, life=0.0), True),  # died: -0.09 (9 hearts)
    ]
    env = scripted_minecraft(script)
    assert env._env.seeds == [4] and env.act_space.n == 25
    assert set(env.obs_space) == {
        'image', 'inventory', 'inventory_max', 'equipped', 'health', 'hunger', 'breath'}
    obs, _ = env.reset()
    for key, box in env.obs_space.items():
        assert obs[key].shape == box.shape and obs[key].dtype == box.dtype, key
    results = [env.step(index) for index in (1, 1, env.action_names.index('craft_planks'), 0)]
    rewards = [reward for _, reward, *_ in results]
    assert rewards == pytest.approx([1.0, -0.01, 2.0, -0.09])
    assert [r[2] for r in results] == [False, False, False, True]  # terminated on death
    assert not any(r[3] for r in results)
    assert env._env.actions[2]['craft'] == 'planks' and env._env.actions[0]['attack'] == 1
    np.testing.assert_array_equal(env.render(), np.full((64, 64, 3), 7, np.uint8))


def test_episode_length_is_truncation():
    env = scripted_minecraft([(minerl_obs(), False)] * 3, length=3)
    env.reset()
    flags = [env.step(0)[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]


def test_wood_and_climb_rewards():
    wood_script = [(minerl_obs(log=2), False), (minerl_obs(log=3, planks=1), False)]
    wood = scripted_minecraft(wood_script, name='wood')
    wood.reset()
    assert wood.act_space.n == 12
    assert [wood.step(1)[1], wood.step(1)[1]] == [2.0, 1.0]
    climb_script = [(minerl_obs(ypos=66.0), False), (minerl_obs(ypos=65.0), False)]
    climb = scripted_minecraft(climb_script, name='climb')
    climb.reset()  # starts at y = 64
    assert [climb.step(10)[1], climb.step(0)[1]] == [2.0, -1.0]


def test_without_minerl_the_error_says_how_to_install():
    pattern = r'need MineRL 0\.4\.4.*openjdk-8-jdk.*pip install minerl==0\.4\.4'
    with pytest.raises(ImportError, match=pattern):
        Minecraft('diamond')


def test_unknown_task():
    with pytest.raises(ValueError, match=r"Unknown Minecraft task 'minecraft_nether'.*_diamond"):
        Minecraft('nether')
