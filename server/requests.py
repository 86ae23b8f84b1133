"""From a parsed request to what the engine runs: prompt ids, stop strings, sampling parameters."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sampler.params import LLADA2_FIELDS, MAX_SEED, MAX_TOP_LOGPROBS, RELEASED_DEFAULTS, ParamError, SamplingParams
from sampler.scheduler import EngineError
from server.errors import ApiError, clip
from server.schemas import ChatCompletionRequest, CompletionRequest, refused_field, unknown_fields

log = logging.getLogger("llada.server")
MAX_SCORING_PAIRS = 256  # pairs per /v1/loglikelihood request
SEED_STRIDE = 0x9E3779B97F4A7C15


@dataclass
class ServerLimits:
    max_n: int = 16                 # choices per request
    default_max_tokens: int = 128   # when the request gives none
    default_block_length: int = 32
    max_stop: int = 16              # stop strings per request


def derive_seed(base: int, i: int) -> int:
    return base if i == 0 else (base + i * SEED_STRIDE) % (MAX_SEED + 1)


def check_request(svc, req) -> None:
    """Unknown fields (a warning, or a 400 with --strict-fields), fields set to what this server
    cannot honour, and a model id it does not serve."""
    unknown = unknown_fields(req)
    if unknown:
        if svc.strict_fields:
            name = unknown[0]
            raise ApiError(400, f"unknown field {clip(name)} (this server runs with --strict-fields)",
                           param=name if len(name) <= 64 else name[:64] + "...", code="unknown_field")
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        log.warning("ignoring unknown field(s): %s%s", ", ".join(clip(u, 64) for u in unknown[:8]), more)
    refused = refused_field(req)
    if refused:
        raise ApiError(400, refused[1], param=refused[0], code="unsupported_parameter")
    if req.model is not None and req.model != svc.name:
        raise ApiError(404, f"the model {clip(req.model)} does not exist; this server serves {svc.name!r}",
                       param="model", code="model_not_found")


def check_raw_sizes(svc, data) -> None:
    """The parsed JSON body's list lengths, before pydantic validates it (validation holds the GIL
    for as long as it takes, so a list no request can use is refused before it is walked): an id list
    longer than the context, more prompts than the queue holds, more messages than the context has
    tokens, more stop strings than the limit."""
    if not isinstance(data, dict):
        return
    ctx, queue, stops = svc.config.max_sequence_length, svc.engine.config.max_queue, svc.limits.max_stop
    p, m, s = data.get("prompt"), data.get("messages"), data.get("stop")
    if isinstance(p, list) and p and isinstance(p[0], int) and len(p) > ctx:
        _fits_context(svc, "prompt", tokens=len(p))
    if isinstance(p, list) and p and not isinstance(p[0], int) and len(p) > queue:
        raise ApiError(400, f"the prompt list has {len(p)} prompts; this server queues at most {queue} "
                       "generations", param="prompt", code="invalid_value")
    if isinstance(m, list) and len(m) > ctx:
        raise ApiError(400, f"{len(m)} messages cannot fit the model's context of {ctx} tokens",
                       param="messages", code="context_length_exceeded")
    if isinstance(s, list) and len(s) > stops:
        raise ApiError(400, f"at most {stops} stop strings, got {len(s)}", param="stop", code="invalid_value")
    pairs = data.get("pairs")
    if isinstance(pairs, list) and len(pairs) > MAX_SCORING_PAIRS:
        raise ApiError(400, f"at most {MAX_SCORING_PAIRS} pairs per request, got {len(pairs)}", param="pairs",
                       code="invalid_value")


def check_fanout(svc, req, n_prompts: int) -> int:
    """`n` (1..max_n) and the number of generations it asks for (prompts x n, at most the queue's
    size), checked before any prompt is tokenized or any sub-request built. Returns n."""
    n = 1 if req.n is None else req.n
    lim = svc.limits
    if not 1 <= n <= lim.max_n:
        raise ApiError(400, f"n must be between 1 and {lim.max_n}, got {n}", param="n", code="invalid_value")
    most = svc.engine.config.max_queue
    if n_prompts * n > most:
        raise ApiError(400, f"the request asks for {n_prompts * n} generations ({n_prompts} prompt(s) x n={n}); "
                       f"this server queues at most {most}", param="n" if n > 1 else "prompt",
                       code="invalid_value")
    return n


def _fits_context(svc, what: str, tokens: int | None = None, chars: int | None = None) -> None:
    """Cheap bounds before expensive work: more ids than the context, or more text than the context
    can hold (see Tokenizer.max_chars_per_token), is refused without scanning or encoding it."""
    ctx = svc.config.max_sequence_length
    if tokens is not None and tokens > ctx:
        raise ApiError(400, f"the {what} has {tokens} tokens; the model's context is {ctx}", param=what,
                       code="context_length_exceeded")
    per = svc.tokenizer.max_chars_per_token if chars is not None and svc.tokenizer is not None else None
    if per and chars > ctx * per:
        raise ApiError(400, f"the {what} is {chars} characters long: more than the model's context of {ctx} "
                       f"tokens can hold (at most {per} characters per token)", param=what,
                       code="context_length_exceeded")


def in_vocabulary(svc, ids, what="prompt") -> list[int]:
    """The one check of client token ids (prompts, scoring pairs): each in [0, vocab_size), the
    vocabulary /v1/models reports (ModelBundle.vocab_size: the tokenizer's)."""
    vocab = svc.vocab_size
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise ApiError(400, f"{what}: token id {clip(t)} is outside the vocabulary [0, {vocab})", param=what,
                           code="invalid_token_id")
    return list(ids)


def check_ids(svc, ids, what="prompt") -> list[int]:
    if not ids:
        raise ApiError(400, f"the {what} is empty", param=what, code="empty_prompt")
    _fits_context(svc, what, tokens=len(ids))
    return in_vocabulary(svc, ids, what)


def refuse_mask_ids(svc, ids, what="prompt") -> list[int]:
    """The one place token-id prompts are refused for holding the mask id (text never yields it)."""
    mask = svc.bundle.special.mask
    if mask in ids:
        pos = list(ids).index(mask)
        raise ApiError(400, f"token id {mask} at position {pos} of the {what} is the mask id; a prompt "
                       "cannot hold masked positions", param=what, code="mask_token_in_prompt")
    return ids


def need_tokenizer(svc, what: str):
    if svc.tokenizer is None:
        raise ApiError(400, f"{what} needs a tokenizer and this checkpoint has none (tokenizer.json); "
                       "send the prompt as a list of token ids", param="prompt", code="no_tokenizer")
    return svc.tokenizer


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
            tok = need_tokenizer(svc, "a text prompt")
            _fits_context(svc, "prompt", chars=len(x))
            prompts.append(check_ids(svc, tok.encode(x)))
        else:
            prompts.append(refuse_mask_ids(svc, check_ids(svc, x)))
    return prompts


def chat_prompt(svc, req: ChatCompletionRequest) -> list[int]:
    """The chat template rendered and tokenized (call it off the event loop)."""
    if not req.messages:
        raise ApiError(400, "messages is empty", param="messages", code="empty_prompt")
    tok = need_tokenizer(svc, "chat")
    # Every message renders to at least one token: more messages than the context cannot fit.
    _fits_context(svc, "messages", tokens=len(req.messages))
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
    _fits_context(svc, "messages", chars=sum(len(m["content"]) for m in msgs))
    from weights.tokenizer import TemplateError, check_template_kwargs

    kwargs = req.chat_template_kwargs
    if kwargs:
        try:  # plain data under names the renderer does not set itself (before the template runs)
            check_template_kwargs(kwargs, tok.reserved_template_names)
        except TemplateError as e:
            raise ApiError(400, str(e), param="chat_template_kwargs", code="invalid_value") from None

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
    return check_ids(svc, ids, "messages")


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


def sampling(svc, req, max_tokens: int | None, prompt_len: int, index: int, base_seed: int,
             span: list[int] | None = None, exact_length: bool = False) -> SamplingParams:
    """The request's SamplingParams. `prompt_len` counts all fixed context (prompt and suffix).
    `span`: an infill span (mask ids where to fill): one block over it, one step per masked
    position by default. `exact_length`: gen_length is max_tokens itself (a suffix follows the span,
    so no rounding up to whole blocks)."""
    lim = svc.limits
    context = svc.config.max_sequence_length
    room = context - prompt_len
    blocks = bool(svc.config.block_diffusion)
    steps = req.steps
    if blocks and (span is not None or exact_length):
        raise ApiError(400, "infilling (suffix, infill) is not available for block-diffusion (LLaDA2.x) "
                       "checkpoints", param="infill" if span is not None else "suffix", code="invalid_value")
    if span is not None:
        gen_length = block = len(span)
        masks = span.count(svc.bundle.special.mask)
        if req.block_length is not None and req.block_length != gen_length:
            raise ApiError(400, f"infill runs its span ({gen_length} tokens from the first to the last marked "
                           "position) as one block; leave block_length out", param="block_length",
                           code="invalid_value")
        if steps is None and req.threshold is None:
            steps = masks
        if steps is not None and steps > masks:
            raise ApiError(400, f"steps {steps} exceeds the {masks} marked positions to fill", param="steps",
                           code="invalid_value")
    else:
        if max_tokens is None:
            max_tokens = min(lim.default_max_tokens, max(1, room))
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens",
                           code="invalid_value")
        if max_tokens > room:
            left = f"{room} tokens are left for the answer" if room > 0 else "no tokens are left for an answer"
            raise ApiError(400, f"the prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = "
                           f"{prompt_len + max_tokens} exceeds the model's context of {context} tokens: {left}",
                           param="max_tokens", code="context_length_exceeded")
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
            block = max_tokens if exact_length else min(lim.default_block_length, max_tokens)
        # LLaDA2 decodes exactly max_tokens (its last block runs past them); a span before a suffix is
        # exactly max_tokens; otherwise whole blocks, laid out so that a max_tokens that fits the
        # context is never refused for rounding.
        if blocks or exact_length:
            gen_length = max_tokens
        else:
            gen_length, block = block_layout(max_tokens, block, steps if steps is not None and steps >= 1
                                             else None, room)
    # Unset block-diffusion fields take the checkpoint's released `generate` defaults.
    released = RELEASED_DEFAULTS[svc.bundle.decoding]
    extra = {}
    for name in LLADA2_FIELDS:
        value = getattr(req, name) if getattr(req, name) is not None else released.get(name)
        if value is not None:
            extra[name] = value
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    sp = SamplingParams(
        gen_length=gen_length, block_length=block, steps=steps,
        temperature=0.0 if req.temperature is None else req.temperature,
        remasking=req.remasking or "low_confidence",
        cfg_scale=0.0 if req.cfg_scale is None else req.cfg_scale,
        threshold=req.threshold if req.threshold is not None else released.get("threshold"),
        cache=req.cache or "none", seed=derive_seed(base_seed, index),
        ban_eos=bool(req.ban_eos or req.ignore_eos), defer_eos=bool(req.defer_eos),
        top_k=top_k, top_p=1.0 if req.top_p is None else req.top_p,
        min_p=0.0 if req.min_p is None else req.min_p, logprobs=logprobs_wanted(req),
        draft_depth=req.draft_depth, **extra)
    if blocks:
        sp = sp.for_block_diffusion()
    try:
        if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
            raise ParamError("seed", f"seed must be an integer in [0, 2**63), got {req.seed}")
        sp.validate(prompt_len, svc.config.max_sequence_length, blocks)
    except ParamError as e:
        raise ApiError(400, str(e), param=e.field, code="invalid_value") from None
    try:
        svc.engine.check_fits(prompt_len, sp)
    except EngineError as e:
        raise ApiError.from_engine(e) from None
    return sp
