"""Minecraft without the game: action mapping, observation conversion and rewards on MineRL-shaped dicts.

MineRL 0.4.4 cannot be installed here, so the real env is not run; `minerl_obs` builds observations
shaped like MineRL's (nested dicts: pov, inventory, equipped_items.mainhand.type, life_stats,
location_stats) and `ScriptedMineRL` replays them through the real `Minecraft` class. The expected
values follow the paper's code (danijar/dreamerv3 v1, embodied/envs/minecraft*.py).
"""
import numpy as np
import pytest

from envs.minecraft import (BASIC_ACTIONS, DIAMOND_ACTIONS, DIAMOND_MILESTONES, EPISODE_LENGTH,
                            GAME_OPTIONS, NOOP_ACTION, ActionMapper, CollectReward, MilestoneReward,
                            Minecraft, ObservationConverter, apply_game_options, edit_game_options,
                            health_reward)

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
    assert names == (  # v1's order: the policy's index i is v1's action i
        'noop', 'attack', 'turn_up', 'turn_down', 'turn_left', 'turn_right', 'forward', 'back', 'left',
        'right', 'jump', 'place_dirt', 'craft_planks', 'craft_stick', 'craft_crafting_table',
        'place_crafting_table', 'craft_wooden_pickaxe', 'craft_stone_pickaxe', 'craft_iron_pickaxe',
        'equip_stone_pickaxe', 'equip_wooden_pickaxe', 'equip_iron_pickaxe', 'craft_furnace',
        'place_furnace', 'smelt_iron_ingot')
    assert ActionMapper(BASIC_ACTIONS).names == names[:12]
    jump = ActionMapper(BASIC_ACTIONS)(10)
    assert jump['jump'] == 1 and jump['forward'] == 1  # the jump action also walks forward


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


def test_sticky_jump_holds_jump_and_forward_for_10_steps():
    mapper = ActionMapper(BASIC_ACTIONS)
    jump, noop, back = (mapper.names.index(name) for name in ('jump', 'noop', 'back'))
    actions = [mapper(jump)] + [mapper(noop) for _ in range(11)]
    assert [a['jump'] for a in actions] == [1] * 10 + [0] * 2
    assert [a['forward'] for a in actions] == [1] * 10 + [0] * 2
    mapper.reset()
    actions = [mapper(jump)] + [mapper(noop) for _ in range(4)] + [mapper(jump)]
    actions += [mapper(back) for _ in range(10)]  # a second jump restarts the 10 steps
    assert [a['jump'] for a in actions] == [1] * 15 + [0]
    assert actions[6]['back'] == 1 and actions[6]['forward'] == 1  # other keys still go through
    mapper.reset()  # a new episode drops the hold
    assert mapper(noop)['jump'] == 0 and mapper(noop)['forward'] == 0


def test_sticky_attack_holds_attack_for_30_steps_and_releases_jump():
    mapper = ActionMapper(BASIC_ACTIONS, sticky_attack=30)
    attack, noop, jump = (mapper.names.index(name) for name in ('attack', 'noop', 'jump'))
    actions = [mapper(attack)] + [mapper(noop) for _ in range(30)]
    assert [a['attack'] for a in actions] == [1] * 30 + [0]
    mapper.reset()
    during = [mapper(attack), mapper(jump), mapper(noop)]  # jump while attack is held: no jump
    assert [(a['attack'], a['jump'], a['forward']) for a in during] == [(1, 0, 0), (1, 0, 1), (1, 0, 0)]
    mapper.reset()
    first_jump = [mapper(jump), mapper(attack), mapper(noop)]  # a running jump hold re-presses jump
    assert [(a['attack'], a['jump'], a['forward']) for a in first_jump] == [(0, 1, 1), (1, 1, 1), (1, 1, 1)]
    off = ActionMapper(BASIC_ACTIONS)  # sticky attack off (the default of the mapper)
    assert [off(attack)['attack'], off(noop)['attack']] == [1, 0]


def test_sticky_attack_only_with_break_speed_1():
    script = [(minerl_obs(), False)] * 3
    slow = scripted_minecraft(list(script), break_speed=1.0)
    slow.reset()
    for index in (1, 0, 0):
        slow.step(index)
    assert [a['attack'] for a in slow._env.actions] == [1, 1, 1]
    fast = scripted_minecraft(list(script))  # break_speed 100, the paper's setting: no sticky attack
    fast.reset()
    for index in (1, 0, 0):
        fast.step(index)
    assert [a['attack'] for a in fast._env.actions] == [1, 0, 0]


