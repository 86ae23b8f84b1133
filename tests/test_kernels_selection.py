"""The Triton selection kernels against the PyTorch references, and the sampler's statistics.

Without a GPU they run under the Triton interpreter on CPU tensors (tests/kernel_testing.py sets
TRITON_INTERPRET=1 before triton is imported; checked). With a GPU (or TRITON_INTERPRET=0 exported) the same tests
run the compiled kernels on CUDA.
Inputs are fresh random draws every run; the seed is printed and named in every failure
(KERNEL_TEST_SEED=<n> replays one).
"""

import pytest
import torch

from kernel_testing import SEED, case_random, dtypes, kernel_module  # first: chooses the interpreter

import triton  # noqa: E402
from kernels import rng  # noqa: E402
from kernels.selection import (  # noqa: E402
    sample_candidates_reference,
    transfer_mask_loop,
    transfer_mask_reference,
)

sel_mod, DEVICE = kernel_module("kernels.selection_triton", "_sample_kernel")
INTERPRET = DEVICE == "cpu"

# Rows with no finite logit compute -inf - -inf on purpose (NaN confidence, as the reference).
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]


DTYPE_PARAMS, DTYPES = dtypes(INTERPRET)  # bf16 on CUDA only
NEG_INF = float("-inf")


@pytest.fixture
def gen(request):
    return case_random(request)


def _i64(values):
    return torch.tensor(values, dtype=torch.int64, device=DEVICE)


# ---------------------------------------------------------------------------------------------
# Random bits: the kernel must reproduce kernels.rng bit for bit.


def test_rng_bits_identical_to_reference(gen):
    n = 512
    seed = torch.randint(-(2**63), 2**63 - 1, (n,), dtype=torch.int64, device=DEVICE)
    seed[:4] = _i64([0, -1, 2**63 - 1, -(2**63)])
    nonce = torch.randint(0, 2**40, (n,), dtype=torch.int64, device=DEVICE)
    pos = torch.randint(0, 1 << 20, (n,), dtype=torch.int64, device=DEVICE)
    tok = torch.randint(0, 2**31 - 1, (n,), dtype=torch.int64, device=DEVICE)
    tok[:3] = _i64([0, 126463, rng.REMASK_STREAM])
    bits, _ = sel_mod.rng_bits_triton(seed, nonce, pos, tok)
    want = rng.bits(rng.row_key(seed, nonce, pos), tok)
    diff = (bits != want).nonzero()[:5].squeeze(1).tolist()
    assert not diff, f"seed {SEED}: bits differ at {diff}"


def test_neg_log2_uniform_accurate_over_the_whole_range(gen):
    raw = torch.randint(0, 2**32, (700,), dtype=torch.int64, device=DEVICE)
    edges = [0, 1, 2, 2**24, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2**28, 2**32 - 2**28 - 1,
             2**32 - 2**28 + 1, 2**32 - 2**27 - 1,
             2**32 - 2**20, 2**32 - 3, 2**32 - 2, 2**32 - 1]
    raw[: len(edges)] = _i64(edges)
    z = torch.zeros_like(raw)
    _, e = sel_mod.rng_bits_triton(z, z, z, z, raw=raw)
    want = -torch.log2(rng.to_unit(raw))
    rel = ((e.double() - want) / want).abs()
    assert torch.isfinite(e).all() and (e > 0).all(), f"seed {SEED}"
    # Compiled, log2 is the hardware approximation (absolute error ~2^-22.6): a looser bound.
    bound = 2e-6 if INTERPRET else 6e-6
    assert rel.max() < bound, f"seed {SEED}: rel err {rel.max():.3g} at raw {raw[rel.argmax()]}"


# ---------------------------------------------------------------------------------------------
# Candidate sampling.


# Compiled on a GPU, each new vocabulary size would run the autotuner: pin the chunk there, and
# exercise the autotuned launch in one test of its own.
FIXED_V = None if INTERPRET else 64


def _run_sample(logits, temp, seed, nonce, pos, ban, block_v=FIXED_V, ban_rows=None):
    n = logits.shape[0]
    x0 = torch.full((n,), -7, dtype=torch.int64, device=logits.device)
    conf = torch.full((n,), float("nan"), dtype=torch.float32, device=logits.device)
    out = sel_mod.sample_candidates_triton(logits, temp, seed, nonce, pos, ban, out=(x0, conf),
                                           ban_rows=ban_rows, _block_v=block_v)
    assert out[0].data_ptr() == x0.data_ptr() and out[1].data_ptr() == conf.data_ptr()
    return x0, conf


