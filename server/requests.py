"""From a checked request to what the engine runs: prompt ids, stop strings, sampling parameters, and
the plan of its generations (prompts x n, each a SamplingParams and a choice).

The rules these functions apply are in server/checks.py; nothing here talks to the engine.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from sampler.params import LLADA2_FIELDS, MAX_SEED, MAX_TOP_LOGPROBS, RELEASED_DEFAULTS, SamplingParams
from sampler.scheduler import Handle
from server import checks
from server.constraints import request_constraint
from server.tools import choice_class, prompt_messages, tool_constraint
from server.answer import BaseChoice, Choice, Decoder
from server.errors import ApiError, clip
from server.infill import InfillChoice
from server.schemas import ChatCompletionRequest, CompletionRequest

SEED_STRIDE = 0x9E3779B97F4A7C15


@dataclass
class ServerLimits:
    max_n: int = 16                 # choices per request
    default_max_tokens: int = 128   # when the request gives none
    default_block_length: int = 32
    max_stop: int = 16              # stop strings per request


def derive_seed(base: int, i: int) -> int:
    return base if i == 0 else (base + i * SEED_STRIDE) % (MAX_SEED + 1)


def completion_items(req: CompletionRequest) -> list:
    """The prompts of a completion request (each a string or an id list), without looking inside them."""
    p = req.prompt
    if p is None or (isinstance(p, (str, list)) and len(p) == 0):
        raise ApiError(400, "the prompt is empty", param="prompt", code="empty_prompt")
    if isinstance(p, str) or all(isinstance(x, int) for x in p):
        return [p]
    return p


def completion_prompts(svc, items: list) -> list[list[int]]:
    """Token ids of each prompt (tokenizing: call it off the event loop)."""
    prompts = []
    for x in items:
        if isinstance(x, str):
            if not x:
                raise ApiError(400, "the prompt is empty", param="prompt", code="empty_prompt")
            tok = checks.need_tokenizer(svc, "a text prompt")
            checks.fits_context(svc, "prompt", chars=len(x))
            prompts.append(checks.token_ids(svc, tok.encode(x), mask_ok=True))
        else:
            prompts.append(checks.token_ids(svc, x))
    return prompts


def chat_prompt(svc, req: ChatCompletionRequest) -> list[int]:
    """The chat template rendered and tokenized (call it off the event loop)."""
    if not req.messages:
        raise ApiError(400, "messages is empty", param="messages", code="empty_prompt")
    tok = checks.need_tokenizer(svc, "chat")
    # Every message renders to at least one token: more messages than the context cannot fit.
    checks.fits_context(svc, "messages", tokens=len(req.messages))
    msgs = []
    for m in req.messages:
        c = m.content
        if isinstance(c, list):
            parts = []
            for part in c:
                if part.type != "text":
                    raise ApiError(400, f"content parts of type {clip(part.type)} are not supported",
                                   param="messages", code="unsupported_content")
                parts.append(part.text or "")
            c = "".join(parts)
        msgs.append({"role": m.role, "content": c or ""})
    from weights.tokenizer import TemplateError, check_template_kwargs

    kwargs = req.chat_template_kwargs
    if kwargs:
        try:  # plain data under names the renderer does not set itself (before the template runs)
            check_template_kwargs(kwargs, tok.reserved_template_names)
        except TemplateError as e:
            raise ApiError(400, str(e), param="chat_template_kwargs", code="invalid_value") from None
    # tools, tool calls and tool results: the template's own way, or the documented fallback
    msgs, tool_vars = prompt_messages(tok, req, msgs, svc.chat_special_tokens)
    kwargs = {**(kwargs or {}), **tool_vars} or None
    checks.fits_context(svc, "messages", chars=sum(len(m["content"] or "") for m in msgs))

    cont = bool(req.continue_final_message)
    if cont and msgs[-1]["role"] != "assistant":
        raise ApiError(400, "continue_final_message needs the last message to be the assistant's",
                       param="continue_final_message", code="invalid_value")
    try:
        ids = tok.chat_ids(msgs, add_generation_prompt=req.add_generation_prompt is not False,
                           continue_final=cont, specials_in_content=svc.chat_special_tokens,
                           template_kwargs=kwargs)
    except TemplateError as e:  # any failure of the template, its bounds included
        raise ApiError(400, str(e), param="messages", code="template_error") from None
    return checks.token_ids(svc, ids, "messages", mask_ok=True)


def stop_strings(req) -> list[str]:
    s = req.stop
    if s is None:
        return []
    stops = [s] if isinstance(s, str) else list(s)  # at most max_stop: see check_raw_sizes
    return [x for x in stops if x]


def block_layout(max_tokens: int, block: int, steps: int | None, room: int) -> tuple[int, int]:
    """(gen_length, block_length) for an answer of up to max_tokens tokens in `room` canvas tokens.

    The canvas is max_tokens rounded up to the block (exactly the reference layout when max_tokens is
    a multiple of it). When that would not fit the context but max_tokens does, the block becomes the
    longest one (up to the requested one) that tiles a span of room or less, whose block count
    divides the requested steps (or, failing that, one block of max_tokens)."""
    gen = -(-max_tokens // block) * block
    if gen <= room:
        return gen, block
    for b in range(min(block, room), 0, -1):
        g = -(-max_tokens // b) * b
        while g <= room:
            if steps is None or (steps % (g // b) == 0 and steps <= g):
                return g, b
            g += b
    return max_tokens, max_tokens  # one block: any steps up to max_tokens fit it (validate() checks the rest)


def logprobs_wanted(req) -> int | None:
    """Alternatives per token a request asks for (None: no logprobs). Completions: `logprobs: N`;
    chat: `logprobs: true` with `top_logprobs: N` (0 when absent)."""
    if isinstance(req, ChatCompletionRequest):
        if not req.logprobs:
            if req.top_logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs",
                               code="invalid_value")
            return None
        n = req.top_logprobs or 0
        if not 0 <= n <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {n}",
                           param="top_logprobs", code="invalid_value")
        return n
    return req.logprobs


def _span_layout(svc, req, span: list[int]) -> tuple[int, int, int | None]:
    """(gen_length, block_length, steps) of an infill span: one block over it, by default one step
    per masked position."""
    gen_length = block = len(span)
    masks = span.count(svc.bundle.special.mask)
    steps = req.steps
    if req.block_length is not None and req.block_length != gen_length:
        raise ApiError(400, f"infill runs its span ({gen_length} tokens from the first to the last marked "
                       "position) as one block; leave block_length out", param="block_length",
                       code="invalid_value")
    if steps is None and req.threshold is None:
        steps = masks
    if steps is not None and steps > masks:
        raise ApiError(400, f"steps {steps} exceeds the {masks} marked positions to fill", param="steps",
                       code="invalid_value")
    return gen_length, block, steps


def _answer_layout(svc, req, max_tokens: int | None, prompt_len: int,
                   exact_length: bool) -> tuple[int, int | None]:
    """(gen_length, block_length) of an answer of up to max_tokens tokens after prompt_len tokens."""
    blocks = svc.block_diffusion
    room = svc.config.max_sequence_length - prompt_len
    if max_tokens is None:
        max_tokens = min(svc.limits.default_max_tokens, max(1, room))
    checks.answer_room(svc, prompt_len, max_tokens)
    if req.block_length is not None:
        block = req.block_length
        if block < 1:
            raise ApiError(400, f"block_length must be >= 1, got {block}", param="block_length",
                           code="invalid_value")
        if exact_length and max_tokens % block:
            raise ApiError(400, f"with a suffix the span is exactly max_tokens ({max_tokens}) long: "
                           f"block_length {block} must divide it", param="block_length",
                           code="invalid_value")
    elif blocks:
        block = None  # the released generate's block length
    else:
        block = max_tokens if exact_length else min(svc.limits.default_block_length, max_tokens)
    # LLaDA2 decodes exactly max_tokens (its last block runs past them); a span before a suffix is
    # exactly max_tokens; otherwise whole blocks, laid out so that a max_tokens that fits the
    # context is never refused for rounding.
    if blocks or exact_length:
        return max_tokens, block
    steps = req.steps if req.steps is not None and req.steps >= 1 else None
    return block_layout(max_tokens, block, steps, room)


def sampling(svc, req, max_tokens: int | None, prompt_len: int, index: int, base_seed: int,
             span: list[int] | None = None, exact_length: bool = False) -> SamplingParams:
    """The request's SamplingParams, checked (server.checks.params). `prompt_len` counts all fixed
    context (prompt and suffix). `span`: an infill span (mask ids where to fill). `exact_length`:
    gen_length is max_tokens itself (a suffix follows the span, so no rounding up to whole blocks)."""
    blocks = svc.block_diffusion
    if blocks and (span is not None or exact_length):
        raise ApiError(400, "infilling (suffix, infill) is not available for block-diffusion (LLaDA2.x) "
                       "checkpoints", param="infill" if span is not None else "suffix", code="invalid_value")
    if span is not None:
        gen_length, block, steps = _span_layout(svc, req, span)
    else:
        (gen_length, block), steps = _answer_layout(svc, req, max_tokens, prompt_len, exact_length), req.steps
    # Unset block-diffusion fields take the checkpoint's released `generate` defaults.
    released = RELEASED_DEFAULTS[svc.bundle.decoding]
    extra = {}
    for name in LLADA2_FIELDS:
        value = getattr(req, name) if getattr(req, name) is not None else released.get(name)
        if value is not None:
            extra[name] = value
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    # ignore_eos on a LLaDA answer: no stop id anywhere in the span (min_tokens = the span); an infill
    # span and LLaDA2.x keep ignore_eos = ban_eos (and refuse min_tokens)
    fixed_length = bool(req.ignore_eos) and span is None and not blocks
    if span is not None and req.min_tokens:
        raise ApiError(400, "min_tokens does not apply to infill (the span is not an answer that ends)",
                       param="min_tokens", code="invalid_value")
    answer = gen_length if max_tokens is None else min(max_tokens, gen_length)
    checks.vllm_extras(svc, req, answer)
    constraint = tool_constraint(svc, req) or request_constraint(svc, req)
    sp = SamplingParams(
        gen_length=gen_length, block_length=block, steps=steps,
        temperature=0.0 if req.temperature is None else req.temperature,
        remasking=req.remasking or "low_confidence",
        cfg_scale=0.0 if req.cfg_scale is None else req.cfg_scale,
        threshold=req.threshold if req.threshold is not None else released.get("threshold"),
        cache=req.cache or "none", seed=derive_seed(base_seed, index),
        ban_eos=bool(req.ban_eos or (req.ignore_eos and not fixed_length)), defer_eos=bool(req.defer_eos),
        min_tokens=gen_length if fixed_length else req.min_tokens or 0,
        eos_bias=0.0 if req.eos_bias is None else float(req.eos_bias),
        top_k=top_k, top_p=1.0 if req.top_p is None else req.top_p,
        min_p=0.0 if req.min_p is None else req.min_p, logprobs=logprobs_wanted(req),
        constraint=constraint and constraint.within(answer), draft_depth=req.draft_depth, **extra)
    if blocks:
        sp = sp.for_block_diffusion()
    checks.seed(req.seed)
    checks.params(svc, sp, prompt_len, {"min_tokens": "ignore_eos"} if fixed_length else None)
    return sp


@dataclass
class Plan:
    """A whole request as the engine will run it: per generation (prompts x n, in choice order) the
    engine's Handle (its sink set by the Job) and the choice it answers; the decoder of their text
    and the prompt tokens the request is billed for."""

    handles: list[Handle]
    choices: list[BaseChoice]
    decoder: Decoder
    prompt_tokens: int


def plan(svc, req, prompts: list[list[int]], n: int, max_tokens: int | None, suffix_ids=None,
         infills=None) -> Plan:
    """Every generation of a checked request. `n` comes from checks.fanout; `suffix_ids`: fixed
    context after every prompt's span (OpenAI's suffix); `infills`: one InfillPrompt per prompt (the
    infill form; `prompts` are then their prefixes). Builds (and checks) each SamplingParams."""
    stops = stop_strings(req)
    base_seed = req.seed if req.seed is not None else secrets.randbits(62)
    suffix = list(suffix_ids or [])
    decoder = svc.decoder if req.skip_special_tokens is not False else Decoder(svc.tokenizer, skip_special=False)
    progress, steps = bool(stops) or bool(req.stream), bool(req.stream_steps)
    handles, choices = [], []
    answer_choice = (choice_class(req) if isinstance(req, ChatCompletionRequest) else None) or Choice
    for pi, p in enumerate(prompts):
        ip = infills[pi] if infills is not None else None
        for j in range(n):
            idx = pi * n + j
            if ip is not None:
                sp = sampling(svc, req, None, len(ip.prefix) + len(ip.suffix), idx, base_seed, span=ip.span)
                choices.append(InfillChoice(idx, decoder, ip))
                handles.append(Handle(prompt_ids=p, params=sp, sink=None, want_steps=steps,
                                      suffix_ids=list(ip.suffix), span_ids=list(ip.span),
                                      priority=req.priority or 0))
                continue
            sp = sampling(svc, req, max_tokens, len(p) + len(suffix), idx, base_seed,
                          exact_length=suffix_ids is not None)
            limit = min(max_tokens if max_tokens is not None else sp.gen_length, sp.gen_length)
            model_stops = [] if req.ignore_eos and sp.min_tokens else svc.stop_ids  # ignore_eos: none
            choices.append(answer_choice(idx, decoder, model_stops, limit, stops, req.stop_token_ids or (),
                                  req.min_tokens or 0, bool(req.include_stop_str_in_output)))
            handles.append(Handle(prompt_ids=p, params=sp, sink=None, want_steps=steps, want_progress=progress,
                                  answer_limit=limit, suffix_ids=suffix, priority=req.priority or 0,
                                  stop_ids=frozenset(choices[-1].stop_ids) if req.stop_token_ids
                                  or req.ignore_eos else None, stop_from=req.min_tokens or 0))
    if infills is not None:
        tokens = sum(len(ip.prefix) + len(ip.span) - ip.masks + len(ip.suffix) for ip in infills)
    else:
        tokens = sum(len(p) + len(suffix) for p in prompts)
    return Plan(handles, choices, decoder, tokens)
