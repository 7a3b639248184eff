"""dreamer.evaluate on a pool of scripted envs: which episodes count, the video of env 0's first
episode, and the ways an evaluation ends early (a stop request, an episode that never ends, a frame
that cannot be shown, a non-finite observation)."""
import functools

import gymnasium
import numpy as np
import pytest

import dreamer
from envs import EnvCheckError, wrappers
from envs.parallel import EnvPool


class Ticker:
    """vector = [t]; reward 1 per step, so an episode's return is its length; ends (terminated) after
    `length` steps. render() shows t in every pixel, as a (size, size, 3) frame from step `grow_at` on
    (4 x 4 before it), or raises from step `render_fails_at` on. `nan_at`: the vector is NaN there."""

    obs_space = {'vector': gymnasium.spaces.Box(0, 1000, (1,), np.float32)}
    act_space = gymnasium.spaces.Box(-1, 1, (1,), np.float32)

    def __init__(self, length, grow_at=None, render_fails_at=None, nan_at=None, score=None, channels=None):
        self.length, self.grow_at, self.render_fails_at, self.nan_at, self.score = (
            length, grow_at, render_fails_at, nan_at, score)
        self.channels = channels  # set: no frame from render(), an 'image' observation of these channels
        if channels:
            self.obs_space = {**Ticker.obs_space, 'image': gymnasium.spaces.Box(0, 255, (4, 4, channels), np.uint8)}
        self.t = 0
        self.renders = 0

    def reset(self):
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), 1.0, self.t >= self.length, False, {}

    def _obs(self):
        obs = {'vector': np.array([np.nan if self.t == self.nan_at else self.t], np.float32)}
        if self.score is not None:
            obs['log_score'] = np.float32(self.score * self.t)
        if self.channels:
            obs['image'] = np.full((4, 4, self.channels), self.t, np.uint8)
        return obs

    def render(self):
        self.renders += 1
        if self.channels:
            return None
        if self.render_fails_at is not None and self.t >= self.render_fails_at:
            raise RuntimeError('the display went away')
        size = 8 if self.grow_at is not None and self.t >= self.grow_at else 4
        return np.full((size, size, 3), self.t, np.uint8)


def ticker_env(**kwargs):
    return wrappers.Flags(Ticker(**kwargs))


class StillAgent:
    """The two calls evaluate makes of an agent; records each policy call's mode and state."""

    def __init__(self):
        self.calls = []

    def random_actions(self, amount):
        return np.zeros((amount, 1), np.float32)

    def policy(self, obs, state, mode):
        self.calls.append((mode, state))
        return np.zeros((len(obs['vector']), 1), np.float32), (state or 0) + 1


def evaluate(lengths, episodes, video_length=100, first_index=0, **kwargs):
    """evaluate() on a pool of tickers of `lengths` (env options per env in kwargs 'envs'), with the
    warnings it gave."""
    options = kwargs.pop('envs', [{}] * len(lengths))
    ctors = [functools.partial(ticker_env, length=length, **extra) for length, extra in zip(lengths, options)]
    warnings, agent = [], StillAgent()
    with EnvPool(ctors, 'none', first_index=first_index) as pool:
        result = dreamer.evaluate(agent, pool, episodes, video_length, warnings.append, **kwargs)
        tickers = [worker._env.env for worker in pool._workers]
    return result, warnings, agent, tickers


def frame_values(result):
    return [int(frame[0, 0, 0]) for frame in result.frames]


def test_episodes_are_counted_as_they_end_and_those_ending_together_all_count():
    result, warnings, agent, _ = evaluate([3, 5], episodes=2)
    assert result.returns == [3.0, 5.0] and result.lengths == [3, 5]  # env 0 at pool step 4, env 1 at 6
    assert result.completed and not result.abandoned and not warnings
    result, _, agent, _ = evaluate([3, 3], episodes=3)
    assert result.returns == [3.0] * 4 and result.lengths == [3] * 4  # two rounds of two
    assert [mode for mode, _ in agent.calls] == ['eval'] * 8
    assert [state for _, state in agent.calls] == [None] + list(range(1, 8))  # the state carried along


