"""One update of the agent on `--world` gloo ranks, each on its slice of a fixed batch; rank 0 writes
the gradients each optimizer applied (after the cross-rank average) and the updated parameters to
`--out`. With --world 1 the single process takes the whole batch.

Sampling is replaced by the distributions' modes in every process, so the only difference between a
1-rank and a 2-rank update is how the batch is split: the test compares the two parameter sets.
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as torch_dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def deterministic_sampling() -> None:
    import distributions

    distributions.sample_index = lambda probs, uniform=None: probs.argmax(-1)  # every categorical sample: its mode
    distributions.BoundedNormal.sample = lambda self, noise=None: self.mode()


def update_params(rank: int, world: int, argv: list[str], out: str, port: int) -> None:
    import config as config_lib
    import distributed
    import exploration
    from envs.custom_env import CustomEnv

    torch.set_num_threads(1)
    deterministic_sampling()
    cfg = config_lib.load_config(argv)
    env = CustomEnv("reach")
    obs_space = {"image": env.obs_space["image"], "vector": env.obs_space["vector"]}
    import gymnasium
    act_space = gymnasium.spaces.Box(-1, 1, env.act_space.shape, "float32")
    torch.manual_seed(0)
    agent = exploration.make_agent(obs_space, act_space, cfg, "cpu")
    batch = exploration.synthetic_batch(obs_space, act_space, cfg.batch_size, cfg.batch_length, seed=1)
    applied: list[torch.Tensor] = []  # the gradients each optimizer step used, in call order
    sync = None
    if world > 1:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        torch_dist.init_process_group("gloo", rank=rank, world_size=world)
        sync = distributed.DistSync()
        agent.set_return_gather(sync.gather)
        share = cfg.batch_size // world
        batch = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}

    def record(params):
        if sync is not None:
            sync.grads(params)
        applied.append(torch.cat([p.grad.reshape(-1) for p in params]).clone())

    agent.set_grad_sync(record)
    agent.train_step(batch)
    if rank == 0:
        params = {f"wm.{k}": v for k, v in agent.wm.state_dict().items()}
        params.update({f"task.{k}": v for k, v in agent.task.state_dict().items()})
        torch.save({"params": params, "grads": applied}, out)
    if world > 1:
        torch_dist.barrier()
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--out", required=True)
    args, config_argv = parser.parse_known_args()
    if args.world == 1:
        update_params(0, 1, config_argv, args.out, 0)
    else:
        import distributed

        mp.start_processes(update_params, args=(args.world, config_argv, args.out, distributed.free_port()),
                           nprocs=args.world, join=True, start_method="spawn")
