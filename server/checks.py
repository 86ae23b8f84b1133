"""Every rule a request must pass before the engine sees it, each defined once and used by every route
(completions, chat, infill, scoring, models).

Each check raises `ApiError` (a 4xx with the OpenAI body) naming the offending field; the engine runs
what passed without checking it again. Checks that only read sizes run first (before tokenizing or
validation walks a large body); checks that need token ids run off the event loop with them.
"""

from __future__ import annotations

import logging

from sampler.params import MAX_SEED, ParamError
from sampler.scheduler import EngineError, check_fits
from server.errors import ApiError, clip
from server.schemas import refused_field, unknown_fields
from server.tools import tool_request

log = logging.getLogger("llada.server")
MAX_SCORING_PAIRS = 256  # pairs per /v1/loglikelihood request
MAX_STOP_TOKEN_IDS = 256  # stop_token_ids per request
PRIORITY_RANGE = (-(2**31), 2**31 - 1)  # priority: a 32-bit integer, lower is admitted sooner
MAX_REQUEST_ID_CHARS = 256  # request_id / x-request-id: printable ASCII (it becomes a header)


def model(svc, model_id: str | None) -> None:
    """A model id this server does not serve: 404 (None means the served one)."""
    if model_id is not None and model_id != svc.name:
        raise ApiError(404, f"the model {clip(model_id)} does not exist; this server serves {svc.name!r}",
                       param="model", code="model_not_found")


def fields(svc, req) -> None:
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
    tool_request(req)  # tools, tool_choice, parallel_tool_calls: 400 naming the field (server.tools)
    model(svc, req.model)


def raw_sizes(svc, data) -> None:
    """The parsed JSON body's list lengths, before pydantic validates it (validation holds the GIL
    for as long as it takes, so a list no request can use is refused before it is walked): an id list
    longer than the context, more prompts than the queue holds, more messages than the context has
    tokens, more stop strings than the limit, more scoring pairs than MAX_SCORING_PAIRS."""
    if not isinstance(data, dict):
        return
    ctx, queue, stops = svc.config.max_sequence_length, svc.max_queue, svc.limits.max_stop
    p, m, s = data.get("prompt"), data.get("messages"), data.get("stop")
    if isinstance(p, list) and p and isinstance(p[0], int) and len(p) > ctx:
        fits_context(svc, "prompt", tokens=len(p))
    if isinstance(p, list) and p and not isinstance(p[0], int) and len(p) > queue:
        raise ApiError(400, f"the prompt list has {len(p)} prompts; this server queues at most {queue} "
                       "generations", param="prompt", code="invalid_value")
    for key, what, m in (("messages", "messages", m), ("input", "input items", data.get("input"))):
        if isinstance(m, list) and len(m) > ctx:  # chat's messages, the Responses API's input items
            raise ApiError(400, f"{len(m)} {what} cannot fit the model's context of {ctx} tokens",
                           param=key, code="context_length_exceeded")
    if isinstance(s, list) and len(s) > stops:
        raise ApiError(400, f"at most {stops} stop strings, got {len(s)}", param="stop", code="invalid_value")
    ids = data.get("stop_token_ids")
    if isinstance(ids, list) and len(ids) > MAX_STOP_TOKEN_IDS:
        raise ApiError(400, f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(ids)}", param="stop_token_ids",
                       code="invalid_value")
    pairs = data.get("pairs")
    if isinstance(pairs, list) and len(pairs) > MAX_SCORING_PAIRS:
        raise ApiError(400, f"at most {MAX_SCORING_PAIRS} pairs per request, got {len(pairs)}", param="pairs",
                       code="invalid_value")


def fanout(svc, n: int | None, n_prompts: int) -> int:
    """`n` (1..max_n) and the number of generations it asks for (prompts x n, at most the queue's
    size), checked before any prompt is tokenized or any sub-request built. Returns n."""
    n = 1 if n is None else n
    lim = svc.limits
    if not 1 <= n <= lim.max_n:
        raise ApiError(400, f"n must be between 1 and {lim.max_n}, got {n}", param="n", code="invalid_value")
    most = svc.max_queue
    if n_prompts * n > most:
        raise ApiError(400, f"the request asks for {n_prompts * n} generations ({n_prompts} prompt(s) x n={n}); "
                       f"this server queues at most {most}", param="n" if n > 1 else "prompt",
                       code="invalid_value")
    return n


def fits_context(svc, what: str, tokens: int | None = None, chars: int | None = None) -> None:
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
    """Client token ids (prompts, scoring pairs): each in [0, vocab_size), the vocabulary
    /v1/models reports (ModelBundle.vocab_size: the tokenizer's)."""
    vocab = svc.vocab_size
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise ApiError(400, f"{what}: token id {clip(t)} is outside the vocabulary [0, {vocab})", param=what,
                           code="invalid_token_id")
    return list(ids)


