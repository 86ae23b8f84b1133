"""One denoising step for a whole batch of requests, each at its own point in its own schedule.

Per-request state lives in tensors indexed by slot (host-side metadata: small ints the layout is
built from without device synchronisation) and a device token buffer that holds every canvas.
Each request owns a contiguous region of the token buffer and of the per-layer key/value buffers:
rows [off, off+L) hold its canvas (L = prompt + gen), and with classifier-free guidance rows
[off+L, off+2L) hold the unconditional canvas's keys/values.

What a step runs for request r (bs/be: its current block's bounds):
  cache none                    queries [0, L)   keys [0, L)
  prefix / dual, block start    queries [0, L)   keys [0, L)  (fills the cache)
  prefix, later steps           queries [bs, L)  keys [0, L)  (prefix rows cached, the rest fresh)
  dual, later steps             queries [bs, be) keys [0, L)  (prefix and suffix rows cached)
Fresh keys/values are always written to the buffers first, so the three modes are one code path.
Selection (candidate tokens, confidences, the top-k / threshold transfer) is one batched call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels import rng
from kernels.selection import sample_candidates, transfer_mask
from sampler.block_diffusion import BlockState, block_step, canvas_length
from sampler.params import ParamError, SamplingParams
from weights.layers import AttnLayout, KVBuffers

MODE = {"none": 0, "prefix": 1, "dual": 2}
NEG_INF = float("-inf")
DEFERRED = -1.0  # confidence given to deferred EOS/EoT candidates: below every probability


class CapacityError(RuntimeError):
    """The request can never fit this batch's buffers."""


@dataclass
class StepEvent:
    request_id: object
    step: int                      # steps this request has taken (1-based after the step)
    block: int                     # block the step worked on
    positions: list[int]           # unmasked this step, relative to the generated span
    token_ids: list[int]
    confidences: list[float]
    masks_remaining: int
    nfe: int                       # forwards so far, counted as the reference samplers count them
    finished: bool = False
    gen_ids: list[int] | None = None  # the generated span, once finished
    # Token editing (LLaDA2.1): already decoded positions that took a new token this step.
    edited_positions: list[int] = field(default_factory=list)
    edited_token_ids: list[int] = field(default_factory=list)
    edited_confidences: list[float] = field(default_factory=list)
    # Tokens before this position (relative) can no longer change; None: every unmasked token is
    # final (no editing).
    final_upto: int | None = None


@dataclass
class _Request:
    rid: object
    slot: int
    offset: int
    rows: int
    params: SamplingParams
    prompt_len: int
    events: list = field(default_factory=list)
    blocks: BlockState | None = None  # block-diffusion requests only


