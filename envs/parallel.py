"""EnvPool: N envs stepped together, in worker processes, worker threads, or inline.

Each env lives in one worker for its whole life (`process`: a multiprocessing.Process from the
'forkserver' context, or 'spawn' where that is missing; `thread`: a daemon thread, which also keeps
thread-bound render contexts on one thread; `none`: the caller's thread). The pool sends every worker
its command first and then collects the answers, so the envs advance concurrently.

`pool.step(actions)` steps each env, except that an env that has not started yet or whose last
observation had `is_last` is reset instead (its action is ignored) and returns its first observation.
An env that raises, or whose worker dies, during `step` is rebuilt from its constructor and its episode
dropped: the pool returns a fresh first observation for it and records an event (index, traceback);
after `max_restarts` restarts in a row, each within `healthy_steps` pool steps of the one before, the
next failure raises EnvGaveUp (an env that keeps failing is broken; one that fails once a day is
restarted every time: `healthy_steps` steps without a failure clear the count). A constructor that
fails at start-up raises its own exception, with the env index and the worker's traceback as a note.
An env in a worker (`process` or `thread`) that has not answered for `slow_seconds` (a simulator stuck
in a loop, a remote env waiting on its server) is reported through `on_event` (kind 'slow') each such
span, while the pool keeps waiting: a hung env is named instead of freezing the run without a word.
(`none` runs the env in the caller's thread, which cannot watch it.)
"""
from __future__ import annotations

import multiprocessing
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
import weakref
from typing import Any, Callable, Sequence

import numpy as np

PARALLEL_MODES = ('process', 'thread', 'none')
POLL_SECONDS = 0.5  # how often a waiting pool checks that a worker process is still alive
SLOW_SECONDS = 300.0  # an env silent this long (and each such span again) is reported as not answering
JOIN_SECONDS = 5.0  # how long close() waits for a worker before terminating it


class EnvError(RuntimeError):
    """An env failed inside its worker; carries the env index and the worker's traceback."""

    def __init__(self, index: int, message: str, worker_traceback: str = '',
                 exception: BaseException | None = None):
        text = f'env {index}: {message}'
        if worker_traceback:
            text += f'\n\nTraceback in the worker of env {index}:\n{worker_traceback}'
        super().__init__(text)
        self.index = index
        self.worker_traceback = worker_traceback
        self.exception = exception


class EnvGaveUp(EnvError):
    """An env failed again after `max_restarts` restarts in a row: the pool stopped restarting it."""


class EnvRestartFailed(EnvGaveUp):
    """An env failed, and its fresh copy failed to start: more restarts cannot help."""


def _current_failure() -> tuple[str, BaseException | None]:
    """The exception being handled as (traceback text, the exception if it survives pickling)."""
    text = traceback.format_exc()
    exception = sys.exc_info()[1]
    try:
        pickle.loads(pickle.dumps(exception))
    except Exception:  # an exception that does not pickle travels as text only
        exception = None
    return text, exception


def _answer(env: Any, method: str, args: tuple) -> tuple[str, Any]:
    """Runs one command on `env` -> ('ok', value) or ('error', (traceback text, exception)).

    'step' and 'reset' answer with the observation only; ('getattr', (name,)) reads an attribute.
    """
    try:
        if method == 'step':
            return 'ok', env.step(*args)[0]
        if method == 'reset':
            return 'ok', env.reset()[0]
        if method == 'getattr':
            return 'ok', getattr(env, args[0])
        if method == 'close':
            close = getattr(env, 'close', None)
            return 'ok', close() if callable(close) else None
        return 'ok', getattr(env, method)(*args)
    except Exception:
        return 'error', _current_failure()


def _build(ctor: Callable[[], Any]) -> tuple[Any, tuple[str, Any]]:
    """(env, ('ok', None)) or (None, ('error', failure)) from calling the constructor."""
    try:
        return ctor(), ('ok', None)
    except Exception:
        return None, ('error', _current_failure())


def _serve(ctor: Callable[[], Any], receive: Callable[[], Any], send: Callable[[Any], None]) -> None:
    """Worker loop of threads and processes: build the env, then answer commands until 'close'."""
    env, answer = _build(ctor)
    send(answer)
    if env is None:
        return
    while True:
        method, args = receive()
        answer = _answer(env, method, args)
        try:
            send(answer)
        except Exception:  # e.g. a return value that does not pickle
            send(('error', _current_failure()))
        if method == 'close':
            return