def _compare_sample(logits, temp, seed, nonce, pos, ban, block_v=FIXED_V, ctx=""):
    x0, conf = _run_sample(logits, temp, seed, nonce, pos, ban, block_v)
    rx0, rconf = sample_candidates_reference(logits, temp, seed, nonce, pos, ban)
    msg = f"seed {SEED} {ctx} vocab={logits.shape[1]} ban={ban}"
    assert (x0 >= 0).all(), f"x0 not written: {msg}"
    bad = (x0 != rx0).nonzero().squeeze(1).tolist()
    assert not bad, (f"token differs in rows {bad[:5]}: kernel {x0[bad[:5]].tolist()} "
                     f"reference {rx0[bad[:5]].tolist()} temps {temp[bad[:5]].tolist()}: {msg}")
    both_nan = torch.isnan(conf) & torch.isnan(rconf)
    assert torch.equal(torch.isnan(conf), torch.isnan(rconf)), f"NaN pattern differs: {msg}"
    close = torch.isclose(conf.double(), rconf.double(), rtol=2e-5, atol=1e-7) | both_nan
    assert close.all(), (f"conf differs in rows {(~close).nonzero().squeeze(1)[:5].tolist()}: "
                         f"{conf[~close][:5].tolist()} vs {rconf[~close][:5].tolist()}: {msg}")


def _row_inputs(n, temps=None):
    seed = torch.randint(-(2**62), 2**62, (n,), dtype=torch.int64, device=DEVICE)
    nonce = torch.randint(0, 1 << 30, (n,), dtype=torch.int64, device=DEVICE)
    pos = torch.randint(0, 4096, (n,), dtype=torch.int64, device=DEVICE)
    temp = torch.zeros(n, dtype=torch.float32, device=DEVICE) if temps is None else torch.tensor(
        temps, dtype=torch.float32, device=DEVICE)
    return temp, seed, nonce, pos


