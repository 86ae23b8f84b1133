"""Commit-time log-probabilities in OpenAI's response shapes.

For each answer token the engine reports the log-probability the model gave it in the step that
committed it (log-softmax of that step's logits at temperature 1, after the EOS ban and the
sampling filters: the distribution low-confidence remasking ranks by), the most likely alternatives
at that position and step, and the step number. Completions use the legacy shape (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`), chat the `content` list; both carry the steps in
a `llada` extension (`llada.steps` per completion, `llada.step` per chat token).
"""

from __future__ import annotations

import math


def _finite(x: float) -> float:
    """JSON has no -inf: a token the restricted distribution excluded gets the float minimum."""
    return x if math.isfinite(x) else -9999.0


def completion_logprobs(decoder, ids: list[int], info: list, text_start: int = 0,
                        prefix_ids: list[int] | None = None) -> dict:
    """The legacy completions `logprobs` object for `ids` (answer tokens, in order).

    `info[i]` is (step, logprob, [(token, logprob)]) for ids[i]. `prefix_ids`: answer tokens sent
    before these (a stream chunk), so that text offsets continue from them."""
    before = list(prefix_ids or [])
    tokens, lps, tops, offsets, steps = [], [], [], [], []
    for i, t in enumerate(ids):
        step, lp, top = info[i]
        offsets.append(text_start + len(decoder.text(before + ids[:i])))
        tokens.append(decoder.piece(t))
        lps.append(_finite(lp))
        alt = {}
        for tok, v in top:
            alt.setdefault(decoder.piece(tok), _finite(v))
        tops.append(alt)
        steps.append(step)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets,
            "llada": {"steps": steps}}


def chat_logprobs(decoder, ids: list[int], info: list) -> dict:
    """The chat `logprobs` object ({"content": [...]}) for `ids`."""
    content = []
    for i, t in enumerate(ids):
        step, lp, top = info[i]
        piece = decoder.piece(t)
        content.append({
            "token": piece, "logprob": _finite(lp), "bytes": list(piece.encode("utf-8")),
            "top_logprobs": [{"token": decoder.piece(a), "logprob": _finite(v),
                              "bytes": list(decoder.piece(a).encode("utf-8"))} for a, v in top],
            "llada": {"step": step}})
    return {"content": content}


def tokens_covered(decoder, ids: list[int], text_len: int) -> int:
    """How many leading answer tokens are fully inside the first `text_len` characters of the
    answer text (a stream chunk's logprobs cover exactly the tokens whose text it completes)."""
    k = 0
    while k < len(ids) and len(decoder.text(ids[:k + 1])) <= text_len:
        k += 1
    return k