def no_mask(svc, ids, what="prompt", scored: bool = False) -> list[int]:
    """Token ids that must not hold the mask id (a prompt, a scored pair; text never yields it)."""
    mask = svc.bundle.special.mask
    if mask in ids:
        pos = list(ids).index(mask)
        if scored:
            raise ApiError(400, f"{what} holds the mask token (id {mask}) at position {pos}; scored text must be "
                           "plain text", param=what, code="invalid_token_id")
        raise ApiError(400, f"token id {mask} at position {pos} of the {what} is the mask id; a prompt "
                       "cannot hold masked positions", param=what, code="mask_token_in_prompt")
    return ids


def token_ids(svc, ids, what="prompt", mask_ok: bool = False) -> list[int]:
    """A prompt's ids: not empty, within the context, within the vocabulary, and (unless `mask_ok`:
    an infill prompt marks its gaps with it) without the mask id."""
    if not ids:
        raise ApiError(400, f"the {what} is empty", param=what, code="empty_prompt")
    fits_context(svc, what, tokens=len(ids))
    ids = in_vocabulary(svc, ids, what)
    return ids if mask_ok else no_mask(svc, ids, what)


def seed(value: int | None) -> None:
    if value is not None and not 0 <= value <= MAX_SEED:
        raise ApiError(400, f"seed must be an integer in [0, 2**63), got {value}", param="seed", code="invalid_value")


def params(svc, sp, prompt_len: int, sent_as: dict | None = None) -> None:
    """SamplingParams the strategy accepts, and a canvas that fits the batch (the request fit).
    `sent_as`: the request field a parameter came from where the names differ (ignore_eos ->
    min_tokens), so the 400 names what the client sent."""
    try:
        sp.validate(prompt_len, svc.config.max_sequence_length, svc.block_diffusion)
        check_fits(prompt_len, sp, svc.max_batch_tokens, svc.block_diffusion)
    except ParamError as e:
        raise ApiError(400, str(e), param=(sent_as or {}).get(e.field, e.field), code="invalid_value") from None
    except EngineError as e:
        raise ApiError.from_engine(e) from None


def answer_room(svc, prompt_len: int, max_tokens: int) -> None:
    """max_tokens >= 1 and prompt + max_tokens within the context."""
    context = svc.config.max_sequence_length
    room = context - prompt_len
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens", code="invalid_value")
    if max_tokens > room:
        left = f"{room} tokens are left for the answer" if room > 0 else "no tokens are left for an answer"
        raise ApiError(400, f"the prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = "
                       f"{prompt_len + max_tokens} exceeds the model's context of {context} tokens: {left}",
                       param="max_tokens", code="context_length_exceeded")


def pair_fits(svc, where: str, ctx: list[int], cont: list[int]) -> None:
    """A scoring pair within the context."""
    limit = svc.config.max_sequence_length
    if len(ctx) + len(cont) > limit:
        raise ApiError(400, f"{where}: context ({len(ctx)} tokens) + continuation ({len(cont)}) exceeds the "
                       f"model's max_sequence_length {limit}", param=where, code="context_length_exceeded")


def need_tokenizer(svc, what: str):
    """The checkpoint's tokenizer, or a 400 for text sent to a checkpoint without one."""
    if svc.tokenizer is None:
        raise ApiError(400, f"{what} needs a tokenizer and this checkpoint has none (tokenizer.json); "
                       "send the prompt as a list of token ids", param="prompt", code="no_tokenizer")
    return svc.tokenizer


def request_id(value: str, what: str = "request_id") -> str:
    """A client's request id: 1..MAX_REQUEST_ID_CHARS printable ASCII characters (it is sent back as
    a header and written to the log)."""
    if not 0 < len(value) <= MAX_REQUEST_ID_CHARS or not all(" " <= ch <= "~" for ch in value):
        raise ApiError(400, f"{what} must be 1 to {MAX_REQUEST_ID_CHARS} printable ASCII characters, got "
                       f"{clip(value)}", param=what, code="invalid_value")
    return value


def vllm_extras(svc, req, limit: int) -> None:
    """stop_token_ids within the vocabulary, min_tokens within the answer's `limit`, priority within
    PRIORITY_RANGE."""
    if req.stop_token_ids:
        in_vocabulary(svc, req.stop_token_ids, "stop_token_ids")
    if req.min_tokens is not None and not 0 <= req.min_tokens <= limit:
        raise ApiError(400, f"min_tokens must be between 0 and max_tokens ({limit}), got {req.min_tokens}",
                       param="min_tokens", code="invalid_value")
    lo, hi = PRIORITY_RANGE
    if req.priority is not None and not lo <= req.priority <= hi:
        raise ApiError(400, f"priority must be an integer in [{lo}, {hi}] (lower is sooner), got {req.priority}",
                       param="priority", code="invalid_value")
