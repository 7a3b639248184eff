"""World model and actor-critic: the maths (lambda-returns, free bits, return normaliser), shapes of
every public output, learning, parameter isolation and checkpoints."""
import io

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import config
import exploration
from models import ReturnNormalizer, action_size, kl_losses, lambda_returns, squared_error
from tools import set_seed

IMAGE = gym.spaces.Box(0, 255, (16, 16, 3), np.uint8)
VECTOR = gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)
FLAGS = {k: gym.spaces.Box(0, 1, (), bool) for k in ("is_first", "is_last", "is_terminal")}
OBS_SPACES = {
    "image": {"image": IMAGE, **FLAGS},
    "vector": {"vector": VECTOR, **FLAGS},
    "mixed": {"image": IMAGE, "vector": VECTOR, **FLAGS},
}
ACT_SPACES = {"normal": gym.spaces.Box(-1, 1, (2,), np.float32), "onehot": gym.spaces.Discrete(3)}


def make(obs="vector", dist="normal", *overrides, seed=0):
    cfg = config.load_config(["--configs", "debug", "--encoder.mlp_keys", ".*", "--decoder.mlp_keys", ".*",
                              "--actor_dist", dist, *overrides])
    set_seed(seed)
    agent = exploration.make_agent(OBS_SPACES[obs], ACT_SPACES[dist], cfg, "cpu")
    batch = exploration.synthetic_batch(OBS_SPACES[obs], ACT_SPACES[dist], cfg.batch_size, cfg.batch_length)
    return agent, batch, cfg


# -- maths -----------------------------------------------------------------------------------

def test_lambda_returns_hand_computed():
    reward = torch.tensor([[1.0], [2.0], [3.0]])  # (H=3, N=1)
    value = torch.tensor([[0.5], [1.0], [2.0], [4.0]])  # (H+1, N)
    disc = torch.tensor([[0.9], [0.9], [0.0]])  # the third step is terminal
    # R3 = 4; R2 = 3 + 0 = 3; R1 = 2 + 0.9 * (0.5 * 2 + 0.5 * 3) = 4.25; R0 = 1 + 0.9 * (0.5 * 1 + 0.5 * 4.25)
    expected = torch.tensor([[3.3625], [4.25], [3.0]])
    torch.testing.assert_close(lambda_returns(reward, value, disc, 0.5), expected)


def test_lambda_returns_limits_are_td0_and_monte_carlo():
    reward, value = torch.tensor([[1.0], [1.0]]), torch.tensor([[0.0], [2.0], [10.0]])
    disc = torch.full((2, 1), 0.5)
    torch.testing.assert_close(lambda_returns(reward, value, disc, 0.0), torch.tensor([[2.0], [6.0]]))  # r + d v'
    torch.testing.assert_close(lambda_returns(reward, value, disc, 1.0), torch.tensor([[4.0], [6.0]]))  # 1+.5*(1+.5*10)


def recursive_lambda_returns(reward, value, disc, lam):
    """The definition, step by step backwards: R_t = r_t + d_t ((1 - lam) v_{t+1} + lam R_{t+1})."""
    returns = [value[-1]]
    for t in reversed(range(reward.shape[0])):
        returns.append(reward[t] + disc[t] * ((1 - lam) * value[t + 1] + lam * returns[-1]))
    return torch.stack(returns[1:][::-1])


@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_lambda_returns_equal_the_recursion_with_its_gradients(lam):
    """The unrolled form gives the recursion's returns and gradients, terminal steps (discount 0)
    included, at the paper's horizon."""
    torch.manual_seed(0)
    horizon, rows = 15, 6
    reward = torch.randn(horizon, rows, dtype=torch.float64, requires_grad=True)
    value = torch.randn(horizon + 1, rows, dtype=torch.float64, requires_grad=True)
    disc = torch.full((horizon, rows), 0.997, dtype=torch.float64)
    disc[4, 1] = disc[0, 2] = disc[14, 3] = 0.0  # episode ends inside the horizon
    disc = disc.requires_grad_(True)
    got, want = lambda_returns(reward, value, disc, lam), recursive_lambda_returns(reward, value, disc, lam)
    torch.testing.assert_close(got, want)
    weights = torch.randn(horizon, rows, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((got * weights).sum(), (reward, value, disc)),
                    torch.autograd.grad((want * weights).sum(), (reward, value, disc))):
        torch.testing.assert_close(a, b)


