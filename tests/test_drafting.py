"""Exact parallel decoding: drafting on and off give the same ids, events and NFE, in every mode of
the LLaDA step, alone and in batches with joins; fewer forwards; the budget; refusals."""

import random
from dataclasses import replace

import pytest

import kernel_testing  # noqa: F401  (Triton's interpreter when there is no GPU: the fixed-shape test)
from sampler import conformance
from sampler.generate import generate
from sampler.params import MAX_DRAFT_DEPTH, ParamError, SamplingParams
from sampler.reference import reference_generate
from sampler.strategies import make_batch
from weights.checkpoint import load_checkpoint

from golden_sets import TINY_LLADA as GOLDEN

MODES = [
    dict(),
    dict(temperature=0.8, seed=5),
    dict(remasking="random", seed=9),
    dict(remasking="random", temperature=1.2, seed=4),
    dict(cfg_scale=1.5),
    dict(cfg_scale=0.5, temperature=0.7, seed=3),
    dict(cache="prefix"),
    dict(cache="dual"),
    dict(cache="prefix", temperature=0.9, seed=12),
    dict(cache="dual", remasking="random", seed=21),
    dict(threshold=0.9),
    dict(threshold=0.8, cache="dual"),
    dict(threshold=0.85, cache="prefix", temperature=0.6, seed=8),
    dict(defer_eos=True, eos_bias=1.5),
    dict(ban_eos=True, temperature=0.5, seed=2),
    dict(temperature=0.9, top_k=5, top_p=0.9, seed=31),
    dict(logprobs=3),
    dict(min_tokens=20, eos_bias=3.0),
]


def _name(m):
    return ",".join(f"{k}={v}" for k, v in m.items()) or "plain"


@pytest.fixture(scope="module")
def golden():
    return load_checkpoint(GOLDEN, device="cpu", dtype="float32")


def _events(res):
    """What a step event says, the forward accounting aside."""
    return [(e.step, e.block, e.positions, e.token_ids, [round(c, 6) for c in e.confidences],
             e.masks_remaining, e.nfe, e.finished, e.logprobs) for e in res.events]


@pytest.mark.parametrize("extra", MODES, ids=_name)
def test_drafting_changes_nothing_but_forwards(golden, extra):
    """Per mode, several shapes and depths: ids, every step event and NFE equal the run without
    drafting (and the one-request reference oracle where it applies); forwards never exceed NFE."""
    rnd = random.Random(hash(_name(extra)) & 0xFFFF)
    saved = 0
    for gen, block, steps in [(32, 32, 32), (24, 8, 24), (32, 16, 16)]:
        params = SamplingParams(gen_length=gen, block_length=block, steps=steps, **extra)
        prompt = [rnd.randrange(0, 280) for _ in range(rnd.randrange(1, 10))]
        base = generate(golden, [prompt], replace(params, draft_depth=0), keep_events=True)[0]
        if params.cache == "none" and params.threshold is None and params.logprobs is None:
            want, _ = reference_generate(golden.model, prompt, params, golden.special.mask, golden.special.stop)
            assert base.gen_ids == want
        for depth in (1, 3, MAX_DRAFT_DEPTH):
            got = generate(golden, [prompt], replace(params, draft_depth=depth), keep_events=True)[0]
            assert got.gen_ids == base.gen_ids, (depth, gen, block, steps)
            assert _events(got) == _events(base), (depth, gen, block, steps)
            assert got.nfe == base.nfe
            assert got.forwards <= got.nfe
            saved += got.nfe - got.forwards
    assert saved > 0, "no draft was ever accepted: the test would prove nothing"


def test_events_report_each_forward(golden):
    params = SamplingParams(gen_length=32, block_length=32, steps=32, draft_depth=4)
    res = generate(golden, [[3, 1, 4, 1, 5]], params, keep_events=True)[0]
    by_forward = {}
    for e in res.events:
        by_forward.setdefault(e.forwards, []).append(e)
    assert sorted(by_forward) == list(range(1, res.forwards + 1))
    for evs in by_forward.values():  # every event of a forward reports that forward's steps
        assert {e.forward_steps for e in evs} == {len(evs)}
        assert all(e.draft_rows <= 4 for e in evs)
    assert sum(len(v) for v in by_forward.values()) == res.nfe == 32
    assert any(len(v) > 1 for v in by_forward.values())


