"""The LLaDA step on the device, in stages, with shapes fixed per bucket.

Everything here is tensor operations whose shapes depend only on the `Bucket`, never on tensor
values, and nothing reads a value back to the host. So one call is the same sequence of kernels
every time for a bucket, which is what lets `sampler.cuda_graphs` capture it and replay it.

Inputs (all on the device):
  state  int64 [slots + 1, N_INT]   per-slot state, fields named in `sampler.step_state` (the last
  fstate f64   [slots + 1, N_FLT]   slot is a dummy that padded request rows point at; it never changes)
  plan   int64 [B + 1, 3]           per request row: slot, planned block index, planned step in block.
                                    Row B and rows past the real requests are padding.
The planned (block index, step in block) are what the host expected when it chose the bucket. A row
whose slot has since moved on (a threshold block that finished one step earlier than the host knew,
or a finished request the host has not removed yet) does nothing: it unmasks nothing and its state
is unchanged. Its rows still run through the forward and write keys/values only to its own region,
which its next block-start forward rewrites anyway.

The stages (`device_step` calls them in this order):
  gather     the plan's slots' state rows, named (`Requests`)
  layout     packed queries and the attention layout; the logit rows (`Layout`)
  forward    the network over the packed tokens, classifier-free guidance on the CFG rows
  candidates per logit row its candidate and confidence (EOS bias; `sampler.candidates`: EOS ban, filters,
             mask-id re-draw, deferred stops), random remasking, log-probabilities when asked
  transfer   per request the schedule's quota or the threshold rule (`transfer_mask`)
  commit     chosen tokens written, state advanced, the read-back buffer packed (`ReadBack`)

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
from kernels.selection import RowFilters, transfer_mask
from sampler import candidates as cd
from sampler.rules import quota_at
from sampler.step_state import (MAX_TOP_LOGPROBS, MODE_DUAL, MODE_NONE, ReadBack, RequestOut, RowOut,
                                SlotFloats, SlotInts, columns, float_columns)
from weights.layers import AttnLayout

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
    constrained: bool = False  # any request under a grammar (structured output)
    depth: int = 0          # steps the drafting stage guesses (the deepest request's draft_depth)
    draft_copy: int = 0     # cached K/V rows copied into draft regions before the forward

    @classmethod
    def fit(cls, n_requests: int, tokens: int, rows: int, max_q: int, cfg: bool,
            pad: bool = True, filters: bool = False, logprobs: bool = False,
            constrained: bool = False, depth: int = 0, draft_copy: int = 0) -> "Bucket":
        """The smallest bucket that holds a step; `pad=False` gives the exact sizes (no graph to
        reuse, so padding would only cost: the CPU path)."""
        if not pad:
            return cls(max(n_requests, 1), max(tokens, 1), max(rows, 1), max(max_q, 1), bool(cfg),
                       bool(filters), bool(logprobs), bool(constrained), depth, draft_copy)
        return cls(pow2(max(n_requests, 1)), round_up(max(tokens, 1)), round_up(max(rows, 1)),
                   pow2(max(max_q, 16)), bool(cfg), bool(filters), bool(logprobs), bool(constrained),
                   pow2(depth) if depth else 0, round_up(draft_copy) if draft_copy else 0)


def query_range(mode: int, plen: int, length: int, block_len: int, block_index: int,
                step_in_block: int) -> tuple[int, int]:
    """(q_lo, q_hi) of a request's conditional segment for a step at (block_index, step_in_block);
    the host's copy of the rule `layout` applies on the device."""
    bs = plen + block_index * block_len
    if mode == MODE_NONE or step_in_block == 0:
        return 0, length
    return bs, (bs + block_len if mode == MODE_DUAL else length)


# ---------------------------------------------------------------- stage: gather
@dataclass
class Requests:
    """The step's request rows [B + 1]: the plan and the planned slots' state."""

    slot: torch.Tensor
    block_index: torch.Tensor    # planned
    step_in_block: torch.Tensor  # planned
    raw: torch.Tensor            # int state rows [B + 1, N_INT] as gathered
    fraw: torch.Tensor           # float state rows [B + 1, N_FLT]
    i: SlotInts
    f: SlotFloats
    active: torch.Tensor         # the slot is where the host planned it (and not finished)
    start: torch.Tensor          # a block-start step
    block_start: torch.Tensor    # canvas position of the planned block's first row
    draft: torch.Tensor          # 0: the request's committed state; j >= 1: its draft D_j
    kv_off: torch.Tensor         # first K/V row of the row's region (a draft's own, from the pool)
    base: torch.Tensor           # the request row of the request's committed state


