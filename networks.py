"""DreamerV3's networks: the RSSM, the CNN/MLP encoders and decoders, and the MLP heads.

Every layer follows the paper's recipe: Linear without bias -> LayerNorm (eps `norm_eps`) -> SiLU,
weights drawn from a truncated normal scaled by the average fan; reward and critic output layers start
at zero. Sizes come in as keyword arguments of the config's sub-blocks (`RSSM(**cfg.rssm, ...)`).
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Callable, Mapping

import gymnasium
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from config import ConfigError
from distributions import (BoundedNormal, OneHotCategorical, sample_one_hot, unimix_log_probs, unimix_probs,
                           unimix_probs_and_log_probs)
from tools import symlog

# Observation keys that are bookkeeping, never model inputs or targets.
IGNORED_KEYS = ("is_first", "is_last", "is_terminal", "reward")


# ----------------------------------------------------------------------------------------------
# Initialisation and basic layers


def init_weight_(weight: torch.Tensor, fan_in: int, fan_out: int, scale: float = 1.0) -> None:
    """Truncated normal (+-2 std) with variance scale / mean(fan_in, fan_out); zeros when scale=0."""
    with torch.no_grad():
        if scale == 0.0:
            weight.zero_()
            return
        std = math.sqrt(scale / ((fan_in + fan_out) / 2)) / 0.87962566103423978
        nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


def make_linear(in_dim: int, out_dim: int, bias: bool = True, scale: float = 1.0) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim, bias=bias)
    init_weight_(layer.weight, in_dim, out_dim, scale)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class NormDense(nn.Module):
    """Linear (no bias) -> LayerNorm -> SiLU."""

    def __init__(self, in_dim: int, out_dim: int, norm_eps: float = 1e-3):
        super().__init__()
        self.linear = make_linear(in_dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.linear(x)))


class MLP(nn.Module):
    """`layers` NormDense blocks of `units` (optionally symlog on the inputs); layers=0 is identity."""

    def __init__(self, in_dim: int, units: int, layers: int, norm_eps: float = 1e-3,
                 symlog_inputs: bool = False):
        super().__init__()
        dims = [in_dim] + [units] * layers
        self.blocks = nn.Sequential(*[NormDense(a, b, norm_eps) for a, b in zip(dims[:-1], dims[1:])])
        self.out_dim = dims[-1]
        self.symlog_inputs = symlog_inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.symlog_inputs:
            x = symlog(x)
        return self.blocks(x)


class Head(nn.Module):
    """MLP followed by an output Linear (zero-initialised when out_scale is 0)."""

    def __init__(self, in_dim: int, out_dim: int, units: int, layers: int, norm_eps: float = 1e-3,
                 out_scale: float = 1.0):
        super().__init__()
        self.mlp = MLP(in_dim, units, layers, norm_eps)
        self.out = make_linear(self.mlp.out_dim, out_dim, scale=out_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(x))


class Actor(nn.Module):
    """Policy head: a BoundedNormal ('normal') or a unimix OneHotCategorical ('onehot')."""

    def __init__(self, in_dim: int, action_dim: int, dist: str, units: int, layers: int,
                 min_std: float = 0.1, max_std: float = 1.0, unimix: float = 0.01,
                 entropy: float = 0.0, norm_eps: float = 1e-3):
        """`entropy` is the loss coefficient (used by models.ActorCritic), accepted with the rest of
        the config's actor block."""
        super().__init__()
        if dist not in ("normal", "onehot"):
            raise ValueError(f"actor_dist must be 'normal' or 'onehot', got '{dist}'.")
        self.dist, self.action_dim = dist, action_dim
        self.min_std, self.max_std, self.unimix = min_std, max_std, unimix
        self.mlp = MLP(in_dim, units, layers, norm_eps)
        outputs = 2 * action_dim if dist == "normal" else action_dim
        self.out = make_linear(self.mlp.out_dim, outputs)
        if dist == "normal":  # mean and std halves each scaled by their own fans, as two layers would be
            init_weight_(self.out.weight.data[:action_dim], self.mlp.out_dim, action_dim)
            init_weight_(self.out.weight.data[action_dim:], self.mlp.out_dim, action_dim)

    def forward(self, feat: torch.Tensor) -> BoundedNormal | OneHotCategorical:
        return self._distribution(self.out(self.mlp(feat)))

    def _distribution(self, out: torch.Tensor) -> BoundedNormal | OneHotCategorical:
        """The policy given the output layer's values (..., outputs)."""
        if self.dist == "normal":
            raw_mean, raw_std = out.split(self.action_dim, -1)
            return BoundedNormal(raw_mean, raw_std, self.min_std, self.max_std)
        return OneHotCategorical(out, self.unimix)

    def scan(self, steps: int, rows: int) -> "ActorScan":
        """This actor prepared for `steps` scan steps over `rows` states (see ActorScan)."""
        return ActorScan(self, steps, rows)

    def scan_step(self, feat: torch.Tensor, weights: tuple, norms: tuple, addends: tuple, taps: tuple
                  ) -> tuple[BoundedNormal | OneHotCategorical, tuple, tuple]:
        """forward() at one step of an ActorScan, from its step(t): the layers use the detached
        parameters, each Linear adds its per-step addend and each LayerNorm its tap, so that the
        parameters' gradients reach the scan's ScanWeightGrad and ScanNormGrad. feat (N, F).
        Returns the policy, the Linear layers' inputs and the LayerNorms' inputs (detached, for
        ActorScan.record)."""
        assert not self.mlp.symlog_inputs
        x, inputs, norm_inputs = feat, [], []
        for weight, norm, addend, tap in zip(weights[:-1], norms, addends[:-1], taps):
            inputs.append(x.detach())
            pre = F.linear(x, weight)
            pre = pre + addend.to(pre.dtype)  # (N, units)
            norm_inputs.append(pre.detach())
            x = F.silu(tapped_layer_norm(pre, *norm, tap))
        inputs.append(x.detach())
        out = F.linear(x, weights[-1])
        return self._distribution(out + addends[-1].to(out.dtype)), tuple(inputs), tuple(norm_inputs)

    def noise(self, steps: int, rows: int, device: torch.device) -> torch.Tensor:
        """The random numbers of `steps` samples of `rows` policies, drawn at once (see their
        sample()): standard normal (steps, rows, A) for 'normal', one U[0, 1) per row (steps, rows)
        for 'onehot'."""
        if self.dist == "normal":
            return torch.randn(steps, rows, self.action_dim, device=device)
        return torch.rand(steps, rows, device=device)

    def policy_from_tensors(self, *tensors: torch.Tensor) -> BoundedNormal | OneHotCategorical:
        """The policy given by the tensors() of one of this actor's distributions, or of several
        steps' stacked."""
        return (BoundedNormal if self.dist == "normal" else OneHotCategorical).from_tensors(*tensors)


