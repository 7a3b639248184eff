"""The loss terms against the paper's formulas, computed independently here from the same tensors:
the actor and critic losses (values and the gradients each parameter group receives), the world
model's continuation and KL terms and their weights, and the pieces around them (the slow critic,
the imagined reward, the imagination's start states, gradient clipping). Each test names the
formula it checks; a sign, an index shifted by one step, a missing stop-gradient or a swapped
weight changes a value or a gradient here."""
import gymnasium as gym
import numpy as np
import pytest
import torch

import config
import exploration
from distributions import TwoHotSymlog
from models import Optimizer, frozen
from networks import MLP, ImageDecoder, ImageEncoder, features
from tools import set_seed, symlog

VECTOR = gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)
FLAGS = {k: gym.spaces.Box(0, 1, (), bool) for k in ("is_first", "is_last", "is_terminal")}
ACT_SPACES = {"normal": gym.spaces.Box(-1, 1, (2,), np.float32), "onehot": gym.spaces.Discrete(3)}


def make(dist="normal", *overrides):
    cfg = config.load_config(["--configs", "debug", "--encoder.mlp_keys", ".*", "--decoder.mlp_keys", ".*",
                              "--actor_dist", dist, *overrides])
    set_seed(0)
    obs_space = {"vector": VECTOR, **FLAGS}
    agent = exploration.make_agent(obs_space, ACT_SPACES[dist], cfg, "cpu")
    batch = exploration.synthetic_batch(obs_space, ACT_SPACES[dist], cfg.batch_size, cfg.batch_length)
    return agent, batch, cfg


def randomise_(*modules, std=0.5):
    """Random weights for heads whose output layer starts at zero (reward, critic), so that rewards,
    values and their gradients are not all zero."""
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                param.normal_(0.0, std)


def start_states(agent, batch):
    states = agent.wm.observe(batch)
    return {"stoch": states["stoch"].detach().flatten(0, 1), "deter": states["deter"].detach().flatten(0, 1),
            "cont": 1.0 - batch["is_terminal"].flatten().float()}


def recursive_returns(reward, value, cont, discount, lam):
    """R_t = r_t + discount c_{t+1} ((1 - lam) v_{t+1} + lam R_{t+1}), R_H = v_H; (H, N)."""
    returns = [value[-1]]
    for t in reversed(range(reward.shape[0])):
        returns.append(reward[t] + discount * cont[t + 1] * ((1 - lam) * value[t + 1] + lam * returns[-1]))
    return torch.stack(returns[1:][::-1])


def paper_losses(traj, cfg, low_before, high_before):
    """The actor and critic losses of the paper, step by step, from one imagined trajectory."""
    discount, lam = cfg.discount, cfg.discount_lambda
    reward, value, cont = traj["reward"], traj["value"], traj["cont"]
    weight = [cont[0]]  # the start's continuation, then the discounted product of predictions
    for t in range(1, cont.shape[0]):
        weight.append(weight[-1] * discount * cont[t])
    weight = torch.stack(weight)  # (H+1, N)
    returns = recursive_returns(reward, value, cont, discount, lam)  # (H, N)
    low, high = np.percentile(returns.detach().numpy(), [cfg.return_norm.low, cfg.return_norm.high])
    decay = cfg.return_norm.decay
    low, high = decay * low_before + (1 - decay) * low, decay * high_before + (1 - decay) * high
    scale = max(cfg.return_norm.max, high - low)
    advantage = (returns - value[:-1]) / scale  # (H, N): R_t - v_t, the value of the state acted in
    policy = traj["policy"]
    if cfg.actor_dist == "normal":  # dynamics backprop: the advantage's own gradient
        objective = advantage
    else:  # REINFORCE: log pi(a_t | s_t) times the advantage held fixed
        objective = policy.log_prob(traj["action"].detach()) * advantage.detach()
    actor = -((objective + cfg.actor.entropy * policy.entropy()) * weight[:-1]).mean()
    critic_dist = traj["critic_log_probs"]  # log-probabilities over the bins, (H, N, bins)
    dist = TwoHotSymlog.from_log_probs(critic_dist)
    log_lik = dist.log_prob(returns.detach()) + cfg.slow_reg_scale * dist.log_prob(traj["slow"])
    critic = -(log_lik * weight[:-1]).mean()
    return actor, critic, scale


