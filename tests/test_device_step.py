"""The device-resident step: padded buckets, one-step-late events, NFE accounting, no host reads.

On the CPU the step normally runs at exact shapes and reads results at once; these tests force the
CUDA behaviour (padded bucket shapes, events read one step late, no data-dependent shortcuts) and
check that every answer and every NFE is what the plain path gives. With LLADA_TEST_DEVICE=cuda the
model lives on the GPU (CUDA graphs on, the compiled kernels), and the module skips without one.
"""

import gc
import os
import random
import weakref

import pytest
import torch

import kernel_testing  # noqa: F401  (Triton's interpreter when there is no GPU)
from ckpt_factory import make_checkpoint
from sampler import candidates as cd
from sampler import device_step as ds
from sampler.params import SamplingParams
from sampler.strategies import make_batch, rows_needed
from weights.checkpoint import load_checkpoint

DEVICE = os.environ.get("LLADA_TEST_DEVICE", "cpu")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("LLADA_TEST_DEVICE=cuda and no CUDA device", allow_module_level=True)

MODES = [
    dict(),
    dict(cache="prefix"),
    dict(cache="dual"),
    dict(threshold=0.3),
    dict(threshold=0.3, cache="prefix"),
    dict(threshold=0.2, cache="dual"),
    dict(remasking="random", seed=5, cache="dual"),
    dict(cfg_scale=1.5),
    dict(cfg_scale=1.0, threshold=0.4),
    dict(temperature=0.8, seed=123, cache="prefix"),
    dict(temperature=0.5, seed=9, threshold=0.2, cache="dual"),
    dict(ban_eos=True, cache="dual"),
    dict(defer_eos=True),
    dict(eos_bias=-1.5, cache="dual"),
]