PLAN_COLUMNS = 6  # slot, block index, step in block, draft j, K/V offset (-1: the slot's), base row (-1: itself)


def idle_plan(n_rows: int, dummy_slot: int, device) -> torch.Tensor:
    """A plan whose every row is padding (points at the dummy slot)."""
    return plan_of([], n_rows, dummy_slot, device)


def plan_of(rows: list, n_rows: int, dummy_slot: int, device="cpu") -> torch.Tensor:
    """A plan [n_rows, PLAN_COLUMNS] from `rows` (lists of PLAN_COLUMNS ints), padded with rows that
    point at the dummy slot: one tensor made from Python ints (a write per field would be an
    operation each, the step's main fixed cost on a CPU at batch 1)."""
    pad = [dummy_slot, -1, 0, 0, -1, -1]
    return torch.tensor(rows + [pad] * (n_rows - len(rows)), dtype=torch.int64, device=device)


def gather(state, fstate, plan) -> Requests:
    slot, p_block, p_sib = plan[:, 0], plan[:, 1], plan[:, 2]
    n = plan.shape[0]
    rows = torch.arange(n, device=plan.device)
    if plan.shape[1] >= PLAN_COLUMNS:
        draft, kvo, base = plan[:, 3], plan[:, 4], plan[:, 5]
        base = torch.where(base < 0, rows, base)
    else:  # a plan without drafts (slot, block, step)
        draft, kvo, base = torch.zeros_like(slot), torch.full_like(slot, -1), rows
    st = state.index_select(0, slot)
    fs = fstate.index_select(0, slot)
    i = columns(st)
    active = (i.block_index == p_block) & (i.block_index < i.n_blocks)
    # A draft row is valid only at the state its guesses were made for, and only as deep as guessed.
    is_draft = draft > 0
    draft_ok = (i.guess_nonce == i.steps_done) & (draft <= i.guessed) & (i.step_in_block + draft == p_sib)
    active = active & (~is_draft | draft_ok)
    kvo = torch.where(kvo < 0, i.offset, kvo)
    # A draft's step is the reference's step j steps later: its noise nonce is steps_done + j.
    st = torch.stack(i._replace(steps_done=i.steps_done + draft), 1)
    i = columns(st)
    return Requests(slot, p_block, p_sib, st, fs, i, float_columns(fs), active, (p_sib == 0) & ~is_draft,
                    i.prompt_len + p_block * i.block_len, draft, kvo, base)


# ---------------------------------------------------------------- stage: layout
@dataclass
class Layout:
    ids: torch.Tensor           # packed token ids [T]
    pos: torch.Tensor           # their canvas positions [T]
    attn: AttnLayout
    logits_rows: torch.Tensor   # packed rows that get logits [R] (or [2R] with CFG)
    cu_rows: torch.Tensor       # logit rows of request row b: cu_rows[b]:cu_rows[b+1]
    row_req: torch.Tensor       # request row of each logit row [R]
    row_real: torch.Tensor      # false for padding rows
    position: torch.Tensor      # canvas position of each logit row
    canvas_idx: torch.Tensor    # its token buffer row (`capacity` for padding)
    ri: SlotInts                # the request's fields per logit row
    rf: SlotFloats
    row_tok: torch.Tensor = None  # the row's canvas token as its state sees it (a draft's guesses in)
    gstep: torch.Tensor = None    # guessed step (1..) of the row's position; 0: not guessed
    gtok: torch.Tensor = None     # the guessed token