@pytest.mark.parametrize("dist", ["normal", "onehot"])
def test_actor_and_critic_losses_are_the_papers_with_their_gradients(monkeypatch, dist):
    agent, batch, cfg = make(dist, "--actor.entropy", "0.1", "--return_norm.decay", "0.5")
    ac = agent.task
    randomise_(ac.critic, agent.wm.reward_head)
    ac.slow_critic.load_state_dict(ac.critic.state_dict())
    randomise_(ac.slow_critic, std=0.3)  # slow critic != critic: its regulariser has a value of its own
    start = start_states(agent, batch)
    start["cont"][::7] = 0.0  # some terminal starts
    ac.return_norm.low.fill_(-0.5)
    ac.return_norm.high.fill_(0.7)
    with frozen(agent.wm):
        traj = ac.rollout(agent.wm, start, agent.task_reward)
        monkeypatch.setattr(ac, "rollout", lambda *args: traj)
        actor_loss, critic_loss, metrics = ac.losses(agent.wm, start, agent.task_reward)
    actor_ref, critic_ref, scale = paper_losses(traj, cfg, -0.5, 0.7)
    assert scale > 1.0  # the normaliser divides: its percentiles are part of what is checked
    torch.testing.assert_close(metrics["return/scale"], torch.tensor(scale, dtype=torch.float32))
    torch.testing.assert_close(actor_loss, actor_ref)
    torch.testing.assert_close(critic_loss, critic_ref)
    actor_params, critic_params = list(ac.actor.parameters()), list(ac.critic.parameters())
    for loss, ref, params in ((actor_loss, actor_ref, actor_params), (critic_loss, critic_ref, critic_params)):
        got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(ref, params, retain_graph=True, allow_unused=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dist", ["normal", "onehot"])
def test_the_actor_sees_stop_gradient_states(monkeypatch, dist):
    """The actor's inputs carry no graph: with dynamics backprop, gradients reach the actor only
    through the actions it took, never back through its own input features."""
    agent, batch, _ = make(dist)
    ac = agent.task
    inputs, act = [], ac._act_eager
    monkeypatch.setattr(ac, "_act_eager", lambda feat, *rest: (inputs.append(feat), act(feat, *rest))[1])
    with frozen(agent.wm):
        ac.rollout(agent.wm, start_states(agent, batch), agent.task_reward)
    assert len(inputs) == agent.config.imag_horizon
    assert not any(feat.requires_grad for feat in inputs)


def test_slow_critic_starts_as_the_critic_and_moves_two_percent_per_update():
    agent, _, cfg = make("normal")
    ac = agent.task
    for slow, critic in zip(ac.slow_critic.parameters(), ac.critic.parameters()):
        assert torch.equal(slow, critic)
        assert not slow.requires_grad
    randomise_(ac.critic)
    before = [p.clone() for p in ac.slow_critic.parameters()]
    ac.update_slow_critic()
    assert cfg.slow_target_fraction == 0.02
    for slow, old, critic in zip(ac.slow_critic.parameters(), before, ac.critic.parameters()):
        torch.testing.assert_close(slow, old + 0.02 * (critic - old))


@pytest.mark.parametrize("period, moved_at", [(1, [1, 2, 3, 4, 5, 6]), (3, [3, 6])])
def test_slow_critic_moves_every_slow_target_update_updates(period, moved_at):
    agent, _, _ = make("normal", "--slow_target_update", str(period))
    randomise_(agent.task.critic)
    moved = []
    for update in range(1, 7):
        agent.updates = update
        before = next(agent.task.slow_critic.parameters()).clone()
        agent.update_slow_critics()
        if not torch.equal(before, next(agent.task.slow_critic.parameters())):
            moved.append(update)
    assert moved == moved_at


def test_imagined_reward_is_the_reward_head_on_the_state_arrived_in():
    agent, _, _ = make("normal")
    randomise_(agent.wm.reward_head)
    feat, next_feat = torch.randn(2, 6, agent.wm.rssm.feat_size).unbind(0)
    reward = agent.task_reward(feat, torch.zeros(6, 2), next_feat)["reward"]
    torch.testing.assert_close(reward, agent.wm.reward(next_feat))
    assert not torch.allclose(reward, agent.wm.reward(feat))


def test_imagination_starts_from_every_posterior_state_with_its_continuation(monkeypatch):
    agent, batch, cfg = make("normal")
    batch["is_terminal"][:] = False
    batch["is_terminal"][0, 5] = batch["is_terminal"][1, 2] = True
    seen, losses = {}, agent.task.losses
    monkeypatch.setattr(agent.task, "losses", lambda wm, start, fn: (seen.update(start), losses(wm, start, fn))[1])
    states = agent.wm.observe(batch)
    agent.train_behavior(states, batch)
    B, T = cfg.batch_size, cfg.batch_length
    assert seen["stoch"].shape[0] == seen["deter"].shape[0] == B * T
    torch.testing.assert_close(seen["deter"], states["deter"].detach().reshape(B * T, -1))
    expected = np.ones((B, T), np.float32)
    expected[0, 5] = expected[1, 2] = 0.0
    np.testing.assert_array_equal(seen["cont"].numpy(), expected.reshape(-1))


def world_model_terms(agent, batch):
    wm = agent.wm
    states = wm.observe(batch)
    feat = features(states["stoch"], states["deter"])
    targets = {k: batch[k] for k in ("vector", "reward", "is_terminal")}
    return states, feat, wm._heads_loss_eager(feat, states["post"], states["prior"], targets)


def test_continuation_term_is_the_log_likelihood_of_one_minus_is_terminal():
    agent, batch, _ = make("normal")
    batch["is_terminal"][:, -3:] = True
    randomise_(agent.wm.cont_head)
    _, feat, terms = world_model_terms(agent, batch)
    prob = torch.sigmoid(agent.wm.cont_head(feat).squeeze(-1)).detach().double()  # P(continue)
    cont = 1.0 - batch["is_terminal"].double()
    expected = -(cont * prob.log() + (1 - cont) * (1 - prob).log())
    torch.testing.assert_close(terms["cont"].detach().double(), expected, rtol=1e-5, atol=1e-6)


def test_reward_term_is_the_two_hot_log_likelihood_of_the_scaled_reward():
    """-ln p(reward_scale * r | feat): the reward head learns the scaled reward (--reward_scale 2)."""
    agent, batch, cfg = make("normal", "--reward_scale", "2")
    assert cfg.reward_scale == 2.0
    batch["reward"] = torch.linspace(-3.0, 5.0, batch["reward"].numel()).reshape(batch["reward"].shape)
    randomise_(agent.wm.reward_head)
    _, feat, terms = world_model_terms(agent, batch)
    head = TwoHotSymlog(agent.wm.reward_head(feat))
    torch.testing.assert_close(terms["reward"], -head.log_prob(2.0 * batch["reward"]))
    assert not torch.allclose(terms["reward"], -head.log_prob(batch["reward"]))


def test_world_model_loss_weighs_its_terms_as_the_paper_does():
    """L = mean over (B, T) of L_pred (vector, reward, continuation: weight 1) + 0.5 L_dyn + 0.1 L_rep,
    with the KL terms apart from free bits (--kl_free 0), so that every term counts."""
    agent, batch, cfg = make("normal", "--kl_free", "0")
    randomise_(agent.wm.reward_head)
    set_seed(1)  # the same posterior samples in both passes
    loss, _, metrics = agent.wm.loss(batch)
    set_seed(1)
    _, _, terms = world_model_terms(agent, batch)
    weights = {"vector": 1.0, "reward": 1.0, "cont": 1.0, "kl_dyn": 0.5, "kl_rep": 0.1}
    expected = sum(weight * terms[name].mean() for name, weight in weights.items())
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["loss/model"], expected.detach())
    assert len({round(float(terms[name].detach().mean()), 4) for name in weights}) >= 4  # terms that differ


