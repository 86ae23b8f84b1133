"""The LLaDA step planned on the host: the CPU's path for steps without drafting.

`sampler.device_step` is written for CUDA graphs: every stage is tensor operations at fixed shapes
and nothing is read back, so a step costs some 300 small operations besides the forward. On a CPU
an operation is host time and reading a value back costs nothing, so this module runs the same
step with the bookkeeping in Python and numpy: the plan's state rows are read once, the packed
layout, the logit rows and their per-row fields are built from Python ints, the transfer rule
(the schedule's quota or the threshold rule) and the commit are decided on the host, the token
gather and the two writes (the chosen tokens, the advanced state rows) go through numpy views of
the buffers, and the tensor work left is the forward and the candidates' draw (the same functions
as the device step, on the same inputs).
It leaves the tokens, state and K/V buffers exactly as `device_step` does and returns what the
host reads of its read-back buffer (`ReadBack.unpack`'s sections), so the two are interchangeable
step by step (tests/test_host_step.py checks buffers, state and events against it on random mixes
of every mode, float32 and float64). With every row greedy the candidates take a shorter path:
the same operations `kernels.selection` runs for them, without the checks whose answer the host
knows; a candidate equal to the mask id (the re-draw) sends the step back to `candidates.draw`.

Steps it does not take (`usable`): drafting stages (a bucket with a draft depth), constrained
requests (the grammar's frontier rule), tensor parallelism and any device but the CPU; those run
`device_step`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from kernels import rng
from kernels.selection import RowFilters
from sampler import candidates as cd
from sampler.device_step import logprobs as row_logprobs
from sampler.rules import quota_at
from sampler.step_state import MODE_DUAL, MODE_NONE, RequestOut, SlotFloats, SlotInts
from weights.layers import AttnLayout

NEG_INF = float("-inf")
LAYOUTS_KEPT = 64  # layouts a batch's cache holds (emptied when full)
LAYOUT_TOKENS_KEPT = 2048  # only layouts of steps with at most this many packed tokens are kept


def usable(bucket, model) -> bool:
    """Whether `host_step` takes a step of this bucket (otherwise `device_step` does)."""
    return (not bucket.depth and not bucket.draft_copy and not bucket.constrained
            and getattr(model, "tp", None) is None and model.device.type == "cpu")


class Unpacked:
    """The read-back layout of a host step: its results are already the unpacked sections."""

    @staticmethod
    def unpack(results: dict) -> dict:
        return results


UNPACKED = Unpacked()


@dataclass
class _Rows:
    """The step's request rows on the host (no padding row: `device_step`'s dummy row only ever
    carries a zero-length segment and no logit rows)."""

    slots: list
    i: list          # SlotInts of Python ints per row, as gathered
    f: list          # SlotFloats per row
    sib: list        # planned step in block
    active: list     # the slot is where the host planned it (and not finished)
    start: list      # a block-start step
    bs: list         # canvas position of the planned block's first row
    q_lo: list
    q_hi: list


def _gather(state, fstate, plan_rows: list) -> _Rows:
    si, sf = state.numpy(), fstate.numpy()
    rows = _Rows([r[0] for r in plan_rows], [], [], [r[2] for r in plan_rows], [], [], [], [], [])
    for slot, blk, sib, *_ in plan_rows:
        i = SlotInts(*si[slot].tolist())
        rows.i.append(i)
        rows.f.append(SlotFloats(*sf[slot].tolist()))
        start = sib == 0
        bs = i.prompt_len + blk * i.block_len
        lo = 0 if (i.cache_mode == MODE_NONE or start) else bs
        hi = bs + i.block_len if (i.cache_mode == MODE_DUAL and not start) else i.length
        rows.active.append(i.block_index == blk and i.block_index < i.n_blocks)
        rows.start.append(start)
        rows.bs.append(bs)
        rows.q_lo.append(lo)
        rows.q_hi.append(max(hi, lo))
    return rows


@dataclass
class _Layout:
    """`device_step`'s packed layout and logit rows, as Python lists."""

    src: list = field(default_factory=list)    # token buffer row of each packed token [T]
    pos: list = field(default_factory=list)    # its canvas position
    kvi: list = field(default_factory=list)    # its K/V row
    blank: list = field(default_factory=list)  # packed tokens of unconditional canvases' context
    cu: list = field(default_factory=lambda: [0])  # segment offsets in the packed tokens
    seg_kv: list = field(default_factory=list)
    seg_len: list = field(default_factory=list)
    cu_rows: list = field(default_factory=lambda: [0])  # logit rows of request row b
    counts: list = field(default_factory=list)  # logit rows per request row
    owner: list = field(default_factory=list)   # request row of each logit row
    packed: list = field(default_factory=list)  # packed token of each logit row ([2R] with CFG)
    canvas: list = field(default_factory=list)  # token buffer row of each logit row
    position: list = field(default_factory=list)
    real: list = field(default_factory=list)
    fresh: bool = False    # no row caches: attention reads the fresh keys/values, none are written
    tensors: tuple = None  # (gather rows, positions, logit rows, positions of those, blank tokens
                           #  or None, AttnLayout, rotary tables), built once per layout