def _drafted(ids, src, pos, req_of_tok, rq: Requests, guess, mask_id: int):
    """Token ids as each row's state sees them: a draft D_j's masked positions of the current
    block guessed to be committed within j steps take their guessed token."""
    if guess is None:
        return ids
    g = guess.index_select(0, src)
    j = rq.draft[req_of_tok]
    bs = rq.block_start[req_of_tok]
    inside = (pos >= bs) & (pos < bs + rq.i.block_len[req_of_tok])
    over = (j > 0) & inside & (ids == mask_id) & (g[:, 0] >= 1) & (g[:, 0] <= j)
    return torch.where(over, g[:, 1], ids)


def layout(rq: Requests, bucket: Bucket, tokens, mask_id: int, capacity: int, guess=None) -> Layout:
    cu, q_lo, ids, pos, attn = _token_layout(rq, bucket, tokens, mask_id, capacity, guess)
    return _logit_rows(rq, bucket, cu, q_lo, ids, pos, attn, capacity, tokens, guess, mask_id)


def _token_layout(rq: Requests, bucket: Bucket, tokens, mask_id: int, capacity: int, guess=None):
    """(cu, q_lo, ids, positions, attention layout) of the packed queries."""
    dev = tokens.device
    b1, T = bucket.requests + 1, bucket.tokens
    i = rq.i
    off, plen, length, gen, mode = i.offset, i.prompt_len, i.length, i.gen_length, i.cache_mode
    zero = torch.zeros_like(off)
    bs, start = rq.block_start, rq.start
    q_lo = torch.where((mode == MODE_NONE) | start, zero, bs)
    q_hi = torch.where((mode == MODE_DUAL) & ~start, bs + i.block_len, length)
    q_hi = torch.maximum(q_hi, q_lo)
    # Segment table [4, segments]: query start, query count, first K/V row, key count.
    kvo = rq.kv_off  # a draft's keys/values live in its own region of the draft pool
    segs = torch.stack([q_lo, q_hi - q_lo, kvo, length])
    if bucket.cfg:  # the unconditional canvases: all of each, in the rows after the canvas
        segs = torch.cat([segs, torch.stack([zero, torch.where(i.cfg.bool(), length, zero),
                                             kvo + length, length])], dim=1)
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
    ids = _drafted(tokens.index_select(0, src), src, pos, req_of_tok, rq, guess, mask_id)
    if bucket.cfg:
        # unconditional canvas: the context (prompt and suffix) masked
        blank = (seg >= b1) & ~is_pad & ((pos < plen[req_of_tok]) | (pos >= (plen + gen)[req_of_tok]))
        ids = torch.where(blank, torch.full_like(ids, mask_id), ids)
    attn = AttnLayout(cu_q=cu.to(torch.int32), k_start=seg_kv.to(torch.int32),
                      k_len=seg_len.to(torch.int32), kv_index=kv_index,
                      max_q=bucket.max_q, max_k=capacity + 1)
    return cu, q_lo, ids, pos, attn


def _logit_rows(rq: Requests, bucket: Bucket, cu, q_lo, ids, pos, attn, capacity: int, tokens=None,
                guess=None, mask_id: int = -1) -> Layout:
    """Each request row's current block as logit rows, then padding rows."""
    dev = ids.device
    b1, T, R = bucket.requests + 1, bucket.tokens, bucket.rows
    cu_rows = torch.zeros(b1 + 1, dtype=torch.int64, device=dev)  # every row's block, inactive too
    cu_rows[1:b1] = torch.cumsum(rq.i.block_len[:-1], 0)
    cu_rows[b1] = R
    rr = torch.arange(R, device=dev)
    row_req = torch.searchsorted(cu_rows[1:], rr, right=True).clamp(max=b1 - 1)
    within = rr - cu_rows[row_req]
    ri = columns(rq.raw.index_select(0, row_req))
    rf = float_columns(rq.fraw.index_select(0, row_req))
    row_real = within < ri.block_len
    bs = rq.block_start
    position = (bs[row_req] + within).clamp(min=0)
    cond_row = cu[row_req] + (bs - q_lo)[row_req] + within
    cond_row = torch.where(row_real, cond_row, torch.zeros_like(cond_row)).clamp(0, T - 1)
    if bucket.cfg:
        unc_row = torch.where(row_real & rq.i.cfg.bool()[row_req], cu[b1 + row_req] + bs[row_req] + within,
                              cond_row)
        logits_rows = torch.cat([cond_row, unc_row.clamp(0, T - 1)])
    else:
        logits_rows = cond_row
    canvas_idx = torch.where(row_real, ri.offset + position, torch.full_like(position, capacity))
    lay = Layout(ids, pos, attn, logits_rows, cu_rows, row_req, row_real, position, canvas_idx, ri, rf)
    if tokens is not None:
        lay.row_tok = _drafted(tokens.index_select(0, canvas_idx), canvas_idx, position, row_req, rq,
                               guess, mask_id)
        if guess is not None:
            g = guess.index_select(0, canvas_idx)
            lay.gstep, lay.gtok = g[:, 0], g[:, 1]
    return lay