def _awkward_logits(n, vocab, dtype, gen):
    """Random rows plus ties for the max, -inf entries, an all -inf row, a constant row."""
    l = (torch.randn(n, vocab, device=DEVICE) * gen.uniform(0.5, 4.0)).to(dtype)
    a, b = gen.sample(range(vocab), 2)
    lo, hi = min(a, b), max(a, b)
    l[0, lo] = l[0, hi] = l[0].max() + 1  # tie: the first index wins
    l[1, :] = 0.25  # every token tied
    l[2, gen.sample(range(vocab), vocab // 3)] = NEG_INF
    l[3, :] = NEG_INF  # nothing finite: token 0, NaN confidence (as the reference)
    l[4, :-1] = NEG_INF  # only the last token (the vocabulary's ragged tail) is finite
    return l


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_greedy_rows_match_reference(dtype, gen):
    vocab = gen.choice([203, 257, 330])  # not a multiple of the 64-token chunk
    n = 9
    l = _awkward_logits(n, vocab, dtype, gen)
    temp, seed, nonce, pos = _row_inputs(n)
    _compare_sample(l, temp, seed, nonce, pos, None, ctx=f"{dtype} greedy")


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_banned_ids_are_excluded(dtype, gen):
    vocab, n = 190, 7
    l = _awkward_logits(n, vocab, dtype, gen)
    top = int(l[5].float().argmax())
    l[6, vocab - 1] = 50.0  # ban the tail token that would win
    ban = sorted({top, vocab - 1, 0})
    temp, seed, nonce, pos = _row_inputs(n, [0, 0, 0.8, 0, 0, 0, 1.3])
    _compare_sample(l, temp, seed, nonce, pos, ban, ctx=f"{dtype} ban")
    x0, _ = _run_sample(l, temp, seed, nonce, pos, ban)
    assert not any(int(t) in ban for t in x0[[0, 1, 2, 5, 6]].tolist()), f"seed {SEED}"


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_temperature_rows_draw_the_reference_token(dtype, gen):
    """Mixed temperatures in one batch: every hot row samples exactly the reference's token."""
    vocab, n = gen.choice([150, 321]), 12
    l = _awkward_logits(n, vocab, dtype, gen)
    temps = [gen.choice([0.0, 0.3, 1.0, 2.5]) for _ in range(n)]
    temps[1] = 1.0  # all-tied row at temperature > 0: the noise decides
    temps[2] = 0.7  # -inf entries at temperature > 0
    temps[4] = 1.0  # a single finite token
    # Peaked rows: most chunks cannot beat the leader even with the largest noise (skipped).
    l[5, 3] = 200.0
    l[6, vocab - 2] = 200.0
    l[7, :] = l[7] * 0.1
    l[7, gen.randrange(vocab)] = 3.0
    temps[5], temps[6], temps[7] = 0.5, 1.5, 0.05
    temp, seed, nonce, pos = _row_inputs(n, temps)
    _compare_sample(l, temp, seed, nonce, pos, None, ctx=f"{dtype} hot")


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_ban_limited_to_flagged_rows(dtype, gen):
    """Per-row suppression: the same as the reference run on logits with -inf in flagged rows."""
    vocab, n = 211, 8
    l = _awkward_logits(n, vocab, dtype, gen)
    ban = sorted({int(l[5].float().argmax()), int(l[6].float().argmax()), vocab - 1})
    flags = torch.tensor([gen.random() < 0.5 for _ in range(n)], device=DEVICE)
    flags[5], flags[6] = True, False
    temp, seed, nonce, pos = _row_inputs(n, [0, 1, 0, 0.5, 0, 0, 2.0, 1.0])
    x0, conf = _run_sample(l, temp, seed, nonce, pos, ban, ban_rows=flags)
    masked = l.clone()
    rows = flags.nonzero().squeeze(1)
    masked[rows.unsqueeze(1), torch.tensor(ban, device=DEVICE).unsqueeze(0)] = NEG_INF
    rx0, rconf = sample_candidates_reference(masked, temp, seed, nonce, pos)
    assert torch.equal(x0, rx0), f"seed {SEED}: {x0.tolist()} vs {rx0.tolist()} flags {flags.tolist()}"
    assert torch.allclose(conf, rconf, rtol=2e-5, atol=1e-7, equal_nan=True), f"seed {SEED}"


def test_other_chunk_sizes_and_strided_rows(gen):
    vocab, n = 300, 6
    base = torch.randn(n, vocab + 17, device=DEVICE)
    l = base[:, 5:5 + vocab]  # rows with a stride wider than the vocabulary
    temp, seed, nonce, pos = _row_inputs(n, [0, 1, 0, 0.5, 2, 0])
    for bv in (16, 128, 512):
        _compare_sample(l, temp, seed, nonce, pos, [7], block_v=bv, ctx=f"block_v={bv}")
    # A vocabulary that is an exact multiple of the chunk (no ragged tail).
    l = torch.randn(n, 256, device=DEVICE).to(torch.float16)
    _compare_sample(l, temp, seed, nonce, pos, None, block_v=64, ctx="vocab 256, block_v=64")


def test_autotuned_launch(gen):
    """The launch without a pinned chunk (autotuned on CUDA, 64 under the interpreter)."""
    vocab, n = 1000, 5
    l = _awkward_logits(n, vocab, torch.float16, gen)
    temp, seed, nonce, pos = _row_inputs(n, [0, 1, 0.5, 0, 2])
    _compare_sample(l, temp, seed, nonce, pos, [2, 999], block_v=None, ctx="autotuned")


def test_single_token_vocabulary_and_empty_batch(gen):
    l = torch.randn(3, 1, device=DEVICE)
    temp, seed, nonce, pos = _row_inputs(3, [0, 1, 2])
    _compare_sample(l, temp, seed, nonce, pos, None, ctx="vocab 1")
    x0, conf = sel_mod.sample_candidates_triton(l[:0], temp[:0], seed[:0], nonce[:0], pos[:0])
    assert x0.shape == (0,) and conf.shape == (0,)


def test_reference_temperature_sampling_matches_softmax_frequencies(gen):
    """Golden vectors only cover temperature 0: check the Gumbel-max draws' distribution.

    Many independent draws (distinct nonces) from one row through the reference; the token
    frequencies must match softmax(l / T) (Pearson chi-square, far tail bound).
    """
    vocab, draws = 8, 24000
    for t in (0.5, 1.0, 2.0):
        l = torch.randn(vocab, dtype=torch.float64) * 1.5
        logits = l.to(torch.float32).expand(draws, vocab).to(DEVICE)
        temp = torch.full((draws,), t, dtype=torch.float32, device=DEVICE)
        seed = torch.full((draws,), gen.randrange(2**62), dtype=torch.int64, device=DEVICE)
        nonce = torch.arange(draws, dtype=torch.int64, device=DEVICE)
        pos = torch.full((draws,), gen.randrange(4096), dtype=torch.int64, device=DEVICE)
        x0, _ = sample_candidates_reference(logits, temp, seed, nonce, pos)
        counts = torch.bincount(x0.cpu(), minlength=vocab).double()
        p = torch.softmax(l.to(torch.float32).double() / t, dim=0)
        expected = p * draws
        keep = expected >= 5  # merge rare cells so the chi-square approximation holds
        obs = torch.cat([counts[keep], counts[~keep].sum().view(1)])
        exp = torch.cat([expected[keep], expected[~keep].sum().view(1)])
        if exp[-1] < 5:
            obs, exp = obs[:-1], exp[:-1]
        chi2 = float(((obs - exp) ** 2 / exp).sum())
        dof = obs.numel() - 1
        # For dof <= 8 the chance of chi2 > 45 is below 1e-6.
        assert chi2 < 45, f"seed {SEED} T={t}: chi2 {chi2:.1f} (dof {dof}) counts {counts.tolist()}"


def test_kernel_temperature_sampling_frequencies(gen):
    """The kernel's own draws follow softmax(l / T) too (a smaller sample; interpreter speed)."""
    vocab, draws, t = 5, 600, 1.0
    l = torch.tensor([1.0, 0.0, -0.5, 0.5, -1.0], dtype=torch.float32)
    logits = l.expand(draws, vocab).contiguous().to(DEVICE)
    temp = torch.full((draws,), t, dtype=torch.float32, device=DEVICE)
    seed = torch.full((draws,), gen.randrange(2**62), dtype=torch.int64, device=DEVICE)
    nonce = torch.arange(draws, dtype=torch.int64, device=DEVICE)
    pos = torch.zeros(draws, dtype=torch.int64, device=DEVICE)
    x0, _ = _run_sample(logits, temp, seed, nonce, pos, None, block_v=8)
    counts = torch.bincount(x0.cpu(), minlength=vocab).double()
    exp = torch.softmax(l.double() / t, dim=0) * draws
    chi2 = float(((counts - exp) ** 2 / exp).sum())
    assert chi2 < 40, f"seed {SEED}: chi2 {chi2:.1f} counts {counts.tolist()} expected {exp.tolist()}"


# ---------------------------------------------------------------------------------------------
# Transfer decision.


def _requests(gen, tied):
    counts = [0, 1, gen.randint(2, 15), 16, 17, gen.randint(18, 60), gen.randint(1, 40)]
    gen.shuffle(counts)
    cu = [0]
    for c in counts:
        cu.append(cu[-1] + c)
    n = cu[-1]
    if tied:
        conf = torch.randint(0, 4, (n,), device=DEVICE).float() / 4 + 0.1
    else:
        conf = torch.rand(n, device=DEVICE)
    non_cand = torch.rand(n, device=DEVICE) < 0.3
    conf[non_cand] = NEG_INF
    b = len(counts)
    finite = [int(torch.isfinite(conf[cu[i]:cu[i + 1]]).sum()) for i in range(b)]
    ks, thr = [], []
    for i in range(b):
        choice = gen.randrange(6)
        ks.append([0, finite[i], finite[i] + 3, gen.randint(0, max(finite[i], 0)), 1, 2][choice])
        thr.append(0.0)
    for i in gen.sample(range(b), 3):  # threshold rule on some requests
        thr[i] = gen.choice([0.35, 0.6, 2.0])  # 2.0: above every confidence, only the top row
    cu_t = torch.tensor(cu, dtype=torch.int64, device=DEVICE)
    return conf, cu_t, _i64(ks), torch.tensor(thr, dtype=torch.float32, device=DEVICE)


def _run_transfer(conf, cu, k, thr, blocks=None):
    out = torch.full((conf.shape[0],), 0xAA, dtype=torch.uint8, device=conf.device)
    res = sel_mod.transfer_mask_triton(conf, cu, k, thr, out=out, _blocks=blocks)
    assert res.dtype == torch.bool and res.data_ptr() == out.data_ptr()
    assert ((out == 0) | (out == 1)).all(), f"seed {SEED}: unwritten rows {(out > 1).nonzero()}"
    return res


@pytest.mark.parametrize("blocks", [None, (32, 16), (16, 64)])
def test_transfer_mask_matches_references(blocks, gen):
    conf, cu, k, thr = _requests(gen, tied=False)
    got = _run_transfer(conf, cu, k, thr, blocks)
    ref = transfer_mask_reference(conf, cu, k, thr)
    loop = transfer_mask_loop(conf, cu, k, thr)
    ctx = f"seed {SEED} cu={cu.tolist()} k={k.tolist()} thr={thr.tolist()}"
    assert torch.equal(ref, loop), f"references disagree: {ctx}"
    assert torch.equal(got, ref), f"rows {(got != ref).nonzero().squeeze(1).tolist()}: {ctx}"


def test_transfer_mask_ties_follow_the_reference_order(gen):
    conf, cu, k, thr = _requests(gen, tied=True)
    got = _run_transfer(conf, cu, k, thr)
    ref = transfer_mask_reference(conf, cu, k, thr)
    ctx = f"seed {SEED} cu={cu.tolist()} k={k.tolist()} thr={thr.tolist()}"
    assert torch.equal(got, ref), f"rows {(got != ref).nonzero().squeeze(1).tolist()}: {ctx}"
    # The loop's topk may break ties differently, but it picks as many rows per request.
    loop = transfer_mask_loop(conf, cu, k, thr)
    c = cu.tolist()
    for b in range(len(c) - 1):
        assert int(got[c[b]:c[b + 1]].sum()) == int(loop[c[b]:c[b + 1]].sum()), ctx


def test_transfer_mask_edge_counts(gen):
    """k = 0 picks nothing, k = all candidates picks every finite row and no -inf row."""
    conf = torch.tensor([0.5, NEG_INF, 0.2, 0.9, NEG_INF, NEG_INF, 0.7], device=DEVICE)
    cu = _i64([0, 4, 6, 7])
    got = _run_transfer(conf, cu, _i64([0, 1, 5]), torch.zeros(3, device=DEVICE))
    assert got.tolist() == [False, False, False, False, False, False, True]
    got = _run_transfer(conf, cu, _i64([3, 2, 1]), torch.zeros(3, device=DEVICE))
    assert got.tolist() == [True, False, True, True, False, False, True]
    thr = torch.tensor([0.6, 0.5, 0.95], device=DEVICE)
    got = _run_transfer(conf, cu, _i64([0, 0, 0]), thr)
    assert got.tolist() == [False, False, False, True, False, False, True]
    empty = sel_mod.transfer_mask_triton(conf[:0], _i64([0, 0]), _i64([1]), thr[:1])
    assert empty.shape == (0,)


# ---------------------------------------------------------------------------------------------
# Launch without autotuning (inside a CUDA graph capture): the tuner's stored choice is found.


def test_cached_config_finds_the_autotuners_choice(gen):
    from kernels.attention_triton import cached_config

    configs = [triton.Config({"BLOCK_V": bv}, num_warps=w) for bv, w in ((64, 4), (128, 2))]
    tuner = triton.autotune(configs=configs, key=["vocab", "n_class", "N_BAN", "BAN_ROWS"])(
        sel_mod._sample_kernel)
    # No timing on CPU: pretend the larger chunk is faster.
    tuner._bench = lambda *a, config, **k: [1.0 / config.kwargs["BLOCK_V"]]
    n, vocab = 3, 150
    logits = torch.randn(n, vocab, device=DEVICE)
    temp, seed, nonce, pos = _row_inputs(n, [0, 1, 0])
    x0 = torch.full((n,), -7, dtype=torch.int64, device=DEVICE)
    conf = torch.full((n,), float("nan"), device=DEVICE)
    ban_t = sel_mod._ban_tensor([], DEVICE)
    args = (logits, logits.stride(0), vocab, temp, seed, nonce, pos, ban_t, ban_t, x0, conf, 4)
    kw = dict(N_BAN=0, BAN_ROWS=False, FAST=not INTERPRET)
    assert cached_config(tuner, args, kw) is None
    tuner[(n,)](*args, **kw)
    cfg = cached_config(tuner, args, kw)
    assert cfg is not None and cfg.kwargs["BLOCK_V"] == 128 and cfg.num_warps == 2
    assert cached_config(tuner, args, dict(kw, N_BAN=1)) is None  # another key
    assert cached_config(tuner, args[:-1] + (64,), kw) is None  # another row-count class
    rx0, _ = sample_candidates_reference(logits, temp, seed, nonce, pos)
    assert torch.equal(x0, rx0), f"seed {SEED}"
