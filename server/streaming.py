"""Server-sent events: OpenAI chunks and the per-step diffusion events, and the two stream bodies.

`openai_stream` and `steps_stream` turn a Job's events into SSE bytes; `metered` wraps either one so
that the request is counted, logged and its engine work cancelled however the stream ends.
"""

from __future__ import annotations

import json
import math

from server.errors import ApiError

DONE = b"data: [DONE]\n\n"


def event(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def finite(x: float):
    """JSON has no infinities: non-finite confidences become null."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


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


def _end_with_error(job, state, engine_error):
    """A stream's last events after a failure: the OpenAI error body, then [DONE]."""
    err = ApiError.from_engine(engine_error)
    job.cancel()
    state.status = err.status
    return [event(error_event(err.status, err.message, err.type, err.code, err.param)), DONE]


async def metered(gen, job, rec):
    """Run a stream body; whatever ends it, cancel the job's leftovers. `rec` (the request's
    Outcome) holds how it ended: 499 until the stream completes or fails."""
    rec.status, rec.how = 499, " (stream)"
    try:
        async for chunk in gen(rec):
            yield chunk
    finally:
        job.cancel()


def openai_stream(job, request):
    """OpenAI chunks: text deltas as they become final, one finish chunk per choice, usage, [DONE]."""
    name, ep = job.svc.name, job.endpoint
    opts = job.req.stream_options
    continuous = opts is not None and bool(opts.continuous_usage_stats)

    def mk(chunk):
        if continuous:
            chunk["usage"] = job.usage()
        return event(chunk)

    async def gen(state):
        if ep.opens_with_role:
            for c in job.choices:
                yield mk(ep.role_chunk(job.id, job.created, name, c.index))
        finished = set()

        def text_chunk(idx, text):
            if isinstance(text, list):  # a choice's own delta objects (tool calls: server.tools)
                return b"".join(mk(ep.chunk(job.id, job.created, name, idx, d)) for d in text)
            # logprobs of the tokens whose text this chunk completes (see Job.logprobs_delta)
            return mk(ep.chunk(job.id, job.created, name, idx, text, logprobs=job.logprobs_delta(idx)))

        def finish_chunk(idx):
            finished.add(idx)
            a = job.choices[idx].answer
            return mk(ep.chunk(job.id, job.created, name, idx, None, a.finish_reason,
                               logprobs=job.logprobs_delta(idx), stop_reason=job.choices[idx].stop_reason))

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
            yield event(ep.usage_chunk(job.id, job.created, name, job.usage()))
        state.status = 200
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
                             "token_ids": a.ids, "finish_reason": a.finish_reason, "stop_reason": c.stop_reason,
                             "completion_tokens": a.completion_tokens, "nfe": payload.nfe,
                             **({"tool_calls": a.tool_calls} if a.tool_calls else {}),
                             "forwards": payload.forwards,
                             "steps": payload.steps, "gen_ids": payload.gen_ids})
            elif kind == "error":
                for chunk in _end_with_error(job, state, payload):
                    yield chunk
                return
        if done < len(job.choices):
            return
        yield event({"object": "diffusion.usage", "id": job.id, "usage": job.usage()})
        state.status = 200
        yield DONE
    return gen
