"""EnvPool: same transitions in every parallel mode, resets on is_last, crash reports and restarts,
start-up failures, and clean shutdown."""
import functools
import multiprocessing
import os
import re
import subprocess
import sys
import textwrap
import time

import gymnasium
import numpy as np
import pytest

import config as config_module
import envs
from envs import wrappers
from envs.parallel import EnvError, EnvPool

MODES = ['none', 'thread', 'process']


def reach_ctors(amount=2, seed=0):
    config = config_module.load_config(['--task', 'custom_reach', '--seed', str(seed)])
    return [functools.partial(envs.make_env, config, 'train', i) for i in range(amount)]


def run(pool, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [pool.step(rng.uniform(-1, 1, (len(pool), 2)).astype(np.float32)) for _ in range(steps)]


class Counter:
    """Protocol env: vector = [step], ends (terminated) after `length` steps; may crash in step."""

    def __init__(self, length=4, crash_at=None, how='raise'):
        self.length, self.crash_at, self.how, self.t = length, crash_at, how, 0

    obs_space = {'vector': gymnasium.spaces.Box(0, 100, (1,), np.float32)}
    act_space = gymnasium.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self):
        self.t = 0
        return {'vector': np.zeros(1, np.float32)}, {}

    def step(self, action):
        self.t += 1
        if self.t == self.crash_at:
            if self.how == 'exit':
                os._exit(3)
            if self.how == 'hang':
                time.sleep(2.0)  # a stuck simulator that comes back
                return {'vector': np.array([self.t], np.float32)}, 1.0, False, False, {}
            raise RuntimeError(f'deliberate crash at step {self.t}')
        return {'vector': np.array([self.t], np.float32)}, 1.0, self.t >= self.length, False, {}


def counter_env(crash_at=None, how='raise', length=4):
    return wrappers.Flags(Counter(length, crash_at, how))


def failing_ctor():
    raise ValueError('cannot build this env: the level file is missing')


@pytest.mark.parametrize('parallel', ['thread', 'process'])
def test_parallel_modes_give_the_same_transitions_as_none(parallel):
    with EnvPool(reach_ctors(), 'none') as pool:
        expected = run(pool, 60)  # 50 agent steps per episode: crosses a reset
    with EnvPool(reach_ctors(), parallel) as pool:
        assert pool.obs_space['image'].shape == (64, 64, 3)
        assert pool.act_space == gymnasium.spaces.Box(-1, 1, (2,), np.float32)
        assert len(pool) == 2
        got = run(pool, 60)
    for step_expected, step_got in zip(expected, got):
        for obs_expected, obs_got in zip(step_expected, step_got):
            assert obs_expected.keys() == obs_got.keys()
            for key in obs_expected:
                np.testing.assert_array_equal(obs_expected[key], obs_got[key], err_msg=key)
    assert not np.array_equal(got[5][0]['vector'], got[5][1]['vector'])  # different seeds per env


@pytest.mark.parametrize('parallel', MODES)
def test_reset_on_first_step_and_after_is_last(parallel):
    with EnvPool([functools.partial(counter_env, length=3)], parallel) as pool:
        observations = [pool.step(np.full((1, 1), 0.5))[0] for _ in range(9)]
    assert [float(o['vector'][0]) for o in observations] == [0, 1, 2, 3] * 2 + [0]
    assert [o['is_first'] for o in observations] == [True, False, False, False] * 2 + [True]
    assert [o['is_terminal'] for o in observations] == [False, False, False, True] * 2 + [False]
    assert [float(o['reward']) for o in observations] == [0, 1, 1, 1] * 2 + [0]


@pytest.mark.parametrize('parallel, how', [('none', 'raise'), ('thread', 'raise'),
                                           ('process', 'raise'), ('process', 'exit')])
