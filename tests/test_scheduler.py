"""The engine thread without HTTP: continuous batching, limits, cancellation, failures, drain."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from sampler.generate import cut_answer, generate
from sampler.params import SamplingParams
from sampler.scheduler import Engine, EngineConfig, EngineError, EngineStopped, Handle, QueueFull, RequestTooLarge
from sampler.scheduler import InternalError, RequestTimeout
from weights.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def bundle(golden_dir):
    return load_checkpoint(golden_dir, device="cpu", dtype="float32")


class Recorder:
    def __init__(self):
        self.batch_sizes = []
        self.failures = 0
        self.first_blocks = 0
        self.forwards = []  # (steps advanced, draft rows) per request per forward

    def observe_request_forward(self, steps, draft_rows):
        self.forwards.append((steps, draft_rows))

    def observe_step(self, n, dt):
        self.batch_sizes.append(n)

    def observe_step_failure(self, n):
        self.failures += 1

    def observe_first_block(self, s):
        self.first_blocks += 1

    def observe_finished(self, tpf):
        pass

    def set_load(self, waiting, running):
        pass


class Slow:
    def __init__(self, model, delay=0.0, poison=None):
        self.inner, self.delay, self.poison = model, delay, poison
        self.config, self.device, self.dtype = model.config, model.device, model.dtype

    def __call__(self, ids, *a, **k):
        if self.poison is not None and bool((ids == self.poison).any()):
            raise RuntimeError("boom")
        if self.delay:
            time.sleep(self.delay)
        return self.inner(ids, *a, **k)


def handle(prompt, params, **kw):
    q = queue.Queue()
    h = Handle(prompt_ids=list(prompt), params=params, sink=q.put, **kw)
    h.q = q
    return h


def result(h, timeout=60.0):
    """The handle's final ('done', Result) or ('error', EngineError), skipping other items."""
    deadline = time.monotonic() + timeout
    while True:
        kind, payload = h.q.get(timeout=max(0.01, deadline - time.monotonic()))
        if kind in ("done", "error"):
            return kind, payload


@pytest.fixture
def engine_factory(bundle):
    engines = []

    def make(model=None, **cfg):
        rec = Recorder()
        e = Engine(model or bundle.model, bundle.special, EngineConfig(**cfg), metrics=rec).start()
        e.rec = rec
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.shutdown(grace=0)


CASES = [
    ([1, 2, 3], SamplingParams(gen_length=8, block_length=4, steps=8)),
    ([9, 8, 7, 6, 5], SamplingParams(gen_length=16, block_length=8, steps=8, cache="prefix")),
    ([4], SamplingParams(gen_length=12, block_length=4, threshold=0.3)),
    ([11, 12], SamplingParams(gen_length=8, block_length=8, steps=8, cfg_scale=1.0)),
    ([20, 21, 22], SamplingParams(gen_length=16, block_length=4, steps=16, cache="dual")),
    ([7, 7, 7], SamplingParams(gen_length=8, block_length=8, steps=4, temperature=0.9, seed=5)),
]


@pytest.mark.parametrize("pipelined", [False, True], ids=["events-at-once", "events-one-step-late"])
def test_staggered_submissions_equal_the_sampler(engine_factory, bundle, pipelined):
    """Also with events read one step late (what the engine does on CUDA: the host handles step n
    while step n+1 runs): the same answers."""
    eng = engine_factory(max_batch_size=4, max_batch_tokens=256, early_stop=False, pipelined=pipelined)
    handles = []
    for i, (p, sp) in enumerate(CASES):
        handles.append(eng.submit([handle(p, sp)])[0])
        time.sleep(0.003 * i)  # join the running batch at different points of its schedule
    for h, (p, sp) in zip(handles, CASES):
        kind, res = result(h)
        assert kind == "done", res
        assert res.gen_ids == generate(bundle, [p], sp)[0].gen_ids
        assert not res.early
    assert max(eng.rec.batch_sizes) <= 4
    assert eng.rec.first_blocks == len(CASES)


def test_batch_size_and_token_limits_are_respected(engine_factory):
    eng = engine_factory(max_batch_size=2, max_batch_tokens=64)
    hs = eng.submit([handle([1, 2, 3, 4], SamplingParams(gen_length=16, block_length=16)) for _ in range(6)])
    assert all(result(h)[0] == "done" for h in hs)
    assert max(eng.rec.batch_sizes) == 2
    # 64 canvas tokens hold three 20-token requests, not four.
    eng2 = engine_factory(max_batch_size=8, max_batch_tokens=64)
    hs = eng2.submit([handle([1, 2, 3, 4], SamplingParams(gen_length=16, block_length=16)) for _ in range(6)])
    assert all(result(h)[0] == "done" for h in hs)
    assert max(eng2.rec.batch_sizes) == 3
    with pytest.raises(EngineError) as e:
        eng2.submit([handle([1] * 60, SamplingParams(gen_length=16, block_length=16))])
    assert isinstance(e.value, RequestTooLarge) and "max_batch_tokens" in e.value.message


def test_first_come_first_served(engine_factory, bundle):
    eng = engine_factory(model=Slow(bundle.model, delay=0.005), max_batch_size=1)
    order = []
    hs = []
    for i in range(4):
        h = handle([1 + i], SamplingParams(gen_length=4, block_length=4))
        h.sink = (lambda q, i: (lambda item: (order.append(i) if item[0] == "done" else None, q.put(item))))(h.q, i)
        hs.append(h)
        eng.submit([h])
    for h in hs:
        result(h)
    assert order == [0, 1, 2, 3]


