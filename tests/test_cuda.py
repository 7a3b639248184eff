"""The model on a CUDA device: the same function as on the CPU, learning in every precision, and
compiled code that computes what the eager code computes. Skipped on machines without CUDA (run on a
lent GPU through scripts/gpu_check.sh)."""
from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch

import config
import exploration
from tools import set_seed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

IMAGE = gym.spaces.Box(0, 255, (16, 16, 3), np.uint8)
VECTOR = gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)
FLAGS = {k: gym.spaces.Box(0, 1, (), bool) for k in ("is_first", "is_last", "is_terminal")}
OBS_SPACES = {"mixed": {"image": IMAGE, "vector": VECTOR, **FLAGS}, "vector": {"vector": VECTOR, **FLAGS}}
ACT_SPACE = gym.spaces.Box(-1, 1, (2,), np.float32)


def make(device: str, *overrides: str, obs: str = "mixed", seed: int = 0):
    cfg = config.load_config(["--configs", "debug", "--encoder.mlp_keys", ".*", "--decoder.mlp_keys", ".*",
                              "--device", device, *overrides])
    set_seed(seed)
    agent = exploration.make_agent(OBS_SPACES[obs], ACT_SPACE, cfg, device)
    set_seed(seed)
    batch = exploration.synthetic_batch(OBS_SPACES[obs], ACT_SPACE, cfg.batch_size, cfg.batch_length, "cpu")
    return agent, batch, cfg


