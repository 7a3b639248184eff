"""Data-parallel training on torch.distributed: `--parallel N` or a `torchrun` launch.

Every rank runs its own envs and replay shard with its own seed; after each backward pass the
gradients of the world model, actor and critic are averaged over ranks (one flat all-reduce per
optimizer), and the return normaliser sees the imagined returns of all ranks, so N ranks take exactly
the step one learner would take on the N-times larger batch. NCCL on CUDA (one GPU per rank), gloo on
CPU. Rank 0 alone writes logs and checkpoints.

`--parallel N` spawns the ranks under a supervisor (launch): each rank runs in its own process group,
so Ctrl-C (or a SIGTERM to the command) reaches the supervisor alone, which passes each request on
to rank 0 once (the ranks stop together at rank 0's next iteration and save once; a second request
stops at once; a third kills every rank); a supervisor that is itself killed stops the ranks as
Ctrl-C would (PR_SET_PDEATHSIG). A rank that fails writes what happened to a report file instead of
stderr; when every rank has ended, the supervisor prints the first cause once: a user error's one
paragraph (exit 2; the same error on several ranks is printed once), a crash's traceback, or the
signal that ended a rank (kill -9, the out-of-memory killer). The other ranks' broken collectives,
which follow from it, are not printed. Ranks still running PEER_GRACE_S seconds after a rank failed
(or after rank 0 ended) are killed, so no rank waits out the collectives' timeout.
"""
from __future__ import annotations

import datetime
import json
import multiprocessing.connection
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable, Optional, TextIO

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from config import EXIT_USER_ERROR, Config, ConfigError, LoadedConfig
from models import RunCollective, run_at_once


def average_gradients(params: Iterable[torch.nn.Parameter], run: RunCollective = run_at_once) -> None:
    """All-reduce (mean) the gradients of `params` in one flat buffer; missing grads count as zero.
    `run` runs the all-reduce: at once, or between two CUDA graphs of a captured update."""
    params = list(params)
    if not params:
        return
    world = torch_dist.get_world_size()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (total_params,)
    run(lambda: torch_dist.all_reduce(flat))
    flat /= world
    offset = 0
    for param, grad in zip(params, grads):
        count = grad.numel()
        param.grad = flat[offset:offset + count].view_as(param).clone()
        offset += count


def gather_values(values: torch.Tensor, run: RunCollective = run_at_once) -> torch.Tensor:
    """Concatenate a flat tensor of equal size on every rank: (world * n,). `run` runs the
    all-gather (see average_gradients)."""
    parts = [torch.empty_like(values) for _ in range(torch_dist.get_world_size())]
    values = values.contiguous()
    run(lambda: torch_dist.all_gather(parts, values))
    return torch.cat(parts)