# ---------------------------------------------------------------- stage: forward with guidance
def forward(model, kv, lay: Layout, rq: Requests, bucket: Bucket) -> torch.Tensor:
    """Logits [R, V] of the logit rows; on CFG rows u + (s + 1) * (c - u)."""
    out = model(lay.ids, lay.pos, lay.attn, kv, lay.logits_rows)
    logits = out[:bucket.rows]
    if bucket.cfg:
        u = out[bucket.rows:]
        scale = (lay.rf.cfg_scale + 1).to(logits.dtype).unsqueeze(1)
        logits = torch.where(rq.i.cfg.bool()[lay.row_req].unsqueeze(1), u + scale * (logits - u), logits)
    return logits


# ---------------------------------------------------------------- stage: candidates
@dataclass
class Candidates:
    x0: torch.Tensor     # candidate per logit row
    conf: torch.Tensor   # its confidence; -inf where the row is not a candidate
    cand: torch.Tensor   # bool: a masked position of an active request's planned block
    logprobs: tuple | None = None  # (token log-probability [R], top ids [R, 20], top values [R, 20])


def candidates(logits, lay: Layout, rq: Requests, bucket: Bucket, tokens, mask_id: int, eos_id: int,
               stop_ids, dynamic: bool, shard: cd.VocabShard | None = None, grammar_mask=None) -> Candidates:
    ri, rf = lay.ri, lay.rf
    row_tok = tokens.index_select(0, lay.canvas_idx) if lay.row_tok is None else lay.row_tok
    cand = (row_tok == mask_id) & lay.row_real & rq.active[lay.row_req]
    ban, seed, nonce = ri.ban_eos.bool(), ri.seed, ri.steps_done
    if not dynamic or bool((rf.eos_bias != 0).any()):  # in place: the logits are this step's own
        cd.add_to_column(logits, eos_id, rf.eos_bias.to(logits.dtype), shard)
    if not dynamic or bool((ri.min_tokens > 0).any()):  # in place: the drafting stage reads these logits
        cd.ban_stops(logits, lay.position - ri.prompt_len < ri.min_tokens, stop_ids, shard)
    if bucket.constrained:  # never under tensor parallelism (refused at admission)
        apply_grammar(logits, lay, rq, grammar_mask, dynamic)
    filters = RowFilters(ri.top_k, rf.top_p, rf.min_p) if bucket.filters else None
    d = cd.draw(logits, rf.temperature.to(torch.float32), seed, nonce, lay.position, ban, eos_id,
                mask_id, filters, dynamic, keep_dist=bucket.logprobs, shard=shard)
    lp = logprobs(d.dist, d.x0, ban, ri.n_logprobs, eos_id, dynamic) if bucket.logprobs else None
    conf = d.conf
    rnd = ri.random_remask.bool()
    if not dynamic or bool(rnd.any()):  # remasking "random": the confidence is a seeded uniform
        u = rng.uniform(seed, nonce, lay.position, torch.full_like(lay.position, rng.REMASK_STREAM))
        conf = torch.where(rnd, u.to(conf.dtype), conf)
    conf = cd.defer_stops(conf, d.x0, ri.defer_eos.bool(), stop_ids, dynamic)
    conf = torch.where(cand, conf, torch.full_like(conf, float("-inf")))
    return Candidates(d.x0, conf, cand, lp)


def frontier_rows(lay: Layout) -> torch.Tensor:
    """bool [R]: the logit row at each constrained request's frontier."""
    ri = lay.ri
    return (ri.frontier >= 0) & lay.row_real & (lay.position - ri.prompt_len == ri.frontier)


