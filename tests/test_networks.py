"""RSSM, encoders, decoders and heads: key selection, shapes, resets, and the fused computations."""
import re

import gymnasium as gym
import numpy as np
import pytest
import torch

from distributions import unimix_log_probs
from networks import (RSSM, Actor, EnsembleMLP, Head, LayerNormGRU, MultiDecoder, MultiEncoder,
                      check_key_selections, features, maybe_compile, probe_backward, select_keys,
                      unusable_keys_warning, unused_keys_note)

IMAGE = gym.spaces.Box(0, 255, (16, 16, 3), np.uint8)
VECTOR = gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)
FLAG = gym.spaces.Box(0, 1, (), bool)


def make_rssm(action_dim=2, embed_dim=7):
    torch.manual_seed(0)
    return RSSM(action_dim, embed_dim, deter=8, hidden=6, stoch=3, classes=4, unimix=0.01, gru_update_bias=-1.0)


# -- key selection ---------------------------------------------------------------------------

def test_select_keys_uses_full_match_and_rank():
    space = {"image": IMAGE, "image2": IMAGE, "vector": VECTOR, "is_first": FLAG, "reward": VECTOR,
             "log_stat": VECTOR, "depth": gym.spaces.Box(0, 1, (16, 16, 1), np.float32)}
    assert select_keys(space, "image", "$^", "encoder") == (["image"], [])
    assert select_keys(space, "image.*", ".*", "encoder") == (["image", "image2"], ["vector"])
    assert select_keys(space, ".*", "$^", "decoder") == (["image", "image2"], [])  # float depth is no image
    with pytest.raises(ValueError, match=r"The encoder selects no observation key: cnn_keys='\$\^' .*"
                                         r"mlp_keys='vec'.*--encoder.mlp_keys"):
        select_keys(space, "$^", "vec", "encoder")


def test_key_selection_errors_name_every_part_and_its_own_flags():
    """The world model checks the encoder's and the decoder's keys together: one error names both
    when both select nothing, and the example fix uses each part's own flags."""
    space = {"vector": VECTOR, "is_first": FLAG}
    nothing = {"cnn_keys": "image", "mlp_keys": "$^"}
    with pytest.raises(ValueError) as both:
        check_key_selections(space, {"encoder": nothing, "decoder": nothing})
    message = str(both.value)
    assert message.startswith("The encoder and the decoder select no observation key: the encoder's cnn_keys='image'")
    assert "the decoder's cnn_keys='image' matches no (H, W, C) uint8 image" in message
    assert "e.g. --encoder.mlp_keys '.*' --decoder.mlp_keys '.*' for the vector observations." in message
    with pytest.raises(ValueError) as decoder_only:
        check_key_selections(space, {"encoder": {"cnn_keys": "$^", "mlp_keys": ".*"}, "decoder": nothing})
    message = str(decoder_only.value)
    assert message.startswith("The decoder selects no observation key: cnn_keys='image'")
    assert "--decoder.mlp_keys '.*'" in message and "--encoder." not in message
    check_key_selections(space, {"encoder": {"cnn_keys": "$^", "mlp_keys": ".*"}})  # a vector: fine


def test_unused_keys_note_names_what_the_encoder_leaves_out_and_the_flags_that_add_it():
    """README's custom-env example gives an image and a vector; the `custom` block selects images
    only: the run says which keys it drops and how to keep them (nothing for flags and log_ keys)."""
    space = {"image": IMAGE, "vector": VECTOR, "joints": VECTOR, "is_first": FLAG, "log_success": VECTOR}
    note = unused_keys_note(space, {"cnn_keys": "image", "mlp_keys": "$^"})
    assert note == ("observation keys the model does not use: 'vector' (5,) float32, 'joints' (5,) float32 "
                    "(encoder cnn_keys='image', mlp_keys='$^'); to use them: --encoder.mlp_keys 'vector|joints' "
                    "--decoder.mlp_keys 'vector|joints'")
    # keys already used stay in the suggested pattern
    note = unused_keys_note(space, {"cnn_keys": "$^", "mlp_keys": "vector"})
    assert "--encoder.mlp_keys 'vector|joints'" in note and "--encoder.cnn_keys 'image' --decoder.cnn_keys 'image'" in note
    assert unused_keys_note(space, {"cnn_keys": ".*", "mlp_keys": ".*"}) is None
    depth = {"image": IMAGE, "depth": gym.spaces.Box(0, 1, (16, 16, 1), np.float32)}
    assert unused_keys_note(depth, {"cnn_keys": "image", "mlp_keys": "$^"}).endswith(
        "(only (n,) float vectors and (H, W, C) uint8 images can be used)")