def _mixed(rnd):
    specs = [
        SamplingParams(gen_length=16, block_length=8, steps=16, draft_depth=4),
        SamplingParams(gen_length=24, block_length=8, steps=24, remasking="random", seed=3, draft_depth=2),
        SamplingParams(gen_length=16, block_length=4, steps=16, cfg_scale=1.0, draft_depth=8),
        SamplingParams(gen_length=32, block_length=8, steps=32, cache="prefix", draft_depth=3),
        SamplingParams(gen_length=32, block_length=16, steps=32, cache="dual", temperature=0.8, seed=6,
                       draft_depth=5),
        SamplingParams(gen_length=24, block_length=8, threshold=0.9, cache="dual", draft_depth=4),
        SamplingParams(gen_length=16, steps=16, temperature=1.0, seed=77),  # not drafting
        SamplingParams(gen_length=24, block_length=24, steps=24, cache="dual", draft_depth=0),
    ]
    return [([rnd.randrange(0, 280) for _ in range(rnd.randrange(1, 14))], p) for p in specs]


@pytest.mark.parametrize("budget", [10_000, 120, 0])
def test_mixed_batch_with_joins_is_exact(golden, budget):
    """Requests drafting and not, joining one per step, under a generous, a tight and no draft
    budget: every request's ids equal its run alone without drafting."""
    rnd = random.Random(99)
    reqs = _mixed(rnd)
    alone = [generate(golden, [p], replace(sp, draft_depth=0))[0].gen_ids for p, sp in reqs]
    batch = make_batch(golden.model, golden.special, capacity_tokens=2048, max_requests=5,
                       draft_budget=budget, adaptive_drafting=False)
    pending = list(enumerate(reqs))
    done, nfe, forwards = {}, {}, {}
    while pending or len(batch):
        if pending and batch.can_admit(len(pending[0][1][0]), pending[0][1][1]):
            i, (p, sp) = pending.pop(0)
            batch.add(i, p, sp)
        for ev in batch.step_async():
            if ev.finished:
                done[ev.request_id], nfe[ev.request_id], forwards[ev.request_id] = ev.gen_ids, ev.nfe, ev.forwards
                batch.remove(ev.request_id)
    assert [done[i] for i in range(len(reqs))] == alone
    assert all(forwards[i] <= nfe[i] for i in done)
    if budget == 0:
        assert batch.draft_rows_run == 0 and all(forwards[i] == nfe[i] for i in done)
    if budget >= 10_000:
        assert batch.steps_accepted > 0 and batch.draft_rows_run > 0


def test_a_full_batch_never_drafts(golden):
    """A step whose committed rows already use the token budget runs no draft row."""
    sp = SamplingParams(gen_length=32, block_length=32, steps=32, draft_depth=8)
    batch = make_batch(golden.model, golden.special, capacity_tokens=1024, max_requests=4,
                       draft_budget=3 * 40, adaptive_drafting=False)  # three canvases of about 40 tokens: the batch fills it
    for i in range(3):
        batch.add(i, [7 + i] * 8, sp)
    while len(batch):
        for ev in batch.step():
            assert ev.forward_steps == 1 and ev.draft_rows == 0
            if ev.finished:
                batch.remove(ev.request_id)
    assert batch.draft_rows_run == 0


