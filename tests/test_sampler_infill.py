"""Infilling (suffix and marked spans), sampling filters and commit-time logprobs in the batched
step, against the reference oracle in every mode, alone and in mixed batches."""

import math
import zlib
import random

import pytest
import torch

from ckpt_factory import make_checkpoint
from sampler.generate import generate
from sampler.params import SamplingParams
from sampler.reference import reference_generate
from weights.checkpoint import load_checkpoint

MODES = [
    dict(),
    dict(remasking="random", seed=5),
    dict(cfg_scale=1.5),
    dict(threshold=0.3),
    dict(temperature=0.8, seed=123),
    dict(temperature=0.9, seed=9, top_k=5),
    dict(temperature=1.0, seed=4, top_p=0.6, min_p=0.05),
    dict(temperature=0.5, seed=9, threshold=0.2, top_p=0.8),
    dict(ban_eos=True, defer_eos=True),
]
CACHED = [dict(cache="prefix"), dict(cache="dual"), dict(cache="dual", threshold=0.4)]


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    d = make_checkpoint(tmp_path_factory.mktemp("other") / "m", d_model=64, n_layers=3, n_heads=4,
                        n_kv_heads=2, mlp_hidden_size=72, vocab_size=150, seed=11)
    return load_checkpoint(d, device="cpu", dtype="float64")


@pytest.fixture(scope="module")
def golden(golden_dir):
    return load_checkpoint(golden_dir, device="cpu", dtype="float32")


def _name(m):
    return ",".join(f"{k}={v}" for k, v in m.items()) or "plain"


def _span(rnd, g, mask):
    """A span with fixed tokens between masked gaps; first and last positions masked."""
    span = [mask if rnd.random() < 0.5 else rnd.randrange(0, 139) for _ in range(g)]
    span[0] = span[-1] = mask
    return span


@pytest.mark.parametrize("extra", MODES, ids=_name)
def test_suffix_matches_the_oracle(other, extra):
    rnd = random.Random(zlib.crc32(_name(extra).encode()) & 0xFFFF)
    mask = other.special.mask
    for gen, block, steps in [(16, 8, 8), (12, 12, 12)]:
        params = SamplingParams(gen_length=gen, block_length=block, steps=steps, **extra)
        prompt = [rnd.randrange(0, 139) for _ in range(rnd.randrange(1, 8))]
        suffix = [rnd.randrange(0, 139) for _ in range(rnd.randrange(1, 9))]
        want, fwd = reference_generate(other.model, prompt, params, mask, other.special.stop, suffix_ids=suffix)
        got = generate(other, [prompt], params, suffixes=[suffix])[0]
        assert got.gen_ids == want
        if params.threshold is None:
            assert got.nfe == fwd == steps


@pytest.mark.parametrize("extra", MODES + CACHED, ids=_name)
def test_marked_span_matches_the_oracle(other, extra):
    rnd = random.Random(7 + (zlib.crc32(_name(extra).encode()) & 0xFFFF))
    mask = other.special.mask
    for g in (9, 14):
        span = _span(rnd, g, mask)
        masks = span.count(mask)
        params = SamplingParams(gen_length=g, steps=None if extra.get("threshold") else masks, **extra)
        prompt = [rnd.randrange(0, 139) for _ in range(rnd.randrange(1, 6))]
        suffix = [rnd.randrange(0, 139) for _ in range(rnd.randrange(0, 5))]
        got = generate(other, [prompt], params, suffixes=[suffix], spans=[span])[0]
        assert [t for t, s in zip(got.gen_ids, span) if s != mask] == [s for s in span if s != mask]
        assert mask not in got.gen_ids
        if params.cache != "none":
            continue  # the caches approximate (stale keys): the oracle runs exact mode only
        want, fwd = reference_generate(other.model, prompt, params, mask, other.special.stop,
                                       suffix_ids=suffix, span_ids=span)
        assert got.gen_ids == want
        if params.threshold is None:
            assert got.nfe == fwd == masks


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_suffix_is_context_like_the_rest(other, cache):
    """Caches treat the suffix like any canvas row: at one step per block the cached runs equal
    the exact run (every step is a block start, so nothing is stale)."""
    mask = other.special.mask
    prompt, suffix = [3, 9, 27], [81, 100, 5, 6]
    exact = SamplingParams(gen_length=8, block_length=1, steps=8)
    want, _ = reference_generate(other.model, prompt, exact, mask, suffix_ids=suffix)
    got = generate(other, [prompt], SamplingParams(gen_length=8, block_length=1, steps=8, cache=cache),
                   suffixes=[suffix])[0]
    assert got.gen_ids == want


