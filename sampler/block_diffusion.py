"""Block diffusion (LLaDA2.0 and LLaDA2.1 decoding) as the batched step of a LLaDA2.x batch.

Blocks of `block_len` tokens are laid over the whole canvas from position 0 (prompt included), the
canvas is padded with [MASK] to a whole number of blocks, and the first decoded block is the one
holding the prompt's end. Attention is bidirectional within a block and causal across blocks, so a
finished block's keys and values never change: each block's K/V rows are written once with its final
tokens ("committed") and read by every later step. What one step runs for request r, in one packed
forward with the others (B = block_len, c = the current block index, both absolute from position 0):

    one segment per block not yet committed below the current one   queries [jB, (j+1)B)  keys [0, (j+1)B)
      (the prompt's whole blocks at the first step, the block just finished after that)
    the current block                                                queries [cB, (c+1)B)  keys [0, (c+1)B)

and logits for the current block's rows only. Per request, per step (temperature 0: x0 = argmax,
conf = its softmax probability; comparisons with the thresholds are strict):

- LLaDA2.0: k = the step's quota (`rules.quota`: B // steps, the first B % steps steps one more;
  steps capped at gen_length // minimal_topk); the masked positions with conf > threshold if there
  are at least k of them, else the k most confident. The block ends when it has no [MASK]; after it,
  an EOS anywhere in the generated span ends the request. `eos_early_stop`: an EOS just unmasked with
  no [MASK] before it in the generated span ends the request at once.
- LLaDA2.1 (`editing_threshold` set): the same unmasking rule with k = num_to_transfer, plus editing:
  every already decoded (non-prompt) position of the block whose x0 differs from its token with
  conf > editing_threshold takes x0. Once the block has no [MASK], at most `max_post_steps` more
  forwards, ending early at the first forward that edits nothing. `eos_early_stop`: after a block,
  an EOS in the generated span ends the request.

Candidates are drawn as in the LLaDA step (`sampler.candidates`: temperature, seed, EOS ban, mask-id
re-draw, deferred stops). The result is the generated span cut after its first EOS (EOS included),
as the reference returns it (`rules.cut_after_eos`). NFE counts forwards (one per step). Positions
decoded past gen_length (the last block's overhang) influence the others but are not reported.
The step is planned on the host and synchronous: the next step depends on this one's edits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kernels.selection import transfer_mask
from sampler import candidates as cd
from sampler.batch import Batch
from sampler.events import StepEvent
from sampler.params import ParamError, SamplingParams
from sampler.rules import cut_after_eos, quota
from weights.layers import AttnLayout


def canvas_length(prompt_len: int, params: SamplingParams) -> int:
    """Prompt plus gen_length rounded up to whole blocks (the rows a request holds)."""
    b = params.block
    return -(-(prompt_len + params.gen_length) // b) * b


@dataclass
class _BlockRequest:
    """Where one block-diffusion request stands (host side); block indices are absolute from
    canvas position 0."""

    rid: object
    slot: int
    offset: int
    rows: int                  # canvas rows: n_blocks * block_len
    params: SamplingParams
    prompt_len: int
    block_len: int
    n_blocks: int
    block_index: int           # the current block
    first_block: int           # prompt_len // block_len: the first block decoded
    quota: list[int]           # LLaDA2.0 tokens per step of a block
    editing: bool              # LLaDA2.1
    committed: int = 0         # blocks whose K/V rows are final in the buffers
    step_in_block: int = 0
    post_steps: int = 0        # LLaDA2.1: forwards started after the block had no [MASK]
    unmasked: int = 0          # positions of the generated span unmasked so far
    steps: int = 0             # steps (= forwards) taken

    @property
    def gen_length(self) -> int:
        return self.params.gen_length

    @property
    def k(self) -> int:
        """The step's minimum count of positions to unmask."""
        return self.params.num_to_transfer if self.editing else self.quota[self.step_in_block]


@dataclass
class _Rows:
    """The logit rows of a step: the current block of each request, one after the other."""

    row_req: torch.Tensor   # request of each row (host)
    cu_rows: torch.Tensor   # rows of request j: cu_rows[j]:cu_rows[j+1] (host)
    position: torch.Tensor  # absolute canvas position (host)
    canvas_idx: torch.Tensor  # token buffer row (device)