def to(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@pytest.fixture
def exact_float32():
    """Plain float32 matrix products on CUDA (no TF32) for comparisons with the CPU."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_encoder_and_decoder_compute_the_same_function_on_cuda_and_cpu(exact_float32):
    cpu, batch, _ = make("cpu")
    gpu, _, _ = make("cuda")
    gpu.load_state_dict(cpu.state_dict())
    embed_cpu = cpu.wm.encoder(batch)  # (B, T, E)
    embed_gpu = gpu.wm.encoder(to(batch, "cuda"))
    assert embed_gpu.shape == embed_cpu.shape
    torch.testing.assert_close(embed_gpu.cpu(), embed_cpu, rtol=1e-4, atol=1e-5)
    feat = torch.randn(*embed_cpu.shape[:2], cpu.wm.rssm.feat_size)  # (B, T, F)
    recon_cpu = cpu.wm.decoder(feat)
    recon_gpu = gpu.wm.decoder(feat.cuda())
    for key in recon_cpu:
        torch.testing.assert_close(recon_gpu[key].cpu(), recon_cpu[key], rtol=1e-4, atol=1e-5)


def test_first_world_model_loss_agrees_with_the_cpu(exact_float32):
    """Same parameters and batch: the first loss differs only through the latent samples."""
    cpu, batch, _ = make("cpu")
    gpu, _, _ = make("cuda")
    gpu.load_state_dict(cpu.state_dict())
    loss_cpu = cpu.train_world_model(batch)[1]["loss/model"].item()
    loss_gpu = gpu.train_world_model(to(batch, "cuda"))[1]["loss/model"].item()
    assert loss_gpu == pytest.approx(loss_cpu, rel=0.05)


def world_model_losses(agent, batch: dict, updates: int = 100) -> list[float]:
    return [agent.train_world_model(batch)[1]["loss/model"].item() for _ in range(updates)]


@pytest.fixture(scope="module")
def cpu_reference():
    """The initial state and the 100-update world-model losses of the CPU agent (float32)."""
    agent, batch, _ = make("cpu", obs="vector")
    initial_state = copy.deepcopy(agent.state_dict())
    return initial_state, world_model_losses(agent, batch)


@pytest.mark.parametrize("precision", ["32", "bf16", "16"])
def test_training_on_cuda_learns_as_far_as_on_the_cpu(precision, cpu_reference):
    """From the CPU agent's initial parameters, 100 world-model updates on one batch reach the CPU's
    final loss within 10% (the CPU falls to about 68% of its first loss); full updates stay finite;
    parameters stay float32 on the device."""
    initial_state, cpu_losses = cpu_reference
    agent, batch, _ = make("cuda", "--precision", precision, obs="vector")
    agent.load_state_dict(initial_state)
    batch = to(batch, "cuda")
    losses = world_model_losses(agent, batch)
    assert losses[0] == pytest.approx(cpu_losses[0], rel=0.05)
    assert losses[-1] < 0.8 * losses[0], (losses[0], losses[-1])
    assert losses[-1] == pytest.approx(cpu_losses[-1], rel=0.1)
    for _ in range(12):  # float16: the scaler skips overflowing steps until its scale fits
        metrics = agent.train_step(batch)
    assert all(torch.isfinite(v) for v in metrics.values()), metrics
    params = [p for module in (agent.wm, agent.task) for p in module.parameters()]
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in params)
    obs = {k: np.zeros((3, *s.shape), s.dtype) for k, s in OBS_SPACES["vector"].items()}
    action, _ = agent.policy(obs, None, "train")
    action = np.asarray(action["action"] if isinstance(action, dict) else action)
    assert action.shape == (3, 2) and np.all(np.abs(action) <= 1.0)


def test_compiled_world_model_update_matches_eager_on_cuda(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)  # the same random numbers as eager
    losses = {}
    for compiled in ("False", "True"):
        agent, batch, _ = make("cuda", "--compile", compiled)
        batch = to(batch, "cuda")
        torch.manual_seed(1)
        run = [agent.train_world_model(batch)[1]["loss/model"].item() for _ in range(3)]
        losses[compiled] = run
    np.testing.assert_allclose(losses["True"], losses["False"], rtol=2e-3)


@pytest.mark.parametrize("graphs", ["False", "True"])
def test_compiled_full_update_matches_eager_on_cuda(monkeypatch, graphs):
    """compile: True on CUDA, where imagination's heads, rewards and the actor's gradients run on the
    stacked steps: no compiled piece falls back to eager, and the first three updates (eager
    warm-ups with CUDA graphs) give eager code's losses and metrics; with CUDA graphs the compiled
    update is then captured and replayed."""
    import warnings

    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)  # the same random numbers as eager
    keys = ("loss/model", "loss/actor", "loss/critic", "model/kl", "actor/entropy", "return/p95", "imagine/reward")
    runs = {}
    for compiled in ("False", "True"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            agent, batch, _ = make("cuda", "--compile", compiled, "--cuda_graphs", graphs)
            assert agent.task.stack_steps
            batch = to(batch, "cuda")
            torch.manual_seed(1)
            runs[compiled] = [[agent.train_step(batch)[k].item() for k in keys] for _ in range(3)]
            later = [agent.train_step(batch) for _ in range(2)]
        fallbacks = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)
                     or "capturing the update failed" in str(w.message)]
        assert not fallbacks, fallbacks
        assert all(torch.isfinite(v) for m in later for v in m.values())
        if graphs == "True":
            assert agent.graph_update.graph is not None and not agent.graph_update.failed
    np.testing.assert_allclose(runs["True"], runs["False"], rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_cuda_graph_updates_learn_like_eager_updates(precision, cpu_reference):
    """--cuda_graphs True: 3 eager warm-up updates, one capture, then replays. From the same initial
    state, 40 full updates on one batch end within 10% of the eager run's world-model loss; every
    replay returns its own metrics (copies, not the graph's reused output tensors)."""
    initial_state, _ = cpu_reference
    final = {}
    for graphs in ("False", "True"):
        agent, batch, _ = make("cuda", "--precision", precision, "--cuda_graphs", graphs, obs="vector")
        agent.load_state_dict(initial_state)
        batch = to(batch, "cuda")
        runs = [agent.train_step(batch) for _ in range(40)]
        losses = [m["loss/model"].item() for m in runs]
        assert all(torch.isfinite(v) for m in runs for v in m.values())
        assert losses[-1] < 0.9 * losses[0], losses
        final[graphs] = losses[-1]
    assert agent.graph_update is not None and agent.graph_update.graph is not None
    assert not agent.graph_update.failed
    assert len(set(losses[5:])) > 30  # replays report their own losses
    assert final["True"] == pytest.approx(final["False"], rel=0.1)
    agent.load_state_dict(agent.state_dict())  # new optimizer state: the graph must be recorded anew
    assert agent.graph_update.graph is None
    assert torch.isfinite(agent.train_step(batch)["loss/model"])


def test_segmented_cuda_graph_updates_run_their_collectives_between_graphs():
    """Data-parallel CUDA-graph updates (collectives between the graphs, CudaGraphUpdate.between),
    in one process with a graph-safe gradient hook whose "collective" is an in-place op on the
    flat gradients: zeroing the actor's (so its parameters must never move: the op ran on the
    graphs' buffers between their replays) and leaving the others as they are (the world model
    must learn as eagerly). 3 warm-ups, a capture, replays; the hook's op runs once per group and
    update."""
    final = {}
    for graphs in ("False", "True"):
        agent, batch, _ = make("cuda", "--cuda_graphs", graphs, obs="vector")
        actor_ids = {id(p) for p in agent.task.actor.parameters()}
        calls = []

        def grads(params, run):
            flat = torch.cat([p.grad.reshape(-1) for p in params])  # (total,)
            actor = id(params[0]) in actor_ids

            def collective():
                calls.append(actor)
                if actor:
                    flat.zero_()

            run(collective)
            offset = 0
            for p in params:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()

        agent.set_grad_sync(grads, graph_safe=True)
        agent.set_capture_agreement(lambda ok: ok)
        actor_before = [p.detach().clone() for p in agent.task.actor.parameters()]
        batch = to(batch, "cuda")
        losses = [agent.train_step(batch)["loss/model"].item() for _ in range(12)]
        assert len(calls) == 3 * 12 and sum(calls) == 12
        assert all(torch.equal(a, b) for a, b in zip(actor_before, agent.task.actor.parameters()))
        assert losses[-1] < 0.9 * losses[0], losses
        final[graphs] = losses[-1]
        if graphs == "True":
            assert not agent.graph_update.failed and len(agent.graph_update.segments) == 4
    assert final["True"] == pytest.approx(final["False"], rel=0.1)


@pytest.mark.parametrize("segmented", [False, True])
def test_a_failed_capture_falls_back_to_eager_updates_that_train(segmented):
    """A capture that the update breaks (a host read while capturing, which invalidates the
    capture) gives one warning, and the eager updates after it run and learn: the failed capture
    must leave no capture state behind (the random generator's, the allocator's pool)."""
    import warnings

    agent, batch, _ = make("cuda", "--cuda_graphs", "True", obs="vector")
    if segmented:
        agent.set_grad_sync(lambda params, run: run(lambda: None), graph_safe=True)
    update = agent.graph_update.update

    def read_while_capturing(b):
        if torch.cuda.is_current_stream_capturing():
            torch.zeros((), device="cuda").item()  # not permitted while capturing
        return update(b)

    agent.graph_update.update = read_while_capturing
    batch = to(batch, "cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [agent.train_step(batch)["loss/model"].item() for _ in range(12)]
    assert agent.graph_update.failed and agent.graph_update.graph is None
    assert sum("capturing the update failed" in str(w.message) for w in caught) == 1
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses


def test_imagination_heads_run_stacked_on_cuda():
    """The critic, slow critic and continue heads run once on the stacked imagined steps on a GPU
    (tests/test_models.py checks that this gives the per-step numbers)."""
    agent, _, _ = make("cuda", "--behavior", "plan2explore")
    assert agent.task.stack_steps is True and agent.expl.ac.stack_steps is True
