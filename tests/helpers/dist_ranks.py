"""Set up the trainer of a `--parallel 2` run on two gloo ranks (fresh, or resumed from what the
logdir holds) and write what each rank starts with to `<out>/rank<r>.pt`: its parameters, the
random actions, python/numpy/torch draws and replay-sampler state it would use next, the return
gather of a rank-specific tensor and two capture agreements. The test compares the ranks' files.
"""
import argparse
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as torch_dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def set_up_rank(rank: int, world: int, argv: list[str], out: str, port: int) -> None:
    import config as config_lib
    import distributed
    import dreamer

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = dreamer.Trainer(config_lib.load_config(argv), dreamer.Dist(rank, world), distributed.DistSync())
        try:
            trainer.setup()
            agent = trainer.agent
            params = torch.cat([p.detach().reshape(-1) for m in (agent.wm, agent.task)
                                for p in m.parameters()])  # (total_params,)
            torch.save({
                "params": params,
                "actions": torch.from_numpy(agent.random_actions(8)),
                "python": [random.random() for _ in range(4)],
                "numpy": np.random.rand(4).tolist(),
                "torch": torch.rand(4),
                "replay_rng": trainer.replay.rng_state(),
                "step": trainer.counters.step,
                "gathered": trainer.sync.gather(torch.tensor([float(rank), rank + 10.0])),
                # whether every rank captured its CUDA-graph update: rank 1 alone failing, then none
                "agreed": [trainer.sync.agree(rank == 0, trainer.device), trainer.sync.agree(True, trainer.device)],
            }, Path(out) / f"rank{rank}.pt")
        finally:
            trainer.close()
        torch_dist.barrier()
    finally:
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args, config_argv = parser.parse_known_args()
    import distributed

    mp.start_processes(set_up_rank, args=(2, config_argv, args.out, distributed.free_port()),
                       nprocs=2, join=True, start_method="spawn")