def _segments(rows: _Rows, bucket, capacity: int) -> list:
    """(query start, count, first K/V row, keys) per segment: each row's conditional segment, with
    CFG each row's unconditional canvas, then one padding segment that takes the rest of T."""
    segs = [(lo, hi - lo, i.offset, i.length) for i, lo, hi in zip(rows.i, rows.q_lo, rows.q_hi)]
    if bucket.cfg:
        segs += [(0, i.length if i.cfg else 0, i.offset + i.length, i.length) for i in rows.i]
    used = sum(s[1] for s in segs)
    return segs + [(0, max(bucket.tokens - used, 0), capacity, 1)]


def _layout_of(rows: _Rows, bucket, capacity: int, cache: dict | None) -> _Layout:
    """The step's layout, from `cache` when an earlier step had the same (a cached request's block
    steps and every step without a cache repeat theirs)."""
    if cache is None or bucket.tokens > LAYOUT_TOKENS_KEPT:
        return _layout(rows, bucket, capacity)
    key = (bucket, capacity, tuple((i.offset, i.length, i.block_len, i.prompt_len, i.gen_length, i.cfg,
                                    i.cache_mode)
                                   for i in rows.i), tuple(rows.q_lo), tuple(rows.q_hi), tuple(rows.bs))
    lay = cache.get(key)
    if lay is None:
        if len(cache) >= LAYOUTS_KEPT:
            cache.clear()
        lay = cache[key] = _layout(rows, bucket, capacity)
    return lay


def _layout(rows: _Rows, bucket, capacity: int) -> _Layout:
    b1, T, R = len(rows.i), bucket.tokens, bucket.rows
    lay = _Layout()
    segs = _segments(rows, bucket, capacity)
    # Without a cached row nothing reads the K/V buffers later (a region's next use rewrites it):
    # each segment then attends to its own fresh packed rows (every segment is a whole canvas).
    lay.fresh = all(i.cache_mode == MODE_NONE for i in rows.i)
    for n, (lo, cnt, kv0, keys) in enumerate(segs):
        lay.seg_kv.append((lay.cu[-1] if n < len(segs) - 1 else 0) if lay.fresh else kv0)
        lay.seg_len.append(keys)
        at = lay.cu[-1]
        lay.cu.append(at + cnt)
        if cnt <= 0:
            continue
        lay.pos += range(lo, lo + cnt)
        if n == len(segs) - 1:  # padding: the scratch token and K/V row
            lay.src += [capacity] * cnt
            lay.kvi += [capacity] * cnt
            continue
        i = rows.i[n % b1]
        lay.src += range(i.offset + lo, i.offset + lo + cnt)
        lay.kvi += range(kv0 + lo, kv0 + lo + cnt)
        if n >= b1:  # the unconditional canvas: the context (prompt and suffix) masked
            ctx = range(i.prompt_len, i.prompt_len + i.gen_length)
            lay.blank += [at + r for r in range(cnt) if lo + r not in ctx]
    assert len(lay.src) == T, (len(lay.src), T)
    unc = []
    for b, i in enumerate(rows.i):
        n = i.block_len if b < b1 - 1 else R - lay.cu_rows[-1]
        lay.cu_rows.append(lay.cu_rows[-1] + n)
        lay.counts.append(n)
        lay.owner += [b] * n
        real = min(n, i.block_len)  # rows past the block are padding
        bs = rows.bs[b]
        cond = lay.cu[b] + bs - rows.q_lo[b]
        lay.packed += [min(max(cond + w, 0), T - 1) for w in range(real)] + [0] * (n - real)
        lay.position += [max(bs + w, 0) for w in range(n)]
        lay.canvas += [i.offset + max(bs + w, 0) for w in range(real)] + [capacity] * (n - real)
        lay.real += [True] * real + [False] * (n - real)
        if bucket.cfg:
            first = lay.cu[b1 + b] + bs
            unc += [min(max(first + w if i.cfg else lay.packed[-n + w], 0), T - 1) for w in range(real)]
            unc += [0] * (n - real)
    lay.packed += unc
    return lay


