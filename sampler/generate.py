"""Run requests through a batch of the model's strategy to completion (CLI, conformance, evaluation, tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sampler.events import StepEvent
from sampler.params import SamplingParams
from sampler.strategies import is_block_diffusion, make_batch, rows_needed


@dataclass
class Generation:
    gen_ids: list[int]
    nfe: int
    events: list[StepEvent] = field(default_factory=list)
    forwards: int = 0  # forwards it took part in (== nfe without drafting, fewer with it)


def generate(bundle, prompts, params, keep_events: bool = False, on_event=None, suffixes=None,
             spans=None, draft_depth: int = 0, draft_budget: int | None = None,
             adaptive_drafting: bool | None = False) -> list[Generation]:
    """Denoise every prompt (a list of id lists) together in one batch.

    `params` is one SamplingParams for all or a list, one per prompt. `bundle` is a ModelBundle
    (anything with .model and .special). Infilling: `suffixes` (fixed context after the span) and
    `spans` (the span with mask ids where tokens are filled; None for all masks), one per prompt.
    `draft_depth`: the depth of requests whose params leave it unset; `draft_budget` (default:
    room for every request's drafts) bounds the draft rows of a step. `adaptive_drafting` (default
    off here: conformance, evaluation and tests count forwards, which the gate's timings would make
    vary; None: the engine's default) is `make_batch`'s."""
    prompts = [list(p) for p in prompts]
    suffixes = [list(x or ()) for x in suffixes] if suffixes is not None else [[] for _ in prompts]
    spans = list(spans) if spans is not None else [None] * len(prompts)
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError("one SamplingParams per prompt, or a single one for all")
    blocks = is_block_diffusion(bundle.model.config)
    rows = sum(rows_needed(len(p) + len(x), sp, blocks)
               for p, sp, x in zip(prompts, params, suffixes))
    depth = max((draft_depth if sp.draft_depth is None else sp.draft_depth for sp in params), default=0)
    if draft_budget is None:
        draft_budget = (depth + 1) * rows if depth else 0
    batch = make_batch(bundle.model, bundle.special, capacity_tokens=max(rows, 1),
                       max_requests=max(len(prompts), 1), draft_depth=draft_depth, draft_budget=draft_budget,
                       adaptive_drafting=adaptive_drafting)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        batch.add(i, p, sp, suffix_ids=suffixes[i], span_ids=spans[i])
    results: dict[int, Generation] = {}
    events: dict[int, list[StepEvent]] = {i: [] for i in range(len(prompts))}
    while len(batch):
        for ev in batch.step():
            if on_event is not None:
                on_event(ev)
            if keep_events:
                events[ev.request_id].append(ev)
            if ev.finished:
                results[ev.request_id] = Generation(ev.gen_ids, ev.nfe, events[ev.request_id],
                                                    ev.forwards if ev.forwards is not None else ev.nfe)
                batch.remove(ev.request_id)
    return [results[i] for i in range(len(prompts))]


def cut_answer(gen_ids, stop_ids, limit: int | None = None, stop_from: int = 0) -> list[int]:
    """The answer: the generated ids up to (not including) the first EOS/EoT, at most `limit`. A
    stop id before position `stop_from` (min_tokens) ends nothing."""
    stops = set(stop_ids)
    out = []
    for t in gen_ids:
        if (t in stops and len(out) >= stop_from) or (limit is not None and len(out) >= limit):
            break
        out.append(t)
    return out
