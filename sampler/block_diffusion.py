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

Exact parallel decoding (`draft_depth` d > 0, `sampler.block_drafts`): after a step, the logits
that made it also guess the request's next states inside the current block, step by step with the
sampler's own rule (the step's quota or num_to_transfer, the thresholds, LLaDA2.1's edits, the
noise of the step the reference would be at). The next forward runs each guess D_j as one more
row: the current block's queries over keys [0, (c+1)B) in a region of the draft pool, whose rows
[0, cB) are copied from the request's final prefix keys/values first. The sampler's step from the
committed state is taken as always; D_{j+1} is accepted only when it equals, token for token, the
step taken from D_j, and the chain ends at the first mismatch, at the block's end or at the
request's end. Every accepted state's step is an ordinary step (its own event, step index and NFE),
so ids, events and NFE are those of the run without drafts; only the forwards are fewer. Guesses
never cross a block boundary: the next block's first forward writes its prefix's keys/values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from sampler import block_drafts as bd
from sampler import candidates as cd
from sampler.batch import Batch
from sampler.draft_gate import gate_for
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
    steps: int = 0             # steps (= reference forwards) taken
    depth: int = 0             # draft depth (exact parallel decoding; 0: off)
    guesses: list = field(default_factory=list)  # the current block's guessed next states D_1..
    forwards: int = 0          # forwards it took part in (fewer than steps when drafts were accepted)
    draft_rows: int = 0        # draft rows it was given in all

    @property
    def gen_length(self) -> int:
        return self.params.gen_length

    @property
    def k(self) -> int:
        """The step's minimum count of positions to unmask."""
        return self.k_at(self.step_in_block)

    def k_at(self, step_in_block: int) -> int:
        return self.params.num_to_transfer if self.editing else self.quota[step_in_block]


@dataclass
class _Unit:
    """One state a step forwards for a request: its committed state (j = 0) or its draft D_j,
    whose keys/values live in the draft pool from row `kv_off`."""

    req: _BlockRequest
    j: int = 0
    kv_off: int = -1


@dataclass
class _Rows:
    """The logit rows of a step: the current block of each unit, one after the other."""

    row_unit: torch.Tensor  # unit of each row (host)
    cu_rows: torch.Tensor   # rows of unit u: cu_rows[u]:cu_rows[u+1] (host)
    position: torch.Tensor  # absolute canvas position (host)
    canvas_idx: torch.Tensor  # token buffer row (device)
    tok: torch.Tensor = None  # the row's token in its unit's state (device)


