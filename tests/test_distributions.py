"""The distributions' maths against hand-computed values and torch.distributions."""
import math

import numpy as np
import pytest
import torch

from distributions import (Bernoulli, BoundedNormal, OneHotCategorical, TwoHotSymlog, categorical_kl,
                           sample_index, sample_one_hot, two_hot, two_hot_bins, unimix_log_probs)
from tools import symexp, symlog


def test_symlog_and_symexp_are_inverses():
    x = torch.tensor([-1e6, -1234.5, -3.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 7.0, 1e4, 1e6], dtype=torch.float64)
    torch.testing.assert_close(symexp(symlog(x)), x, rtol=1e-12, atol=1e-12)
    y = torch.linspace(-14, 14, 57, dtype=torch.float64)
    torch.testing.assert_close(symlog(symexp(y)), y, rtol=1e-12, atol=1e-12)
    assert symlog(torch.tensor(math.e - 1)).item() == pytest.approx(1.0)
    assert symlog(torch.tensor(-(math.e - 1))).item() == pytest.approx(-1.0)


def test_two_hot_bins_span_minus_20_to_20():
    bins = two_hot_bins(255)
    assert bins.shape == (255,)
    assert bins[0].item() == -20.0 and bins[-1].item() == 20.0 and bins[127].item() == 0.0


@pytest.mark.parametrize("value, expected", [
    (5.0, [0, 0, 0.5, 0.5, 0]),      # halfway between the bins at 0 and 10
    (-12.5, [0.25, 0.75, 0, 0, 0]),  # a quarter of the way from -10 to -20
    (0.0, [0, 0, 1, 0, 0]),          # exactly on a bin
    (20.0, [0, 0, 0, 0, 1]),         # the last bin
    (100.0, [0, 0, 0, 0, 1]),        # beyond the range: clipped to the end bin
    (-30.0, [1, 0, 0, 0, 0]),
    (17.0, [0, 0, 0, 0.3, 0.7]),
])
def test_two_hot_encoding_matches_hand_computed_vectors(value, expected):
    # 5 bins at -20, -10, 0, 10, 20 (values already in symlog space)
    encoded = two_hot(torch.tensor([value]), 5)
    torch.testing.assert_close(encoded, torch.tensor([expected], dtype=torch.float32), atol=1e-6, rtol=0)


def test_a_nan_target_gives_a_nan_likelihood_not_an_index_error():
    """A diverged model's NaN reward or return: its two-hot index stays a bin (a NaN index failed the
    gather on a CPU and would be a device-side assert on a GPU), so the NaN reaches the loss and the
    run's divergence check; the other targets keep their values."""
    values = torch.tensor([float("nan"), 5.0, float("inf"), -float("inf")])
    encoded = two_hot(values, 5)  # symlog-space values: bins -20, -10, 0, 10, 20
    assert torch.isnan(encoded[0]).any() and not torch.isnan(encoded[1:]).any()
    torch.testing.assert_close(encoded[1:], torch.tensor([[0, 0, 0.5, 0.5, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0.]]))
    logits = torch.zeros(4, 255)
    log_prob = TwoHotSymlog(logits).log_prob(values)
    assert torch.isnan(log_prob[0]) and torch.isfinite(log_prob[1:]).all()


def test_two_hot_decoding_is_symexp_of_expected_bin():
    probs = torch.tensor([[0, 0, 0.5, 0.5, 0], [0.25, 0.75, 0, 0, 0]])
    dist = TwoHotSymlog(torch.log(probs.clamp(min=1e-30)))
    expected = torch.tensor([math.exp(5.0) - 1.0, -(math.exp(12.5) - 1.0)])
    torch.testing.assert_close(dist.mean, expected, rtol=1e-5, atol=0)


def test_two_hot_log_prob_is_two_hot_weighted_log_softmax():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5, -0.2]])
    log_softmax = torch.log_softmax(logits, -1)
    value = symexp(torch.tensor([5.0]))  # symlog(value) = 5: bins 2 and 3, 0.5 each
    expected = 0.5 * log_softmax[0, 2] + 0.5 * log_softmax[0, 3]
    assert TwoHotSymlog(logits).log_prob(value).item() == pytest.approx(expected.item(), abs=1e-6)