class RegionAllocator:
    """First-fit allocation of contiguous row ranges in [0, capacity), coalescing on free."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.free_ranges = [(0, capacity)]  # sorted (start, length)

    def alloc(self, n: int) -> int | None:
        for i, (start, length) in enumerate(self.free_ranges):
            if length >= n:
                if length == n:
                    self.free_ranges.pop(i)
                else:
                    self.free_ranges[i] = (start + n, length - n)
                return start
        return None

    def fits(self, n: int) -> bool:
        return any(length >= n for _, length in self.free_ranges)

    def free(self, start: int, n: int) -> None:
        self.free_ranges.append((start, n))
        self.free_ranges.sort()
        merged = []
        for s, l in self.free_ranges:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + l)
            else:
                merged.append((s, l))
        self.free_ranges = merged

    @property
    def used(self) -> int:
        return self.capacity - sum(l for _, l in self.free_ranges)


class DiffusionBatch:
    """Running requests and their state; `step()` advances all of them with one forward."""

    def __init__(self, model, special, capacity_tokens: int = 16384, max_requests: int = 64):
        self.model = model
        self.config = model.config
        self.block_diffusion = bool(getattr(model.config, "block_diffusion", False))
        self.mask_id = special.mask
        self.stop_ids = list(special.stop)
        self.stop_ids_d = torch.tensor(self.stop_ids, dtype=torch.int64, device=model.device)
        self.eos_id = special.eos
        self.device = model.device
        self.capacity = capacity_tokens
        self.max_requests = max_requests
        self.kv = KVBuffers(self.config, capacity_tokens, self.device, model.dtype)
        self.tokens = torch.full((capacity_tokens,), self.mask_id, dtype=torch.int64, device=self.device)
        self.regions = RegionAllocator(capacity_tokens)
        self.requests: dict[object, _Request] = {}
        self.free_slots = list(range(max_requests - 1, -1, -1))
        n = max_requests
        i64 = dict(dtype=torch.int64)
        # Host-side per-slot metadata (the layout and schedules are computed from these).
        self.offset = torch.zeros(n, **i64)
        self.prompt_len = torch.zeros(n, **i64)
        self.length = torch.zeros(n, **i64)        # canvas length L
        self.block_len = torch.ones(n, **i64)
        self.steps_pb = torch.zeros(n, **i64)      # steps per block; 0 in threshold mode
        self.n_blocks = torch.ones(n, **i64)
        self.block = torch.zeros(n, **i64)         # current block
        self.step_in_block = torch.zeros(n, **i64)
        self.steps_done = torch.zeros(n, **i64)
        self.unmasked = torch.zeros(n, **i64)
        self.nfe = torch.zeros(n, **i64)           # forwards as the reference samplers count them
        self.mode = torch.zeros(n, **i64)
        self.cfg = torch.zeros(n, dtype=torch.bool)
        self.seed = torch.zeros(n, **i64)
        self.temperature = torch.zeros(n, dtype=torch.float32)
        self.threshold = torch.zeros(n, dtype=torch.float32)
        self.cfg_scale = torch.zeros(n, dtype=torch.float64)
        self.random_remask = torch.zeros(n, dtype=torch.bool)
        self.ban_eos = torch.zeros(n, dtype=torch.bool)
        self.defer_eos = torch.zeros(n, dtype=torch.bool)
        self.forwards = 0  # model forwards run by this batch (one per step)

    # ---------------------------------------------------------------- admission
    @staticmethod
    def rows_needed(prompt_len: int, params: SamplingParams, block_diffusion: bool = False) -> int:
        """Canvas rows a request holds: prompt + gen_length (twice with CFG); with block
        diffusion, rounded up to whole blocks."""
        if block_diffusion:
            return canvas_length(prompt_len, params.for_block_diffusion())
        n = prompt_len + params.gen_length
        return 2 * n if params.cfg_scale > 0 else n

    def can_admit(self, prompt_len: int, params: SamplingParams) -> bool:
        return bool(self.free_slots) and self.regions.fits(
            self.rows_needed(prompt_len, params, self.block_diffusion))

    def add(self, rid, prompt_ids, params: SamplingParams) -> None:
        prompt_ids = list(prompt_ids)
        if self.block_diffusion:
            params = params.for_block_diffusion()
        params.validate(len(prompt_ids), self.config.max_sequence_length, self.block_diffusion)
        vocab = self.config.embedding_size
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ParamError("prompt", f"token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already running")
        rows = self.rows_needed(len(prompt_ids), params, self.block_diffusion)
        if rows > self.capacity:
            raise CapacityError(f"the request needs {rows} canvas rows; this batch holds {self.capacity}")
        if not self.free_slots:
            raise CapacityError("no free request slot")
        off = self.regions.alloc(rows)
        if off is None:
            raise CapacityError("no contiguous canvas region free; retry after a request finishes")
        slot = self.free_slots.pop()
        p, g = len(prompt_ids), params.gen_length
        if self.block_diffusion:
            g = rows - p  # the canvas runs to the end of the last block
        canvas = torch.tensor(prompt_ids + [self.mask_id] * g, dtype=torch.int64)
        self.tokens[off:off + p + g] = canvas.to(self.device)
        s = slot
        self.offset[s], self.prompt_len[s], self.length[s] = off, p, p + g
        self.block_len[s] = params.block
        self.n_blocks[s] = params.blocks
        self.steps_pb[s] = 0 if params.threshold is not None else params.steps_per_block
        self.block[s] = self.step_in_block[s] = self.steps_done[s] = self.unmasked[s] = self.nfe[s] = 0
        self.mode[s] = MODE[params.cache]
        self.cfg[s] = params.cfg_scale > 0
        self.cfg_scale[s] = float(params.cfg_scale)
        self.seed[s] = params.seed if params.seed is not None else 0
        self.temperature[s] = float(params.temperature)
        self.threshold[s] = float(params.threshold) if params.threshold is not None else 0.0
        self.random_remask[s] = params.remasking == "random"
        self.ban_eos[s] = bool(params.ban_eos)
        self.defer_eos[s] = bool(params.defer_eos)
        self.requests[rid] = _Request(rid, slot, off, rows, params, p)
        if self.block_diffusion:
            self.requests[rid].blocks = BlockState.start(p, params)

    def remove(self, rid) -> None:
        req = self.requests.pop(rid, None)
        if req is None:
            return
        self.regions.free(req.offset, req.rows)
        self.free_slots.append(req.slot)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def rows_in_use(self) -> int:
        return self.regions.used

    def canvas(self, rid) -> list[int]:
        """The request's generated span as it stands (mask ids where still masked)."""
        req = self.requests[rid]
        s = req.slot
        lo = int(self.offset[s] + self.prompt_len[s])
        return self.tokens[lo:lo + req.params.gen_length].tolist()

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self) -> list[StepEvent]:
        if not self.requests:
            return []
        reqs = list(self.requests.values())
        if self.block_diffusion:
            return block_step(self, reqs)
        slots = torch.tensor([r.slot for r in reqs], dtype=torch.int64)
        b = len(reqs)
        off, plen, length = self.offset[slots], self.prompt_len[slots], self.length[slots]
        blen, blk, sib = self.block_len[slots], self.block[slots], self.step_in_block[slots]
        mode, cfg = self.mode[slots], self.cfg[slots]
        bs = plen + blk * blen
        be = bs + blen
        at_start = sib == 0
        q_lo = torch.where((mode == 0) | at_start, torch.zeros_like(bs), bs)
        q_hi = torch.where((mode == 2) & ~at_start, be, length)

        # Segments: one per request (its canvas), plus one per CFG request (unconditional canvas).
        cfg_idx = cfg.nonzero().squeeze(1)
        seg_req = torch.cat([torch.arange(b), cfg_idx])
        seg_uncond = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(len(cfg_idx), dtype=torch.bool)])
        seg_lo = torch.cat([q_lo, torch.zeros(len(cfg_idx), dtype=torch.int64)])
        seg_hi = torch.cat([q_hi, length[cfg_idx]])
        seg_kv = off[seg_req] + torch.where(seg_uncond, length[seg_req], torch.zeros_like(seg_req))
        counts = seg_hi - seg_lo
        cu = torch.zeros(len(seg_req) + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(counts, 0)
        total = int(cu[-1])
        tok_seg = torch.repeat_interleave(torch.arange(len(seg_req)), counts, output_size=total)
        pos = seg_lo[tok_seg] + torch.arange(total) - cu[:-1][tok_seg]
        kv_index = seg_kv[tok_seg] + pos
        src = off[seg_req][tok_seg] + pos
        blank = seg_uncond[tok_seg] & (pos < plen[seg_req][tok_seg])  # prompt masked out (CFG)

        # Logit rows: each request's current block, in its canvas segment (and its uncond one).
        n_rows = blen.sum()
        row_req = torch.repeat_interleave(torch.arange(b), blen, output_size=int(n_rows))
        cu_rows = torch.zeros(b + 1, dtype=torch.int64)
        cu_rows[1:] = torch.cumsum(blen, 0)
        within = torch.arange(int(n_rows)) - cu_rows[:-1][row_req]
        cond_rows = cu[:-1][row_req] + (bs - q_lo)[row_req] + within
        seg_of_uncond = torch.full((b,), -1, dtype=torch.int64)
        seg_of_uncond[cfg_idx] = torch.arange(b, b + len(cfg_idx))
        has_u = cfg[row_req]
        unc_rows = cu[:-1][seg_of_uncond[row_req][has_u]] + bs[row_req][has_u] + within[has_u]
        logits_rows = torch.cat([cond_rows, unc_rows])

        dev = self.device
        src_d, kv_d = src.to(dev), kv_index.to(dev)
        ids = self.tokens.index_select(0, src_d)
        if bool(blank.any()):
            ids = torch.where(blank.to(dev), torch.full_like(ids, self.mask_id), ids)
        layout = AttnLayout(
            cu_q=cu.to(torch.int32).to(dev), k_start=seg_kv.to(torch.int32).to(dev),
            k_len=length[seg_req].to(torch.int32).to(dev), kv_index=kv_d,
            max_q=int(counts.max()), max_k=int(length[seg_req].max()))
        out = self.model(ids, pos.to(dev), layout, self.kv, logits_rows.to(dev))
        self.forwards += 1
        nr = int(n_rows)
        logits = out[:nr]
        if len(unc_rows):  # classifier-free guidance: u + (s + 1) * (c - u) on the CFG rows
            gi = has_u.nonzero().squeeze(1).to(dev)
            u = out[nr:]
            scale = (self.cfg_scale[slots][row_req][has_u] + 1).to(dev, logits.dtype).unsqueeze(1)
            logits = logits.index_copy(0, gi, u + scale * (logits.index_select(0, gi) - u))
        return self._select(reqs, slots, logits, row_req, cu_rows, within, bs, blk, sib)

    def _select(self, reqs, slots, logits, row_req, cu_rows, within, bs, blk, sib):
        dev = self.device
        b = len(reqs)
        position = bs[row_req] + within                          # absolute canvas position
        canvas_idx = (self.offset[slots][row_req] + position).to(dev)
        cand = self.tokens.index_select(0, canvas_idx) == self.mask_id
        ban = self.ban_eos[slots][row_req]
        seed = self.seed[slots][row_req].to(dev)
        nonce = self.steps_done[slots][row_req].to(dev)
        pos_d = position.to(dev)
        temp = self.temperature[slots][row_req].to(dev)
        ban_d = ban.to(dev) if bool(ban.any()) else None
        banned = dict(ban_ids=[self.eos_id], ban_rows=ban_d) if ban_d is not None else {}
        x0, conf = sample_candidates(logits, temp, seed, nonce, pos_d, **banned)
        # A candidate equal to the mask id would leave its position masked for ever (the block never
        # completes, the request never ends). Trained models never propose it; rows that do are drawn
        # again with the mask logit at -inf (same noise, same EOS ban). Other rows are unchanged.
        rows = (x0 == self.mask_id).nonzero().squeeze(1)
        if len(rows):
            sub = logits.index_select(0, rows)
            sub[:, self.mask_id] = NEG_INF
            banned = dict(ban_ids=[self.eos_id], ban_rows=ban_d[rows]) if ban_d is not None else {}
            x0b, confb = sample_candidates(sub, temp[rows], seed[rows], nonce[rows], pos_d[rows], **banned)
            x0 = x0.index_copy(0, rows, x0b)
            conf = conf.index_copy(0, rows, confb.to(conf.dtype))
        rnd = self.random_remask[slots][row_req]
        if bool(rnd.any()):
            u = rng.uniform(seed, nonce, pos_d, torch.full_like(pos_d, rng.REMASK_STREAM))
            conf = torch.where(rnd.to(dev), u.to(conf.dtype), conf)
        defer = self.defer_eos[slots][row_req]
        if bool(defer.any()) and self.stop_ids:
            stop = torch.isin(x0, self.stop_ids_d)
            conf = torch.where(defer.to(dev) & stop, torch.full_like(conf, DEFERRED), conf)
        conf = torch.where(cand, conf, torch.full_like(conf, NEG_INF))

        blen = self.block_len[slots]
        spb = self.steps_pb[slots]
        per = spb.clamp(min=1)
        k = torch.where(spb > 0, blen // per + (sib < blen % per).long(), torch.zeros_like(blen))
        chosen = transfer_mask(conf, cu_rows.to(dev), k.to(dev), self.threshold[slots].to(dev))
        self.tokens[canvas_idx[chosen]] = x0[chosen]

        # One device-to-host copy of what the events need.
        chosen_h, cand_h = chosen.cpu(), cand.cpu()
        x0_h, conf_h = x0.cpu(), conf.cpu()
        n_chosen = torch.zeros(b, dtype=torch.int64).index_add_(0, row_req, chosen_h.long())
        left = torch.zeros(b, dtype=torch.int64).index_add_(0, row_req, (cand_h & ~chosen_h).long())
        self.unmasked[slots] += n_chosen
        self.steps_done[slots] += 1
        block_done = left == 0
        # NFE as the reference counts it: its prefix-cache loop tests for a finished block after
        # each cached forward, so a block that the block-start forward completes costs it one
        # more forward that unmasks nothing. We skip that forward but count it, so NFE compares.
        phantom = (self.mode[slots] == MODE["prefix"]) & (sib == 0) & block_done
        self.nfe[slots] += 1 + phantom.long()
        self.block[slots] = blk + block_done.long()
        self.step_in_block[slots] = torch.where(block_done, torch.zeros_like(sib), sib + 1)
        finished = self.block[slots] >= self.n_blocks[slots]

        events = []
        rel = (position - self.prompt_len[slots][row_req]).tolist()
        sel = chosen_h.nonzero().squeeze(1).tolist()
        per_req: list[list[int]] = [[] for _ in range(b)]
        rr = row_req.tolist()
        for i in sel:
            per_req[rr[i]].append(i)
        x0_l, conf_l = x0_h.tolist(), conf_h.tolist()
        for j, req in enumerate(reqs):
            s = req.slot
            rows = per_req[j]
            ev = StepEvent(
                request_id=req.rid, step=int(self.steps_done[s]), block=int(blk[j]),
                positions=[rel[i] for i in rows], token_ids=[x0_l[i] for i in rows],
                confidences=[conf_l[i] for i in rows],
                masks_remaining=req.params.gen_length - int(self.unmasked[s]),
                nfe=int(self.nfe[s]), finished=bool(finished[j]))
            if ev.finished:
                ev.gen_ids = self.canvas(req.rid)
            events.append(ev)
        return events
