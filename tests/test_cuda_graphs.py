"""StepGraphs' capture sequence, on the CPU with stand-ins for the torch.cuda calls it makes.

What a GPU would show, modelled here: a capturing stream refuses a module load, so a kernel path
first launched during capture breaks the capture; `torch.cuda.graph` switches to its capture stream
on entry and, on exit, ends the capture before it restores the stream (so ending a broken capture
raises with the capture stream still current). Checked: the last warm-up takes the capture's
launch path (inside `kernels.launch.capture_launches()`), so the capture loads nothing; a refused
capture leaves the caller's stream current and its bucket runs eagerly, counted as refused.
"""

import pytest
import torch

from kernels import launch
from sampler.cuda_graphs import StepGraphs
from sampler.device_step import PLAN_COLUMNS


class _Stream:
    def __init__(self, name):
        self.name = name

    def wait_stream(self, other):
        pass


class _Bucket:
    def __init__(self, requests=1, tokens=32, breaks=False):
        self.requests, self.tokens, self.breaks = requests, tokens, breaks

    def __hash__(self):
        return hash((self.requests, self.tokens, self.breaks))

    def __eq__(self, other):
        return (self.requests, self.tokens, self.breaks) == (other.requests, other.tokens, other.breaks)


@pytest.fixture
def cuda(monkeypatch):
    state = dict(current=_Stream("default"), capturing=None, loaded=set(), calls=[])

    class Graph:
        def __init__(self):
            self.broken = False
            self.replays = 0

        def replay(self):
            self.replays += 1

    class Capture:  # torch.cuda.graph's order: end the capture, then restore the stream
        def __init__(self, graph, pool=None):
            self.graph = graph

        def __enter__(self):
            self.prev = state["current"]
            state["current"] = _Stream("capture")
            state["capturing"] = self.graph

        def __exit__(self, *exc):
            state["capturing"] = None
            if self.graph.broken:
                raise RuntimeError("operation not permitted when stream is capturing")
            state["current"] = self.prev

    class StreamCtx:
        def __init__(self, s):
            self.s = s

        def __enter__(self):
            self.prev = state["current"]
            state["current"] = self.s

        def __exit__(self, *exc):
            state["current"] = self.prev

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["current"])
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream("side"))
    monkeypatch.setattr(torch.cuda, "stream", StreamCtx)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: state.__setitem__("current", s))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 1 << 31))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    return state


def _step(state):
    def step(plan, bucket):
        capturing = state["capturing"] is not None
        # The launch path the kernels take: tuned, or the stored choice (capture, capture_launches).
        t = torch.zeros(1)
        path = "tuned" if (launch.autotune_allowed(t) and not capturing) else "stored choice"
        state["calls"].append((state["current"].name, path))
        if capturing and path not in state["loaded"]:
            state["capturing"].broken = True  # the module load the capturing stream refuses
        if capturing and bucket.breaks:
            state["capturing"].broken = True  # say, a host read the capture cannot hold
        state["loaded"].add(path)
        return torch.full((2,), float(len(state["calls"])))
    return step


def test_the_last_warm_up_takes_the_capture_path(cuda):
    graphs = StepGraphs(_step(cuda), dummy_slot=3, device="cpu")
    b = _Bucket()
    out = graphs.run(b, torch.zeros((2, PLAN_COLUMNS), dtype=torch.int64))
    assert cuda["calls"] == [("side", "tuned"), ("side", "stored choice"), ("capture", "stored choice")]
    assert b in graphs.graphs and not graphs.refused
    assert cuda["current"].name == "default"
    assert graphs.counts() == dict(replayed=1, eager=0, refused=0)
    assert graphs.run(b, torch.zeros((2, PLAN_COLUMNS), dtype=torch.int64)) is out  # static outputs, replayed
    assert graphs.counts()["replayed"] == 2 and len(cuda["calls"]) == 3


def test_a_refused_capture_restores_the_stream_and_runs_eagerly(cuda):
    graphs = StepGraphs(_step(cuda), dummy_slot=3, device="cpu")
    bad = _Bucket(requests=2, breaks=True)
    res = graphs.run(bad, torch.zeros((3, PLAN_COLUMNS), dtype=torch.int64))
    assert bad in graphs.refused and bad not in graphs.graphs
    assert cuda["current"].name == "default", "the capture stream was left current"
    assert cuda["calls"][-1] == ("default", "tuned")  # the step ran eagerly, on the caller's stream
    assert torch.is_tensor(res)
    graphs.run(bad, torch.zeros((3, PLAN_COLUMNS), dtype=torch.int64))
    assert graphs.counts() == dict(replayed=0, eager=0, refused=2)
    big = _Bucket(tokens=graphs.max_tokens + 1)
    graphs.run(big, torch.zeros((2, PLAN_COLUMNS), dtype=torch.int64))
    assert graphs.counts() == dict(replayed=0, eager=1, refused=2)
    # A capturable bucket still captures after the refusal.
    graphs.run(_Bucket(requests=4), torch.zeros((5, PLAN_COLUMNS), dtype=torch.int64))
    assert graphs.counts() == dict(replayed=1, eager=1, refused=2) and cuda["current"].name == "default"
