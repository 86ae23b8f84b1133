"""Server-sent events: OpenAI chunk objects and the per-step diffusion events."""

from __future__ import annotations

import json
import math

DONE = b"data: [DONE]\n\n"


def event(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def finite(x: float):
    """JSON has no infinities: non-finite confidences become null."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict,
               finish_reason: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


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
    }


def error_event(status: int, message: str, type_: str, code=None, param=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, "status": status}}
