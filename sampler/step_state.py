"""What the LLaDA step keeps per request on the device, and the one buffer it hands back.

Per-slot state is one int64 row (`SlotInts`) and one float64 row (`SlotFloats`) per slot; the
field order of the two named tuples is the column order, `pack_slot` is the only place a request's
parameters become a row, and `INT` / `FLT` give each field's column. On the device a gathered
state [n, N_INT] is read as `SlotInts(*state.unbind(1))` (one tensor [n] per field) and written back
as `torch.stack(fields, 1)`.

The read-back buffer is one int64 tensor whose sections `ReadBack` lists once: the step packs it and
the host unpacks it from that same list (float32 values travel as their bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

CACHE_MODE = {"none": 0, "prefix": 1, "dual": 2}
MODE_NONE, MODE_PREFIX, MODE_DUAL = CACHE_MODE["none"], CACHE_MODE["prefix"], CACHE_MODE["dual"]
MAX_TOP_LOGPROBS = 20  # alternatives computed per row when a step has logprobs requests


class SlotInts(NamedTuple):
    """Integer state of one request (or, on the device, one tensor per field)."""

    offset: Any           # first row of its region in the token and K/V buffers
    prompt_len: Any
    length: Any           # the whole canvas: prompt + generated span + suffix
    block_len: Any        # positions per block of the span
    steps_per_block: Any  # the s/t schedule's steps per block; 0: threshold decoding
    n_blocks: Any
    block_index: Any      # the block it works on (== n_blocks once finished)
    step_in_block: Any
    steps_done: Any       # steps taken (also the sampling noise's nonce)
    unmasked: Any
    nfe: Any              # forwards as the reference samplers count them
    cache_mode: Any       # CACHE_MODE
    seed: Any
    cfg: Any              # 1: classifier-free guidance
    random_remask: Any    # 1: remasking "random"
    ban_eos: Any
    defer_eos: Any
    gen_length: Any       # the generated span
    block_masked: Any     # masked positions of the current block at its start (the schedule's count)
    top_k: Any            # 0: off
    n_logprobs: Any       # alternatives a logprobs request wants; -1: no logprobs
    frontier: Any         # constrained requests: the span position the grammar mask is for; -1: none
    draft_depth: Any      # steps the drafting stage guesses ahead (0: off)
    guessed: Any          # steps guessed by the last drafting stage (draft rows 1..guessed valid)
    guess_nonce: Any      # steps_done when they were guessed (drafts are valid at that state only)
    min_tokens: Any       # span positions below it never take a stop id (SamplingParams.min_tokens)


class SlotFloats(NamedTuple):
    """Float state of one request (float64 on the device)."""

    temperature: Any
    threshold: Any        # 0: the s/t schedule
    cfg_scale: Any
    top_p: Any
    min_p: Any
    eos_bias: Any         # added to the EOS logit


N_INT, N_FLT = len(SlotInts._fields), len(SlotFloats._fields)
INT = SlotInts(*range(N_INT))    # column of each integer field
FLT = SlotFloats(*range(N_FLT))  # column of each float field


def pack_slot(params, offset: int, prompt_len: int, length: int,
              draft_depth: int = 0) -> tuple[SlotInts, SlotFloats]:
    """A newly admitted request's state rows (nothing decoded yet)."""
    ints = SlotInts(
        offset=offset, prompt_len=prompt_len, length=length, block_len=params.block,
        steps_per_block=0 if params.threshold is not None else params.steps_per_block,
        n_blocks=params.blocks, block_index=0, step_in_block=0, steps_done=0, unmasked=0, nfe=0,
        cache_mode=CACHE_MODE[params.cache], seed=params.seed if params.seed is not None else 0,
        cfg=int(params.cfg_scale > 0), random_remask=int(params.remasking == "random"),
        ban_eos=int(bool(params.ban_eos)), defer_eos=int(bool(params.defer_eos)),
        gen_length=params.gen_length, block_masked=0, top_k=params.top_k,
        n_logprobs=-1 if params.logprobs is None else params.logprobs,
        frontier=0 if params.constraint is not None else -1,
        draft_depth=draft_depth, guessed=0, guess_nonce=-1, min_tokens=params.min_tokens)
    floats = SlotFloats(
        temperature=float(params.temperature),
        threshold=float(params.threshold) if params.threshold is not None else 0.0,
        cfg_scale=float(params.cfg_scale), top_p=float(params.top_p), min_p=float(params.min_p),
        eos_bias=float(params.eos_bias))
    return ints, floats


def columns(state: torch.Tensor) -> SlotInts:
    """The fields of gathered integer state rows [n, N_INT], one tensor [n] each."""
    return SlotInts(*state.unbind(1))


def float_columns(fstate: torch.Tensor) -> SlotFloats:
    return SlotFloats(*fstate.unbind(1))


class RowOut(NamedTuple):
    """Per logit row of the step."""

    chosen: Any    # 1: unmasked in this step
    token: Any     # the candidate token
    position: Any  # relative to the generated span


class RequestOut(NamedTuple):
    """Per request row of the step (state after it)."""

    active: Any      # 0: the planned step did nothing for this request
    steps_done: Any
    nfe: Any
    unmasked: Any
    block_done: Any
    finished: Any
    accepted: Any    # 1: the row's state is in the accepted chain (a request's first row: when active)
    guessed: Any     # steps the drafting stage guessed for the next step (draft rows it allows)


@dataclass(frozen=True)
class ReadBack:
    """The sections of the read-back buffer of a step with `rows` logit rows and `requests` request
    rows (padding included): (name, entries, width, float32 or int64), in buffer order."""

    rows: int
    requests: int
    logprobs: bool = False

    @classmethod
    def of(cls, bucket) -> "ReadBack":
        return cls(bucket.rows, bucket.requests + 1, bucket.logprobs)

    def sections(self):
        out = [("rows", self.rows, len(RowOut._fields), False), ("conf", self.rows, 1, True),
               ("requests", self.requests, len(RequestOut._fields), False)]
        if self.logprobs:  # the candidate's log-probability, the top alternatives and theirs
            n = MAX_TOP_LOGPROBS
            out += [("token_logprob", self.rows, 1, True), ("top_ids", self.rows, n, False),
                    ("top_logprobs", self.rows, n, True)]
        return out

    def pack(self, parts: dict) -> torch.Tensor:
        """One int64 buffer from a tensor per section ([entries] or [entries, width])."""
        flat = []
        for name, n, width, is_float in self.sections():
            t = parts[name]
            assert t.numel() == n * width, (name, tuple(t.shape), n, width)
            if is_float:
                t = t.contiguous().view(torch.int32).to(torch.int64)
            flat.append(t.reshape(-1))
        return torch.cat(flat)

    def unpack(self, buffer) -> dict:
        """numpy views of each section of a host buffer (float32 sections as float32 values)."""
        a = buffer.numpy()
        out, at = {}, 0
        for name, n, width, is_float in self.sections():
            v = a[at:at + n * width]
            at += n * width
            if is_float:
                v = v.astype("int32").view("float32")
            out[name] = v if width == 1 else v.reshape(n, width)
        assert at == len(a), (at, len(a))
        return out
