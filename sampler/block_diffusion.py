"""Block diffusion (LLaDA2.0 and LLaDA2.1 decoding) as the batched step of a LLaDA2.x batch.

Blocks of B tokens are laid over the whole canvas from position 0 (prompt included), the canvas is
padded with [MASK] to a multiple of B, and the first decoded block is the one holding the prompt's
end. Attention is bidirectional within a block and causal across blocks, so a finished block's keys
and values never change: each block's K/V rows are written once with its final tokens ("committed")
and read by every later step. What one step runs for request r, in one packed forward with the others:

    one segment per block not yet committed below the current one   queries [jB, (j+1)B)  keys [0, (j+1)B)
      (the prompt's whole blocks at the first step, the block just finished after that)
    the current block                                                queries [cB, (c+1)B)  keys [0, (c+1)B)

and logits for the current block's rows only. Per request, per step (temperature 0: x0 = argmax,
c = its softmax probability; comparisons with the thresholds are strict):

- LLaDA2.0: k = the step's quota (B // steps, the first B % steps steps get one more; steps capped at
  gen_length // minimal_topk); the masked positions with c > threshold if there are at least k of
  them, else the k most confident. The block ends when it has no [MASK]; after it, an EOS anywhere in
  the generated span ends the request. `eos_early_stop`: an EOS just unmasked with no [MASK] before
  it in the generated span ends the request at once.
- LLaDA2.1 (`editing_threshold` set): the same unmasking rule with k = num_to_transfer, plus editing:
  every already decoded (non-prompt) position of the block whose x0 differs from its token with
  c > editing_threshold takes x0. Once the block has no [MASK], at most `max_post_steps` more
  forwards, ending early at the first forward that edits nothing. `eos_early_stop`: after a block,
  an EOS in the generated span ends the request.

The result is the generated span cut after its first EOS (EOS included), as the reference returns it.
NFE counts forwards (one per step). Positions decoded past gen_length (the last block's overhang)
influence the others but are not reported in events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.selection import sample_candidates, transfer_mask
from sampler.reference_llada2 import cut_after_eos, quota
from weights.layers import AttnLayout


@dataclass
class BlockState:
    """Where one block-diffusion request stands (host side)."""

    block_length: int
    prompt_len: int
    gen_length: int
    n_blocks: int              # canvas length / block_length
    block: int                 # current block (absolute index from canvas position 0)
    first_block: int           # prompt_len // block_length
    quota: list[int]           # LLaDA2.0 tokens per step
    editing: bool
    ready: int = 0             # blocks whose K/V rows are final in the buffers
    t: int = 0                 # steps taken in the current block
    post: int = 0              # LLaDA2.1: forwards started after the block had no [MASK]
    unmasked: int = 0          # positions of the generated span unmasked so far
    events: list = field(default_factory=list)

    @classmethod
    def start(cls, prompt_len: int, params) -> "BlockState":
        b = params.block
        total = canvas_length(prompt_len, params)
        steps = min(params.llada2_steps, params.gen_length // params.minimal_topk)
        return cls(block_length=b, prompt_len=prompt_len, gen_length=params.gen_length,
                   n_blocks=total // b, block=prompt_len // b, first_block=prompt_len // b,
                   quota=quota(b, steps), editing=params.editing_threshold is not None)


def canvas_length(prompt_len: int, params) -> int:
    """Prompt plus gen_length rounded up to whole blocks (the rows a request holds)."""
    b = params.block
    return -(-(prompt_len + params.gen_length) // b) * b


def build_layout(reqs, device):
    """(ids source rows, positions, layout, logits rows, row_req, cu_rows) of one step."""
    seg_lo, seg_req = [], []
    for i, r in enumerate(reqs):
        st = r.blocks
        for j in range(st.ready, st.block + 1):
            seg_lo.append(j * st.block_length)
            seg_req.append(i)
    seg_lo_t = torch.tensor(seg_lo, dtype=torch.int64)
    seg_req_t = torch.tensor(seg_req, dtype=torch.int64)
    blen = torch.tensor([r.blocks.block_length for r in reqs], dtype=torch.int64)
    off = torch.tensor([r.offset for r in reqs], dtype=torch.int64)
    counts = blen[seg_req_t]
    cu = torch.zeros(len(seg_lo) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(counts, 0)
    total = int(cu[-1])
    tok_seg = torch.repeat_interleave(torch.arange(len(seg_lo)), counts, output_size=total)
    pos = seg_lo_t[tok_seg] + torch.arange(total) - cu[:-1][tok_seg]
    rows = off[seg_req_t][tok_seg] + pos
    k_len = seg_lo_t + counts
    # Each request's last segment is its current block: its rows get logits.
    last = torch.cumsum(torch.bincount(seg_req_t, minlength=len(reqs)), 0) - 1
    n_rows = int(blen.sum())
    row_req = torch.repeat_interleave(torch.arange(len(reqs)), blen, output_size=n_rows)
    cu_rows = torch.zeros(len(reqs) + 1, dtype=torch.int64)
    cu_rows[1:] = torch.cumsum(blen, 0)
    within = torch.arange(n_rows) - cu_rows[:-1][row_req]
    logits_rows = cu[:-1][last][row_req] + within
    layout = AttnLayout(
        cu_q=cu.to(torch.int32).to(device), k_start=off[seg_req_t].to(torch.int32).to(device),
        k_len=k_len.to(torch.int32).to(device), kv_index=rows.to(device),
        max_q=int(counts.max()), max_k=int(k_len.max()))
    return rows, pos, layout, logits_rows, row_req, cu_rows, within


@torch.no_grad()
def block_step(batch, reqs) -> list:
    """One forward for every block-diffusion request of `batch`; returns their StepEvents."""
    from sampler.batch import StepEvent

    dev = batch.device
    rows, pos, layout, logits_rows, row_req, cu_rows, within = build_layout(reqs, dev)
    ids = batch.tokens.index_select(0, rows.to(dev))
    logits = batch.model(ids, pos.to(dev), layout, batch.kv, logits_rows.to(dev))
    batch.forwards += 1

    slots = torch.tensor([r.slot for r in reqs], dtype=torch.int64)
    cur = torch.tensor([r.blocks.block for r in reqs], dtype=torch.int64)
    blen = torch.tensor([r.blocks.block_length for r in reqs], dtype=torch.int64)
    plen = torch.tensor([r.blocks.prompt_len for r in reqs], dtype=torch.int64)
    off = torch.tensor([r.offset for r in reqs], dtype=torch.int64)
    position = (cur * blen)[row_req] + within                     # absolute canvas position
    canvas_idx = (off[row_req] + position).to(dev)
    tok = batch.tokens.index_select(0, canvas_idx)
    is_mask = tok == batch.mask_id
    x0, conf = _draw(batch, logits, slots, row_req, position)

    p = [r.params for r in reqs]
    thr = torch.tensor([q.threshold for q in p], dtype=torch.float32)[row_req].to(dev)
    above = is_mask & (conf > thr)
    n_above = torch.zeros(len(reqs), dtype=torch.int64, device=dev).index_add_(
        0, row_req.to(dev), above.long())
    k = torch.tensor([r.params.num_to_transfer if r.blocks.editing else
                      r.blocks.quota[r.blocks.t] for r in reqs], dtype=torch.int64).to(dev)
    cand = torch.where(is_mask, conf, torch.full_like(conf, float("-inf")))
    chosen = transfer_mask(cand, cu_rows.to(dev), torch.maximum(k, n_above),
                           torch.zeros(len(reqs), dtype=torch.float32, device=dev))
    ethr = torch.tensor([q.editing_threshold if q.editing_threshold is not None else 2.0 for q in p],
                        dtype=torch.float32)[row_req].to(dev)
    prompt = (position < plen[row_req]).to(dev)
    edited = ~is_mask & ~prompt & (x0 != tok) & (conf > ethr)
    change = chosen | edited
    batch.tokens[canvas_idx[change]] = x0[change]

    chosen_h, edited_h, mask_h = chosen.cpu(), edited.cpu(), is_mask.cpu()
    x0_l, conf_l = x0.cpu().tolist(), conf.cpu().tolist()
    rel = (position - plen[row_req]).tolist()
    cu = cu_rows.tolist()
    events = []
    for j, r in enumerate(reqs):
        st = r.blocks
        lo, hi = cu[j], cu[j + 1]
        gen = st.gen_length
        picked = [i for i in range(lo, hi) if chosen_h[i]]
        edits = [i for i in range(lo, hi) if edited_h[i]]
        masks_before = int(mask_h[lo:hi].sum())
        masks_after = masks_before - len(picked)
        st.unmasked += sum(1 for i in picked if rel[i] < gen)
        block_no = st.block - st.first_block
        st.ready = st.block
        st.t += 1
        batch.steps_done[r.slot] += 1
        batch.nfe[r.slot] += 1
        finished, gen_ids = _advance(batch, r, st, picked, x0_l, masks_before, masks_after, len(edits))
        shown = [i for i in picked if rel[i] < gen]
        shown_edits = [i for i in edits if rel[i] < gen]
        ev = StepEvent(
            request_id=r.rid, step=int(batch.steps_done[r.slot]), block=block_no,
            positions=[rel[i] for i in shown], token_ids=[x0_l[i] for i in shown],
            confidences=[conf_l[i] for i in shown], masks_remaining=gen - st.unmasked,
            nfe=int(batch.nfe[r.slot]), finished=finished,
            edited_positions=[rel[i] for i in shown_edits],
            edited_token_ids=[x0_l[i] for i in shown_edits],
            edited_confidences=[conf_l[i] for i in shown_edits],
            final_upto=gen if finished else max(0, min(gen, st.block * st.block_length - st.prompt_len)))
        ev.gen_ids = gen_ids
        events.append(ev)
    return events


def _draw(batch, logits, slots, row_req, position):
    """(x0, conf) per logits row with the request's temperature, seed, step nonce and EOS ban; a
    mask-id candidate drawn again with the mask id banned; deferred stops ranked last."""
    dev = batch.device
    ban = batch.ban_eos[slots][row_req]
    seed = batch.seed[slots][row_req].to(dev)
    nonce = batch.steps_done[slots][row_req].to(dev)
    pos_d = position.to(dev)
    temp = batch.temperature[slots][row_req].to(dev)
    ban_rows = ban.to(dev) if bool(ban.any()) else None

    def draw(lg, rows=None):
        sel = (lambda t: t) if rows is None else (lambda t: t[rows])
        extra = dict(ban_ids=[batch.eos_id], ban_rows=sel(ban_rows)) if ban_rows is not None else {}
        return sample_candidates(lg, sel(temp), sel(seed), sel(nonce), sel(pos_d), **extra)

    x0, conf = draw(logits)
    rows = (x0 == batch.mask_id).nonzero().squeeze(1)
    if len(rows):
        sub = logits.index_select(0, rows)
        sub[:, batch.mask_id] = float("-inf")
        x0b, confb = draw(sub, rows)
        x0 = x0.index_copy(0, rows, x0b)
        conf = conf.index_copy(0, rows, confb.to(conf.dtype))
    defer = batch.defer_eos[slots][row_req]
    if bool(defer.any()) and batch.stop_ids:
        stop = torch.isin(x0, batch.stop_ids_d)
        conf = torch.where(defer.to(dev) & stop, torch.full_like(conf, -1.0), conf)
    return x0, conf


def _advance(batch, r, st: BlockState, picked, x0_l, masks_before, masks_after, n_edits):
    """Move the request past this step: (finished, gen_ids when finished)."""
    params = r.params
    eos = batch.eos_id
    span_end = (st.block + 1) * st.block_length

    def span(end):
        lo = r.offset + st.prompt_len
        return batch.tokens[lo:r.offset + end].tolist()

    if not st.editing:
        if params.eos_early_stop and any(x0_l[i] == eos for i in picked):
            gen = span(st.n_blocks * st.block_length)
            first = gen.index(eos) if eos in gen else None
            if first is not None and batch.mask_id not in gen[:first]:
                return True, gen[:min(first + 1, st.gen_length)]
        leave = masks_after == 0 or st.t >= len(st.quota)
        if leave and eos in span(span_end):
            return True, _result(batch, r, st)
    else:
        leave = False
        if masks_after == 0:
            if masks_before == 0 and n_edits == 0:
                leave = True
            else:
                st.post += 1
                leave = st.post > params.max_post_steps
        if leave and params.eos_early_stop:
            gen = span(span_end)
            if batch.mask_id not in gen and eos in gen:
                return True, _result(batch, r, st)
    if leave:
        st.block += 1
        st.t = st.post = 0
        if st.block >= st.n_blocks:
            return True, _result(batch, r, st)
    return False, None


def _result(batch, r, st: BlockState) -> list[int]:
    lo = r.offset + st.prompt_len
    return cut_after_eos(batch.tokens[lo:lo + st.gen_length].tolist(), batch.eos_id)