def apply_grammar(logits, lay: Layout, rq: Requests, grammar_mask, dynamic: bool) -> None:
    """Tokens the grammar does not allow at a constrained request's frontier get logit -inf (in
    place), after guidance and the EOS bias and before filters and the draw; every other row is
    untouched.
    `grammar_mask` bool [slots + 1, V]: the allowed tokens at each slot's frontier, written by the
    host (the dummy slot's row allows everything). Off CUDA only the frontier rows are touched; on
    CUDA every row gathers a mask row (the dummy's for non-frontier rows) at fixed shapes."""
    front = frontier_rows(lay)
    slot = rq.slot[lay.row_req]
    if dynamic:
        idx = front.nonzero().squeeze(1)
        if len(idx):
            allowed = grammar_mask.index_select(0, slot.index_select(0, idx))
            logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
        return
    dummy = torch.full_like(slot, grammar_mask.shape[0] - 1)
    allowed = grammar_mask.index_select(0, torch.where(front, slot, dummy))
    logits.masked_fill_(~allowed, float("-inf"))


def logprobs(dist, x0, ban, n_logprobs, eos_id: int, dynamic: bool):
    """Commit-time log-probabilities: log-softmax of the distribution the confidence is taken from
    (temperature 1; EOS ban, mask re-draw ban and filters applied). Off CUDA only the rows of
    requests that asked are computed (their batchmates pay nothing); on CUDA every row is, at
    fixed shapes (no host-side row selection inside a graph)."""
    dev, vocab = dist.device, dist.shape[1]
    eos_col = torch.arange(vocab, device=dev) == eos_id
    rows_lp = (n_logprobs >= 0).nonzero().squeeze(1) if dynamic else None
    sub = dist if rows_lp is None else dist.index_select(0, rows_lp)
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
    return tok_lp, top_ids, top_lp


# ---------------------------------------------------------------- stage: transfer choice
def transfer(c: Candidates, lay: Layout, rq: Requests, bucket: Bucket):
    """(chosen rows bool [R], candidates per request row [B + 1]). The schedule spreads the block's
    masked positions at its start (all of it, except in an infill span with fixed tokens) over its
    steps (`rules.quota_at`); threshold decoding (steps_per_block 0) takes the threshold rule."""
    b1 = bucket.requests + 1
    i = rq.i
    n_cand = torch.zeros(b1, dtype=torch.int64, device=c.x0.device).index_add_(0, lay.row_req, c.cand.long())
    m = torch.where(rq.start, n_cand, i.block_masked)
    spb = i.steps_per_block
    k = torch.where(spb > 0, quota_at(m, spb.clamp(min=1), rq.step_in_block), torch.zeros_like(spb))
    thr = torch.where(rq.active, rq.f.threshold, 0.0).to(torch.float32)
    conf = c.conf
    if bucket.constrained:  # constrained requests commit on the host (the frontier rule)
        conf = torch.where(lay.ri.frontier >= 0, torch.full_like(conf, float("-inf")), conf)
    return transfer_mask(conf, lay.cu_rows, k, thr), n_cand


# ---------------------------------------------------------------- stage: verify the drafts
@dataclass
class Verdict:
    """Per request row [B + 1]: whether its state is in its request's accepted chain, the request
    row of the request's last accepted state, and the steps the request advances."""

    accepted: torch.Tensor
    final: torch.Tensor
    adv: torch.Tensor


def verify(rq: Requests, lay: Layout, c: Candidates, chosen, bucket: Bucket) -> Verdict:
    """Draft D_{j+1} is accepted when it equals T_j, the step the sampler itself takes from D_j
    (the same positions committed, the same tokens); the chain ends at the first mismatch. A
    request's committed row (j = 0) is accepted when active: it is the reference's own step."""
    b1 = bucket.requests + 1
    rows = torch.arange(b1, device=chosen.device)
    if lay.gstep is None:
        return Verdict(rq.active, rows, rq.active.long())
    j = rq.draft[lay.row_req]
    expect = (lay.gstep == j + 1) & c.cand  # D_{j+1}'s commits over D_j
    mismatch = (chosen != expect) | (chosen & (c.x0 != lay.gtok))
    bad = torch.zeros(b1, dtype=torch.int64, device=chosen.device).index_add_(0, lay.row_req, mismatch.long())
    bad = ((bad > 0) | ~rq.active).long()
    before = torch.cumsum(bad, 0) - bad           # bad rows in [0, q)
    accepted = rq.active & (before - before[rq.base] == 0)
    n_acc = torch.zeros(b1, dtype=torch.int64, device=chosen.device).index_add_(0, rq.base, accepted.long())
    adv = n_acc[rq.base]
    final = rq.base + (adv - 1).clamp(min=0)
    return Verdict(accepted, final, adv)


