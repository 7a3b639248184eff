"""Atari 2600 games (`atari_<game>`, e.g. `atari_pong`, `atari_space_invaders`) on ale-py.

The Atari100k / DreamerV3 protocol, all inside this class (it takes `action_repeat`, so the generic
ActionRepeat wrapper is not applied):
- action repeat: each agent step plays `action_repeat` emulator frames and sums their rewards;
- max-pool: the observation is the pixel-wise max of the last two frames of the repeat;
- no-op starts: a new game begins with k NOOP frames, k uniform in 0..`noops` (0 = off);
- sticky actions (`sticky`): before every emulator frame, with probability 0.25 the previously played
  action is played again instead of the requested one (Machado et al. 2018); drawn from this env's own
  seeded generator, ALE's own repeat_action_probability is set to 0;
- `actions`: 'needed' is the game's minimal action set (Discrete(n), n per game: what the paper's
  Atari100k runs use), 'all' the full set of 18 (the paper's Atari 200M runs, as Machado et al.);
  index 0 is NOOP in both;
- `gray` gives image (H, W, 1), else (H, W, 3) (the paper: colour for both benchmarks);
  frames are resized to `size` by area averaging (`resize: area`, equal to OpenCV's INTER_AREA of the
  paper's code) or pillow's bilinear filter (`resize: pillow`);
- `lives`: 'unused' ignores life loss; 'discount' keeps playing after a life loss but marks that step
  with info['is_terminal'] = True (terminated stays False: the game goes on); the Flags wrapper is to
  OR info['is_terminal'] into the observation's is_terminal flag, so the return is cut at the life loss
  without ending the episode; 'reset' ends the episode at a life loss (terminated=True) and the
  following reset() continues the same game from that point instead of restarting it (a real restart
  happens after game over or after an episode that ended without a life loss, e.g. by the time limit).
- `length`: a game is cut (truncated=True, never terminated) after this many emulator frames since its
  reset, 108,000 (30 minutes of play, 27,000 agent steps at repeat 4) as in the paper's code, whatever
  the config's time_limit says (0 = no cap);
- rewards are the game's score changes, summed over the repeat and never clipped (DreamerV3 uses no
  reward clipping; its reward head predicts symlog rewards), so the logged episode return is the raw
  game score.
"""
from __future__ import annotations

import functools
import re

import gymnasium
import numpy as np
from .checker import EnvCheckError, MissingDependency, close_matches

NOOP = 0  # index of NOOP in every ALE action set
STICKY_PROBABILITY = 0.25
LIVES_MODES = ('unused', 'discount', 'reset')
RESIZE_MODES = ('area', 'pillow')
ACTION_SETS = ('needed', 'all')
EPISODE_FRAMES = 108000  # 30 minutes at 60 Hz: the paper's episode cap


def sticky_action(requested: int, previous: int, draw: float, probability: float) -> int:
    """The action the emulator plays this frame: the previous one when draw < probability."""
    return previous if draw < probability else requested


def max_pool(frames: list[np.ndarray]) -> np.ndarray:
    """Pixel-wise max of the last two frames (a single frame is returned as is)."""
    if len(frames) == 1:
        return frames[-1]
    return np.maximum(frames[-2], frames[-1])


