"""Fair admission: the fair queue's order, and a short request served promptly behind a wall of large ones."""

from __future__ import annotations

import queue
import time

from sampler.params import SamplingParams
from sampler.scheduler import Engine, EngineConfig, Handle
from test_server_errors import SlowModel


# ---------------------------------------------------------------- fair admission
def _handle(prompt, params, done_order, tag):
    q = queue.Queue()

    def sink(item):
        if item[0] in ("done", "error"):
            done_order.append(tag)
        q.put(item)
    return Handle(prompt_ids=list(prompt), params=params, sink=sink)


def test_a_short_request_finishes_promptly_behind_a_wall_of_n16_requests(bundle):
    """Four requests of 16 sub-requests each fill a 4-slot batch 16 times over; a one-choice request
    arriving after them runs within the next two waves instead of after all 64 (first come first served)."""
    eng = Engine(SlowModel(bundle.model, delay=0.002), bundle.special,
                 EngineConfig(max_batch_size=4, max_batch_tokens=1024)).start()
    try:
        order: list = []
        wall = SamplingParams(gen_length=8, block_length=8)
        walls = [[_handle([1 + w, 2], wall, order, f"wall{w}") for _ in range(16)] for w in range(4)]
        for hs in walls:
            eng.submit(hs)
        short = _handle([9], SamplingParams(gen_length=4, block_length=4), order, "short")
        eng.submit([short])
        deadline = time.monotonic() + 60
        while len(order) < 65:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert order.index("short") <= 8, order
        # Every wall request got its share: each had sub-requests done among the first 16 answers.
        assert {t for t in order[:16] if t != "short"} == {"wall0", "wall1", "wall2", "wall3"}
    finally:
        eng.shutdown(grace=0)


def test_fair_queue_order():
    from sampler.fair_queue import FairQueue

    fq = FairQueue()
    fq.push("a", ["a1", "a2", "a3"])
    fq.push("b", ["b1"])
    got = []
    for _ in range(3):
        g, item = fq.peek()
        fq.admitted(g, item)
        got.append(item)
    assert got == ["a1", "b1", "a2"]  # b, with nothing running, goes before a's second
    fq.push("c", ["c1"])
    assert fq.peek() == ("c", "c1")   # fewest running first
    fq.finished("a")
    fq.finished("a")
    assert fq.peek() == ("a", "a3")   # a has none running and was served before c arrived
    assert len(fq) == 2 and sorted(fq.clear()) == ["a3", "c1"] and len(fq) == 0


def test_fair_queue_priority_orders_admission():
    from sampler.fair_queue import FairQueue

    fq = FairQueue()
    fq.push("late", ["l1", "l2"], priority=5)
    fq.push("plain", ["p1"])
    fq.push("urgent", ["u1", "u2"], priority=-3)
    got = []
    while len(fq):
        g, item = fq.peek()
        fq.admitted(g, item)
        got.append(item)
    # lower first whatever is running; equal priorities keep the fair rule among themselves
    assert got == ["u1", "u2", "p1", "l1", "l2"]


def test_priority_reaches_the_engine_queue(bundle):
    """A one-slot batch busy with a slow request: the waiting ones then run lowest priority first,
    whatever their arrival order."""
    eng = Engine(SlowModel(bundle.model, delay=0.01), bundle.special,
                 EngineConfig(max_batch_size=1, max_batch_tokens=1024)).start()
    try:
        order: list = []
        p = SamplingParams(gen_length=4, block_length=4)
        eng.submit([_handle([1, 2], SamplingParams(gen_length=16, block_length=16), order, "busy")])
        time.sleep(0.05)
        for tag, prio in (("late", 9), ("plain", 0), ("urgent", -4)):
            h = _handle([3], p, order, tag)
            h.priority = prio
            eng.submit([h])
        deadline = time.monotonic() + 60
        while len(order) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert order == ["busy", "urgent", "plain", "late"], order
    finally:
        eng.shutdown(grace=0)
