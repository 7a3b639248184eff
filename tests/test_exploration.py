"""The agent object the loop drives: behaviours, the policy state, the gradient hook, errors."""
import contextlib

import gymnasium as gym
import numpy as np
import pytest
import torch

import config
import exploration
from tools import set_seed

VECTOR = gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)
OBS_SPACE = {"vector": VECTOR, "is_first": gym.spaces.Box(0, 1, (), bool)}
BOX = gym.spaces.Box(-1, 1, (2,), np.float32)


def make(behavior="greedy", act_space=BOX, dist="normal", *overrides):
    cfg = config.load_config(["--configs", "debug", "--encoder.mlp_keys", ".*", "--decoder.mlp_keys", ".*",
                              "--behavior", behavior, "--actor_dist", dist, *overrides])
    set_seed(0)
    agent = exploration.make_agent(OBS_SPACE, act_space, cfg, "cpu")
    return agent, exploration.synthetic_batch(OBS_SPACE, act_space, cfg.batch_size, cfg.batch_length)


def obs(n, first):
    return {"vector": np.linspace(-1, 1, n * 5, dtype=np.float32).reshape(n, 5), "is_first": np.array(first)}


def test_plan2explore_trains_and_acts():
    agent, batch = make("plan2explore")
    ensemble_before = [p.clone() for p in agent.expl.ensemble.parameters()]
    actor_before = [p.clone() for p in agent.expl.ac.actor.parameters()]
    for _ in range(3):
        metrics = agent.train_step(batch)
    for key in ("loss/expl_actor", "loss/expl_critic", "grad/expl_actor_norm", "return/expl_scale",
                "imagine/expl_reward", "loss/actor", "loss/model"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert metrics["imagine/expl_reward"].item() > 0  # ensemble disagreement is positive
    with torch.no_grad():
        states = agent.wm.observe(batch)  # fixed targets: the ensemble learns to predict them
    losses = []
    for _ in range(30):
        loss = agent.expl.ensemble_loss(states, batch)
        losses.append(loss.item())
        agent.optimizers["expl_ensemble"].step(loss)
    assert losses[-1] < 0.95 * losses[0], (losses[0], losses[-1])  # it falls by about 9%
    assert all(not torch.equal(a, b) for a, b in zip(ensemble_before, agent.expl.ensemble.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(actor_before, agent.expl.ac.actor.parameters()))
    actions, state = agent.policy(obs(3, [True] * 3), None, "train")
    assert actions.shape == (3, 2) and np.abs(actions).max() <= 1.0
    # train mode acts with the exploration actor, eval mode with the task actor
    torch.manual_seed(0)
    explore, _ = agent.policy(obs(3, [True] * 3), None, "train")
    torch.manual_seed(0)
    feat = None
    with torch.no_grad():
        stoch, deter, prev = agent.initial_state(3)
        embed = agent.wm.encoder({"vector": torch.as_tensor(obs(3, [True] * 3)["vector"])})
        stoch, deter, _ = agent.wm.rssm.obs_step(stoch, deter, prev, embed, torch.ones(3, dtype=torch.bool))
        feat = torch.cat([stoch, deter], -1)
        expected = agent.expl.ac.actor(feat).sample().clamp(-1, 1).numpy()
    np.testing.assert_allclose(explore, expected, rtol=1e-6, atol=1e-6)


def test_random_behavior_acts_uniformly_and_evaluates_greedily():
    agent, _ = make("random")
    actions, _ = agent.policy(obs(500, [True] * 500), None, "train")
    assert actions.shape == (500, 2) and actions.min() >= -1 and actions.max() <= 1
    assert abs(actions.mean()) < 0.1 and actions.std() > 0.5  # uniform in [-1, 1]: std 0.577
    evals = []
    for _ in range(2):  # the latent is still a posterior sample; the action is the actor's mode
        torch.manual_seed(3)
        evals.append(agent.policy(obs(2, [True, True]), None, "eval")[0])
    np.testing.assert_array_equal(*evals)
    torch.manual_seed(3)
    _, (stoch, deter, action) = agent.policy(obs(2, [True, True]), None, "eval")
    with torch.no_grad():
        np.testing.assert_array_equal(evals[0], agent.task.actor(torch.cat([stoch, deter], -1)).mode().numpy())


def test_eval_sample_evaluates_with_sampled_actions():
    """eval_sample True (the atari100k block, as the paper's code evaluates Atari100k): eval actions
    are draws from the task actor's policy, not its mode; the default stays the mode."""
    for sample in (False, True):
        agent, _ = make("greedy", gym.spaces.Discrete(4), "onehot", "--eval_sample", str(sample))
        torch.manual_seed(5)
        actions, (stoch, deter, _) = agent.policy(obs(400, [True] * 400), None, "eval")
        with torch.no_grad():
            mode = agent.task.actor(torch.cat([stoch, deter], -1)).mode().numpy()
        assert actions.shape == (400, 4) and (actions.sum(-1) == 1).all()  # one-hot either way
        differ = (actions != mode).any(-1).mean()
        # a fresh actor is spread over the 4 actions: a draw misses the mode about half the time
        assert (differ == 0) if not sample else (0.3 < differ < 0.9), (sample, differ)


def test_random_actions_for_discrete_spaces_are_one_hot():
    agent, _ = make("greedy", gym.spaces.Discrete(4), "onehot")
    actions = agent.random_actions(1000)
    assert actions.shape == (1000, 4) and actions.dtype == np.float32
    np.testing.assert_array_equal(actions.sum(-1), np.ones(1000))
    assert (actions.mean(0) > 0.2).all()


def test_policy_state_resets_per_env_where_is_first():
    agent, _ = make()
    _, state = agent.policy(obs(2, [True, True]), None, "train")
    _, state = agent.policy(obs(2, [False, False]), state, "train")
    torch.manual_seed(1)
    _, reset_state = agent.policy(obs(2, [True, False]), state, "train")
    torch.manual_seed(1)
    _, fresh_state = agent.policy(obs(2, [True, True]), None, "train")
    # env 0 restarted: its deterministic state equals a fresh start; env 1 continued
    torch.testing.assert_close(reset_state[1][0], fresh_state[1][0])
    assert not torch.allclose(reset_state[1][1], fresh_state[1][1])


def test_grad_sync_hook_sees_every_group_before_the_step():
    agent, batch = make()
    seen = []

    def zero_grads(params):
        seen.append(len(params))
        for p in params:
            p.grad.zero_()

    agent.set_grad_sync(zero_grads)
    before = {k: v.clone() for k, v in agent.wm.state_dict().items()}
    agent.train_step(batch)
    assert seen == [len(list(agent.wm.parameters())), len(list(agent.task.actor.parameters())),
                    len(list(agent.task.critic.parameters()))]
    # Adam's first step with all-zero gradients leaves the parameters unchanged: the hook ran before it
    assert all(torch.equal(before[k], v) for k, v in agent.wm.state_dict().items())
    agent.set_grad_sync(None)
    agent.train_step(batch)
    assert len(seen) == 3


class FakeGraph:
    """A CUDA graph stand-in that logs its capture and replays (nothing is recorded: between
    capture_begin and capture_end the update simply runs on the CPU)."""

    def __init__(self, cuda: "FakeCuda", index: int):
        self.cuda, self.log, self.index = cuda, cuda.log, index

    def capture_begin(self, pool=None, capture_error_mode=None):
        assert pool == "pool" and capture_error_mode == "thread_local"  # the segments share one pool
        assert self.cuda.current is not self.cuda.default  # CUDA captures on a side stream only
        self.log.append(f"begin {self.index}")

    def replay(self):
        assert self.cuda.current is self.cuda.default  # replays (and the collectives) on the caller's
        self.log.append(f"replay {self.index}")

    def capture_end(self):
        self.log.append(f"end {self.index}")


class FakeStream:
    def wait_stream(self, other):
        pass


class FakeCuda:
    """The torch.cuda calls CudaGraphUpdate makes, on a machine without a GPU (tests/test_cuda.py
    runs the real ones)."""

    def __init__(self):
        self.log: list[str] = []
        self.graphs: list[FakeGraph] = []
        self.default = self.current = FakeStream()

    def CUDAGraph(self):  # noqa: N802 - torch.cuda's name
        self.graphs.append(FakeGraph(self, len(self.graphs)))
        return self.graphs[-1]

    def graph(self, graph, stream=None, capture_error_mode=None):
        @contextlib.contextmanager
        def capture():
            with self.stream(stream):
                graph.capture_begin("pool", capture_error_mode)
                yield
                graph.capture_end()
        return capture()

    def Stream(self):  # noqa: N802
        return FakeStream()

    def current_stream(self):
        return self.current

    @contextlib.contextmanager
    def stream(self, stream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def synchronize(self):
        pass

    def graph_pool_handle(self):
        return "pool"


def segmented_update(cuda, fail_after_first=False):
    """A CudaGraphUpdate (segmented, one warm-up) of an update that hands two collectives to
    `between`; the collectives log their names."""
    def update(batch):
        x = batch["x"] * 2
        graph_update.between(lambda: cuda.log.append("all-reduce"))
        if fail_after_first:
            raise RuntimeError("operation not permitted when stream is capturing")
        graph_update.between(lambda: cuda.log.append("all-gather"))
        return {"y": x + 1}

    graph_update = exploration.CudaGraphUpdate(update, warmup=1, cuda=cuda)
    graph_update.segmented = True
    return graph_update


def test_a_segmented_cuda_graph_update_runs_its_collectives_between_its_graphs():
    """Data-parallel CUDA-graph updates: warm-ups run the collectives in place; the capture ends a
    graph at each collective (none runs while recording) and every replay runs graph, collective,
    graph, collective, graph, with the batch copied into the captured inputs; every rank is asked
    whether its capture succeeded."""
    cuda = FakeCuda()
    graph_update = segmented_update(cuda)
    asked = []
    graph_update.agree = lambda ok: asked.append(ok) or ok
    graph_update({"x": torch.ones(2)})  # the warm-up
    assert cuda.log == ["all-reduce", "all-gather"]
    cuda.log.clear()
    graph_update({"x": torch.ones(2)})  # captures, then replays
    assert cuda.log == ["begin 0", "end 0", "begin 1", "end 1", "begin 2", "end 2",
                        "replay 0", "all-reduce", "replay 1", "all-gather", "replay 2"]
    assert asked == [True] and graph_update.graph is cuda.graphs[0] and len(graph_update.segments) == 3
    cuda.log.clear()
    graph_update({"x": torch.full((2,), 5.0)})
    assert cuda.log == ["replay 0", "all-reduce", "replay 1", "all-gather", "replay 2"]
    assert torch.equal(graph_update.inputs["x"], torch.full((2,), 5.0))
    graph_update.reset()  # e.g. after a checkpoint load: warm-up and capture again
    assert graph_update.graph is None


def test_a_single_process_cuda_graph_update_is_one_graph():
    """Without collectives (one process) the capture records the whole update as one graph, which
    every later call replays, the batch copied into its inputs; outputs are copies."""
    cuda = FakeCuda()
    graph_update = exploration.CudaGraphUpdate(lambda batch: {"y": batch["x"] + 1}, warmup=2, cuda=cuda)
    for _ in range(2):  # warm-ups
        assert graph_update({"x": torch.ones(2)})["y"].tolist() == [2.0, 2.0]
    assert cuda.log == [] and graph_update.graph is None
    out = graph_update({"x": torch.ones(2)})
    assert cuda.log == ["begin 0", "end 0", "replay 0"] and len(graph_update.segments) == 1
    assert out["y"] is not graph_update.outputs["y"]
    graph_update({"x": torch.zeros(2)})
    assert cuda.log[-1] == "replay 0" and torch.equal(graph_update.inputs["x"], torch.zeros(2))


@pytest.mark.parametrize("where", ["here", "another rank"])
def test_a_failed_capture_on_any_rank_makes_every_rank_train_eagerly(where):
    """A capture that fails (here: the open graph's capture is ended, the error named, and one
    trivial graph is recorded to leave capture state) or succeeds here but failed on another rank
    (agree says so) gives one warning, and every later update runs eagerly with its collectives in
    place, on every rank alike."""
    cuda = FakeCuda()
    graph_update = segmented_update(cuda, fail_after_first=where == "here")
    asked = []
    graph_update.agree = lambda ok: asked.append(ok) or False  # the other rank's answer: failed
    if where == "here":
        graph_update.warmup = 0
    else:
        graph_update({"x": torch.ones(2)})  # the warm-up
    cuda.log.clear()
    with pytest.warns(UserWarning, match="capturing the update failed") as caught:
        result = None
        try:
            result = graph_update({"x": torch.ones(2)})
        except RuntimeError:
            assert where == "here"  # its eager retry meets the same error
    assert asked == [where != "here"]  # each rank tells the others how its own capture went
    message = str(caught[0].message)
    assert ("operation not permitted" in message) if where == "here" else ("another rank" in message)
    if where == "here":  # the interrupted capture ended, then one trivial graph resets capture state
        assert cuda.log[:6] == ["begin 0", "end 0", "begin 1", "end 1", "begin 2", "end 2"]
    else:  # nothing failed here: no trivial graph; the eager retry
        assert result is not None and cuda.log[-2:] == ["all-reduce", "all-gather"]
        assert len(cuda.graphs) == 3
    assert graph_update.failed and graph_update.graph is None
    cuda.log.clear()
    if where == "another rank":
        graph_update({"x": torch.ones(2)})
        assert cuda.log == ["all-reduce", "all-gather"]  # eager: no capture, no replay


def test_graph_safe_hooks_run_their_collectives_through_the_graph_update():
    """set_grad_sync / set_return_gather with graph_safe=True hand the hooks CudaGraphUpdate.between
    as `run` (a CUDA-graph update then runs their collectives between its graphs, in the update's
    order: the model's, the actor's and critic's gradients, the returns' gather before them); a hook
    that is not graph-safe makes updates eager, as before."""
    agent, batch = make()
    cuda = FakeCuda()
    agent.graph_update = exploration.CudaGraphUpdate(agent._update, warmup=1, cuda=cuda)
    names = {id(p): name for name, module in (("model", agent.wm), ("actor", agent.task.actor),
                                              ("critic", agent.task.critic))
             for p in module.parameters()}

    def grads(params, run):
        run(lambda: cuda.log.append(names[id(params[0])]))

    def gather(values, run):
        run(lambda: cuda.log.append("returns"))
        return values

    agent.set_grad_sync(grads, graph_safe=True)
    agent.set_return_gather(gather, graph_safe=True)
    agent.set_capture_agreement(lambda ok: ok)
    assert agent.graph_update.segmented and agent.graph_update.agree is not None
    agent.train_step(batch)  # the warm-up: in place
    assert cuda.log == ["model", "returns", "actor", "critic"]
    cuda.log.clear()
    agent.train_step(batch)  # capture and replay
    assert [e for e in cuda.log if not e.startswith(("begin", "end"))] == [
        "replay 0", "model", "replay 1", "returns", "replay 2", "actor", "replay 3", "critic", "replay 4"]
    agent.set_return_gather(lambda values: values)  # not graph-safe
    assert agent.graph_update is None


def test_graph_safe_hooks_run_their_collectives_in_place_in_eager_updates():
    """Without CUDA graphs (a CPU, float16, --cuda_graphs False) a graph-safe hook is still handed
    a `run`, which runs each collective where the update reaches it."""
    agent, batch = make()
    assert agent.graph_update is None
    ran = []

    def grads(params, run):
        run(lambda: ran.append(len(params)))

    agent.set_grad_sync(grads, graph_safe=True)
    agent.set_return_gather(lambda values, run: run(lambda: ran.append("returns")) or values, graph_safe=True)
    agent.train_step(batch)
    assert ran == [len(list(agent.wm.parameters())), "returns", len(list(agent.task.actor.parameters())),
                   len(list(agent.task.critic.parameters()))]


def test_make_agent_errors_name_the_fix():
    cfg = config.load_config(["--configs", "debug", "--actor_dist", "normal"])
    with pytest.raises(ValueError, match=r"Discrete\(2\) but actor_dist is 'normal'.*use --actor_dist onehot"):
        exploration.make_agent(OBS_SPACE, gym.spaces.Discrete(2), cfg, "cpu")
    cfg = config.load_config(["--configs", "debug", "--encoder.mlp_keys", "$^", "--encoder.cnn_keys", "image"])
    with pytest.raises(ValueError, match=r"The encoder selects no observation key.*'vector': \(\(5,\), 'float32'\)"):
        exploration.make_agent(OBS_SPACE, BOX, cfg, "cpu")
    agent, _ = make()
    with pytest.raises(ValueError, match="policy mode must be 'train' or 'eval', got 'explore'"):
        agent.policy(obs(1, [True]), None, "explore")


def test_synthetic_batch_follows_the_data_conventions():
    space = {"image": gym.spaces.Box(0, 255, (8, 8, 3), np.uint8), **OBS_SPACE}
    batch = exploration.synthetic_batch(space, gym.spaces.Discrete(3), 2, 6)
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (2, 6, 8, 8, 3)
    assert batch["action"].shape == (2, 6, 3) and batch["reward"].shape == (2, 6)
    assert batch["is_first"][:, 0].all() and (batch["action"][batch["is_first"]] == 0).all()
    assert not (batch["is_terminal"] & ~batch["is_last"]).any()


def test_plan2explore_evaluates_with_the_task_actor_and_explores_with_its_own():
    agent, _ = make("plan2explore")
    first = obs(3, [True] * 3)

    def act(mode):  # the same posterior sample (obs_step samples the latent) and action noise each time
        torch.manual_seed(1)
        return agent.policy(first, None, mode)[0]

    evaluated, explored = act("eval"), act("train")
    with torch.no_grad():  # an exploration actor that always asks for -1: train mode follows it, eval does not
        last = [m for m in agent.expl.ac.actor.modules() if isinstance(m, torch.nn.Linear)][-1]
        for p in agent.expl.ac.actor.parameters():
            p.zero_()
        last.bias.fill_(-20.0)
    np.testing.assert_array_equal(act("eval"), evaluated)
    pushed = act("train")
    assert not np.allclose(pushed, explored) and pushed.mean() < -0.9, pushed
    with torch.no_grad():  # and a changed task actor changes the evaluation
        for p in agent.task.actor.parameters():
            p.add_(0.5)
    assert not np.allclose(act("eval"), evaluated)


def test_plan2explore_ensemble_loss_skips_pairs_across_an_episode_start():
    agent, batch = make("plan2explore")
    expl = agent.expl
    with torch.no_grad():
        states = agent.wm.observe(batch)
    is_first = batch["is_first"].clone()
    is_first[:, 1:] = False
    is_first[0, 5] = True  # one episode start inside the sequences: the pair (4, 5) crosses it
    batch = {**batch, "is_first": is_first}
    with torch.no_grad():
        loss = expl.ensemble_loss(states, batch)
        feat = torch.cat([states["stoch"], states["deter"]], -1)[:, :-1]  # (B, T-1, F)
        inputs = torch.cat([feat, batch["action"][:, 1:]], -1)
        preds = expl.ensemble(inputs.reshape(-1, inputs.shape[-1]))  # (M, B*(T-1), S*C)
        error = (preds - states["stoch"][:, 1:].reshape(1, -1, states["stoch"].shape[-1])).square().sum(-1)
        keep = torch.ones(error.shape[1], dtype=torch.bool)
        keep[4] = False  # batch row 0, pair index 4 (t=4 -> t=5)
        expected = error[:, keep].mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert not torch.isclose(error.mean(), expected, rtol=1e-4)  # the skipped pair weighs


def test_plan2explore_rewards_are_the_scaled_ensemble_std_and_reward_head():
    agent, batch = make("plan2explore", BOX, "normal", "--plan2explore.intr_scale", "2.0",
                        "--plan2explore.extr_scale", "0.5", "--plan2explore.lr", "3e-4")
    expl, wm = agent.expl, agent.wm
    with torch.no_grad():
        torch.manual_seed(0)
        for p in wm.reward_head.parameters():  # a reward head that predicts something (it starts at 0)
            p.add_(0.3 * torch.randn_like(p))
        states = wm.observe(batch)
        feat = torch.cat([states["stoch"], states["deter"]], -1)  # (B, T, F)
        feat, next_feat, action = feat[:, :-1], feat[:, 1:], batch["action"][:, 1:]
        terms = expl.reward_terms(wm)(feat, action, next_feat)
        preds = expl.ensemble(torch.cat([feat, action], -1).reshape(-1, feat.shape[-1] + 2))  # (M, n, S*C)
        members = preds.shape[0]
        spread = ((preds - preds.mean(0)).square().sum(0) / (members - 1)).sqrt()  # std over members
        disagreement = spread.mean(-1).reshape(feat.shape[:-1])  # mean over latent dims: (B, T-1)
        torch.testing.assert_close(terms["intrinsic"], 2.0 * disagreement, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(terms["extrinsic"], 0.5 * wm.reward(next_feat), rtol=1e-5, atol=1e-7)
        assert not torch.allclose(wm.reward(feat), wm.reward(next_feat))  # the state arrived in counts
    assert agent.optimizers["expl_ensemble"].adam.param_groups[0]["lr"] == 3e-4  # plan2explore.lr, not model_lr
    default, _ = make("plan2explore")
    assert set(default.expl.reward_terms(default.wm)(feat, action, next_feat)) == {"intrinsic"}  # extr_scale 0


def test_a_loaded_agent_continues_the_random_action_draws():
    agent, _ = make("random")
    agent.random_actions(5)
    state = agent.state_dict()
    expected = agent.random_actions(3)
    other, _ = make("random", BOX, "normal", "--seed", "7")
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.random_actions(3), expected)


def test_the_open_loop_report_observes_five_steps_then_imagines_with_the_batchs_actions():
    space = {"image": gym.spaces.Box(0, 255, (16, 16, 3), np.uint8), "is_first": OBS_SPACE["is_first"]}
    cfg = config.load_config(["--configs", "debug", "--encoder.mlp_keys", "$^", "--decoder.mlp_keys", "$^",
                              "--encoder.cnn_keys", "image", "--decoder.cnn_keys", "image"])
    set_seed(0)
    agent = exploration.make_agent(space, BOX, cfg, "cpu")
    batch = exploration.synthetic_batch(space, BOX, 2, 9)
    batch["is_first"][:, 1:] = False  # one episode per sequence: imagination is the model's alone
    torch.manual_seed(3)
    video = agent.report(batch)["openloop/image"]  # (T, 3H, n*W, 3): truth, prediction, error rows
    assert video.shape == (9, 48, 32, 3)
    torch.manual_seed(3)  # the same latent samples, drawn in the same order
    with torch.no_grad():
        wm = agent.wm
        states = wm.observe({k: v[:, :5] for k, v in batch.items()})
        feats = [torch.cat([states["stoch"], states["deter"]], -1)]
        stoch, deter = states["stoch"][:, -1], states["deter"][:, -1]
        for t in range(5, 9):  # action t led to step t
            stoch, deter = wm.rssm.img_step(stoch, deter, batch["action"][:, t])
            feats.append(torch.cat([stoch, deter], -1)[:, None])
        prediction = wm.decoder(torch.cat(feats, 1))["image"].clamp(0, 1)  # (n, T, H, W, C)
    columns = lambda rows: np.concatenate(list(rows), 2)  # (n, T, H, W, C) -> (T, H, n*W, C)
    np.testing.assert_array_equal(video[:, :16], columns(batch["image"].numpy()))
    expected = columns((prediction * 255).round().to(torch.uint8).numpy())
    assert np.abs(video[:, 16:32].astype(int) - expected).max() <= 1
    truth, predicted = video[:, :16].astype(float), video[:, 16:32].astype(float)
    assert np.abs(video[:, 32:].astype(float) - ((predicted - truth) / 2 + 127.5)).max() <= 1.5