def all_ranks_agree(ok: bool, device: torch.device) -> bool:
    """Whether `ok` holds on every rank (a MIN all-reduce; every rank must call it)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MIN)
    return bool(flag.item())


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


_TRAINING = False  # whether this process got as far as dreamer.train (for a stop request's report)
EXIT_PEER_LOST = 3  # a rank whose collective broke because another rank went away
EXIT_INTERRUPTED = 130  # a rank that a stop request ended before its loop could save (still starting)
PEER_GRACE_S = 30.0  # seconds the other ranks get to end by themselves after one failed or rank 0 ended


def collective_timeout() -> datetime.timedelta:
    """How long a collective may wait for the other ranks before it fails: DREAMER_COLLECTIVE_TIMEOUT_S
    seconds, by default 3 hours. Rank 0 evaluates alone while the other ranks wait in their next
    collective, so this bounds an evaluation's length (torch's 30 minutes ended a --parallel run in a
    long evaluation, e.g. 100 Atari episodes); a rank that dies is found at once anyway (its
    connections close, and the supervisor or torchrun stops the others)."""
    return datetime.timedelta(seconds=float(os.environ.get("DREAMER_COLLECTIVE_TIMEOUT_S", 3 * 3600)))


def run_rank(rank: int, world: int, local_rank: int, config_dict: dict, loaded_blocks: list,
             debug_moved: bool) -> int:
    """Body of one rank: join the process group, train, leave the group. Returns the exit status
    (0, or 128 + the signal's number when a stop request ended the run, as a single process)."""
    import dreamer  # late import: dreamer imports this module

    config = Config(config_dict)
    backend = backend_for(config)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    torch_dist.init_process_group(backend, rank=rank, world_size=world, timeout=collective_timeout())
    try:
        config = rank_config(config, local_rank)
        if rank == 0:
            import config as config_lib

            dreamer.print_config(config, config_lib.LoadedConfig(loaded_blocks, debug_moved))
            print(f"parallel: {world} ranks, backend {backend}, batch_size {config.batch_size} per rank",
                  flush=True)
        interrupt = dreamer.Interrupt(announce=rank == 0)  # torchrun signals every rank
        global _TRAINING
        _TRAINING = True
        dreamer.train(config, dreamer.Dist(rank, world), sync=DistSync(), interrupt=interrupt)
        return interrupt.exit_code()
    finally:
        torch_dist.destroy_process_group()


class DistSync:
    """The hooks the agent calls to behave like one learner across ranks. Their collectives go
    through `run`, so that a CUDA-graph update can run them between its graphs (see
    exploration.CudaGraphUpdate.between); `agree` tells whether every rank's capture succeeded."""

    def grads(self, params: Iterable[torch.nn.Parameter], run: RunCollective = run_at_once) -> None:
        average_gradients(params, run)

    def gather(self, values: torch.Tensor, run: RunCollective = run_at_once) -> torch.Tensor:
        return gather_values(values, run)

    def agree(self, ok: bool, device: torch.device) -> bool:
        return all_ranks_agree(ok, device)

    def broadcast(self, modules: Iterable[torch.nn.Module]) -> None:
        broadcast_module_state(modules)


# ------------------------------------------------------------------------------- failures of a rank


def is_peer_lost(error: BaseException) -> bool:
    """Whether `error` is a collective (or the process group's store) failing, as every other rank's
    does when one rank dies: torch.distributed's own error types, or an error raised inside
    torch.distributed (gloo reports a closed connection as a plain RuntimeError)."""
    if isinstance(error, torch_dist.DistError):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"torch{os.sep}distributed{os.sep}" in frames[-1].filename


def short_reason(error: BaseException) -> str:
    """The first sentence of a collective's error, without gloo's source location."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0]


def classify_failure(error: BaseException) -> tuple[str, int]:
    """(kind, exit status) of an exception that ended a rank: 'user' (its message says what to fix,
    exit 2), 'peer' (a collective broke, exit EXIT_PEER_LOST) or 'crash' (a bug: its traceback, exit 1)."""
    import dreamer  # late import: dreamer imports this module

    if dreamer.is_user_error(error):
        return "user", EXIT_USER_ERROR
    if is_peer_lost(error):
        return "peer", EXIT_PEER_LOST
    return "crash", 1


def _write_report(report_dir: str, index: int, report: dict) -> None:
    path = Path(report_dir) / f"rank{index}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**report, "time": time.time()}), encoding="utf-8")
    os.replace(tmp, path)


def _rank_process(index: int, report_dir: str, parent_pid: int, body: Callable[..., Optional[int]],
                  args: tuple) -> None:
    """What a spawned rank runs: `body(index, *args)`, its outcome as the exit status, and a report
    file for the supervisor instead of output on stderr when it fails."""
    try:
        os.setpgid(0, 0)  # Ctrl-C in the terminal reaches the supervisor alone; it passes the request on
    except OSError:
        pass
    # ignored since the supervisor started this process (a Ctrl-C while it imported torch was the
    # supervisor's to pass on); from here on as in any Python process
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        mp._prctl_pr_set_pdeathsig(signal.SIGINT)  # a supervisor killed (kill -9): stop as on Ctrl-C
    except (AttributeError, OSError):
        pass
    if os.getppid() != parent_pid or (Path(report_dir) / "stop").exists():  # stopped while starting
        _write_report(report_dir, index, {"kind": "interrupted"})
        sys.exit(EXIT_INTERRUPTED)
    try:
        code = body(index, *args) or 0
    except KeyboardInterrupt:  # a stop request before (or after) the loop's handler was in place
        _write_report(report_dir, index, {"kind": "interrupted" if not _TRAINING else "stopped"})
        code = EXIT_INTERRUPTED
    except Exception as error:
        kind, code = classify_failure(error)
        _write_report(report_dir, index, {"kind": kind, "message": str(error),
                                          "traceback": traceback.format_exc()})
        if os.getppid() != parent_pid:  # no supervisor left to print it
            sys.stderr.write(f"[rank {index}] {traceback.format_exc() if kind != 'user' else error}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def group_user_errors(messages: dict[int, str]) -> list[tuple[list[int], str]]:
    """User errors of several ranks, one entry per kind of error: messages that differ only in
    numbers (e.g. the index of the env each rank checked) count as one, shown as the lowest rank's."""
    groups: dict[str, list[int]] = {}
    for rank in sorted(messages):
        groups.setdefault(re.sub(r"\d+", "#", messages[rank]), []).append(rank)
    return [(ranks, messages[ranks[0]]) for ranks in groups.values()]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class RankSupervisor:
    """Spawns `world` processes running `body(rank, world, *args)`, forwards stop requests to them,
    keeps no rank waiting on a dead one, and tells once what ended the run (see the module's doc)."""

    def __init__(self, world: int, body: Callable[..., Optional[int]], args: tuple = (),
                 grace: float = PEER_GRACE_S, after_failure: Callable[[], str] = lambda: "",
                 out: Optional[TextIO] = None, log_file: Optional[Path] = None):
        self.world, self.grace, self.after_failure, self.log_file = world, grace, after_failure, log_file
        self.out = out if out is not None else sys.stderr
        self.report_dir = tempfile.mkdtemp(prefix="dreamer-ranks-")
        context = mp.get_context("spawn")
        self.processes = [context.Process(target=_rank_process, name=f"rank {index}", daemon=False,
                                          args=(index, self.report_dir, os.getpid(), body, (world, *args)))
                          for index in range(world)]
        self.exits: dict[int, tuple[int, float]] = {}  # rank -> (exit status, time.time() seen ended)
        self.killed: dict[int, str] = {}  # rank -> why this supervisor killed it
        self.signals: list[int] = []  # stop requests received
        self.sent: dict[int, set[int]] = {}  # rank -> signals passed on to it

    # -- running
    def run(self) -> int:
        """Start the ranks, wait for all of them, print what ended the run; returns the exit status."""
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        try:
            # the ranks start with Ctrl-C and SIGTERM ignored (inherited through exec) until each
            # has left this process group; a request in these milliseconds is lost
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
            try:
                for process in self.processes:
                    process.start()
            finally:
                for sig in previous:
                    signal.signal(sig, self._on_signal)
            self._wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for index, process in enumerate(self.processes):  # only after an error in this supervisor
                if process.pid is not None and process.exitcode is None:
                    self.killed.setdefault(index, "the supervisor stopped")
                    process.kill()
                    process.join()
        try:
            return self.outcome()
        finally:
            shutil.rmtree(self.report_dir, ignore_errors=True)

    def _alive(self) -> list[int]:
        return [index for index, process in enumerate(self.processes)
                if process.pid is not None and index not in self.exits]

    def _send(self, index: int, sig: int) -> None:
        self.sent.setdefault(index, set()).add(int(sig))
        try:
            os.kill(self.processes[index].pid, sig)
        except ProcessLookupError:
            pass

    def _on_signal(self, signum: int, _frame) -> None:
        """First and second request: to rank 0 (the ranks stop at its next iteration and save once;
        the second stops at once), or to every rank left once rank 0 has ended; third: kill them."""
        self.signals.append(signum)
        try:
            (Path(self.report_dir) / "stop").touch()  # for ranks still starting (see _rank_process)
        except OSError:
            pass
        alive = self._alive()
        if len(self.signals) == 2 and alive:
            sys.stderr.write(f"\n{_signal_name(signum)} again: rank 0 stops at once (and saves); a third "
                             "stop request kills every rank\n")
        if len(self.signals) >= 3:
            for index in alive:
                self.killed[index] = f"a third stop request ({_signal_name(signum)})"
                self._send(index, signal.SIGKILL)
            return
        for index in ([0] if 0 in alive else alive):
            self._send(index, signum)

    def _wait(self) -> None:
        deadline, forwarded_to_all = None, False
        while len(self.exits) < len(self.processes):
            pending = [p.sentinel for i, p in enumerate(self.processes) if i not in self.exits]
            multiprocessing.connection.wait(pending, timeout=0.5)
            for index, process in enumerate(self.processes):
                if index not in self.exits and process.exitcode is not None:
                    self.exits[index] = (process.exitcode, time.time())
            if self.signals and 0 in self.exits and not forwarded_to_all:  # rank 0 stopped: the ranks
                forwarded_to_all = True  # still starting (not in a collective yet) get the request too
                for index in self._alive():
                    self._send(index, self.signals[0])
            if self.signals and any(self._reports().get(i, {}).get("kind") == "interrupted" for i in self.exits):
                # a rank stopped while starting: no rank got past set-up's first collective, so
                # nothing can be saved; the others may wait for it there (in C++, deaf to signals)
                for index in self._alive():
                    self.killed.setdefault(index, "starting")
                    self._send(index, signal.SIGKILL)
            ended_badly = any(code != 0 for code, _ in self.exits.values())
            if deadline is None and (ended_badly or 0 in self.exits):
                deadline = time.monotonic() + self.grace
            if deadline is not None and time.monotonic() >= deadline:
                first = min(self.exits, key=lambda i: (self.exits[i][0] == 0, self.exits[i][1]))
                for index in self._alive():
                    self.killed.setdefault(index, f"it was still running {self.grace:.0f} s after rank "
                                                  f"{first} ended")
                    self._send(index, signal.SIGKILL)
                deadline = time.monotonic() + 3600  # killed: they end at once

    # -- reporting
    def _reports(self) -> dict[int, dict]:
        reports = {}
        for index in range(self.world):
            path = Path(self.report_dir) / f"rank{index}.json"
            try:
                reports[index] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                pass
        return reports

    def _print(self, text: str, log: bool = True) -> None:
        """On stderr, and into the run's train.log when it exists and `log` (rank 0 logged there
        only its own side: a broken collective's traceback, or nothing at all when it was killed)."""
        self.out.write(text.rstrip("\n") + "\n")
        self.out.flush()
        if log and self.log_file is not None and self.log_file.is_file():
            try:
                with open(self.log_file, "a", encoding="utf-8") as handle:
                    text = text.strip().removeprefix("error: ")
                    handle.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] ERROR {text}\n")
            except OSError:
                pass

    def outcome(self) -> int:
        """Print the first cause of the run's end once; the exit status: 0 (finished), 2 (a user
        error), 128 + the signal (stopped by a stop request, saved), 1 (a crash, a killed rank)."""
        reports = self._reports()
        stops = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # a rank that a stop request ended, saved
        causes = []  # (time, rank, kind): what ended a rank by itself, not as a consequence
        for index, (code, seen) in self.exits.items():
            report = reports.get(index)
            if report is not None and report["kind"] in ("user", "crash"):
                causes.append((report["time"], index, report["kind"]))
            elif report is None and index not in self.killed and code not in (0, *stops) \
                    and -code not in self.sent.get(index, ()):  # (a request passed on ends it so)
                causes.append((seen, index, "signal" if code < 0 else "exit"))
        stopped = [code for code, _ in self.exits.values() if code in stops]
        late = "".join(f"\n(rank {index} was killed: {why})" for index, why in sorted(self.killed.items())
                       if why != "starting")
        if causes:
            _, first, kind = min(causes)
            if kind == "user":
                user = {i: r["message"] for i, r in reports.items() if r["kind"] == "user"}
                for ranks, message in group_user_errors(user):
                    where = "" if ranks == list(range(self.world)) or ranks[0] == 0 else f"[rank {ranks[0]}] "
                    also = f" (the same error stopped ranks {', '.join(map(str, ranks))})" if len(ranks) > 1 else ""
                    self._print(f"error: {where}{message}{also}", log=ranks[0] != 0)
                return EXIT_USER_ERROR
            if kind == "crash":
                self._print(f"[rank {first}] failed:\n{reports[first]['traceback']}", log=first != 0)
                self._print(f"error: rank {first} failed (its traceback is above); every rank stopped. "
                            f"{self.after_failure()}{late}")
                return 1
            code = self.exits[first][0]
            pid = self.processes[first].pid
            if kind == "signal":
                name = _signal_name(-code)
                why = (" (kill -9, or the kernel's out-of-memory killer: see `dmesg`)"
                       if -code == signal.SIGKILL else "")
                self._print(f"error: rank {first} (pid {pid}) was ended by {name}{why}; the other ranks "
                            f"stopped with it. {self.after_failure()}{late}")
            else:
                self._print(f"error: rank {first} (pid {pid}) exited with status {code} without a report; "
                            f"the other ranks stopped with it. {self.after_failure()}{late}")
            return 1
        if self.signals or stopped:  # stopped by request: rank 0 saved (or a third request killed it)
            if reports.get(0, {}).get("kind") == "interrupted" and self.signals:
                self._print(f"{_signal_name(self.signals[0])} while starting: stopped before training began",
                            log=False)
            if len(self.signals) >= 3:
                self._print(f"error: stopped at once by a third stop request: every rank was killed. "
                            f"{self.after_failure()}")
            elif late:
                self._print(late.strip())
            return 128 + self.signals[0] if self.signals else stopped[0]
        peers = sorted((r["time"], i) for i, r in reports.items() if r["kind"] == "peer")
        if peers:  # a collective broke with no rank to blame (e.g. one timed out waiting on a hung rank)
            first = peers[0][1]
            timed_out = "timed out" in reports[first]["message"].lower()
            why = (f" (a collective waited longer than {collective_timeout().total_seconds():.0f} s: a rank "
                   "was stuck, or rank 0 evaluated longer than that while the others waited; "
                   "DREAMER_COLLECTIVE_TIMEOUT_S sets the limit)" if timed_out else "")
            self._print(f"[rank {first}] failed:\n{reports[first]['traceback']}")
            self._print(f"error: rank {first} lost its connection to the other ranks{why}; every rank "
                        f"stopped. {self.after_failure()}{late}")
            return 1
        if late:
            self._print(f"error: rank 0 ended but not every rank did{late}")
            return 1
        return 0


