"""One denoising step for a whole batch of requests, each at its own point in its own schedule.

Per-request state lives on the device, in one int64 and one float64 tensor indexed by slot, beside
a token buffer that holds every canvas; `sampler.device_step` runs the step from them with shapes
fixed per bucket and no read back to the host. The host keeps only what it needs to choose the
next step's shapes: each request's static fields and the (block, step in block) it expects next.
With the s/t schedule that expectation is exact; with threshold decoding a block may finish
earlier than the host knows, and the planned step then does nothing for that request (see
device_step). What the events need comes back in one copy to pinned memory, which `step()` reads
at once and `step_async()` reads after launching the next step, so the host prepares step n+1
while the device runs step n. Each request owns a contiguous region of the token buffer and of the per-layer key/value buffers:
rows [off, off+L) hold its canvas (L = prompt + gen), and with classifier-free guidance rows
[off+L, off+2L) hold the unconditional canvas's keys/values.

What a step runs for request r (bs/be: its current block's bounds):
  cache none                    queries [0, L)   keys [0, L)
  prefix / dual, block start    queries [0, L)   keys [0, L)  (fills the cache)
  prefix, later steps           queries [bs, L)  keys [0, L)  (prefix rows cached, the rest fresh)
  dual, later steps             queries [bs, be) keys [0, L)  (prefix and suffix rows cached)
Fresh keys/values are always written to the buffers first, so the three modes are one code path.
Selection (candidate tokens, confidences, the top-k / threshold transfer) is one batched call.
Row `capacity` of the token and key/value buffers is scratch for padded rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from sampler import device_step as ds
from sampler.block_diffusion import BlockState, block_step, canvas_length
from sampler.params import ParamError, SamplingParams
from weights.layers import KVBuffers

MODE = {"none": ds.MODE_NONE, "prefix": ds.MODE_PREFIX, "dual": ds.MODE_DUAL}


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
    # Requests with params.logprobs set: per position unmasked this step, its log-probability in
    # this step and the params.logprobs most likely [(token, log-probability)] (None otherwise).
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class _Request:
    rid: object
    slot: int
    offset: int
    rows: int
    params: SamplingParams
    prompt_len: int
    mode: int
    canvas: list = field(default_factory=list)  # the generated span as the host has seen it
    block: int = 0       # the (block, step in block) the next planned step expects
    sib: int = 0
    unmasked: int = 0
    staging: object = None  # pinned source of the canvas copy, kept until the copy has run
    blocks: BlockState | None = None  # block-diffusion requests only
    suffix_len: int = 0  # fixed context after the generated span (infilling)
    masks: int = 0       # masked positions of the span at the start

    @property
    def length(self) -> int:
        return self.prompt_len + self.params.gen_length + self.suffix_len

    @property
    def finished(self) -> bool:
        return self.block >= self.params.blocks

    def advance(self, block: int, sib: int, done: bool) -> tuple[int, int]:
        """(block, step in block) after a step at (block, sib) that finished the block or not."""
        return (block + 1, 0) if done else (block, sib + 1)

    def predict_done(self, sib: int) -> bool:
        """Whether a step at `sib` is expected to finish the block: exact for the s/t schedule;
        threshold decoding is assumed to go on (a wrong guess costs one step that does nothing)."""
        if self.params.threshold is not None:
            return False
        return sib + 1 >= self.params.steps_per_block


@dataclass
class _Launched:
    """A step on its way: who was in it, what each expected, and where its results will land."""

    rows: list            # (request, planned block, planned sib, predicted next) per request row
    row_start: list       # first logit row of each request row
    n_rows: int           # logit rows of the bucket
    results: torch.Tensor  # the step's results on the host (pinned on CUDA), see device_step
    done: object          # CUDA event recorded after the copy (None on the CPU)
    logprobs: bool = False  # the results carry log-probabilities (see device_step.unpack_outputs)


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

    def __init__(self, model, special, capacity_tokens: int = 16384, max_requests: int = 64,
                 cuda_graphs: bool | None = None, pad_to_buckets: bool | None = None):
        self.model = model
        self.config = model.config
        self.mask_id = special.mask
        self.stop_ids = list(special.stop)
        self.eos_id = special.eos
        self.device = model.device
        dev = self.device
        self.stop_ids_d = torch.tensor(self.stop_ids, dtype=torch.int64, device=dev)
        self.capacity = capacity_tokens
        self.max_requests = max_requests
        # One more row than the canvases use: the scratch row padded rows read and write.
        self.kv = KVBuffers(self.config, capacity_tokens + 1, dev, model.dtype)
        self.tokens = torch.full((capacity_tokens + 1,), self.mask_id, dtype=torch.int64, device=dev)
        self.regions = RegionAllocator(capacity_tokens)
        self.requests: dict[object, _Request] = {}
        self.free_slots = list(range(max_requests - 1, -1, -1))
        # Per-slot state on the device (columns in sampler.device_step); the last slot is the dummy.
        self.dummy_slot = max_requests
        self.state = torch.zeros((max_requests + 1, ds.N_INT), dtype=torch.int64, device=dev)
        self.state[self.dummy_slot, ds.OFF] = capacity_tokens
        self.fstate = torch.zeros((max_requests + 1, ds.N_FLT), dtype=torch.float64, device=dev)
        self.pinned = dev.type == "cuda"
        # Padded bucket shapes let CUDA graphs be reused; on the CPU they would only cost.
        self.pad_to_buckets = dev.type == "cuda" if pad_to_buckets is None else pad_to_buckets
        self.forwards = 0  # model forwards run by this batch (one per step)
        self.host_seconds = 0.0  # host time in launch/collect, waiting for the device excluded
        self._pending: _Launched | None = None
        # Block diffusion (LLaDA2.x checkpoints) runs its own host-planned step (block_diffusion.py),
        # with each request's state in its BlockState.
        self.block_diffusion = bool(getattr(self.config, "block_diffusion", False))
        self.graphs = None
        if dev.type == "cuda" and (cuda_graphs is None or cuda_graphs) and not self.block_diffusion:
            from sampler.cuda_graphs import StepGraphs
            self.graphs = StepGraphs(self._device_step, self.dummy_slot, dev)

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

    def add(self, rid, prompt_ids, params: SamplingParams, suffix_ids=(), span_ids=None) -> None:
        """Admit a request: canvas prompt ++ span ++ suffix, the span `gen_length` masks or
        `span_ids` (infilling: mask ids at the positions to fill, fixed tokens elsewhere)."""
        prompt_ids, suffix_ids = list(prompt_ids), list(suffix_ids)
        span = [self.mask_id] * params.gen_length if span_ids is None else list(span_ids)
        if self.block_diffusion:
            if suffix_ids or span_ids is not None:
                raise ParamError("suffix", "infilling is not available for block-diffusion (LLaDA2.x) "
                                 "checkpoints yet")
            params = params.for_block_diffusion()
        context = len(prompt_ids) + len(suffix_ids)
        params.validate(context, self.config.max_sequence_length, self.block_diffusion)
        if len(span) != params.gen_length:
            raise ParamError("prompt", f"the infill span has {len(span)} positions, gen_length is "
                             f"{params.gen_length}")
        vocab = self.config.embedding_size
        for what, ids in (("prompt", prompt_ids), ("suffix", suffix_ids), ("prompt", span)):
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ParamError(what, f"token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        masks = span.count(self.mask_id)
        if masks == 0:
            raise ParamError("prompt", "the span has no masked position to fill")
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already running")
        rows = self.rows_needed(context, params, self.block_diffusion)
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
            return self._add_block_diffusion(rid, slot, off, rows, prompt_ids, params)
        req = _Request(rid, slot, off, rows, params, p, MODE[params.cache], canvas=list(span),
                       suffix_len=len(suffix_ids), masks=masks)
        row = [0] * ds.N_INT
        row[ds.OFF], row[ds.PLEN], row[ds.LEN], row[ds.GEN] = off, p, req.length, g
        row[ds.BLEN], row[ds.NBLK] = params.block, params.blocks
        row[ds.SPB] = 0 if params.threshold is not None else params.steps_per_block
        row[ds.MODE] = req.mode
        row[ds.SEED] = params.seed if params.seed is not None else 0
        row[ds.CFG] = int(params.cfg_scale > 0)
        row[ds.RND] = int(params.remasking == "random")
        row[ds.BAN], row[ds.DEFER] = int(bool(params.ban_eos)), int(bool(params.defer_eos))
        row[ds.TOPK] = params.top_k
        row[ds.NLP] = -1 if params.logprobs is None else params.logprobs
        frow = [0.0] * ds.N_FLT
        frow[ds.TOPP], frow[ds.MINP] = float(params.top_p), float(params.min_p)
        frow[ds.TEMP] = float(params.temperature)
        frow[ds.THR] = float(params.threshold) if params.threshold is not None else 0.0
        frow[ds.CFGS] = float(params.cfg_scale)
        # One staged copy each for the canvas and the state rows, queued behind any step in flight.
        canvas = torch.tensor(prompt_ids + span + suffix_ids, dtype=torch.int64)
        srow = torch.tensor(row, dtype=torch.int64)
        frow_t = torch.tensor(frow, dtype=torch.float64)
        if self.pinned:
            canvas, srow, frow_t = canvas.pin_memory(), srow.pin_memory(), frow_t.pin_memory()
        req.staging = (canvas, srow, frow_t)
        nb = self.pinned
        self.tokens[off:off + req.length].copy_(canvas, non_blocking=nb)
        self.state[slot].copy_(srow, non_blocking=nb)
        self.fstate[slot].copy_(frow_t, non_blocking=nb)
        self.requests[rid] = req

    def _add_block_diffusion(self, rid, slot, off, rows, prompt_ids, params) -> None:
        p = len(prompt_ids)
        canvas = torch.tensor(prompt_ids + [self.mask_id] * (rows - p), dtype=torch.int64)
        self.tokens[off:off + rows] = canvas.to(self.device)  # the canvas runs to its last block's end
        req = _Request(rid, slot, off, rows, params, p, ds.MODE_NONE)
        req.blocks = BlockState.start(p, params)
        self.requests[rid] = req

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
        """The request's generated span as the host has seen it (mask ids where still masked)."""
        req = self.requests[rid]
        if req.blocks is not None:  # block diffusion edits tokens: read the device's canvas
            lo = req.offset + req.prompt_len
            return self.tokens[lo:lo + req.params.gen_length].tolist()
        return list(req.canvas)

    # ---------------------------------------------------------------- planning
    def _plan(self):
        """(request rows, bucket, plan rows) for the next step from the host's expectations."""
        rows, tokens, logit_rows, max_q, cfg, filters, logprobs = [], 0, 0, 0, False, False, False
        for req in self.requests.values():
            if req.finished:
                continue
            lo, hi = ds.query_range(req.mode, req.prompt_len, req.length, req.params.block,
                                    req.block, req.sib)
            n = hi - lo
            tokens += n
            max_q = max(max_q, n)
            if req.params.cfg_scale > 0:
                cfg = True
                tokens += req.length
                max_q = max(max_q, req.length)
            logit_rows += req.params.block
            filters |= req.params.filtered
            logprobs |= req.params.logprobs is not None
            rows.append(req)
        if not rows:
            return [], None
        return rows, ds.Bucket.fit(len(rows), tokens, logit_rows, max_q, cfg, self.pad_to_buckets,
                                   filters, logprobs)

    def planned_query_tokens(self) -> int:
        """Query tokens the next step's forward processes, padding excluded (benchmarks)."""
        total = 0
        for req in self.requests.values():
            if req.blocks is not None:  # the blocks to commit and the current one
                st = req.blocks
                total += st.block_length * (st.block - st.ready + 1)
                continue
            if req.finished:
                continue
            lo, hi = ds.query_range(req.mode, req.prompt_len, req.length, req.params.block,
                                    req.block, req.sib)
            total += (hi - lo) + (req.length if req.params.cfg_scale > 0 else 0)
        return total

    def _device_step(self, plan, bucket):
        return ds.device_step(self.model, self.kv, self.tokens, self.state, self.fstate, plan, bucket,
                              self.mask_id, self.eos_id, self.stop_ids_d, self.capacity)

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def launch(self) -> _Launched | None:
        """Queue one step for every running request; returns where its results will land."""
        t0 = time.perf_counter()
        reqs, bucket = self._plan()
        if bucket is None:
            return None
        b1 = bucket.requests + 1
        plan = torch.empty((b1, 3), dtype=torch.int64, pin_memory=self.pinned)
        plan[:, 0] = self.dummy_slot
        plan[:, 1] = -1
        plan[:, 2] = 0
        rows, row_start, r0 = [], [], 0
        for j, req in enumerate(reqs):
            plan[j, 0], plan[j, 1], plan[j, 2] = req.slot, req.block, req.sib
            nxt = req.advance(req.block, req.sib, req.predict_done(req.sib))
            rows.append((req, req.block, req.sib, nxt))
            row_start.append(r0)
            r0 += req.params.block
            req.block, req.sib = nxt
        plan_d = plan.to(self.device, non_blocking=self.pinned)
        if self.graphs is not None:
            out = self.graphs.run(bucket, plan_d)
        else:
            out = self._device_step(plan_d, bucket)
        self.forwards += 1
        done = None
        if self.pinned:  # one copy of the step's results into pinned memory, read after the event
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host = out.clone()
        self.host_seconds += time.perf_counter() - t0
        return _Launched(rows, row_start, bucket.rows, host, done, bucket.logprobs)

    def collect(self, launched: _Launched | None) -> list[StepEvent]:
        """Wait for a launched step's results and turn them into events (requests removed since
        the launch are skipped; a request whose planned step did nothing gets no event)."""
        if launched is None:
            return []
        if launched.done is not None:
            launched.done.synchronize()
        t0 = time.perf_counter()
        ints, conf, rq, lp = ds.unpack_outputs(launched.results, launched.n_rows, launched.logprobs)
        events = []
        for j, (req, block, sib, predicted) in enumerate(launched.rows):
            active, steps_done, nfe, unmasked, block_done, finished = (int(v) for v in rq[j])
            if not active or self.requests.get(req.rid) is not req:
                continue
            actual = req.advance(block, sib, bool(block_done))
            if actual != predicted:  # a threshold block finished early: plan from the truth
                req.block, req.sib = actual
            r0 = launched.row_start[j]
            seg = ints[r0:r0 + req.params.block]
            picked = seg[:, 0].nonzero()[0]
            positions = seg[picked, 2].tolist()
            token_ids = seg[picked, 1].tolist()
            for p, t in zip(positions, token_ids):
                req.canvas[p] = t
            req.unmasked = unmasked
            ev = StepEvent(
                request_id=req.rid, step=steps_done, block=block, positions=positions,
                token_ids=token_ids, confidences=conf[r0 + picked].tolist(),
                masks_remaining=req.masks - unmasked, nfe=nfe, finished=bool(finished))
            if lp is not None and req.params.logprobs is not None:
                rows_ = r0 + picked
                n = req.params.logprobs
                ev.logprobs = lp[0][rows_].tolist()
                ev.top_logprobs = [[(t, v) for t, v in zip(ids[:n].tolist(), vals[:n].tolist())
                                    if v != float("-inf")]
                                   for ids, vals in zip(lp[1][rows_], lp[2][rows_])]
            if ev.finished:
                req.block, req.sib = req.params.blocks, 0
                ev.gen_ids = list(req.canvas)
            events.append(ev)
        self.host_seconds += time.perf_counter() - t0
        return events

    def step(self) -> list[StepEvent]:
        """One step for every running request, its events read at once."""
        if self.block_diffusion:
            return block_step(self, list(self.requests.values())) if self.requests else []
        if self._pending is not None:  # results of an asynchronous step still to read
            events = self.collect(self._pending)
            self._pending = None
            return events
        return self.collect(self.launch())

    def step_async(self) -> list[StepEvent]:
        """Launch the next step, then return the events of the one launched before it: the host
        reads step n's results while the device runs step n+1 (an empty list the first time).
        Block diffusion steps synchronously (its next step depends on this one's edits)."""
        if self.block_diffusion:
            return self.step()
        launched = self.launch()
        previous, self._pending = self._pending, launched
        return self.collect(previous)

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def discard_pending(self) -> None:
        """Forget a launched step's results (after a failed step, whose requests are failed)."""
        self._pending = None

    def hot_buckets(self, block_length: int = 32) -> list:
        """Buckets of the steady state worth capturing at start: 1, 2, 4, ... requests each in a
        dual-cache block step of `block_length` queries (the most common cached step)."""
        out, n = [], 1
        while n <= self.max_requests:
            if n * block_length <= self.capacity:
                out.append(ds.Bucket.fit(n, n * block_length, n * block_length, block_length, False))
            n *= 2
        return out