# ---------------------------------------------------------------- stage: draft
def draft(logits, lay: Layout, rq: Requests, v: Verdict, new: SlotInts, block_done, tokens, guess,
          bucket: Bucket, mask_id: int, eos_id: int, stop_ids, capacity: int, dynamic: bool):
    """Guess the next steps of each drafting request from the logits of its last accepted state:
    step k applies the sampler's own rule (candidates with the noise of the step the reference
    would be at, its quota or threshold) to those logits, over the positions still masked after
    the guesses of steps < k. Guesses stay inside the block and stop before the block's last
    mask. Writes (guessed step, token) per block position into `guess`; returns per request row
    the number of steps guessed (the draft rows the next step may run)."""
    b1 = bucket.requests + 1
    dev = tokens.device
    i = rq.i
    zero = torch.zeros(b1, dtype=torch.int64, device=dev)
    base_ok = rq.active & (rq.draft == 0) & ~block_done & (i.draft_depth > 0)
    spb = i.steps_per_block
    room = torch.where(spb > 0, spb - 1 - new.step_in_block, i.draft_depth)
    kmax = torch.where(base_ok, torch.minimum(i.draft_depth, room).clamp(min=0), zero)
    if dynamic:
        want = lay.row_real & (rq.draft == 0)[lay.row_req] & (kmax[lay.row_req] > 0)
        sel = want.nonzero().squeeze(1)
        if sel.numel() == 0:
            return zero
        depth = int(kmax.max())
        counts = torch.zeros(b1, dtype=torch.int64, device=dev).index_add_(0, lay.row_req[sel],
                                                                           torch.ones_like(sel))
        cu = torch.zeros(b1 + 1, dtype=torch.int64, device=dev)
        cu[1:] = torch.cumsum(counts, 0)
    else:
        sel = torch.arange(lay.row_req.numel(), device=dev)
        depth, cu = bucket.depth, lay.cu_rows
    q = lay.row_req.index_select(0, sel)
    src = lay.cu_rows[v.final[q]] + (sel - lay.cu_rows[q])
    lg = logits.index_select(0, src)
    live = lay.row_real[sel] & (kmax[q] > 0) & (rq.draft[q] == 0)
    masked = (tokens.index_select(0, lay.canvas_idx[sel]) == mask_id) & live
    ri = SlotInts(*(t.index_select(0, sel) for t in lay.ri))
    rf = SlotFloats(*(t.index_select(0, sel) for t in lay.rf))
    temp = rf.temperature.to(torch.float32)
    ban = ri.ban_eos.bool()
    rnd = ri.random_remask.bool()
    filters = RowFilters(ri.top_k, rf.top_p, rf.min_p) if bucket.filters else None
    position = lay.position.index_select(0, sel)
    # Greedy low-confidence rows draw the same candidates at every step: drawn once then.
    once = dynamic and not bool(((temp > 0) | rnd).any())
    gstep = torch.zeros_like(q)
    gtok = torch.zeros_like(q)
    guessed = zero.clone()
    thr = torch.where(kmax > 0, rq.f.threshold, 0.0).to(torch.float32)
    for k in range(1, depth + 1):
        nonce = new.steps_done[q] + (k - 1)
        if k == 1 or not once:
            d = cd.draw(lg, temp, ri.seed, nonce, position, ban, eos_id, mask_id, filters, dynamic)
            conf = d.conf
            if not dynamic or bool(rnd.any()):
                u = rng.uniform(ri.seed, nonce, position, torch.full_like(position, rng.REMASK_STREAM))
                conf = torch.where(rnd, u.to(conf.dtype), conf)
            conf = cd.defer_stops(conf, d.x0, ri.defer_eos.bool(), stop_ids, dynamic)
        step_live = masked & (k <= kmax[q])
        cf = torch.where(step_live, conf, torch.full_like(conf, float("-inf")))
        kq = torch.where(spb > 0, quota_at(new.block_masked, spb.clamp(min=1), new.step_in_block + (k - 1)),
                         zero)
        ch = transfer_mask(cf, cu, kq, thr) & step_live
        gstep = torch.where(ch, torch.full_like(gstep, k), gstep)
        gtok = torch.where(ch, d.x0, gtok)
        masked = masked & ~ch
        left = torch.zeros(b1, dtype=torch.int64, device=dev).index_add_(0, q, masked.long())
        guessed = torch.where((guessed == k - 1) & (k <= kmax) & (left > 0), guessed + 1, guessed)
    gstep = torch.where(gstep <= guessed[q], gstep, torch.zeros_like(gstep))
    # one writer per position: the request's committed row (drafts and padding write the scratch row)
    mine = lay.row_real[sel] & (rq.draft[q] == 0) & rq.active[q]
    target = torch.where(mine, lay.canvas_idx[sel], torch.full_like(q, capacity))
    vals = torch.stack([gstep, gtok], 1) * mine.long().unsqueeze(1)
    guess.index_put_((target,), vals)
    return guessed