def test_the_video_is_env_0s_first_episode_with_its_last_frame():
    result, _, _, tickers = evaluate([3, 6], episodes=2)
    assert frame_values(result) == [0, 1, 2, 3]  # reset to the terminal step, nothing of episode 2
    assert all(frame.shape == (4, 4, 3) and frame.dtype == np.uint8 for frame in result.frames)
    assert tickers[0].renders == 4 and tickers[1].renders == 0
    result, _, _, _ = evaluate([5, 2], episodes=3)  # env 1's episodes end first: the video goes on
    assert frame_values(result) == [0, 1, 2, 3, 4, 5]
    result, _, _, _ = evaluate([3, 6], episodes=2, video_length=2)
    assert frame_values(result) == [0, 1]
    result, _, _, tickers = evaluate([3, 6], episodes=2, video=False)
    assert result.frames == [] and tickers[0].renders == 0


def test_a_render_that_fails_costs_the_video_not_the_evaluation():
    result, warnings, _, tickers = evaluate([4], episodes=2, envs=[{'render_fails_at': 2}])
    assert result.returns == [4.0, 4.0] and result.completed
    assert frame_values(result) == [0, 1] and not result.render_ok
    assert len(warnings) == 1 and warnings[0].startswith("no eval videos from now on: env 0's render() failed "
                                                         "(RuntimeError: the display went away)")
    assert tickers[0].renders == 3  # not asked again after it failed


def test_a_frame_of_another_size_ends_the_video_there():
    result, warnings, _, tickers = evaluate([5], episodes=1, envs=[{'grow_at': 2}])
    assert frame_values(result) == [0, 1] and result.render_ok and result.returns == [5.0]
    assert len(warnings) == 1 and "changed its frame size from (4, 4, 3) to (8, 8, 3)" in warnings[0]
    assert tickers[0].renders == 3


def test_a_stop_request_cuts_the_evaluation_short():
    asked = []

    def stop():
        asked.append(1)
        return len(asked) > 5  # after five pool steps

    result, _, agent, _ = evaluate([3, 100], episodes=4, stop=stop)
    assert not result.completed and result.returns == [3.0] and len(agent.calls) == 5


def test_an_episode_at_the_length_cap_abandons_the_evaluation():
    """The cap is on the longest running episode: env 0 ends every 3 steps and does not count."""
    result, _, agent, _ = evaluate([3, 1000], episodes=5, max_length=7)
    assert result.abandoned == 7 and result.returns == [3.0, 3.0] and len(agent.calls) == 8
    result, _, _, _ = evaluate([3, 7], episodes=4, max_length=7)  # env 1 ends at the cap: no abandoning
    assert not result.abandoned and result.returns == [3.0, 3.0, 7.0, 3.0]


def test_a_non_finite_observation_stops_with_the_eval_envs_global_index():
    with pytest.raises(EnvCheckError, match=r"^eval env 3: observation 'vector' contains NaN at 1 of 1 entries"):
        evaluate([5, 5], episodes=2, first_index=2, envs=[{}, {'nan_at': 2}])


def test_each_episode_keeps_its_log_values():
    result, _, _, _ = evaluate([2, 4], episodes=2, envs=[{'score': 1.0}, {}])
    assert result.logs == [{'score': 2.0}, {}]  # the highest the episode reached; env 1 logs nothing


@pytest.mark.parametrize('channels', [1, 3])
def test_without_a_frame_from_render_the_video_is_the_image_observation(channels):
    result, warnings, _, _ = evaluate([3], episodes=1, envs=[{'channels': channels}])
    assert frame_values(result) == [0, 1, 2, 3] and not warnings and result.render_ok
    assert all(frame.shape == (4, 4, 3) and (frame == frame[0, 0, 0]).all() for frame in result.frames)