def test_crashing_env_is_reported_with_index_and_restarted(parallel, how):
    events = []
    ctors = [functools.partial(counter_env, length=10),
             functools.partial(counter_env, crash_at=2, how=how, length=10)]
    with EnvPool(ctors, parallel, max_restarts=3, on_event=events.append) as pool:
        steps = [pool.step(np.zeros((2, 1))) for _ in range(4)]
    # pool steps: reset, step 1, step 2 (env 1 crashes -> restarted, first obs), step 1
    assert [float(s[1]['vector'][0]) for s in steps] == [0, 1, 0, 1]
    assert [s[1]['is_first'] for s in steps] == [True, False, True, False]
    assert [float(s[0]['vector'][0]) for s in steps] == [0, 1, 2, 3]  # env 0 unaffected
    assert pool.events == events and len(events) == 1 and pool.restarts == 1
    assert events[0]['index'] == 1 and events[0]['kind'] == 'restart'
    if how == 'raise':
        assert 'RuntimeError: deliberate crash at step 2' in events[0]['traceback']
        assert 'in step' in events[0]['traceback']  # the env's own frame
    else:
        assert 'exit code 3' in events[0]['traceback']


@pytest.mark.parametrize('parallel', ['thread', 'process'])
def test_an_env_that_does_not_answer_is_named_while_the_pool_waits(parallel):
    """Env 1 hangs 2 s in its 2nd step: with slow_seconds 0.6 the pool reports it (kind 'slow', its
    index, how long) once per 0.6 s of silence, keeps waiting, and takes its answer: no restart."""
    events = []
    ctors = [functools.partial(counter_env, length=10),
             functools.partial(counter_env, crash_at=2, how='hang', length=10)]
    with EnvPool(ctors, parallel, on_event=events.append) as pool:
        pool.slow_seconds = 0.6  # after the start-up, which a loaded machine may make slow
        steps, seconds = [], []
        for _ in range(4):
            start = time.monotonic()
            steps.append(pool.step(np.zeros((2, 1))))
            seconds.append(time.monotonic() - start)
    assert [float(s[1]['vector'][0]) for s in steps] == [0, 1, 2, 3] and pool.restarts == 0
    hung = [event for event in events if event['index'] == 1]
    assert 1 <= len(hung) <= seconds[2] // 0.6, (events, seconds)  # 2 s of silence, seen at 0.5 s polls
    for event in hung:
        assert event['kind'] == 'slow', event
        assert re.fullmatch(rf"env 1 has not answered its step for \d s \(envs\.parallel={parallel}\); "
                            r"still waiting\. .*press Ctrl-C twice to stop at once \(the run is saved\)",
                            event['message']), event


def test_a_slow_env_is_timed_from_when_its_command_was_sent():
    """step() collects the answers in turn: env 1's silence counts from the send, not from when the
    pool got to it (after env 0's answer), so its first poll past slow_seconds already reports."""
    events = []
    with EnvPool([counter_env, counter_env], 'none', on_event=events.append, slow_seconds=0.6) as pool:
        sent_a_second_ago = time.monotonic() - 1.0
        pool._slow_watch(1, 'step', sent_a_second_ago)()  # the first poll
        pool._slow_watch(1, 'step')()  # timed from now: not yet slow
    assert len(events) == 1 and events[0]['message'].startswith('env 1 has not answered its step for 1 s '), events


def slow_to_build_env():
    time.sleep(1.5)  # a constructor waiting on a server
    return counter_env()


def test_an_env_slow_to_start_is_named_too():
    events = []
    with EnvPool([counter_env, slow_to_build_env], 'process', on_event=events.append, slow_seconds=0.6) as pool:
        assert float(pool.step(np.zeros((2, 1)))[1]['vector'][0]) == 0
    started = [event for event in events if event['index'] == 1]
    assert started and all(event['kind'] == 'slow' for event in started), events
    assert started[0]['message'].startswith('env 1 has not answered its start-up for '), events


