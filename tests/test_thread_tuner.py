"""The live CPU thread policy (sampler/thread_tuner.py): driven with made-up step costs, it moves to
the faster count, stays within the margin, backs off probes that lose, comes back after a transient
slowdown; the engine runs it only where the start-up measured, and the ids do not change."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from sampler.generate import generate
from sampler.params import SamplingParams
from sampler.scheduler import Engine, EngineConfig, Handle
from sampler.thread_tuner import ThreadTuner
from weights.checkpoint import live_thread_counts, load_checkpoint

TOKENS = 64  # query tokens of every made-up step


class Machine:
    """Step costs per thread count (seconds per query token), changeable mid-run (`sized`: costs for
    steps of a given size); records what the tuner set and every step's count and seconds."""

    def __init__(self, cost: dict, sized: dict | None = None):
        self.cost = dict(cost)
        self.sized = sized or {}
        self.set_calls = []
        self.steps = []  # (count the step ran on, seconds)

    def tuner(self, current: int, **kw) -> ThreadTuner:
        return ThreadTuner((1, 2), current, self.set_calls.append, **kw)

    def run(self, tuner: ThreadTuner, seconds: float, tokens: int = TOKENS) -> None:
        """Step until `seconds` of stepping have passed."""
        spent = 0.0
        while spent < seconds:
            n = tuner.before_step(tokens)
            assert n == tuner.applied and self.set_calls[-1] == n  # the step runs on what was set
            dt = self.sized.get(tokens, self.cost)[n] * tokens
            tuner.after_step(dt)
            assert tuner.applied == tuner.current == tuner.size(tokens).current  # between steps
            self.steps.append((n, dt))
            spent += dt


def test_switches_to_the_count_that_is_faster_by_more_than_the_margin():
    m = Machine({1: 1e-3, 2: 0.7e-3})
    t = m.tuner(1, interval_s=1.0)
    m.run(t, 0.2)
    assert t.current == 1 and t.probes == 0  # no probe before a quarter of the interval
    m.run(t, 0.6)
    assert t.current == 2 and t.switches == 1 and t.probes == 1  # the first try comes soon
    m.run(t, 0.5)
    assert t.probes == 1  # the next one after the whole interval
    m.run(t, 2.0)
    assert t.current == 2 and t.switches == 1 and t.probes >= 2  # later tries of one thread lost
    assert [n for n, _ in m.steps[-5:]] == [2] * 5


def test_stays_when_the_other_is_faster_only_within_the_margin():
    m = Machine({1: 1e-3, 2: 0.95e-3})
    t = m.tuner(1, interval_s=0.5)
    m.run(t, 30.0)
    assert t.probes >= 3 and t.switches == 0 and t.current == 1


def _probe_starts(m: Machine, other: int = 2) -> list[int]:
    """Indices of the steps where a probe first ran `other`."""
    return [i for i, (n, _) in enumerate(m.steps) if n == other and (i < 2 or m.steps[i - 2][0] != other)]


def _wasted_share(m: Machine, other: int = 2, current: int = 1) -> float:
    wasted = sum(dt - m.cost[current] * TOKENS for n, dt in m.steps if n == other)
    return wasted / sum(dt for _, dt in m.steps)


def test_losing_probes_back_off():
    m = Machine({1: 1e-3, 2: 1.3e-3})
    t = m.tuner(1, interval_s=2.0)
    m.run(t, 2000.0)
    assert t.switches == 0 and t.current == 1 and t.size(TOKENS).losses == t.probes >= 5
    gaps = [b - a for a, b in zip(_probe_starts(m), _probe_starts(m)[1:])]
    assert all(b >= a - 2 for a, b in zip(gaps, gaps[1:]))  # never shorter (a step's rounding aside)
    assert gaps[-1] >= 10 * gaps[0]  # doubling up to 2**5 times the interval
    assert 0 < _wasted_share(m) < 0.02


def test_a_collapsed_count_costs_one_step_per_probe_and_under_two_percent():
    m = Machine({1: 1e-3, 2: 15e-3})  # two threads collapse (another process holds a core)
    t = m.tuner(1, interval_s=2.0)
    m.run(t, 2000.0)
    assert t.switches == 0 and t.current == 1
    assert sum(1 for n, _ in m.steps if n == 2) == t.probes >= 5  # each probe ended after one step on 2
    s = t.size(TOKENS)
    assert t.interval(s) >= s.probe_cost / t.budget > 0
    assert 0 < _wasted_share(m) < 0.02


