"""Monte Carlo likelihood scoring: the batched estimate against a direct computation on the golden
checkpoint, its determinism, its variance, and the engine serving scoring requests."""

import queue
import statistics

import pytest
import torch

from sampler.likelihood import ScoreBatch, ScoreJob, sample_masks
from sampler.reference import reference_loglikelihood
from sampler.scheduler import Engine, EngineConfig
from weights.checkpoint import load_checkpoint

PAIRS = [
    ([5, 17, 40, 33], [7, 99, 12, 150, 8]),
    ([1, 2, 3], [250]),
    ([200, 201, 202, 203, 204, 205], [10, 11]),
    ([77], [3, 4, 5, 6, 7, 8, 9, 10, 11]),
]


@pytest.fixture(scope="module")
def golden(golden_dir):
    return load_checkpoint(golden_dir, device="cpu", dtype="float64")


def score(bundle, pairs, mc, seed=0, cfg=0.0, budget=10_000):
    sb = ScoreBatch(bundle.model, bundle.special.mask)
    job = ScoreJob(pairs=pairs, mc_samples=mc, seed=seed, cfg_scale=cfg, sink=None)
    sb.add(job)
    done = []
    while len(sb):
        done += sb.run(sb.take(budget))
    assert done == [job]
    return ScoreBatch.results(job)


@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_batched_estimate_equals_the_direct_computation(golden, cfg):
    mask = golden.special.mask
    got = score(golden, PAIRS, mc=8, seed=3, cfg=cfg, budget=40)  # several packed forwards
    for (ctx, cont), r in zip(PAIRS, got):
        masks = sample_masks(3, ctx, cont, 8)
        values, greedy = reference_loglikelihood(golden.model, ctx, cont, masks, mask, cfg)
        assert r.logprob == pytest.approx(statistics.fmean(values), abs=1e-9)
        if len(set(values)) > 1:
            assert r.stderr == pytest.approx(statistics.stdev(values) / 8 ** 0.5, abs=1e-9)
        assert r.is_greedy == greedy
        assert r.tokens == len(cont)
        distinct = len(set(masks) | {tuple(range(len(cont)))})
        assert r.forwards == distinct * (2 if cfg else 1)


def test_one_token_continuation_is_exact_with_one_forward(golden):
    ctx, cont = [9, 8, 7], [42]
    r, = score(golden, [(ctx, cont)], mc=32)
    logits = golden.model.full_logits(torch.tensor([ctx + [golden.special.mask]]))[0, -1]
    assert r.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[42]), abs=1e-12)
    assert r.forwards == 1 and r.stderr == 0.0


def test_is_greedy_true_for_the_models_own_argmax(golden):
    ctx = [5, 6, 7]
    logits = golden.model.full_logits(torch.tensor([ctx + [golden.special.mask] * 3]))[0, 3:]
    cont = logits.argmax(-1).tolist()
    wrong = [(cont[0] + 1) % 300] + cont[1:]
    a, b = score(golden, [(ctx, cont), (ctx, wrong)], mc=2)
    assert a.is_greedy and not b.is_greedy


def test_deterministic_per_seed_and_independent_of_batchmates(golden):
    a = score(golden, PAIRS, mc=6, seed=11)
    b = score(golden, list(reversed(PAIRS)), mc=6, seed=11)[::-1]
    c = score(golden, PAIRS[:1], mc=6, seed=11, budget=13)
    assert [x.logprob for x in a] == pytest.approx([x.logprob for x in b], abs=1e-12)
    assert a[0].logprob == pytest.approx(c[0].logprob, abs=1e-12)
    d = score(golden, PAIRS, mc=6, seed=12)
    assert a[0].logprob != d[0].logprob


def test_variance_shrinks_with_mc_samples(golden):
    pair = [PAIRS[3]]
    few = [score(golden, pair, mc=2, seed=s)[0] for s in range(12)]
    many = [score(golden, pair, mc=32, seed=s)[0] for s in range(12)]
    spread_few = statistics.stdev(r.logprob for r in few)
    spread_many = statistics.stdev(r.logprob for r in many)
    assert spread_many < 0.5 * spread_few, (spread_few, spread_many)  # ~1/4 expected
    assert statistics.fmean(r.stderr for r in many) < 0.5 * statistics.fmean(r.stderr for r in few)


def test_engine_serves_scoring_requests_beside_generation(golden):
    from sampler.params import SamplingParams
    from sampler.scheduler import Handle

    engine = Engine(golden.model, golden.special, EngineConfig(max_batch_tokens=256)).start()
    try:
        out = queue.Queue()
        jobs = [engine.submit_score(ScoreJob(pairs=PAIRS[i:i + 2], mc_samples=4, seed=1, cfg_scale=0.0,
                                             sink=out.put)) for i in range(3)]
        gen = queue.Queue()
        engine.submit([Handle(prompt_ids=[1, 2, 3], params=SamplingParams(gen_length=8), sink=gen.put)])
        results = [out.get(timeout=60) for _ in jobs]
        assert all(kind == "done" for kind, _ in results)
        direct = score(golden, PAIRS, mc=4, seed=1)
        by_tokens = {r.tokens: r.logprob for r in direct}
        for _, rs in results:
            for r in rs:
                assert r.logprob == pytest.approx(by_tokens[r.tokens], abs=1e-9)
        while True:
            kind, _ = gen.get(timeout=60)
            if kind == "done":
                break
        assert engine.scorer.forwards < sum(r.forwards for _, rs in results for r in rs)  # shared forwards
    finally:
        engine.shutdown(grace=1)


def test_engine_refuses_pairs_larger_than_the_batch(golden):
    from sampler.scheduler import EngineError, RequestTooLarge

    engine = Engine(golden.model, golden.special, EngineConfig(max_batch_tokens=16))
    with pytest.raises(EngineError) as e:
        engine.submit_score(ScoreJob(pairs=[([1] * 10, [2] * 10)], mc_samples=1, seed=0, cfg_scale=0.0, sink=None))
    assert isinstance(e.value, RequestTooLarge) and "max_batch_tokens" in e.value.message
