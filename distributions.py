"""The output distributions DreamerV3 uses, written for speed and for the paper's exact maths.

- `TwoHotSymlog`: a categorical over evenly spaced bins in symlog space (reward and critic heads).
- `OneHotCategorical`: a categorical whose probabilities are mixed with 1% uniform ("unimix"),
  sampled as one-hot vectors with straight-through gradients (latents and discrete actions).
- `BoundedNormal`: a diagonal Gaussian with tanh-squashed mean and a learned std in [min, max]
  (continuous actions).
- `Bernoulli`: the continuation predictor.

All log-probabilities and statistics are computed in float32, whatever the autocast dtype.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from tools import symexp, symlog

TWO_HOT_HIGH = 20.0
TWO_HOT_LOW = -TWO_HOT_HIGH


SHORT_AXIS = 16  # on a CPU, torch's softmax over a last axis shorter than this is 4-10x slower (BENCHMARKS.md)


def softmax_last(x: torch.Tensor, log: bool = False) -> torch.Tensor:
    """softmax (log_softmax with `log`) over the last axis. On a CPU a last axis shorter than 16 (8
    latent classes, a few discrete actions) is moved to the front first: torch's CPU kernel walks a
    short last axis row by row, 4-10x slower than the same reduction along a leading axis; same values
    (to float rounding), the result a view in the input's shape."""
    function = torch.log_softmax if log else torch.softmax
    if x.device.type == "cpu" and x.dim() > 1 and x.shape[-1] < SHORT_AXIS:
        return function(x.movedim(-1, 0), 0).movedim(0, -1)
    return function(x, -1)


def unimix_probs(logits: torch.Tensor, unimix: float) -> torch.Tensor:
    """(1 - unimix) * softmax(logits) + unimix / classes, over the last axis (float32)."""
    probs = softmax_last(logits.float())
    return probs if unimix <= 0.0 else (1.0 - unimix) * probs + unimix / logits.shape[-1]


def unimix_log_probs(logits: torch.Tensor, unimix: float) -> torch.Tensor:
    """Log of unimix_probs(logits, unimix), over the last axis (float32)."""
    if unimix <= 0.0:
        return softmax_last(logits.float(), log=True)
    return torch.log(unimix_probs(logits, unimix))


