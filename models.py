"""DreamerV3's learning: the world model and the imagination actor-critic.

- `WorldModel`: encoder, RSSM, decoder, reward and continue heads; its loss (reconstruction, two-hot
  reward, Bernoulli continuation, balanced KL with free bits) and imagination from posterior states.
- `ActorCritic`: actor, two-hot critic with a slow EMA copy, percentile return normaliser; trained on
  lambda-returns of imagined trajectories.
- `Optimizer`: Adam with gradient-norm clipping, an optional gradient hook (multi-GPU all-reduce) and
  a gradient scaler for float16.

Nothing here calls `.item()`: metrics are detached 0-dim tensors, gathered by the caller.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Mapping

import gymnasium
import torch
from torch import nn

from config import ConfigError
from distributions import Bernoulli, OneHotCategorical, TwoHotSymlog, categorical_kl
from networks import (RSSM, Actor, Head, MultiDecoder, MultiEncoder, check_key_selections, features,
                      maybe_compile)
from tools import symlog

GradSync = Callable[[list[nn.Parameter]], None]
# run(collective): runs a collective (e.g. an all-reduce of a gradient buffer) at once, or, while a
# CUDA-graph update is captured, between two of its graphs (exploration.CudaGraphUpdate.between)
RunCollective = Callable[[Callable[[], object]], None]

# reward_fn(feat (..., F), action (..., A), next_feat (..., F)) -> {name: (...) reward term}: the
# reward terms of imagined transitions feat --action--> next_feat (e.g. the reward head on next_feat,
# or a prediction from (feat, action)); the terms are summed. It is called per imagined step with
# (N, .) tensors, or once with the (H, N, .) steps stacked, so it must treat leading axes alike.
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def run_at_once(collective: Callable[[], object]) -> None:
    """The RunCollective of eager updates: the collective runs where the update reaches it."""
    collective()


# ----------------------------------------------------------------------------------------------
# Small pieces of maths


def squared_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(pred - target)^2 elementwise, in one pass forward and one backward (mse_loss unreduced;
    a subtraction and a square were two passes each way over the decoded images)."""
    return nn.functional.mse_loss(pred, target, reduction="none")


