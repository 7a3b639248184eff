"""Any installed gymnasium environment as a suite: `--task gym_<EnvId>` (gym_CartPole-v1, gym_Pendulum-v1).

Observations: a Box observation flattened to float32 under `vector` (a Discrete one as a one-hot
vector); a Dict observation (e.g. gymnasium-robotics' observation / achieved_goal / desired_goal)
keeps its keys, each Box flattened to float32 or, if it is an (H, W, C) uint8 image, kept as it is
(for the CNN: name it in encoder.cnn_keys), each Discrete one-hot; plus, with `image=True`, the frame
of render() resized to `size` under `image`. Actions: the env's Discrete space, or its Box flattened
to 1-D (reshaped back before each step). The env's own time limit arrives as `truncated`.
"""
from __future__ import annotations

import warnings
from typing import Any

import gymnasium
import numpy as np
from .checker import EnvCheckError, MissingDependency, close_matches, is_model_input

CLASSIC_CONTROL_INSTALL = 'pip install "gymnasium[classic-control]"  (installs pygame)'


def resize_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8 frame -> (size[0], size[1], 3) uint8 with Pillow's bilinear filter."""
    frame = np.asarray(frame, np.uint8)[..., :3]
    if frame.shape[:2] == tuple(size):
        return frame
    from PIL import Image  # Pillow comes with matplotlib; imported only when resizing

    image = Image.fromarray(frame).resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image, np.uint8)


def is_image_space(space: gymnasium.spaces.Space) -> bool:
    """An (H, W, C) uint8 Box: passed on as an image, for the CNN."""
    return isinstance(space, gymnasium.spaces.Box) and len(space.shape) == 3 and space.dtype == np.uint8


def model_input_space(space: gymnasium.spaces.Space, images: bool) -> gymnasium.spaces.Box:
    """The Box the agent sees for one gymnasium observation space: with `images` an image as it is,
    another Box flattened to float32 (its bounds too), a Discrete as a one-hot float32 vector."""
    if isinstance(space, gymnasium.spaces.Discrete):
        return gymnasium.spaces.Box(0, 1, (int(space.n),), np.float32)
    if images and is_image_space(space):
        return space
    low = np.asarray(np.broadcast_to(space.low, space.shape), np.float32).reshape(-1)
    high = np.asarray(np.broadcast_to(space.high, space.shape), np.float32).reshape(-1)
    return gymnasium.spaces.Box(low, high, dtype=np.float32)


def model_input(space: gymnasium.spaces.Space, value: Any, images: bool) -> np.ndarray:
    """One observation value as model_input_space(space, images) declares it."""
    if isinstance(space, gymnasium.spaces.Discrete):
        one_hot = np.zeros(int(space.n), np.float32)  # (n,)
        one_hot[int(value) - int(space.start)] = 1.0
        return one_hot
    if images and is_image_space(space):
        return np.asarray(value, np.uint8)
    return np.asarray(value, np.float32).reshape(-1)


def make_gymnasium_env(env_id: str) -> gymnasium.Env:
    """gymnasium.make(env_id) with rgb_array rendering; an unknown id lists close registered ids."""
    try:
        try:
            return gymnasium.make(env_id, render_mode='rgb_array')
        except TypeError:  # an env class that does not take render_mode: made again below, so that
            pass           # an error of its own constructor is not shown chained to this one
        return gymnasium.make(env_id)
    except gymnasium.error.UnregisteredEnv as error:
        raise EnvCheckError(
            f"Unknown gymnasium environment '{env_id}' (task gym_{env_id}): {str(error).rstrip('.')}."
            f"{close_matches(env_id, gymnasium.registry, n=5)} Use "
            "--task gym_<EnvId> with an id from gymnasium.registry (e.g. gym_CartPole-v1, "
            "gym_Pendulum-v1); envs from other packages must be installed and imported to register."
        ) from None
    except gymnasium.error.DeprecatedEnv as error:
        raise EnvCheckError(
            f"gymnasium environment '{env_id}' (task gym_{env_id}) is deprecated: {str(error).rstrip('.')}. "
            "Use the version it names: --task gym_<that id>.") from None
    except gymnasium.error.DependencyNotInstalled as error:
        raise MissingDependency(
            f"gymnasium environment '{env_id}' (task gym_{env_id}) needs a package that is not installed: "
            f"{str(error).rstrip('.')}. Install what it names and run the same command again.") from None