@functools.lru_cache(maxsize=8)
def area_weights(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of area interpolation for shrinking: output pixel o averages the
    input interval [o, o + 1) * size_in / size_out, each input pixel weighted by its overlap."""
    scale = size_in / size_out
    edges = np.arange(size_out + 1) * scale  # (size_out + 1,) interval bounds in input pixels
    left, right = edges[:-1, None], edges[1:, None]  # (size_out, 1)
    pixel = np.arange(size_in)[None, :]  # (1, size_in)
    overlap = np.clip(np.minimum(right, pixel + 1) - np.maximum(left, pixel), 0.0, None)
    weights = overlap / scale  # (size_out, size_in), rows sum to 1
    weights.flags.writeable = False  # shared by every call (cached)
    return weights


@functools.lru_cache(maxsize=8)
def area_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """area_weights as taps: (size_out, K) input indices and their weights, K the most input pixels
    one output pixel overlaps (5 for 210 -> 64), so that a resize is K multiply-adds of gathered
    rows instead of a matrix product (numpy's BLAS threads stall when the cores are busy)."""
    weights = area_weights(size_in, size_out)
    taps = int((weights > 0).sum(1).max())
    index = np.argsort(weights <= 0, axis=1, kind="stable")[:, :taps]  # (size_out, K): the nonzero first
    return index, np.take_along_axis(weights, index, 1).astype(np.float32)  # padding taps weigh 0


def area_resize_axis(pixels: np.ndarray, size_out: int, axis: int) -> np.ndarray:
    """Area-resize float pixels along `axis` (0: rows, 1: columns) to size_out."""
    index, weight = area_taps(pixels.shape[axis], size_out)
    shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    out = np.zeros(pixels.shape[:axis] + (size_out,) + pixels.shape[axis + 1:], np.float32)
    for k in range(index.shape[1]):
        out += weight[:, k].reshape(shape) * np.take(pixels, index[:, k], axis=axis)
    return out


def resize_frame(frame: np.ndarray, size: tuple[int, int], method: str) -> np.ndarray:
    """(210, 160[, 3]) uint8 screen -> (H, W[, 3]) uint8: 'area' averages the input pixels each
    output pixel covers (the paper's code: OpenCV's INTER_AREA, to which it is equal: compared on
    Ms. Pac-Man screens and noise at 64x64), 'pillow' is pillow's bilinear filter."""
    height, width = size
    if frame.shape[:2] == (height, width):
        return frame
    if method == 'area' and height <= frame.shape[0] and width <= frame.shape[1]:
        pixels = frame.reshape(frame.shape[0], frame.shape[1], -1).astype(np.float32)  # (210, 160, C)
        out = area_resize_axis(area_resize_axis(pixels, height, 0), width, 1)  # (H, W, C)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape((height, width) + frame.shape[2:])
    from PIL import Image  # also 'area' for a size larger than the screen, where it has no meaning
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BILINEAR))


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise EnvCheckError(f"env.atari.{key} must be one of {', '.join(choices)}; got {value!r}. "
                         f"Fix it with e.g. --env.atari.{key} {choices[0]}.")


