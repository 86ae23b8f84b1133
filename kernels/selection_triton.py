"""Fused candidate sampling and the batched transfer decision (Triton).

`sample_candidates_triton` makes one pass over each row of logits (fp16, bf16 or fp32, read in
place: no softmax and no fp32 copy is ever materialised). One program owns one row and streams it
in chunks of BLOCK_V tokens, keeping

- the running maximum M and the running sum S of 2^(x - M) (x = logit * log2(e)), rescaled once
  per chunk (a block-wide max, then one exp2 per token);
- per lane, the best score seen so far and its token (a strict comparison, so within a lane the
  first token wins; across lanes the smallest token among equal scores wins, which is torch.argmax's
  first-occurrence rule);
- at temperature > 0 the score is the Gumbel-max score. The reference takes
  argmax(l - T * ln(-ln U)); dividing by ln 2 and dropping a per-row constant gives the same argmax
  as x - T * log2(-log2 U), which is what the kernel computes (log2/exp2 are the fast hardware forms
  when compiled).
  U comes from the same 32 bits as `kernels.rng.uniform` (the murmur3 finaliser on uint32 registers,
  the row key derived in-kernel from seed, nonce and position), so the GPU and the CPU reference
  draw the same token. -log2 U is evaluated without cancellation for U close to 1 (where U rounds to
  1.0 in fp32): the kernel works from w = 1 - U, exact from the integer bits, with a short series
  for small w.

The confidence is 2^(x[x0] - M - log2 S), the softmax probability of the chosen token under the
un-noised logits, banned tokens excluded (they are -inf before anything else sees them).

`transfer_mask_triton` ranks each request's rows by confidence (descending, ties by position, the
stable-sort order of `transfer_mask_reference`) with one small program per (request, block of rows)
comparing against all rows of its request, and applies the top-k or the threshold rule.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kernels.attention_triton import _compiled, _interpreting
from kernels.launch import autotune_allowed, cached_config, launch_options, size_class

@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _row_key(seed, nonce, position):
    """kernels.rng.row_key on scalars: seed/nonce/position are int64, the result uint32."""
    lo = seed.to(tl.uint32)  # truncation keeps the low 32 bits (two's complement)
    hi = (seed >> 32).to(tl.uint32)
    h = _fmix32(lo ^ 0x9E3779B9)
    h = _fmix32(h ^ hi)
    h = _fmix32(h ^ nonce.to(tl.uint32))
    return _fmix32(h ^ position.to(tl.uint32))


@triton.jit
def _token_bits(key, token):
    """kernels.rng.bits: key uint32, token int32 (>= 0) -> uint32."""
    return _fmix32(key + token.to(tl.uint32) * 0x9E3779B9)


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2: the hardware approximation (lg2.approx, ~2^-22 absolute) when compiled, else exact."""
    if FAST:
        return libdevice.fast_log2f(x)
    else:
        return tl.math.log2(x)


@triton.jit
def _neg_log2_uniform(b, FAST: tl.constexpr):
    """-log2(U) for U = (b + 0.5) / 2^32, accurate in fp32 over the whole range of b."""
    hi = b >= 0x80000000
    # One int->float conversion: U itself below 1/2, w = 1 - U (exact from ~b) above.
    f = tl.where(hi, ~b, b).to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    e = -_log2(tl.where(hi, 1.0 - f, f), FAST)
    # -log2(1 - w) = (w + w^2/2 + w^3/3 + ...) / ln 2; five terms are exact to fp32 for w < 1/16.
    series = f * (1.4426950408889634 + f * (0.7213475204444817 + f * (
        0.48089834696298783 + f * (0.36067376022224085 + f * 0.28853900817779266))))
    return tl.where(hi & (f < 0.0625), series, e)