def test_infill_with_fixed_tokens(golden):
    """Infilling (fixed tokens inside the span, a suffix after it) drafts exactly too."""
    m = golden.special.mask
    span = [m] * 6 + [11, 12] + [m] * 10 + [13] + [m] * 7
    for extra in (dict(), dict(temperature=0.7, seed=3), dict(cache="dual")):
        sp = SamplingParams(gen_length=len(span), block_length=len(span) // 2, steps=len(span) - 3 - 1, **extra)
        sp = replace(sp, steps=(sp.steps // 2) * 2)
        kw = dict(suffixes=[[21, 22, 23]], spans=[span])
        base = generate(golden, [[5, 6, 7]], replace(sp, draft_depth=0), **kw)[0]
        got = generate(golden, [[5, 6, 7]], replace(sp, draft_depth=6), **kw)[0]
        assert got.gen_ids == base.gen_ids and got.nfe == base.nfe and got.forwards <= base.nfe


def test_batch_default_depth_applies_to_unset_requests(golden):
    sp = SamplingParams(gen_length=32, block_length=32, steps=32)
    plain = generate(golden, [[1, 2, 3]], sp)[0]
    drafted = generate(golden, [[1, 2, 3]], sp, draft_depth=4)[0]
    assert drafted.gen_ids == plain.gen_ids and plain.forwards == plain.nfe
    assert drafted.forwards < plain.forwards
    off = generate(golden, [[1, 2, 3]], replace(sp, draft_depth=0), draft_depth=4)[0]
    assert off.forwards == off.nfe  # the request's own 0 wins over the batch default


@pytest.mark.parametrize("value", [-1, MAX_DRAFT_DEPTH + 1, 2.0, True])
def test_draft_depth_validation(value):
    with pytest.raises(ParamError) as e:
        SamplingParams(gen_length=16, draft_depth=value).validate(4)
    assert e.value.field == "draft_depth"


def test_block_diffusion_accepts_drafting():
    """LLaDA2.x has a drafting stage too (tests/test_drafting_llada2.py): the depth validates."""
    SamplingParams(gen_length=16, draft_depth=2).for_block_diffusion().validate(4, None, block_diffusion=True)
    with pytest.raises(ParamError) as e:
        SamplingParams(gen_length=16, draft_depth=MAX_DRAFT_DEPTH + 1).for_block_diffusion().validate(
            4, None, block_diffusion=True)
    assert e.value.field == "draft_depth"


@pytest.mark.parametrize("batched", [False, True])
def test_conformance_with_drafts(batched, capsys):
    args = ["--model", str(GOLDEN), "--cases", str(GOLDEN / "cases.json"), "--draft-depth", "4"]
    rc = conformance.main(args + (["--batched"] if batched else []))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.strip().splitlines()[-1] == "12 passed, 0 failed"
    summary = out.strip().splitlines()[-2]
    fwd, ref = int(summary.split()[1].rstrip(",")), int(summary.split()[3])
    assert fwd < ref


@pytest.mark.parametrize("pipelined", [False, True], ids=["events-at-once", "events-one-step-late"])
def test_engine_with_a_default_depth_gives_the_same_answers(golden, pipelined):
    """The engine's default depth applies to requests that leave theirs unset; answers equal the
    sampler without drafting, requests joining at different points; Result and the metrics hook
    report the forwards."""
    import queue
    import time

    from sampler.scheduler import Engine, EngineConfig, Handle

    class Rec:
        def __init__(self):
            self.forwards = []

        def observe_request_forward(self, steps, rows):
            self.forwards.append((steps, rows))

        def __getattr__(self, name):  # the other engine hooks: nothing to record here
            return lambda *a, **k: None

    cases = [([1, 2, 3], SamplingParams(gen_length=16, block_length=8, steps=16)),
             ([9, 8, 7, 6], SamplingParams(gen_length=16, block_length=16, steps=16, cache="dual")),
             ([4, 4], SamplingParams(gen_length=16, steps=16, temperature=0.9, seed=5)),
             ([5], SamplingParams(gen_length=16, steps=16, draft_depth=0)),
             ([6, 1], SamplingParams(gen_length=16, block_length=8, threshold=0.9))]
    rec = Rec()
    eng = Engine(golden.model, golden.special, EngineConfig(max_batch_size=4, max_batch_tokens=512,
                                                             early_stop=False, pipelined=pipelined,
                                                             draft_depth=4, adaptive_drafting=False),
                 metrics=rec).start()
    try:
        handles = []
        for i, (p, sp) in enumerate(cases):
            q = queue.Queue()
            h = Handle(prompt_ids=p, params=sp, sink=q.put)
            h.q = q
            handles.append(eng.submit([h])[0])
            time.sleep(0.003 * i)
        for h, (p, sp) in zip(handles, cases):
            while True:
                kind, res = h.q.get(timeout=60)
                if kind in ("done", "error"):
                    break
            assert kind == "done", res
            assert res.gen_ids == generate(golden, [p], replace(sp, draft_depth=0))[0].gen_ids
            assert res.forwards <= res.nfe
            if sp.draft_depth == 0:
                assert res.forwards == res.nfe
    finally:
        eng.shutdown(grace=0)
    assert any(steps > 1 for steps, _ in rec.forwards)
    assert sum(rows for _, rows in rec.forwards) > 0


STATIC_MODES = [dict(cache="dual"), dict(cache="prefix", temperature=0.8, seed=3), dict(),
                dict(cfg_scale=1.0, remasking="random", seed=4), dict(threshold=0.9, cache="dual"),
                dict(temperature=0.9, top_k=4, seed=8, logprobs=2)]


def _drive(bundle, reqs, pad, budget):
    rows = sum(len(p) + sp.gen_length for p, sp in reqs) * 2
    batch = make_batch(bundle.model, bundle.special, capacity_tokens=rows + 7, max_requests=len(reqs),
                       pad_to_buckets=pad, draft_budget=budget, adaptive_drafting=False)
    for i, r in enumerate(reqs):
        batch.add(i, *r)
    out = {}
    while len(batch):
        for e in batch.step_async():
            if e.finished:
                out[e.request_id] = (e.gen_ids, e.nfe, e.forwards)
                batch.remove(e.request_id)
    return out, batch


def _static(monkeypatch):
    from sampler import device_step as ds
    real_step = ds.device_step
    monkeypatch.setattr(ds, "device_step", lambda *a, **kw: real_step(*a, dynamic=False, **kw))


def test_drafting_at_fixed_shapes_is_exact(golden, monkeypatch):
    """The step as CUDA runs it (padded buckets with draft rows, no data-dependent shortcuts: the
    drafting stage guesses over every logit row for the bucket's depth) gives the ids and NFE of
    the same step without drafts, and the forwards of the dynamic CPU path."""
    rnd = random.Random(5)
    reqs = [([rnd.randrange(0, 280) for _ in range(3 + i)],
             SamplingParams(gen_length=16, block_length=8, steps=16, draft_depth=3, **m))
            for i, m in enumerate(STATIC_MODES)]
    dynamic, _ = _drive(golden, reqs, pad=False, budget=4096)
    _static(monkeypatch)
    plain, _ = _drive(golden, [(p, replace(sp, draft_depth=0)) for p, sp in reqs], pad=True, budget=0)
    got, batch = _drive(golden, reqs, pad=True, budget=4096)
    assert batch.draft_rows_run > 0
    assert {i: g[:2] for i, g in got.items()} == {i: g[:2] for i, g in plain.items()}
    assert {i: g[2] for i, g in got.items()} == {i: g[2] for i, g in dynamic.items()}
    assert sum(g[2] for g in got.values()) < sum(g[1] for g in got.values())


def test_the_drafting_step_reads_nothing_back(monkeypatch):
    """With the Triton kernels (here interpreted) the drafting step, draft rows and cached K/V
    copies included, issues no operation that reads a device value back to the host: what CUDA
    graph capture needs."""
    pytest.importorskip("triton")
    from kernels import attention_triton as at
    from kernels import selection_triton as st
    from sampler import candidates as cd
    from sampler import device_step as ds
    from test_device_step import SYNC_OPS, _OpCounter
    if not at._interpreting():
        pytest.skip("needs Triton's interpreter (no GPU here)")
    bundle = load_checkpoint(GOLDEN, device="cpu", dtype="float32")
    reqs = [([5, 9, 2], SamplingParams(gen_length=8, block_length=8, steps=8, cache="dual", draft_depth=2)),
            ([7, 1], SamplingParams(gen_length=8, block_length=8, steps=8, draft_depth=2))]

    def attn(q, k, v, cu_q, k_start, k_len, max_q=None, max_k=None, scale=None, host=None):
        return at.attention_triton(q, k, v, cu_q, k_start, k_len, max_q, max_k, scale)

    monkeypatch.setattr("weights.layers.attention", attn)
    monkeypatch.setattr(cd, "sample_candidates", st.sample_candidates_triton)
    monkeypatch.setattr(ds, "transfer_mask", st.transfer_mask_triton)
    real_step = ds.device_step

    def checked(*a, **kw):
        with _OpCounter() as c:
            out = real_step(*a, dynamic=False, **kw)
        bad = [o for o in c.ops if o in SYNC_OPS]
        assert not bad, f"host reads inside the step: {bad}"
        return out

    monkeypatch.setattr(ds, "device_step", checked)
    got, batch = _drive(bundle, reqs, pad=True, budget=1024)
    assert batch.draft_rows_run > 0
    assert sorted(got) == [0, 1]