def test_free_bits_clip_kl_below_at_one_nat_with_zero_gradient():
    uniform = torch.full((1, 2, 4), 0.25).log()
    near = torch.log_softmax(torch.tensor([[[0.1, 0.0, 0.0, 0.0], [0.0, 0.2, 0.0, 0.0]]]), -1)  # KL << 1
    far = torch.log_softmax(torch.tensor([[[6.0, 0.0, 0.0, 0.0], [0.0, 6.0, 0.0, 0.0]]]), -1)  # KL > 1
    for post, clipped in ((near, True), (far, False)):
        post = post.clone().requires_grad_(True)
        prior = uniform.clone().requires_grad_(True)
        dyn, rep, raw = kl_losses(post, prior, free=1.0)
        kl = (post.exp() * (post - prior)).sum((-2, -1)).detach()
        torch.testing.assert_close(raw, kl)
        expected = torch.ones(1) if clipped else kl
        torch.testing.assert_close(dyn.detach(), expected)
        torch.testing.assert_close(rep.detach(), expected)
        grad_post_dyn, grad_prior_dyn = torch.autograd.grad(dyn.sum(), (post, prior), allow_unused=True,
                                                            retain_graph=True)
        grad_post_rep, grad_prior_rep = torch.autograd.grad(rep.sum(), (post, prior), allow_unused=True)
        assert grad_post_dyn is None and grad_prior_rep is None  # dyn trains the prior, rep the posterior
        assert (grad_prior_dyn.abs().sum() == 0) == clipped and (grad_post_rep.abs().sum() == 0) == clipped


def test_return_normalizer_matches_numpy_percentiles():
    rng = np.random.default_rng(0)
    norm = ReturnNormalizer(low=5.0, high=95.0, decay=0.99, max=1.0)
    low = high = 0.0
    for _ in range(3):
        returns = rng.normal(3.0, 40.0, size=(15, 64)).astype(np.float32)
        norm.update(torch.as_tensor(returns))
        low = 0.99 * low + 0.01 * np.percentile(returns, 5)
        high = 0.99 * high + 0.01 * np.percentile(returns, 95)
        assert norm.low.item() == pytest.approx(low, rel=1e-5)
        assert norm.high.item() == pytest.approx(high, rel=1e-5)
    assert norm.scale().item() == pytest.approx(max(1.0, high - low), rel=1e-5)
    small = ReturnNormalizer()
    small.update(torch.zeros(10))
    assert small.scale().item() == 1.0  # the denominator is at least return_norm.max


def test_return_normalizer_gathers_returns_of_all_processes():
    norm = ReturnNormalizer(decay=0.0)  # decay 0: the EMA equals this batch's percentiles
    returns = torch.arange(10.0)
    norm.update(returns, gather=lambda x: torch.cat([x, x + 100.0]))  # as if a second process had x + 100
    both = np.concatenate([np.arange(10.0), np.arange(10.0) + 100])
    assert norm.low.item() == pytest.approx(np.percentile(both, 5))
    assert norm.high.item() == pytest.approx(np.percentile(both, 95))


def test_actor_dist_auto_follows_the_action_space_and_explicit_choices_are_checked():
    from models import resolve_actor_dist

    assert resolve_actor_dist(gym.spaces.Discrete(3), "auto") == "onehot"
    assert resolve_actor_dist(gym.spaces.Box(-1, 1, (2,), np.float32), "auto") == "normal"
    assert resolve_actor_dist(gym.spaces.Discrete(3), "onehot") == "onehot"
    with pytest.raises(ValueError, match=r"Discrete\(3\) but actor_dist is 'normal'"):
        resolve_actor_dist(gym.spaces.Discrete(3), "normal")


def test_action_size_rejects_mismatched_actor_dist():
    with pytest.raises(ValueError, match=r"Discrete\(3\) but actor_dist is 'normal'.*--actor_dist onehot"):
        action_size(gym.spaces.Discrete(3), "normal")
    with pytest.raises(ValueError, match=r"continuous Box\(2,\) but actor_dist is 'onehot'.*--actor_dist normal"):
        action_size(gym.spaces.Box(-1, 1, (2,), np.float32), "onehot")
    assert action_size(gym.spaces.Discrete(4), "onehot") == 4


# -- shapes of every public output ------------------------------------------------------------

