"""The batch interface every decoding strategy implements, and what they share of admission.

A batch holds the running requests of one model and advances all of them one step per call, with
one forward. `sampler.strategies.make_batch` picks the strategy from the model's config: the LLaDA
step (`sampler.llada_batch.LLaDABatch`) or block diffusion for LLaDA2.x
(`sampler.block_diffusion.BlockDiffusionBatch`). The engine, `generate` and the benchmarks use only
this interface:

    rows_needed(prompt_len, params)   canvas rows a request would hold (static)
    can_admit(prompt_len, params)     a free slot and a free region of that many rows
    add(rid, prompt_ids, params, suffix_ids=(), span_ids=None)
    remove(rid)                       frees the slot and region (a finished request stays until then)
    step()                            one step for all, its events read at once
    step_async()                      launch the next step, return the previous one's events
    discard()                         forget a launched step's results (after a failed step)
    forwards, host_seconds, planned_query_tokens(), canvas(rid), len(batch), rows_in_use

Every request owns one slot (< max_requests) and one contiguous region of the `CanvasStore`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from sampler.events import StepEvent
from sampler.params import ParamError, SamplingParams
from sampler.storage import CanvasStore


class CapacityError(RuntimeError):
    """The request can never fit this batch's buffers."""


class Batch(ABC):
    """Running requests of one model and their canvases; subclasses implement one strategy."""

    block_diffusion = False  # the strategy's parameter meanings (SamplingParams.validate)
    graphs = None            # captured step graphs (sampler.cuda_graphs), where the strategy has them

    def __init__(self, model, special, capacity_tokens: int = 16384, max_requests: int = 64,
                 draft_rows: int = 0):
        self.model = model
        self.config = model.config
        self.mask_id = special.mask
        self.stop_ids = list(special.stop)
        self.eos_id = special.eos
        self.device = model.device
        self.stop_ids_d = torch.tensor(self.stop_ids, dtype=torch.int64, device=self.device)
        self.capacity = capacity_tokens
        self.max_requests = max_requests
        self.store = CanvasStore(model, capacity_tokens, self.mask_id, draft_rows)
        self.requests: dict = {}
        self.free_slots = list(range(max_requests - 1, -1, -1))
        self.forwards = 0        # model forwards run by this batch (one per step)
        self.host_seconds = 0.0  # host time planning and reading steps, waiting for the device excluded

    @property
    def kv(self):
        return self.store.kv

    @property
    def tokens(self) -> torch.Tensor:
        return self.store.tokens

    # ---------------------------------------------------------------- admission
    @staticmethod
    @abstractmethod
    def rows_needed(prompt_len: int, params: SamplingParams) -> int:
        """Canvas rows a request with this context length (prompt and suffix) would hold."""

    def can_admit(self, prompt_len: int, params: SamplingParams) -> bool:
        return bool(self.free_slots) and self.store.regions.fits(self.rows_needed(prompt_len, params))

    def _params(self, params: SamplingParams, suffix_ids, span_ids) -> SamplingParams:
        """The parameters as this strategy runs them (refusing what it cannot run)."""
        return params

    def add(self, rid, prompt_ids, params: SamplingParams, suffix_ids=(), span_ids=None) -> None:
        """Admit a request: canvas prompt ++ span ++ suffix, the span `gen_length` masks or
        `span_ids` (infilling: mask ids at the positions to fill, fixed tokens elsewhere)."""
        prompt_ids, suffix_ids = list(prompt_ids), list(suffix_ids)
        span = [self.mask_id] * params.gen_length if span_ids is None else list(span_ids)
        params = self._params(params, suffix_ids, span_ids)
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
        rows = self.rows_needed(context, params)
        if rows > self.capacity:
            raise CapacityError(f"the request needs {rows} canvas rows; this batch holds {self.capacity}")
        if not self.free_slots:
            raise CapacityError("no free request slot")
        off = self.store.regions.alloc(rows)
        if off is None:
            raise CapacityError("no contiguous canvas region free; retry after a request finishes")
        slot = self.free_slots.pop()
        self.requests[rid] = self._start(rid, slot, off, rows, prompt_ids, span, suffix_ids, params, masks)

    @abstractmethod
    def _start(self, rid, slot, off, rows, prompt_ids, span, suffix_ids, params, masks):
        """The strategy's record of a request just given `slot` and rows [off, off + rows), its
        canvas written to the token buffer."""

    def remove(self, rid) -> None:
        req = self.requests.pop(rid, None)
        if req is None:
            return
        self.store.regions.free(req.offset, req.rows)
        self.free_slots.append(req.slot)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def rows_in_use(self) -> int:
        return self.store.regions.used

    # ---------------------------------------------------------------- the step
    @abstractmethod
    def canvas(self, rid) -> list[int]:
        """The request's generated span as the host has seen it (mask ids where still masked)."""

    @abstractmethod
    def planned_query_tokens(self) -> int:
        """Query tokens the next step's forward processes, padding excluded (benchmarks)."""

    @abstractmethod
    def step(self) -> list[StepEvent]:
        """One step for every running request, its events read at once."""

    def step_async(self) -> list[StepEvent]:
        """Launch the next step and return the events of the one launched before it (a strategy
        without a pipelined step returns this step's own events)."""
        return self.step()

    @property
    def in_flight(self) -> bool:
        return False

    def discard(self) -> None:
        """Forget a launched step's results (after a failed step, whose requests are failed)."""