def _per_row(lay: _Layout, values: list) -> list:
    """A per-request-row value repeated over its logit rows."""
    out = []
    for v, n in zip(values, lay.counts):
        out += [v] * n
    return out


def _forward(model, kv, tokens, lay: _Layout, rows: _Rows, bucket, mask_id: int, capacity: int):
    """(logits [R, V] of the logit rows, their canvas tokens, their positions): on CFG rows u + (s + 1) *
    (c - u), as `device_step.forward`."""
    T, R = bucket.tokens, bucket.rows
    if lay.tensors is None:
        parts = [lay.src, lay.canvas, lay.pos, lay.kvi, lay.packed, lay.position]
        flat = torch.tensor([x for p in parts for x in p], dtype=torch.int64)
        src, pos, kvi, packed, position = flat.split([T + R, T, T, len(lay.packed), R])
        i32 = torch.tensor([lay.cu, lay.seg_kv + [0], lay.seg_len + [0]], dtype=torch.int32)
        attn = AttnLayout(cu_q=i32[0], k_start=i32[1, :-1], k_len=i32[2, :-1], kv_index=kvi,
                          max_q=bucket.max_q, max_k=capacity + 1)
        own = getattr(type(model), "rotary_tables", None) is not None  # the decoder itself, not a wrapper
        lay.tensors = (src.numpy(), pos, packed, position, np.array(lay.blank, dtype=np.int64), attn,
                       model.rotary_tables(pos) if own else None)
        lay.src = lay.pos = lay.kvi = lay.packed = lay.blank = None  # in the tensors now
    src, pos, packed, position, blank, attn, tables = lay.tensors
    gathered = tokens.numpy()[src]  # the packed tokens, then the logit rows' tokens
    row_tok = gathered[T:].tolist()
    gathered[blank] = mask_id
    ids = torch.from_numpy(gathered[:T])
    kv = None if lay.fresh else kv
    if tables is None:  # a model wrapped by its caller: called as `device_step` calls it
        out = model(ids, pos, attn, kv, packed)
    else:  # its rotary tables kept with the layout; called as `full_logits` calls it
        out = model.forward(ids, pos, attn, kv, packed, tables=tables)
    logits = out[:R]
    if bucket.cfg:
        u = out[R:]
        scale = torch.tensor(_per_row(lay, [f.cfg_scale + 1 for f in rows.f]), dtype=torch.float64)
        on = torch.tensor(_per_row(lay, [bool(i.cfg) for i in rows.i]))
        logits = torch.where(on.unsqueeze(1), u + scale.to(logits.dtype).unsqueeze(1) * (logits - u), logits)
    return logits, row_tok, position


def _greedy(sub, ban_rows: list, eos_id: int):
    """`sample_candidates_reference` at temperature 0: the same operations on the same values (the
    argmax is taken in the logits' own dtype when no EOS is banned: widening to float64 keeps every
    value and their order, so it is the same first maximum)."""
    if ban_rows:
        l = sub.to(torch.float64)
        l = l.clone() if l.data_ptr() == sub.data_ptr() else l
        l[torch.tensor(ban_rows), eos_id] = NEG_INF
        best, x0 = torch.max(l, dim=-1)
    else:
        best, x0 = torch.max(sub, dim=-1)
        l = sub.to(torch.float64)
        best = best.to(torch.float64)
    # torch.logsumexp(l, -1) is amax, then these operations (the same bits, tests/test_host_step.py);
    # the maximum is known. A row whose maximum is infinite gives a NaN confidence either way.
    logz = (l - best.unsqueeze(1)).exp_().sum(-1).log_().add_(best)
    return x0, torch.exp(best - logz).to(torch.float32)


def _plain(rows: _Rows, bucket) -> bool:
    """Whether no option of any request touches the candidates: greedy, no EOS bias or ban, no
    min_tokens, filters, log-probabilities, random remasking or deferred stops."""
    if bucket.filters or bucket.logprobs:
        return False
    for i, f in zip(rows.i, rows.f):
        if (f.temperature > 0 or f.eos_bias != 0 or i.min_tokens > 0 or i.ban_eos or i.random_remask
                or i.defer_eos):
            return False
    return True