def test_a_win_resets_the_backoff():
    m = Machine({1: 1e-3, 2: 1.2e-3})
    t = m.tuner(1, interval_s=1.0)
    m.run(t, 60.0)
    s = t.size(TOKENS)
    assert s.losses >= 3 and t.interval(s) >= 8.0
    m.cost[2] = 0.5e-3
    for _ in range(100_000):
        m.run(t, 1e-9)  # one step
        if t.switches:
            break
    assert t.current == 2 and s.losses == 0 and t.interval(s) == 1.0


def test_returns_to_the_fast_count_after_a_transient_slowdown():
    m = Machine({1: 1e-3, 2: 0.6e-3})
    t = m.tuner(2, interval_s=1.0)
    m.run(t, 30.0)
    s = t.size(TOKENS)
    assert t.current == 2 and s.losses > 0
    m.cost[2] = 8e-3  # a load arrives: two threads collapse
    before = len(m.steps)
    m.run(t, 5.0)
    assert t.current == 1  # noticed by the slowdown, not after the backed-off interval
    assert sum(1 for n, _ in m.steps[before:] if n == 2) < 40
    m.cost[2] = 0.6e-3  # the load is gone
    m.run(t, 2 * t.interval(s) + 2.0)
    assert t.current == 2 and t.switches == 2


def test_each_step_size_keeps_its_own_count():
    """One request's small steps are faster on one thread, a full batch's large ones on two: each
    size ends on its own count, and a size seen for the first time starts from the nearest one's."""
    small, large = 48, 768
    m = Machine({1: 1e-3, 2: 1.3e-3}, sized={large: {1: 0.5e-3, 2: 0.3e-3}})
    t = m.tuner(1, interval_s=1.0)
    for _ in range(5):  # the load comes and goes
        m.run(t, 10.0, tokens=small)
        m.run(t, 10.0, tokens=large)
    assert t.size(small).current == 1 and t.size(large).current == 2 and t.switches == 1
    m.run(t, 1e-9, tokens=600)  # the same size as 768 (512-1023 query tokens)
    assert t.current == 2
    m.run(t, 1e-9, tokens=1500)  # a new size, nearest to 768's
    assert t.size(1500).current == 2 and t.size(1500).probe is None
    m.run(t, 1e-9, tokens=40)
    assert t.current == 1


def test_steps_without_tokens_teach_nothing():
    m = Machine({1: 1e-3, 2: 0.5e-3})
    t = m.tuner(1, interval_s=0.0)
    for _ in range(50):
        t.before_step(0)
        t.after_step(0.01)
    s = t.size(0)
    assert t.switches == 0 and t.probes == 0 and s.stepped == 0.0 and s.probe is None
    t.before_step(TOKENS)
    t.after_step(0.0)  # a failed step
    assert t.size(TOKENS).stepped == 0.0


def test_needs_two_counts():
    with pytest.raises(ValueError):
        ThreadTuner((2, 2), 2, lambda n: None)