def test_batch_invariance_with_suffixes_of_different_lengths(golden):
    rnd = random.Random(99)
    mask = golden.special.mask
    reqs = []
    for i, sp in enumerate([SamplingParams(gen_length=16, block_length=8, steps=16),
                            SamplingParams(gen_length=8, steps=8, temperature=0.9, seed=3, top_k=7),
                            SamplingParams(gen_length=16, block_length=8, steps=8, cache="dual"),
                            SamplingParams(gen_length=12, steps=12, cfg_scale=1.0),
                            SamplingParams(gen_length=8, block_length=4, threshold=0.3, cache="prefix")]):
        prompt = [rnd.randrange(0, 290) for _ in range(rnd.randrange(1, 12))]
        suffix = [rnd.randrange(0, 290) for _ in range(3 * i)]
        reqs.append((prompt, sp, suffix, None))
    span = _span(rnd, 10, mask)
    reqs.append(([1, 2, 3], SamplingParams(gen_length=10, steps=span.count(mask)), [7, 7], span))
    alone = [generate(golden, [p], sp, suffixes=[s], spans=[sp_ids])[0].gen_ids for p, sp, s, sp_ids in reqs]
    order = list(range(len(reqs)))
    rnd.shuffle(order)
    out = generate(golden, [reqs[i][0] for i in order], [reqs[i][1] for i in order],
                   suffixes=[reqs[i][2] for i in order], spans=[reqs[i][3] for i in order])
    for j, i in enumerate(order):
        assert out[j].gen_ids == alone[i], f"request {i} changed when batched"


@pytest.mark.parametrize("extra", [dict(), dict(temperature=0.9, seed=2, top_k=4),
                                   dict(cfg_scale=1.0), dict(threshold=0.3, cache="dual")], ids=_name)
def test_logprobs_equal_the_oracle(other, extra):
    mask = other.special.mask
    prompt = [5, 17, 40, 33]
    params = SamplingParams(gen_length=12, block_length=6, steps=None if extra.get("threshold") else 6,
                            logprobs=3, **extra)
    trace = {}
    want, _ = reference_generate(other.model, prompt, params, mask, other.special.stop, trace=trace)
    res = generate(other, [prompt], params, keep_events=True)[0]
    got = {}
    for ev in res.events:
        assert len(ev.logprobs) == len(ev.positions) == len(ev.top_logprobs)
        for p, t, lp, top in zip(ev.positions, ev.token_ids, ev.logprobs, ev.top_logprobs):
            got[p] = (ev.step, t, lp, top)
    assert sorted(got) == list(range(12))
    if extra.get("cache"):
        return  # the oracle runs exact mode; a cached run is checked for shape and coverage only
    assert res.gen_ids == want
    for p, (step, t, lp, top) in got.items():
        w_step, w_lp, w_top = trace[p]
        assert step == w_step
        assert lp == pytest.approx(w_lp, abs=1e-5)  # float32 on the way back
        assert [a for a, _ in top] == [a for a, _ in w_top]
        assert [v for _, v in top] == pytest.approx([v for _, v in w_top], abs=1e-5)


def test_logprobs_are_consistent_with_confidences(golden):
    """At low-confidence remasking the confidence is exp(logprob): the two are one quantity."""
    params = SamplingParams(gen_length=16, block_length=8, steps=16, logprobs=5)
    res = generate(golden, [[4, 8, 15, 16, 23, 42]], params, keep_events=True)[0]
    for ev in res.events:
        for c, lp, t, top in zip(ev.confidences, ev.logprobs, ev.token_ids, ev.top_logprobs):
            assert math.exp(lp) == pytest.approx(c, rel=1e-5)
            assert len(top) == 5 and top[0][1] >= lp - 1e-6
            assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))


def test_requests_without_logprobs_get_none(golden):
    res = generate(golden, [[1, 2, 3]], SamplingParams(gen_length=8, steps=8), keep_events=True)[0]
    assert all(ev.logprobs is None for ev in res.events)


def test_filters_do_not_change_greedy_requests(golden):
    base = SamplingParams(gen_length=16, block_length=8, steps=16)
    filt = SamplingParams(gen_length=16, block_length=8, steps=16, top_k=2, top_p=0.3, min_p=0.5)
    assert generate(golden, [[9, 9, 9]], base)[0].gen_ids == generate(golden, [[9, 9, 9]], filt)[0].gen_ids


def test_top_k_one_is_greedy_in_tokens(golden):
    """top_k 1 at any temperature keeps only the argmax: the same tokens as greedy decoding
    (confidences differ: the restricted distribution gives the kept token probability 1, so the
    commit order is by position; compare per position with one token per step and one block each)."""
    greedy = SamplingParams(gen_length=8, block_length=1, steps=8)
    hot = SamplingParams(gen_length=8, block_length=1, steps=8, temperature=1.5, seed=3, top_k=1)
    assert generate(golden, [[5, 6]], greedy)[0].gen_ids == generate(golden, [[5, 6]], hot)[0].gen_ids