def test_every_prediction_term_trains_the_representation():
    """The world model learns end to end: the reconstruction, reward and continuation terms each send
    gradients into the encoder, the posterior and the recurrent model, not only into their heads."""
    agent, batch, _ = make("normal")
    randomise_(agent.wm.reward_head)  # zero-initialised output: no gradient into the features yet
    _, _, terms = world_model_terms(agent, batch)
    rssm = agent.wm.rssm
    groups = {"encoder": list(agent.wm.encoder.parameters()), "posterior": list(rssm.obs_out.parameters()),
              "recurrent model": list(rssm.gru.parameters())}
    for name in ("vector", "reward", "cont"):
        for group, params in groups.items():
            grads = torch.autograd.grad(terms[name].mean(), params, retain_graph=True, allow_unused=True)
            assert any(g is not None and g.abs().max() > 0 for g in grads), (name, group)


def test_reward_head_and_critic_start_at_zero_and_the_continue_head_does_not():
    """The output layers of the reward head and the critic start at zero weights (predicting 0 for
    every state: no made-up rewards or values early in training); the continue head's is random."""
    agent, batch, _ = make("normal")
    _, feat, _ = world_model_terms(agent, batch)
    for head in (agent.wm.reward_head, agent.task.critic):
        logits = head(feat)  # (B, T, bins): all zero, a uniform two-hot distribution
        assert torch.equal(logits, torch.zeros_like(logits))
        assert TwoHotSymlog(logits).mean.abs().max() < 1e-6  # symmetric bins: a mean of 0
    cont_logits = agent.wm.cont_head(feat)
    assert cont_logits.std() > 1e-3, cont_logits.std()