def test_keys_the_expressions_select_but_the_model_cannot_take_are_a_warning_with_the_fix():
    """A float image, a scalar and a 2-D array that the key expressions name were left out with an
    INFO line; now a warning names each with its fix, and a part that selects nothing says why."""
    space = {"image": gym.spaces.Box(0, 1, (16, 16, 3), np.float32), "vector": VECTOR,
             "speed": gym.spaces.Box(-1, 1, (), np.float32), "grid": gym.spaces.Box(0, 1, (3, 4), np.float32)}
    encoder = {"cnn_keys": "image", "mlp_keys": "vector|speed|grid"}
    assert unusable_keys_warning(space, encoder) == (
        "observation keys the model cannot use, left out: 'image' (16, 16, 3) float32 matches cnn_keys='image' "
        "but images must be uint8 (0-255): declare Box(0, 255, shape, np.uint8) and return e.g. "
        "(x * 255).astype(np.uint8); 'speed' () float32 matches mlp_keys='vector|speed|grid' but it is a scalar: "
        "declare shape (1,) and return np.array([x], np.float32); 'grid' (3, 4) float32 matches "
        "mlp_keys='vector|speed|grid' but vectors must be (n,): declare (12,) and return x.reshape(-1)")
    assert unused_keys_note(space, encoder) is None  # said once, by the warning
    assert unusable_keys_warning(space, {"cnn_keys": "$^", "mlp_keys": "vector"}) is None
    grey = {"image": gym.spaces.Box(0, 255, (16, 16), np.uint8)}  # named by cnn_keys: an image, not a vector
    assert unusable_keys_warning(grey, {"cnn_keys": "image", "mlp_keys": "$^"}).endswith(
        "but images must be (H, W, C): declare (16, 16, 1) and return x[..., None] (a grey image), or repeat "
        "it to 3 channels")
    with pytest.raises(ValueError, match=r"cnn_keys='image' matches no \(H, W, C\) uint8 image and mlp_keys='\$\^' "
                                         r"matches no \(n,\) vector \('image' \(16, 16, 3\) float32 matches "
                                         r"cnn_keys='image' but images must be uint8"):
        MultiEncoder(space, mlp_keys="$^", cnn_keys="image")


def test_image_size_must_be_min_res_times_power_of_two_and_the_message_gives_a_min_res_that_fits():
    """84x84 (the common Atari size): the message names both min_res flags with a value that
    works; following it builds the encoder and the decoder (changing only the encoder's did not,
    and the decoder's error still named encoder.min_res)."""
    space = {"image": gym.spaces.Box(0, 255, (84, 84, 3), np.uint8)}
    fix = ("Resize the images in the env to 64x64 (the paper's size) or another power of two, or keep 84 pixels "
           "with --encoder.min_res 21 --decoder.min_res 21 (any of 42, 21 works; the decoder needs it too where "
           "it decodes the image; the image embedding is then 6.9x as large as at 64x64).")
    with pytest.raises(ValueError, match=r"Image 'image' has size 84x84, but the encoder's CNN needs height = "
                                         r"min_res \* 2\^k with k >= 1 \(encoder.min_res=4\)\. " + re.escape(fix)):
        MultiEncoder(space, mlp_keys="$^", cnn_keys="image", cnn_depth=4, min_res=4)
    MultiEncoder(space, mlp_keys="$^", cnn_keys="image", cnn_depth=4, min_res=21)
    with pytest.raises(ValueError, match=r"the decoder's CNN needs .*\(decoder.min_res=4\)"):
        MultiDecoder(16, space, mlp_keys="$^", cnn_keys="image", cnn_depth=4, min_res=4)
    MultiDecoder(16, space, mlp_keys="$^", cnn_keys="image", cnn_depth=4, min_res=21)
    IMAGE64 = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    odd = {"image": gym.spaces.Box(0, 255, (63, 63, 3), np.uint8)}
    with pytest.raises(ValueError, match=r"No min_res fits 63 pixels: resize the images in the env to 64x64"):
        MultiEncoder(odd, mlp_keys="$^", cnn_keys="image", cnn_depth=4, min_res=4)
    with pytest.raises(ValueError, match=r"Use --encoder.min_res 4 --decoder.min_res 4 \(the paper's; any of "
                                         r"32, 16, 8, 4, 2 works"):  # it suggested the failing 64x64 itself
        MultiEncoder({"image": IMAGE64}, mlp_keys="$^", cnn_keys="image", cnn_depth=4, min_res=128)
    wide = {"image": gym.spaces.Box(0, 255, (48, 96, 3), np.uint8)}
    with pytest.raises(ValueError, match=r"Resize the images in the env to one square size \(64x64 is the paper's\)\.$"):
        MultiEncoder(wide, mlp_keys="$^", cnn_keys="image", cnn_depth=4, min_res=4)


