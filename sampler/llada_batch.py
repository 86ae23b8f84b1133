"""The LLaDA step for a batch of requests, each at its own point in its own schedule.

Per-request state lives on the device, one int64 and one float64 row per slot (fields named in
`sampler.step_state`), beside the token buffer that holds every canvas; `sampler.device_step` runs
the step from them with shapes fixed per bucket and no read back to the host. The host keeps only
what it needs to choose the next step's shapes: each request's static fields and the (block index,
step in block) it expects next. With the s/t schedule that expectation is exact; with threshold
decoding a block may finish earlier than the host knows, and the planned step then does nothing for
that request (see device_step). What the events need comes back in one copy to pinned memory, which
`step()` reads at once and `step_async()` reads after launching the next step, so the host prepares
step n+1 while the device runs step n. Each request owns a contiguous region of the token buffer and
of the per-layer key/value buffers: rows [off, off+L) hold its canvas (L = prompt + span + suffix),
and with classifier-free guidance rows [off+L, off+2L) hold the unconditional canvas's keys/values.

What a step runs for request r (bs/be: its current block's bounds):
  cache none                    queries [0, L)   keys [0, L)
  prefix / dual, block start    queries [0, L)   keys [0, L)  (fills the cache)
  prefix, later steps           queries [bs, L)  keys [0, L)  (prefix rows cached, the rest fresh)
  dual, later steps             queries [bs, be) keys [0, L)  (prefix and suffix rows cached)
Fresh keys/values are always written to the buffers first, so the three modes are one code path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from sampler import device_step as ds
from sampler import host_step as hs
from sampler.batch import Batch
from sampler.cuda_graphs import StepGraphs
from sampler.draft_gate import gate_for
from sampler.events import StepEvent
from sampler.params import ParamError, SamplingParams
from sampler.step_state import CACHE_MODE, INT, N_FLT, N_INT, ReadBack, RequestOut, pack_slot


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
    block_index: int = 0    # the (block index, step in block) the next planned step expects
    step_in_block: int = 0
    staging: object = None  # pinned source of the canvas copy, kept until the copy has run
    suffix_len: int = 0     # fixed context after the generated span (infilling)
    masks: int = 0          # masked positions of the span at the start
    grammar: object = None  # constrained requests: the GrammarState of the committed prefix
    frontier: int = 0       # constrained: the first uncommitted span position
    in_flight: bool = False  # constrained: a launched step not collected yet (plan after it only)
    pending: list = field(default_factory=list)  # constrained: (position, token) the host committed
                                                 # before any forward, reported with the next event
    depth: int = 0          # draft depth (exact parallel decoding; 0: off)
    guessed: int = 0        # draft rows the last step's drafting stage allows in the next step
    forwards: int = 0       # forwards this request took part in
    draft_rows: int = 0     # draft rows it was given in all

    @property
    def length(self) -> int:
        return self.prompt_len + self.params.gen_length + self.suffix_len

    @property
    def finished(self) -> bool:
        return self.block_index >= self.params.blocks

    @staticmethod
    def advance(block_index: int, step_in_block: int, done: bool) -> tuple[int, int]:
        """(block index, step in block) after a step there that finished the block or not."""
        return (block_index + 1, 0) if done else (block_index, step_in_block + 1)

    def predict_done(self, step_in_block: int) -> bool:
        """Whether a step at `step_in_block` is expected to finish the block: exact for the s/t
        schedule; threshold decoding is assumed to go on (a wrong guess costs one step that does
        nothing)."""
        if self.params.threshold is not None:
            return False
        return step_in_block + 1 >= self.params.steps_per_block


@dataclass
class _Launched:
    """A step on its way: who was in it, what each expected, and where its results will land."""

    rows: list            # (request, planned block index, planned step, predicted next, draft j) per request row
    row_start: list       # first logit row of each request row
    layout: ReadBack      # the sections of `results` (hs.UNPACKED: results are the sections)
    results: torch.Tensor  # the step's results on the host (pinned on CUDA; a host step's: its sections)
    done: object          # CUDA event recorded after the copy (None on the CPU)

    @property
    def nbytes(self) -> int:
        """Bytes of the step's results as the host holds them."""
        if isinstance(self.results, torch.Tensor):
            return self.results.numel() * self.results.element_size()
        return _nbytes(self.results)


