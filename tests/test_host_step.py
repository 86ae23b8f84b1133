"""The CPU's host-planned step (`sampler.host_step`) against the device step it stands in for.

Two batches over the same model take the same requests (joining at the same steps); one runs
`host_step`, the other `device_step` at the same exact shapes. After every step the read-back
buffers, the token buffers, the state rows and the K/V buffers are compared bit for bit, and the
events field by field, on random mixes of every mode: temperature 0 and > 0, random remasking, CFG,
the three cache modes, threshold decoding, infilling (suffixes and marked spans), logprobs, EOS
bans and bias, deferred stops and sampling filters.
"""

import random

import pytest
import torch

from ckpt_factory import make_checkpoint
from sampler import host_step as hs
from sampler.params import SamplingParams
from sampler.strategies import make_batch, rows_needed
from weights.checkpoint import load_checkpoint

VOCAB = 150


@pytest.fixture(scope="module", params=["float32", "float64"])
def model(tmp_path_factory, request):
    d = make_checkpoint(tmp_path_factory.mktemp("hs") / "m", d_model=64, n_layers=2, n_heads=4,
                        n_kv_heads=2, mlp_hidden_size=72, vocab_size=VOCAB, seed=31)
    return load_checkpoint(d, device="cpu", dtype=request.param)


MODES = [
    dict(), dict(cache="prefix"), dict(cache="dual"), dict(threshold=0.3), dict(threshold=0.2, cache="dual"),
    dict(remasking="random", seed=5, cache="dual"), dict(cfg_scale=1.5), dict(cfg_scale=1.0, threshold=0.4),
    dict(temperature=0.8, seed=123, cache="prefix"), dict(temperature=0.5, seed=9, threshold=0.2, cache="dual"),
    dict(ban_eos=True, cache="dual"), dict(defer_eos=True), dict(eos_bias=-1.5, cache="dual"),
    dict(logprobs=3), dict(temperature=0.7, seed=3, top_p=0.8, logprobs=2, cache="dual"),
    dict(temperature=0.9, seed=4, top_k=5, min_p=0.05),
    dict(min_tokens=16), dict(min_tokens=5, temperature=0.6, seed=2, cache="dual"),
]


def _request(rnd, extra, mask_id):
    gen, block = rnd.choice([(16, 8), (24, 8), (16, 16), (20, 4)])
    steps = None if "threshold" in extra else gen // rnd.choice([1, 2, block])  # block: one step per block
    prompt = [rnd.randrange(0, VOCAB - 11) for _ in range(rnd.randrange(1, 14))]
    suffix, span = (), None
    if rnd.random() < 0.3:  # infilling: a suffix, sometimes a span with fixed tokens
        suffix = [rnd.randrange(0, VOCAB - 11) for _ in range(rnd.randrange(1, 6))]
        if rnd.random() < 0.5:
            span = [mask_id if rnd.random() < 0.6 else rnd.randrange(0, VOCAB - 11) for _ in range(gen)]
            span[0] = mask_id
    return prompt, SamplingParams(gen_length=gen, block_length=block, steps=steps, **extra), suffix, span


def _pair(bundle, reqs, max_requests, draft_budget=0):
    rows = sum(rows_needed(len(p) + len(s), sp) for p, sp, s, _ in reqs)
    out = []
    for host in (True, False):
        b = make_batch(bundle.model, bundle.special, capacity_tokens=rows + 5, max_requests=max_requests,
                       draft_budget=draft_budget, adaptive_drafting=False)
        b.host_planned = host
        out.append(b)
    return out


def _same_buffers(a, b):
    """Tokens, state and guesses equal everywhere; K/V in every region a later step reads (those of
    cached requests: a step with no cached row writes none, nothing reads them)."""
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.state, b.state)
    assert torch.equal(a.fstate, b.fstate)
    for req in a.requests.values():
        if req.params.cache != "none":
            for x, y in zip(list(a.kv.k) + list(a.kv.v), list(b.kv.k) + list(b.kv.v)):
                assert torch.equal(x[req.offset:req.offset + req.rows], y[req.offset:req.offset + req.rows])
    assert (a.store.guess is None) == (b.store.guess is None)
    assert a.store.guess is None or torch.equal(a.store.guess, b.store.guess)