def test_the_slow_env_limit_must_be_positive():
    with pytest.raises(ValueError, match=r'slow_seconds must be > 0 \(math\.inf: never report\), got 0'):
        EnvPool([counter_env], 'none', slow_seconds=0)
    assert envs.parallel.wait_text(45.4) == '45 s' and envs.parallel.wait_text(312) == '5.2 min'


@pytest.mark.parametrize('parallel', ['none', 'process'])
def test_restart_limit_raises_with_index_and_traceback(parallel):
    ctors = [functools.partial(counter_env, crash_at=1)]
    with EnvPool(ctors, parallel, max_restarts=1) as pool:
        pool.step(np.zeros((1, 1)))  # reset
        pool.step(np.zeros((1, 1)))  # crash 1 -> restart
        with pytest.raises(EnvError, match=(
                r"(?s)env 0: failed after 1 restarts in a row, each within 1000 steps of the one before "
                r"\(limit max_restarts=1\).*Traceback in the worker "
                r"of env 0.*RuntimeError: deliberate crash at step 1")) as info:
            pool.step(np.zeros((1, 1)))
    assert info.value.index == 0


def test_failures_far_apart_are_restarted_every_time_and_a_run_of_them_gives_up():
    """An env that crashes at its 3rd step of every episode: 3 pool steps apart. With healthy_steps 2
    the count clears before each failure (restarted forever); with healthy_steps 3 they are in a row,
    and the third failure after max_restarts=2 restarts gives up with EnvGaveUp."""
    from envs.parallel import EnvGaveUp

    with EnvPool([functools.partial(counter_env, crash_at=3)], 'none', max_restarts=2, healthy_steps=2) as pool:
        for _ in range(40):
            pool.step(np.zeros((1, 1)))
        assert pool.restarts == 13 and pool.restarts_in_a_row == 1  # pool steps 4, 7, ..., 40
    with EnvPool([functools.partial(counter_env, crash_at=3)], 'none', max_restarts=2, healthy_steps=3) as pool:
        with pytest.raises(EnvGaveUp, match=r"^env 0: failed after 2 restarts in a row, each within 3 steps"):
            for _ in range(40):
                pool.step(np.zeros((1, 1)))
        assert pool.restarts == 2


def test_a_pool_of_a_later_rank_names_its_envs_by_their_global_index():
    """Rank 1 of a --parallel run holds envs 2 and 3 (first_index 2): a failure there names env 3,
    the index make_env and the seeds use, not its place in this rank's pool."""
    ctors = [counter_env, functools.partial(counter_env, crash_at=1)]
    events = []
    with EnvPool(ctors, 'none', max_restarts=1, on_event=events.append, first_index=2) as pool:
        pool.step(np.zeros((2, 1)))  # reset
        pool.step(np.zeros((2, 1)))  # env 3 crashes -> restart
        with pytest.raises(EnvError, match=r"(?s)^env 3: failed after 1 restarts.*worker of env 3") as info:
            pool.step(np.zeros((2, 1)))
    assert info.value.index == 3
    assert events[0]['message'].startswith('env 3 raised')


@pytest.mark.parametrize('parallel', MODES)
def test_constructor_failure_names_the_env_and_keeps_its_traceback(parallel):
    ctors = [counter_env, failing_ctor]
    with pytest.raises(ValueError, match=r'cannot build this env') as info:
        EnvPool(ctors, parallel)
    note = '\n'.join(info.value.__notes__)
    assert f'env 1 failed to start in its worker, envs.parallel={parallel}' in note
    assert 'in failing_ctor' in note


def test_start_up_check_error_keeps_its_type_from_a_process():
    config = config_module.load_config(['--configs', 'custom'])  # task custom_task_name
    ctors = [functools.partial(envs.make_env, config, 'train', 0)]
    with pytest.raises(envs.EnvCheckError, match=r"'custom_task_name' is the guide's placeholder"):
        EnvPool(ctors, 'process')