class BlockDiffusionBatch(Batch):
    """Running LLaDA2.x requests; `step()` advances all of them with one forward."""

    block_diffusion = True

    @staticmethod
    def rows_needed(prompt_len: int, params: SamplingParams) -> int:
        """Canvas rows a request holds: prompt + gen_length rounded up to whole blocks."""
        return canvas_length(prompt_len, params.for_block_diffusion())

    def _params(self, params, suffix_ids, span_ids) -> SamplingParams:
        if suffix_ids or span_ids is not None:
            raise ParamError("suffix", "infilling is not available for block-diffusion (LLaDA2.x) "
                             "checkpoints yet")
        return params.for_block_diffusion()

    def _start(self, rid, slot, off, rows, prompt_ids, span, suffix_ids, params, masks) -> _BlockRequest:
        p, b = len(prompt_ids), params.block
        canvas = torch.tensor(prompt_ids + [self.mask_id] * (rows - p), dtype=torch.int64)
        self.tokens[off:off + rows] = canvas.to(self.device)  # the canvas runs to its last block's end
        steps = min(params.llada2_steps, params.gen_length // params.minimal_topk)
        return _BlockRequest(rid, slot, off, rows, params, p, block_len=b, n_blocks=rows // b,
                             block_index=p // b, first_block=p // b, quota=quota(b, steps),
                             editing=params.editing_threshold is not None)

    def canvas(self, rid) -> list[int]:
        """Block diffusion edits tokens: the device's canvas."""
        r = self.requests[rid]
        lo = r.offset + r.prompt_len
        return self.tokens[lo:lo + r.gen_length].tolist()

    def planned_query_tokens(self) -> int:
        """The blocks to commit and the current one, per request."""
        return sum(r.block_len * (r.block_index - r.committed + 1) for r in self.requests.values())

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self) -> list[StepEvent]:
        if not self.requests:
            return []
        reqs = list(self.requests.values())
        t0 = time.perf_counter()
        ids_rows, pos, attn, logits_rows, rows = self._layout(reqs)
        ids = self.tokens.index_select(0, ids_rows.to(self.device))
        self.host_seconds += time.perf_counter() - t0  # planning; the rest waits for the forward
        logits = self.model(ids, pos.to(self.device), attn, self.kv, logits_rows.to(self.device))
        self.forwards += 1
        x0, conf, chosen, edited, is_mask = self._select(reqs, logits, rows)
        change = chosen | edited
        self.tokens[rows.canvas_idx[change]] = x0[change]
        return self._events(reqs, rows, x0, conf, chosen, edited, is_mask)

    def _layout(self, reqs):
        """(token buffer rows of the packed ids, positions, attention layout, logits rows, _Rows)."""
        seg_lo, seg_req = [], []
        for i, r in enumerate(reqs):
            for j in range(r.committed, r.block_index + 1):
                seg_lo.append(j * r.block_len)
                seg_req.append(i)
        seg_lo_t = torch.tensor(seg_lo, dtype=torch.int64)
        seg_req_t = torch.tensor(seg_req, dtype=torch.int64)
        blen = torch.tensor([r.block_len for r in reqs], dtype=torch.int64)
        off = torch.tensor([r.offset for r in reqs], dtype=torch.int64)
        counts = blen[seg_req_t]
        cu = torch.zeros(len(seg_lo) + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(counts, 0)
        total = int(cu[-1])
        tok_seg = torch.repeat_interleave(torch.arange(len(seg_lo)), counts, output_size=total)
        pos = seg_lo_t[tok_seg] + torch.arange(total) - cu[:-1][tok_seg]
        ids_rows = off[seg_req_t][tok_seg] + pos
        k_len = seg_lo_t + counts
        # Each request's last segment is its current block: its rows get logits.
        last = torch.cumsum(torch.bincount(seg_req_t, minlength=len(reqs)), 0) - 1
        n_rows = int(blen.sum())
        row_req = torch.repeat_interleave(torch.arange(len(reqs)), blen, output_size=n_rows)
        cu_rows = torch.zeros(len(reqs) + 1, dtype=torch.int64)
        cu_rows[1:] = torch.cumsum(blen, 0)
        within = torch.arange(n_rows) - cu_rows[:-1][row_req]
        logits_rows = cu[:-1][last][row_req] + within
        dev = self.device
        attn = AttnLayout(
            cu_q=cu.to(torch.int32).to(dev), k_start=off[seg_req_t].to(torch.int32).to(dev),
            k_len=k_len.to(torch.int32).to(dev), kv_index=ids_rows.to(dev),
            max_q=int(counts.max()), max_k=int(k_len.max()))
        cur = torch.tensor([r.block_index for r in reqs], dtype=torch.int64)
        position = (cur * blen)[row_req] + within
        rows = _Rows(row_req, cu_rows, position, (off[row_req] + position).to(dev))
        return ids_rows, pos, attn, logits_rows, rows

    def _select(self, reqs, logits, rows: _Rows):
        """(x0, conf, chosen, edited, is_mask) per logit row: candidates, then per request the
        top max(k, #masked above threshold) and LLaDA2.1's edits."""
        dev = self.device

        def per_row(values, dtype):
            return torch.tensor(values, dtype=dtype)[rows.row_req].to(dev)

        params = [r.params for r in reqs]
        tok = self.tokens.index_select(0, rows.canvas_idx)
        is_mask = tok == self.mask_id
        ban = per_row([bool(p.ban_eos) for p in params], torch.bool) if any(p.ban_eos for p in params) else None
        d = cd.draw(logits, per_row([float(p.temperature) for p in params], torch.float32),
                    per_row([p.seed or 0 for p in params], torch.int64),
                    per_row([r.steps for r in reqs], torch.int64), rows.position.to(dev), ban,
                    self.eos_id, self.mask_id, shard=cd.vocab_shard(self.model))
        x0 = d.x0
        conf = cd.defer_stops(d.conf, x0, per_row([bool(p.defer_eos) for p in params], torch.bool),
                              self.stop_ids_d)
        row_req_d = rows.row_req.to(dev)
        above = is_mask & (conf > per_row([p.threshold for p in params], torch.float32))
        n_above = torch.zeros(len(reqs), dtype=torch.int64, device=dev).index_add_(0, row_req_d, above.long())
        k = torch.tensor([r.k for r in reqs], dtype=torch.int64).to(dev)
        cand = torch.where(is_mask, conf, torch.full_like(conf, float("-inf")))
        chosen = transfer_mask(cand, rows.cu_rows.to(dev), torch.maximum(k, n_above),
                               torch.zeros(len(reqs), dtype=torch.float32, device=dev))
        ethr = per_row([p.editing_threshold if p.editing_threshold is not None else 2.0 for p in params],
                       torch.float32)
        prompt = per_row([r.prompt_len for r in reqs], torch.int64) > rows.position.to(dev)
        edited = ~is_mask & ~prompt & (x0 != tok) & (conf > ethr)
        return x0, conf, chosen, edited, is_mask

    def _events(self, reqs, rows: _Rows, x0, conf, chosen, edited, is_mask) -> list[StepEvent]:
        chosen_h, edited_h, mask_h = chosen.cpu(), edited.cpu(), is_mask.cpu()
        x0_l, conf_l = x0.cpu().tolist(), conf.cpu().tolist()
        plen = torch.tensor([r.prompt_len for r in reqs], dtype=torch.int64)
        rel = (rows.position - plen[rows.row_req]).tolist()
        cu = rows.cu_rows.tolist()
        events = []
        for j, r in enumerate(reqs):
            lo, hi, gen = cu[j], cu[j + 1], r.gen_length
            picked = [i for i in range(lo, hi) if chosen_h[i]]
            edits = [i for i in range(lo, hi) if edited_h[i]]
            masks_before = int(mask_h[lo:hi].sum())
            r.unmasked += sum(1 for i in picked if rel[i] < gen)
            block_no = r.block_index - r.first_block
            r.committed = r.block_index
            r.step_in_block += 1
            r.steps += 1
            finished, gen_ids = self._advance(r, picked, x0_l, masks_before,
                                              masks_before - len(picked), len(edits))
            shown = [i for i in picked if rel[i] < gen]
            shown_edits = [i for i in edits if rel[i] < gen]
            events.append(StepEvent(
                request_id=r.rid, step=r.steps, block=block_no,
                positions=[rel[i] for i in shown], token_ids=[x0_l[i] for i in shown],
                confidences=[conf_l[i] for i in shown], masks_remaining=gen - r.unmasked,
                nfe=r.steps, finished=finished, gen_ids=gen_ids,
                edited_positions=[rel[i] for i in shown_edits],
                edited_token_ids=[x0_l[i] for i in shown_edits],
                edited_confidences=[conf_l[i] for i in shown_edits],
                final_upto=gen if finished else max(0, min(gen, r.block_index * r.block_len - r.prompt_len))))
        return events

    def _advance(self, r: _BlockRequest, picked, x0_l, masks_before, masks_after, n_edits):
        """Move the request past this step: (finished, gen_ids when finished)."""
        params, eos = r.params, self.eos_id
        span_end = (r.block_index + 1) * r.block_len
        if not r.editing:
            if params.eos_early_stop and any(x0_l[i] == eos for i in picked):
                gen = self._span(r, r.n_blocks * r.block_len)
                first = gen.index(eos) if eos in gen else None
                if first is not None and self.mask_id not in gen[:first]:
                    return True, gen[:min(first + 1, r.gen_length)]
            leave = masks_after == 0 or r.step_in_block >= len(r.quota)
            if leave and eos in self._span(r, span_end):
                return True, self._result(r)
        else:
            leave = False
            if masks_after == 0:
                if masks_before == 0 and n_edits == 0:
                    leave = True
                else:
                    r.post_steps += 1
                    leave = r.post_steps > params.max_post_steps
            if leave and params.eos_early_stop:
                gen = self._span(r, span_end)
                if self.mask_id not in gen and eos in gen:
                    return True, self._result(r)
        if leave:
            r.block_index += 1
            r.step_in_block = r.post_steps = 0
            if r.block_index >= r.n_blocks:
                return True, self._result(r)
        return False, None

    def _span(self, r: _BlockRequest, end: int) -> list[int]:
        """The canvas from the generated span's start to canvas position `end`."""
        return self.tokens[r.offset + r.prompt_len:r.offset + end].tolist()

    def _result(self, r: _BlockRequest) -> list[int]:
        lo = r.offset + r.prompt_len
        return cut_after_eos(self.tokens[lo:lo + r.gen_length].tolist(), self.eos_id)