def test_queue_limit(engine_factory, bundle):
    eng = engine_factory(model=Slow(bundle.model, delay=0.02), max_batch_size=1, max_queue=2)
    sp = SamplingParams(gen_length=16, block_length=16)
    first = eng.submit([handle([1], sp)])
    time.sleep(0.1)
    queued = eng.submit([handle([2], sp), handle([3], sp)])
    with pytest.raises(QueueFull) as e:
        eng.submit([handle([4], sp)])
    assert e.value.code == "queue_full" and e.value.retry_after > 0
    for h in first + queued:
        h.cancel()
    eng.wake()


def test_cancel_frees_the_slot_within_a_step(engine_factory, bundle):
    eng = engine_factory(model=Slow(bundle.model, delay=0.02), max_batch_size=1)
    h = eng.submit([handle([1, 2], SamplingParams(gen_length=64, block_length=8), want_steps=True)])[0]
    assert h.q.get(timeout=10)[0] == "step"
    steps_before = eng.steps_run
    h.cancel()
    deadline = time.monotonic() + 2
    while eng.running and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not eng.running and len(eng.batch) == 0
    assert eng.steps_run - steps_before <= 2
    other = eng.submit([handle([3], SamplingParams(gen_length=4, block_length=4))])[0]
    assert result(other)[0] == "done"


@pytest.mark.parametrize("pipelined", [False, True], ids=["events-at-once", "events-one-step-late"])
def test_early_completion_keeps_the_answer(engine_factory, bundle, pipelined):
    stop = bundle.special.stop
    late = engine_factory(early_stop=False, max_batch_tokens=512, pipelined=pipelined)
    early = engine_factory(early_stop=True, max_batch_tokens=512, pipelined=pipelined)
    saved = 0
    for i in range(12):
        prompt = [(13 * i + j) % 290 for j in range(1 + i % 5)]
        sp = SamplingParams(gen_length=32, block_length=8, steps=32)
        limit = 5 + i % 7
        _, a = result(late.submit([handle(prompt, sp, answer_limit=limit)])[0])
        _, b = result(early.submit([handle(prompt, sp, answer_limit=limit)])[0])
        assert cut_answer(a.gen_ids, stop)[:limit] == cut_answer(b.gen_ids, stop)[:limit]
        saved += a.steps - b.steps
        assert b.steps <= a.steps
    assert saved > 0


def test_a_failing_step_fails_only_its_requests(engine_factory, bundle):
    eng = engine_factory(model=Slow(bundle.model, poison=299), max_batch_size=4)
    sp = SamplingParams(gen_length=8, block_length=8)
    bad = eng.submit([handle([1, 299], sp), handle([2, 3], sp)])
    kinds = [result(h) for h in bad]
    assert all(k == "error" and isinstance(e, InternalError) for k, e in kinds)
    assert eng.rec.failures >= 1
    good = eng.submit([handle([2, 3], sp)])[0]
    assert result(good)[0] == "done"
    assert eng.alive and not eng.running


def test_request_timeout(engine_factory, bundle):
    eng = engine_factory(model=Slow(bundle.model, delay=0.02), request_timeout=0.2)
    h = eng.submit([handle([1], SamplingParams(gen_length=64, block_length=64))])[0]
    kind, err = result(h)
    assert kind == "error" and isinstance(err, RequestTimeout)


def test_shutdown_drains_then_refuses(engine_factory, bundle):
    eng = engine_factory(model=Slow(bundle.model, delay=0.01), max_batch_size=2)
    hs = eng.submit([handle([i + 1], SamplingParams(gen_length=8, block_length=8)) for i in range(3)])
    t = threading.Thread(target=eng.shutdown, args=(10.0,))
    t.start()
    time.sleep(0.02)
    with pytest.raises(EngineStopped):
        eng.submit([handle([1], SamplingParams(gen_length=4, block_length=4))])
    t.join(15)
    assert all(result(h)[0] == "done" for h in hs)
    assert not eng.alive


def test_shutdown_past_the_grace_fails_what_is_left(engine_factory, bundle):
    eng = engine_factory(model=Slow(bundle.model, delay=0.02), max_batch_size=1)
    hs = eng.submit([handle([1], SamplingParams(gen_length=64, block_length=64)) for _ in range(2)])
    eng.shutdown(grace=0.1)
    kinds = [result(h, timeout=5) for h in hs]
    assert all(k == "error" and isinstance(e, EngineStopped) for k, e in kinds)


class PrefersMask:
    """A network whose favourite token is always the mask id (random test models sometimes are)."""

    def __init__(self, model, mask_id):
        self.inner, self.mask_id = model, mask_id
        self.config, self.device, self.dtype = model.config, model.device, model.dtype

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs).clone()
        out[:, self.mask_id] += 1000.0
        return out


@pytest.mark.parametrize("extra", [{}, {"ban_eos": True}, {"temperature": 1.0, "seed": 3},
                                   {"threshold": 0.5}])
def test_a_model_that_proposes_the_mask_id_still_finishes(engine_factory, bundle, extra):
    eng = engine_factory(model=PrefersMask(bundle.model, bundle.special.mask), max_batch_size=2)
    sp = SamplingParams(gen_length=8, block_length=4, **extra)
    kind, res = result(eng.submit([handle([1, 2, 3], sp)])[0], timeout=30)
    assert kind == "done", res
    assert bundle.special.mask not in res.gen_ids
    assert res.steps <= 8