def _label(m):
    return ",".join(f"{k}={v}" for k, v in m.items()) or "plain"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Other dimensions than the golden set (GQA, head dim 16, 3 layers)."""
    d = make_checkpoint(tmp_path_factory.mktemp("ds") / "m", d_model=64, n_layers=3, n_heads=4,
                        n_kv_heads=2, mlp_hidden_size=72, vocab_size=150, seed=21)
    return load_checkpoint(d, device=DEVICE, dtype="float32")


def _run(bundle, reqs, arrivals=None, pad=False, late=False, max_requests=None):
    """Drive one batch to completion: {index: (gen_ids, nfe, steps)}; arrivals[i] = step it joins."""
    rows = sum(rows_needed(len(p), sp) for p, sp in reqs)
    batch = make_batch(bundle.model, bundle.special, capacity_tokens=rows + 7,
                       max_requests=max_requests or len(reqs), pad_to_buckets=pad)
    arrivals = arrivals or [0] * len(reqs)
    order = sorted(range(len(reqs)), key=lambda i: arrivals[i])
    out, step_no = {}, 0
    while len(out) < len(reqs):
        while order and arrivals[order[0]] <= step_no and batch.can_admit(len(reqs[order[0]][0]),
                                                                          reqs[order[0]][1]):
            i = order.pop(0)
            batch.add(i, *reqs[i])
        for ev in (batch.step_async() if late else batch.step()):
            if ev.finished:
                out[ev.request_id] = (ev.gen_ids, ev.nfe, ev.step)
                batch.remove(ev.request_id)
        step_no += 1
        assert step_no < 2000, "the batch stopped making progress"
    return out, batch


def _requests(rnd, extra, n=1):
    out = []
    for _ in range(n):
        gen, block = rnd.choice([(16, 8), (24, 8), (16, 16), (20, 4)])
        steps = None if "threshold" in extra else gen // rnd.choice([1, 2])
        out.append(([rnd.randrange(0, 139) for _ in range(rnd.randrange(1, 14))],
                    SamplingParams(gen_length=gen, block_length=block, steps=steps, **extra)))
    return out


@pytest.mark.parametrize("extra", MODES, ids=_label)
def test_padded_buckets_and_late_events_change_nothing(model, extra):
    """Alone: exact shapes read at once == padded buckets == padded buckets read one step late."""
    rnd = random.Random(hash(_label(extra)) & 0xFFFF)
    reqs = _requests(rnd, extra, n=2)
    for req in reqs:
        want, _ = _run(model, [req])
        for pad, late in [(True, False), (True, True), (False, True)]:
            got, _ = _run(model, [req], pad=pad, late=late)
            assert got[0][:2] == want[0][:2], (pad, late)


def test_mixed_batch_with_joins_is_invariant_under_padding_and_late_events(model):
    """Every mode in one batch, requests joining mid-schedule: each answer and NFE equals the
    request run alone with exact shapes."""
    rnd = random.Random(77)
    reqs = []
    for extra in MODES:
        reqs += _requests(rnd, extra)
    alone = {i: _run(model, [r])[0][0][:2] for i, r in enumerate(reqs)}
    arrivals = [rnd.randrange(0, 20) for _ in reqs]
    for pad, late in [(True, False), (True, True)]:
        got, batch = _run(model, reqs, arrivals, pad=pad, late=late, max_requests=6)
        assert {i: g[:2] for i, g in got.items()} == alone, (pad, late)
        assert not batch.requests and batch.rows_in_use == 0


def test_late_events_cost_a_no_op_step_only_for_threshold_blocks(model):
    """Read one step late, a threshold block that finishes is noticed one step later: that request
    spends one planned step doing nothing (no event, no NFE); a scheduled request spends none."""
    rnd = random.Random(5)
    sched = _requests(rnd, dict(cache="dual"))[0]
    thr = _requests(rnd, dict(threshold=0.2, cache="dual"))[0]
    for req in (sched, thr):
        now, b_now = _run(model, [req])
        late, b_late = _run(model, [req], late=True)
        assert late[0][:3] == now[0][:3]  # same ids, NFE and steps counted by the device
        extra = b_late.forwards - b_now.forwards
        if req is sched:
            assert extra == 0
        else:
            assert 1 <= extra <= req[1].blocks


@pytest.mark.parametrize("cache,per_block", [("none", 1), ("prefix", 2), ("dual", 2)])
def test_nfe_counts_the_reference_forward_after_a_block_done_at_its_start(model, cache, per_block):
    """With a threshold so low that the block-start forward unmasks the whole block, the reference's
    cache loops spend one more forward (it unmasks nothing) before they notice; exact mode does not."""
    prompt = [3, 14, 15, 92, 65]
    sp = SamplingParams(gen_length=16, block_length=8, threshold=1e-30, cache=cache)
    got, batch = _run(model, [(prompt, sp)])
    assert got[0][1] == per_block * sp.blocks
    assert batch.forwards == sp.blocks  # the uncounted forwards are not run


def test_buckets_round_up_with_bounded_padding():
    for n in range(1, 5000, 7):
        b = ds.round_up(n)
        assert b >= n and (n <= 16 or b <= n * 1.5)
    bk = ds.Bucket.fit(5, 170, 160, 33, False)
    assert (bk.requests, bk.tokens, bk.rows, bk.max_q) == (8, 192, 192, 64)
    assert ds.Bucket.fit(5, 170, 160, 33, True, pad=False) == ds.Bucket(5, 170, 160, 33, True)


SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::equal",
            "aten::is_nonzero", "aten::masked_select", "aten::unique"}


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket._qualified_op_name))
        return func(*args, **(kwargs or {}))


def test_the_cuda_step_reads_nothing_back(model, monkeypatch):
    """The step as CUDA runs it (padded bucket, no data-dependent shortcuts, the Triton kernels,
    here interpreted) issues no operation that reads a device value back to the host, and the
    same number of operations whatever the data: what CUDA graph capture needs."""
    triton = pytest.importorskip("triton")  # noqa: F841
    from kernels import attention_triton as at
    from kernels import selection_triton as st
    if not at._interpreting():
        pytest.skip("needs Triton's interpreter (no GPU here)")

    def attn(q, k, v, cu_q, k_start, k_len, max_q=None, max_k=None, scale=None, host=None):
        assert max_q is not None  # the grid comes from the bucket, not from reading cu_q (nor `host`)
        return at.attention_triton(q, k, v, cu_q, k_start, k_len, max_q, max_k, scale)

    monkeypatch.setattr("weights.layers.attention", attn)
    monkeypatch.setattr(cd, "sample_candidates", st.sample_candidates_triton)
    monkeypatch.setattr(ds, "transfer_mask", st.transfer_mask_triton)
    real_step = ds.device_step
    counts = []

    def counted(*a, **kw):
        with _OpCounter() as c:
            out = real_step(*a, dynamic=False, **kw)
        bad = [o for o in c.ops if o in SYNC_OPS]
        assert not bad, f"host reads inside the step: {bad}"
        counts.append(len(c.ops))
        return out

    monkeypatch.setattr(ds, "device_step", counted)
    reqs = [([5, 9, 2], SamplingParams(gen_length=8, block_length=4, steps=4, cache="dual")),
            ([7, 1], SamplingParams(gen_length=8, block_length=4, threshold=0.3, cache="prefix"))]
    got, _ = _run(model, reqs, pad=True, late=True)
    monkeypatch.setattr(ds, "device_step", real_step)
    for i, r in enumerate(reqs):
        assert got[i][:2] == _run(model, [r])[0][0][:2]
    assert len(set(counts)) <= 3  # one op sequence per kind of bucket (cfg or not, sizes)


def _events(bundle, reqs, pad):
    rows = sum(rows_needed(len(p), sp) for p, sp in reqs)
    batch = make_batch(bundle.model, bundle.special, capacity_tokens=rows + 7, max_requests=len(reqs),
                       pad_to_buckets=pad)
    for i, r in enumerate(reqs):
        batch.add(i, *r)
    out = []
    while len(out) < len(reqs) * 100:
        evs = batch.step()
        if not evs:
            break
        out += [(e.request_id, e.step, e.positions, e.token_ids, e.logprobs, e.top_logprobs) for e in evs]
        for e in evs:
            if e.finished:
                batch.remove(e.request_id)
    return out


@pytest.mark.parametrize("extra", [dict(), dict(temperature=0.7, seed=3, top_p=0.8), dict(cache="dual")],
                         ids=_label)
def test_logprobs_of_one_request_are_the_same_at_fixed_shapes(model, monkeypatch, extra):
    """Off CUDA only the rows of requests that asked compute log-probabilities; on CUDA every row
    does, at fixed shapes. Both give the same numbers, and the batchmates' events carry none."""
    reqs = [([5, 9, 2], SamplingParams(gen_length=8, block_length=4, steps=8, logprobs=3, **extra)),
            ([7, 1], SamplingParams(gen_length=8, block_length=4, steps=4, **extra)),
            ([4, 4, 8, 1], SamplingParams(gen_length=16, block_length=8, steps=8, logprobs=0, **extra))]
    dynamic = _events(model, reqs, pad=False)
    real_step = ds.device_step
    monkeypatch.setattr(ds, "device_step", lambda *a, **kw: real_step(*a, dynamic=False, **kw))
    static = _events(model, reqs, pad=True)
    assert [e[:4] for e in dynamic] == [e[:4] for e in static]
    for d, s in zip(dynamic, static):
        if d[0] == 1:
            assert d[4] is None and s[4] is None
            continue
        assert d[4] == pytest.approx(s[4], abs=1e-5)
        assert [[t for t, _ in alts] for alts in d[5]] == [[t for t, _ in alts] for alts in s[5]]
        assert len(d[4]) == len(d[2]) and all(len(a) <= (3 if d[0] == 0 else 0) for a in d[5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_replay_matches_eager(model, dtype):
    """On a GPU: the captured-and-replayed step gives the same answers as the eager step, in fp32
    and in bf16 (the serving dtype), and no bucket is refused capture."""
    gpu = load_checkpoint(model.path, device="cuda", dtype=dtype)
    rnd = random.Random(9)
    reqs = []
    for extra in MODES:
        reqs += _requests(rnd, extra)
    rows = sum(rows_needed(len(p), sp) for p, sp in reqs)
    outs = []
    for graphs in (False, True):
        batch = make_batch(gpu.model, gpu.special, capacity_tokens=rows, max_requests=len(reqs),
                           cuda_graphs=graphs)
        for i, r in enumerate(reqs):
            batch.add(i, *r)
        res = {}
        while batch.requests:
            for ev in batch.step_async():
                if ev.finished:
                    res[ev.request_id] = (ev.gen_ids, ev.nfe)
                    batch.remove(ev.request_id)
        outs.append(res)
        if graphs:
            counts = batch.graphs.counts()
            print(f"{dtype}: steps {counts}, refused buckets {sorted(map(str, batch.graphs.refused))}")
            assert counts["replayed"] > 0 and counts["refused"] == 0 and not batch.graphs.refused, counts
    assert outs[0] == outs[1]


@pytest.mark.parametrize("logprobs", [False, True])
def test_read_back_buffer_packs_and_unpacks_by_one_layout(logprobs):
    """The step packs its results and the host unpacks them from the same section list: every
    section comes back whole, float32 values bit for bit."""
    from sampler.step_state import ReadBack
    layout = ReadBack(rows=7, requests=3, logprobs=logprobs)
    g = torch.Generator().manual_seed(0)
    parts = {}
    for name, n, width, is_float in layout.sections():
        shape = (n,) if width == 1 else (n, width)
        parts[name] = (torch.randn(shape, generator=g, dtype=torch.float32) if is_float
                       else torch.randint(-5, 1000, shape, generator=g))
    out = layout.unpack(layout.pack(parts))
    assert set(out) == set(parts) == ({"rows", "conf", "requests"} |
                                      ({"token_logprob", "top_ids", "top_logprobs"} if logprobs else set()))
    for name, t in parts.items():
        assert out[name].tolist() == t.tolist(), name


def test_pack_slot_fills_every_named_field():
    from sampler.step_state import FLT, INT, N_FLT, N_INT, pack_slot
    sp = SamplingParams(gen_length=24, block_length=8, threshold=0.5, cache="dual", seed=7, cfg_scale=1.5,
                        temperature=0.3, top_k=5, logprobs=2, defer_eos=True)
    ints, floats = pack_slot(sp, offset=40, prompt_len=6, length=30)
    assert len(ints) == N_INT == len(set(INT)) and len(floats) == N_FLT == len(set(FLT))
    assert (ints.offset, ints.prompt_len, ints.length, ints.block_len, ints.n_blocks) == (40, 6, 30, 8, 3)
    assert ints.steps_per_block == 0  # threshold decoding
    assert (ints.cache_mode, ints.seed, ints.cfg, ints.defer_eos, ints.top_k, ints.n_logprobs) == (2, 7, 1, 1, 5, 2)
    assert (floats.threshold, floats.cfg_scale, floats.temperature) == (0.5, 1.5, pytest.approx(0.3))
    assert list(ints)[INT.gen_length] == 24 and list(floats)[FLT.top_p] == 1.0
    assert pack_slot(SamplingParams(gen_length=8, steps=4), 0, 1, 9)[0].n_logprobs == -1
def test_a_batch_with_step_graphs_is_freed_without_a_collection(model):
    """StepGraphs holds the batch's step method weakly: dropping the batch frees it (its KV buffers,
    its graphs and their pool) at once, not at the next full garbage collection."""
    from sampler.cuda_graphs import StepGraphs

    from sampler.llada_batch import LLaDABatch

    batch = LLaDABatch(model.model, model.special, capacity_tokens=64, max_requests=2)
    if batch.graphs is None:
        batch.graphs = StepGraphs(batch._device_step, batch.dummy_slot, batch.device)
    assert batch.graphs.step_fn == batch._device_step  # resolves while the batch lives
    graphs = batch.graphs
    batch.add(0, [5, 9, 2], SamplingParams(gen_length=8, block_length=4, steps=4))
    refs = [weakref.ref(batch), weakref.ref(batch.tokens), weakref.ref(batch.state)]
    gc.collect()
    gc.disable()
    try:
        del batch
        assert all(r() is None for r in refs), "the batch outlived its last reference"
    finally:
        gc.enable()
    with pytest.raises(RuntimeError, match="gone"):
        graphs.step_fn  # noqa: B018


def test_plan_of_pads_like_the_idle_plan():
    """The plan built in one tensor: the given rows, then rows pointing at the dummy slot exactly as
    an idle plan's (block -1, K/V offset -1, base -1)."""
    rows = [[3, 0, 2, 0, -1, 0], [3, 0, 3, 1, 40, 0]]
    plan = ds.plan_of(rows, 4, dummy_slot=7)
    assert plan.dtype == torch.int64 and plan.shape == (4, ds.PLAN_COLUMNS)
    assert plan[:2].tolist() == rows
    idle = ds.idle_plan(4, 7, "cpu")
    assert plan[2:].tolist() == idle[2:].tolist() == [[7, -1, 0, 0, -1, -1]] * 2