@pytest.mark.parametrize("obs", ["image", "vector", "mixed"])
@pytest.mark.parametrize("dist", ["normal", "onehot"])
def test_public_output_shapes(obs, dist):
    agent, batch, cfg = make(obs, dist)
    action_dim = 2 if dist == "normal" else 3
    metrics = agent.train_step(batch)
    expected = {"loss/model", "loss/reward", "loss/cont", "loss/kl_dyn", "loss/kl_rep", "loss/actor", "loss/critic",
                "actor/entropy", "return/p5", "return/p95", "return/scale", "grad/model_norm", "grad/actor_norm",
                "grad/critic_norm"}
    expected |= {"loss/image"} if obs != "vector" else set()
    expected |= {"loss/vector"} if obs != "image" else set()
    assert expected <= set(metrics)
    for name, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.shape == () and not value.requires_grad, name
        assert torch.isfinite(value), name
    states = agent.wm.observe(batch)
    B, T = cfg.batch_size, cfg.batch_length
    assert states["stoch"].shape == (B, T, 16) and states["deter"].shape == (B, T, 32)
    obs_np = {k: np.zeros((3, *s.shape), s.dtype) for k, s in OBS_SPACES[obs].items()}
    obs_np["is_first"] = np.ones(3, bool)
    actions, state = agent.policy(obs_np, None, "train")
    assert actions.shape == (3, action_dim) and actions.dtype == np.float32
    assert [s.shape for s in state] == [(3, 16), (3, 32), (3, action_dim)]
    eval_actions, _ = agent.policy(obs_np, state, "eval")
    assert eval_actions.shape == (3, action_dim)
    if dist == "onehot":
        assert np.array_equal(actions.sum(-1), np.ones(3)) and set(np.unique(actions)) <= {0.0, 1.0}
    else:
        assert np.abs(actions).max() <= 1.0
    assert agent.random_actions(4).shape == (4, action_dim)
    report = agent.report(batch)
    if obs == "vector":
        assert report == {}
    else:
        n = min(6, B)
        assert report["openloop/image"].shape == (T, 3 * 16, n * 16, 3)
        assert report["openloop/image"].dtype == np.uint8


# -- learning and isolation ---------------------------------------------------------------------

def test_reconstruction_terms_are_squared_errors_summed_per_observation():
    agent, batch, cfg = make("mixed")
    wm = agent.wm
    states = wm.observe(batch)
    feat = torch.cat([states["stoch"], states["deter"]], -1)  # (B, T, F)
    targets = {k: batch[k] for k in ("image", "vector", "reward", "is_terminal")}
    terms = wm._heads_loss_eager(feat, states["post"], states["prior"], targets)
    recon = {k: v.detach().double().numpy() for k, v in wm.decoder(feat).items()}
    image = batch["image"].numpy().astype(np.float64) / 255.0  # uint8 (B, T, 16, 16, 3)
    vector = batch["vector"].numpy().astype(np.float64)
    symlog = np.sign(vector) * np.log1p(np.abs(vector))
    expected_image = ((recon["image"] - image) ** 2).sum((-3, -2, -1))  # (B, T)
    expected_vector = ((recon["vector"] - symlog) ** 2).sum(-1)
    assert terms["image"].shape == (cfg.batch_size, cfg.batch_length)
    np.testing.assert_allclose(terms["image"].detach().numpy(), expected_image, rtol=1e-5)
    np.testing.assert_allclose(terms["vector"].detach().numpy(), expected_vector, rtol=1e-5)
    # and the gradient of a squared error is 2 (prediction - target)
    pred, target = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    squared_error(pred, target).sum().backward()
    torch.testing.assert_close(pred.grad, 2 * (pred - target).detach())


def test_world_model_loss_drops_on_a_fixed_batch():
    """100 updates on one batch: the loss must fall below 75% of its start (it reaches about 65%)."""
    agent, batch, _ = make("vector", "normal")
    losses = [agent.train_world_model(batch)[1]["loss/model"] for _ in range(100)]
    first, last = losses[0].item(), losses[-1].item()
    assert last < 0.75 * first, (first, last)


@pytest.mark.parametrize("dist", ["normal", "onehot"])
def test_actor_critic_update_leaves_world_model_bit_identical(dist):
    agent, batch, _ = make("mixed", dist)
    states, _ = agent.train_world_model(batch)
    agent.train_world_model(batch)  # non-zero reward and critic weights, Adam state present
    before = {k: v.clone() for k, v in agent.wm.state_dict().items()}
    actor_before = [p.clone() for p in agent.task.actor.parameters()]
    critic_before = [p.clone() for p in agent.task.critic.parameters()]
    agent.train_behavior(states, batch)
    after = agent.wm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(a, p) for a, p in zip(actor_before, agent.task.actor.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(critic_before, agent.task.critic.parameters()))