def summed_reward(terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The reward: the sum of a RewardFn's terms, float32 (...)."""
    first, *rest = terms.values()  # a reward function returns at least one term
    total = first.float()
    for term in rest:
        total = total + term.float()
    return total


def lambda_returns(reward: torch.Tensor, value: torch.Tensor, disc: torch.Tensor, lam: float) -> torch.Tensor:
    """Bootstrapped lambda-returns.

    reward (H, N): reward on arriving at step t+1; value (H+1, N); disc (H, N): discount times the
    continuation of step t+1. R_t = r_t + disc_t * ((1 - lam) * v_{t+1} + lam * R_{t+1}), R_H = v_H.
    Returns (H, N).

    The recursion unrolled: with a_t = r_t + disc_t (1 - lam) v_{t+1} (a_H = v_H) and b_t = lam disc_t,
    R_t = sum_{k=t..H} (b_t ... b_{k-1}) a_k. The products come from one cumulative product over a
    (H, H, N) triangle, so the returns take a handful of kernels instead of a few per step, forward
    and backward (90 fewer per update than the 15-step loop, whose backward also zero-filled a
    gradient per step). cumprod's gradient is exact where a discount is 0 (a terminal step).
    """
    horizon = reward.shape[0]
    assert value.shape[0] == horizon + 1 and disc.shape == reward.shape, (reward.shape, value.shape, disc.shape)
    addend = torch.cat([reward + disc * (1.0 - lam) * value[1:], value[-1:]])  # a (H+1, N)
    steps = torch.arange(horizon, device=reward.device)
    from_t = (steps[None, :] >= steps[:, None]).unsqueeze(-1)  # (H, H, 1): [t, j] is j >= t
    factors = torch.where(from_t, lam * disc.unsqueeze(0), 1.0)  # (H, H, N): b_j from j = t on, else 1
    products = torch.cat([torch.ones_like(factors[:, :1]), factors.cumprod(1)], 1)  # (H, H+1, N): [t, k] = b_t..b_{k-1} for k > t
    weights = products * torch.cat([from_t, from_t[:, -1:]], 1)  # (H, H+1, N), 0 where k < t
    return (weights * addend.unsqueeze(0)).sum(1)  # (H, N)


def kl_losses(post: torch.Tensor, prior: torch.Tensor, free: float) -> tuple[torch.Tensor, ...]:
    """Balanced KL with free bits, from log-probabilities (..., stoch, classes).

    dyn = max(free, KL(sg(post) || prior)) trains the prior; rep = max(free, KL(post || sg(prior)))
    trains the representation. Returns (dyn, rep, raw KL value), each (...)."""
    dyn = categorical_kl(post.detach(), prior)
    rep = categorical_kl(post, prior.detach())
    return dyn.clamp(min=free), rep.clamp(min=free), dyn.detach()


class ReturnNormalizer(nn.Module):
    """EMA of the `low`-th and `high`-th percentiles of the returns; the advantage scale is
    max(max_, high_ema - low_ema)."""

    def __init__(self, low: float = 5.0, high: float = 95.0, decay: float = 0.99, max: float = 1.0):
        super().__init__()
        self.decay, self.min_scale = decay, max
        self.register_buffer("quantiles", torch.tensor([low / 100.0, high / 100.0]), persistent=False)
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))

    @torch.no_grad()
    def update(self, returns: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """EMA step toward this batch's percentiles; `gather` (multi-process training) concatenates
        the flat returns of all processes so every process takes the same step."""
        returns = returns.detach().float().flatten()
        if gather is not None:
            returns = gather(returns)
        low, high = torch.quantile(returns, self.quantiles)
        self.low.lerp_(low, 1.0 - self.decay)
        self.high.lerp_(high, 1.0 - self.decay)

    def scale(self) -> torch.Tensor:
        return (self.high - self.low).clamp(min=self.min_scale)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters of `module` do not require grad inside the block (gradients still flow through its
    activations): autograd then neither saves nor computes anything for its weights."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def autocast(device: torch.device, precision: str | int, cache: bool = True):
    """Autocast context for precision '32' (off), '16' (float16) or 'bf16' (bfloat16). `cache`
    keeps each weight's low-precision copy for the whole block; it must be off while a CUDA graph
    is captured (the cached copies would outlive the capture)."""
    precision = str(precision)
    if precision == "32":
        return contextlib.nullcontext()
    if precision not in ("16", "bf16"):
        raise ValueError(f"precision must be 32, 16 or bf16, got '{precision}'. Use --precision 32.")
    dtype = torch.float16 if precision == "16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def as_param_layout(param: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """The gradient with its parameter's strides. autograd.grad returns whatever layout the backward
    kernel produced (cuDNN gives convolution weights channels-last gradients), while fused Adam
    needs parameters, gradients and moments laid out alike (backward() would fix this itself)."""
    if grad is None:
        return torch.zeros_like(param)
    if grad.stride() == param.stride():
        return grad
    return torch.empty_like(param).copy_(grad)


class Optimizer:
    """Adam over one parameter group with gradient-norm clipping; an optional hook sees the gradients
    after backward and before clipping; float16 training gets its own gradient scaler."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, eps: float, clip: float,
                 device: torch.device, use_scaler: bool = False, capturable: bool = False):
        self.params = list(params)
        self.lr, self.eps, self.clip, self.capturable = lr, eps, clip, capturable
        try:  # capturable: its step counters live on the device, so a CUDA graph can replay step()
            self.adam = torch.optim.Adam(self.params, lr=lr, eps=eps, fused=True, capturable=capturable)
        except (RuntimeError, TypeError):
            self.adam = torch.optim.Adam(self.params, lr=lr, eps=eps, foreach=True, capturable=capturable)
        self.scaler = torch.amp.GradScaler(device.type) if use_scaler else None

    def step(self, loss: torch.Tensor, grad_sync: GradSync | None = None, retain_graph: bool = False
             ) -> torch.Tensor:
        """Gradients of `loss` for this group only (other modules' grads are never touched), hook,
        clip, Adam step. Returns the gradient norm before clipping (0-dim tensor)."""
        scaled = self.scaler.scale(loss) if self.scaler else loss
        grads = torch.autograd.grad(scaled, self.params, retain_graph=retain_graph, allow_unused=True)
        for param, grad in zip(self.params, grads):
            param.grad = as_param_layout(param, grad)
        if grad_sync is not None:  # before unscaling: an overflow on any rank, which the average
            grad_sync(self.params)  # carries to all, then makes every rank's scaler skip the step
        if self.scaler:
            self.scaler.unscale_(self.adam)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if self.scaler:
            self.scaler.step(self.adam)
            self.scaler.update()
        else:
            self.adam.step()
        for param in self.params:
            param.grad = None
        return norm.detach()

    def state_dict(self) -> dict:
        return {"adam": self.adam.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: Mapping) -> None:
        """Adam's moments and steps from `state`; the learning rate, epsilon and `capturable` stay
        this run's own (a resume may change the rates; a checkpoint of an eager run resumes with
        CUDA graphs and the other way round)."""
        self.adam.load_state_dict(state["adam"])
        for group in self.adam.param_groups:
            group.update(lr=self.lr, eps=self.eps, capturable=self.capturable)
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def resolve_actor_dist(act_space: gymnasium.Space, actor_dist: str) -> str:
    """The policy distribution for `act_space`: `auto` picks onehot for Discrete actions and normal
    for a continuous Box; an explicit choice is checked against the space (action_size)."""
    if actor_dist == "auto":
        actor_dist = "onehot" if isinstance(act_space, gymnasium.spaces.Discrete) else "normal"
    action_size(act_space, actor_dist)
    return actor_dist