class GymEnv:
    """Adapter from a gymnasium env to the suite protocol (obs_space dict, act_space, dict observations)."""

    def __init__(self, name: str, seed: int = 0, image: bool = False, size: tuple[int, int] = (64, 64)):
        self._env = make_gymnasium_env(name)
        self._name = name
        self._seed = seed  # used by the first reset only
        self._image = bool(image)
        self._size = (int(size[0]), int(size[1]))
        self._obs_kind = self._observation_kind(self._env.observation_space)
        self._render_warned = False

    def _observation_kind(self, space: gymnasium.spaces.Space) -> str:
        if isinstance(space, (gymnasium.spaces.Box, gymnasium.spaces.Discrete)):
            return 'single'
        if isinstance(space, gymnasium.spaces.Dict):
            self._check_dict_keys(space)
            return 'dict'
        raise self._unsupported(space)

    def _unsupported(self, space: gymnasium.spaces.Space, key: str | None = None) -> EnvCheckError:
        where = f"observation space {space!r}" if key is None else f"observation '{key}' of space {space!r}"
        return EnvCheckError(
            f"gym_{self._name}: {where} is not supported; GymEnv handles Box (sent as 'vector'), "
            "Discrete (sent one-hot as 'vector') and a Dict of those (sent under its own keys). Wrap "
            "the env with gymnasium.wrappers.FlattenObservation first, or write a suite class for it in "
            "envs/.")

    def _check_dict_keys(self, space: gymnasium.spaces.Dict) -> None:
        for key, sub in space.spaces.items():
            if not isinstance(sub, (gymnasium.spaces.Box, gymnasium.spaces.Discrete)):
                raise self._unsupported(sub, key)
            if not is_model_input(key) or (self._image and key == 'image'):
                what = ("the frame of image=True" if key == 'image' else
                        "logging-only values" if str(key).startswith('log_') else "the episode flags")
                raise EnvCheckError(
                    f"gym_{self._name}: its Dict observation has key '{key}', which names {what} here. "
                    "Rename the key with a gymnasium wrapper (e.g. gymnasium.wrappers.TransformObservation), "
                    "or write a suite class for the env in envs/.")

    @property
    def obs_space(self) -> dict[str, gymnasium.spaces.Box]:
        space = self._env.observation_space
        if self._obs_kind == 'single':
            spaces = {'vector': model_input_space(space, images=False)}  # a lone Box is always flattened
        else:
            spaces = {key: model_input_space(sub, images=True) for key, sub in space.spaces.items()}
        if self._image:
            spaces['image'] = gymnasium.spaces.Box(0, 255, self._size + (3,), np.uint8)
        return spaces

    @property
    def act_space(self) -> gymnasium.spaces.Space:
        space = self._env.action_space
        if isinstance(space, gymnasium.spaces.Box):
            return gymnasium.spaces.Box(space.low.reshape(-1), space.high.reshape(-1),
                                        dtype=space.dtype)
        return space

    def reset(self) -> tuple[dict, dict]:
        obs, info = self._env.reset(seed=self._seed)
        self._seed = None
        return self._observation(obs), info

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        space = self._env.action_space
        if isinstance(space, gymnasium.spaces.Box):
            action = np.asarray(action, space.dtype).reshape(space.shape)
        elif isinstance(space, gymnasium.spaces.Discrete):
            action = int(np.asarray(action))
        obs, reward, terminated, truncated, info = self._env.step(action)
        return self._observation(obs), float(reward), bool(terminated), bool(truncated), info

    def _observation(self, raw: Any) -> dict:
        space = self._env.observation_space
        if self._obs_kind == 'single':
            obs = {'vector': model_input(space, raw, images=False)}
        else:
            obs = {key: model_input(sub, raw[key], images=True) for key, sub in space.spaces.items()}
        if self._image:
            obs['image'] = resize_frame(self._render_or_raise(), self._size)
        return obs

    def _render_or_raise(self) -> np.ndarray:
        try:
            frame = self._env.render()
        except NotImplementedError:
            raise ValueError(f"gym_{self._name} does not implement render().") from None
        except gymnasium.error.DependencyNotInstalled as error:
            raise MissingDependency(
                f"gym_{self._name} with image=True renders frames, which needs a package that is not "
                f"installed ({error}). Install it: {CLASSIC_CONTROL_INSTALL}.") from None
        if frame is None:
            raise EnvCheckError(
                f"gym_{self._name}: render() returned None, so image=True has no frames. Use "
                "env.gym.image False, or an env that supports render_mode='rgb_array'.")
        return frame

    def render(self) -> np.ndarray | None:
        """The current frame (H, W, 3) uint8 at its native size, or None when rendering is unavailable."""
        try:
            return self._render_or_raise()
        except (ImportError, ValueError) as error:
            if not self._render_warned:
                warnings.warn(f'{error} No videos for this env.', stacklevel=2)
                self._render_warned = True
            return None

    def close(self) -> None:
        self._env.close()
