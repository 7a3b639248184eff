"""The agent the training loop drives, and its behaviours in the train envs.

Behaviours (`behavior` config key): `greedy` acts with the task actor, `random` with uniform random
actions, `plan2explore` with a second actor-critic trained on ensemble disagreement (intrinsic
reward). Evaluation always uses the task actor's deterministic mode.

`make_agent(obs_space, act_space, config, device)` builds an `Agent`; see its methods for the API.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable, Mapping

import gymnasium
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import (ActorCritic, GradSync, Optimizer, RewardFn, WorldModel, action_size, autocast, frozen,
                    resolve_actor_dist, run_at_once)
from networks import EnsembleMLP, features

if TYPE_CHECKING:
    from config import Config

PolicyState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # stoch (N, S*C), deter (N, D), action (N, A)
OPENLOOP_CONTEXT = 5  # steps observed before the open-loop prediction in report()
OPENLOOP_SEQUENCES = 6  # sequences shown side by side in the open-loop video


class Plan2Explore(nn.Module):
    """Ensemble that predicts the next latent from (features, action); the std of its predictions
    (mean over latent dims) is the intrinsic reward of an exploration actor-critic."""

    def __init__(self, feat_size: int, stoch_size: int, action_dim: int, actor_dist: str, config):
        super().__init__()
        pc = config.plan2explore
        self.intr_scale, self.extr_scale = float(pc.intr_scale), float(pc.extr_scale)
        self.ensemble = EnsembleMLP(int(pc.ensemble), feat_size + action_dim, stoch_size, int(pc.units),
                                    int(pc.layers), float(config.norm_eps))
        self.ac = ActorCritic(feat_size, action_dim, actor_dist, config)

    def disagreement(self, feat: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """feat (..., F), action (..., A) -> std over members of the predicted next latent, (...)."""
        inputs = torch.cat([feat, action.to(feat.dtype)], -1)
        preds = self.ensemble(inputs.reshape(-1, inputs.shape[-1])).float()  # (M, n, S*C)
        return preds.std(0).mean(-1).reshape(feat.shape[:-1])

    def reward_terms(self, wm: WorldModel) -> RewardFn:
        """Reward of the exploration actor-critic per imagined transition (see models.RewardFn): the
        scaled disagreement about next_feat predicted from (feat, action), plus the scaled reward
        head on next_feat when extr_scale is not 0."""
        def terms(feat: torch.Tensor, action: torch.Tensor, next_feat: torch.Tensor) -> dict[str, torch.Tensor]:
            out = {"intrinsic": self.intr_scale * self.disagreement(feat, action)}
            if self.extr_scale:
                out["extrinsic"] = self.extr_scale * wm.reward(next_feat)
            return out
        return terms

    def ensemble_loss(self, states: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Squared error (summed over latent dims) predicting stoch_{t+1} from (feat_t, action_{t+1}),
        over the posterior states of the batch, skipping pairs that cross an episode start."""
        feat = features(states["stoch"], states["deter"]).detach()[:, :-1]  # (B, T-1, F)
        action = batch["action"][:, 1:]  # (B, T-1, A): the action taken at t, leading to t+1
        target = states["stoch"].detach()[:, 1:].float()  # (B, T-1, S*C)
        inputs = torch.cat([feat, action.to(feat.dtype)], -1)
        preds = self.ensemble(inputs.reshape(-1, inputs.shape[-1])).float()  # (M, n, S*C)
        error = (preds - target.reshape(1, -1, target.shape[-1])).square().sum(-1)  # (M, n)
        valid = (~batch["is_first"][:, 1:]).reshape(1, -1).float()  # (1, n)
        return (error * valid).sum() / (valid.sum() * error.shape[0]).clamp(min=1.0)