def _drive(bundle, reqs, arrivals, max_requests, late, draft_budget=0):
    fast, slow = _pair(bundle, reqs, max_requests, draft_budget)
    order = sorted(range(len(reqs)), key=lambda i: arrivals[i])
    done, step_no, host_steps = set(), 0, 0
    while len(done) < len(reqs):
        while order and arrivals[order[0]] <= step_no and fast.can_admit(len(reqs[order[0]][0]) + len(reqs[order[0]][2]), reqs[order[0]][1]):
            i = order.pop(0)
            p, sp, s, span = reqs[i]
            for b in (fast, slow):
                b.add(i, p, sp, suffix_ids=s, span_ids=span)
        plan, bucket = fast._plan()
        host_steps += bucket is not None and hs.usable(bucket, fast.model)
        evs = [b.step_async() if late else b.step() for b in (fast, slow)]
        assert [vars(e) for e in evs[0]] == [vars(e) for e in evs[1]]
        _same_buffers(fast, slow)
        for e in evs[0]:
            if e.finished:
                done.add(e.request_id)
                fast.remove(e.request_id)
                slow.remove(e.request_id)
        step_no += 1
        assert step_no < 3000
    assert fast.forwards == slow.forwards
    return host_steps, step_no


@pytest.mark.parametrize("extra", MODES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()) or "plain")
def test_alone_every_mode_is_the_device_step(model, extra):
    rnd = random.Random(hash(str(sorted(extra.items()))) & 0xFFFF)
    for _ in range(2):
        req = _request(rnd, extra, model.special.mask)
        assert _drive(model, [req], [0], 1, late=False)[0] > 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_mixes_with_joins_are_the_device_step(model, seed):
    rnd = random.Random(seed)
    reqs = [_request(rnd, rnd.choice(MODES), model.special.mask) for _ in range(10)]
    arrivals = [rnd.randrange(0, 25) for _ in reqs]
    assert _drive(model, reqs, arrivals, 5, late=seed == 2)[0] > 0


def test_drafting_requests_hand_steps_back_and_forth(model):
    """With a draft pool, steps with a drafting request run `device_step` (the drafting stage) and
    the others the host step: the state each leaves is the other's to continue from."""
    rnd = random.Random(8)
    drafting = [dict(draft_depth=2, cache="dual"), dict(draft_depth=3), dict(draft_depth=2, threshold=0.3)]
    reqs = [_request(rnd, rnd.choice(MODES[:13] + drafting), model.special.mask) for _ in range(8)]
    reqs += [_request(rnd, d, model.special.mask) for d in drafting]
    arrivals = [rnd.randrange(0, 30) for _ in reqs]
    host, steps = _drive(model, reqs, arrivals, 4, late=False, draft_budget=1024)
    assert 0 < host < steps


def test_steps_it_does_not_take_go_to_the_device_step(model):
    """Drafting and constrained buckets are refused (they run `device_step`)."""
    from sampler.device_step import Bucket
    assert hs.usable(Bucket.fit(1, 8, 8, 8, False, pad=False), model.model)
    assert not hs.usable(Bucket.fit(1, 8, 8, 8, False, pad=False, depth=2), model.model)
    assert not hs.usable(Bucket.fit(1, 8, 8, 8, False, pad=False, constrained=True), model.model)


def test_logsumexp_given_the_max_is_torchs_bits():
    """The greedy candidates' normaliser reuses the row maximum: the same bits as torch.logsumexp,
    with -inf entries (a banned EOS) and at the vocabulary sizes the server meets."""
    gen = torch.Generator().manual_seed(0)
    for n, vocab, scale in [(1, 7, 1.0), (16, 512, 10.0), (8, 4097, 0.01), (3, 126464, 3.0)]:
        l = (torch.randn(n, vocab, generator=gen, dtype=torch.float64) * scale)
        l[:, vocab // 2] = float("-inf")
        best, _ = torch.max(l, dim=-1)
        _, conf = hs._greedy(l, [], 0)
        want = torch.exp(best - torch.logsumexp(l, dim=-1)).to(torch.float32)
        assert torch.equal(conf, want)


def test_the_mask_id_redraw_is_the_device_step(model, monkeypatch):
    """A greedy candidate equal to the mask id sends the host step to the general draw (the mask
    banned, the row drawn again), as the device step does: a head whose mask row outscores token
    0's makes it happen on many rows; events and buffers stay the device step's."""
    head = model.model.lm_head if model.model.lm_head is not None else model.model.embedding
    saved = head.detach().clone()
    draws = []
    real_draw = hs.cd.draw
    monkeypatch.setattr(hs.cd, "draw", lambda *a, **k: draws.append(1) or real_draw(*a, **k))
    try:
        with torch.no_grad():
            head[model.special.mask] = 1.5 * head[0]
        rnd = random.Random(11)
        for extra in (dict(), dict(cache="dual"), dict(threshold=0.3)):
            _drive(model, [_request(rnd, extra, model.special.mask) for _ in range(3)], [0, 0, 2], 3, late=False)
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert draws  # the host step met the mask id and drew again