def _process_main(connection: Any, ctor: Callable[[], Any]) -> None:
    """Entry point of a worker process; Ctrl-C is left to the parent, which closes the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _serve(ctor, connection.recv, connection.send)
    except (EOFError, OSError):
        pass  # the parent went away
    finally:
        connection.close()


class _InlineWorker:
    """The env in the caller's thread: submit() runs the command, receive() returns its answer."""

    def __init__(self, ctor: Callable[[], Any], index: int):
        self.index = index
        self._env, self._answer = _build(ctor)

    def submit(self, method: str, *args: Any) -> None:
        self._answer = _answer(self._env, method, args)

    def receive(self, on_wait: Callable[[], None] | None = None) -> tuple[str, Any]:
        del on_wait  # the command already ran in the caller's thread
        return self._answer

    def close(self) -> None:
        if self._env is not None:
            _answer(self._env, 'close', ())
            self._env = None


class _ThreadWorker:
    """The env in its own daemon thread, fed through two queues."""

    def __init__(self, ctor: Callable[[], Any], index: int):
        self.index = index
        self._commands: queue.Queue = queue.Queue()
        self._answers: queue.Queue = queue.Queue()
        self._thread = threading.Thread(
            target=_serve, args=(ctor, self._commands.get, self._answers.put),
            name=f'env-{index}', daemon=True)
        self._thread.start()

    def submit(self, method: str, *args: Any) -> None:
        self._commands.put((method, args))

    def receive(self, on_wait: Callable[[], None] | None = None) -> tuple[str, Any]:
        while True:
            try:
                return self._answers.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not self._thread.is_alive():
                    return 'died', 'the worker thread ended without answering'
                if on_wait is not None:
                    on_wait()

    def close(self) -> None:
        if self._thread.is_alive():
            self._commands.put(('close', ()))
            self._thread.join(JOIN_SECONDS)


class _ProcessWorker:
    """The env in its own process, fed through a pipe; a dead process answers ('died', reason)."""

    def __init__(self, ctor: Callable[[], Any], index: int, context: Any):
        self.index = index
        self._connection, child = context.Pipe()
        self._process = context.Process(
            target=_process_main, args=(child, ctor), name=f'env-{index}', daemon=True)
        try:
            self._process.start()
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            self._connection.close()
            raise TypeError(
                f"env {index}: envs.parallel=process sends each env constructor to its worker "
                f"process by pickling, and {ctor!r} does not pickle ({error}). Pass a "
                "functools.partial of a module-level function (e.g. envs.make_env), or use "
                "envs.parallel thread or none.") from error
        finally:
            child.close()  # so that recv() sees EOF when the worker dies
        self._send_failed = False

    def submit(self, method: str, *args: Any) -> None:
        try:
            self._connection.send((method, args))
        except (OSError, EOFError):
            self._send_failed = True

    def receive(self, on_wait: Callable[[], None] | None = None) -> tuple[str, Any]:
        while not self._send_failed:
            try:
                if self._connection.poll(POLL_SECONDS):
                    return self._connection.recv()
                if not self._process.is_alive() and not self._connection.poll(0):
                    break
            except (EOFError, OSError):
                break
            if on_wait is not None:  # outside the try: a failing log write is not a dead worker
                on_wait()
        self._send_failed = False
        self._process.join(JOIN_SECONDS)
        return 'died', f'the worker process ended (exit code {self._process.exitcode})'

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._connection.send(('close', ()))
            except (OSError, EOFError):
                pass
            self._process.join(JOIN_SECONDS)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(JOIN_SECONDS)
        self._connection.close()


def wait_text(seconds: float) -> str:
    """'45 s' under two minutes, else '5.2 min'."""
    return f'{seconds:.0f} s' if seconds < 120 else f'{seconds / 60:.1f} min'


def _process_context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context('forkserver' if 'forkserver' in methods else 'spawn')


def _close_workers(workers: list) -> None:
    """Closes every worker; safe to call twice (also run at interpreter exit)."""
    for worker in workers:
        try:
            worker.close()
        except Exception:  # closing must go on for the others
            pass