def _candidates(logits, cand: list, rows: _Rows, lay: _Layout, position, bucket, mask_id: int,
                eos_id: int, stop_ids):
    """(x0 list, conf list, logprobs) of the candidate logit rows `cand`: `device_step.candidates`
    on those rows only (every stage of it is row by row), its optional work decided from the host's
    copy of the fields."""
    idx = torch.from_numpy(np.array(cand, dtype=np.int64)) if len(cand) < logits.shape[0] else None
    if idx is not None:
        logits = logits.index_select(0, idx)
    redraw = False
    if _plain(rows, bucket):
        x0, conf = _greedy(logits, [], eos_id)
        x0_l = x0.tolist()
        if mask_id not in x0_l:
            return x0_l, conf.tolist(), None
        redraw = True  # the re-draw: the general path below draws
    if idx is not None:
        position = position.index_select(0, idx)
    of = [lay.owner[r] for r in cand]  # the request row of each candidate
    per = lambda values: [values[b] for b in of]
    if any(f.eos_bias != 0 for f in rows.f):
        bias = torch.tensor(per([f.eos_bias for f in rows.f]), dtype=torch.float64)
        cd.add_to_column(logits, eos_id, bias.to(logits.dtype), None)
    if any(i.min_tokens > 0 for i in rows.i):  # in place, as `device_step.candidates`
        below = [p - rows.i[b].prompt_len < rows.i[b].min_tokens for p, b in zip(position.tolist(), of)]
        cd.ban_stops(logits, torch.tensor(below, dtype=torch.bool), stop_ids, None)
    ban_l = per([bool(i.ban_eos) for i in rows.i])
    temps = per([f.temperature for f in rows.f])
    x0 = None
    if not (redraw or bucket.filters or bucket.logprobs or any(t > 0 for t in temps)):
        x0, conf = _greedy(logits, [k for k, b in enumerate(ban_l) if b], eos_id)
        x0_l = x0.tolist()
        if mask_id in x0_l:  # the re-draw: the general path from the start
            x0 = None
    seed = nonce = None
    lp = None
    if x0 is None or any(i.random_remask for i in rows.i):
        seed = torch.tensor(per([i.seed for i in rows.i]), dtype=torch.int64)
        nonce = torch.tensor(per([i.steps_done for i in rows.i]), dtype=torch.int64)
    if x0 is None:
        ban = torch.tensor(ban_l, dtype=torch.bool)
        filters = None
        if bucket.filters:
            filters = RowFilters(torch.tensor(per([i.top_k for i in rows.i]), dtype=torch.int64),
                                 torch.tensor(per([f.top_p for f in rows.f]), dtype=torch.float64),
                                 torch.tensor(per([f.min_p for f in rows.f]), dtype=torch.float64))
        temp = torch.tensor(temps, dtype=torch.float32)
        d = cd.draw(logits, temp, seed, nonce, position, ban if (any(ban_l) or filters or bucket.logprobs)
                    else None, eos_id, mask_id, filters, True, keep_dist=bucket.logprobs)
        x0, conf = d.x0, d.conf
        x0_l = x0.tolist()
        if bucket.logprobs:
            n_lp = torch.tensor(per([i.n_logprobs for i in rows.i]), dtype=torch.int64)
            lp = [t.numpy() for t in row_logprobs(d.dist, x0, ban, n_lp, eos_id, True)]
    if any(i.random_remask for i in rows.i):  # remasking "random": the confidence is a seeded uniform
        rnd = torch.tensor(per([bool(i.random_remask) for i in rows.i]), dtype=torch.bool)
        u = rng.uniform(seed, nonce, position, torch.full_like(position, rng.REMASK_STREAM))
        conf = torch.where(rnd, u.to(conf.dtype), conf)
    if any(i.defer_eos for i in rows.i):
        defer = torch.tensor(per([bool(i.defer_eos) for i in rows.i]), dtype=torch.bool)
        conf = cd.defer_stops(conf, x0, defer, stop_ids, True)
    return x0_l, conf.tolist(), lp


def _transfer(cand: list, conf: list, rows: _Rows, lay: _Layout):
    """(chosen candidates per request row, candidates per request row): `kernels.selection.
    transfer_mask`'s rule on the host over the candidate logit rows `cand` (ascending) and their
    confidences (ranks by a stable descending sort, ties to the lower row; the threshold compared in
    float32, as there). Chosen candidates are indices into `cand`, ascending."""
    picks, n_cand, k0 = [], [], 0
    for b, i in enumerate(rows.i):
        k1, hi = k0, lay.cu_rows[b + 1]
        while k1 < len(cand) and cand[k1] < hi:
            k1 += 1
        n_cand.append(k1 - k0)
        pick = []
        if k1 > k0:
            spb = i.steps_per_block
            k = quota_at(k1 - k0 if rows.start[b] else i.block_masked, max(spb, 1), rows.sib[b]) if spb > 0 else 0
            thr = float(np.float32(rows.f[b].threshold)) if rows.active[b] else 0.0
            if k == 1 and thr <= 0:  # one token: the first maximum (what the stable sort puts first)
                pick = [max(range(k0, k1), key=conf.__getitem__)]
            else:
                order = sorted(range(k0, k1), key=conf.__getitem__, reverse=True)  # stable
                pick = [order[0]] + [r for r in order[1:] if conf[r] >= thr] if thr > 0 else order[:k]
            pick = sorted(r for r in pick if math.isfinite(conf[r]))
        picks.append(pick)
        k0 = k1
    return picks, n_cand