@pytest.mark.parametrize('parallel', MODES)
def test_call_render_and_errors(parallel):
    with EnvPool(reach_ctors(), parallel) as pool:
        frames = pool.call('render')
        assert [f.shape for f in frames] == [(64, 64, 3)] * 2
        np.testing.assert_array_equal(pool.call_one(1, 'render'), frames[1])
        with pytest.raises(EnvError, match=r"env 1: failed in call_one\('no_such_method'\)"):
            pool.call_one(1, 'no_such_method')
        with pytest.raises(EnvError, match=r"env 0: failed in call\('no_such_method'\)"):
            pool.call('no_such_method')
        run(pool, 2)  # still usable afterwards
    with EnvPool([counter_env], parallel) as pool:
        assert pool.call('render') == [None]  # an env without render()


def test_unpicklable_constructor_in_process_mode():
    with pytest.raises(TypeError, match=r"env 0: envs.parallel=process .* does not pickle"):
        EnvPool([lambda: counter_env()], 'process')


def test_make_pool_reads_amount_and_parallel_from_the_config():
    config = config_module.load_config(['--task', 'custom_catch', '--envs.amount', '3',
                                        '--envs.parallel', 'thread'])
    with envs.make_pool(config, 'eval') as pool:
        assert len(pool) == 3 and pool.act_space == gymnasium.spaces.Discrete(3)
        first = pool.step(np.eye(3, dtype=np.float32))
    assert all(obs['is_first'] for obs in first)
    with envs.make_pool(config, 'train', amount=1, parallel='none') as pool:
        assert len(pool) == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"envs.parallel must be one of process, thread, none, got 'fork'"):
        EnvPool(reach_ctors(1), 'fork')
    with EnvPool(reach_ctors(2), 'none') as pool:
        with pytest.raises(ValueError, match=r'expected one action per env \(2\), got 3'):
            pool.step(np.zeros((3, 2)))


def test_env_without_flags_is_rejected():
    with EnvPool([Counter], 'none') as pool:
        with pytest.raises(EnvError, match=r"env 0: observation without 'is_last'.*envs.make_env"):
            pool.step(np.zeros((1, 1)))


def test_close_stops_every_worker_process():
    pool = EnvPool(reach_ctors(2), 'process')
    processes = [worker._process for worker in pool._workers]
    assert all(p.is_alive() for p in processes)
    pool.close()
    assert not any(p.is_alive() for p in processes)
    assert all(p.exitcode == 0 for p in processes)  # closed, not terminated
    pool.close()  # idempotent
    with pytest.raises(RuntimeError, match='EnvPool is closed'):
        pool.step(np.zeros((2, 2)))
    assert not [p for p in multiprocessing.active_children() if p in processes]