def test_an_env_log_value_is_averaged_over_the_episodes_that_logged_it():
    """eval/<key> is the mean over the episodes with that log_ key (an env may log it only at some
    episodes' ends), not over all episodes with a zero for the others."""
    from types import SimpleNamespace

    logged = {}
    logger = SimpleNamespace(scalars=logged.update, info=None, video=None)
    dreamer.log_eval(SimpleNamespace(eval_only=False), [1.0, 2.0, 3.0], [5, 5, 5],
                     [{'success': 1.0}, {}, {'success': 0.5, 'height': 2.0}], [], logger)
    assert logged == {'eval/return': 2.0, 'eval/length': 5.0, 'eval/episodes': 3.0, 'eval/success': 0.75,
                      'eval/height': 2.0}


def test_a_long_evaluation_notes_its_progress_once_per_interval(monkeypatch):
    """A clock that moves 100 s per pool step, notes every 300 s: at the 3rd, 6th and 9th step."""
    from types import SimpleNamespace

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(dreamer, 'time', SimpleNamespace(time=lambda: clock.now))

    class SlowAgent(StillAgent):
        def policy(self, obs, state, mode):
            clock.now += 100.0
            return super().policy(obs, state, mode)

    notes = []
    with EnvPool([functools.partial(ticker_env, length=10)], 'none') as pool:
        result = dreamer.evaluate(SlowAgent(), pool, 1, 0, print, video=False, note=notes.append)
    assert result.returns == [10.0]
    assert notes == [f'0 of 1 episode done, one running for {steps} agent steps' for steps in (2, 5, 8)]


@pytest.mark.parametrize('rank', [0, 1])
def test_each_rank_evaluates_its_share_and_only_rank_0_records_the_video(tmp_path, monkeypatch, capsys, rank):
    """Rank 1 of 2 (its collectives stood in for: one process here) evaluates its share of the
    episodes on as many of its own eval envs as it needs, without rendering, and says on stderr when its evaluation runs long
    (it writes no log); rank 0 records the video."""
    import config as config_lib

    monkeypatch.setattr(dreamer.Trainer, '_reduce_over_ranks', lambda self, value, op: value)
    monkeypatch.setattr(dreamer.Trainer, 'gather_eval', lambda self, result: result)
    calls = []
    real_evaluate = dreamer.evaluate

    def recording_evaluate(agent, pool, episodes, video_length, warn, video, stop, max_length, note):
        calls.append({'episodes': episodes, 'envs': len(pool), 'video': video, 'first_index': pool.first_index})
        note('1 of 2 episodes done, one running for 900 agent steps')
        return real_evaluate(agent, pool, episodes, video_length, warn, video, stop, max_length, note)

    monkeypatch.setattr(dreamer, 'evaluate', recording_evaluate)
    config = config_lib.load_config(['--configs', 'debug', '--task', 'custom_reach', '--logdir', str(tmp_path),
                                     '--eval_episode_num', '3', '--envs.amount', '2', '--envs.parallel', 'none',
                                     '--device', 'cpu'])
    trainer = dreamer.Trainer(config, dreamer.Dist(rank, 2))
    try:
        trainer.setup()
        trainer.run_eval()
    finally:
        trainer.close()
    # 3 episodes: 2 on rank 0's two eval envs, 1 on one env of rank 1 (its envs are 2 and 3)
    assert calls == [{'episodes': 2 - rank, 'envs': 2 - rank, 'video': rank == 0, 'first_index': 2 * rank}]
    said = (f'evaluation at step 0 still running on rank {rank}: 1 of 2 episodes done, one running for 900 '
            'agent steps')
    if rank == 1:  # no log of its own: on stderr, as a warning
        assert f'WARNING {said}' in capsys.readouterr().err
    else:  # rank 0 writes train.log
        assert f'INFO {said}' in (tmp_path / 'train.log').read_text()