def action_size(act_space: gymnasium.Space, actor_dist: str) -> int:
    """Width of the (N, A) action vectors; checks that actor_dist fits the action space."""
    if isinstance(act_space, gymnasium.spaces.Discrete):
        if actor_dist != "onehot":
            raise ConfigError(
                f"The action space is Discrete({act_space.n}) but actor_dist is '{actor_dist}'. "
                "Discrete actions need a categorical policy: use --actor_dist onehot.")
        return int(act_space.n)
    if isinstance(act_space, gymnasium.spaces.Box) and len(act_space.shape) == 1:
        if actor_dist != "normal":
            raise ConfigError(
                f"The action space is a continuous Box{tuple(act_space.shape)} but actor_dist is "
                f"'{actor_dist}'. Continuous actions need a Gaussian policy: use --actor_dist normal.")
        return int(act_space.shape[0])
    raise ValueError(
        f"Unsupported action space {act_space}: expected gymnasium Discrete(n) or a 1-D Box in [-1, 1]. "
        "Wrap the env so that its act_space is one of these (e.g. flatten a multi-dimensional Box).")


# ----------------------------------------------------------------------------------------------
# World model


class WorldModel(nn.Module):
    """Encoder, RSSM, decoder, reward and continue heads, and the world-model loss."""

    def __init__(self, obs_space: Mapping[str, gymnasium.spaces.Box], action_dim: int, config):
        super().__init__()
        self.config = config
        eps = float(config.norm_eps)
        check_key_selections(obs_space, {"encoder": config.encoder, "decoder": config.decoder})  # both at once
        self.encoder = MultiEncoder(obs_space, **config.encoder, norm_eps=eps)
        self.rssm = RSSM(action_dim, self.encoder.out_dim, **config.rssm, norm_eps=eps, compile=bool(config.compile))
        feat = self.rssm.feat_size
        self.decoder = MultiDecoder(feat, obs_space, **config.decoder, norm_eps=eps)
        rh, ch = config.reward_head, config.cont_head
        self.reward_head = Head(feat, rh.bins, rh.units, rh.layers, eps, out_scale=0.0)
        self.cont_head = Head(feat, 1, ch.units, ch.layers, eps, out_scale=1.0)
        self._loss = maybe_compile(self._loss_eager, bool(config.compile), "world model heads and loss")
        # the training batch's encoding (and report()'s, a second shape); the policy's calls (a few
        # rows per env step, a new shape at every batch of envs) stay eager
        self._encode = maybe_compile(self.encoder.forward, bool(config.compile), "encoder")

    def reward(self, feat: torch.Tensor) -> torch.Tensor:
        """Predicted reward (mean of the two-hot head), (...)."""
        return TwoHotSymlog(self.reward_head(feat)).mean

    def cont(self, feat: torch.Tensor) -> torch.Tensor:
        """Predicted continuation flag (mode of the Bernoulli head, 0 or 1), (...)."""
        return Bernoulli(self.cont_head(feat).squeeze(-1)).mode()

    def observe(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encode the whole sequence at once and filter it: see RSSM.observe."""
        embed = self._encode({k: batch[k] for k in self.encoder.cnn_keys + self.encoder.mlp_keys})
        return self.rssm.observe(embed, batch["action"], batch["is_first"])

    def _heads_loss_eager(self, feat: torch.Tensor, post: torch.Tensor, prior: torch.Tensor,
                          targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-step loss terms (B, T) of the heads and the KL, from features and targets."""
        cfg = self.config
        terms: dict[str, torch.Tensor] = {}
        recon = self.decoder(feat)
        # squared errors summed over each observation (uint8 images / 255 convert in the division)
        image = [squared_error(recon[k].float(), targets[k] / 255.0).sum((-3, -2, -1))
                 for k in self.decoder.cnn_keys]
        vector = [squared_error(recon[k].float(), symlog(targets[k].float())).sum(-1)
                  for k in self.decoder.mlp_keys]
        if image:
            terms["image"] = sum(image)
        if vector:
            terms["vector"] = sum(vector)
        reward = targets["reward"].float() * float(cfg.reward_scale)
        terms["reward"] = -TwoHotSymlog(self.reward_head(feat)).log_prob(reward)
        cont = 1.0 - targets["is_terminal"].float()
        terms["cont"] = -Bernoulli(self.cont_head(feat).squeeze(-1)).log_prob(cont)
        terms["kl_dyn"], terms["kl_rep"], terms["kl"] = kl_losses(post, prior, float(cfg.kl_free))
        return terms

    def loss_scales(self) -> dict[str, float]:
        """The weight of each loss term of _heads_loss_eager in the world-model loss ("kl", the raw
        KL, is a metric only)."""
        cfg = self.config
        return {"image": float(cfg.image_loss_scale), "vector": float(cfg.vector_loss_scale),
                "reward": float(cfg.reward_head.loss_scale), "cont": float(cfg.cont_head.loss_scale),
                "kl_dyn": float(cfg.kl_dyn_scale), "kl_rep": float(cfg.kl_rep_scale)}

    def _loss_eager(self, feat: torch.Tensor, post: torch.Tensor, prior: torch.Tensor,
                    targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The world-model loss (the mean over B and T of the terms' weighted sum) and the means
        (detached) of each term of _heads_loss_eager and of the posterior's and prior's entropies."""
        terms = self._heads_loss_eager(feat, post, prior, targets)
        scales = self.loss_scales()
        total = sum(scales[k] * v for k, v in terms.items() if k in scales)  # (B, T)
        means = {k: v.detach().mean() for k, v in terms.items()}
        with torch.no_grad():
            means["post_entropy"] = OneHotCategorical.from_log_probs(post, 1).entropy().mean()
            means["prior_entropy"] = OneHotCategorical.from_log_probs(prior, 1).entropy().mean()
        return total.mean(), means

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict, dict[str, torch.Tensor]]:
        """World-model loss (mean over B and T of the weighted sum of terms), the filtered states and
        the metrics."""
        states = self.observe(batch)
        feat = features(states["stoch"], states["deter"])  # (B, T, F)
        targets = {k: batch[k] for k in self.decoder.cnn_keys + self.decoder.mlp_keys + ["reward", "is_terminal"]}
        loss, means = self._loss(feat, states["post"], states["prior"], targets)
        scaled = self.loss_scales()
        metrics = {f"loss/{k}": v for k, v in means.items() if k in scaled}
        metrics["loss/model"] = loss.detach()
        metrics.update({f"model/{k}": means[k] for k in ("kl", "post_entropy", "prior_entropy")})
        return loss, states, metrics


# ----------------------------------------------------------------------------------------------
# Actor-critic


class ActorCritic(nn.Module):
    """Actor, critic, slow critic and return normaliser, trained on imagined trajectories."""

    def __init__(self, feat_size: int, action_dim: int, actor_dist: str, config):
        super().__init__()
        self.config = config
        eps = float(config.norm_eps)
        self.actor = Actor(feat_size, action_dim, actor_dist, norm_eps=eps, **config.actor)
        cc = config.critic
        self.critic = Head(feat_size, cc.bins, cc.units, cc.layers, eps, out_scale=0.0)
        self.slow_critic = Head(feat_size, cc.bins, cc.units, cc.layers, eps, out_scale=0.0)
        self.slow_critic.load_state_dict(self.critic.state_dict())
        self.slow_critic.requires_grad_(False)
        self.return_norm = ReturnNormalizer(**config.return_norm)
        self.backprop = actor_dist == "normal"  # continuous: dynamics backprop; discrete: REINFORCE
        self.return_gather: Callable[[torch.Tensor], torch.Tensor] | None = None  # see Agent.set_return_gather
        # Evaluate the critic, slow critic and continue heads and the reward terms once on the
        # stacked imagined steps, and take the actor's parameter gradients once over them
        # (networks.ActorScan): few, large kernels, right for a GPU; or all of it per step
        # (cache-sized tensors, right for a CPU: the actor's scan alone made a size S update 11%
        # slower there). The same numbers either way. The Agent sets it from its device.
        self.stack_steps = False
        # One imagined step (features, actor, dynamics), compiled when asked (eager fallback with
        # one warning).
        self._imagine_step = maybe_compile(self._imagine_step_eager, bool(config.compile), "imagined step")
        # The heads and rewards on the stacked steps, the returns and the losses: compiled when
        # asked, fused kernels around the products where eager code makes a couple of hundred calls.
        self._stacked_heads = maybe_compile(self._stacked_heads_eager, bool(config.compile), "imagination heads")
        self._returns = maybe_compile(self._returns_eager, bool(config.compile), "lambda-returns")
        self._loss_terms = maybe_compile(self._loss_terms_eager, bool(config.compile), "actor-critic losses")

    def _act_eager(self, feat: torch.Tensor, noise: torch.Tensor, *scan_step: tuple
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple, tuple]:
        """The actor at one imagined step: an action (N, A) sampled with the given noise (see
        Actor.noise), its policy's tensors (see the distributions' tensors()) and, within an
        ActorScan (`scan_step` = its step(t)), the layer inputs the scan records (else empty);
        tensors only, so that it compiles as one graph."""
        if not scan_step:
            policy = self.actor(feat)
            return policy.sample(noise), policy.tensors(), (), ()
        policy, inputs, norm_inputs = self.actor.scan_step(feat, *scan_step)
        return policy.sample(noise), policy.tensors(), inputs, norm_inputs

    def _imagine_step_eager(self, wm: WorldModel, stoch: torch.Tensor, deter: torch.Tensor, noise: torch.Tensor,
                            uniform: torch.Tensor, *scan_step: tuple) -> tuple:
        """One imagined step from the state (stoch (N, S*C), deter (N, D)): its features (N, F),
        the actor's action (N, A) and policy tensors and the layer inputs an ActorScan records (see
        _act_eager), and the next state the dynamics predict with the prior's `uniform` (N, S).
        Features, actor and dynamics in one function, so that compiled, the features' concatenation
        and the action's clipping fuse with the kernels around them. For continuous actions the
        action's gradient flows into the next state (backprop); for discrete ones the dynamics run
        without a graph (REINFORCE)."""
        feat = features(stoch, deter)  # (N, F)
        action, policy, inputs, norm_inputs = self._act_eager(feat.detach(), noise, *scan_step)
        with contextlib.nullcontext() if self.backprop else torch.no_grad():
            stoch, deter = wm.rssm._img_step(stoch, deter, action if self.backprop else action.detach(), uniform)
        return feat, action, policy, inputs, norm_inputs, stoch, deter

    @torch.no_grad()
    def update_slow_critic(self) -> None:
        fraction = float(self.config.slow_target_fraction)
        torch._foreach_lerp_(list(self.slow_critic.parameters()), list(self.critic.parameters()), fraction)

    def rollout(self, wm: WorldModel, start: Mapping[str, torch.Tensor], reward_fn: RewardFn) -> dict:
        """Imagine `imag_horizon` steps from the N start states with the actor. The critic, slow
        critic and continue heads run per imagined step (N rows at a time keeps every tensor small and
        cache-friendly on a CPU) or, with `stack_steps`, once on all H+1 steps (fewer, larger kernels
        on a GPU); so do the reward terms of reward_fn, per transition or on all H at once, and with
        `stack_steps` the actor's parameter gradients are taken once over the steps (ActorScan).

        The actor sees stop-gradient states. For continuous actions the sampled actions' gradients
        flow through the dynamics into later states, rewards and values (the backprop estimator);
        for discrete actions the dynamics run under no_grad (REINFORCE needs only the actor's graph).
        No action is taken at the last state (its value only bootstraps the returns), so the actor
        and the slow critic run at steps 0..H-1 and the critic's log-probabilities for its loss are
        kept for those steps only: nothing is computed whose loss weight would be zero.
        Returns stacked tensors: action (H, N, A), the policy distribution over (H, N), the critic's
        log-probabilities (H, N, bins) and value (H+1, N), the slow critic's value (H, N), the
        continuation (H+1, N), and the reward (H, N) on arriving at steps 1..H.
        """
        horizon = int(self.config.imag_horizon)
        stoch, deter = start["stoch"], start["deter"]
        # every step's random numbers drawn at once: H x (N, ...) each
        rows, device = deter.shape[0], deter.device
        actor_noise = self.actor.noise(horizon, rows, device).unbind(0)
        latent_uniforms = wm.rssm.latent_uniforms(horizon, rows, device).unbind(0)
        # with stacked steps, the actor's parameter gradients are taken once over all steps
        actor_scan = self.actor.scan(horizon, rows) if self.stack_steps else None
        feats, actions, policies, heads, rewards = [], [], [], {}, []
        for t in range(horizon + 1):
            last = t == horizon
            if last:  # at t = H only the value (the bootstrap) is needed: no action
                feat = features(stoch, deter)  # (N, F)
            else:
                scan_step = actor_scan.step(t) if actor_scan is not None else ()
                feat, action, policy, inputs, norm_inputs, stoch, deter = self._imagine_step(
                    wm, stoch, deter, actor_noise[t], latent_uniforms[t], *scan_step)
                if actor_scan is not None:
                    actor_scan.record(inputs, norm_inputs)
                policies.append(policy)
            if self.stack_steps:
                feats.append(feat)
            else:
                self._append_heads(heads, wm, feat, start["cont"] if t == 0 else None, last)
                if t >= 1:  # the transition into this step
                    rewards.append(summed_reward(reward_fn(prev_feat, actions[-1], feat)))  # (N,)
                prev_feat = feat
            if not last:
                actions.append(action)
        action = torch.stack(actions)  # (H, N, A)
        if self.stack_steps:
            feat = torch.stack(feats)  # (H+1, N, F)
            out = self._stacked_heads(wm, feat, action, start["cont"], reward_fn)
        else:
            out = {k: torch.stack(v) for k, v in heads.items()}
            out["reward"] = torch.stack(rewards)  # (H, N)
        out["action"] = action
        out["policy"] = self.actor.policy_from_tensors(*(torch.stack(x) for x in zip(*policies)))  # over (H, N)
        return out

    def _append_heads(self, heads: dict[str, list], wm: WorldModel, feat: torch.Tensor,
                      start_cont: torch.Tensor | None, last: bool) -> None:
        """The heads at one imagined step, appended to heads' lists: value and continuation at
        every step; the critic's log-probabilities and the slow value where an action is taken."""
        critic = TwoHotSymlog(self.critic(feat))  # one log-softmax for the value and the loss
        heads.setdefault("value", []).append(critic.mean)
        if not last:
            heads.setdefault("critic_log_probs", []).append(critic.log_probs)
            if self.config.slow_value_target:  # a regression target only: no graph
                with torch.no_grad():
                    heads.setdefault("slow", []).append(TwoHotSymlog(self.slow_critic(feat.detach())).mean)
        with torch.no_grad():  # predicted continuation (mode); the start's is 1 - is_terminal
            heads.setdefault("cont", []).append(start_cont.float() if start_cont is not None
                                                else wm.cont(feat.detach()))

    def _stacked_heads_eager(self, wm: WorldModel, feat: torch.Tensor, action: torch.Tensor,
                             start_cont: torch.Tensor, reward_fn: RewardFn) -> dict[str, torch.Tensor]:
        """The heads and the reward on all imagined steps at once; feat (H+1, N, F), action (H, N, A).
        Same outputs as _append_heads and the per-transition rewards."""
        critic = TwoHotSymlog(self.critic(feat))  # (H+1, N, bins)
        out = {"value": critic.mean, "critic_log_probs": critic.log_probs[:-1]}
        with torch.no_grad():
            if self.config.slow_value_target:
                out["slow"] = TwoHotSymlog(self.slow_critic(feat[:-1].detach())).mean  # (H, N)
            out["cont"] = torch.cat([start_cont.float()[None], wm.cont(feat[1:].detach())])  # (H+1, N)
        out["reward"] = summed_reward(reward_fn(feat[:-1], action, feat[1:]))  # (H, N)
        return out

    def _returns_eager(self, reward: torch.Tensor, value: torch.Tensor, cont: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss weights (H+1, N) (the discounted continuation up to each step) and the
        lambda-returns (H, N) from the reward (H, N), value (H+1, N) and continuation (H+1, N)."""
        discount = float(self.config.discount)
        weight = torch.cumprod(discount * cont, 0) / discount  # (H+1, N)
        # Bootstrapped from the critic itself, as in the paper's v1 code; the slow critic only
        # regularises the critic's predictions (_loss_terms_eager).
        returns = lambda_returns(reward, value, discount * cont[1:], float(self.config.discount_lambda))
        return weight, returns

    def _loss_terms_eager(self, returns: torch.Tensor, value: torch.Tensor, scale: torch.Tensor,
                          weight: torch.Tensor, action: torch.Tensor, policy: tuple[torch.Tensor, ...],
                          critic_log_probs: torch.Tensor, slow: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The actor and critic losses and the policy's mean entropy from the returns (H, N), the
        values (H+1, N), the return scale, the weights (H+1, N), the actions (H, N, A), the policy's
        stacked tensors (see the distributions' tensors(): tensors only, so that a compiled
        backward is probed on copies, see maybe_compile), the critic's log-probabilities
        (H, N, bins) and the slow critic's values (H, N) (None without slow_value_target)."""
        cfg = self.config
        policy = self.actor.policy_from_tensors(*policy)  # over (H, N)
        advantage = (returns - value[:-1]) / scale  # (H, N), normalised on both gradient paths
        if self.backprop:
            actor_loss = -advantage
        else:
            actor_loss = -policy.log_prob(action.detach()) * advantage.detach()
        entropy = policy.entropy()  # (H, N)
        actor_loss = actor_loss - float(cfg.actor.entropy) * entropy
        actor_loss = (actor_loss * weight[:-1]).mean()
        critic_dist = TwoHotSymlog.from_log_probs(critic_log_probs)  # (H, N, bins)
        targets, scales = [returns.detach()], [1.0]
        if slow is not None:  # the regulariser toward the slow critic's prediction
            targets.append(slow)
            scales.append(float(cfg.slow_reg_scale))
        critic_loss = -critic_dist.weighted_log_prob(targets, scales)  # (H, N)
        critic_loss = (critic_loss * weight[:-1]).mean()
        return actor_loss, critic_loss, entropy.detach().mean()

    def losses(self, wm: WorldModel, start: Mapping[str, torch.Tensor], reward_fn: RewardFn
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Imagine from the start states and compute the actor and critic losses.

        start: stoch (N, S*C), deter (N, D), cont (N,) = 1 - is_terminal of the start states.
        reward_fn(feat, action, next_feat) -> {name: reward term} per imagined transition; the
        reward is the terms' sum (see RewardFn).
        """
        traj = self.rollout(wm, start, reward_fn)
        reward, value = traj["reward"], traj["value"]
        weight, returns = self._returns(reward, value, traj["cont"])
        self.return_norm.update(returns, self.return_gather)  # eager: a quantile, and the gather across processes
        scale = self.return_norm.scale()
        actor_loss, critic_loss, entropy = self._loss_terms(
            returns, value, scale, weight, traj["action"], traj["policy"].tensors(), traj["critic_log_probs"],
            traj["slow"] if self.config.slow_value_target else None)
        metrics = {
            "loss/actor": actor_loss.detach(), "loss/critic": critic_loss.detach(),
            "actor/entropy": entropy, "return/p5": self.return_norm.low.clone(),
            "return/p95": self.return_norm.high.clone(), "return/scale": scale.detach(),
            "return/mean": returns.detach().mean(), "critic/value": value.detach()[:-1].mean(),
            "imagine/reward": reward.detach().mean(), "imagine/weight": weight[:-1].mean(),
        }
        return actor_loss, critic_loss, metrics
