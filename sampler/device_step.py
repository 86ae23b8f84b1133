"""The step on the device: layout, forward, selection and state update, with shapes fixed per bucket.

Everything here is tensor operations whose shapes depend only on the `Bucket`, never on tensor
values, and nothing reads a value back to the host. So one call is the same sequence of kernels
every time for a bucket, which is what lets `sampler.cuda_graphs` capture it and replay it.

Inputs (all on the device):
  state  int64 [slots + 1, N_INT]   per-slot state, columns named below (the last slot is a dummy
  fstate f64   [slots + 1, N_FLT]   that padded request rows point at; it never changes)
  plan   int64 [B + 1, 3]           per request row: slot, planned block, planned step in block.
                                    Row B and rows past the real requests are padding.
The planned (block, step in block) are what the host expected when it chose the bucket. A row whose
slot has since moved on (a threshold block that finished one step earlier than the host knew, or a
finished request the host has not removed yet) does nothing: it unmasks nothing and its state is
unchanged. Its rows still run through the forward and write keys/values only to its own region,
which its next block-start forward rewrites anyway.

Packed token layout, T rows: the conditional segment of each request row (queries [q_lo, q_hi) of its
canvas), then with CFG the unconditional segment of each row (its whole canvas, prompt masked), then
one padding segment that takes whatever is left of T. Padding reads the scratch token (a mask id at
`capacity`) and writes its keys/values to the scratch KV row `capacity`, which no real segment reads.
Logit rows, R (2R with CFG): each request row's current block, then padding rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import rng
from kernels.selection import RowFilters, apply_filters, sample_candidates, transfer_mask
from weights.layers import AttnLayout

# Integer state columns.
# LEN is the whole canvas (prompt + generated span + suffix), GEN the span; BM the masked positions
# of the current block at its start (the schedule's count); TOPK the top_k filter (0: off), NLP the
# alternatives a logprobs request wants (-1: no logprobs).
(OFF, PLEN, LEN, BLEN, SPB, NBLK, BLOCK, SIB, DONE, UNM, NFE, MODE, SEED, CFG, RND, BAN, DEFER,
 GEN, BM, TOPK, NLP) = range(21)
N_INT = 21
# Float state columns (float64).
TEMP, THR, CFGS, TOPP, MINP = range(5)
N_FLT = 5
MAX_TOP_LOGPROBS = 20  # alternatives computed per row when a step has logprobs requests
MODE_NONE, MODE_PREFIX, MODE_DUAL = 0, 1, 2
DEFERRED = -1.0  # confidence given to deferred EOS/EoT candidates: below every probability

# Bucket sizes: 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x them): at most a third padding.
_SIZES = sorted({s for p in range(4, 21) for s in (2 ** p, 3 * 2 ** (p - 1))})


def round_up(n: int) -> int:
    """The smallest bucket size >= n (n itself beyond the table)."""
    for s in _SIZES:
        if s >= n:
            return s
    return n


def pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


@dataclass(frozen=True)
class Bucket:
    requests: int   # request rows B (plus one padding row)
    tokens: int     # packed query tokens T
    rows: int       # logit rows R per set (one set, or two with CFG)
    max_q: int      # longest query segment (sizes the attention grid)
    cfg: bool       # any request with classifier-free guidance
    filters: bool = False   # any request with sampling filters (top_k / top_p / min_p)
    logprobs: bool = False  # any request asking for logprobs

    @classmethod
    def fit(cls, n_requests: int, tokens: int, rows: int, max_q: int, cfg: bool,
            pad: bool = True, filters: bool = False, logprobs: bool = False) -> "Bucket":
        """The smallest bucket that holds a step; `pad=False` gives the exact sizes (no graph to
        reuse, so padding would only cost: the CPU path)."""
        if not pad:
            return cls(max(n_requests, 1), max(tokens, 1), max(rows, 1), max(max_q, 1), bool(cfg),
                       bool(filters), bool(logprobs))
        return cls(pow2(max(n_requests, 1)), round_up(max(tokens, 1)), round_up(max(rows, 1)),
                   pow2(max(max_q, 16)), bool(cfg), bool(filters), bool(logprobs))


def query_range(mode: int, plen: int, length: int, blen: int, block: int, sib: int) -> tuple[int, int]:
    """(q_lo, q_hi) of a request's conditional segment for a step at (block, sib); host side."""
    bs = plen + block * blen
    if mode == MODE_NONE or sib == 0:
        return 0, length
    return bs, (bs + blen if mode == MODE_DUAL else length)


REQ_FIELDS = 6  # per request row: active, steps done, nfe, unmasked, block done, finished