def _nbytes(v) -> int:
    """Bytes of a host step's results: arrays as numpy holds them, nested dicts, tuples and lists of
    numbers (its `picked` entries) at 8 bytes a number."""
    if isinstance(v, dict):
        return sum(_nbytes(x) for x in v.values())
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], (list, tuple, dict, np.ndarray)):
        return sum(_nbytes(x) for x in v)
    return np.asarray(v).nbytes


class LLaDABatch(Batch):
    """Running LLaDA requests and their device state; `step()` advances all of them with one forward."""

    def __init__(self, model, special, capacity_tokens: int = 16384, max_requests: int = 64,
                 cuda_graphs: bool | None = None, pad_to_buckets: bool | None = None,
                 draft_depth: int = 0, draft_budget: int = 0, host_planned: bool | None = None,
                 adaptive_drafting: bool | None = None):
        # Exact parallel decoding: `draft_depth` is the depth of requests that leave theirs unset;
        # `draft_budget` rows of keys/values are lent to draft rows each step, and a step runs
        # draft rows only while its query tokens stay within that many (a full batch never drafts).
        # `adaptive_drafting` (None: on for a CPU): plan draft rows only while the measured steps
        # say they pay (sampler.draft_gate).
        if getattr(model, "tp", None) is not None:
            draft_budget = 0  # the drafting stage selects over the whole vocabulary: not under tensor parallelism
        super().__init__(model, special, capacity_tokens, max_requests, draft_rows=draft_budget)
        self.draft_depth = draft_depth
        self.draft_budget = draft_budget
        self.draft_rows_run = 0     # draft rows forwarded, in all
        self.steps_accepted = 0     # steps advanced beyond one per forward (accepted drafts), in all
        dev = self.device
        self.gate = gate_for(adaptive_drafting, dev, draft_budget)
        # Per-slot state on the device (sampler.step_state); the last slot is the dummy padding
        # rows point at: its region is the scratch row.
        self.dummy_slot = max_requests
        self.state = torch.zeros((max_requests + 1, N_INT), dtype=torch.int64, device=dev)
        self.state[self.dummy_slot, INT.offset] = capacity_tokens
        self.state[self.dummy_slot, INT.frontier] = -1  # never a constrained request
        self.fstate = torch.zeros((max_requests + 1, N_FLT), dtype=torch.float64, device=dev)
        self.pinned = dev.type == "cuda"
        # Padded bucket shapes let CUDA graphs be reused; on the CPU they would only cost.
        self.pad_to_buckets = dev.type == "cuda" if pad_to_buckets is None else pad_to_buckets
        # Off CUDA, steps at exact shapes without drafting run `host_step` (the same step with its
        # bookkeeping on the host: a fraction of the device step's small operations).
        self.host_planned = (dev.type != "cuda" and not self.pad_to_buckets) if host_planned is None \
            else host_planned
        self._layouts: dict = {}  # host_step's layouts, reused by the steps that repeat them
        self._pending: _Launched | None = None
        self._ready: list[StepEvent] = []  # events of requests finished without a forward
        self.grammar_mask = None  # bool [slots + 1, V]: each constrained slot's allowed tokens
        self.grammar_seconds = 0.0  # host time reading constrained requests' steps (grammar checks,
                                    # forced tokens, the next mask)
        self.grammar_reads = 0      # constrained request-steps read
        self.grammar_admit_seconds = 0.0  # host time starting matchers at admission (first mask)
        if dev.type == "cuda" and (cuda_graphs is None or cuda_graphs):
            self.graphs = StepGraphs(self._device_step, self.dummy_slot, dev)

    # ---------------------------------------------------------------- admission
    @staticmethod
    def rows_needed(prompt_len: int, params: SamplingParams) -> int:
        """Canvas rows a request holds: prompt (and suffix) + gen_length, twice with CFG."""
        n = prompt_len + params.gen_length
        return 2 * n if params.cfg_scale > 0 else n

    def _params(self, params: SamplingParams, suffix_ids, span_ids) -> SamplingParams:
        if params.constraint is not None and (suffix_ids or span_ids is not None):
            raise ParamError(getattr(params.constraint, "field", "constraint"),
                             "structured output cannot be combined with infilling (suffix or gaps)")
        if params.constraint is not None and getattr(self.model, "tp", None) is not None:
            raise ParamError(getattr(params.constraint, "field", "constraint"),
                             "structured output is not available with --tensor-parallel-size > 1 yet "
                             "(the grammar's host state is not shared with the other ranks)")
        return params

    def _start(self, rid, slot, off, rows, prompt_ids, span, suffix_ids, params, masks) -> _Request:
        p = len(prompt_ids)
        req = _Request(rid, slot, off, rows, params, p, CACHE_MODE[params.cache], canvas=list(span),
                       suffix_len=len(suffix_ids), masks=masks)
        depth = self.draft_depth if params.draft_depth is None else params.draft_depth
        # A constrained request commits on the host (the frontier rule) and never drafts; the ids
        # do not depend on the depth, so leaving it at 0 changes forwards only.
        req.depth = depth if self.draft_budget > 0 and params.constraint is None else 0
        ints, floats = pack_slot(params, off, p, req.length, req.depth)
        # One staged copy each for the canvas and the state rows, queued behind any step in flight.
        canvas = torch.tensor(prompt_ids + span + suffix_ids, dtype=torch.int64)
        srow = torch.tensor(ints, dtype=torch.int64)
        frow = torch.tensor(floats, dtype=torch.float64)
        if self.pinned:
            canvas, srow, frow = canvas.pin_memory(), srow.pin_memory(), frow.pin_memory()
        req.staging = (canvas, srow, frow)
        nb = self.pinned
        self.tokens[off:off + req.length].copy_(canvas, non_blocking=nb)
        self.state[slot].copy_(srow, non_blocking=nb)
        self.fstate[slot].copy_(frow, non_blocking=nb)
        if params.constraint is not None:
            if self.grammar_mask is None:  # the dummy slot's row allows everything
                self.grammar_mask = torch.ones((self.max_requests + 1, self.config.embedding_size),
                                               dtype=torch.bool, device=self.device)
            t0 = time.perf_counter()
            req.grammar = params.constraint.start()
            committed = self._settle(req, [], stepped=False)
            self.grammar_admit_seconds += time.perf_counter() - t0
            req.pending = list(zip(range(len(committed)), committed))
            if req.finished:
                self._ready.append(self._host_event(req))
        return req

    def canvas(self, rid) -> list[int]:
        return list(self.requests[rid].canvas)

    # ---------------------------------------------------------------- planning
    def _plan(self):
        """(request rows, bucket) for the next step from the host's expectations. Each request
        gets its committed row, then draft rows 1..j (as many as its last drafting stage guessed),
        given level by level (every request's first draft before any second) while the step's
        query tokens stay within the draft budget and the draft pool has room. While the draft
        gate says no, no draft rows and no drafting stage."""
        reqs, tokens, logit_rows, max_q, cfg, filters, logprobs = [], 0, 0, 0, False, False, False
        depth, constrained = 0, False
        for req in self.requests.values():
            if req.finished or req.in_flight:
                continue
            lo, hi = ds.query_range(req.mode, req.prompt_len, req.length, req.params.block,
                                    req.block_index, req.step_in_block)
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
            constrained |= req.grammar is not None
            depth = max(depth, req.depth)
            reqs.append(req)
        if not reqs:
            return [], None
        drafts = {id(r): [] for r in reqs}  # per request: pool offsets of its draft rows
        pool_used, copy_rows = 0, 0
        if self.gate is not None and not self.gate.drafting:
            depth = 0
        for level in range(1, (max((r.guessed for r in reqs), default=0) if depth else 0) + 1):
            for req in reqs:
                if req.guessed < level or len(drafts[id(req)]) != level - 1:
                    continue
                lo, hi = ds.query_range(req.mode, req.prompt_len, req.length, req.params.block,
                                        req.block_index, req.step_in_block + level)
                n = hi - lo + (req.length if req.params.cfg_scale > 0 else 0)
                region = req.rows
                if tokens + n > self.draft_budget or pool_used + region > self.draft_budget:
                    continue
                drafts[id(req)].append(self.store.draft_base + pool_used)
                pool_used += region
                tokens += n
                logit_rows += req.params.block
                if req.mode != CACHE_MODE["none"]:
                    copy_rows += req.length
        rows = [(req, j, off) for req in reqs for j, off in enumerate([None] + drafts[id(req)])]
        return rows, ds.Bucket.fit(len(rows), tokens, logit_rows, max_q, cfg, self.pad_to_buckets,
                                   filters, logprobs, constrained, depth if self.store.guess is not None else 0,
                                   copy_rows)

    def planned_query_tokens(self) -> int:
        total = 0
        for req in self.requests.values():
            if req.finished:
                continue
            lo, hi = ds.query_range(req.mode, req.prompt_len, req.length, req.params.block,
                                    req.block_index, req.step_in_block)
            total += (hi - lo) + (req.length if req.params.cfg_scale > 0 else 0)
        return total

    def _run_step(self, plan_rows: list, bucket) -> tuple[torch.Tensor, bool]:
        """Run one planned step: (its read-back buffer, whether that buffer is on the host and
        the step's own)."""
        if self.host_planned and self.graphs is None and hs.usable(bucket, self.model):
            return hs.host_step(self.model, self.kv, self.tokens, self.state, self.fstate, plan_rows,
                                bucket, self.mask_id, self.eos_id, self.stop_ids_d, self.capacity,
                                self._layouts), True
        plan = ds.plan_of(plan_rows, bucket.requests + 1, self.dummy_slot)
        if self.pinned:
            plan = plan.pin_memory()
        plan_d = plan.to(self.device, non_blocking=self.pinned)
        if self.graphs is not None:
            return self.graphs.run(bucket, plan_d), False
        return self._device_step(plan_d, bucket), False

    def _device_step(self, plan, bucket):
        return ds.device_step(self.model, self.kv, self.tokens, self.state, self.fstate, plan, bucket,
                              self.mask_id, self.eos_id, self.stop_ids_d, self.capacity,
                              grammar_mask=self.grammar_mask if bucket.constrained else None,
                              guess=self.store.guess)

    @property
    def drafting(self) -> bool:
        """Whether some running request drafts (its steps then run one at a time: the next plan
        needs to know how far the last forward advanced)."""
        return any(r.depth > 0 and not r.finished for r in self.requests.values())

    # ---------------------------------------------------------------- the step
    def launch(self) -> _Launched | None:
        """Queue one step for every running request; returns where its results will land."""
        if torch.is_grad_enabled():  # a caller's inference or no-grad mode is kept as it is
            with torch.no_grad():
                return self._launch()
        return self._launch()

    def _launch(self) -> _Launched | None:
        t0 = time.perf_counter()
        rows_, bucket = self._plan()
        if bucket is None:
            return None
        plan_rows, rows, row_start, r0, base = [], [], [], 0, 0
        for j, (req, d, kv_off) in enumerate(rows_):
            here = (req.block_index, req.step_in_block)
            if d == 0:
                base = j
            plan_rows.append([req.slot, here[0], here[1] + d, d, -1 if kv_off is None else kv_off, base])
            if req.grammar is not None:  # the host commits for it when the step is read (never drafts)
                req.in_flight = True
                rows.append((req, here[0], here[1], here, 0))
                row_start.append(r0)
                r0 += req.params.block
                continue
            nxt = req.advance(*here, req.predict_done(here[1]))
            rows.append((req, here[0], here[1] + d, nxt, d))
            row_start.append(r0)
            r0 += req.params.block
        for req, _, _, nxt, d in rows:
            if d == 0:
                req.block_index, req.step_in_block = nxt
            else:
                self.draft_rows_run += 1
                req.draft_rows += 1
        out, own = self._run_step(plan_rows, bucket)
        self.forwards += 1
        done = None
        if self.pinned:  # one copy of the step's results into pinned memory, read after the event
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host = out if own else out.clone()
        self.host_seconds += time.perf_counter() - t0
        return _Launched(rows, row_start, hs.UNPACKED if own else ReadBack.of(bucket), host, done)

    def collect(self, launched: _Launched | None) -> list[StepEvent]:
        """Wait for a launched step's results and turn them into events (requests removed since
        the launch are skipped; a request whose planned step did nothing gets no event)."""
        ready, self._ready = self._ready, []
        if launched is None:
            return ready
        if launched.done is not None:
            launched.done.synchronize()
        t0 = time.perf_counter()
        out = launched.layout.unpack(launched.results)
        events = ready
        rows = launched.rows
        for j, (req, block_index, step_in_block, predicted, d) in enumerate(rows):
            if d != 0:
                continue
            rq = out["requests"][j]
            rq = rq if type(rq) is RequestOut else RequestOut(*(int(v) for v in rq))
            if req.grammar is not None:
                req.in_flight = False
            if not rq.active or self.requests.get(req.rid) is not req:
                continue
            if req.grammar is not None:
                events.append(self._constrained_event(req, block_index, rq, out, launched.row_start[j]))
                continue
            # the rows of its accepted chain: the committed state's step, then each accepted draft's
            chain = [j]
            while (chain[-1] + 1 < len(rows) and rows[chain[-1] + 1][4] == len(chain)
                   and out["requests"][chain[-1] + 1][6]):
                chain.append(chain[-1] + 1)
            adv = len(chain)
            req.forwards += 1
            self.steps_accepted += adv - 1
            req.guessed = rq.guessed
            actual = (block_index + 1, 0) if rq.block_done else (block_index, step_in_block + adv)
            if actual != predicted:  # a threshold block finished early, or drafts were accepted
                req.block_index, req.step_in_block = actual
            counts = [int(out["rows"][launched.row_start[k]:launched.row_start[k] + req.params.block, 0].sum())
                      for k in chain] if adv > 1 else None  # a host step never drafts: no `rows`
            drafted = sum(1 for k in range(j + 1, len(rows)) if rows[k][0] is req)
            for n, k in enumerate(chain):
                later = adv - 1 - n
                step_rq = rq if adv == 1 else rq._replace(
                    steps_done=rq.steps_done - later, nfe=rq.nfe - later,
                    unmasked=rq.unmasked - sum(counts[n + 1:]), finished=rq.finished if later == 0 else 0,
                    block_done=rq.block_done if later == 0 else 0)
                ev = self._event(req, block_index, step_rq, out, launched.row_start[k])
                ev.forwards, ev.forward_steps, ev.draft_rows = req.forwards, adv, drafted
                events.append(ev)
        self.host_seconds += time.perf_counter() - t0
        return events

    def _event(self, req: _Request, block_index: int, rq: RequestOut, out: dict, r0: int) -> StepEvent:
        if "picked" in out:  # a host step's: the committed entries, already as lists
            lp_rows, positions, token_ids, confidences = out["picked"][r0]
        else:
            seg = out["rows"][r0:r0 + req.params.block]
            picked = seg[:, 0].nonzero()[0]
            positions, token_ids = seg[picked, 2].tolist(), seg[picked, 1].tolist()
            lp_rows = r0 + picked
            confidences = out["conf"][lp_rows].tolist()
        canvas = req.canvas
        for p, t in zip(positions, token_ids):
            canvas[p] = t
        ev = StepEvent(
            request_id=req.rid, step=rq.steps_done, block=block_index, positions=positions,
            token_ids=token_ids, confidences=confidences,
            masks_remaining=req.masks - rq.unmasked, nfe=rq.nfe, finished=bool(rq.finished))
        if "top_ids" in out and req.params.logprobs is not None:
            n = req.params.logprobs
            ev.logprobs = out["token_logprob"][lp_rows].tolist()
            ev.top_logprobs = [[(t, v) for t, v in zip(ids[:n].tolist(), vals[:n].tolist())
                                if v != float("-inf")]
                               for ids, vals in zip(out["top_ids"][lp_rows], out["top_logprobs"][lp_rows])]
        if ev.finished:
            req.block_index, req.step_in_block = req.params.blocks, 0
            ev.gen_ids = list(canvas)
        return ev

    def step(self) -> list[StepEvent]:
        if self._pending is not None:  # results of an asynchronous step still to read
            events = self.collect(self._pending)
            self._pending = None
            return events
        gate = self.gate if self.drafting else None
        if gate is None:
            return self.collect(self.launch())
        ready, t0 = len(self._ready), gate.clock()  # a drafting batch steps synchronously: timed here
        launched = self.launch()
        events = self.collect(launched)
        if launched is not None:  # an event per sampler step advanced
            gate.record(gate.clock() - t0, len(events) - ready)
        return events

    def step_async(self) -> list[StepEvent]:
        """Launch the next step, then return the events of the one launched before it: the host
        reads step n's results while the device runs step n+1 (an empty list the first time).
        While a request drafts, steps run one at a time (the next plan depends on how many steps
        the last forward advanced)."""
        if self.drafting:
            return self.step()
        launched = self.launch()
        previous, self._pending = self._pending, launched
        return self.collect(previous)

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def discard(self) -> None:
        if self._pending is not None:
            for req, *_ in self._pending.rows:
                req.in_flight = False
        self._pending = None

    # ---------------------------------------------------------------- constrained requests
    # The frontier rule (docs/ARCHITECTURE.md, "Structured output"): the span is committed left to
    # right. The device draws the frontier row from logits masked by the grammar (`grammar_mask`)
    # and commits nothing for the request; here the host commits the frontier's token, then the
    # following rows' candidates of the same forward while the grammar accepts each one and the
    # model is confident (threshold decoding: confidence >= threshold; the s/t schedule: up to
    # ceil(block / steps per block) per forward), then the tokens the grammar forces, without a
    # forward. A stop token (allowed only where the grammar accepts) ends the answer: the rest of
    # the span is EOS.
    def _spec_limit(self, params: SamplingParams) -> int:
        if params.filtered:  # filters are decided on the masked row: only the frontier is exact
            return 1
        if params.threshold is not None:
            return params.gen_length
        return -(-params.block // params.steps_per_block)

    def _constrained_event(self, req: _Request, block_index: int, rq: RequestOut, out: dict,
                           r0: int) -> StepEvent:
        p, g = req.params, req.grammar
        seg = out["rows"][r0:r0 + p.block]
        conf = out["conf"][r0:r0 + p.block]
        first = req.frontier - block_index * p.block
        taken, confs = [], []
        t0 = time.perf_counter()
        _, free = g.closing(g.room(p.gen_length, req.frontier))  # past it, one token a forward (closing rule)
        for r in range(first, p.block):
            tok, c = int(seg[r, 1]), float(conf[r])
            if r > first:
                if len(taken) >= min(self._spec_limit(p), free) or taken[-1] in self.stop_ids:
                    break
                if p.threshold is not None and c < p.threshold:
                    break
                if not g.accepts(tok):
                    break
            g.commit(tok)  # the frontier's draw was masked: the grammar accepts it
            taken.append(tok)
            confs.append(c)
        start = req.frontier
        committed = self._settle(req, taken, stepped=True)
        confs += [1.0] * (len(committed) - len(confs))  # forced tokens and the EOS tail
        self.grammar_seconds += time.perf_counter() - t0
        self.grammar_reads += 1
        pend = req.pending
        req.pending = []
        positions = [q for q, _ in pend] + list(range(start, start + len(committed)))
        ev = StepEvent(
            request_id=req.rid, step=rq.steps_done, block=block_index, positions=positions,
            token_ids=[t for _, t in pend] + committed, confidences=[1.0] * len(pend) + confs,
            masks_remaining=req.masks - req.frontier, nfe=rq.nfe, finished=req.finished)
        if ev.finished:
            ev.gen_ids = list(req.canvas)
        return ev

    def _host_event(self, req: _Request) -> StepEvent:
        """The event of a request the host finished without a forward (the grammar forced it all)."""
        pend, req.pending = req.pending, []
        ev = StepEvent(request_id=req.rid, step=0, block=0, positions=[q for q, _ in pend],
                       token_ids=[t for _, t in pend], confidences=[1.0] * len(pend),
                       masks_remaining=req.masks - req.frontier, nfe=0, finished=True,
                       gen_ids=list(req.canvas))
        return ev

    def _settle(self, req: _Request, taken: list[int], stepped: bool) -> list[int]:
        """Commit `taken` (already consumed by the grammar) at the frontier, then what the grammar
        forces, then the EOS tail if the answer ended; write it all to the device with the state
        and the next frontier's mask (`stepped`: after a step in the request's current block).
        Returns every token committed, in order."""
        p, g = req.params, req.grammar
        out = list(taken)
        room = p.gen_length - req.frontier
        ended = bool(out) and out[-1] in self.stop_ids
        while not ended and len(out) < room:
            if g.stopped:  # only a stop token may follow: the answer ends here
                out.append(self.eos_id)
                ended = True
                break
            forced = g.forced()
            if not forced:
                break
            for tok in forced[:room - len(out)]:
                g.commit(tok)
                out.append(tok)
        out = out[:room]
        if ended:
            out += [self.eos_id] * (room - len(out))
        start, req.frontier = req.frontier, req.frontier + len(out)
        req.canvas[start:req.frontier] = out
        done = req.frontier >= p.gen_length
        if done:
            req.block_index, req.step_in_block = p.blocks, 0
        else:
            block = req.frontier // p.block
            if block != req.block_index:  # a new block: its first step is a block start
                req.block_index, req.step_in_block = block, 0
            elif stepped:
                req.step_in_block += 1
        # One write each: the committed tokens, the state fields the host owns, the next mask.
        if out:
            at = req.offset + req.prompt_len + start
            self.tokens[at:at + len(out)].copy_(torch.tensor(out, dtype=torch.int64))
        cols = [INT.block_index, INT.step_in_block, INT.unmasked, INT.frontier]
        vals = torch.tensor([req.block_index, req.step_in_block, req.frontier,
                             -1 if done else req.frontier], dtype=torch.int64)
        self.state[req.slot, cols] = vals.to(self.device)
        if not done:
            allowed = g.allowed()
            close, _ = g.closing(g.room(p.gen_length, req.frontier))
            if close is not None:  # the closing rule: the next token is the completion's
                allowed = np.zeros_like(allowed)
                allowed[close] = True
            self.grammar_mask[req.slot].copy_(torch.from_numpy(allowed))
        return out

    def hot_buckets(self, block_length: int = 32) -> list:
        """Buckets of the steady state worth capturing at start: 1, 2, 4, ... requests each in a
        dual-cache block step of `block_length` queries (the most common cached step)."""
        out, n = [], 1
        while n <= self.max_requests:
            if n * block_length <= self.capacity:
                out.append(ds.Bucket.fit(n, n * block_length, n * block_length, block_length, False))
            n *= 2
        return out
