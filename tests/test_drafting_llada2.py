"""Exact parallel decoding on LLaDA2.x block diffusion: drafting on and off give the same ids,
events and NFE (LLaDA2.0 and LLaDA2.1, temperature 0 and > 0, EOS rules), alone and in mixed
batches with joins, under several depths and budgets; drafts never cross a block; the golden set
passes with fewer forwards."""

import random
from dataclasses import replace

import pytest

from ckpt_factory import make_moe_checkpoint
from sampler import conformance
from sampler.generate import generate
from sampler.params import MAX_DRAFT_DEPTH, SamplingParams
from sampler.reference_llada2 import llada2_generate
from sampler.strategies import make_batch
from weights.checkpoint import load_checkpoint

from golden_sets import TINY_LLADA2

MODES = [
    dict(gen_length=20, block_length=8, steps=8, threshold=0.6),
    dict(gen_length=16, block_length=8, steps=4, threshold=1.0),
    dict(gen_length=24, block_length=4, steps=6, minimal_topk=2, threshold=0.3),
    dict(gen_length=30, block_length=8, steps=8, threshold=0.2, eos_early_stop=True),
    dict(gen_length=24, block_length=8, steps=32, threshold=1.0),  # more steps than tokens: empty quotas
    dict(gen_length=20, block_length=8, threshold=0.6, editing_threshold=0.4, max_post_steps=3),
    dict(gen_length=18, block_length=16, threshold=0.5, editing_threshold=0.2, max_post_steps=2,
         num_to_transfer=2),
    dict(gen_length=24, block_length=8, threshold=0.3, editing_threshold=0.1, max_post_steps=0,
         eos_early_stop=True),
    dict(gen_length=24, block_length=8, threshold=1.0, editing_threshold=1.0, max_post_steps=4),
    dict(gen_length=24, block_length=8, steps=8, threshold=0.9, temperature=0.8, seed=5),
    dict(gen_length=24, block_length=8, steps=8, threshold=0.5, temperature=1.3, seed=9, ban_eos=True),
    dict(gen_length=20, block_length=4, steps=4, threshold=0.95, defer_eos=True),
    dict(gen_length=24, block_length=8, threshold=0.7, editing_threshold=0.3, temperature=0.7, seed=3),
]


def _name(m):
    return ",".join(f"{k}={v}" for k, v in m.items())


@pytest.fixture(scope="module")
def other2(tmp_path_factory):
    """A small random LLaDA2 checkpoint (it edits at low editing thresholds)."""
    d = make_moe_checkpoint(tmp_path_factory.mktemp("l2d") / "m", "llada2", seed=7)
    return load_checkpoint(d, "cpu", "float64")


def _events(res):
    """What a step event says, the forward accounting aside."""
    return [(e.step, e.block, e.positions, e.token_ids, [round(c, 9) for c in e.confidences],
             e.masks_remaining, e.nfe, e.finished, e.edited_positions, e.edited_token_ids,
             e.final_upto) for e in res.events]


@pytest.mark.parametrize("kw", MODES, ids=_name)
def test_drafting_changes_nothing_but_forwards(other2, kw):
    """Per mode and prompt length, depths 1 to 8: ids, every step event and NFE equal the run
    without drafting (and the one-request oracle at temperature 0); forwards never exceed NFE."""
    rnd = random.Random(_name(kw))
    params = SamplingParams(**kw)
    for plen in (3, 13):
        prompt = [rnd.randrange(280) for _ in range(plen)]
        base = generate(other2, [prompt], replace(params, draft_depth=0), keep_events=True)[0]
        assert base.forwards == base.nfe
        if params.temperature == 0 and not params.defer_eos:
            want, nfe = llada2_generate(other2.model, prompt, params.for_block_diffusion(),
                                        other2.special.mask, other2.special.eos)
            assert (base.gen_ids, base.nfe) == (want, nfe)
        for depth in (1, 3, MAX_DRAFT_DEPTH):
            got = generate(other2, [prompt], replace(params, draft_depth=depth), keep_events=True)[0]
            assert got.gen_ids == base.gen_ids, (depth, plen)
            assert _events(got) == _events(base), (depth, plen)
            assert got.nfe == base.nfe and got.forwards <= got.nfe


@pytest.mark.parametrize("kw", [MODES[0], MODES[4], MODES[5], MODES[8], MODES[9], MODES[12]], ids=_name)
def test_drafts_are_accepted(other2, kw):
    """LLaDA2.0 and 2.1, greedy and sampled: drafts do get accepted (the exactness tests above
    would prove nothing otherwise), and deeper drafts never cost more forwards here."""
    prompt = [random.Random(_name(kw)).randrange(280) for _ in range(13)]
    runs = [generate(other2, [prompt], SamplingParams(**kw, draft_depth=d))[0] for d in (0, 1, 4)]
    assert runs[0].forwards == runs[0].nfe
    assert runs[2].forwards <= runs[1].forwards < runs[0].forwards


