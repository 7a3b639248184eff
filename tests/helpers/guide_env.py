"""The original guide's example env (seed-custom-env-guide.ja.md, section 1), copied as written with
only the class renamed: shared by the tests that check the guide's own example trains correctly.

It wraps `YourCustomEnvironment`, which each test sets to its own toy inner env (monkeypatch).
"""
import gymnasium as gym
import numpy as np

from envs import wrappers

YourCustomEnvironment = None  # the guide's inner env; set by each test


class GuideEnv:
    def __init__(self, name, **kwargs):
        # カスタム環境の初期化
        self._env = YourCustomEnvironment(name, **kwargs)
        self._env = wrappers.NormalizeActions(self._env)
        # 必要に応じて他のラッパーを追加

    @property
    def obs_space(self):
        # 観測空間の定義
        spaces = {
            'image': gym.spaces.Box(0, 255, (64, 64, 3), dtype=np.uint8),
            # 他の観測を追加可能
        }
        return spaces

    @property
    def act_space(self):
        # 行動空間の定義
        return self._env.action_space

    def step(self, action):
        obs, reward, done, truncated, info = self._env.step(action)
        return self._format_obs(obs), reward, done, truncated, info

    def reset(self):
        obs, info = self._env.reset()
        return self._format_obs(obs), info

    def _format_obs(self, obs):
        # 観測を辞書形式に変換
        return {'image': obs, 'is_first': False}

    def render(self):
        # 環境の可視化（TensorBoardでの動画記録用）
        # rgb_array形式でnumpy配列の画像を返す
        # (height, width, 3)
        return self._env.render(mode='rgb_array')
