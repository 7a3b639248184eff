"""Data-parallel training on torch.distributed: `--parallel N` or a `torchrun` launch.

Every rank runs its own envs and replay shard with its own seed; after each backward pass the
gradients of the world model, actor and critic are averaged over ranks (one flat all-reduce per
optimizer), and the return normaliser sees the imagined returns of all ranks, so N ranks take exactly
the step one learner would take on the N-times larger batch. NCCL on CUDA (one GPU per rank), gloo on
CPU. Rank 0 alone writes logs and checkpoints.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import traceback
from typing import Iterable, Optional

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from config import EXIT_USER_ERROR, Config, ConfigError, LoadedConfig


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of `params` in one flat buffer; missing grads count as zero."""
    params = list(params)
    if not params:
        return
    world = torch_dist.get_world_size()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (total_params,)
    torch_dist.all_reduce(flat)
    flat /= world
    offset = 0
    for param, grad in zip(params, grads):
        count = grad.numel()
        param.grad = flat[offset:offset + count].view_as(param).clone()
        offset += count


def gather_values(values: torch.Tensor) -> torch.Tensor:
    """Concatenate a flat tensor of equal size on every rank: (world * n,)."""
    parts = [torch.empty_like(values) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def broadcast_module_state(modules: Iterable[torch.nn.Module]) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            torch_dist.broadcast(tensor.data, src=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def backend_for(config: Config) -> str:
    wants_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    return "nccl" if wants_cuda else "gloo"


def rank_config(config: Config, local_rank: int) -> Config:
    """The config one rank trains with: its own GPU on CUDA (a new object; the original stays)."""
    if backend_for(config) != "nccl":
        return config
    return Config({**config.to_dict(), "device": f"cuda:{local_rank}"})


def run_rank(rank: int, world: int, local_rank: int, config_dict: dict, loaded_blocks: list,
             debug_moved: bool) -> None:
    """Body of one rank: join the process group, train, leave the group."""
    import dreamer  # late import: dreamer imports this module

    config = Config(config_dict)
    backend = backend_for(config)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    torch_dist.init_process_group(backend, rank=rank, world_size=world,
                                  timeout=datetime.timedelta(minutes=30))
    try:
        config = rank_config(config, local_rank)
        if rank == 0:
            import config as config_lib

            dreamer.print_config(config, config_lib.LoadedConfig(loaded_blocks, debug_moved))
            print(f"parallel: {world} ranks, backend {backend}, batch_size {config.batch_size} per rank")
        dreamer.train(config, dreamer.Dist(rank, world), sync=DistSync())
    finally:
        torch_dist.destroy_process_group()


class DistSync:
    """The hooks the agent calls to behave like one learner across ranks."""

    def grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        average_gradients(params)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        return gather_values(values)

    def broadcast(self, modules: Iterable[torch.nn.Module]) -> None:
        broadcast_module_state(modules)


def _spawned(index: int, world: int, port: int, config_dict: dict, blocks: list, moved: bool) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    import dreamer  # late import: dreamer imports this module

    try:
        run_rank(index, world, index, config_dict, blocks, moved)
    except Exception as error:
        if dreamer.is_user_error(error):  # one paragraph, no traceback; launch() exits 2
            where = "" if index == 0 else f"[rank {index}] "
            sys.stderr.write(f"error: {where}{error}\n")
            sys.stderr.flush()
            sys.exit(EXIT_USER_ERROR)
        sys.stderr.write(f"[rank {index}] failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        raise


def launch(config: Config, loaded: LoadedConfig) -> int:
    """Start the ranks: read them from torchrun's environment, or spawn `config.parallel` processes."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        run_rank(rank, world, local_rank, config.to_dict(), loaded.blocks, loaded.debug_moved)
        return 0
    world = config.parallel
    if backend_for(config) == "nccl" and torch.cuda.device_count() < world:
        raise ConfigError(
            f"--parallel {world} asks for {world} GPUs but {torch.cuda.device_count()} are visible. "
            f"Lower --parallel, or use --device cpu to run {world} gloo processes on the CPU."
        )
    try:
        mp.start_processes(
            _spawned, args=(world, free_port(), config.to_dict(), loaded.blocks, loaded.debug_moved),
            nprocs=world, join=True, start_method="spawn",
        )
    except mp.ProcessRaisedException as error:
        print(f"error: a rank failed; the whole run stopped.\n{error}", file=sys.stderr)
        return 1
    except mp.ProcessExitedException as error:
        if error.exit_code == EXIT_USER_ERROR:  # the rank printed what to fix
            return EXIT_USER_ERROR
        print(f"error: a rank exited unexpectedly ({error}); the whole run stopped.", file=sys.stderr)
        return 1
    return 0


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def current_rank() -> Optional[int]:
    return torch_dist.get_rank() if is_initialized() else None
