"""What a step reports per request: the one event type every decoding strategy emits."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepEvent:
    request_id: object
    step: int                      # steps this request has taken (1-based after the step)
    block: int                     # index of the block the step worked on, within the generated span
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
    # Exact parallel decoding: the forwards this request has taken (NFE as run, not as the
    # reference counts it), the steps the forward that produced this event advanced (1 + its
    # accepted drafts; each step still gets its own event) and the draft rows it ran.
    forwards: int | None = None
    forward_steps: int = 1
    draft_rows: int = 0