def test_env_sends_sticky_jump_to_the_backend_for_10_steps():
    env = scripted_minecraft([(minerl_obs(), False)] * 12, name='wood')
    env.reset()
    for index in [env.action_names.index('jump')] + [0] * 11:
        env.step(index)
    assert [a['jump'] for a in env._env.actions] == [1] * 10 + [0] * 2
    assert [a['forward'] for a in env._env.actions] == [1] * 10 + [0] * 2


def test_camera_pitch_is_limited_to_60_degrees():
    mapper = ActionMapper(BASIC_ACTIONS)
    up, down, left = (mapper.names.index(name) for name in ('turn_up', 'turn_down', 'turn_left'))
    pitches = [float(mapper(up)['camera'][0]) for _ in range(6)]
    assert pitches == [-15.0] * 4 + [0.0, 0.0]  # stops at -60 degrees
    assert float(mapper(down)['camera'][0]) == 15.0
    pitches = [float(mapper(down)['camera'][0]) for _ in range(9)]  # from -45 down to +60, no further
    assert pitches == [15.0] * 7 + [0.0, 0.0]
    np.testing.assert_array_equal(mapper(left)['camera'], [0.0, -15.0])  # yaw is never limited
    mapper.reset()  # a new episode starts level again
    assert [float(mapper(down)['camera'][0]) for _ in range(5)] == [15.0] * 4 + [0.0]


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
    # v1: 0.01 times the change of health = life / 20
    assert health_reward(20.0, 18.0) == pytest.approx(-0.001, abs=1e-9)  # one heart lost
    assert health_reward(16.0, 20.0) == pytest.approx(0.002, abs=1e-9)   # two hearts restored
    assert health_reward(20.0, 0.0) == pytest.approx(-0.01, abs=1e-9)    # dying from full life
    assert health_reward(7.0, 7.0) == 0.0


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
        obs, done, *info = self.script.pop(0)
        return obs, 0.0, done, (info[0] if info else {})

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
        (minerl_obs(log=3, life=18.0), False),              # -0.001: one heart lost
        (minerl_obs(log=2, planks=4, stick=1, life=18.0), False),  # +2 planks, stick
        (minerl_obs(log=2, planks=4, stick=1, life=0.0), True),  # died: -0.009 (9 hearts)
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
    assert rewards == pytest.approx([1.0, -0.001, 2.0, -0.009], abs=1e-7)
    assert [r[2] for r in results] == [False, False, False, True]  # terminated on death
    assert not any(r[3] for r in results)
    assert env._env.actions[2]['craft'] == 'planks' and env._env.actions[0]['attack'] == 1
    np.testing.assert_array_equal(env.render(), np.full((64, 64, 3), 7, np.uint8))