def test_workers_end_at_interpreter_exit_without_close(tmp_path):
    script = tmp_path / 'leave_open.py'
    script.write_text(textwrap.dedent('''
        import functools, sys
        sys.path.insert(0, sys.argv[1])
        import config, envs
        from envs.parallel import EnvPool

        if __name__ == '__main__':
            cfg = config.load_config(['--task', 'custom_reach'])
            pool = EnvPool([functools.partial(envs.make_env, cfg, 'train', i) for i in range(2)],
                           'process')
            pool.step([[0, 0], [0, 0]])
            print(' '.join(str(w._process.pid) for w in pool._workers), flush=True)
    '''))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, str(script), root], capture_output=True, text=True,
                            timeout=60, check=True)
    for pid in map(int, result.stdout.split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


class Talker(Counter):
    """Counter with methods for call(): ping() answers, make_lock() returns what does not pickle, and
    close() records itself in `closed` (a list shared with the test in thread and inline modes)."""

    def __init__(self, closed=None):
        super().__init__(length=10)
        self.closed = closed

    def ping(self):
        return 'pong'

    def make_lock(self):
        import threading
        return threading.Lock()

    def close(self):
        if self.closed is not None:
            self.closed.append(id(self))


def talker_env(closed=None):
    return wrappers.Flags(Talker(closed))


class NeedsTwoArguments(Exception):
    """Pickles, but unpickling calls NeedsTwoArguments(message) and fails: it can travel only as text."""

    def __init__(self, level, reason):
        super().__init__(f'level {level}: {reason}')


def ctor_raising_an_exception_that_does_not_unpickle():
    raise NeedsTwoArguments(3, 'the map file is missing')


@pytest.mark.parametrize('parallel', MODES)
def test_call_reports_a_failure_of_any_env_not_only_the_first(parallel):
    with EnvPool([talker_env, counter_env], parallel) as pool:
        assert pool.call_one(0, 'ping') == 'pong'
        with pytest.raises(EnvError, match=r"^env 1: failed in call\('ping'\).*(?s:.*)AttributeError"):
            pool.call('ping')


def test_an_answer_that_does_not_pickle_is_an_error_and_the_worker_lives_on():
    with EnvPool([talker_env], 'process') as pool:
        with pytest.raises(EnvError, match=r"(?s)^env 0: failed in call_one\('make_lock'\).*pickle"):
            pool.call_one(0, 'make_lock')
        assert pool.call_one(0, 'ping') == 'pong'  # the same worker, not a restarted one
        assert pool.restarts == 0 and pool._workers[0]._process.is_alive()


def test_an_exception_that_does_not_unpickle_reaches_the_parent_as_text():
    with pytest.raises(EnvError, match=r"(?s)^env 1: failed to start.*Traceback in the worker of env 1.*"
                                       r"NeedsTwoArguments: level 3: the map file is missing"):
        EnvPool([counter_env, ctor_raising_an_exception_that_does_not_unpickle], 'process')


def test_a_worker_process_ignores_ctrl_c_which_the_parent_handles():
    """Ctrl-C in a terminal reaches every process of the group; the workers must live on so that the
    parent can finish its step and save (it closes the pool itself)."""
    import signal
    import time

    with EnvPool([talker_env], 'process') as pool:
        pool.step(np.zeros((1, 1)))
        process = pool._workers[0]._process
        os.kill(process.pid, signal.SIGINT)
        time.sleep(0.5)
        assert process.is_alive()
        assert float(pool.step(np.zeros((1, 1)))[0]['vector'][0]) == 1.0 and pool.restarts == 0


def test_a_start_up_error_of_a_later_rank_carries_the_global_env_index():
    """dreamer.py reads env_index and worker_traceback off an exception re-raised with its own type."""
    with pytest.raises(ValueError, match=r'cannot build this env') as info:
        EnvPool([counter_env, failing_ctor], 'process', first_index=2)
    assert info.value.env_index == 3 and 'in failing_ctor' in info.value.worker_traceback
    assert 'env 3 failed to start in its worker' in '\n'.join(info.value.__notes__)


def test_a_restart_closes_the_failed_worker_process():
    ctors = [functools.partial(counter_env, crash_at=2, length=10)]
    with EnvPool(ctors, 'process', max_restarts=3) as pool:
        pool.step(np.zeros((1, 1)))
        failed = pool._workers[0]._process
        pool.step(np.zeros((1, 1)))
        pool.step(np.zeros((1, 1)))  # crash -> restart
        assert pool.restarts == 1 and pool._workers[0]._process is not failed
        assert not failed.is_alive() and failed.exitcode == 0  # told to close, not left running


@pytest.mark.parametrize('parallel', ['none', 'thread'])
def test_close_closes_each_env_in_its_worker(parallel):
    closed = []
    pool = EnvPool([functools.partial(talker_env, closed)] * 2, parallel)
    pool.step(np.zeros((2, 1)))
    pool.close()
    assert len(closed) == 2 and len(set(closed)) == 2
    if parallel == 'thread':
        assert not any(worker._thread.is_alive() for worker in pool._workers)
