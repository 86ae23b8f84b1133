"""Sampling filters (top_k, top_p, min_p) against a plain per-row reference written from the rule."""

import math
import random

import pytest
import torch

from kernels import rng
from kernels.selection import RowFilters, apply_filters, restrict_logits, sample_candidates, sample_candidates_reference


def sample(logits, temp, seed, nonce, pos, ban_ids=None, filters=None):
    """Candidates with the filters applied, checking that the static-shape path (CUDA graphs) and
    the dynamic one (only the filtered rows) restrict alike."""
    if filters is not None:
        banned = None
        if ban_ids:
            banned = torch.zeros_like(logits, dtype=torch.bool)
            banned[:, ban_ids] = True
        static = apply_filters(logits, temp, filters, banned, dynamic=False)
        if banned is not None:  # the (rows, columns) form the step passes
            cols = torch.zeros(logits.shape[1], dtype=torch.bool)
            cols[ban_ids] = True
            pair = (torch.ones(logits.shape[0], dtype=torch.bool), cols)
            assert torch.equal(apply_filters(logits, temp, filters, pair, dynamic=True), static)
            assert torch.equal(apply_filters(logits, temp, filters, pair, dynamic=False), static)
        logits = apply_filters(logits, temp, filters, banned, dynamic=True)
        assert torch.equal(static, logits)
    return sample_candidates(logits, temp, seed, nonce, pos, ban_ids=ban_ids)


def kept_plain(row: list[float], t: float, top_k: int, top_p: float, min_p: float) -> set[int]:
    """The kept set, one token at a time: sort by probability (ties by id), cut by each rule."""
    probs = [math.exp(x / t) for x in row]
    z = sum(probs)
    probs = [q / z for q in probs]
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    if top_k > 0:
        order = order[:top_k]
    mass = sum(probs[i] for i in order)
    kept, acc = [], 0.0
    for i in order:
        if top_p < 1 and kept and acc >= top_p:
            break
        kept.append(i)
        acc += probs[i] / mass
    best = probs[kept[0]]
    return {i for i in kept if min_p <= 0 or probs[i] >= min_p * best}


def filters(n, top_k=0, top_p=1.0, min_p=0.0):
    def col(v, dt):
        return torch.tensor(v if isinstance(v, list) else [v] * n, dtype=dt)
    return RowFilters(col(top_k, torch.int64), col(top_p, torch.float64), col(min_p, torch.float64))


@pytest.mark.parametrize("case", range(6))
def test_restrict_matches_the_plain_rule(case):
    r = random.Random(case)
    n, vocab = 12, 40
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(case)) * r.choice([0.5, 2, 4])
    temps = [r.choice([0.3, 1.0, 1.7]) for _ in range(n)]
    ks = [r.choice([0, 1, 3, 10, 100]) for _ in range(n)]
    ps = [r.choice([1.0, 0.9, 0.5, 0.05]) for _ in range(n)]
    ms = [r.choice([0.0, 0.05, 0.3]) for _ in range(n)]
    out = restrict_logits(logits, torch.tensor(temps), filters(n, ks, ps, ms))
    for i in range(n):
        want = kept_plain(logits[i].tolist(), temps[i], ks[i], ps[i], ms[i])
        got = set(torch.isfinite(out[i]).nonzero().squeeze(1).tolist())
        assert got == want, (i, temps[i], ks[i], ps[i], ms[i])
        assert torch.equal(out[i][list(want)], logits[i].double()[list(want)])


def test_filtered_candidates_and_renormalised_confidence():
    n, vocab = 16, 50
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(n, vocab, generator=gen) * 3
    temp = torch.full((n,), 0.8)
    seed = torch.arange(n, dtype=torch.int64) + 11
    nonce = torch.full((n,), 3, dtype=torch.int64)
    pos = torch.arange(n, dtype=torch.int64)
    f = filters(n, top_k=[0, 5] * 8, top_p=[0.7, 1.0] * 8, min_p=0.02)
    x0, conf = sample(logits, temp, seed, nonce, pos, filters=f)
    for i in range(n):
        row = logits[i].tolist()
        kept = kept_plain(row, 0.8, int(f.top_k[i]), float(f.top_p[i]), float(f.min_p[i]))
        # Gumbel-max over the kept tokens with the server's noise, written out by hand
        u = rng.uniform(seed[i], nonce[i], pos[i], torch.arange(vocab)).tolist()
        want = max(kept, key=lambda j: (row[j] - 0.8 * math.log(-math.log(u[j])), -j))
        assert int(x0[i]) == want
        z = sum(math.exp(row[j]) for j in kept)
        assert float(conf[i]) == pytest.approx(math.exp(row[want]) / z, rel=1e-5)


def test_greedy_rows_and_rows_without_filters_are_unchanged():
    n, vocab = 10, 30
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(1)) * 2
    temp = torch.tensor([0.0] * 5 + [1.0] * 5)
    seed, nonce, pos = torch.arange(n), torch.zeros(n, dtype=torch.int64), torch.arange(n)
    base = sample_candidates_reference(logits, temp, seed, nonce, pos)
    # filters on the greedy rows, neutral values on the sampled rows: nothing may change
    neutral = filters(n, top_k=[2] * 5 + [0] * 5, top_p=[0.1] * 5 + [1.0] * 5)
    x0, conf = sample(logits, temp, seed, nonce, pos, filters=neutral)
    assert torch.equal(x0, base[0]) and torch.equal(conf, base[1])


def test_ban_applies_before_the_filter():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    one = torch.ones(1, dtype=torch.int64)
    x0, conf = sample(logits, torch.ones(1), one, one, one, ban_ids=[0], filters=filters(1, top_k=1))
    assert int(x0) == 1 and float(conf) == pytest.approx(1.0)


def test_filtered_sampling_follows_the_restricted_distribution():
    vocab = 6
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]]).repeat(4000, 1)
    n = logits.shape[0]
    temp = torch.ones(n)
    x0, _ = sample(logits, temp, torch.arange(n), torch.zeros(n, dtype=torch.int64),
                              torch.zeros(n, dtype=torch.int64), filters=filters(n, top_k=3))
    counts = torch.bincount(x0, minlength=vocab).double() / n
    p = torch.softmax(logits[0, :3].double(), 0)
    assert counts[3:].sum() == 0
    assert torch.allclose(counts[:3], p, atol=0.03), (counts, p)