def test_episode_length_is_truncation():
    assert EPISODE_LENGTH == 36000 and scripted_minecraft([])._length == 36000
    env = scripted_minecraft([(minerl_obs(), False)] * 3, length=3)
    env.reset()
    flags = [env.step(0)[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]


def test_every_minerl_end_is_terminal():
    env = scripted_minecraft([(minerl_obs(life=12.0), True)])  # done with life left: still terminal (v1)
    env.reset()
    _, reward, terminated, truncated, _ = env.step(0)
    assert (terminated, truncated) == (True, False) and reward == pytest.approx(-0.004, abs=1e-7)
    last = scripted_minecraft([(minerl_obs(), True)], length=1)  # done on the time limit's step
    last.reset()
    assert last.step(0)[2:4] == (True, False)


def test_minerl_error_ends_the_episode_as_truncation_with_the_last_observation():
    script = [(minerl_obs(log=1), False), ({'broken': True}, True, {'error': 'socket closed'})]
    env = scripted_minecraft(script)
    env.reset()
    before, reward, *_ = env.step(0)
    assert reward == 1.0
    obs, reward, terminated, truncated, info = env.step(0)
    assert (reward, terminated, truncated) == (0.0, False, True) and info == {'error': 'socket closed'}
    for key in before:
        np.testing.assert_array_equal(obs[key], before[key])


def test_game_options_are_v1s():
    assert GAME_OPTIONS == {'difficulty': '2', 'renderDistance': '6', 'simulationDistance': '6',
                            'fovEffectScale': '0.0', 'ao': '1', 'gamma': '5.0'}
    text = 'version:1343\ngamma:0.0\nrenderDistance:12\ndifficulty:1\nao:2\nfov:0.0\nlang:en_us\n'
    lines = edit_game_options(text).splitlines()
    assert lines[:7] == ['version:1343', 'gamma:5.0', 'renderDistance:6', 'difficulty:2', 'ao:1',
                         'fov:0.0', 'lang:en_us']  # 'fov' is not 'fovEffectScale'
    assert lines[7:] == ['simulationDistance:6', 'fovEffectScale:0.0']  # missing keys are appended
    assert edit_game_options(edit_game_options(text)) == edit_game_options(text)


def test_game_options_file_is_written_in_place_of_the_old_one(tmp_path):
    path = tmp_path / 'run' / 'options.txt'
    apply_game_options(path)  # missing: created with v1's options only
    assert sorted(path.read_text().splitlines()) == sorted(f'{k}:{v}' for k, v in GAME_OPTIONS.items())
    path.write_text('gamma:1.0\nmaxFps:260\n')
    apply_game_options(path)
    assert path.read_text().splitlines()[:2] == ['gamma:5.0', 'maxFps:260']
    stamp = path.stat().st_mtime_ns
    apply_game_options(path)  # already set: the file is left alone
    assert path.stat().st_mtime_ns == stamp
    assert [entry.name for entry in path.parent.iterdir()] == ['options.txt']  # no temporary left


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
    hurt = scripted_minecraft([(minerl_obs(ypos=67.0, life=16.0), False)], name='climb')
    hurt.reset()
    assert hurt.step(0)[1] == pytest.approx(3.0 - 0.002, abs=1e-6)  # height plus the health term
    logs = scripted_minecraft([(minerl_obs(log=1, life=18.0), False)], name='wood')
    logs.reset()
    assert logs.step(1)[1] == pytest.approx(1.0 - 0.001, abs=1e-7)


def test_without_minerl_the_error_says_how_to_install():
    pattern = r'need MineRL 0\.4\.4.*openjdk-8-jdk.*pip install minerl==0\.4\.4'
    with pytest.raises(ImportError, match=pattern):
        Minecraft('diamond')


def test_unknown_task():
    with pytest.raises(ValueError, match=r"Unknown Minecraft task 'minecraft_nether'.*_diamond"):
        Minecraft('nether')


def test_health_reward_is_computed_in_float32_as_v1_does():
    expected = np.float32(0.01) * (np.float32(18.0 / 20.0) - np.float32(1.0))  # float32 arithmetic
    assert health_reward(20.0, 18.0) == float(np.float32(expected)) != -0.001


def test_reset_with_a_seed_reseeds_the_game_and_restarts_the_episodes_state():
    """reset(seed) seeds MineRL again (reset() alone does not); each episode starts with its step
    count at 0 (truncation after `length` steps of its own) and no sticky jump held over."""
    env = scripted_minecraft([(minerl_obs(), False)] * 6, name='wood', length=3)
    env.reset()
    env.reset(seed=9)
    assert env._env.seeds == [4, 9]
    jump = env.action_names.index('jump')
    assert [env.step(a)[3] for a in (0, jump)] == [False, False]
    env.reset()
    flags = [env.step(0)[3] for _ in range(3)]
    assert flags == [False, False, True]  # the episode's own 3 steps, not 2 + 3 since construction
    assert env._env.actions[2]['jump'] == 0  # the jump held in the last episode does not carry over


def test_render_shows_the_latest_steps_frame():
    seen = minerl_obs(log=1)
    seen['pov'] = np.full((64, 64, 3), 99, np.uint8)
    env = scripted_minecraft([(seen, False)])
    env.reset()
    np.testing.assert_array_equal(env.render(), np.full((64, 64, 3), 7, np.uint8))  # the reset's frame
    env.step(0)
    np.testing.assert_array_equal(env.render(), seen['pov'])


def test_game_options_match_whole_keys_and_keep_the_files_permissions(tmp_path):
    assert edit_game_options('aoLevel:3\nao:2\n', {'ao': '1'}).splitlines() == ['aoLevel:3', 'ao:1']
    path = tmp_path / 'options.txt'
    path.write_text('gamma:1.0\n')
    path.chmod(0o600)
    apply_game_options(path)
    assert path.read_text().startswith('gamma:5.0\n') and path.stat().st_mode & 0o777 == 0o600