def unpack_outputs(packed, rows: int, logprobs: bool = False):
    """(per row [R, 3]: chosen, token, position in the generated span; conf float32 [R]; per request
    row [B + 1, 6]; logprobs or None) as numpy views of the one int64 buffer `device_step` returns
    (host side). logprobs, for a bucket with logprobs requests: (the candidate's log-probability
    float32 [R], the top alternatives' ids [R, 20], their log-probabilities float32 [R, 20])."""
    a = packed.numpy()
    ints = a[:3 * rows].reshape(rows, 3)
    conf = a[3 * rows:4 * rows].astype("int32").view("float32")
    end = len(a)
    lp = None
    if logprobs:
        n = MAX_TOP_LOGPROBS
        base = end - rows * (1 + 2 * n)
        tok = a[base:base + rows].astype("int32").view("float32")
        top_ids = a[base + rows:base + rows + rows * n].reshape(rows, n)
        top_lp = a[base + rows + rows * n:end].astype("int32").view("float32").reshape(rows, n)
        lp, end = (tok, top_ids, top_lp), base
    reqs = a[4 * rows:end].reshape(-1, REQ_FIELDS)
    return ints, conf, reqs, lp


def device_step(model, kv, tokens, state, fstate, plan, bucket: Bucket, mask_id: int, eos_id: int,
                stop_ids: torch.Tensor, capacity: int, dynamic: bool | None = None) -> torch.Tensor:
    """One step for the requests in `plan`; updates `tokens`, `state`, `kv` in place. Returns what
    the host reads back as one int64 buffer of fixed size (see `unpack_outputs`): one copy."""
    dev = tokens.device
    # Off CUDA there is no graph to capture and reading a flag back costs nothing, so optional work
    # (the mask-id re-draw, random remasking, deferred EOS) runs only when some row needs it.
    dynamic = (not tokens.is_cuda) if dynamic is None else dynamic
    b1 = bucket.requests + 1
    T, R = bucket.tokens, bucket.rows
    slot, p_block, p_sib = plan[:, 0], plan[:, 1], plan[:, 2]
    st = state.index_select(0, slot)                       # [B+1, N_INT]
    fs = fstate.index_select(0, slot)
    c = st.unbind(1)
    off, plen, length, blen, gen = c[OFF], c[PLEN], c[LEN], c[BLEN], c[GEN]
    mode, cfg = c[MODE], c[CFG].bool()
    active = (c[BLOCK] == p_block) & (c[BLOCK] < c[NBLK])
    zero = torch.zeros_like(off)

    # ---- packed layout (what the host planned: planned block and step, static request fields)
    bs = plen + p_block * blen
    be = bs + blen
    start = p_sib == 0
    q_lo = torch.where((mode == MODE_NONE) | start, zero, bs)
    q_hi = torch.where((mode == MODE_DUAL) & ~start, be, length)
    q_hi = torch.maximum(q_hi, q_lo)
    # Segment table [4, segments]: query start, query count, first K/V row, key count.
    segs = torch.stack([q_lo, q_hi - q_lo, off, length])
    if bucket.cfg:  # the unconditional canvases: all of each, in the rows after the canvas
        segs = torch.cat([segs, torch.stack([zero, torch.where(cfg, length, zero), off + length,
                                             length])], dim=1)
    n_real = segs.shape[1]
    pad = torch.stack([zero[0], (T - segs[1].sum()).clamp(min=0), zero[0] + capacity, zero[0] + 1])
    seg_lo, seg_cnt, seg_kv, seg_len = torch.cat([segs, pad.unsqueeze(1)], dim=1).unbind(0)
    cu = torch.zeros(n_real + 2, dtype=torch.int64, device=dev)
    cu[1:] = torch.cumsum(seg_cnt, 0)
    r = torch.arange(T, device=dev)
    seg = torch.searchsorted(cu[1:], r, right=True).clamp(max=n_real)
    is_pad = seg == n_real
    pos = seg_lo[seg] + r - cu[seg]
    req_of_tok = torch.where(is_pad, b1 - 1, seg % b1)
    kv_index = torch.where(is_pad, torch.full_like(pos, capacity), seg_kv[seg] + pos)
    src = torch.where(is_pad, torch.full_like(pos, capacity), off[req_of_tok] + pos)
    ids = tokens.index_select(0, src)
    if bucket.cfg:
        # unconditional canvas: the context (prompt and suffix) masked
        blank = (seg >= b1) & ~is_pad & ((pos < plen[req_of_tok]) | (pos >= (plen + gen)[req_of_tok]))
        ids = torch.where(blank, torch.full_like(ids, mask_id), ids)
    layout = AttnLayout(cu_q=cu.to(torch.int32), k_start=seg_kv.to(torch.int32),
                        k_len=seg_len.to(torch.int32), kv_index=kv_index,
                        max_q=bucket.max_q, max_k=capacity + 1)

    # ---- logit rows: each request row's current block
    cu_rows = torch.zeros(b1 + 1, dtype=torch.int64, device=dev)  # every row's block, inactive too
    cu_rows[1:b1] = torch.cumsum(blen[:-1], 0)
    cu_rows[b1] = R
    rr = torch.arange(R, device=dev)
    row_req = torch.searchsorted(cu_rows[1:], rr, right=True).clamp(max=b1 - 1)
    within = rr - cu_rows[row_req]
    sr = st.index_select(0, row_req).unbind(1)             # request columns per logit row
    fr = fs.index_select(0, row_req).unbind(1)
    row_real = within < sr[BLEN]                            # false for padding rows
    position = (bs[row_req] + within).clamp(min=0)           # absolute canvas position
    cond_row = cu[row_req] + (bs - q_lo)[row_req] + within
    cond_row = torch.where(row_real, cond_row, torch.zeros_like(cond_row)).clamp(0, T - 1)
    if bucket.cfg:
        unc_row = torch.where(row_real & cfg[row_req], cu[b1 + row_req] + bs[row_req] + within, cond_row)
        logits_rows = torch.cat([cond_row, unc_row.clamp(0, T - 1)])
    else:
        logits_rows = cond_row

    out = model(ids, pos, layout, kv, logits_rows)
    logits = out[:R]
    if bucket.cfg:  # classifier-free guidance: u + (s + 1) * (c - u) on the CFG rows
        u = out[R:]
        scale = (fr[CFGS] + 1).to(logits.dtype).unsqueeze(1)
        logits = torch.where(cfg[row_req].unsqueeze(1), u + scale * (logits - u), logits)

    # ---- selection
    canvas_idx = torch.where(row_real, sr[OFF] + position, torch.full_like(position, capacity))
    cand = (tokens.index_select(0, canvas_idx) == mask_id) & row_real & active[row_req]
    ban, seed, nonce = sr[BAN].bool(), sr[SEED], sr[DONE]
    temp = fr[TEMP].to(torch.float32)
    vocab = logits.shape[1]
    eos_col = torch.arange(vocab, device=dev) == eos_id
    if bucket.filters:  # the filtered rows' logits restricted, the EOS ban decided first
        filt = RowFilters(sr[TOPK], fr[TOPP], fr[MINP])
        dist = apply_filters(logits, temp, filt, (ban, eos_col))
    else:
        dist = logits
    if bucket.logprobs and dist is logits:
        mask_logit = logits[:, mask_id].clone()  # the re-draw below bans it in place
    x0, conf = sample_candidates(dist, temp, seed, nonce, position, ban_ids=[eos_id], ban_rows=ban)
    # A candidate equal to the mask id would leave its position masked for ever: such rows take the
    # draw with the mask logit at -inf (same noise, same EOS ban, filters decided again without it).
    # On CUDA it is computed for every row (no host-side test of whether any row needs it); only
    # those rows use it.
    redo = x0 == mask_id
    redrawn = not dynamic or bool(redo.any())
    if redrawn:
        logits[:, mask_id] = float("-inf")
        dist_b = apply_filters(logits, temp, filt, (ban, eos_col)) if bucket.filters else logits
        x0b, confb = sample_candidates(dist_b, temp, seed, nonce, position, ban_ids=[eos_id],
                                       ban_rows=ban)
        x0 = torch.where(redo, x0b, x0)
        conf = torch.where(redo, confb.to(conf.dtype), conf)
    if bucket.logprobs:
        # Commit-time log-probabilities: log-softmax of the distribution the confidence is taken
        # from (temperature 1; EOS ban, mask re-draw ban and filters applied), for every row.
        if dist is logits:
            d = logits
            if redrawn:
                d[:, mask_id] = torch.where(redo, torch.full_like(mask_logit, float("-inf")), mask_logit)
        else:
            d = torch.where(redo.unsqueeze(1), dist_b, dist) if redrawn else dist
        # Off CUDA only the rows of requests that asked are computed (their batchmates pay nothing);
        # on CUDA every row is, at fixed shapes (no host-side row selection inside a graph).
        rows_lp = (sr[NLP] >= 0).nonzero().squeeze(1) if dynamic else None
        sub = d if rows_lp is None else d.index_select(0, rows_lp)
        sub_ban = ban if rows_lp is None else ban.index_select(0, rows_lp)
        logp = torch.log_softmax(sub.float().masked_fill(sub_ban.unsqueeze(1) & eos_col, float("-inf")), dim=-1)
        sub_x0 = x0 if rows_lp is None else x0.index_select(0, rows_lp)
        tok_lp = logp.gather(1, sub_x0.unsqueeze(1)).squeeze(1)
        top_lp, top_ids = torch.topk(logp, min(MAX_TOP_LOGPROBS, vocab), dim=-1)
        if top_ids.shape[1] < MAX_TOP_LOGPROBS:  # a vocabulary smaller than 20 (tests)
            pad = MAX_TOP_LOGPROBS - top_ids.shape[1]
            top_ids = torch.nn.functional.pad(top_ids, (0, pad), value=-1)
            top_lp = torch.nn.functional.pad(top_lp, (0, pad), value=float("-inf"))
        if rows_lp is not None:  # back to one entry per row (rows that did not ask: never read)
            n_rows = x0.shape[0]
            tok_lp = torch.zeros(n_rows, dtype=tok_lp.dtype, device=dev).index_copy_(0, rows_lp, tok_lp)
            top_ids = torch.full((n_rows, MAX_TOP_LOGPROBS), -1, dtype=top_ids.dtype,
                                 device=dev).index_copy_(0, rows_lp, top_ids)
            top_lp = torch.full((n_rows, MAX_TOP_LOGPROBS), float("-inf"), dtype=top_lp.dtype,
                                device=dev).index_copy_(0, rows_lp, top_lp)
    rnd = sr[RND].bool()
    if not dynamic or bool(rnd.any()):
        u = rng.uniform(seed, nonce, position, torch.full_like(position, rng.REMASK_STREAM))
        conf = torch.where(rnd, u.to(conf.dtype), conf)
    defer = sr[DEFER].bool()
    if not dynamic or bool(defer.any()):
        defer = defer & torch.isin(x0, stop_ids)
        conf = torch.where(defer, torch.full_like(conf, DEFERRED), conf)
    conf = torch.where(cand, conf, torch.full_like(conf, float("-inf")))

    spb, sib = c[SPB], p_sib
    per = spb.clamp(min=1)
    # The schedule spreads the block's masked positions at its start (all of it, except in an
    # infill span with fixed tokens) over its steps: the first (M mod S) steps take one more.
    n_cand = torch.zeros(b1, dtype=torch.int64, device=dev).index_add_(0, row_req, cand.long())
    m = torch.where(start, n_cand, c[BM])
    k = torch.where(spb > 0, m // per + (sib < m % per).long(), zero)
    thr = torch.where(active, fs[:, THR], 0.0).to(torch.float32)
    chosen = transfer_mask(conf, cu_rows, k, thr)
    target = torch.where(chosen, canvas_idx, torch.full_like(canvas_idx, capacity))
    tokens.index_put_((target,), torch.where(chosen, x0, torch.full_like(x0, mask_id)))

    # ---- state update (inactive rows unchanged)
    n_chosen = torch.zeros(b1, dtype=torch.int64, device=dev).index_add_(0, row_req, chosen.long())
    left = torch.zeros(b1, dtype=torch.int64, device=dev).index_add_(0, row_req, (cand & ~chosen).long())
    block_done = active & (left == 0)
    # NFE as the reference samplers count it: their cache loops test for a finished block after
    # each cached forward, so a block that its block-start forward completes costs them one more
    # forward that unmasks nothing. We skip that forward but count it, so NFE compares.
    phantom = (mode != MODE_NONE) & (sib == 0) & block_done
    act = active.long()
    new = st.clone()
    new[:, UNM] += n_chosen * act
    new[:, DONE] += act
    new[:, NFE] += act * (1 + phantom.long())
    new[:, BLOCK] += block_done.long()
    new[:, SIB] = torch.where(active, torch.where(block_done, zero, sib + 1), c[SIB])
    new[:, BM] = torch.where(active & start, n_cand, c[BM])
    real = slot < state.shape[0] - 1
    new = torch.where(real.unsqueeze(1), new, st)             # the dummy slot never changes
    state.index_copy_(0, slot, new)
    finished = new[:, BLOCK] >= new[:, NBLK]

    rel = position - sr[PLEN]
    ints = torch.stack([chosen.long(), x0, rel], dim=1)
    reqs = torch.stack([act, new[:, DONE], new[:, NFE], new[:, UNM], block_done.long(),
                        finished.long()], dim=1)
    parts = [ints.reshape(-1), conf.view(torch.int32).to(torch.int64), reqs.reshape(-1)]
    if bucket.logprobs:
        parts += [tok_lp.view(torch.int32).to(torch.int64), top_ids.reshape(-1),
                  top_lp.contiguous().view(torch.int32).to(torch.int64).reshape(-1)]
    return torch.cat(parts)