class ActorScan:
    """An actor prepared for a scan of `steps` imagined steps over `rows` states: every step runs it
    with detached parameters plus its views of per-layer tensors made here once (zero addends for
    the hidden Linear layers, the output bias, zero LayerNorm taps) and records its layers' inputs,
    so that each parameter's gradient is taken once over all steps (ScanWeightGrad for the Linear
    weights and the output bias, ScanNormGrad for the LayerNorms) instead of per step and summed
    step by step (the actor's weight-gradient products and ~8 sums per imagined step)."""

    def __init__(self, actor: Actor, steps: int, rows: int):
        blocks = list(actor.mlp.blocks)
        linears = [block.linear for block in blocks] + [actor.out]
        self.inputs = [StepInputs(dim=0) for _ in linears]
        self.norm_inputs = [StepInputs(dim=0) for _ in blocks]
        zeros = actor.out.weight.new_zeros(())
        addends = [ScanWeightGrad.apply(zeros.expand(steps, rows, layer.out_features), layer.weight, inputs)
                   for layer, inputs in zip(linears[:-1], self.inputs)]  # (T, N, units) each
        addends.append(ScanWeightGrad.apply(actor.out.bias.expand(steps, rows, -1), actor.out.weight,
                                            self.inputs[-1]))  # (T, N, outputs)
        taps = [ScanNormGrad.apply(block.norm.weight, block.norm.bias, inputs, block.norm.eps, (steps, rows))
                for block, inputs in zip(blocks, self.norm_inputs)]  # (T, N, units) each
        self.weights = tuple(layer.weight.detach() for layer in linears)
        self.norms = tuple((block.norm.weight.detach(), block.norm.bias.detach(), block.norm.eps)
                           for block in blocks)
        self.addends = [addend.unbind(0) for addend in addends]
        self.taps = [tap.unbind(0) for tap in taps]

    def step(self, t: int) -> tuple:
        """Actor.scan_step's arguments after feat for step t."""
        return (self.weights, self.norms, tuple(a[t] for a in self.addends), tuple(tap[t] for tap in self.taps))

    def record(self, inputs: tuple, norm_inputs: tuple) -> None:
        """Keep one step's layer inputs (returned by Actor.scan_step) for the gradients."""
        for record, x in zip(self.inputs + self.norm_inputs, inputs + norm_inputs):
            record.append(x)


# ----------------------------------------------------------------------------------------------
# RSSM


class LayerNormGRU(nn.Module):
    """GRU cell with all three gates from one Linear over [deter, x], LayerNorm on the gate
    pre-activations, candidate tanh(reset * cand), update gate sigmoid(update + update_bias)."""

    def __init__(self, in_dim: int, deter: int, update_bias: float = -1.0, norm_eps: float = 1e-3):
        super().__init__()
        self.deter, self.update_bias = deter, update_bias
        self.linear = make_linear(deter + in_dim, 3 * deter, bias=False)
        self.norm = nn.LayerNorm(3 * deter, eps=norm_eps)

    def forward(self, x: torch.Tensor, deter: torch.Tensor) -> torch.Tensor:
        return self.cell(self.linear(self.gate_inputs(x, deter)), deter)

    @staticmethod
    def gate_inputs(x: torch.Tensor, deter: torch.Tensor) -> torch.Tensor:
        """What the gates' Linear reads: [deter, x] (N, D + in)."""
        return torch.cat([deter, x.to(deter.dtype)], -1)

    def cell(self, preact: torch.Tensor, deter: torch.Tensor) -> torch.Tensor:
        """The new state from the gates' pre-activations (N, 3D) and the old state (N, D)."""
        return self.gated_update(self.norm(preact), deter)

    def gated_update(self, gates: torch.Tensor, deter: torch.Tensor) -> torch.Tensor:
        """The new state from the normalised gate pre-activations (N, 3D) and the old state (N, D)."""
        reset, cand, update = gates.float().split(self.deter, -1)
        cand = torch.tanh(torch.sigmoid(reset) * cand)
        update = torch.sigmoid(update + self.update_bias)
        return torch.lerp(deter.float(), cand, update)  # update * cand + (1 - update) * deter, one kernel