# -- encoder / decoder -----------------------------------------------------------------------

@pytest.mark.parametrize("keys, embed_dim", [(("image", "$^"), 8 * 4 * 4), (("$^", ".*"), 32),
                                             (("image", ".*"), 8 * 4 * 4 + 32)])  # 16x16: 2 stages, depth 4 -> 8
def test_encoder_decoder_shapes(keys, embed_dim):
    space = {"image": IMAGE, "vector": VECTOR, "is_first": FLAG}
    cnn_keys, mlp_keys = keys
    encoder = MultiEncoder(space, mlp_keys=mlp_keys, cnn_keys=cnn_keys, cnn_depth=4, min_res=4,
                           mlp_units=32, mlp_layers=2)
    assert encoder.out_dim == embed_dim
    obs = {"image": torch.randint(0, 256, (2, 3, 16, 16, 3), dtype=torch.uint8), "vector": torch.randn(2, 3, 5)}
    assert encoder(obs).shape == (2, 3, embed_dim)
    decoder = MultiDecoder(20, space, mlp_keys=mlp_keys, cnn_keys=cnn_keys, cnn_depth=4, min_res=4,
                           mlp_units=32, mlp_layers=2)
    out = decoder(torch.randn(2, 3, 20))
    if cnn_keys == "image":
        assert out["image"].shape == (2, 3, 16, 16, 3)
    if mlp_keys == ".*":
        assert out["vector"].shape == (2, 3, 5)
    assert set(out) == set(encoder.cnn_keys + encoder.mlp_keys)


def test_two_images_are_concatenated_on_channels():
    space = {"a": IMAGE, "b": gym.spaces.Box(0, 255, (16, 16, 1), np.uint8)}
    decoder = MultiDecoder(10, space, mlp_keys="$^", cnn_keys=".*", cnn_depth=4, min_res=4)
    out = decoder(torch.randn(4, 10))
    assert out["a"].shape == (4, 16, 16, 3) and out["b"].shape == (4, 16, 16, 1)


# -- heads -----------------------------------------------------------------------------------

def test_zero_initialised_head_outputs_zero_and_actor_shapes():
    head = Head(10, 255, units=16, layers=2, out_scale=0.0)
    assert torch.count_nonzero(head(torch.randn(5, 10))) == 0
    normal = Actor(10, 3, "normal", units=16, layers=1)
    dist = normal(torch.randn(5, 10))
    assert dist.sample().shape == (5, 3) and dist.entropy().shape == (5,)
    assert ((dist.std >= 0.1) & (dist.std <= 1.0)).all()
    onehot = Actor(10, 4, "onehot", units=16, layers=1)
    sample = onehot(torch.randn(5, 10)).sample()
    assert sample.shape == (5, 4) and torch.equal(sample.detach().sum(-1), torch.ones(5))


def test_weights_start_truncated_normal_with_variance_over_the_mean_fan():
    torch.manual_seed(0)
    head = Head(300, 100, units=300, layers=1)
    for weight, fan_in, fan_out in ((head.mlp.blocks[0].linear.weight, 300, 300), (head.out.weight, 300, 100)):
        target = (2.0 / (fan_in + fan_out)) ** 0.5  # the std after truncation at +-2 of the normal's std
        assert abs(weight.std().item() / target - 1) < 0.03, (weight.std().item(), target)
        assert weight.abs().max().item() <= 2 * target / 0.8796 + 1e-6
    actor = Actor(64, 64, "normal", units=64, layers=1)  # each half of the output as its own 64 x 64 layer
    for half in actor.out.weight.data.split(64):
        assert abs(half.std().item() / (2.0 / 128) ** 0.5 - 1) < 0.05, half.std().item()