# ------------------------------------------------------------------------------------------- launch


def _train_rank(index: int, world: int, port: int, config_dict: dict, blocks: list, moved: bool) -> int:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    return run_rank(index, world, index, config_dict, blocks, moved)


def checkpoint_note(config: Config) -> str:
    """What a failed run leaves to resume from (for the supervisor's last line)."""
    import checkpoint as ckpt
    import dreamer  # late import: dreamer imports this module

    path = dreamer.resolve_paths(config).checkpoint
    if ckpt.has_checkpoint(path):
        return f"The last checkpoint, {path}, is kept: the same command resumes from it."
    return f"No checkpoint was written yet ({path}): the same command starts the run afresh."


def _run_under_torchrun(config: Config, loaded: LoadedConfig) -> int:
    """One rank of a torchrun launch (torchrun starts, stops and reports the processes): a user
    error is this rank's one paragraph (exit 2), a broken collective one line (the rank that caused
    it says why), anything else its traceback."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    try:
        return run_rank(rank, world, local_rank, config.to_dict(), loaded.blocks, loaded.debug_moved)
    except Exception as error:
        kind, code = classify_failure(error)
        if kind == "crash":
            raise
        if kind == "user":
            where = "" if rank == 0 else f"[rank {rank}] "
            print(f"error: {where}{error}", file=sys.stderr, flush=True)
        else:
            first_line = short_reason(error)
            print(f"[rank {rank}] stopped: its connection to the other ranks broke ({first_line}); the "
                  "rank that failed first says why.", file=sys.stderr, flush=True)
        return code


def launch(config: Config, loaded: LoadedConfig) -> int:
    """Start the ranks: read them from torchrun's environment, or spawn `config.parallel` processes
    under a RankSupervisor. Returns the exit status."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return _run_under_torchrun(config, loaded)
    world = config.parallel
    if backend_for(config) == "nccl" and torch.cuda.device_count() < world:
        raise ConfigError(
            f"--parallel {world} asks for {world} GPUs but {torch.cuda.device_count()} are visible. "
            f"Lower --parallel, or use --device cpu to run {world} gloo processes on the CPU."
        )
    import dreamer  # late import: dreamer imports this module

    logdir = dreamer.resolve_paths(config).logdir
    supervisor = RankSupervisor(world, _train_rank,
                                (free_port(), config.to_dict(), loaded.blocks, loaded.debug_moved),
                                after_failure=lambda: checkpoint_note(config),
                                log_file=(logdir / "eval_only" if config.eval_only else logdir) / "train.log")
    return supervisor.run()


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def current_rank() -> Optional[int]:
    return torch_dist.get_rank() if is_initialized() else None