# ---------------------------------------------------------------- where it runs
def test_live_counts_only_where_the_start_up_measures(monkeypatch):
    monkeypatch.delenv("LLADA_CPU_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("weights.checkpoint.available_cores", lambda: 4)

    class Small:
        num_parameters = 26_000_000
    cpu = torch.device("cpu")
    assert live_thread_counts(Small, cpu) == (1, 4)
    assert live_thread_counts(Small, cpu, override=2) == ()  # --cpu-threads: fixed
    assert live_thread_counts(Small, torch.device("cuda")) == ()

    class Large:
        num_parameters = 8_000_000_000
    assert live_thread_counts(Large, cpu) == ()
    monkeypatch.setenv("LLADA_CPU_THREADS", "2")
    assert live_thread_counts(Small, cpu) == ()
    monkeypatch.delenv("LLADA_CPU_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert live_thread_counts(Small, cpu) == ()
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("weights.checkpoint.available_cores", lambda: 1)
    assert live_thread_counts(Small, cpu) == ()


@pytest.fixture(scope="module")
def bundle(golden_dir):
    return load_checkpoint(golden_dir, device="cpu", dtype="float32")


CASES = [
    ([1, 2, 3], SamplingParams(gen_length=16, block_length=4, steps=16)),
    ([9, 8, 7, 6, 5], SamplingParams(gen_length=16, block_length=8, steps=16, cache="prefix")),
    ([20, 21, 22], SamplingParams(gen_length=16, block_length=4, steps=16, cache="dual")),
    ([4], SamplingParams(gen_length=12, block_length=4, threshold=0.3)),
    ([7, 7, 7], SamplingParams(gen_length=16, block_length=8, steps=8, temperature=0.9, seed=5)),
]


class Gauges:
    def __init__(self):
        self.threads, self.switches = [], 0

    def set_cpu_threads(self, n):
        self.threads.append(n)

    def observe_cpu_thread_switch(self):
        self.switches += 1

    def __getattr__(self, name):  # the engine's other hooks: nothing to record
        return lambda *a, **k: None


def _serve(engine: Engine, rounds: int = 3):
    """Every case `rounds` times, all at once; the ids, and the engine thread's count at each event."""
    seen = []

    def sink(q):
        def put(item):
            if engine.tuner is not None:
                seen.append((torch.get_num_threads(), engine.tuner.current))
            q.put(item)
        return put
    handles = []
    for _ in range(rounds):
        for p, sp in CASES:
            q = queue.Queue()
            h = Handle(prompt_ids=list(p), params=sp, sink=sink(q), want_steps=True)
            h.q = q
            handles.append(engine.submit([h])[0])
    ids = []
    for h in handles:
        deadline = time.monotonic() + 60
        while True:
            kind, payload = h.q.get(timeout=max(0.01, deadline - time.monotonic()))
            if kind in ("done", "error"):
                assert kind == "done", payload
                ids.append(payload.gen_ids)
                break
    return ids, seen


def test_engine_with_the_tuner_gives_the_same_ids(bundle):
    before = torch.get_num_threads()
    cfg = dict(max_batch_size=4, max_batch_tokens=512, early_stop=False)
    off = Engine(bundle.model, bundle.special, EngineConfig(**cfg))
    assert off.tuner is None  # no live counts configured (as with --cpu-threads N)
    off.start()
    try:
        ids_off, _ = _serve(off)
    finally:
        off.shutdown(grace=0)
    gauges = Gauges()
    on = Engine(bundle.model, bundle.special, EngineConfig(**cfg, cpu_threads_live=(1, 2), cpu_threads_probe_s=0.0),
                metrics=gauges)
    t = on.tuner
    assert t is not None and t.current == before
    t.budget, t.abort_ratio, t.margin = 1e9, 1e9, float("-inf")  # probe all the time; every probe wins
    on.start()
    try:
        ids_on, seen = _serve(on)
    finally:
        on.shutdown(grace=0)
    assert t.switches >= 2 and t.probes >= 2  # both counts ran steps
    assert gauges.switches == t.switches and gauges.threads[0] == before and gauges.threads[-1] == t.current
    assert ids_on == ids_off
    assert ids_off[:len(CASES)] == [generate(bundle, [p], sp)[0].gen_ids for p, sp in CASES]
    assert seen and all(now == cur for now, cur in seen)  # between steps the engine thread runs the current count
    assert torch.get_num_threads() == before


def test_the_server_tunes_only_what_it_measured(bundle, monkeypatch):
    """`llada-serve` hands the engine live counts with the default --cpu-threads 0, none with
    --cpu-threads N or under tensor parallelism."""
    from server import cli

    monkeypatch.delenv("LLADA_CPU_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("weights.checkpoint.available_cores", lambda: 2)
    args = cli.build_parser().parse_args(["--device", "cpu", "--cpu-threads", "0"])
    assert cli._live_threads(args, bundle, None) == (1, 2)
    assert cli._live_threads(args, bundle, ranks=object()) == ()
    args = cli.build_parser().parse_args(["--device", "cpu", "--cpu-threads", "2"])
    assert cli._live_threads(args, bundle, None) == ()