def copy_draft_kv(kv, rq: Requests, bucket: Bucket, capacity: int) -> None:
    """A cached draft reads the cached keys/values its request's committed state reads (those of
    the block-start forward): copied from the request's region into the draft's before the
    forward, whose fresh rows then overwrite the positions it computes."""
    if not bucket.draft_copy or kv is None:
        return
    dev = rq.slot.device
    b1 = bucket.requests + 1
    n = torch.where((rq.draft > 0) & rq.active & (rq.i.cache_mode != MODE_NONE), rq.i.length,
                    torch.zeros_like(rq.i.length))
    cu = torch.zeros(b1 + 1, dtype=torch.int64, device=dev)
    cu[1:] = torch.cumsum(n, 0)
    r = torch.arange(bucket.draft_copy, device=dev)
    seg = torch.searchsorted(cu[1:], r, right=True).clamp(max=b1 - 1)
    within = r - cu[seg]
    pad = r >= cu[-1]
    scratch = torch.full_like(r, capacity)
    src = torch.where(pad, scratch, rq.i.offset[seg] + within)
    dst = torch.where(pad, scratch, rq.kv_off[seg] + within)
    for buf in list(kv.k) + list(kv.v):
        buf.index_copy_(0, dst, buf.index_select(0, src))


# ---------------------------------------------------------------- stage: commit and pack
def commit(tokens, state, rq: Requests, lay: Layout, c: Candidates, chosen, n_cand, bucket: Bucket,
           mask_id: int, capacity: int, v: Verdict | None = None, drafting=None) -> torch.Tensor:
    """Write the chosen tokens of every accepted row, advance the active requests' state by the
    steps accepted (draft rows, inactive rows and the dummy slot unchanged) and pack the
    read-back buffer. `drafting(new, block_done)`, when given, runs the drafting stage on the
    committed canvas and returns the steps guessed per request row."""
    b1 = bucket.requests + 1
    dev = tokens.device
    v = v if v is not None else verify(rq, lay, c, chosen, bucket)
    take = chosen & v.accepted[lay.row_req]
    target = torch.where(take, lay.canvas_idx, torch.full_like(lay.canvas_idx, capacity))
    tokens.index_put_((target,), torch.where(take, c.x0, torch.full_like(c.x0, mask_id)))
    n_chosen = torch.zeros(b1, dtype=torch.int64, device=dev).index_add_(0, rq.base[lay.row_req], take.long())
    left = torch.zeros(b1, dtype=torch.int64, device=dev).index_add_(0, lay.row_req,
                                                                     (c.cand & ~chosen).long())
    active, i = rq.active, rq.i
    fin = v.final[rq.base]
    block_done = active & (left[fin] == 0)
    # NFE as the reference samplers count it: their cache loops test for a finished block after
    # each cached forward, so a block that its block-start forward completes costs them one more
    # forward that unmasks nothing. We skip that forward but count it, so NFE compares.
    phantom = (i.cache_mode != MODE_NONE) & rq.start & block_done
    act = active.long()
    adv = v.adv[rq.base] * act
    new = i._replace(
        unmasked=i.unmasked + n_chosen * act, steps_done=i.steps_done + adv,
        nfe=i.nfe + adv + act * phantom.long(), block_index=i.block_index + block_done.long(),
        step_in_block=torch.where(active, torch.where(block_done, torch.zeros_like(act),
                                                      rq.step_in_block + adv), i.step_in_block),
        block_masked=torch.where(active & rq.start, n_cand, i.block_masked))
    guessed = drafting(new, block_done) if drafting is not None else torch.zeros_like(act)
    new = new._replace(guessed=torch.where(active, guessed, i.guessed),
                       guess_nonce=torch.where(active, new.steps_done, i.guess_nonce))
    dummy = state.shape[0] - 1
    is_draft = rq.draft > 0
    real = (rq.slot < dummy) & ~is_draft
    keep = torch.where(is_draft.unsqueeze(1), state[dummy].unsqueeze(0).expand_as(rq.raw), rq.raw)
    rows = torch.where(real.unsqueeze(1), torch.stack(new, 1), keep)  # drafts and the dummy slot: unchanged
    state.index_copy_(0, torch.where(is_draft, torch.full_like(rq.slot, dummy), rq.slot), rows)
    after = columns(torch.stack(new, 1).index_select(0, rq.base))
    parts = dict(
        rows=torch.stack(RowOut(chosen.long(), c.x0, lay.position - lay.ri.prompt_len), 1),
        conf=c.conf,
        requests=torch.stack(RequestOut(act, after.steps_done, after.nfe, after.unmasked,
                                        block_done[rq.base].long(),
                                        (after.block_index >= after.n_blocks).long(),
                                        v.accepted.long(), after.guessed), 1))
    if c.logprobs is not None:
        parts.update(token_logprob=c.logprobs[0], top_ids=c.logprobs[1], top_logprobs=c.logprobs[2])
    return ReadBack.of(bucket).pack(parts)


