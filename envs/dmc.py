"""DeepMind Control Suite tasks (`dmc_<domain>_<task>`) as gymnasium-style envs.

Observations: the task's proprioceptive arrays as float32 vectors (scalars become shape (1,)) when
`proprio`, and a `size` RGB frame under `image` when `image`, from camera 2 for quadruped and camera 0
for every other domain (`camera` -1, the paper's choice). Episodes end by the 1000-env-step time
limit (500 agent steps at the paper's action repeat 2), which is reported as `truncated`; only a real
termination (dm_env discount 0) is `terminated`, which no Control Suite task has.

The class repeats actions itself (`action_repeat`, summing rewards, stopping at the episode's end),
so a frame is rendered once per agent step, not once per physics step. Frames look as in the paper
(MuJoCo's default lighting: shadows and 4x multisampling); `fast_render=True` turns both off, about
3-6x faster frames that no longer match the paper's (a walker's shadow is gone: a third of its pixels
change by more than 16 levels). `dmc_cup_catch` (the paper's name) is `ball_in_cup_catch`.

Headless rendering: unless the user set `MUJOCO_GL`, `select_mujoco_gl()` probes EGL, then OSMesa, in a
short subprocess and sets the first that opens a context, before dm_control is imported.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import gymnasium
import numpy as np
from .checker import EnvCheckError, MissingDependency, close_matches

QUADRUPED_CAMERA = 2  # the paper's view for quadruped tasks; every other domain uses camera 0
DOMAIN_ALIASES = {'cup': 'ball_in_cup'}  # the paper's code names ball_in_cup tasks cup_<task>
HEADLESS_BACKENDS = ('egl', 'osmesa')
APT_RENDER_LIBS = 'apt-get install -y libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1 libosmesa6'
_PROBE = (
    'import importlib, sys\n'
    'gl = importlib.import_module("mujoco." + sys.argv[1])\n'
    'context = gl.GLContext(64, 64)\n'
    'context.make_current()\n'
    'context.free()\n'
)


def backend_opens_context(backend: str, timeout: float = 60.0) -> bool:
    """True when a fresh Python process can create a MuJoCo OpenGL context with `backend`."""
    env = dict(os.environ, MUJOCO_GL=backend, PYOPENGL_PLATFORM=backend)
    try:
        result = subprocess.run([sys.executable, '-c', _PROBE, backend], env=env, timeout=timeout,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def select_mujoco_gl() -> str:
    """Sets MUJOCO_GL to the first working headless backend (egl, then osmesa) and returns it.

    Leaves the variable alone when the user set it, when dm_control's renderer is already imported
    (too late to choose), or off Linux (MuJoCo's own default works there). Returns '' when nothing
    was chosen.
    """
    if 'MUJOCO_GL' in os.environ:
        return os.environ['MUJOCO_GL']
    if not sys.platform.startswith('linux') or 'dm_control._render' in sys.modules:
        return ''
    for backend in HEADLESS_BACKENDS:
        if backend_opens_context(backend):
            os.environ['MUJOCO_GL'] = backend
            return backend
    return ''


def split_task_name(name: str, all_tasks: list[tuple[str, str]]) -> tuple[str, str]:
    """'ball_in_cup_catch' -> ('ball_in_cup', 'catch'), resolved against dm_control's task list;
    the paper's 'cup_catch' names the same task."""
    alias, _, rest = name.partition('_')
    if alias in DOMAIN_ALIASES and rest:
        name = f'{DOMAIN_ALIASES[alias]}_{rest}'
    matches = [(domain, task) for domain, task in all_tasks if f'{domain}_{task}' == name]
    if len(matches) != 1:
        known = [f'dmc_{domain}_{task}' for domain, task in sorted(all_tasks)]
        raise EnvCheckError(
            f"Unknown DeepMind Control task 'dmc_{name}': expected dmc_<domain>_<task> with a pair from "
            f"dm_control.suite.ALL_TASKS, got {name!r}.{close_matches(f'dmc_{name.lower()}', known)} "
            f"Pick one of: {', '.join(known)}.")
    return matches[0]


def default_camera(domain: str, camera: int) -> int:
    """Camera -1 means the paper's choice: camera 2 for quadruped, camera 0 for everything else."""
    if camera >= 0:
        return camera
    return QUADRUPED_CAMERA if domain == 'quadruped' else 0


def check_camera(name: str, camera: int, cameras: int) -> None:
    """Refuse a camera id the task's model lacks (MuJoCo would fail at the first frame, deep in a
    worker); -1 (the paper's choice) is always fine."""
    if camera == -1 or 0 <= camera < cameras:
        return
    raise EnvCheckError(
        f"DMC task '{name}' has {cameras} camera(s), ids 0..{cameras - 1}; got --env.dmc.camera "
        f"{camera}. Use one of those ids, or -1 for the paper's view (camera 2 for quadruped, 0 "
        "for every other domain).")


def flatten_proprio(observation: dict[str, Any]) -> dict[str, np.ndarray]:
    """dm_env observation arrays -> float32 vectors (n,); scalars become (1,)."""
    return {key: np.asarray(value, np.float32).reshape(-1) for key, value in observation.items()}


class DMC:
    """One DeepMind Control Suite task, e.g. DMC('walker_walk', size=(64, 64), image=True)."""

    def __init__(self, name: str, size: tuple[int, int] = (64, 64), camera: int = -1,
                 image: bool = True, proprio: bool = True, action_repeat: int = 1,
                 fast_render: bool = False, seed: int = 0):
        if isinstance(action_repeat, bool) or int(action_repeat) != action_repeat or action_repeat < 1:
            raise EnvCheckError(f'DMC action_repeat must be a whole number >= 1; got {action_repeat!r}. '
                                'Use 2 as in the paper.')
        if not (image or proprio):
            raise EnvCheckError(
                f"DMC task '{name}' got image=False and proprio=False: the observation would be empty. "
                "Set env.dmc.image or env.dmc.proprio to True.")
        select_mujoco_gl()
        try:
            from dm_control import suite
        except ImportError as error:
            raise MissingDependency(
                f"DMC task '{name}' needs dm_control, which failed to import ({error}). "
                "Install it with `pip install dm_control==1.0.50 mujoco==3.17.0`.") from error
        self._domain, self._task = split_task_name(name, list(suite.ALL_TASKS))
        self._env = suite.load(self._domain, self._task, task_kwargs={'random': seed})
        try:
            check_camera(name, int(camera), int(self._env.physics.model.ncam))
        except EnvCheckError:
            self._env.close()
            raise
        self._size = (int(size[0]), int(size[1]))  # (H, W)
        self._camera = default_camera(self._domain, camera)
        self._image, self._proprio = bool(image), bool(proprio)
        self._repeat = int(action_repeat)
        if fast_render:
            configure_fast_offscreen(self._env.physics.model, self._size)
        else:
            size_offscreen_buffer(self._env.physics.model, self._size)

    @property
    def obs_space(self) -> dict[str, gymnasium.spaces.Box]:
        spaces = {}
        if self._proprio:
            for key, spec in self._env.observation_spec().items():
                shape = (int(np.prod(spec.shape)),)  # scalars -> (1,)
                spaces[key] = gymnasium.spaces.Box(-np.inf, np.inf, shape, np.float32)
        if self._image:
            spaces['image'] = gymnasium.spaces.Box(0, 255, self._size + (3,), np.uint8)
        return spaces

    @property
    def act_space(self) -> gymnasium.spaces.Box:
        spec = self._env.action_spec()
        return gymnasium.spaces.Box(spec.minimum.astype(np.float32), spec.maximum.astype(np.float32),
                                    spec.shape, np.float32)

    def reset(self, seed: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
        if seed is not None:
            self._env.task.random.seed(seed)
        time_step = self._env.reset()
        return self._observation(time_step), {}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        action = np.asarray(action, np.float64).reshape(self._env.action_spec().shape)
        reward = 0.0
        for _ in range(self._repeat):
            time_step = self._env.step(action)
            reward += float(time_step.reward or 0.0)
            if time_step.last():
                break
        terminated = bool(time_step.last() and time_step.discount == 0.0)
        truncated = bool(time_step.last() and not terminated)
        info = {'discount': time_step.discount}
        return self._observation(time_step), reward, terminated, truncated, info

    def render(self, mode: str = 'rgb_array') -> np.ndarray:
        """The configured camera as an (H, W, 3) uint8 frame (also for eval videos of proprio runs)."""
        del mode
        try:
            frame = self._env.physics.render(*self._size, camera_id=self._camera)
        except RuntimeError as error:
            raise RuntimeError(
                f"DMC could not render a frame with MUJOCO_GL={os.environ.get('MUJOCO_GL', '(unset)')}: "
                f"{error}. Headless rendering needs EGL or OSMesa: `{APT_RENDER_LIBS}`, then set "
                "MUJOCO_GL=egl (or osmesa), or use proprio-only observations (env.dmc.image False) "
                "and video False.") from error
        return np.asarray(frame, np.uint8)  # (H, W, 3)

    def close(self) -> None:
        self._env.close()

    def _observation(self, time_step) -> dict[str, np.ndarray]:
        obs = flatten_proprio(time_step.observation) if self._proprio else {}
        if self._image:
            obs['image'] = self.render()
        return obs


def size_offscreen_buffer(model, size: tuple[int, int]) -> None:
    """Offscreen buffer of the frame's size (MuJoCo's default is 640x480): the same pixels, a little
    faster. Must run before the first render (dm_control creates the context lazily, sized from it)."""
    height, width = size
    model.vis.global_.offwidth = width
    model.vis.global_.offheight = height


def configure_fast_offscreen(model, size: tuple[int, int]) -> None:
    """size_offscreen_buffer, no shadows, no multisampling: about 3-6x faster frames, but not the
    paper's images (`fast_render=True` only). Must run before the first render."""
    size_offscreen_buffer(model, size)
    model.vis.quality.shadowsize = 0
    model.vis.quality.offsamples = 0