class Atari:
    """One Atari game with the Atari100k preprocessing, e.g. Atari('pong', action_repeat=4)."""

    def __init__(self, name: str, action_repeat: int = 4, size: tuple[int, int] = (64, 64),
                 gray: bool = False, noops: int = 30, sticky: bool = True, lives: str = 'unused',
                 resize: str = 'area', actions: str = 'needed', length: int = EPISODE_FRAMES,
                 seed: int = 0):
        check_choice('lives', lives, LIVES_MODES)
        check_choice('resize', resize, RESIZE_MODES)
        check_choice('actions', actions, ACTION_SETS)
        if action_repeat < 1:
            raise EnvCheckError(f'Atari action_repeat must be >= 1; got {action_repeat}. '
                             'Use 4 as in the paper.')
        if int(length) < 0:
            raise EnvCheckError(f'Atari length must be >= 0 emulator frames (0 = no cap); got {length}. '
                                f'Use {EPISODE_FRAMES} as in the paper.')
        if int(noops) < 0:
            raise EnvCheckError(f'Atari noops must be >= 0 (the most no-op actions at a reset, 0 = none); got '
                                f'{noops}. Use 30 as in the paper.')
        self._ale = make_emulator(name, seed)
        if actions == 'all':
            self._actions = list(self._ale.getLegalActionSet())
        else:
            self._actions = list(self._ale.getMinimalActionSet())
        self._length = int(length)
        self._frames = 0  # emulator frames played since the game's reset (no-op frames excluded)
        self._repeat = int(action_repeat)
        self._size = (int(size[0]), int(size[1]))  # (H, W)
        self._gray, self._noops, self._lives_mode, self._resize = bool(gray), int(noops), lives, resize
        self._sticky_probability = STICKY_PROBABILITY if sticky else 0.0
        self._rng = np.random.default_rng(seed)  # no-op counts and sticky draws
        self._previous_action = NOOP
        self._lives = 0
        self._continue_game = False  # lives == 'reset': the next reset() resumes after a life loss

    @property
    def ale(self):
        """The underlying ale_py.ALEInterface (for tests and debugging)."""
        return self._ale

    @property
    def obs_space(self) -> dict[str, gymnasium.spaces.Box]:
        channels = 1 if self._gray else 3
        return {'image': gymnasium.spaces.Box(0, 255, self._size + (channels,), np.uint8)}

    @property
    def act_space(self) -> gymnasium.spaces.Discrete:
        return gymnasium.spaces.Discrete(len(self._actions))

    def reset(self, seed: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        capped = 0 < self._length <= self._frames
        if self._continue_game and not capped:  # set by step() only while the game is not over
            self._continue_game = False
            return self._observation([self._screen()]), {}
        self._continue_game = False
        self._frames = 0
        self._ale.reset_game()
        for _ in range(int(self._rng.integers(0, self._noops + 1))):
            self._ale.act(self._actions[NOOP])
            if self._ale.game_over():
                self._ale.reset_game()
        self._previous_action = self._actions[NOOP]
        self._lives = self._ale.lives()
        return self._observation([self._screen()]), {}

    def step(self, action) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        requested = self._actions[self._action_index(action)]
        reward, frames = 0.0, []
        for repeat in range(self._repeat):
            played = sticky_action(requested, self._previous_action, self._rng.random(),
                                   self._sticky_probability)
            self._previous_action = played
            reward += self._ale.act(played)
            self._frames += 1
            over = self._ale.game_over()
            cut = 0 < self._length <= self._frames
            if repeat >= self._repeat - 2 or over or cut:
                frames.append(self._screen())
            if over or cut:
                break
        lives = self._ale.lives()
        life_loss = lives < self._lives
        self._lives = lives
        over = self._ale.game_over()
        terminated = over or (life_loss and self._lives_mode == 'reset')
        self._continue_game = life_loss and self._lives_mode == 'reset' and not over
        discount_terminal = life_loss and self._lives_mode == 'discount'
        truncated = not terminated and 0 < self._length <= self._frames  # reset() then starts a new game
        info = {'life_loss': bool(life_loss), 'lives': lives,
                'is_terminal': bool(terminated or discount_terminal)}
        return self._observation(frames), reward, bool(terminated), bool(truncated), info

    def render(self, mode: str = 'rgb_array') -> np.ndarray:
        """The full-size RGB screen (210, 160, 3) uint8."""
        del mode
        return self._ale.getScreenRGB()

    def close(self) -> None:
        pass

    def _action_index(self, action) -> int:
        index = int(np.asarray(action).reshape(-1)[0]) if np.ndim(action) else int(action)
        if not 0 <= index < len(self._actions):
            raise ValueError(f'Atari action must be an index in 0..{len(self._actions) - 1} (the '
                             f'action set of env.atari.actions); got {action!r}.')
        return index

    def _screen(self) -> np.ndarray:
        if self._gray:
            return self._ale.getScreenGrayscale()  # (210, 160)
        return self._ale.getScreenRGB()  # (210, 160, 3)

    def _observation(self, frames: list[np.ndarray]) -> dict[str, np.ndarray]:
        image = resize_frame(max_pool(frames), self._size, self._resize)
        if self._gray:
            image = image[..., None]  # (H, W, 1)
        return {'image': image}


def snake_case(name: str) -> str:
    """ale-py's spelling of a gym-style id: 'MontezumaRevenge' -> 'montezuma_revenge', 'ALE/Pong-v5'
    and 'PongNoFrameskip-v4' -> 'pong'."""
    name = re.sub(r'(NoFrameskip|Deterministic)?(-v\d+)?$', '', name.removeprefix('ALE/'))
    return re.sub(r'(?<=[a-z0-9])(?=[A-Z])', '_', name).lower()


def make_emulator(game: str, seed: int):
    """An ALEInterface with `game` loaded, one frame per act(), no built-in sticky actions."""
    try:
        import ale_py
        from ale_py import roms
    except ImportError as error:
        raise MissingDependency("Atari tasks need ale-py (its wheel ships the ROMs). Install it with "
                          "`pip install ale-py==0.12.1`.") from error
    rom_ids = roms.get_all_rom_ids()
    if game not in rom_ids:
        raise EnvCheckError(f"Unknown Atari game 'atari_{game}': expected atari_<rom id> with a snake_case "
                            f"ROM id shipped by ale-py, got {game!r}.{close_matches(snake_case(game), rom_ids)} "
                            f"Known games: {', '.join(rom_ids)}.")
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    ale = ale_py.ALEInterface()
    ale.setInt('random_seed', int(seed) % (2 ** 31))
    ale.setFloat('repeat_action_probability', 0.0)
    ale.setInt('frame_skip', 1)
    ale.setInt('max_num_frames_per_episode', 0)
    ale.loadROM(roms.get_rom_path(game))
    return ale