def device_step(model, kv, tokens, state, fstate, plan, bucket: Bucket, mask_id: int, eos_id: int,
                stop_ids: torch.Tensor, capacity: int, dynamic: bool | None = None,
                grammar_mask=None, guess: torch.Tensor | None = None) -> torch.Tensor:
    """One step for the requests in `plan`; updates `tokens`, `state`, `kv` (and `guess`) in place.
    Returns what the host reads back as one int64 buffer of fixed size (`ReadBack.of(bucket)`):
    one copy. `dynamic` (default: off CUDA, where there is no graph to capture and reading a flag
    back costs nothing): optional work (the mask-id re-draw, random remasking, deferred stops)
    runs only when some row needs it. `grammar_mask` [slots + 1, V]: the constrained requests'
    allowed tokens at their frontier (structured output). `guess` [capacity + 1, 2]: the drafting
    stage's guesses (exact parallel decoding; None: no drafting)."""
    dynamic = (not tokens.is_cuda) if dynamic is None else dynamic
    rq = gather(state, fstate, plan)
    lay = layout(rq, bucket, tokens, mask_id, capacity, guess)
    copy_draft_kv(kv, rq, bucket, capacity)
    logits = forward(model, kv, lay, rq, bucket)
    c = candidates(logits, lay, rq, bucket, tokens, mask_id, eos_id, stop_ids, dynamic, cd.vocab_shard(model),
                   grammar_mask)
    chosen, n_cand = transfer(c, lay, rq, bucket)
    v = verify(rq, lay, c, chosen, bucket)
    drafting = None
    if guess is not None and bucket.depth > 0:
        def drafting(new, block_done):
            return draft(logits, lay, rq, v, new, block_done, tokens, guess, bucket, mask_id, eos_id,
                         stop_ids, capacity, dynamic)
    return commit(tokens, state, rq, lay, c, chosen, n_cand, bucket, mask_id, capacity, v, drafting)