def _advance(rows: _Rows, picks: list, n_cand: list):
    """(state rows after the step, block done) per request row: `device_step.commit`'s rule (the
    block is done when every candidate was chosen)."""
    new, done = [], []
    for b, i in enumerate(rows.i):
        if not rows.active[b]:
            new.append(i)
            done.append(False)
            continue
        block_done = len(picks[b]) == n_cand[b]
        phantom = i.cache_mode != MODE_NONE and rows.start[b] and block_done
        steps = i.steps_done + 1
        new.append(i._replace(
            unmasked=i.unmasked + len(picks[b]), steps_done=steps, nfe=i.nfe + 1 + int(phantom),
            block_index=i.block_index + int(block_done),
            step_in_block=0 if block_done else rows.sib[b] + 1,
            block_masked=n_cand[b] if rows.start[b] else i.block_masked, guessed=0, guess_nonce=steps))
        done.append(block_done)
    return new, done


def _results(rows: _Rows, lay: _Layout, new: list, done: list, cand: list, picks: list, x0: list,
             conf: list, lp) -> dict:
    """The step's results as `LLaDABatch.collect` reads them: `requests` as `ReadBack.unpack` gives
    that section of `device_step`'s buffer (a `RequestOut` of ints per request row), and instead of the per-logit-row
    sections, `picked`: per request row (keyed by its first logit row) the committed entries
    (indices into the log-probability arrays, span positions, token ids, confidences, in row order);
    with log-probabilities, their arrays over the candidate rows."""
    picked = {}
    for b, pick in enumerate(picks):
        plen = rows.i[b].prompt_len
        picked[lay.cu_rows[b]] = (pick, [lay.position[cand[k]] - plen for k in pick], [x0[k] for k in pick],
                                  [conf[k] for k in pick])
    out = dict(picked=picked, requests=[
        RequestOut(int(a), n.steps_done, n.nfe, n.unmasked, int(d), int(n.block_index >= n.n_blocks), int(a),
                   n.guessed) for a, n, d in zip(rows.active, new, done)])
    if lp is not None:
        out.update(token_logprob=lp[0], top_ids=lp[1], top_logprobs=lp[2])
    return out


def host_step(model, kv, tokens, state, fstate, plan_rows: list, bucket, mask_id: int, eos_id: int,
              stop_ids: torch.Tensor, capacity: int, cache: dict | None = None) -> dict:
    """One step for the requests in `plan_rows` (the host's plan: [slot, block index, step in
    block, ...] per request row, no draft rows); updates `tokens`, `state` and `kv` in place as
    `device_step` with that plan does, and returns its results (`_results`; `UNPACKED` reads them).
    `cache`: the caller's dict of layouts (and their tensors) to reuse across steps. Callers run
    it without autograd (the batch's `launch` does)."""
    rows = _gather(state, fstate, plan_rows)
    lay = _layout_of(rows, bucket, capacity, cache)
    logits, row_tok, position = _forward(model, kv, tokens, lay, rows, bucket, mask_id, capacity)
    # candidates: the masked positions of active requests' planned blocks
    active = rows.active
    cand = [r for r, (t, real, b) in enumerate(zip(row_tok, lay.real, lay.owner))
            if t == mask_id and real and active[b]]
    x0, conf, lp = (_candidates(logits, cand, rows, lay, position, bucket, mask_id, eos_id, stop_ids)
                    if cand else ([], [], None))
    picks, n_cand = _transfer(cand, conf, rows, lay)
    new, done = _advance(rows, picks, n_cand)
    tok = tokens.numpy()
    for pick in picks:
        for k in pick:
            tok[lay.canvas[cand[k]]] = x0[k]
    st = state.numpy()
    for b, slot in enumerate(rows.slots):
        if active[b]:
            st[slot] = new[b]
    return _results(rows, lay, new, done, cand, picks, x0, conf, lp)