def test_events_report_each_forward_and_stay_in_the_block(other2):
    params = SamplingParams(gen_length=32, block_length=8, steps=8, threshold=1.0, draft_depth=4)
    res = generate(other2, [[3, 1, 4, 1, 5]], params, keep_events=True)[0]
    by_forward = {}
    for e in res.events:
        by_forward.setdefault(e.forwards, []).append(e)
    assert sorted(by_forward) == list(range(1, res.forwards + 1))
    for evs in by_forward.values():  # the steps of one forward share its count and its block
        assert {e.forward_steps for e in evs} == {len(evs)}
        assert len({e.block for e in evs}) == 1
        assert all(e.draft_rows <= 4 for e in evs)
    assert sum(len(v) for v in by_forward.values()) == res.nfe
    assert any(len(v) > 1 for v in by_forward.values())


def _mixed(rnd):
    specs = [replace(SamplingParams(**kw), draft_depth=d)
             for kw, d in zip(MODES, [4, 2, 8, 3, 1, 5, 4, 0, 2, 6, 3, None, 8])]
    return [([rnd.randrange(280) for _ in range(rnd.randrange(1, 14))], sp) for sp in specs]


@pytest.mark.parametrize("budget", [100_000, 60, 0])
def test_mixed_batch_with_joins_is_exact(other2, budget):
    """LLaDA2.0 and 2.1 requests drafting and not, joining one per step, under a generous, a tight
    and no draft budget: every request's ids and NFE equal its run alone without drafting."""
    reqs = _mixed(random.Random(17))
    alone = [generate(other2, [p], replace(sp, draft_depth=0))[0] for p, sp in reqs]
    batch = make_batch(other2.model, other2.special, capacity_tokens=2048, max_requests=6,
                       draft_depth=2, draft_budget=budget, adaptive_drafting=False)
    pending = list(enumerate(reqs))
    done = {}
    while pending or len(batch):
        if pending and batch.can_admit(len(pending[0][1][0]), pending[0][1][1]):
            i, (p, sp) = pending.pop(0)
            batch.add(i, p, sp)
        for ev in batch.step():
            if ev.finished:
                done[ev.request_id] = (ev.gen_ids, ev.nfe, ev.forwards)
                batch.remove(ev.request_id)
    assert [done[i][:2] for i in range(len(reqs))] == [(a.gen_ids, a.nfe) for a in alone]
    assert all(f <= n for _, n, f in done.values())
    if budget == 0:
        assert batch.draft_rows_run == 0 and all(f == n for _, n, f in done.values())
    if budget >= 100_000:
        assert batch.steps_accepted > 0 and batch.draft_rows_run > 0
    if budget == 60:  # room for few drafts: some rows were left out, answers unchanged
        assert batch.draft_rows_run > 0


def test_a_full_batch_never_drafts(other2):
    """A step whose committed rows already use the token budget runs no draft row."""
    sp = SamplingParams(gen_length=16, block_length=8, steps=8, threshold=1.0, draft_depth=8)
    batch = make_batch(other2.model, other2.special, capacity_tokens=1024, max_requests=4,
                       draft_budget=3 * 8, adaptive_drafting=False)  # three requests' current blocks fill it
    for i in range(3):
        batch.add(i, [7 + i] * 9, sp)
    while len(batch):
        for ev in batch.step():
            assert ev.forward_steps == 1 and ev.draft_rows == 0
            if ev.finished:
                batch.remove(ev.request_id)
    assert batch.draft_rows_run == 0


def test_batch_default_depth_and_request_override(other2):
    sp = SamplingParams(gen_length=24, block_length=8, steps=8, threshold=1.0)
    plain = generate(other2, [[1, 2, 3]], sp)[0]
    drafted = generate(other2, [[1, 2, 3]], sp, draft_depth=4)[0]
    assert drafted.gen_ids == plain.gen_ids and plain.forwards == plain.nfe
    assert drafted.forwards < plain.forwards
    off = generate(other2, [[1, 2, 3]], replace(sp, draft_depth=0), draft_depth=4)[0]
    assert off.forwards == off.nfe  # the request's own 0 wins over the batch default


@pytest.mark.parametrize("dtype,batched", [("float32", False), ("float32", True), ("float64", True)])
def test_golden_conformance_with_drafts(dtype, batched, capsys):
    args = ["--model", str(TINY_LLADA2), "--cases", str(TINY_LLADA2 / "cases.json"), "--dtype", dtype,
            "--draft-depth", "4"]
    rc = conformance.main(args + (["--batched"] if batched else []))
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.strip().splitlines()
    assert lines[-1] == "16 passed, 0 failed"
    fwd, ref = int(lines[-2].split()[1].rstrip(",")), int(lines[-2].split()[3])
    assert fwd < ref