class BlockDiffusionBatch(Batch):
    """Running LLaDA2.x requests; `step()` advances all of them with one forward."""

    block_diffusion = True

    def __init__(self, model, special, capacity_tokens: int = 16384, max_requests: int = 64,
                 draft_depth: int = 0, draft_budget: int = 0, adaptive_drafting: bool | None = None):
        # Exact parallel decoding as in the LLaDA step: `draft_depth` for requests that leave
        # theirs unset; `draft_budget` bounds a step's query tokens with draft rows and the rows
        # of the draft pool; `adaptive_drafting` (None: on for a CPU) drafts and guesses only while
        # the measured steps say it pays (sampler.draft_gate).
        if getattr(model, "tp", None) is not None:
            draft_budget = 0  # guesses select over the whole vocabulary: not under tensor parallelism
        super().__init__(model, special, capacity_tokens, max_requests, draft_rows=draft_budget)
        self.draft_depth = draft_depth
        self.draft_budget = draft_budget
        self.draft_rows_run = 0   # draft rows forwarded, in all
        self.steps_accepted = 0   # steps advanced beyond one per forward (accepted drafts), in all
        self.gate = gate_for(adaptive_drafting, self.device, draft_budget, start_drafting=True)

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
        depth = self.draft_depth if params.draft_depth is None else params.draft_depth
        return _BlockRequest(rid, slot, off, rows, params, p, block_len=b, n_blocks=rows // b,
                             block_index=p // b, first_block=p // b, quota=quota(b, steps),
                             editing=params.editing_threshold is not None,
                             depth=depth if self.draft_budget > 0 else 0)

    def canvas(self, rid) -> list[int]:
        """Block diffusion edits tokens: the device's canvas."""
        r = self.requests[rid]
        lo = r.offset + r.prompt_len
        return self.tokens[lo:lo + r.gen_length].tolist()

    def planned_query_tokens(self) -> int:
        """The blocks to commit and the current one, per request (draft rows excluded)."""
        return sum(r.block_len * (r.block_index - r.committed + 1) for r in self.requests.values())

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self) -> list[StepEvent]:
        if not self.requests:
            return []
        gate = self.gate if any(r.depth > 0 for r in self.requests.values()) else None
        if gate is None:
            return self._step()
        t0 = gate.clock()
        events = self._step()
        gate.record(gate.clock() - t0, len(events))  # an event per sampler step advanced
        return events

    @property
    def _drafts_allowed(self) -> bool:
        """Whether this step plans drafts and guesses the next (the draft gate's mode)."""
        return self.gate is None or self.gate.drafting

    def _step(self) -> list[StepEvent]:
        t0 = time.perf_counter()
        units = self._plan(list(self.requests.values()))
        guesses = [u.req.guesses[u.j - 1] for u in units if u.j > 0]
        ids_rows, kv_rows, pos, attn, logits_rows, rows = self._layout(units)
        src = torch.cat([self.tokens] + guesses) if guesses else self.tokens
        ids = src.index_select(0, ids_rows.to(self.device))
        rows.tok = ids.index_select(0, logits_rows.to(self.device))
        bd.copy_prefix_kv(self.kv, [(u.req.offset, u.kv_off, u.req.block_index * u.req.block_len)
                                    for u in units if u.j > 0], self.device)
        self.host_seconds += time.perf_counter() - t0  # planning; the rest waits for the forward
        logits = self.model(ids, pos.to(self.device), attn, self.kv, logits_rows.to(self.device))
        self.forwards += 1
        x0, conf, chosen, edited = self._select(units, logits, rows)
        return self._settle(units, rows, logits, x0, conf, chosen, edited)

    def _plan(self, reqs) -> list[_Unit]:
        """Each request's committed state, then its drafts D_1.. (as many as its last step
        guessed), given level by level (every request's first draft before any second) while the
        step's query tokens and the draft pool stay within the draft budget."""
        units = {id(r): [_Unit(r)] for r in reqs}
        tokens = self.planned_query_tokens()
        pool = 0
        top = max((len(r.guesses) for r in reqs), default=0) if self._drafts_allowed else 0
        for level in range(1, top + 1):
            for r in reqs:
                if len(r.guesses) < level or len(units[id(r)]) != level:
                    continue
                region = (r.block_index + 1) * r.block_len
                if tokens + r.block_len > self.draft_budget or pool + region > self.draft_budget:
                    continue
                units[id(r)].append(_Unit(r, level, self.store.draft_base + pool))
                pool += region
                tokens += r.block_len
        return [u for r in reqs for u in units[id(r)]]

    def _layout(self, units: list[_Unit]):
        """(source rows of the packed ids, their K/V rows, positions, attention layout, logits rows,
        _Rows). A committed state runs one segment per block from its first uncommitted one; a
        draft runs its current block over its pool region. Draft ids are read from the guesses
        appended after the token buffer, in unit order."""
        seg_lo, seg_unit, seg_ids, seg_kv = [], [], [], []
        guess_at = self.tokens.shape[0]
        for n, u in enumerate(units):
            r = u.req
            c0 = r.block_len * r.block_index
            if u.j == 0:
                for j in range(r.committed, r.block_index + 1):
                    seg_lo.append(j * r.block_len)
                    seg_unit.append(n)
                    seg_ids.append(r.offset)
                    seg_kv.append(r.offset)
            else:
                seg_lo.append(c0)
                seg_unit.append(n)
                seg_ids.append(guess_at - c0)
                seg_kv.append(u.kv_off)
                guess_at += r.block_len
        i64 = dict(dtype=torch.int64)
        seg_lo_t, seg_unit_t = torch.tensor(seg_lo, **i64), torch.tensor(seg_unit, **i64)
        blen = torch.tensor([u.req.block_len for u in units], **i64)
        counts = blen[seg_unit_t]
        cu = torch.zeros(len(seg_lo) + 1, **i64)
        cu[1:] = torch.cumsum(counts, 0)
        total = int(cu[-1])
        tok_seg = torch.repeat_interleave(torch.arange(len(seg_lo)), counts, output_size=total)
        pos = seg_lo_t[tok_seg] + torch.arange(total) - cu[:-1][tok_seg]
        ids_rows = torch.tensor(seg_ids, **i64)[tok_seg] + pos
        kv_start = torch.tensor(seg_kv, **i64)
        kv_rows = kv_start[tok_seg] + pos
        k_len = seg_lo_t + counts
        # Each unit's last segment is its current block: its rows get logits.
        last = torch.cumsum(torch.bincount(seg_unit_t, minlength=len(units)), 0) - 1
        n_rows = int(blen.sum())
        row_unit = torch.repeat_interleave(torch.arange(len(units)), blen, output_size=n_rows)
        cu_rows = torch.zeros(len(units) + 1, **i64)
        cu_rows[1:] = torch.cumsum(blen, 0)
        within = torch.arange(n_rows) - cu_rows[:-1][row_unit]
        logits_rows = cu[:-1][last][row_unit] + within
        dev = self.device
        attn = AttnLayout(
            cu_q=cu.to(torch.int32).to(dev), k_start=kv_start.to(torch.int32).to(dev),
            k_len=k_len.to(torch.int32).to(dev), kv_index=kv_rows.to(dev),
            max_q=int(counts.max()), max_k=int(k_len.max()))
        cur = torch.tensor([u.req.block_index for u in units], **i64)
        off = torch.tensor([u.req.offset for u in units], **i64)
        position = (cur * blen)[row_unit] + within
        rows = _Rows(row_unit, cu_rows, position, (off[row_unit] + position).to(dev))
        return ids_rows, kv_rows, pos, attn, logits_rows, rows

    def _select(self, units, logits, rows: _Rows):
        """(x0, conf, chosen, edited) per logit row: candidates with the noise of the unit's step
        (a draft D_j's is the committed state's plus j), then the sampler's rule per unit."""
        dev = self.device

        def per_row(values, dtype):
            return torch.tensor(values, dtype=dtype)[rows.row_unit].to(dev)

        params = [u.req.params for u in units]
        ban = per_row([bool(p.ban_eos) for p in params], torch.bool) if any(p.ban_eos for p in params) else None
        d = cd.draw(logits, per_row([float(p.temperature) for p in params], torch.float32),
                    per_row([p.seed or 0 for p in params], torch.int64),
                    per_row([u.req.steps + u.j for u in units], torch.int64), rows.position.to(dev), ban,
                    self.eos_id, self.mask_id, shard=cd.vocab_shard(self.model))
        conf = cd.defer_stops(d.conf, d.x0, per_row([bool(p.defer_eos) for p in params], torch.bool),
                              self.stop_ids_d)
        rule = bd.Rule(
            k=torch.tensor([u.req.k_at(u.req.step_in_block + u.j) for u in units], dtype=torch.int64).to(dev),
            threshold=per_row([p.threshold for p in params], torch.float32),
            editing=per_row([bd.editing_threshold(p) for p in params], torch.float32),
            prompt=per_row([u.req.prompt_len for u in units], torch.int64) > rows.position.to(dev))
        chosen, edited = bd.apply_rule(rows.tok, d.x0, conf, rows.row_unit.to(dev), rows.cu_rows.to(dev),
                                       rule, self.mask_id)
        return d.x0, conf, chosen, edited

    def _settle(self, units, rows: _Rows, logits, x0, conf, chosen, edited) -> list[StepEvent]:
        """Take each request's step from its committed state, then from each draft that equals
        the state reached so far; guess the next states from the last step's logits."""
        change = chosen | edited
        first = torch.tensor([u.j == 0 for u in units])[rows.row_unit].to(self.device)
        take = change & first  # the committed states' steps: written at once
        self.tokens[rows.canvas_idx[take]] = x0[take]
        h = bd.HostRows(chosen.cpu().tolist(), edited.cpu().tolist(), x0.cpu().tolist(),
                        conf.cpu().tolist(), rows.tok.cpu().tolist())
        plen = torch.tensor([u.req.prompt_len for u in units], dtype=torch.int64)
        rel = (rows.position - plen[rows.row_unit]).tolist()
        cu = rows.cu_rows.tolist()
        events, n = [], 0
        while n < len(units):
            r = units[n].req
            group = n
            while group < len(units) and units[group].req is r:
                group += 1
            events += self._chain(r, units[n:group], n, cu, rows, rel, h, logits, x0, change)
            n = group
        return events

    def _chain(self, r: _BlockRequest, units, n0, cu, rows, rel, h, logits, x0, change) -> list[StepEvent]:
        """One request's steps of this forward: the committed state's, then each accepted draft's."""
        block = r.block_index
        r.forwards += 1
        evs, last = [], n0
        for j, u in enumerate(units):
            lo, hi = cu[n0 + j], cu[n0 + j + 1]
            if j > 0:
                if h.tok[lo:hi] != after:  # D_j is not the state the sampler reached: the chain ends
                    break
                w = change[lo:hi]
                self.tokens[rows.canvas_idx[lo:hi][w]] = x0[lo:hi][w]
            evs.append(self._step_event(r, lo, hi, rel, h))
            after = h.after(lo, hi)
            last = n0 + j
            if evs[-1].finished or r.block_index != block:
                break
        drafted = len(units) - 1
        for ev in evs:
            ev.forwards, ev.forward_steps, ev.draft_rows = r.forwards, len(evs), drafted
        r.draft_rows += drafted
        self.draft_rows_run += drafted
        self.steps_accepted += len(evs) - 1
        r.guesses = []
        if r.depth > 0 and self._drafts_allowed and not evs[-1].finished and r.block_index == block:
            lo, hi = cu[last], cu[last + 1]
            r.guesses = bd.guess(self, r, logits[lo:hi], torch.tensor(after, dtype=torch.int64, device=self.device),
                                 rows.position[lo:hi].to(self.device))
        return evs

    def _step_event(self, r: _BlockRequest, lo: int, hi: int, rel, h) -> StepEvent:
        """The request's step from the logit rows [lo, hi) (its tokens already written)."""
        picked = [i for i in range(lo, hi) if h.chosen[i]]
        edits = [i for i in range(lo, hi) if h.edited[i]]
        masks_before = sum(1 for i in range(lo, hi) if h.tok[i] == self.mask_id)
        gen = r.gen_length
        r.unmasked += sum(1 for i in picked if rel[i] < gen)
        block_no = r.block_index - r.first_block
        r.committed = r.block_index
        r.step_in_block += 1
        r.steps += 1
        finished, gen_ids = self._advance(r, picked, h.x0, masks_before, masks_before - len(picked), len(edits))
        shown = [i for i in picked if rel[i] < gen]
        shown_edits = [i for i in edits if rel[i] < gen]
        return StepEvent(
            request_id=r.rid, step=r.steps, block=block_no,
            positions=[rel[i] for i in shown], token_ids=[h.x0[i] for i in shown],
            confidences=[h.conf[i] for i in shown], masks_remaining=gen - r.unmasked,
            nfe=r.steps, finished=finished, gen_ids=gen_ids,
            edited_positions=[rel[i] for i in shown_edits],
            edited_token_ids=[h.x0[i] for i in shown_edits],
            edited_confidences=[h.conf[i] for i in shown_edits],
            final_upto=gen if finished else max(0, min(gen, r.block_index * r.block_len - r.prompt_len)))

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
            leave = bd.leaves_v20(r.step_in_block, len(r.quota), masks_after)
            if leave and eos in self._span(r, span_end):
                return True, self._result(r)
        else:
            leave, r.post_steps = bd.leaves_v21(r.post_steps, params.max_post_steps, masks_before,
                                                masks_after, n_edits)
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