def test_frozen_restores_each_parameters_own_flag():
    module = torch.nn.Linear(2, 2)
    module.bias.requires_grad_(False)  # e.g. a slow copy inside the frozen module
    with frozen(module):
        assert not module.weight.requires_grad and not module.bias.requires_grad
    assert module.weight.requires_grad and not module.bias.requires_grad


def test_kl_terms_are_kl_of_posterior_from_prior_clipped_at_free_bits():
    agent, batch, cfg = make("normal")
    states, _, terms = world_model_terms(agent, batch)
    post, prior = states["post"].detach().double(), states["prior"].detach().double()  # log-probs (B, T, S, C)
    kl = (post.exp() * (post - prior)).sum((-2, -1))  # KL(post || prior), summed over the latents
    reverse = (prior.exp() * (prior - post)).sum((-2, -1))
    assert not torch.allclose(kl, reverse)
    for name in ("kl_dyn", "kl_rep"):
        torch.testing.assert_close(terms[name].detach().double(), kl.clamp(min=cfg.kl_free), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["kl"].detach().double(), kl, rtol=1e-5, atol=1e-6)


def test_prior_is_trained_by_half_the_dynamics_kl_and_nothing_else():
    """loss = mean(... + 0.5 KL(sg(post) || prior) + 0.1 KL(post || sg(prior))): the prior's own
    layers (img_out, img_logits) get exactly 0.5 x the gradient of the mean dynamics KL."""
    agent, batch, cfg = make("normal", "--kl_free", "0")
    assert (cfg.kl_dyn_scale, cfg.kl_rep_scale) == (0.5, 0.1)
    rssm = agent.wm.rssm
    prior_params = list(rssm.img_out.parameters()) + list(rssm.img_logits.parameters())
    set_seed(1)  # the same posterior samples in both passes
    loss, _, _ = agent.wm.loss(batch)
    got = torch.autograd.grad(loss, prior_params)
    set_seed(1)
    states = agent.wm.observe(batch)
    post, prior = states["post"].detach(), states["prior"]
    dyn = (post.exp() * (post - prior)).sum((-2, -1)).mean()
    want = torch.autograd.grad(0.5 * dyn, prior_params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-8)
        assert w.abs().max() > 0


def test_optimizer_clips_the_gradient_norm_before_adam_and_reports_it_unclipped():
    param = torch.nn.Parameter(torch.zeros(4))
    opt = Optimizer([param], lr=1e-3, eps=1e-8, clip=2.0, device=torch.device("cpu"))
    seen = []
    opt.adam.register_step_pre_hook(lambda *_: seen.append(param.grad.norm().item()))
    norm = opt.step((1000.0 * param * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum())
    assert norm.item() == pytest.approx(1000.0 * np.sqrt(30.0))
    assert seen == [pytest.approx(2.0)]
    assert param.grad is None


def test_symlog_inputs_squash_vectors_before_the_first_layer():
    set_seed(0)
    squashed = MLP(3, 8, 2, symlog_inputs=True)
    plain = MLP(3, 8, 2, symlog_inputs=False)
    plain.load_state_dict(squashed.state_dict())
    x = torch.tensor([[100.0, -50.0, 0.5]])
    torch.testing.assert_close(squashed(x), plain(symlog(x)))
    assert not torch.allclose(squashed(x), plain(x))


def test_image_encoder_sees_pixels_over_255_minus_half_and_decoder_adds_half():
    encoder = ImageEncoder(3, 2, 4, 4, 4, 1e-3)
    seen = []
    encoder.net[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    image = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    encoder(image)
    expected = image.permute(0, 3, 1, 2).float() / 255.0 - 0.5
    torch.testing.assert_close(seen[0], expected)
    decoder = ImageDecoder(10, 3, 2, 4, 4, 4, 1e-3)
    with torch.no_grad():
        decoder.net[-1].weight.zero_()
        decoder.net[-1].bias.zero_()
    out = decoder(torch.randn(5, 10))
    assert out.shape == (5, 16, 16, 3)
    torch.testing.assert_close(out, torch.full_like(out, 0.5))