class EnvPool:
    """N envs from `ctors` in `parallel` mode ('process', 'thread' or 'none'); see the module docstring.

    Attributes: `obs_space`, `act_space` (of env 0), `events` (list of restart and slow-env records:
    dicts with index, kind ('restart' or 'slow'), message, traceback, time), `restarts` (count so far).
    """

    def __init__(self, ctors: Sequence[Callable[[], Any]], parallel: str = 'process',
                 max_restarts: int = 10, on_event: Callable[[dict], None] | None = None,
                 first_index: int = 0, healthy_steps: int = 1000, slow_seconds: float = SLOW_SECONDS):
        if parallel not in PARALLEL_MODES:
            raise ValueError(
                f"envs.parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}. Use "
                "process (one worker process per env), thread (one thread per env) or none (inline).")
        if not ctors:
            raise ValueError('EnvPool needs at least one env constructor (envs.amount >= 1).')
        self._ctors = list(ctors)
        self.first_index = int(first_index)  # messages name env i as first_index + i (its global index)
        self._parallel = parallel
        self._context = _process_context() if parallel == 'process' else None
        self.max_restarts, self.healthy_steps = int(max_restarts), int(healthy_steps)
        if not float(slow_seconds) > 0:
            raise ValueError(f'EnvPool slow_seconds must be > 0 (math.inf: never report), got {slow_seconds!r}.')
        self.slow_seconds = float(slow_seconds)
        self.restarts = 0  # in all
        self.restarts_in_a_row = 0  # each within healthy_steps steps of the one before
        self._steps = self._last_failure_step = 0
        self.events: list[dict] = []
        self._on_event = on_event
        self._workers: list = [None] * len(self._ctors)
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_workers, self._workers)
        for index in range(len(self._ctors)):
            try:
                self._workers[index] = self._start(index)
            except BaseException:
                self.close()
                raise
        started = time.monotonic()
        for index, worker in enumerate(self._workers):
            answer = worker.receive(self._slow_watch(index, 'start-up', started))
            self._raise_if_failed(answer, index, 'failed to start')
        self._needs_reset = [True] * len(self._ctors)
        self.obs_space = self._ask(0, 'getattr', 'obs_space')
        self.act_space = self._ask(0, 'getattr', 'act_space')

    def __len__(self) -> int:
        return len(self._ctors)

    def _start(self, index: int) -> Any:
        ctor = self._ctors[index]
        if self._parallel == 'process':
            return _ProcessWorker(ctor, self.first_index + index, self._context)
        if self._parallel == 'thread':
            return _ThreadWorker(ctor, self.first_index + index)
        return _InlineWorker(ctor, self.first_index + index)

    def _raise_if_failed(self, answer: tuple[str, Any], index: int, what: str) -> Any:
        status, value = answer
        if status == 'ok':
            return value
        self.close()
        if status == 'died':
            raise EnvError(self.first_index + index, f'{what}: {value}')
        text, exception = value
        if exception is not None:  # raised again with its own type (an EnvCheckError stays one)
            exception.env_index, exception.worker_traceback = self.first_index + index, text
            exception.add_note(
                f'(env {self.first_index + index} {what} in its worker, envs.parallel={self._parallel}; worker '
                f'traceback:)\n{text}')
            raise exception
        raise EnvError(self.first_index + index, what, text)

    def _ask(self, index: int, method: str, *args: Any) -> Any:
        self._workers[index].submit(method, *args)
        answer = self._workers[index].receive(self._slow_watch(index, f"'{method}'"))
        return self._raise_if_failed(answer, index, f"failed in '{method}'")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError('EnvPool is closed; build a new one to step or call its envs.')

    def step(self, actions: Any) -> list[dict]:
        """One observation per env: stepped with actions[i], or reset (first observation)."""
        self._check_open()
        if len(actions) != len(self):
            raise ValueError(
                f'EnvPool.step: expected one action per env ({len(self)}), got {len(actions)} '
                f'(actions shape {np.shape(actions)}).')
        self._steps += 1
        for index, worker in enumerate(self._workers):
            if self._needs_reset[index]:
                worker.submit('reset')
            else:
                worker.submit('step', actions[index])
        observations, sent = [], time.monotonic()
        for index, worker in enumerate(self._workers):
            answer = worker.receive(self._slow_watch(index, 'step', sent))
            obs = answer[1] if answer[0] == 'ok' else self._restart(index, answer)
            self._needs_reset[index] = self._is_last(obs, index)
            observations.append(obs)
        return observations

    def _is_last(self, obs: Any, index: int) -> bool:
        try:
            return bool(obs['is_last'])
        except (KeyError, TypeError, IndexError):
            self.close()
            raise EnvError(
                self.first_index + index, f"observation without 'is_last' (got {type(obs).__name__}); EnvPool needs "
                "envs built by envs.make_env, whose last wrapper sets the episode flags.") from None

    def _restart(self, index: int, answer: tuple[str, Any]) -> dict:
        """Replaces a failed env by a fresh one and returns its first observation."""
        status, value = answer
        text = value if status == 'died' else value[0]
        if self._steps - self._last_failure_step > self.healthy_steps:
            self.restarts_in_a_row = 0  # the envs ran healthy_steps steps since the last failure
        self._last_failure_step = self._steps
        if self.restarts_in_a_row >= self.max_restarts:
            self.close()
            raise EnvGaveUp(self.first_index + index,
                            f'failed after {self.restarts_in_a_row} restarts in a row, each within '
                            f'{self.healthy_steps} steps of the one before (limit max_restarts='
                            f'{self.max_restarts}); last failure:', text)
        self.restarts += 1
        self.restarts_in_a_row += 1
        self._record({'index': index, 'kind': 'restart', 'time': time.time(),
                      'message': f'env {self.first_index + index} {"died" if status == "died" else "raised"}; '
                                 f'restarted it and dropped its episode',
                      'traceback': text})
        _close_workers([self._workers[index]])
        self._workers[index] = self._start(index)
        status, value = self._workers[index].receive(self._slow_watch(index, 'restart'))
        if status != 'ok':  # its constructor (or start-up check) fails now: restarting cannot help
            self.close()
            raise EnvRestartFailed(self.first_index + index, 'failed, and then failed to restart; last failure:',
                            value if status == 'died' else value[0])
        return self._ask(index, 'reset')

    def _slow_watch(self, index: int, what: str, since: float | None = None) -> Callable[[], None]:
        """The on_wait of a receive(): records a 'slow' event each `slow_seconds` env `index` has been
        silent since `since` (time.monotonic() when its command was sent; default now)."""
        start = time.monotonic() if since is None else since
        reported = 0  # spans of slow_seconds reported so far

        def on_wait() -> None:
            nonlocal reported
            waited = time.monotonic() - start
            if waited < self.slow_seconds * (reported + 1):
                return
            reported = int(waited // self.slow_seconds)
            self._record({'index': index, 'kind': 'slow', 'time': time.time(), 'traceback': '',
                          'message': f'env {self.first_index + index} has not answered its {what} for '
                                     f'{wait_text(waited)} (envs.parallel={self._parallel}); still waiting. '
                                     'A simulator stuck in a loop or an env waiting on a server or a lock '
                                     'does this: press Ctrl-C twice to stop at once (the run is saved)'})
        return on_wait

    def _record(self, event: dict) -> None:
        self.events.append(event)
        if self._on_event is not None:
            self._on_event(event)

    def call(self, method: str, *args: Any) -> list:
        """`getattr(env, method)(*args)` on every env, concurrently; e.g. pool.call('render')."""
        self._check_open()
        for worker in self._workers:
            worker.submit(method, *args)
        answers = [worker.receive() for worker in self._workers]
        for index, (status, value) in enumerate(answers):
            if status != 'ok':
                text = value if status == 'died' else value[0]
                raise EnvError(self.first_index + index, f"failed in call('{method}')", text)
        return [value for _, value in answers]

    def call_one(self, index: int, method: str, *args: Any) -> Any:
        """`getattr(env, method)(*args)` on env `index` only; e.g. pool.call_one(0, 'render')."""
        self._check_open()
        self._workers[index].submit(method, *args)
        status, value = self._workers[index].receive()
        if status != 'ok':
            raise EnvError(self.first_index + index, f"failed in call_one('{method}')", value if status == 'died' else value[0])
        return value

    def close(self) -> None:
        """Closes every env and stops every worker (also done at interpreter exit)."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> 'EnvPool':
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