@pytest.mark.parametrize("dist", ["normal", "onehot"])
def test_advantages_are_normalised_on_both_gradient_paths(dist):
    """Actor gradients scale with 1 / return scale, for dynamics backprop and for REINFORCE."""
    agent, batch, _ = make("vector", dist, "--actor.entropy", "0", "--return_norm.decay", "1.0")
    for _ in range(3):
        states, _ = agent.train_world_model(batch)
    start = {"stoch": states["stoch"].detach().flatten(0, 1), "deter": states["deter"].detach().flatten(0, 1),
             "cont": torch.ones(batch["reward"].numel())}
    # give the reward head and critic non-trivial outputs
    with torch.no_grad():
        for p in list(agent.wm.reward_head.out.parameters()) + list(agent.task.critic.out.parameters()):
            p.normal_(0.0, 0.5)
    grads = []
    for low, high in ((0.0, 0.5), (0.0, 4.0)):  # scales max(1, 0.5) = 1 and 4
        agent.task.return_norm.low.fill_(low)
        agent.task.return_norm.high.fill_(high)
        torch.manual_seed(7)
        actor_loss, _, metrics = agent.task.losses(agent.wm, start, agent.task_reward)
        grads.append(torch.autograd.grad(actor_loss, list(agent.task.actor.parameters())))
        assert metrics["return/scale"].item() == max(1.0, high - low)
    for g1, g4 in zip(*grads):
        torch.testing.assert_close(g4 * 4, g1, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_state_dict_round_trip_reproduces_actions_and_updates():
    agent, batch, _ = make("mixed", "normal", seed=0)
    agent.train_step(batch)
    buffer = io.BytesIO()
    torch.save(agent.state_dict(), buffer)
    buffer.seek(0)
    other, _, _ = make("mixed", "normal", seed=123)  # different initial weights
    other.load_state_dict(torch.load(buffer, weights_only=False))
    assert other.updates == agent.updates == 1
    obs = {"image": np.full((2, 16, 16, 3), 100, np.uint8), "vector": np.ones((2, 5), np.float32),
           "is_first": np.ones(2, bool)}
    outputs = []
    for model in (agent, other):
        torch.manual_seed(42)
        actions, state = model.policy(obs, None, "train")
        actions2, _ = model.policy({**obs, "is_first": np.zeros(2, bool)}, state, "train")
        outputs.append((actions, actions2, model.random_actions(3)))
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a, b)
    torch.manual_seed(5)
    m1 = agent.train_step(batch)
    torch.manual_seed(5)
    m2 = other.train_step(batch)
    for key in ("loss/model", "loss/actor", "loss/critic", "return/p95"):
        assert m1[key].item() == m2[key].item(), key


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_reduced_precision_updates_are_finite(precision):
    agent, batch, _ = make("mixed", "normal", "--precision", precision)
    for _ in range(12):  # float16: the scaler halves its scale on overflowing steps (skipped) until they fit
        metrics = agent.train_step(batch)
        assert all(torch.isfinite(v) for k, v in metrics.items() if k.startswith("loss/")), metrics
    assert all(torch.isfinite(v) for v in metrics.values()), metrics
    assert (agent.optimizers["model"].scaler is not None) == (precision == "16")


