"""Server-sent events: OpenAI chunks and the per-step diffusion events, and the two stream bodies.

`openai_stream` and `steps_stream` turn a Job's events into SSE bytes; `metered` wraps either one so
that the request is counted, logged and its engine work cancelled however the stream ends.
"""

from __future__ import annotations

import json
import logging
import math
import time

log = logging.getLogger("llada.server")

DONE = b"data: [DONE]\n\n"


def event(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def finite(x: float):
    """JSON has no infinities: non-finite confidences become null."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict,
               finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, created: int, model: str, obj: str, usage: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}


def step_event(index: int, ev, decoder) -> dict:
    """One denoising step of one choice (see the README, "The per-step stream")."""
    return {
        "object": "diffusion.step", "index": index, "step": ev.step, "block": ev.block,
        "positions": list(ev.positions), "token_ids": list(ev.token_ids),
        "tokens": [decoder.piece(t) for t in ev.token_ids],
        "confidences": [finite(round(c, 6)) for c in ev.confidences],
        "masks_remaining": ev.masks_remaining, "nfe": ev.nfe,
        # Exact parallel decoding: forwards so far and the steps the forward behind this step advanced.
        "forwards": ev.forwards if ev.forwards is not None else ev.nfe, "forward_steps": ev.forward_steps,
        # Token editing (LLaDA2.1): decoded positions that took a new token this step.
        "edited_positions": list(ev.edited_positions), "edited_token_ids": list(ev.edited_token_ids),
        "edited_tokens": [decoder.piece(t) for t in ev.edited_token_ids],
        "edited_confidences": [finite(round(c, 6)) for c in ev.edited_confidences],
    }


def error_event(status: int, message: str, type_: str, code=None, param=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, "status": status}}


def _end_with_error(job, state, err):
    """A stream's last events after a failure: the OpenAI error body, then [DONE]."""
    job.cancel()
    state["status"] = err.status
    return [event(error_event(err.status, err.message, err.type, err.code, err.param)), DONE]


def log_done(endpoint: str, status: int, job, t0: float, how: str = "") -> None:
    u = job.usage()
    log.info("%s %d%s: %d choice(s), %d prompt + %d generated tokens, %.3fs", endpoint, status, how,
             len(job.choices), u["prompt_tokens"], u["completion_tokens"], time.monotonic() - t0)


async def metered(gen, job, endpoint: str, t0: float):
    """Run a stream body; whatever ends it, cancel the job's leftovers and count the request."""
    metrics = job.svc.metrics
    state = {"status": 499}
    try:
        async for chunk in gen(state):
            yield chunk
    finally:
        job.cancel()
        status = state["status"]
        metrics.request_done(endpoint, status, time.monotonic() - t0)
        log_done(endpoint, status, job, t0, " (stream)")
        if status == 200:
            u = job.usage()
            metrics.usage(u["prompt_tokens"], u["completion_tokens"])


def openai_stream(job, request):
    """OpenAI chunks: text deltas as they become final, one finish chunk per choice, usage, [DONE]."""
    name = job.svc.name

    opts = job.req.stream_options
    continuous = opts is not None and bool(opts.continuous_usage_stats)

    async def gen(state):
        chat = job.kind == "chat"
        make = chat_chunk if chat else completion_chunk

        def mk(*args, **kw):
            chunk = make(*args, **kw)
            if continuous:
                chunk["usage"] = job.usage()
            return chunk
        if chat:
            for c in job.choices:
                yield event(mk(job.id, job.created, name, c.index, {"role": "assistant", "content": ""}))
        finished = set()

        def text_chunk(idx, text):
            # logprobs of the tokens whose text this chunk completes (see Job.logprobs_delta)
            return event(mk(job.id, job.created, name, idx, {"content": text} if chat else text,
                            logprobs=job.logprobs_delta(idx)))

        def finish_chunk(idx):
            finished.add(idx)
            a = job.choices[idx].answer
            return event(mk(job.id, job.created, name, idx, {} if chat else "", a.finish_reason,
                            logprobs=job.logprobs_delta(idx)))

        async for idx, kind, payload in job.events(request):
            if kind == "ping":
                yield b": keep-alive\n\n"
            elif kind == "delta":
                if payload:
                    yield text_chunk(idx, payload)
            elif kind == "finished":
                yield finish_chunk(idx)
            elif kind == "done":
                if idx in finished:
                    continue
                rest = job.choices[idx].on_done(payload.gen_ids)
                if rest:
                    yield text_chunk(idx, rest)
                yield finish_chunk(idx)
            elif kind == "error":
                for chunk in _end_with_error(job, state, payload):
                    yield chunk
                return
        if len(finished) < len(job.choices):
            return  # disconnected
        if opts is not None and opts.include_usage:
            obj = "chat.completion.chunk" if chat else "text_completion"
            yield event(usage_chunk(job.id, job.created, name, obj, job.usage()))
        state["status"] = 200
        yield DONE
    return gen


def steps_stream(job, request):
    """The per-step stream: diffusion.start per choice, diffusion.step events, diffusion.done, usage."""
    svc = job.svc

    async def gen(state):
        for c, h in zip(job.choices, job.handles):
            p = h.params
            yield event({
                "object": "diffusion.start", "id": job.id, "model": svc.name, "index": c.index,
                "prompt_tokens": len(h.prompt_ids), "gen_length": p.gen_length, "block_length": p.block,
                "steps": p.total_steps if p.threshold is None else None, "threshold": p.threshold,
                "max_tokens": c.max_tokens, "mask_token_id": svc.bundle.special.mask})
        done = 0
        async for idx, kind, payload in job.events(request):
            if kind == "ping":
                yield b": keep-alive\n\n"
            elif kind == "step":
                yield event(step_event(idx, payload, svc.decoder))
            elif kind == "done":
                c = job.choices[idx]
                c.on_done(payload.gen_ids)
                a = c.answer
                done += 1
                yield event({"object": "diffusion.done", "index": idx, "text": a.text,
                             "token_ids": a.ids, "finish_reason": a.finish_reason,
                             "completion_tokens": a.completion_tokens, "nfe": payload.nfe,
                             "forwards": payload.forwards,
                             "steps": payload.steps, "gen_ids": payload.gen_ids})
            elif kind == "error":
                for chunk in _end_with_error(job, state, payload):
                    yield chunk
                return
        if done < len(job.choices):
            return
        yield event({"object": "diffusion.usage", "id": job.id, "usage": job.usage()})
        state["status"] = 200
        yield DONE
    return gen