def test_two_hot_weighted_log_prob_sums_the_targets_with_one_gather():
    """The critic's loss reads the return and the slow critic's value from one distribution: the
    weighted sum equals the separate log-likelihoods, values and gradients alike, and its backward
    holds a single gather (one zero-filled (..., bins) gradient instead of four)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 255, requires_grad=True)
    returns, slow = torch.randn(3, 5) * 30, torch.randn(3, 5) * 3
    dist = TwoHotSymlog(logits)
    got = dist.weighted_log_prob([returns, slow], [1.0, 0.5])  # (3, 5)
    want = dist.log_prob(returns) + 0.5 * dist.log_prob(slow)
    torch.testing.assert_close(got, want)
    expected_log_prob = (two_hot(symlog(returns), 255) * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(dist.log_prob(returns), expected_log_prob)
    grad_got, = torch.autograd.grad(got.sum(), logits, retain_graph=True)
    grad_want, = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(grad_got, grad_want)
    names, stack, seen = [], [got.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.append(node.name())
            stack.extend(child for child, _ in node.next_functions)
    assert names.count("GatherBackward0") == 1, names


def test_two_hot_round_trip_for_255_bins():
    values = torch.tensor([-1000.0, -3.2, 0.0, 0.7, 42.0, 12345.0])
    probs = two_hot(symlog(values), 255)
    torch.testing.assert_close(TwoHotSymlog(torch.log(probs.clamp(min=1e-30))).mean, values, rtol=1e-4, atol=1e-4)


def test_unimix_mixes_one_percent_uniform():
    logits = torch.tensor([[0.0, -1e9, -1e9, -1e9]])
    probs = unimix_log_probs(logits, 0.01).exp()
    torch.testing.assert_close(probs, torch.tensor([[0.9925, 0.0025, 0.0025, 0.0025]]))
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    expected = 0.99 * torch.softmax(logits, -1) + 0.01 / 3
    torch.testing.assert_close(unimix_log_probs(logits, 0.01).exp(), expected)
    torch.testing.assert_close(unimix_log_probs(logits, 0.0).exp(), torch.softmax(logits, -1))


def test_one_hot_sample_is_exact_one_hot_with_straight_through_gradient():
    logits = torch.tensor([[0.5, -0.3, 1.2, 0.0]], requires_grad=True)
    dist = OneHotCategorical(logits, unimix=0.01)
    sample = dist.sample()
    assert sorted(sample.detach()[0].tolist()) == [0.0, 0.0, 0.0, 1.0]
    weights = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    (grad_sample,) = torch.autograd.grad((sample * weights).sum(), logits, retain_graph=True)
    (grad_probs,) = torch.autograd.grad((dist.probs * weights).sum(), logits)
    torch.testing.assert_close(grad_sample, grad_probs)


def test_one_hot_sample_frequencies_follow_the_mixed_probabilities():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 0.0, -1.0]).expand(20000, 3)
    dist = OneHotCategorical(logits, unimix=0.01)
    freq = dist.sample().detach().mean(0)
    torch.testing.assert_close(freq, dist.probs[0], atol=0.015, rtol=0)


def test_sample_index_draws_each_class_with_its_probability_and_never_a_zero_one():
    torch.manual_seed(3)
    probs = torch.tensor([[0.0, 0.7, 0.0, 0.3], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 1.0]])
    draws = 40000
    index = sample_index(probs[:, None].expand(3, draws, 4).contiguous())  # (3, draws)
    assert index.shape == (3, draws) and index.dtype == torch.long
    freq = torch.stack([(index == k).float().mean(1) for k in range(4)], -1)  # (3, 4)
    assert torch.all(freq[probs == 0] == 0)  # impossible classes are never drawn
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)  # 4 sigma at 40,000 draws
    # a given uniform that rounds up to 1 in the probabilities' float32 still names a class
    last = sample_index(torch.tensor([[0.2, 0.3, 0.5]]), torch.tensor([1.0 - 1e-12], dtype=torch.float64))
    assert last.tolist() == [2]
    # latents' layout (N, stoch, classes): each (row, stoch) is its own distribution
    logits = torch.randn(2, 3, 5)
    latent_probs = torch.softmax(logits, -1)
    many = sample_index(latent_probs[None].expand(20000, 2, 3, 5).contiguous())  # (20000, 2, 3)
    latent_freq = torch.nn.functional.one_hot(many, 5).float().mean(0)  # (2, 3, 5)
    torch.testing.assert_close(latent_freq, latent_probs, atol=0.015, rtol=0)


def test_compiled_samples_equal_the_eager_ones_also_at_the_edges():
    """Compiled, sample_index counts the cumulative sums at or below the threshold and one_hot_of
    compares with a class range (both fuse into one kernel); eager, they are searchsorted and a
    scatter. The indices and one-hot vectors must be the same, including thresholds that land
    exactly on a cumulative sum, zero-probability classes, u = 0 and u just below 1."""
    torch.manual_seed(5)
    probs = torch.softmax(torch.randn(64, 4, 8) * 3, -1)  # (64, 4, 8)
    probs[:8, :, 2:5] = 0.0  # impossible classes, first rows
    probs[8:16] = 0.125  # uniform rows: cumulative sums 0.125, 0.25, ... exactly
    uniform = torch.rand(64, 4)
    uniform[8:16] = torch.tensor([0.0, 0.25, 0.5, 1.0 - 2 ** -24])  # on the sums and at the ends
    uniform[:4] = 0.0

    def draw(p, u):
        return sample_one_hot(p, u)

    eager = draw(probs, uniform)
    compiled = torch.compile(draw, fullgraph=True)(probs, uniform)
    assert torch.equal(compiled, eager)
    assert torch.all(eager.sum(-1) == 1) and torch.all(eager[probs == 0] == 0)
    index = sample_index(probs, uniform)
    assert torch.equal(eager.argmax(-1), index)
    assert torch.equal(index[8:16, 1], torch.full((8,), 2))  # u * total = 0.25 exactly: the class above

def test_one_hot_log_prob_entropy_kl_match_torch():
    torch.manual_seed(1)
    logits_p, logits_q = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    p = OneHotCategorical(logits_p, unimix=0.0, event_dims=1)
    q = OneHotCategorical(logits_q, unimix=0.0, event_dims=1)
    tp, tq = torch.distributions.Categorical(logits=logits_p), torch.distributions.Categorical(logits=logits_q)
    torch.testing.assert_close(p.entropy(), tp.entropy().sum(-1))
    torch.testing.assert_close(p.kl(q), torch.distributions.kl_divergence(tp, tq).sum(-1))
    torch.testing.assert_close(categorical_kl(p.log_probs, q.log_probs), p.kl(q))
    one_hot = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2, 3]] * 3), 5).float()
    torch.testing.assert_close(p.log_prob(one_hot), tp.log_prob(torch.tensor([[0, 1, 2, 3]] * 3)).sum(-1))


def test_bounded_normal_std_range_and_moments():
    raw_mean = torch.tensor([[-50.0, 0.0, 3.0]])
    raw_std = torch.tensor([[-100.0, 0.0, 100.0]])
    dist = BoundedNormal(raw_mean, raw_std, min_std=0.1, max_std=1.0)
    torch.testing.assert_close(dist.mean, torch.tanh(raw_mean))
    expected_std = torch.tensor([[0.1, 0.9 * torch.sigmoid(torch.tensor(2.0)).item() + 0.1, 1.0]])
    torch.testing.assert_close(dist.std, expected_std)
    reference = torch.distributions.Normal(dist.mean, dist.std)
    value = torch.tensor([[0.2, -0.4, 0.9]])
    torch.testing.assert_close(dist.log_prob(value), reference.log_prob(value).sum(-1))
    torch.testing.assert_close(dist.entropy(), reference.entropy().sum(-1))
    assert torch.equal(dist.mode(), dist.mean)


def test_bounded_normal_sample_is_reparameterised():
    raw_mean = torch.zeros(1, 2, requires_grad=True)
    dist = BoundedNormal(raw_mean, torch.zeros(1, 2), 0.1, 1.0)
    dist.sample().sum().backward()
    torch.testing.assert_close(raw_mean.grad, torch.ones(1, 2))  # d tanh(x)/dx at 0 is 1


def test_bernoulli_log_prob_and_mode():
    logits = torch.tensor([-2.0, 0.5, 3.0])
    dist = Bernoulli(logits)
    target = torch.tensor([0.0, 1.0, 1.0])
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(target)
    torch.testing.assert_close(dist.log_prob(target), expected)
    assert dist.mode().tolist() == [0.0, 1.0, 1.0]
    assert Bernoulli(torch.tensor([0.0, 1e-4, -1e-4])).mode().tolist() == [0.0, 1.0, 0.0]  # p > 0.5 only
    np.testing.assert_allclose(dist.mean.numpy(), 1 / (1 + np.exp(-logits.numpy())), rtol=1e-6)


@pytest.mark.parametrize("shape", [(5, 2), (3, 4, 8), (2, 3, 15), (4, 16), (2, 3, 32), (7,)])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_over_a_short_last_axis_equals_torchs_and_its_gradient(shape, log):
    """On a CPU a last axis shorter than 16 is reduced along a moved axis (torch's kernel is 4-10x
    slower on a short last axis): the same values and gradients as torch's own, in the same shape."""
    from distributions import softmax_last

    torch.manual_seed(0)
    x = (3 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    ours = softmax_last(x, log=log)
    theirs = (torch.log_softmax if log else torch.softmax)(x, -1)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    weights = torch.randn(shape, dtype=torch.float64)
    ours_grad, = torch.autograd.grad((ours * weights).sum(), x)
    theirs_grad, = torch.autograd.grad((theirs * weights).sum(), x)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-12, atol=1e-12)