def test_ensemble_members_differ_and_have_right_shape():
    torch.manual_seed(0)
    ensemble = EnsembleMLP(3, 6, 4, units=8, layers=2)
    out = ensemble(torch.randn(5, 6))
    assert out.shape == (3, 5, 4)
    assert not torch.allclose(out[0], out[1])


# -- GRU and RSSM ----------------------------------------------------------------------------

def test_layer_norm_gru_matches_the_gate_formula():
    torch.manual_seed(0)
    gru = LayerNormGRU(in_dim=3, deter=4, update_bias=-1.0)
    x, deter = torch.randn(2, 3), torch.randn(2, 4)
    gates = torch.nn.functional.layer_norm(torch.cat([deter, x], -1) @ gru.linear.weight.T, (12,),
                                           gru.norm.weight, gru.norm.bias, eps=1e-3)
    reset, cand, update = gates.split(4, -1)
    cand = torch.tanh(torch.sigmoid(reset) * cand)
    update = torch.sigmoid(update - 1.0)
    torch.testing.assert_close(gru(x, deter), update * cand + (1 - update) * deter)
    assert gru.linear.weight.shape == (12, 7)  # one fused Linear for the three gates


def test_rssm_observe_shapes_and_initial_state():
    rssm = make_rssm()
    out = rssm.observe(torch.randn(2, 5, 7), torch.randn(2, 5, 2), torch.zeros(2, 5, dtype=torch.bool))
    assert out["stoch"].shape == (2, 5, 12) and out["deter"].shape == (2, 5, 8)
    assert out["post"].shape == (2, 5, 3, 4) and out["prior"].shape == (2, 5, 3, 4)
    assert torch.equal(out["stoch"].detach().reshape(2, 5, 3, 4).sum(-1), torch.ones(2, 5, 3))
    with torch.no_grad():
        rssm.initial_deter.copy_(torch.linspace(-2.0, 2.0, 8))  # a learned value (it starts at 0)
    stoch, deter = rssm.initial(3)
    assert stoch.shape == (3, 12) and deter.shape == (3, 8)
    torch.testing.assert_close(deter[0], torch.tanh(rssm.initial_deter))
    assert deter.abs().max() < 1.0
    modes = rssm.prior_log_probs(deter[:1]).argmax(-1)  # (1, S): the initial stoch is the prior's mode
    torch.testing.assert_close(stoch[:1], torch.nn.functional.one_hot(modes, 4).float().flatten(-2))


def test_observe_equals_stepping_obs_step():
    """The whole-sequence projections in observe() compute the same maths as the per-step cell."""
    rssm = make_rssm()
    embed, action = torch.randn(2, 6, 7), torch.randn(2, 6, 2)
    is_first = torch.zeros(2, 6, dtype=torch.bool)
    is_first[1, 3] = True
    torch.manual_seed(3)
    out = rssm.observe(embed, action, is_first)
    torch.manual_seed(3)
    stoch, deter = rssm.initial(2)
    reset = is_first.clone()
    reset[:, 0] = True
    for t in range(6):
        stoch, deter, post = rssm.obs_step(stoch, deter, action[:, t], embed[:, t], reset[:, t])
        torch.testing.assert_close(out["deter"][:, t], deter)
        torch.testing.assert_close(out["post"][:, t], post)
        torch.testing.assert_close(out["stoch"][:, t], stoch)
    torch.testing.assert_close(out["prior"], rssm.prior_log_probs(out["deter"]))