class CudaGraphUpdate:
    """Runs `update(batch) -> metrics` as one CUDA graph: the first `warmup` calls run eagerly on a
    side stream (they are real updates: Adam state, compiled kernels and cuDNN plans get made), the
    next call captures the update once and every call from then on copies its batch into the
    graph's input tensors and replays it. One update's thousands of small kernels then cost one
    launch. If capturing fails, one warning, and every later update runs eagerly.

    `segmented` (data-parallel training): the update's collectives (the gradient all-reduces, the
    returns' all-gather) stay outside the graphs. They are handed to `between`, which runs them at
    once in an eager update; while the update is captured, each call ends the graph being recorded
    there, so that a replay runs graph, collective, graph, ... in the update's order, the
    collectives eagerly on the graphs' buffers. `agree(ok)` (every rank calls it after capturing)
    tells whether every rank's capture succeeded; if one failed, every rank trains eagerly, so the
    ranks' collectives keep matching. `cuda` is torch.cuda (a stand-in in tests without a GPU)."""

    def __init__(self, update: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]],
                 warmup: int = 3, cuda=torch.cuda):
        self.update, self.warmup, self.cuda = update, warmup, cuda
        self.stream = cuda.Stream()
        self.segmented = False
        self.agree: Callable[[bool], bool] | None = None
        self._open = None  # the graph a segmented capture is recording
        self._pool = None  # the memory pool its graphs share
        self.reset()
        self.failed = False

    def reset(self) -> None:
        """Forget the graphs (after parameters or optimizer state were replaced, e.g. by a load)."""
        self.segments: list[tuple[object, Callable[[], object] | None]] = []  # (graph, collective after it)
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls = 0

    @property
    def graph(self):
        """The (first) captured graph; None before a capture."""
        return self.segments[0][0] if self.segments else None

    def between(self, collective: Callable[[], object]) -> None:
        """Run `collective` where the update reaches it: at once, or, while a segmented capture
        records, after the graph recorded so far (a new one records what follows)."""
        if self._open is None:
            collective()
            return
        self._close_segment(collective)
        self._open_segment()

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.failed:
            return self.update(batch)
        if not self.segments and self.calls < self.warmup:
            self.calls += 1
            return self._on_side_stream(batch)
        if not self.segments and not self._capture(batch):
            return self.update(batch)
        for key, value in batch.items():
            self.inputs[key].copy_(value, non_blocking=True)
        for graph, collective in self.segments:
            graph.replay()
            if collective is not None:
                collective()
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in self.outputs.items()}

    def _on_side_stream(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.stream.wait_stream(self.cuda.current_stream())
        with self.cuda.stream(self.stream):
            metrics = self.update(batch)
        self.cuda.current_stream().wait_stream(self.stream)
        return metrics

    def _capture(self, batch: Mapping[str, torch.Tensor]) -> bool:
        """Record one update (nothing runs while recording); False, with a warning, if it fails
        here or, with `agree`, on another rank."""
        self.inputs = {k: v.detach().clone() for k, v in batch.items()}  # (B, T, ...) graph inputs
        self.cuda.synchronize()
        error = None
        try:
            if self.segmented:
                self._record_segments()
            else:
                graph = self.cuda.CUDAGraph()
                # the outer stream context restores the current stream even where capture_end
                # raises inside graph's exit, which then skips its own stream context's exit
                with self.cuda.stream(self.stream), self.cuda.graph(graph, stream=self.stream,
                                                                    capture_error_mode="thread_local"):
                    self.outputs = self.update(self.inputs)
                self.segments = [(graph, None)]
        except Exception as caught:  # noqa: BLE001 - any capture failure: keep training eagerly
            error = caught
        captured = error is None if self.agree is None else self.agree(error is None)
        if captured:
            return True
        device = next(iter(self.inputs.values())).device
        self.failed = True
        self.reset()
        if error is not None:
            self._leave_capture_state(device)
        self.cuda.synchronize()
        reason = f"{type(error).__name__}: {error}" if error is not None else "it failed on another rank"
        warnings.warn(f"cuda_graphs: capturing the update failed ({reason}); training goes on without "
                      "CUDA graphs (use --cuda_graphs False to skip the try).")
        return False

    def _leave_capture_state(self, device: torch.device) -> None:
        """After a failed capture, record one trivial graph: its capture_end resets what a failed
        capture_end can leave set (the CUDA generator's capture flag, with which the next eager
        random op would raise). Best effort: the eager updates that follow show what is left."""
        try:
            scratch = torch.zeros(1, device=device)
            graph = self.cuda.CUDAGraph()
            with self.cuda.stream(self.stream), self.cuda.graph(graph, stream=self.stream,
                                                                capture_error_mode="thread_local"):
                scratch.add_(1.0)
        except Exception:  # noqa: BLE001 - the capture's own error has been reported
            pass

    def _record_segments(self) -> None:
        """Record the update as graphs that end where it hands a collective to `between`."""
        self._pool = self.cuda.graph_pool_handle()
        with self.cuda.stream(self.stream):
            self._open_segment()
            try:
                self.outputs = self.update(self.inputs)
                self._close_segment(None)
            except BaseException:
                if self._open is not None:  # end the capture the failure interrupted
                    try:
                        self._open.capture_end()
                    except Exception:  # noqa: BLE001 - the first error is the one to report
                        pass
                    self._open = None
                raise

    def _open_segment(self) -> None:
        graph = self.cuda.CUDAGraph()
        graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
        self._open = graph

    def _close_segment(self, collective: Callable[[], object] | None) -> None:
        graph, self._open = self._open, None
        graph.capture_end()
        self.segments.append((graph, collective))


class Agent:
    """World model + task actor-critic (+ exploration behaviour), their optimisers and counters."""

    def __init__(self, obs_space: Mapping[str, gymnasium.spaces.Box], act_space: gymnasium.Space, config,
                 device: torch.device, seed: int | None = None):
        self.config, self.device = config, torch.device(device)
        self.obs_space, self.act_space = dict(obs_space), act_space
        self.discrete = isinstance(act_space, gymnasium.spaces.Discrete)
        self.actor_dist = resolve_actor_dist(act_space, config.actor_dist)  # auto: from the action space
        self.action_dim = action_size(act_space, self.actor_dist)
        self.precision = str(config.precision)
        self.behavior = config.behavior
        self.eval_sample = bool(config.eval_sample)
        self.wm = WorldModel(obs_space, self.action_dim, config).to(self.device)
        feat_size = self.wm.rssm.feat_size
        self.task = ActorCritic(feat_size, self.action_dim, self.actor_dist, config).to(self.device)
        self.expl = None
        if self.behavior == "plan2explore":
            self.expl = Plan2Explore(feat_size, self.wm.rssm.stoch_size, self.action_dim, self.actor_dist,
                                     config).to(self.device)
        elif self.behavior not in ("greedy", "random"):
            raise ValueError(f"behavior must be greedy, random or plan2explore, got '{self.behavior}'.")
        self.set_stack_steps(self.device.type == "cuda")  # few large kernels on a GPU, cache-sized rows on a CPU
        self.graph_update = CudaGraphUpdate(self._update, int(config.graph_warmup)) \
            if use_cuda_graphs(config, self.device) else None
        self.optimizers = self._make_optimizers()
        self.updates = 0
        self.grad_sync: GradSync | None = None
        self.rng = np.random.default_rng(int(config.seed) if seed is None else int(seed))  # random actions

    def _make_optimizers(self) -> dict[str, Optimizer]:
        cfg, scaler = self.config, self.precision == "16"
        ac = dict(eps=float(cfg.ac_eps), clip=float(cfg.ac_grad_clip), device=self.device, use_scaler=scaler,
                  capturable=self.graphed)
        opts = {
            "model": Optimizer(self.wm.parameters(), float(cfg.model_lr), float(cfg.model_eps),
                               float(cfg.model_grad_clip), self.device, scaler, capturable=self.graphed),
            "actor": Optimizer(self.task.actor.parameters(), float(cfg.actor_lr), **ac),
            "critic": Optimizer(self.task.critic.parameters(), float(cfg.critic_lr), **ac),
        }
        if self.expl is not None:
            opts["expl_ensemble"] = Optimizer(self.expl.ensemble.parameters(), float(cfg.plan2explore.lr), **ac)
            opts["expl_actor"] = Optimizer(self.expl.ac.actor.parameters(), float(cfg.actor_lr), **ac)
            opts["expl_critic"] = Optimizer(self.expl.ac.critic.parameters(), float(cfg.critic_lr), **ac)
        return opts

    @property
    def graphed(self) -> bool:
        """Whether updates replay as a CUDA graph (autocast then keeps no weight cache)."""
        return self.graph_update is not None

    def set_grad_sync(self, fn: Callable | None, graph_safe: bool = False) -> None:
        """Hook called with each parameter group after backward and before clipping (e.g. all-reduce).
        A `graph_safe` hook also takes `run=` and runs its collectives through it (as
        distributed.DistSync.grads does): CUDA-graph updates then run them between their graphs
        (CudaGraphUpdate.between); with any other hook, updates run eagerly."""
        self.grad_sync = self._collective_hook(fn, graph_safe)

    def set_return_gather(self, fn: Callable[..., torch.Tensor] | None, graph_safe: bool = False) -> None:
        """Function that concatenates a flat tensor over all processes (e.g. all_gather); the return
        normalisers then take their percentiles over the imagined returns of every process.
        `graph_safe` as for set_grad_sync."""
        gather = self._collective_hook(fn, graph_safe)
        for ac in self.actor_critics:
            ac.return_gather = gather

    def set_capture_agreement(self, agree: Callable[[bool], bool]) -> None:
        """agree(ok) -> whether every rank captured its CUDA-graph update (see CudaGraphUpdate)."""
        if self.graph_update is not None:
            self.graph_update.agree = agree

    def _collective_hook(self, fn: Callable | None, graph_safe: bool) -> Callable | None:
        """`fn` as the update calls it: a graph-safe hook with CudaGraphUpdate.between as its `run`;
        any other hook makes updates run eagerly (its collectives must not be captured)."""
        if fn is None:
            return None
        if not graph_safe:
            self.graph_update = None
            return fn
        if self.graph_update is None:  # eager updates: the collectives run where they come
            return lambda x: fn(x, run=run_at_once)
        self.graph_update.segmented = True
        between = self.graph_update.between
        return lambda x: fn(x, run=between)

    @property
    def actor_critics(self) -> list[ActorCritic]:
        """The task's actor-critic and, with plan2explore, the exploration one."""
        return [self.task] + ([self.expl.ac] if self.expl is not None else [])

    def set_stack_steps(self, on: bool) -> None:
        """Whether imagination runs on the stacked steps (see ActorCritic.stack_steps)."""
        for ac in self.actor_critics:
            ac.stack_steps = on

    # -- training ----------------------------------------------------------------------------

    def _step(self, name: str, loss: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        return self.optimizers[name].step(loss, self.grad_sync, retain_graph)

    def task_reward(self, feat: torch.Tensor, action: torch.Tensor, next_feat: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
        """The task's reward of imagined transitions (see models.RewardFn): the reward head on next_feat."""
        return {"reward": self.wm.reward(next_feat)}

    def _train_actor_critic(self, ac: ActorCritic, prefix: str, start: Mapping[str, torch.Tensor],
                            reward_fn: RewardFn) -> dict[str, torch.Tensor]:
        with autocast(self.device, self.precision, cache=not self.graphed), frozen(self.wm):
            actor_loss, critic_loss, metrics = ac.losses(self.wm, start, reward_fn)
        metrics["grad/actor_norm"] = self._step(f"{prefix}actor", actor_loss, retain_graph=True)
        metrics["grad/critic_norm"] = self._step(f"{prefix}critic", critic_loss)
        return metrics

    def update_slow_critics(self) -> None:
        """Every `slow_target_update` updates, move the slow critics toward the critics."""
        if self.updates % int(self.config.slow_target_update) == 0:
            for ac in self.actor_critics:
                ac.update_slow_critic()

    def train_world_model(self, batch: Mapping[str, torch.Tensor]
                          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One world-model update. Returns the filtered states (B, T, ...) and the metrics."""
        with autocast(self.device, self.precision, cache=not self.graphed):
            model_loss, states, metrics = self.wm.loss(batch)
        metrics["grad/model_norm"] = self._step("model", model_loss)
        return states, metrics

    def train_behavior(self, states: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
        """Actor and critic updates (task, and exploration if any) imagined from every posterior
        state of the batch (B*T starts). Never changes world-model parameters."""
        start = {
            "stoch": states["stoch"].detach().reshape(-1, states["stoch"].shape[-1]),  # (B*T, S*C)
            "deter": states["deter"].detach().reshape(-1, states["deter"].shape[-1]),  # (B*T, D)
            "cont": 1.0 - batch["is_terminal"].reshape(-1).float(),  # (B*T,)
        }
        metrics = self._train_actor_critic(self.task, "", start, self.task_reward)
        if self.expl is not None:
            with autocast(self.device, self.precision, cache=not self.graphed):
                ensemble_loss = self.expl.ensemble_loss(states, batch)
            metrics["loss/expl_ensemble"] = ensemble_loss.detach()
            metrics["grad/expl_ensemble_norm"] = self._step("expl_ensemble", ensemble_loss)
            reward_fn = self.expl.reward_terms(self.wm)
            expl = self._train_actor_critic(self.expl.ac, "expl_", start, reward_fn)
            metrics.update({k.replace("/", "/expl_", 1): v for k, v in expl.items()})
        return metrics

    def train_step(self, batch: Mapping[str, torch.Tensor],
                   after_world_model: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
        """One update of the world model, then of the task actor and critic (and the exploration
        behaviour). batch: (B, T, ...) tensors on the device. Returns detached 0-dim metric tensors.
        `after_world_model` is called between the two halves of an eager update (benchmarks time
        them apart); a CUDA-graph update replays as one piece and never calls it."""
        self.updates += 1
        if self.graph_update is not None:
            metrics = self.graph_update(batch)
        else:
            metrics = self._update(batch, after_world_model)
        self.update_slow_critics()
        return metrics

    def _update(self, batch: Mapping[str, torch.Tensor],
                after_world_model: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
        states, metrics = self.train_world_model(batch)
        if after_world_model is not None:
            after_world_model()
        metrics.update(self.train_behavior(states, batch))
        return metrics

    # -- acting ------------------------------------------------------------------------------

    def initial_state(self, n: int) -> PolicyState:
        stoch, deter = self.wm.rssm.initial(n)
        return stoch.detach().clone(), deter.detach().clone(), torch.zeros(n, self.action_dim, device=self.device)

    def _obs_to_device(self, obs: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        keys = self.wm.encoder.cnn_keys + self.wm.encoder.mlp_keys
        return {k: torch.as_tensor(np.asarray(obs[k])).to(self.device, non_blocking=True) for k in keys}

    @torch.no_grad()
    def policy(self, obs: Mapping[str, np.ndarray], state: PolicyState | None, mode: str = "train"
               ) -> tuple[np.ndarray, PolicyState]:
        """Actions (N, A) float32 for a batch of env observations and the next policy state.
        mode 'train': the behaviour policy (sampled); 'eval': the task actor's mode, or a sample
        from it with `eval_sample` (as the paper's code evaluates every task)."""
        if mode not in ("train", "eval"):
            raise ValueError(f"policy mode must be 'train' or 'eval', got '{mode}'.")
        is_first = torch.as_tensor(np.asarray(obs["is_first"]), dtype=torch.bool).reshape(-1).to(self.device)
        n = is_first.shape[0]
        stoch, deter, prev_action = self.initial_state(n) if state is None else state
        with autocast(self.device, self.precision):
            embed = self.wm.encoder(self._obs_to_device(obs))
            stoch, deter, _ = self.wm.rssm.obs_step(stoch, deter, prev_action, embed, is_first)
            feat = features(stoch, deter)
            if mode == "train" and self.behavior == "random":
                action = torch.as_tensor(self.random_actions(n), device=self.device)
            else:
                actor = self.expl.ac.actor if (mode == "train" and self.expl is not None) else self.task.actor
                dist = actor(feat)
                action = dist.sample() if mode == "train" or self.eval_sample else dist.mode()
        action = action.float()
        if not self.discrete:
            action = action.clamp(-1.0, 1.0)
        return action.cpu().numpy(), (stoch, deter, action)

    def reseed_random_actions(self, seed: int) -> None:
        self.rng = np.random.default_rng(int(seed))

    def random_actions(self, n: int) -> np.ndarray:
        """Uniform random actions (N, A) float32: one-hot for Discrete, uniform in [-1, 1] for Box."""
        if self.discrete:
            return np.eye(self.action_dim, dtype=np.float32)[self.rng.integers(self.action_dim, size=n)]
        return self.rng.uniform(-1.0, 1.0, (n, self.action_dim)).astype(np.float32)

    # -- reporting ---------------------------------------------------------------------------

    @torch.no_grad()
    def report(self, batch: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Open-loop prediction videos 'openloop/<key>' (T, 3*H, n*W, 3) uint8 for each decoded image:
        observe the first 5 steps, imagine the rest with the batch's actions; rows are truth,
        prediction and error ((pred - truth + 1) / 2), one column per sequence."""
        if not self.wm.decoder.cnn_keys:
            return {}
        n = min(OPENLOOP_SEQUENCES, batch["is_first"].shape[0])
        length = batch["is_first"].shape[1]
        context = min(OPENLOOP_CONTEXT, length)
        sub = {k: v[:n] for k, v in batch.items()}
        with autocast(self.device, self.precision):
            states = self.wm.observe({k: v[:, :context] for k, v in sub.items()})
            feats = [features(states["stoch"], states["deter"])]  # (n, context, F)
            stoch, deter = states["stoch"][:, -1], states["deter"][:, -1]
            imagined = []
            for t in range(context, length):
                stoch, deter = self.wm.rssm.img_step(stoch, deter, sub["action"][:, t])
                imagined.append(features(stoch, deter))
            if imagined:
                feats.append(torch.stack(imagined, 1))
            recon = self.wm.decoder(torch.cat(feats, 1))
        videos = {}
        for key in self.wm.decoder.cnn_keys:
            truth = sub[key].float() / 255.0  # (n, T, H, W, C)
            model = recon[key].float().clamp(0.0, 1.0)
            error = (model - truth + 1.0) / 2.0
            video = torch.cat([truth, model, error], 2)  # (n, T, 3H, W, C)
            if video.shape[-1] == 1:
                video = video.expand(*video.shape[:-1], 3)
            video = video[..., :3].permute(1, 2, 0, 3, 4).reshape(length, video.shape[2], -1, 3)
            videos[f"openloop/{key}"] = (video * 255).round().to(torch.uint8).cpu().numpy()
        return videos

    def nonfinite_parts(self) -> list[str]:
        """The agent's parts whose parameters hold a NaN or inf (a diverged update); one host sync."""
        parts = {"world model": self.wm, "task actor and critic": self.task, "exploration": self.expl}
        parts = {name: list(module.parameters()) for name, module in parts.items() if module is not None}
        with torch.no_grad():
            finite = torch.stack([torch.stack([p.isfinite().all() for p in params]).all()
                                  for params in parts.values()]).tolist()
        return [name for name, ok in zip(parts, finite) if not ok]

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "wm": self.wm.state_dict(), "task": self.task.state_dict(),
            "expl": self.expl.state_dict() if self.expl is not None else None,
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
            "updates": self.updates, "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.wm.load_state_dict(state["wm"])
        self.task.load_state_dict(state["task"])
        if self.expl is not None:
            if state.get("expl") is None:
                raise ValueError("The checkpoint has no plan2explore state but behavior is plan2explore; "
                                 "resume with the checkpoint's own --behavior.")
            self.expl.load_state_dict(state["expl"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        self.updates = int(state["updates"])
        self.rng.bit_generator.state = state["rng"]
        if self.graph_update is not None:
            self.graph_update.reset()  # the graph holds the replaced optimizer state: record anew


def use_cuda_graphs(config: Config, device: torch.device) -> bool:
    """Whether updates replay as CUDA graphs: asked for, on CUDA, and not float16 (its gradient
    scaler reads values back to the host each step). A config asking for it elsewhere trains
    eagerly (the config's comment says so)."""
    return bool(config.cuda_graphs) and device.type == "cuda" and str(config.precision) != "16"


def make_agent(obs_space: Mapping[str, gymnasium.spaces.Box], act_space: gymnasium.Space, config: Config,
               device: torch.device | str, seed: int | None = None) -> Agent:
    """The agent for these spaces and config, on `device`, with the behaviour `config.behavior`;
    `seed` (config.seed when not given) seeds its random actions."""
    return Agent(obs_space, act_space, config, torch.device(device), seed)


def synthetic_batch(obs_space: Mapping[str, gymnasium.spaces.Box], act_space: gymnasium.Space,
                    batch_size: int, length: int, device: torch.device | str = "cpu",
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """A random training batch (B, T, ...) in the loop's format, for tests and benchmarks: uint8
    images, float vectors, actions (zeros on is_first steps), rewards, and episode flags with an
    episode start at t=0 and one in the middle of every sequence."""
    gen = torch.Generator().manual_seed(seed)
    batch: dict[str, torch.Tensor] = {}
    for key, space in obs_space.items():
        if key in ("is_first", "is_last", "is_terminal", "reward") or key.startswith("log_"):
            continue
        shape = (batch_size, length, *space.shape)
        if space.dtype == np.uint8:
            batch[key] = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        else:
            batch[key] = torch.randn(shape, generator=gen)
    is_first = torch.zeros(batch_size, length, dtype=torch.bool)
    is_first[:, 0] = True
    is_first[:, length // 2] = True
    if isinstance(act_space, gymnasium.spaces.Discrete):
        index = torch.randint(0, int(act_space.n), (batch_size, length), generator=gen)
        action = F.one_hot(index, int(act_space.n)).float()
    else:
        action = torch.rand(batch_size, length, int(act_space.shape[0]), generator=gen) * 2 - 1
    batch["action"] = action * (~is_first).unsqueeze(-1).float()
    batch["reward"] = torch.randn(batch_size, length, generator=gen)
    batch["is_first"] = is_first
    batch["is_last"] = torch.roll(is_first, -1, 1)
    batch["is_terminal"] = batch["is_last"] & (torch.rand(batch_size, length, generator=gen) < 0.5)
    return {k: v.to(device) for k, v in batch.items()}