@pytest.mark.parametrize("dist,stacked", [("normal", False), ("onehot", False), ("normal", True), ("onehot", True)])
def test_compiled_update_equals_the_eager_update(monkeypatch, dist, stacked):
    """compile: True compiles the RSSM steps, the world-model heads and the actor's imagined step,
    forward and backward (the first call probes the backward), without an eager fallback, and
    computes what eager code does: with inductor drawing random numbers as eager code does, three
    updates give the same losses, for continuous (dynamics backprop) and discrete (REINFORCE)
    actions, and with the steps stacked as on CUDA (the actor's scan form). This also covers the
    actor's retain_graph=True backward through the compiled imagination step, which a compiled
    backward with donated buffers would refuse."""
    import warnings
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    losses = {}
    for compiled in ("False", "True"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            agent, batch, _ = make("vector", dist, "--compile", compiled)
            agent.task.stack_steps = stacked
            torch.manual_seed(5)
            metrics = [agent.train_step(batch) for _ in range(3)]
        fallbacks = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
        assert not fallbacks, fallbacks
        keys = ("loss/model", "loss/actor", "loss/critic", "model/kl", "model/post_entropy", "actor/entropy",
                "return/p95", "imagine/reward")
        losses[compiled] = torch.tensor([[m[k] for k in keys] for m in metrics])
    torch.testing.assert_close(losses["True"], losses["False"], rtol=1e-4, atol=1e-5)
    assert losses["True"][-1, 0] < losses["True"][0, 0]  # and it learns


def test_compile_fuses_the_encoder_heads_returns_and_losses(monkeypatch):
    """Besides the RSSM and imagined steps, compile: True compiles the training batch's encoding, the
    world model's heads and loss, imagination's stacked heads and reward, the lambda-returns and the
    actor-critic losses: forward and backward, each launches fewer calls than its eager code, and
    all of them together at most half (counted as scripts/bench.py --launches counts them); the
    same values."""
    from helpers.bench_script import import_bench
    from networks import detached_leaves, features

    count_launches = import_bench().count_launches
    monkeypatch.setattr(torch._inductor.config.cpp, "enable_kernel_profile", True)  # before compiling
    agents = {compiled: make("vector", "normal", "--compile", compiled)[0] for compiled in ("False", "True")}
    agent, batch, _ = make("vector", "normal")  # the same parameters (same seed): makes the inputs
    agent.set_stack_steps(True)
    obs = {k: batch[k] for k in agent.wm.encoder.mlp_keys}
    states = agent.wm.observe(batch)
    feat, post, prior = (x.detach() for x in (features(states["stoch"], states["deter"]), states["post"],
                                              states["prior"]))
    targets = {k: batch[k] for k in agent.wm.decoder.mlp_keys + ["reward", "is_terminal"]}
    start = imagination_starts(agent, batch)
    traj = agent.task.rollout(agent.wm, start, agent.task_reward)
    img_feat = torch.randn(traj["value"].shape + (feat.shape[-1],))  # (H+1, N, F)
    reward, value, cont, action, log_probs, slow = detached_leaves(
        (traj["reward"], traj["value"], traj["cont"], traj["action"], traj["critic_log_probs"], traj["slow"]))
    weight, returns = (x.detach() for x in agent.task._returns(reward, value, cont))
    policy, scale = detached_leaves(traj["policy"].tensors()), torch.tensor(2.0)
    launches, values = {}, {}
    for compiled, agent in agents.items():
        wm, ac = agent.wm, agent.task
        ac.stack_steps = True
        pieces = {
            "encoder": lambda: wm._encode(obs).sum().backward(),
            "world model heads and loss": lambda: wm._loss(feat, post, prior, targets)[0].backward(),
            "stacked heads and reward": lambda: sum(v.sum() for v in ac._stacked_heads(
                wm, img_feat, action, start["cont"], agent.task_reward).values()).backward(),
            "lambda-returns": lambda: sum(x.sum() for x in ac._returns(reward, value, cont)).backward(),
            "actor-critic losses": lambda: sum(ac._loss_terms(
                returns, value, scale, weight, action, policy, log_probs, slow)[:2]).backward(),
        }
        for name, run in pieces.items():
            run()  # the first call compiles
            launches[compiled, name] = sum(count_launches(run).values())
        values[compiled] = torch.stack([wm._loss(feat, post, prior, targets)[0],
                                        *ac._loss_terms(returns, value, scale, weight, action, policy, log_probs, slow),
                                        *(x.sum() for x in ac._returns(reward, value, cont))])
    for name in pieces:  # the products stay library calls; the elementwise work around them fuses
        assert launches["True", name] < launches["False", name], (name, launches)
    total = {c: sum(n for (c_, _), n in launches.items() if c_ == c) for c in agents}
    assert total["True"] <= total["False"] / 2, launches  # (debug sizes: 363 eager calls -> 127)
    torch.testing.assert_close(values["True"], values["False"], rtol=1e-4, atol=1e-5)


def test_a_float16_step_is_skipped_alike_when_another_ranks_gradients_overflowed():
    """With float16's gradient scaler the gradient hook (the ranks' all-reduce) runs before the
    scaler unscales and looks for inf/NaN: an overflow on one rank, which the average carries to
    every rank, makes every rank skip the step and lower its scale alike (checked first, only the
    overflowing rank skipped; the others stepped with inf gradients into NaN weights)."""
    from models import Optimizer

    param = torch.nn.Parameter(torch.ones(3))
    opt = Optimizer([param], lr=1e-3, eps=1e-8, clip=100.0, device=torch.device("cpu"), use_scaler=True)
    scale = opt.scaler.get_scale()

    def average_with_an_overflowed_rank(params):
        for p in params:
            p.grad.add_(float("inf"))

    opt.step((param * 2.0).sum(), average_with_an_overflowed_rank)
    assert torch.equal(param.detach(), torch.ones(3))  # skipped, not NaN
    assert opt.scaler.get_scale() < scale
    opt.step((param * 2.0).sum())  # a step without overflow moves the weights
    assert torch.all(param.detach() < 1.0)


def test_gradients_take_their_parameters_layout_for_fused_adam():
    """cuDNN returns channels-last weight gradients from autograd.grad; fused Adam needs the
    parameter's strides (the failure seen on an H200 with image models before this was fixed)."""
    from models import Optimizer, as_param_layout

    param = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    grad = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    assert grad.stride() != param.stride()
    fixed = as_param_layout(param, grad)
    assert fixed.stride() == param.stride() and torch.equal(fixed, grad)
    assert as_param_layout(param, None).abs().sum() == 0
    same = torch.randn(8, 4, 3, 3)
    assert as_param_layout(param, same) is same  # no copy when the layout already matches
    opt = Optimizer([param], lr=1e-3, eps=1e-8, clip=100.0, device=torch.device("cpu"))
    before = param.detach().clone()
    opt.step((param * grad).sum())
    assert not torch.equal(param.detach(), before)


def test_cuda_graphs_asked_for_on_the_cpu_train_eagerly_and_identically():
    """cuda_graphs only applies on CUDA: on the CPU the same seed gives bit-identical updates."""
    results = []
    for graphs in ("False", "True"):
        agent, batch, _ = make("vector", "normal", "--cuda_graphs", graphs)
        assert agent.graph_update is None
        results.append([agent.train_step(batch)["loss/model"].item() for _ in range(3)])
    assert results[0] == results[1]


def test_optimizer_state_of_an_eager_run_loads_into_a_cuda_graph_run_and_back():
    """Adam.load_state_dict would bring back the saved `capturable` flag; on CUDA a graph capture
    then fails (seen on an H200 when a resumed eager checkpoint met --cuda_graphs True)."""
    from models import Optimizer

    param = torch.nn.Parameter(torch.randn(3))
    eager = Optimizer([param], lr=1e-3, eps=1e-8, clip=100.0, device=torch.device("cpu"))
    eager.step(param.square().sum())
    graphed = Optimizer([torch.nn.Parameter(torch.randn(3))], lr=1e-3, eps=1e-8, clip=100.0,
                        device=torch.device("cpu"), capturable=True)
    graphed.load_state_dict(eager.state_dict())
    assert graphed.adam.param_groups[0]["capturable"] is True
    assert torch.equal(graphed.adam.state_dict()["state"][0]["exp_avg"], eager.adam.state[param]["exp_avg"])
    eager.load_state_dict(graphed.state_dict())
    assert eager.adam.param_groups[0]["capturable"] is False


def test_resumed_optimizer_uses_this_runs_learning_rate_and_epsilon():
    """Adam.load_state_dict would bring back the saved lr and eps, silently ignoring a resume's
    --actor_lr / --model_lr; the moments and step counts come from the checkpoint."""
    from models import Optimizer

    param = torch.nn.Parameter(torch.randn(3))
    old = Optimizer([param], lr=1e-4, eps=1e-8, clip=100.0, device=torch.device("cpu"))
    old.step(param.square().sum())
    new = Optimizer([torch.nn.Parameter(torch.randn(3))], lr=3e-4, eps=1e-5, clip=100.0,
                    device=torch.device("cpu"))
    new.load_state_dict(old.state_dict())
    group = new.adam.param_groups[0]
    assert (group["lr"], group["eps"]) == (3e-4, 1e-5)
    assert torch.equal(new.adam.state_dict()["state"][0]["exp_avg"], old.adam.state[param]["exp_avg"])
    assert float(new.adam.state_dict()["state"][0]["step"]) == 1.0


def test_imagined_actions_are_clipped_into_the_range_the_model_was_trained_on():
    """The paper's RSSM scales actions by sg(1 / max(1, |a|)): an imagined sample of 3.0 enters the
    dynamics as 1.0, and its gradient is scaled by 1/3, not zeroed."""
    agent, _, _ = make("vector", "normal")
    rssm = agent.wm.rssm
    stoch, deter = rssm.initial(2)
    outside = torch.tensor([[3.0, -0.5], [-2.0, 0.25]], requires_grad=True)
    inside = torch.tensor([[1.0, -0.5], [-1.0, 0.25]])
    torch.manual_seed(0)
    _, deter_outside = rssm.img_step(stoch, deter, outside)
    torch.manual_seed(0)
    _, deter_inside = rssm.img_step(stoch, deter, inside)
    torch.testing.assert_close(deter_outside, deter_inside)
    clipped = rssm.clip_action(outside)
    torch.testing.assert_close(clipped, inside)
    clipped.sum().backward()
    torch.testing.assert_close(outside.grad, torch.tensor([[1 / 3, 1.0], [0.5, 1.0]]))


def test_data_parallel_agent_reports_eager_updates():
    """A gradient hook (data-parallel run) switches CUDA graphs off; `graphed` follows, so autocast
    keeps its weight cache in the eager updates."""
    agent, _, _ = make("vector", "normal")
    agent.graph_update = object()  # stand-in for a CudaGraphUpdate (CUDA only)
    assert agent.graphed
    agent.set_grad_sync(lambda params: None)
    assert agent.graph_update is None and not agent.graphed


def test_imagination_runs_actor_and_slow_critic_only_where_losses_read_them():
    """No action is taken at the last imagined state: the actor and the slow critic run H times, the
    critic H + 1 times (its value bootstraps the returns)."""
    agent, batch, cfg = make("vector", "normal")
    calls = {"actor": 0, "critic": 0, "slow_critic": 0}
    for name in calls:
        getattr(agent.task, name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    agent.train_step(batch)
    horizon = int(cfg.imag_horizon)
    assert calls == {"actor": horizon, "critic": horizon + 1, "slow_critic": horizon}, calls


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Equal up to 1e-4 of the larger tensor's largest entry: imagination's gradients at init are
    ~1e-7 per entry, below assert_close's default absolute tolerance, which would pass anything."""
    scale = max(float(got.abs().max()), float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale, msg=name)


def imagination_starts(agent, batch) -> dict[str, torch.Tensor]:
    """Start states of imagination: the posterior states of the batch, (B*T, .)."""
    states = agent.wm.observe(batch)
    return {"stoch": states["stoch"].detach().flatten(0, 1), "deter": states["deter"].detach().flatten(0, 1),
            "cont": 1.0 - batch["is_terminal"].flatten().float()}


@pytest.mark.parametrize("dist,behavior", [("normal", "greedy"), ("onehot", "greedy"), ("normal", "plan2explore")])
def test_stacked_heads_give_the_per_step_losses_and_gradients(dist, behavior):
    """On a GPU the critic, slow critic and continue heads and the reward terms run once on the
    stacked imagined steps and the actor's gradients are taken once over them; the losses, metrics
    and actor/critic gradients equal those of the per-step evaluation (CPU), for the task reward and
    for plan2explore's intrinsic + extrinsic one."""
    results = []
    for stacked in (False, True):
        agent, batch, _ = make("vector", dist, "--behavior", behavior, "--plan2explore.extr_scale", "0.5")
        torch.nn.init.normal_(agent.wm.reward_head.out.weight, std=0.3)  # zero-initialised: make it count
        ac = agent.task if behavior == "greedy" else agent.expl.ac
        torch.manual_seed(2)  # a slow critic apart from the critic, so that its target counts
        torch.nn.init.normal_(ac.slow_critic.out.weight, std=0.3)
        reward_fn = agent.task_reward if behavior == "greedy" else agent.expl.reward_terms(agent.wm)
        ac.stack_steps = stacked
        agent.train_world_model(batch)
        start = imagination_starts(agent, batch)
        torch.manual_seed(1)
        actor_loss, critic_loss, metrics = ac.losses(agent.wm, start, reward_fn)
        assert metrics["imagine/reward"].abs() > 1e-3
        params = list(ac.actor.parameters()) + list(ac.critic.parameters())
        grads = torch.autograd.grad(actor_loss + critic_loss, params, allow_unused=True)
        results.append((actor_loss, critic_loss, metrics, grads))
    (a0, c0, m0, g0), (a1, c1, m1, g1) = results
    assert a0.item() != 0.0 and c0.item() != 0.0
    torch.testing.assert_close(a1, a0)
    torch.testing.assert_close(c1, c0)
    torch.testing.assert_close(m1, m0)
    for i, (x, y) in enumerate(zip(g0, g1)):
        if x is None:
            assert y is None
        else:
            assert_close_to_scale(y, x, f"parameter {i}")


@pytest.mark.parametrize("dist", ["normal", "onehot"])
def test_actor_scan_gives_the_plain_actors_losses_and_gradients(dist):
    """With stacked steps (CUDA), imagination runs the actor with detached parameters and takes
    each parameter's gradient once over all steps (networks.ActorScan); the losses and every actor
    and critic gradient equal those of calling the actor module itself at each step."""
    results = []
    for plain in (False, True):
        agent, batch, _ = make("vector", dist)
        ac = agent.task
        ac.stack_steps = True
        if plain:
            def plain_act(feat, noise, *scan_step):
                policy = ac.actor(feat)
                return policy.sample(noise), policy.tensors(), (), ()

            ac._act_eager = plain_act
        start = imagination_starts(agent, batch)
        torch.manual_seed(2)
        actor_loss, critic_loss, _ = ac.losses(agent.wm, start, agent.task_reward)
        names = [f"actor.{n}" for n, _ in ac.actor.named_parameters()] + [
            f"critic.{n}" for n, _ in ac.critic.named_parameters()]
        params = list(ac.actor.parameters()) + list(ac.critic.parameters())
        results.append((actor_loss, critic_loss, names, torch.autograd.grad(actor_loss + critic_loss, params)))
    (a0, c0, names, g0), (a1, c1, _, g1) = results
    torch.testing.assert_close(a0, a1)
    torch.testing.assert_close(c0, c1)
    for name, x, y in zip(names, g0, g1):
        assert y.abs().sum() > 0 or name.startswith("critic.mlp"), name  # the critic's output starts at 0
        assert_close_to_scale(x, y, name)


@pytest.mark.parametrize("stacked", [False, True])
def test_rollout_rewards_belong_to_their_transitions(stacked):
    """reward_fn sees every imagined transition (feat_t, action_t, feat_t+1) once, step by step (N
    rows) or stacked ((H, N) rows), and the rollout's reward is the sum of its terms in step order."""
    agent, batch, cfg = make("vector", "normal")
    agent.task.stack_steps = stacked
    start = imagination_starts(agent, batch)
    calls = []

    def reward_fn(feat, action, next_feat):
        calls.append(tuple(x.detach() for x in (feat, action, next_feat)))
        return {"next": next_feat.sum(-1), "pair": feat[..., 0] * action[..., 0]}

    traj = agent.task.rollout(agent.wm, start, reward_fn)
    horizon = int(cfg.imag_horizon)
    if stacked:
        assert len(calls) == 1
        feat, action, next_feat = calls[0]
    else:
        assert len(calls) == horizon
        feat, action, next_feat = (torch.stack(x) for x in zip(*calls))
    assert feat.shape[:2] == (horizon, start["deter"].shape[0])
    torch.testing.assert_close(feat[1:], next_feat[:-1])  # consecutive transitions chain up
    torch.testing.assert_close(feat[0], torch.cat([start["stoch"], start["deter"]], -1))
    torch.testing.assert_close(action, traj["action"].detach())
    torch.testing.assert_close(traj["reward"].detach(), next_feat.sum(-1) + feat[..., 0] * action[..., 0])


class RandomCalls(TorchDispatchMode):
    """Counts the aten calls that draw random numbers."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.startswith(("rand", "normal", "uniform", "bernoulli", "multinomial")):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dist", ["normal", "onehot"])
def test_imagination_and_the_scan_draw_their_random_numbers_once(dist):
    """Every step's random numbers are drawn in one call before the loop (a kernel per step on a
    GPU, and a seed kernel per call of a compiled step, otherwise): one call for the 64-step
    scan, two for the 15-step rollout (the actor's noise and the latents' uniforms)."""
    agent, batch, _ = make("vector", dist)
    start = imagination_starts(agent, batch)
    scan = RandomCalls()
    with scan:
        agent.wm.observe(batch)
    assert scan.calls == ["rand"]
    rollout = RandomCalls()
    with rollout:
        agent.task.rollout(agent.wm, start, agent.task_reward)
    assert sorted(rollout.calls) == sorted(["randn" if dist == "normal" else "rand", "rand"])


def test_agent_stacks_the_imagination_heads_on_cuda_only():
    agent, _, _ = make("vector", "normal", "--behavior", "plan2explore")
    assert agent.task.stack_steps is False and agent.expl.ac.stack_steps is False