def autograd_node_names(tensor: torch.Tensor) -> list[str]:
    """The names of every node in the backward graph of a tensor."""
    seen, names, stack = set(), [], [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        stack.extend(child for child, _ in node.next_functions)
    return names


def test_observe_splits_the_sequence_projections_once():
    """observe() unbinds the (B, T, hidden) action and embedding projections into per-step views, so
    backward stacks their gradients once; indexing [:, t] per step would add a zero-filled
    (B, T, hidden) gradient for every step (a SelectBackward node per step)."""
    rssm = make_rssm()
    embed = torch.randn(2, 5, 7, requires_grad=True)
    action = torch.randn(2, 5, 2, requires_grad=True)
    out = rssm.observe(embed, action, torch.zeros(2, 5, dtype=torch.bool))
    names = autograd_node_names(out["stoch"].sum())
    # the addends of the four per-step layers (action and embedding projections, GRU, logits bias),
    # the three LayerNorms' offsets and the sequence starts' initial deter
    assert names.count("UnbindBackward0") == 8, names
    assert "SelectBackward0" not in names, names
    # a weighted sum: the plain sum of straight-through samples has zero gradient (each group's
    # probabilities sum to 1), so its gradient would be rounding noise
    (out["stoch"] * torch.linspace(-1.0, 1.0, out["stoch"].shape[-1])).sum().backward()
    assert embed.grad.shape == (2, 5, 7) and embed.grad.abs().sum(-1).gt(1e-4).all()


def test_observe_gradients_equal_stepping_obs_step():
    """observe() computes the weight gradients of its per-step layers as one product over all steps
    (ScanWeightGrad): every parameter's and input's gradient equals that of the plain per-step
    cell, resets included."""
    rssm = make_rssm()
    embed = torch.randn(2, 6, 7, requires_grad=True)
    action = torch.randn(2, 6, 2, requires_grad=True)
    is_first = torch.zeros(2, 6, dtype=torch.bool)
    is_first[0, 2] = True
    target = torch.randn(2, 6, 3, 4)

    def loss_of(out_post, out_deter):
        return (out_post * target).sum() + out_deter.square().sum()

    torch.manual_seed(5)
    out = rssm.observe(embed, action, is_first)
    params = [p for p in rssm.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_of(out["post"], out["deter"]), params + [embed, action], allow_unused=True)
    torch.manual_seed(5)
    stoch, deter = rssm.initial(2)
    reset = is_first.clone()
    reset[:, 0] = True
    posts, deters = [], []
    for t in range(6):
        stoch, deter, post = rssm.obs_step(stoch, deter, action[:, t], embed[:, t], reset[:, t])
        posts.append(post)
        deters.append(deter)
    reference = torch.autograd.grad(loss_of(torch.stack(posts, 1), torch.stack(deters, 1)),
                                    params + [embed, action], allow_unused=True)
    names = [n for n, p in rssm.named_parameters() if p.requires_grad] + ["embed", "action"]
    for name, got, want in zip(names, grads, reference):
        if want is None:
            assert got is None or not got.any(), name
            continue
        assert want.abs().sum() > 0 or name.startswith("img_"), name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_observe_parameter_gradients_are_taken_once_per_sequence():
    """Every parameter the scan's steps share gets one gradient edge for the whole sequence: the
    per-step layers' weights (one product), the LayerNorms' scales and offsets (one reduction), the
    initial state (per-step uses would give one edge, one small product or reduction and one sum
    per step)."""
    rssm = make_rssm()
    out = rssm.observe(torch.randn(2, 5, 7), torch.randn(2, 5, 2), torch.zeros(2, 5, dtype=torch.bool))
    edges: dict[int, int] = {}
    seen, stack = set(), [out["post"].sum().grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None and hasattr(child, "variable"):
                edges[id(child.variable)] = edges.get(id(child.variable), 0) + 1
            stack.append(child)
    shared = {"gru.linear.weight", "obs_logits.weight", "initial_deter"} | {
        f"{norm}.norm.{p}" for norm in ("img_in", "gru", "obs_out") for p in ("weight", "bias")}
    for name, param in rssm.named_parameters():
        if name in shared:
            assert edges.get(id(param)) == 1, (name, edges.get(id(param)))


def test_observe_steps_return_their_recorded_inputs_without_graphs():
    """The scan step's recorded layer and LayerNorm inputs leave it detached: as outputs with a
    graph, a compiled step's backward would be handed a zero-filled gradient for each of them (seven
    fill kernels per step, counted on the CPU with inductor's kernel profile)."""
    rssm = make_rssm()
    step, returned = rssm._filter_step, []

    def recording_step(*args):
        out = step(*args)
        returned.append(out)
        return out

    rssm._filter_step = recording_step
    rssm.observe(torch.randn(2, 4, 7), torch.randn(2, 4, 2), torch.zeros(2, 4, dtype=torch.bool))
    assert len(returned) == 4
    for stoch, deter, post, _, inputs, norm_inputs in returned:
        assert stoch.requires_grad and deter.requires_grad and post.requires_grad
        assert len(inputs) == 4 and len(norm_inputs) == 3
        assert not any(x.requires_grad for x in inputs + norm_inputs)


def test_batch_major_stacks_steps_and_hands_each_a_contiguous_gradient():
    """BatchMajor turns time-major steps into the (B, T, ...) outputs; the gradient each step
    receives is its contiguous slice (a compiled step's backward would copy a strided one)."""
    from networks import BatchMajor

    leaves = [torch.randn(3, 4, requires_grad=True) for _ in range(5)]
    steps = [leaf * 1.0 for leaf in leaves]
    seen = []
    for step in steps:
        step.register_hook(lambda grad: seen.append(grad.is_contiguous()))
    out = BatchMajor.apply(torch.stack(steps))
    torch.testing.assert_close(out, torch.stack(leaves, 1))
    assert out.is_contiguous() and out.shape == (3, 5, 4)
    grad = torch.randn(3, 5, 4)
    out.backward(grad)
    assert seen == [True] * 5
    for t, leaf in enumerate(leaves):
        torch.testing.assert_close(leaf.grad, grad[:, t])


def test_is_first_resets_state_per_sequence():
    rssm = make_rssm()
    embed, action = torch.randn(2, 6, 7), torch.randn(2, 6, 2)
    is_first = torch.zeros(2, 6, dtype=torch.bool)
    is_first[0, 4] = True
    out = rssm.observe(embed, action, is_first)
    # After a reset the deterministic state only depends on the initial state (the action is zeroed).
    torch.testing.assert_close(out["deter"][0, 4], out["deter"][0, 0])
    torch.testing.assert_close(out["deter"][1, 0], out["deter"][0, 0])
    assert not torch.allclose(out["deter"][1, 4], out["deter"][0, 4])


def test_img_step_and_features_shapes():
    rssm = make_rssm()
    stoch, deter = rssm.initial(5)
    stoch, deter = rssm.img_step(stoch, deter, torch.randn(5, 2))
    assert stoch.shape == (5, 12) and deter.shape == (5, 8)
    assert features(stoch, deter).shape == (5, rssm.feat_size) and rssm.feat_size == 20


def test_img_step_samples_the_prior_with_its_probabilities_and_straight_through_gradients():
    """img_step draws its latent from the mixed probabilities directly (no log-probabilities):
    the classes' frequencies are those of prior_log_probs of its new deter, and the gradient is
    that of the probabilities."""
    rssm = make_rssm()
    torch.manual_seed(1)
    rows = 30000
    stoch, deter = (x.contiguous() for x in rssm.initial(rows))  # every row the same state
    stoch, new_deter = rssm.img_step(stoch, deter, torch.zeros(rows, 2))
    sample = stoch.detach().reshape(rows, 3, 4)
    assert torch.all(sample.sum(-1) == 1) and torch.all((sample == 0) | (sample == 1))
    want = rssm.prior_log_probs(new_deter[:1].detach())[0].exp()  # (S, C)
    torch.testing.assert_close(sample.mean(0), want, atol=0.012, rtol=0)
    weights = torch.randn(1, 12)
    deter = torch.randn(2, 8)
    stoch, new_deter = rssm.img_step(torch.zeros(2, 12), deter, torch.zeros(2, 2))
    (grad_sample,) = torch.autograd.grad((stoch * weights).sum(), rssm.img_logits.weight)
    probs = rssm.prior_log_probs(new_deter).exp().flatten(-2)  # (2, S*C)
    (grad_probs,) = torch.autograd.grad((probs * weights).sum(), rssm.img_logits.weight)
    torch.testing.assert_close(grad_sample, grad_probs)


def test_obs_step_samples_the_posterior_it_returns():
    """The filtering step's latent is drawn from the posterior whose log-probabilities it returns
    (the scan shares this code: test_observe_equals_stepping_obs_step)."""
    rssm = make_rssm()
    torch.manual_seed(2)
    rows = 30000
    stoch, deter = (x.contiguous() for x in rssm.initial(rows))
    embed = torch.randn(1, 7).expand(rows, 7)
    first = torch.zeros(rows, dtype=torch.bool)
    with torch.no_grad():
        stoch, _, post = rssm.obs_step(stoch, deter, torch.zeros(rows, 2), embed, first)
    assert post.shape == (rows, 3, 4)
    torch.testing.assert_close(post.exp().sum(-1), torch.ones(rows, 3))
    torch.testing.assert_close(stoch.reshape(rows, 3, 4).mean(0), post[0].exp(), atol=0.012, rtol=0)
    # and it is the posterior: the unimix log-probabilities of the logits from (new deter, embed)
    init_stoch, init_deter = rssm.initial(1)
    with torch.no_grad():
        new_deter = rssm.gru(rssm.img_in(torch.cat([init_stoch, torch.zeros(1, 2)], -1)), init_deter)
        logits = rssm.obs_logits(rssm.obs_out(torch.cat([new_deter, embed[:1]], -1)))  # (1, S*C)
    torch.testing.assert_close(post[0], unimix_log_probs(logits.reshape(3, 4), 0.01))


def test_probe_backward_cuts_tensors_inside_tuples_from_the_callers_graph():
    """The compiled scan step takes its LayerNorm taps in a tuple: the probe must detach them (its
    backward would otherwise run the caller's ScanNormGrad before any step was recorded) and still
    count them as leaves."""
    backward_calls = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            backward_calls.append(grad)
            return grad

    taps = (Spy.apply(torch.randn(3, requires_grad=True)),)

    def fn(x, taps):
        return x * taps[0]

    assert probe_backward(fn, fn, (torch.randn(3), taps), {})  # the tuple's tensor is the only leaf
    assert backward_calls == []


def test_maybe_compile_disabled_returns_the_function():
    fn = lambda x: x + 1  # noqa: E731
    assert maybe_compile(fn, False, "f") is fn


def test_maybe_compile_falls_back_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    compiled = maybe_compile(lambda x: x * 2, True, "double")
    with pytest.warns(UserWarning, match=r"torch.compile failed for double \(RuntimeError: no C\+\+ compiler\)"):
        torch.testing.assert_close(compiled(torch.ones(3)), torch.full((3,), 2.0))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once only
        torch.testing.assert_close(compiled(torch.ones(2)), torch.full((2,), 2.0))


class FailingBackward(torch.autograd.Function):
    """Identity forward; a backward that fails as a lazily compiled backward graph can."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward compilation failed")


def test_maybe_compile_falls_back_when_only_the_backward_fails(monkeypatch):
    """torch.compile builds the backward at the first backward pass; a failure there is found at
    the first call that builds a graph (not in the optimizer step), and the eager function's
    gradients are used from then on."""
    def compile_with_broken_backward(fn, **kwargs):
        return lambda *args: FailingBackward.apply(fn(*args))

    monkeypatch.setattr(torch, "compile", compile_with_broken_backward)
    layer = torch.nn.Linear(3, 2)
    compiled = maybe_compile(layer.forward, True, "layer")
    with torch.no_grad():  # no graph: nothing to check yet, the compiled forward is used
        torch.testing.assert_close(compiled(torch.ones(4, 3)), layer(torch.ones(4, 3)))
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.warns(UserWarning, match=r"torch.compile failed for layer \(RuntimeError: backward compilation"):
        out = compiled(x)
    out.sum().backward()  # the eager graph: no failure in the real backward
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(4, 3))
    torch.testing.assert_close(layer.weight.grad, x.detach().sum(0).expand(2, 3))


def test_maybe_compile_backward_probe_leaves_grads_untouched(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    layer = torch.nn.Linear(3, 2)
    compiled = maybe_compile(layer.forward, True, "layer")
    out = compiled(torch.randn(4, 3))
    assert layer.weight.grad is None and layer.bias.grad is None  # the probe's gradients are discarded
    out.sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((2,), 4.0))  # counted once, not twice


@pytest.mark.slow
def test_maybe_compile_really_compiles():
    compiled = maybe_compile(lambda x: torch.tanh(x) * 2 + 1, True, "f")
    x = torch.randn(8)
    torch.testing.assert_close(compiled(x), torch.tanh(x) * 2 + 1)