def unimix_probs_and_log_probs(logits: torch.Tensor, unimix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """unimix_probs and unimix_log_probs of the same logits, the logarithm taken of the
    probabilities (not the probabilities recovered by exponentiating it)."""
    probs = unimix_probs(logits, unimix)
    return probs, (torch.log(probs) if unimix > 0.0 else softmax_last(logits.float(), log=True))


def one_hot_of(index: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    """index (...) -> one-hot (..., classes). F.one_hot's bounds check reads the indices back to the
    host on a CPU (two reductions and a sync per call, ~160 per update); argmax indices need none."""
    if torch.compiler.is_compiling():  # a comparison that fuses with the index's kernel
        return (torch.arange(classes, device=index.device) == index.unsqueeze(-1)).to(dtype)
    out = torch.zeros(*index.shape, classes, dtype=dtype, device=index.device)
    return out.scatter_(-1, index.unsqueeze(-1), 1.0)


def two_hot_bins(bins: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The `bins` evenly spaced bin centres in symlog space, from -20 to 20. (bins,)"""
    index = torch.arange(bins, dtype=torch.float64, device=device)
    return ((2 * index - (bins - 1)) / (bins - 1) * TWO_HOT_HIGH).float()  # symmetric, exact 0 in the middle


def two_hot_index_weight(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For values x already in symlog space: index of the bin at or below x, and the weight of the
    bin above it (the bin below gets 1 - weight). Values outside [-20, 20] go to the end bins."""
    step = (TWO_HOT_HIGH - TWO_HOT_LOW) / (bins - 1)
    position = ((x.float() - TWO_HOT_LOW) / step).clamp(0.0, bins - 1.0)
    # clamped as an integer, so that `below + 1` is always a bin, also for a NaN x (a diverged
    # model): its index is a bin, its weight NaN, and so is its loss, where a NaN index would
    # fail the gather (a device-side assert on a GPU)
    below = position.floor().long().clamp(0, bins - 2)
    weight_above = position - below
    return below, weight_above


def two_hot(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Two-hot encoding of values already in symlog space: (...) -> (..., bins), rows sum to 1."""
    below, weight_above = two_hot_index_weight(x, bins)
    target = torch.zeros(*x.shape, bins, device=x.device)  # (..., bins)
    target.scatter_(-1, below.unsqueeze(-1), (1.0 - weight_above).unsqueeze(-1))
    target.scatter_add_(-1, (below + 1).unsqueeze(-1), weight_above.unsqueeze(-1))
    return target


def sample_index(probs: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Class indices drawn from categoricals over the last axis, (..., classes) -> (...), exactly:
    the first class whose cumulative probability exceeds u * total for one u ~ U[0, 1) per
    distribution, drawn here or given as `uniform` (...). One uniform per distribution instead of
    Gumbel-max's one per class and its logarithm, division and argmax (3.5x faster for the
    (1024, 32, 32) latents of imagination on a CPU). A class of probability 0 is never drawn (its
    cumulative sum equals the previous one); the clamp only guards u * total rounding up to the
    total."""
    cdf = probs.cumsum(-1)  # (..., classes), non-decreasing
    u = torch.rand_like(cdf[..., -1:]) if uniform is None else uniform.unsqueeze(-1).to(cdf.dtype)  # (..., 1)
    threshold = u * cdf[..., -1:]  # (..., 1)
    if torch.compiler.is_compiling():
        # The same count of cumulative sums at or below the threshold (the cdf is non-decreasing),
        # as a comparison and a sum that fuse with what surrounds them; eager, searchsorted is
        # one kernel where these would be two.
        index = (cdf <= threshold).sum(-1)  # (...)
    else:
        index = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)  # (...)
    return index.clamp(max=probs.shape[-1] - 1)


def sample_one_hot(probs: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One-hot sample of categoricals over the last axis, (..., classes), drawn by sample_index
    (with its `uniform`, (...), if given), with straight-through gradients to `probs` (the value is
    exactly one-hot)."""
    index = sample_index(probs.detach(), uniform)
    return straight_through(one_hot_of(index, probs.shape[-1], probs.dtype), probs)


def straight_through(one_hot: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """one_hot in value, with the gradients of `probs`."""
    return one_hot + (probs - probs.detach())


class TwoHotSymlog:
    """Categorical over `bins` symlog-space bins; its mean is symexp of the expected bin value."""

    def __init__(self, logits: torch.Tensor):
        self.log_probs = torch.log_softmax(logits.float(), -1)  # (..., bins)
        self.bins = self.log_probs.shape[-1]

    @classmethod
    def from_log_probs(cls, log_probs: torch.Tensor) -> "TwoHotSymlog":
        """From log-probabilities already normalised (e.g. stacked from per-step distributions)."""
        out = cls.__new__(cls)
        out.log_probs, out.bins = log_probs, log_probs.shape[-1]
        return out

    @property
    def mean(self) -> torch.Tensor:
        centres = two_hot_bins(self.bins, self.log_probs.device)
        return symexp((self.log_probs.exp() * centres).sum(-1))

    def mode(self) -> torch.Tensor:
        return self.mean

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log-likelihood of the two-hot encoding of symlog(value): (...) -> (...)."""
        return self.weighted_log_prob([value], [1.0])

    def weighted_log_prob(self, values: Sequence[torch.Tensor], scales: Sequence[float]) -> torch.Tensor:
        """sum_k scales[k] * log_prob(values[k]), (...), read with one gather of all 2K bins: its
        backward fills one zero gradient of the (..., bins) log-probabilities, where a gather per
        bin and value would fill 2K of them and sum them (15.7 MB each for the critic's targets)."""
        index, coef = [], []
        for value, scale in zip(values, scales):
            below, weight_above = two_hot_index_weight(symlog(value.float()), self.bins)
            index += [below, below + 1]
            coef += [scale * (1.0 - weight_above), scale * weight_above]
        picked = self.log_probs.gather(-1, torch.stack(index, -1))  # (..., 2K)
        return (picked * torch.stack(coef, -1)).sum(-1)


class OneHotCategorical:
    """Categorical over the last axis with unimix, samples as one-hot vectors with straight-through
    gradients. `event_dims` trailing axes before the class axis are summed in log_prob/entropy/kl
    (1 for the RSSM's (stoch, classes) latents, 0 for a single discrete action)."""

    def __init__(self, logits: torch.Tensor, unimix: float = 0.0, event_dims: int = 0):
        self.log_probs = unimix_log_probs(logits, unimix)  # (..., classes)
        self.probs = self.log_probs.exp()
        self.event_dims = event_dims

    def _sum_event(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(tuple(range(-self.event_dims, 0))) if self.event_dims else x

    @classmethod
    def from_log_probs(cls, log_probs: torch.Tensor, event_dims: int = 0) -> "OneHotCategorical":
        """From log-probabilities that already include the unimix."""
        out = cls.__new__(cls)
        out.log_probs, out.probs, out.event_dims = log_probs, log_probs.exp(), event_dims
        return out

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What defines it (see from_tensors): (log_probs,)."""
        return (self.log_probs,)

    @classmethod
    def from_tensors(cls, log_probs: torch.Tensor) -> "OneHotCategorical":
        """A single categorical (event_dims 0) from tensors(); those of several steps stacked
        (T, ...) give one distribution over the stacked steps."""
        return cls.from_log_probs(log_probs)

    def sample(self, uniform: torch.Tensor | None = None) -> torch.Tensor:
        """One-hot sample with straight-through gradients; `uniform` (...), one U[0, 1) per
        distribution, if drawn beforehand (see sample_index)."""
        return sample_one_hot(self.probs, uniform)

    def mode(self) -> torch.Tensor:
        one_hot = one_hot_of(self.log_probs.argmax(-1), self.log_probs.shape[-1], self.probs.dtype)
        return straight_through(one_hot, self.probs)

    def log_prob(self, one_hot: torch.Tensor) -> torch.Tensor:
        return self._sum_event((one_hot.float() * self.log_probs).sum(-1))

    def entropy(self) -> torch.Tensor:
        return self._sum_event(-(self.probs * self.log_probs).sum(-1))

    def kl(self, other: "OneHotCategorical") -> torch.Tensor:
        """KL(self || other), summed over the event axes."""
        return self._sum_event((self.probs * (self.log_probs - other.log_probs)).sum(-1))


def categorical_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from log-probabilities over the last axis, summed over the last two axes
    (the RSSM's (stoch, classes)): (..., stoch, classes) -> (...)."""
    return (log_p.exp() * (log_p - log_q)).sum((-2, -1))


class BoundedNormal:
    """Diagonal Gaussian with mean tanh(raw_mean) and std (max - min) * sigmoid(raw_std + 2) + min,
    independent over the last axis (the action dimensions)."""

    def __init__(self, raw_mean: torch.Tensor, raw_std: torch.Tensor, min_std: float, max_std: float):
        self.mean = torch.tanh(raw_mean.float())
        self.std = (max_std - min_std) * torch.sigmoid(raw_std.float() + 2.0) + min_std

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What defines it (see from_tensors): (mean, std)."""
        return self.mean, self.std

    @classmethod
    def from_tensors(cls, mean: torch.Tensor, std: torch.Tensor) -> "BoundedNormal":
        """From tensors(); those of several steps stacked (T, ..., A) give one distribution over the
        stacked steps."""
        out = cls.__new__(cls)
        out.mean, out.std = mean, std
        return out

    def sample(self, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Reparameterised sample (gradients flow to mean and std); `noise` (..., A), standard
        normal, if drawn beforehand."""
        return self.mean + self.std * (torch.randn_like(self.mean) if noise is None else noise)

    def mode(self) -> torch.Tensor:
        return self.mean

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        z = (value.float() - self.mean) / self.std
        return (-0.5 * z.square() - torch.log(self.std) - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self) -> torch.Tensor:
        return (0.5 + 0.5 * math.log(2 * math.pi) + torch.log(self.std)).sum(-1)


class Bernoulli:
    """Bernoulli from logits (the continuation head)."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits.float()

    @property
    def mean(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def mode(self) -> torch.Tensor:
        return (self.logits > 0).float()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return -F.binary_cross_entropy_with_logits(self.logits, value.float(), reduction="none")