class RSSM(nn.Module):
    """Recurrent state-space model with a discrete latent of `stoch` categoricals x `classes`.

    State: stoch (N, stoch*classes) one-hot samples (straight-through), deter (N, deter).
    """

    def __init__(self, action_dim: int, embed_dim: int, deter: int = 512, hidden: int = 512,
                 stoch: int = 32, classes: int = 32, unimix: float = 0.01,
                 gru_update_bias: float = -1.0, norm_eps: float = 1e-3, compile: bool = False):
        super().__init__()
        self.deter, self.stoch, self.classes, self.unimix = deter, stoch, classes, unimix
        self.stoch_size = stoch * classes
        self.feat_size = self.stoch_size + deter
        self.action_dim = action_dim
        self.initial_deter = nn.Parameter(torch.zeros(deter))  # learned; state is tanh of it
        self.img_in = NormDense(self.stoch_size + action_dim, hidden, norm_eps)
        self.gru = LayerNormGRU(hidden, deter, gru_update_bias, norm_eps)
        self.img_out = NormDense(deter, hidden, norm_eps)
        self.img_logits = make_linear(hidden, self.stoch_size)
        self.obs_out = NormDense(deter + embed_dim, hidden, norm_eps)
        self.obs_logits = make_linear(hidden, self.stoch_size)
        # The two per-step hot functions, compiled when asked (eager fallback with one warning).
        self.img_step = maybe_compile(self._img_step, compile, "RSSM.img_step")
        self._filter_step = maybe_compile(self._filter_step_eager, compile, "RSSM.observe step")

    # -- pieces ------------------------------------------------------------------------------

    def _latent_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, stoch*classes) -> unimix log-probabilities (N, stoch, classes), float32."""
        return unimix_log_probs(self._latent_shape(logits), self.unimix)

    def _latent_shape(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, S*C) -> (N, S, C): one categorical per latent."""
        return logits.reshape(*logits.shape[:-1], self.stoch, self.classes)

    def _sample_with_log_probs(self, logits: torch.Tensor, uniform: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Straight-through sample (N, S*C) and log-probabilities (N, S, C) of the latent with
        these logits (N, S*C); the sample is drawn from the mixed probabilities themselves, so
        they are not recovered by exponentiating their logarithm (with `uniform`, see
        latent_uniforms, if given)."""
        probs, log_probs = unimix_probs_and_log_probs(self._latent_shape(logits), self.unimix)  # (N, S, C)
        return sample_one_hot(probs, uniform).flatten(-2), log_probs

    def _prior_sample(self, deter: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.Tensor:
        """Straight-through sample of the prior given deter, (N, D) -> (N, S*C). Imagination needs
        no log-probabilities, so none are formed."""
        probs = unimix_probs(self._latent_shape(self.img_logits(self.img_out(deter))), self.unimix)
        return sample_one_hot(probs, uniform).flatten(-2)  # (N, S*C)

    def latent_uniforms(self, steps: int, rows: int, device: torch.device) -> torch.Tensor:
        """The random numbers of `steps` latent samples of `rows` states, drawn at once: one U[0, 1)
        per categorical, (steps, rows, S). Steps given theirs make no random numbers (a kernel each
        on a GPU, and a seed kernel for each call of a compiled step)."""
        return torch.rand(steps, rows, self.stoch, device=device)

    def prior_log_probs(self, deter: torch.Tensor) -> torch.Tensor:
        """Prior over the latent given deter: (..., deter) -> (..., stoch, classes)."""
        return self._latent_log_probs(self.img_logits(self.img_out(deter)))

    def initial(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Learned initial state: deter = tanh(param), stoch = mode of its prior. ((N, S*C), (N, D))"""
        deter = torch.tanh(self.initial_deter).unsqueeze(0)  # (1, D)
        log_probs = self.prior_log_probs(deter)  # (1, S, C)
        stoch = F.one_hot(log_probs.argmax(-1), self.classes).float().flatten(-2)  # (1, S*C)
        return stoch.expand(batch, -1), deter.expand(batch, -1)

    def _reset(self, stoch, deter, action, is_first):
        """Replace the state by the initial one and the action by zeros where is_first (N,) is set."""
        batch = is_first.shape[0]
        init_stoch, init_deter = self.initial(batch)
        mask = is_first.reshape(batch, 1)
        stoch = torch.where(mask, init_stoch.to(stoch.dtype), stoch)
        deter = torch.where(mask, init_deter.to(deter.dtype), deter)
        action = torch.where(mask, torch.zeros_like(action), action)
        return stoch, deter, action

    # -- steps -------------------------------------------------------------------------------

    @staticmethod
    def clip_action(action: torch.Tensor) -> torch.Tensor:
        """Scale each action entry into [-1, 1] as the paper's code does (action_clip 1.0): imagined
        Gaussian samples leave that range (a quarter of them at the initial std), the env only ever
        sees clipped actions, and the model must not be asked about actions it never saw. The scale
        factor carries no gradient, so the actor's gradient is rescaled, never zeroed."""
        return action / action.detach().abs().clamp(min=1.0)

    def _img_step(self, stoch: torch.Tensor, deter: torch.Tensor, action: torch.Tensor,
                  uniform: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One imagined step: sample the prior (with `uniform` (N, S), see latent_uniforms, if
        given). Returns (stoch (N, S*C), deter (N, D))."""
        x = self.img_in(torch.cat([stoch, self.clip_action(action).to(stoch.dtype)], -1))
        deter = self.gru(x, deter)
        return self._prior_sample(deter, uniform), deter

    def obs_step(self, stoch: torch.Tensor, deter: torch.Tensor, action: torch.Tensor,
                 embed: torch.Tensor, is_first: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One filtering step (the policy's): reset where is_first, advance, sample the posterior.
        Returns (stoch (N, S*C), deter (N, D), posterior log-probs (N, S, C))."""
        stoch, deter, action = self._reset(stoch, deter, self.clip_action(action), is_first)
        deter = self.gru(self.img_in(torch.cat([stoch, action.to(stoch.dtype)], -1)), deter)
        stoch, post = self._sample_with_log_probs(self.obs_logits(self.obs_out(torch.cat([deter, embed.to(deter.dtype)], -1))))
        return stoch, deter, post

    def _filter_step_eager(self, stoch, deter, next_keep, next_start_stoch, next_start_deter, uniform, action_proj,
                           gru_addend, embed_proj, logits_addend, norm_taps, weights, norms):
        """observe()'s recurrence for one step from the state (stoch (B, S*C), deter (B, D)) this
        step reads. Each of its four per-step Linear layers is F.linear(x_t, weight) + addend_t, the
        addends carrying what does not depend on the step's state (the projected action and
        embedding, the logits' bias, zeros for the GRU); each of its three LayerNorms uses the
        detached scale and offset, its output's gradient reaching their ScanNormGrad through a tap
        (tapped_layer_norm); `uniform` (B, S) are the posterior sample's random numbers
        (latent_uniforms). The state the next step reads is made here too: replaced by the initial
        one where the next sequence starts (next_keep (B, 1) is 0; next_start_* the initial state
        there, zeros elsewhere), so that compiled, the reset fuses into the kernels that make the
        new state and the backward adds the two gradients of that state (the stacked output's and
        the next step's) itself. Returns the next step's (stoch, deter), post (B, S, C), this step's
        (stoch, deter) for the stacked outputs, the four layers' inputs x_t and the three
        LayerNorms' inputs."""
        w_in_stoch, w_gru, w_out_deter, w_logits = weights
        in_norm, gru_norm, out_norm = norms  # (weight, bias, eps) each
        in_tap, gru_tap, out_tap = norm_taps
        in_pre = F.linear(stoch, w_in_stoch) + action_proj  # (B, hidden)
        x = F.silu(tapped_layer_norm(in_pre, *in_norm, in_tap))
        gru_in = self.gru.gate_inputs(x, deter)  # (B, D + hidden)
        gru_pre = F.linear(gru_in, w_gru) + gru_addend  # (B, 3D)
        new_deter = self.gru.gated_update(tapped_layer_norm(gru_pre, *gru_norm, gru_tap), deter)
        out_pre = F.linear(new_deter, w_out_deter) + embed_proj  # (B, hidden)
        h = F.silu(tapped_layer_norm(out_pre, *out_norm, out_tap))
        new_stoch, post = self._sample_with_log_probs(F.linear(h, w_logits) + logits_addend, uniform)  # (B, S, C)
        # The recorded inputs leave detached: a compiled step's backward would otherwise be handed
        # (and fill) a zero gradient for each of them.
        records = tuple(x.detach() for x in (stoch, gru_in, new_deter, h, in_pre, gru_pre, out_pre))
        next_stoch = new_stoch * next_keep + next_start_stoch  # (B, S*C)
        next_deter = new_deter * next_keep + next_start_deter  # (B, D)
        return next_stoch, next_deter, post, (new_stoch, new_deter), records[:4], records[4:]

    def observe(self, embed: torch.Tensor, action: torch.Tensor, is_first: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """Filter a whole batch of sequences from the initial state.

        embed (B, T, E), action (B, T, A) = the action that led to step t, is_first (B, T) bool; the
        first step of the window always starts from the initial state. The action and embedding
        projections are computed for all steps at once; only the recurrence runs step by step. The
        gradients of the parameters its steps share are each taken once over all steps: the four
        per-step layers' weights as one GEMM (ScanWeightGrad), the three LayerNorms' scales and
        offsets as one reduction (ScanNormGrad), the initial state through the (B, T, D) tensor of
        sequence starts, instead of T small products or reductions and T sums each.
        Returns stoch (B, T, S*C), deter (B, T, D), post and prior log-probs (B, T, S, C).
        """
        batch, length = is_first.shape
        assert embed.shape[:2] == (batch, length), (embed.shape, (batch, length))
        assert action.shape == (batch, length, self.action_dim), (action.shape, (batch, length, self.action_dim))
        reset = is_first.clone()
        reset[:, 0] = True
        keep = (~reset).unsqueeze(-1).to(action.dtype)  # (B, T, 1)
        init_stoch, init_deter = self.initial(batch)  # (B, S*C), (B, D)
        # What each step's successor needs to reset its state: keep (0 where the next sequence
        # starts, 1 after the last step) and the initial state there (zeros elsewhere).
        next_keep = torch.cat([keep[:, 1:], torch.ones_like(keep[:, :1])], 1)  # (B, T, 1)
        next_starts = 1 - next_keep  # (B, T, 1)
        next_start_stoch = next_starts * init_stoch.unsqueeze(1)  # (B, T, S*C)
        next_start_deter = next_starts * init_deter.unsqueeze(1)  # (B, T, D)
        n = self.stoch_size
        w_in = self.img_in.linear.weight  # (hidden, S*C + A)
        w_out = self.obs_out.linear.weight  # (hidden, D + E)
        action_proj = F.linear(self.clip_action(action) * keep, w_in[:, n:])  # (B, T, hidden)
        embed_proj = F.linear(embed, w_out[:, self.deter:])  # (B, T, hidden)
        dtype = action_proj.dtype  # the Linear layers' output dtype (bfloat16 under autocast)
        gru_zeros = torch.zeros(batch, length, 3 * self.deter, dtype=dtype, device=embed.device)  # (B, T, 3D)
        logits_bias = self.obs_logits.bias.to(dtype).expand(batch, length, -1)  # (B, T, S*C)
        scan_weights = (w_in[:, :n], self.gru.linear.weight, w_out[:, :self.deter], self.obs_logits.weight)
        step_inputs = [StepInputs() for _ in scan_weights]
        addends = [ScanWeightGrad.apply(addend, weight, inputs) for addend, weight, inputs
                   in zip((action_proj, gru_zeros, embed_proj, logits_bias), scan_weights, step_inputs)]
        norms = (self.img_in.norm, self.gru.norm, self.obs_out.norm)
        norm_inputs = [StepInputs() for _ in norms]
        norm_taps = [ScanNormGrad.apply(norm.weight, norm.bias, inputs, norm.eps, (batch, length))  # (B, T, H)
                     for norm, inputs in zip(norms, norm_inputs)]
        weights = tuple(w.detach().contiguous() for w in scan_weights)
        step_norms = tuple((norm.weight.detach(), norm.bias.detach(), norm.eps) for norm in norms)
        stoch, deter = init_stoch.contiguous(), init_deter.contiguous()  # every window starts at t = 0
        stochs, deters, posts = [], [], []
        # unbind: one view per step whose gradients autograd stacks once, where per-step slicing
        # would add a zero-filled (B, T, ...) gradient for every step
        uniforms = self.latent_uniforms(length, batch, embed.device).unbind(0)  # T x (B, S)
        per_step = [x.unbind(1) for x in (next_keep, next_start_stoch, next_start_deter)] + [uniforms] + [
            x.unbind(1) for x in addends]
        per_step_taps = [tap.unbind(1) for tap in norm_taps]
        for t in range(length):
            stoch, deter, post, (stoch_out, deter_out), inputs, norm_in = self._filter_step(
                stoch, deter, *(x[t] for x in per_step), tuple(tap[t] for tap in per_step_taps), weights,
                step_norms)
            for record, x in zip(step_inputs + norm_inputs, inputs + norm_in):
                record.append(x)
            stochs.append(stoch_out)
            deters.append(deter_out)
            posts.append(post)
        deter = BatchMajor.apply(torch.stack(deters))  # (B, T, D)
        return {
            "stoch": BatchMajor.apply(torch.stack(stochs)),  # (B, T, S*C)
            "deter": deter,
            "post": BatchMajor.apply(torch.stack(posts)),  # (B, T, S, C)
            "prior": self.prior_log_probs(deter),  # (B, T, S, C), all steps in one batch
        }


def tapped_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                      tap: torch.Tensor) -> torch.Tensor:
    """LayerNorm of x (N, H) with a detached scale and offset (H,), plus tap (N, H): zeros, one
    step's view of a ScanNormGrad tensor, whose gradient is thereby the output's. (The addition
    fuses into the LayerNorm when compiled; a custom autograd Function here instead cost more
    Python time per step than it saved on a CPU.)"""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps) + tap


class BatchMajor(torch.autograd.Function):
    """Steps stacked time-major (T, B, ...) -> contiguous (B, T, ...), whose backward hands the
    gradient back contiguous in (T, B, ...) order: each step's slice of it is then contiguous,
    where stacking along axis 1 would give every step a strided gradient (which a compiled step's
    backward copies first, one kernel per step and output). One copy each way instead."""

    @staticmethod
    def forward(ctx, steps: torch.Tensor) -> torch.Tensor:
        return steps.transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.transpose(0, 1).contiguous()


class StepInputs:
    """The inputs x_t (B, in) one per-step layer of a scan read, kept without their graphs (a
    reference from an autograd node's context to the graph would be a cycle that leaks), stacked
    only when a backward pass needs them."""

    def __init__(self, dim: int = 1) -> None:
        self.steps: list[torch.Tensor] = []
        self.dim = dim  # the steps' axis: 1 for (B, T, in), 0 for (T, N, in)

    def append(self, x: torch.Tensor) -> None:
        self.steps.append(x.detach())

    def stacked(self) -> torch.Tensor:
        return torch.stack(self.steps, self.dim)  # (B, T, in) or (T, N, in)


class ScanWeightGrad(torch.autograd.Function):
    """For a scan's per-step layer y_t = x_t W^T + addend_t whose steps use the detached weight:
    the identity on the addend (B, T, out) (or (T, N, out), stacked as its StepInputs are), whose
    backward also returns the weight's gradient,
    dW = sum_t dy_t^T x_t = dY^T X, as one GEMM over all B x T rows (dY is the addend's gradient,
    X the recorded inputs). Autograd would otherwise compute T rank-B products and T sums: the
    bulk of the small kernels of a GPU update and a memory-bound tail on a CPU. Same maths."""

    @staticmethod
    def forward(ctx, addend: torch.Tensor, weight: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        ctx.inputs, ctx.weight_dtype = inputs, weight.dtype
        return addend.view_as(addend)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad (B, T, out)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            x = ctx.inputs.stacked()  # (B, T, in)
            rows = grad.reshape(-1, grad.shape[-1])  # (B*T, out)
            grad_weight = rows.t().mm(x.reshape(-1, x.shape[-1]).to(rows.dtype)).to(ctx.weight_dtype)  # (out, in)
        return grad, grad_weight, None


class ScanNormGrad(torch.autograd.Function):
    """For a scan's per-step LayerNorm y_t = n_t * weight + bias, n_t the normalised input x_t,
    whose steps use the detached weight and bias and add per-step views of the (B, T, H) zeros this
    returns to their outputs (tapped_layer_norm): backward receives the outputs' gradients stacked,
    dY (B, T, H), and returns d weight = sum over B, T of dY * N and d bias = sum of dY, one
    reduction each over all steps, N normalised again from the recorded inputs in one batch. Autograd
    would instead compute both per step inside each LayerNorm's backward and sum them step by step
    (two more kernels per step and parameter on a GPU). Same maths."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, bias: torch.Tensor, inputs: StepInputs, eps: float,
                lead: tuple[int, int]) -> torch.Tensor:
        """lead: the scan's two leading axes as its inputs are stacked, (B, T) or (T, N)."""
        ctx.inputs, ctx.eps = inputs, eps
        return bias.new_zeros(()).expand(*lead, bias.shape[-1])  # (*lead, H) zeros

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad (*lead, H)
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            x = ctx.inputs.stacked().float()  # (*lead, H)
            grad_weight = (grad * F.layer_norm(x, x.shape[-1:], eps=ctx.eps)).sum((0, 1))  # (H,)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.sum((0, 1))  # (H,)
        return grad_weight, grad_bias, None, None, None


def features(stoch: torch.Tensor, deter: torch.Tensor) -> torch.Tensor:
    """The model state the heads read: [stoch, deter] (..., S*C + D)."""
    return torch.cat([stoch, deter.to(stoch.dtype)], -1)


# ----------------------------------------------------------------------------------------------
# Observation keys


def full_match(pattern: str, key: str) -> bool:
    return re.fullmatch(pattern, key) is not None


def usable_keys(obs_space: Mapping[str, gymnasium.spaces.Box]) -> dict[str, gymnasium.spaces.Box]:
    """The observation keys an encoder or decoder may use (not the flags, not `log_*` entries)."""
    return {k: v for k, v in obs_space.items() if k not in IGNORED_KEYS and not k.startswith("log_")}


def matched_keys(obs_space: Mapping[str, gymnasium.spaces.Box], cnn_keys: str, mlp_keys: str
                 ) -> tuple[list[str], list[str]]:
    """Keys for the CNN (rank-3 uint8 images) and the MLP (rank-1 vectors) by full-match regex."""
    usable = usable_keys(obs_space)
    cnn = [k for k, v in usable.items() if len(v.shape) == 3 and v.dtype == np.uint8 and full_match(cnn_keys, k)]
    mlp = [k for k, v in usable.items() if len(v.shape) == 1 and full_match(mlp_keys, k)]
    return cnn, mlp


def unusable_reason(box: gymnasium.spaces.Box, as_image: bool = False) -> str | None:
    """Why an observation of this space can feed neither the CNN nor the MLP, with the fix; None
    for (n,) vectors and (H, W, C) uint8 images. `as_image`: cnn_keys named it."""
    shape = tuple(box.shape)
    if as_image and len(shape) == 2:
        return (f"images must be (H, W, C): declare {shape + (1,)} and return x[..., None] (a grey image), "
                "or repeat it to 3 channels")
    if len(shape) == 3 and box.dtype != np.uint8:
        return ("images must be uint8 (0-255): declare Box(0, 255, shape, np.uint8) and return e.g. "
                "(x * 255).astype(np.uint8)")
    if len(shape) == 0:
        return "it is a scalar: declare shape (1,) and return np.array([x], np.float32)"
    if len(shape) != 1 and len(shape) != 3:
        return f"vectors must be (n,): declare ({int(np.prod(shape))},) and return x.reshape(-1)"
    return None


def unusable_matches(obs_space: Mapping[str, gymnasium.spaces.Box], keys: Mapping) -> dict[str, str]:
    """{key: 'why'} of the observation keys that `keys`' regular expressions (cnn_keys, mlp_keys)
    name but whose shape or dtype neither the CNN nor the MLP can take."""
    unusable = {}
    for key, box in usable_keys(obs_space).items():
        matched = [kind for kind in ("cnn_keys", "mlp_keys") if full_match(keys[kind], key)]
        reason = unusable_reason(box, as_image="cnn_keys" in matched)
        if reason and matched:
            unusable[key] = (f"'{key}' {tuple(box.shape)} {box.dtype} matches {matched[0]}='{keys[matched[0]]}' "
                             f"but {reason}")
    return unusable


def unusable_keys_warning(obs_space: Mapping[str, gymnasium.spaces.Box], encoder: Mapping) -> str | None:
    """A warning naming the keys the encoder's regular expressions select that the model cannot
    take (a float image, a scalar, a 2-D array), each with its fix; None when there are none."""
    unusable = unusable_matches(obs_space, encoder)
    if not unusable:
        return None
    return (f"observation {'key' if len(unusable) == 1 else 'keys'} the model cannot use, left out: "
            f"{'; '.join(unusable.values())}")


def unused_keys_note(obs_space: Mapping[str, gymnasium.spaces.Box], encoder: Mapping) -> str | None:
    """One line naming the observation keys the encoder's regular expressions (`encoder`: its
    cnn_keys and mlp_keys) leave out, with the flags that add them; None when it uses every key.
    (A run whose env gives an image and a vector under an images-only block such as `custom` would
    otherwise drop the vector without a word.) Keys the expressions select but the model cannot
    take are left to unusable_keys_warning."""
    cnn, mlp = matched_keys(obs_space, encoder["cnn_keys"], encoder["mlp_keys"])
    unusable = unusable_matches(obs_space, encoder)
    left = {k: v for k, v in usable_keys(obs_space).items() if k not in cnn and k not in mlp and k not in unusable}
    if not left:
        return None
    described = ", ".join(f"'{k}' {tuple(v.shape)} {v.dtype}" for k, v in left.items())
    flags = []
    for kind, used, fits in (("mlp_keys", mlp, lambda v: len(v.shape) == 1),
                             ("cnn_keys", cnn, lambda v: len(v.shape) == 3 and v.dtype == np.uint8)):
        added = [k for k, v in left.items() if fits(v)]
        if added:
            pattern = "|".join(used + added)
            flags.append(f"--encoder.{kind} '{pattern}' --decoder.{kind} '{pattern}'")
    how = f"; to use them: {' '.join(flags)}" if flags else \
        " (only (n,) float vectors and (H, W, C) uint8 images can be used)"
    return (f"observation keys the model does not use: {described} (encoder cnn_keys='{encoder['cnn_keys']}', "
            f"mlp_keys='{encoder['mlp_keys']}'){how}")


def check_key_selections(obs_space: Mapping[str, gymnasium.spaces.Box], selections: Mapping[str, Mapping]) -> None:
    """Raise one ConfigError naming every part (`selections`: e.g. {"encoder": {"cnn_keys": ...,
    "mlp_keys": ...}, "decoder": {...}}) whose regular expressions select no observation key, with
    the flags that fix all of them."""
    empty = {who: keys for who, keys in selections.items()
             if not any(matched_keys(obs_space, keys["cnn_keys"], keys["mlp_keys"]))}
    if not empty:
        return
    usable = usable_keys(obs_space)
    available = {k: (tuple(v.shape), str(v.dtype)) for k, v in usable.items()}
    has_vector = any(len(v.shape) == 1 for v in usable.values())
    image = next((k for k, v in usable.items() if len(v.shape) == 3 and v.dtype == np.uint8), None)
    owner = (lambda who: f"the {who}'s ") if len(empty) > 1 else (lambda who: "")
    parts = "; ".join(f"{owner(who)}cnn_keys='{keys['cnn_keys']}' matches no (H, W, C) uint8 image and "
                      f"mlp_keys='{keys['mlp_keys']}' matches no (n,) vector"
                      + "".join(f" ({why})" for why in unusable_matches(obs_space, keys).values())
                      for who, keys in empty.items())
    names = " and ".join(f"the {who}" for who in empty)
    fixes = [" ".join(f"--{who}.mlp_keys '.*'" for who in empty) + " for the vector observations"] if has_vector else []
    if image is not None:
        fixes.append(" ".join(f"--{who}.cnn_keys {image}" for who in empty) + " for the images")
    example = f", e.g. {' or '.join(fixes)}" if fixes else ""
    raise ConfigError(
        f"{names[0].upper()}{names[1:]} {'select' if len(empty) > 1 else 'selects'} no observation key: "
        f"{parts}, among the available keys {available}. Set the cnn_keys / mlp_keys of "
        f"{names} (full-match regular expressions, '$^' matches nothing) so that each uses at least one "
        f"key{example}.")


def select_keys(obs_space: Mapping[str, gymnasium.spaces.Box], cnn_keys: str, mlp_keys: str,
                who: str) -> tuple[list[str], list[str]]:
    """Keys for the CNN and the MLP of the encoder or decoder (`who`), by full-match regex; a
    ConfigError if none is selected."""
    check_key_selections(obs_space, {who: {"cnn_keys": cnn_keys, "mlp_keys": mlp_keys}})
    return matched_keys(obs_space, cnn_keys, mlp_keys)


def image_stages(obs_space: Mapping[str, gymnasium.spaces.Box], keys: list[str], min_res: int,
                 who: str = "encoder") -> tuple[int, int, int]:
    """(resolution, total channels, stride-2 stages) of the CNN keys; checks H = W = min_res * 2^k.
    `who` ('encoder' or 'decoder') is the part whose min_res the error names."""
    shapes = {k: tuple(obs_space[k].shape) for k in keys}
    height, width = shapes[keys[0]][:2]
    for key, shape in shapes.items():
        if shape[:2] != (height, width) or height != width:
            other = " or select one image key with cnn_keys" if len(shapes) > 1 else ""
            raise ConfigError(
                f"Image observations must be square and share one size: got {shapes}. Resize the "
                f"images in the env to one square size (64x64 is the paper's){other}.")
    stages = int(round(math.log2(height / min_res))) if height >= min_res else 0
    if stages < 1 or min_res * 2 ** stages != height:
        raise ConfigError(
            f"Image '{keys[0]}' has size {height}x{width}, but the {who}'s CNN needs height = min_res * 2^k "
            f"with k >= 1 ({who}.min_res={min_res}). {min_res_fix(height)}")
    return height, sum(s[2] for s in shapes.values()), stages


def min_res_fix(height: int) -> str:
    """How to make images of `height` pixels fit the CNNs: the paper's min_res 4 where it fits, else
    resizing or the min_res values that work, with their cost (the encoder and the decoder alike:
    both halve or double the same image)."""
    fits = [height // 2 ** k for k in range(1, 8) if height % 2 ** k == 0 and height // 2 ** k >= 2]
    flags = "--encoder.min_res {0} --decoder.min_res {0}"
    listed = f"any of {', '.join(map(str, fits))} works; the decoder needs it too where it decodes the image"
    if 4 in fits:
        return f"Use {flags.format(4)} (the paper's; {listed})."
    resize = "resize the images in the env to 64x64 (the paper's size) or another power of two"
    if not fits:
        return f"No min_res fits {height} pixels: {resize}."
    value = next((f for f in fits if f <= 8), fits[-1])
    stages = int(round(math.log2(height / value)))
    growth = 2 ** (stages - 1) * value ** 2 / (2 ** 3 * 4 ** 2)  # the flattened CNN output against 64x64's
    cost = f"; the image embedding is then {growth:.2g}x as large as at 64x64" if growth > 1.05 else ""
    return f"{resize[0].upper()}{resize[1:]}, or keep {height} pixels with {flags.format(value)} ({listed}{cost})."


# ----------------------------------------------------------------------------------------------
# Encoder and decoder


class ChannelNorm(nn.Module):
    """LayerNorm over the channel axis of an (N, C, H, W) tensor."""

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def make_conv(in_ch: int, out_ch: int, kernel: int, transpose: bool, bias: bool) -> nn.Module:
    cls = nn.ConvTranspose2d if transpose else nn.Conv2d
    conv = cls(in_ch, out_ch, kernel, stride=2, padding=(kernel - 2) // 2, bias=bias)
    init_weight_(conv.weight, in_ch * kernel * kernel, out_ch * kernel * kernel)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


# Images per chunk in the conv stacks: keeps every activation near 4M floats (16 MB), below glibc's
# mmap threshold, so buffers are reused instead of page-faulted in on every update; same maths.
CONV_CHUNK_FLOATS = 2 ** 22


def chunked(net: nn.Module, x: torch.Tensor, floats_per_item: int) -> torch.Tensor:
    """net over the batch of x in chunks of about CONV_CHUNK_FLOATS floats of activations."""
    size = max(1, CONV_CHUNK_FLOATS // max(1, floats_per_item))
    if x.shape[0] <= size:
        return net(x)
    return torch.cat([net(part) for part in x.split(size)])


class ImageEncoder(nn.Module):
    """Stride-2 conv stages (depth doubling) down to min_res, each with channel LayerNorm and SiLU.
    Input uint8 (N, H, W, C); output (N, min_res^2 * final depth)."""

    def __init__(self, channels: int, stages: int, depth: int, kernel: int, min_res: int, norm_eps: float):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = channels
        for i in range(stages):
            out_ch = depth * 2 ** i
            layers += [make_conv(in_ch, out_ch, kernel, False, bias=False), ChannelNorm(out_ch, norm_eps), nn.SiLU()]
            in_ch = out_ch
        self.net = nn.Sequential(*layers)
        self.out_dim = in_ch * min_res * min_res
        self.largest = depth * (min_res * 2 ** (stages - 1)) ** 2  # floats of the first activation

    def _forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float() / 255.0 - 0.5  # (N, C, H, W), converted on the device
        x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x).flatten(1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, C) -> (N, out_dim)."""
        return chunked(self._forward, image, self.largest)


class ImageDecoder(nn.Module):
    """Linear to (depth * 2^(stages-1), min_res, min_res), then stride-2 transposed convs up to the
    image size (channel LayerNorm + SiLU except the last); returns the mean image in [0, 1] scale,
    (N, H, W, C) float."""

    def __init__(self, feat_dim: int, channels: int, stages: int, depth: int, kernel: int, min_res: int,
                 norm_eps: float):
        super().__init__()
        self.min_res = min_res
        self.top_depth = depth * 2 ** (stages - 1)
        self.linear = make_linear(feat_dim, self.top_depth * min_res * min_res)
        layers: list[nn.Module] = []
        in_ch = self.top_depth
        for i in range(stages):
            last = i == stages - 1
            out_ch = channels if last else in_ch // 2
            layers.append(make_conv(in_ch, out_ch, kernel, True, bias=last))
            if not last:
                layers += [ChannelNorm(out_ch, norm_eps), nn.SiLU()]
            in_ch = out_ch
        self.net = nn.Sequential(*layers)
        self.largest = depth * (min_res * 2 ** (stages - 1)) ** 2  # floats of the last hidden activation

    def _forward(self, feat: torch.Tensor) -> torch.Tensor:
        x = self.linear(feat).reshape(-1, self.top_depth, self.min_res, self.min_res)
        x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x).permute(0, 2, 3, 1) + 0.5  # (N, H, W, C)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """(N, F) -> mean images (N, H, W, C)."""
        return chunked(self._forward, feat, self.largest)


class MultiEncoder(nn.Module):
    """Embeds the selected observation keys: CNN over the channel-concatenated images, MLP over the
    concatenated (symlog) vectors; the embedding is their concatenation."""

    def __init__(self, obs_space: Mapping[str, gymnasium.spaces.Box], mlp_keys: str = ".*",
                 cnn_keys: str = "image", cnn_depth: int = 32, kernel: int = 4, min_res: int = 4,
                 mlp_units: int = 1024, mlp_layers: int = 5, symlog_inputs: bool = True,
                 norm_eps: float = 1e-3):
        super().__init__()
        self.cnn_keys, self.mlp_keys = select_keys(obs_space, cnn_keys, mlp_keys, "encoder")
        self.out_dim = 0
        if self.cnn_keys:
            _, channels, stages = image_stages(obs_space, self.cnn_keys, min_res)
            self.cnn = ImageEncoder(channels, stages, cnn_depth, kernel, min_res, norm_eps)
            self.out_dim += self.cnn.out_dim
        if self.mlp_keys:
            vector_dim = sum(int(obs_space[k].shape[0]) for k in self.mlp_keys)
            self.mlp = MLP(vector_dim, mlp_units, mlp_layers, norm_eps, symlog_inputs)
            self.out_dim += self.mlp.out_dim

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """obs values (*batch, ...) -> embedding (*batch, out_dim)."""
        outputs = []
        if self.cnn_keys:
            images = [obs[k] for k in self.cnn_keys]
            batch_shape = images[0].shape[:-3]
            image = images[0] if len(images) == 1 else torch.cat(images, -1)
            outputs.append(self.cnn(image.reshape(-1, *image.shape[-3:])).reshape(*batch_shape, -1))
        if self.mlp_keys:
            vector = torch.cat([obs[k].float() for k in self.mlp_keys], -1)
            outputs.append(self.mlp(vector))
        return outputs[0] if len(outputs) == 1 else torch.cat([o.to(outputs[0].dtype) for o in outputs], -1)


class MultiDecoder(nn.Module):
    """Reconstructs the selected keys from the model features: images as means in [0, 1] scale
    (N, H, W, C), vectors in symlog space."""

    def __init__(self, feat_dim: int, obs_space: Mapping[str, gymnasium.spaces.Box], mlp_keys: str = ".*",
                 cnn_keys: str = "image", cnn_depth: int = 32, kernel: int = 4, min_res: int = 4,
                 mlp_units: int = 1024, mlp_layers: int = 5, norm_eps: float = 1e-3):
        super().__init__()
        self.cnn_keys, self.mlp_keys = select_keys(obs_space, cnn_keys, mlp_keys, "decoder")
        self.image_channels = [int(obs_space[k].shape[-1]) for k in self.cnn_keys]
        self.vector_dims = [int(obs_space[k].shape[0]) for k in self.mlp_keys]
        if self.cnn_keys:
            _, channels, stages = image_stages(obs_space, self.cnn_keys, min_res, "decoder")
            self.cnn = ImageDecoder(feat_dim, channels, stages, cnn_depth, kernel, min_res, norm_eps)
        if self.mlp_keys:
            self.mlp = Head(feat_dim, sum(self.vector_dims), mlp_units, mlp_layers, norm_eps)

    def forward(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        """feat (*batch, F) -> {key: image mean (*batch, H, W, C) | symlog vector (*batch, n)}."""
        batch_shape = feat.shape[:-1]
        out: dict[str, torch.Tensor] = {}
        if self.cnn_keys:
            images = self.cnn(feat.reshape(-1, feat.shape[-1]))
            images = images.reshape(*batch_shape, *images.shape[1:])
            # one key: no split, whose backward is a slow concatenation along the 3 channels
            parts = [images] if len(self.cnn_keys) == 1 else images.split(self.image_channels, -1)
            out.update(zip(self.cnn_keys, parts))
        if self.mlp_keys:
            out.update(zip(self.mlp_keys, self.mlp(feat).split(self.vector_dims, -1)))
        return out


# ----------------------------------------------------------------------------------------------
# Ensemble (plan2explore)


class EnsembleMLP(nn.Module):
    """`members` independent MLPs evaluated with batched matmuls: x (N, in) -> (members, N, out)."""

    def __init__(self, members: int, in_dim: int, out_dim: int, units: int, layers: int, norm_eps: float = 1e-3):
        super().__init__()
        dims = [in_dim] + [units] * layers
        self.norm_eps = norm_eps
        self.weights = nn.ParameterList()
        self.scales = nn.ParameterList()
        self.shifts = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:]):
            weight = torch.empty(members, a, b)
            for w in weight:
                init_weight_(w, a, b)
            self.weights.append(nn.Parameter(weight))
            self.scales.append(nn.Parameter(torch.ones(members, 1, b)))
            self.shifts.append(nn.Parameter(torch.zeros(members, 1, b)))
        out_weight = torch.empty(members, dims[-1], out_dim)
        for w in out_weight:
            init_weight_(w, dims[-1], out_dim)
        self.out_weight = nn.Parameter(out_weight)
        self.out_bias = nn.Parameter(torch.zeros(members, 1, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(0).expand(len(self.out_weight), *x.shape)  # (M, N, in)
        for weight, scale, shift in zip(self.weights, self.scales, self.shifts):
            h = torch.bmm(h, weight)
            h = F.silu(F.layer_norm(h.float(), h.shape[-1:], eps=self.norm_eps) * scale + shift)
        return torch.baddbmm(self.out_bias, h, self.out_weight)  # (M, N, out)


# ----------------------------------------------------------------------------------------------
# torch.compile with a fallback


def grad_leaves(fn: Callable, args: tuple) -> list[torch.Tensor]:
    """Tensors a backward pass through `fn` can reach directly: its tensor arguments (also inside
    tuples and lists) that require grad and, for a bound method of a module, that module's
    trainable parameters."""
    leaves = [a for a in tensors_in(args) if a.requires_grad]
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        leaves += [p for p in owner.parameters() if p.requires_grad]
    return leaves


def tensors_in(args: tuple | list) -> list[torch.Tensor]:
    """The tensors among the arguments and inside their tuples and lists."""
    return [t for a in args for t in ([a] if isinstance(a, torch.Tensor)
                                      else tensors_in(a) if isinstance(a, (tuple, list)) else [])]


def differentiable_outputs(result) -> list[torch.Tensor]:
    """The floating-point tensors in a (nested) result that carry a graph."""
    if isinstance(result, torch.Tensor):
        return [result] if result.requires_grad and result.is_floating_point() else []
    if isinstance(result, dict):
        result = list(result.values())
    if isinstance(result, (list, tuple)):
        return [t for item in result for t in differentiable_outputs(item)]
    return []


def detached_leaves(args: tuple) -> tuple:
    """The arguments with every tensor, also inside tuples and lists, cut from its graph (a leaf
    that requires grad as before)."""
    return tuple(detached_leaf(a) for a in args)


def detached_leaf(arg):
    if isinstance(arg, torch.Tensor):
        return arg.detach().requires_grad_(arg.requires_grad)
    if isinstance(arg, (tuple, list)):
        return type(arg)(detached_leaf(a) for a in arg)
    return arg


def probe_backward(compiled: Callable, fn: Callable, args: tuple, kwargs: dict) -> bool:
    """One extra forward and backward of the compiled function on graph-free copies of its
    arguments, random state restored afterwards, gradients discarded. torch.compile builds the
    backward lazily, so a compiler failure that only the backward meets raises here, where the
    caller can still fall back, instead of in the optimizer step. True once a backward has run."""
    probe_args = detached_leaves(args)
    cuda = sorted({a.device.index or 0 for a in tensors_in(args) if a.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        outputs = differentiable_outputs(compiled(*probe_args, **kwargs))
        leaves = grad_leaves(fn, probe_args)
        if not (outputs and leaves):
            return False
        torch.autograd.grad(sum(o.float().sum() for o in outputs), leaves, allow_unused=True)
    return True


def allow_retained_backward() -> None:
    """Tell torch.compile (process-wide; its own setting) not to donate saved tensors to backward
    passes: the actor's gradient runs backward with retain_graph=True (the critic's gradient reuses
    that graph), which a compiled backward with donated buffers refuses. The decision is taken when
    a backward is compiled, lazily, outside any call of ours, so a scoped patch would not reach it."""
    config = getattr(getattr(torch, "_functorch", None), "config", None)
    if config is not None and hasattr(config, "donated_buffer"):
        config.donated_buffer = False


def maybe_compile(fn: Callable, enabled: bool, name: str) -> Callable:
    """torch.compile `fn` when enabled; if compiling or running the compiled code fails, warn once
    and use the eager function from then on. The first call that builds a graph first runs the
    compiled forward and backward once on detached copies (probe_backward), so a failure in the
    lazily compiled backward falls back too."""
    if not enabled:
        return fn
    try:
        allow_retained_backward()
        compiled = torch.compile(fn, dynamic=False)
    except Exception as error:  # noqa: BLE001 - any failure means: run eagerly
        warnings.warn(f"torch.compile is unavailable for {name} ({error!r}); running eagerly.")
        return fn
    failed, backward_checked = [], []

    def run(*args, **kwargs):
        if not failed:
            try:
                if not backward_checked and torch.is_grad_enabled() and probe_backward(compiled, fn, args, kwargs):
                    backward_checked.append(True)
                return compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001
                failed.append(error)
                warnings.warn(f"torch.compile failed for {name} ({type(error).__name__}: {error}); "
                              "running eagerly from now on.")
        return fn(*args, **kwargs)

    return run