@triton.jit
def _bits_kernel(seed_ptr, nonce_ptr, pos_ptr, tok_ptr, raw_ptr, out_ptr, e_ptr, n,
                 BLOCK: tl.constexpr, FAST: tl.constexpr):
    """Test hook: the kernel's random bits for given (seed, nonce, position, token), and its
    -log2 U for given raw 32-bit values."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    seed = tl.load(seed_ptr + offs, mask=ok, other=0)
    nonce = tl.load(nonce_ptr + offs, mask=ok, other=0)
    pos = tl.load(pos_ptr + offs, mask=ok, other=0)
    tok = tl.load(tok_ptr + offs, mask=ok, other=0)
    key = _row_key(seed, nonce, pos)
    b = _token_bits(key, tok)
    tl.store(out_ptr + offs, b.to(tl.int64), mask=ok)
    raw = tl.load(raw_ptr + offs, mask=ok, other=0).to(tl.uint32)
    tl.store(e_ptr + offs, _neg_log2_uniform(raw, FAST), mask=ok)


@triton.jit
def _sample_chunk(base, offs, vocab, ban_ptr, ban_on, key, temp, hot,
                  run_max, run_sum, best, best_tok, best_score,
                  N_BAN: tl.constexpr, MASKED: tl.constexpr, FAST: tl.constexpr):
    """Fold one chunk of a row into the running state (MASKED only for the ragged last chunk)."""
    if MASKED:
        x = tl.load(base + offs, mask=offs < vocab, other=float("-inf"))
    else:
        x = tl.load(base + offs)
    x = x.to(tl.float32) * 1.4426950408889634
    for i in tl.static_range(N_BAN):
        x = tl.where((offs == tl.load(ban_ptr + i)) & ban_on, float("-inf"), x)
    # Online log-sum-exp (base 2), one rescale per chunk.
    chunk_max = tl.max(x, axis=0)
    new_max = tl.maximum(run_max, chunk_max)
    safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    run_sum = run_sum * tl.math.exp2(run_max - safe) + tl.sum(tl.math.exp2(x - safe), axis=0)
    run_max = new_max
    if hot:
        # -log2(-log2 U) <= 32.48 for every 32-bit U: the noise never exceeds 33 T, so a chunk
        # whose best logit cannot reach the best score so far is skipped, exactly (it could
        # only tie, and earlier tokens win ties). Peaked rows skip most of the vocabulary.
        if chunk_max + temp * 33.0 >= best_score:
            e = _neg_log2_uniform(_token_bits(key, offs), FAST)
            score = x - temp * _log2(e, FAST)
            take = score > best
            best = tl.where(take, score, best)
            best_tok = tl.where(take, offs, best_tok)
            best_score = tl.maximum(best_score, tl.max(score, axis=0))
    else:
        take = x > best
        best = tl.where(take, x, best)
        best_tok = tl.where(take, offs, best_tok)
    return run_max, run_sum, best, best_tok, best_score


@triton.jit(do_not_specialize=["n_class"])
def _sample_kernel(
    logits_ptr, stride_row, vocab,
    temp_ptr, seed_ptr, nonce_ptr, pos_ptr, ban_ptr, ban_rows_ptr,
    x0_ptr, conf_ptr,
    n_class,  # autotuning key only (the row-count class of the launch, kernels.launch.size_class)
    N_BAN: tl.constexpr,
    BAN_ROWS: tl.constexpr,  # the ban applies only to rows whose ban_rows flag is set
    BLOCK_V: tl.constexpr,
    FAST: tl.constexpr,  # hardware log2 (compiled); exact log2 under the interpreter
):
    row = tl.program_id(0)
    temp = tl.load(temp_ptr + row).to(tl.float32)
    hot = temp > 0.0
    key = _row_key(tl.load(seed_ptr + row), tl.load(nonce_ptr + row), tl.load(pos_ptr + row))
    base = logits_ptr + row.to(tl.int64) * stride_row
    if BAN_ROWS:
        ban_on = tl.load(ban_rows_ptr + row) != 0
    else:
        ban_on = True

    lanes = tl.arange(0, BLOCK_V)
    run_max = tl.full([], float("-inf"), tl.float32)
    run_sum = tl.zeros([], tl.float32)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_tok = lanes
    best_score = tl.full([], float("-inf"), tl.float32)

    # Whole chunks without masks (vector loads), then the ragged tail of the vocabulary.
    v_full = (vocab // BLOCK_V) * BLOCK_V
    for v0 in range(0, v_full, BLOCK_V):
        run_max, run_sum, best, best_tok, best_score = _sample_chunk(
            base, v0 + lanes, vocab, ban_ptr, ban_on, key, temp, hot,
            run_max, run_sum, best, best_tok, best_score,
            N_BAN=N_BAN, MASKED=False, FAST=FAST)
    if v_full < vocab:
        run_max, run_sum, best, best_tok, best_score = _sample_chunk(
            base, v_full + lanes, vocab, ban_ptr, ban_on, key, temp, hot,
            run_max, run_sum, best, best_tok, best_score,
            N_BAN=N_BAN, MASKED=True, FAST=FAST)

    top = tl.max(best, axis=0)
    tok = tl.min(tl.where(best == top, best_tok, 0x7FFFFFFF), axis=0)
    # The chosen token's logit, read again (one element). A row with no finite logit has no
    # finite score (top == -inf): NaN, as the reference's exp(-inf - -inf).
    x_tok = tl.load(base + tok).to(tl.float32) * 1.4426950408889634
    conf = tl.math.exp2(x_tok - run_max - tl.math.log2(run_sum))
    conf = tl.where(top == float("-inf"), float("nan"), conf)
    tl.store(x0_ptr + row, tok.to(tl.int64))
    tl.store(conf_ptr + row, conf)


_BAN_CACHE: dict = {}


def _ban_tensor(ban_ids, device):
    key = (tuple(int(b) for b in ban_ids), str(device))
    t = _BAN_CACHE.get(key)
    if t is None:
        t = torch.tensor(key[0] or [0], dtype=torch.int32, device=device)
        _BAN_CACHE[key] = t
    return t


_sample_tuned = None


def _tuned_sample():
    global _sample_tuned
    if _sample_tuned is None:
        cfgs = [
            triton.Config({"BLOCK_V": bv}, num_warps=w, num_stages=s)
            for bv, w, s in (
                (1024, 4, 2), (2048, 4, 2), (2048, 8, 2), (4096, 8, 2), (4096, 16, 2),
                (2048, 8, 3), (8192, 16, 2),
            )
        ]
        _sample_tuned = triton.autotune(configs=cfgs, key=["vocab", "n_class", "N_BAN", "BAN_ROWS"])(
            _sample_kernel)
    return _sample_tuned


def sample_candidates_triton(logits, temperature, seed, nonce, position, ban_ids=None,
                             out=None, ban_rows=None, _block_v=None):
    """(x0 int64 [N], conf float32 [N]); same contract as `sample_candidates_reference`.

    `ban_rows` (bool [N], optional) limits `ban_ids` to the flagged rows (per-request EOS
    suppression without a copy of the logits); None bans them in every row. `out=(x0, conf)`
    writes into given tensors (tests poison them first); `_block_v` pins the chunk size (tests);
    otherwise the interpreter uses 64 and CUDA autotunes.
    """
    n, vocab = logits.shape
    dev = logits.device
    if out is None:
        x0 = torch.empty(n, dtype=torch.int64, device=dev)
        conf = torch.empty(n, dtype=torch.float32, device=dev)
    else:
        x0, conf = out
    if n == 0:
        return x0, conf
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    temperature = temperature.to(device=dev, dtype=torch.float32)
    seed = seed.to(device=dev, dtype=torch.int64)
    nonce = nonce.to(device=dev, dtype=torch.int64)
    position = position.to(device=dev, dtype=torch.int64)
    ban = list(ban_ids) if ban_ids else []
    ban_t = _ban_tensor(ban, dev)
    if ban_rows is not None:
        ban_rows = ban_rows.to(device=dev, dtype=torch.int8).contiguous()
    args = (logits, logits.stride(0), vocab, temperature, seed, nonce, position, ban_t,
            ban_rows if ban_rows is not None else ban_t, x0, conf, size_class(n))
    if _block_v is not None or not _compiled(logits):
        _sample_kernel[(n,)](*args, N_BAN=len(ban), BAN_ROWS=ban_rows is not None,
                             BLOCK_V=_block_v or 64, FAST=not _interpreting())
        return x0, conf
    kw = dict(N_BAN=len(ban), BAN_ROWS=ban_rows is not None, FAST=True)
    tuner = _tuned_sample()
    if autotune_allowed(logits):
        tuner[(n,)](*args, **kw)
        return x0, conf
    # Inside a graph capture (or `capture_launches()`), or autotuning switched off: the stored
    # choice, with the options the autotuner launched it with (kernels.launch).
    cfg = cached_config(tuner, args, kw)
    if cfg is None:
        cfg = triton.Config({"BLOCK_V": 4096}, num_warps=8, num_stages=2)
    _sample_kernel[(n,)](*args, **kw, **launch_options(cfg))
    return x0, conf


def rng_bits_triton(seed, nonce, position, token, raw=None):
    """Test hook, as the sampling kernel computes them: (bits int64 of (seed, nonce, position,
    token), -log2 U float32 of the raw 32-bit values `raw`, int64 in [0, 2^32), default zeros)."""
    n = seed.numel()
    if raw is None:
        raw = torch.zeros(n, dtype=torch.int64, device=seed.device)
    bits = torch.empty(n, dtype=torch.int64, device=seed.device)
    e = torch.empty(n, dtype=torch.float32, device=seed.device)
    if n:
        blk = 64
        _bits_kernel[(triton.cdiv(n, blk),)](
            seed.contiguous(), nonce.contiguous(), position.contiguous(),
            token.to(torch.int32).contiguous(), raw.to(torch.int64).contiguous(), bits, e, n,
            BLOCK=blk, FAST=not _interpreting(),
        )
    return bits, e


@triton.jit
def _transfer_kernel(
    conf_ptr, cu_ptr, k_ptr, thr_ptr, out_ptr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    req = tl.program_id(0)
    blk = tl.program_id(1)
    r0 = tl.load(cu_ptr + req)
    count = tl.load(cu_ptr + req + 1) - r0
    if blk * BLOCK_I >= count:
        return
    offs_i = blk * BLOCK_I + tl.arange(0, BLOCK_I)
    ok_i = offs_i < count
    ci = tl.load(conf_ptr + r0 + offs_i, mask=ok_i, other=float("-inf")).to(tl.float32)
    rank = tl.zeros([BLOCK_I], tl.int32)
    for j0 in range(0, count, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        ok_j = offs_j < count
        cj = tl.load(conf_ptr + r0 + offs_j, mask=ok_j, other=float("-inf")).to(tl.float32)
        ahead = (cj[None, :] > ci[:, None]) | (
            (cj[None, :] == ci[:, None]) & (offs_j[None, :] < offs_i[:, None]))
        ahead = ahead & ok_j[None, :]
        rank += tl.sum(ahead.to(tl.int32), axis=1)
    kk = tl.load(k_ptr + req)
    thr = tl.load(thr_ptr + req).to(tl.float32)
    finite = (ci == ci) & (tl.abs(ci) < float("inf"))
    by_thr = (rank == 0) | (ci >= thr)
    by_k = rank.to(tl.int64) < kk
    chosen = tl.where(thr > 0.0, by_thr, by_k) & finite
    tl.store(out_ptr + r0 + offs_i, chosen.to(tl.uint8), mask=ok_i)


def transfer_mask_triton(conf, cu_rows, k, threshold, out=None, _blocks=None):
    """bool [N]; same contract and tie order as `transfer_mask_reference`.

    The grid is (B, ceil(N / BLOCK_I)); programs past their request's rows return at once, so the
    launch needs no host synchronisation. `out` (uint8 [N]) is written in place when given.
    """
    n = conf.shape[0]
    dev = conf.device
    if out is None:
        out = torch.empty(n, dtype=torch.uint8, device=dev)
    b = cu_rows.numel() - 1
    if n == 0 or b <= 0:
        out.zero_()
        return out.view(torch.bool)
    bi, bj = _blocks if _blocks is not None else ((16, 16) if (_interpreting() or not conf.is_cuda)
                                                   else (64, 64))
    grid = (b, triton.cdiv(n, bi))
    _transfer_kernel[grid](
        conf.contiguous(), cu_rows.to(device=dev, dtype=torch.int32).contiguous(),
        k.to(device=dev, dtype=torch.int64).contiguous(),
        threshold.to(device=dev, dtype=torch.float32).contiguous(), out,
        BLOCK_I=bi, BLOCK_J=bj,
    )
    return out.view(torch.bool)
