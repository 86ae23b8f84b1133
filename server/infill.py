"""Infilling requests: OpenAI's `suffix`, and the explicit form (`infill: true`) with marked gaps.

`suffix`: the canvas is prompt ++ max_tokens masks ++ suffix; the suffix is fixed context every
step attends to and the answer is the span, cut as any answer.

`infill: true`: the prompt marks each position to fill with the marker `<|mdm_mask|>` (in text)
or the mask token id (in a token-id prompt); one marker is one token. The canvas is the prompt
itself: the context before the first marker, the span from the first to the last marker (fixed
tokens between gaps stay as they are), the context after it. The span is one block; by default
one step per marked position. The response gives the whole text with the gaps filled and, per gap
(a maximal run of markers), its position in the prompt's tokens, its filled ids and their text.
"""

from __future__ import annotations

from dataclasses import dataclass

from server import checks
from server.answer import Answer, BaseChoice
from server.errors import ApiError

MARKER = "<|mdm_mask|>"


@dataclass
class InfillPrompt:
    prefix: list[int]     # context before the span
    span: list[int]       # mask ids at the gaps, fixed tokens elsewhere
    suffix: list[int]     # context after the span
    gaps: list[tuple[int, int]]  # (start in the span, length) per run of masks

    @property
    def masks(self) -> int:
        return sum(n for _, n in self.gaps)


def marked_ids(svc, prompt, mask_id: int) -> list[int]:
    """Token ids of an infill prompt: text split at the marker (each piece tokenised on its own,
    the marker becoming the mask id), or token ids as given."""
    if isinstance(prompt, str):
        tok = checks.need_tokenizer(svc, "a text prompt")
        ids: list[int] = []
        for i, piece in enumerate(prompt.split(MARKER)):
            if i:
                ids.append(mask_id)
            if piece:
                ids.extend(tok.encode(piece))
        return ids
    return list(prompt)


def check_infill(req) -> None:
    """Fields that have no meaning for the infill form, refused with a 400 naming them."""
    why = {
        "stream": "the infill form answers once (or with stream_steps): its gaps do not form a text "
                  "that grows from the left",
        "logprobs": "logprobs are reported for completions, not for the infill form",
        "suffix": "the infill form takes its context after the gaps from the prompt; suffix is for "
                  "the plain completion",
        "max_tokens": "the infill form fills exactly the marked positions; max_tokens does not apply",
        "stop": "the infill form fills exactly the marked positions; stop does not apply",
    }
    for name, message in why.items():
        if getattr(req, name, None):
            raise ApiError(400, message, param=name, code="unsupported_parameter")


def infill_prompts(svc, items: list) -> list[InfillPrompt]:
    """Each prompt of an infill request split into context, span and context (call it off the
    event loop: text is tokenized)."""
    mask = svc.bundle.special.mask
    out = []
    for x in items:
        if isinstance(x, str):
            checks.fits_context(svc, "prompt", chars=len(x))
        ids = checks.token_ids(svc, marked_ids(svc, x, mask), mask_ok=True)
        out.append(split_infill(ids, mask))
    return out


def suffix_ids(svc, text: str) -> list[int]:
    """OpenAI's `suffix`: text, tokenized (it needs the checkpoint's tokenizer)."""
    tok = checks.need_tokenizer(svc, "suffix")
    checks.fits_context(svc, "suffix", chars=len(text))
    return tok.encode(text)


def split_infill(ids: list[int], mask_id: int, what: str = "prompt") -> InfillPrompt:
    where = [i for i, t in enumerate(ids) if t == mask_id]
    if not where:
        raise ApiError(400, f"infill: the {what} marks no position to fill (write {MARKER} where a token "
                       "goes, once per token, or the mask token id in a token-id prompt)", param=what,
                       code="invalid_value")
    lo, hi = where[0], where[-1] + 1
    span = ids[lo:hi]
    gaps, i = [], 0
    while i < len(span):
        if span[i] == mask_id:
            j = i
            while j < len(span) and span[j] == mask_id:
                j += 1
            gaps.append((i, j - i))
            i = j
        else:
            i += 1
    return InfillPrompt(ids[:lo], span, ids[hi:], gaps)


def _literal(decoder, ids) -> str:
    """Text of ids with special tokens written out: the prompt comes back as it was sent."""
    if decoder.tokenizer is None:
        return decoder.text(ids)
    return decoder.tokenizer.decode(list(ids), skip_special_tokens=False)


def infill_choice(decoder, ip: InfillPrompt, gen_ids: list[int]) -> dict:
    """The prompt's text with every gap filled (special tokens written out, so it reads as the
    prompt did) and the filled ids and text per gap."""
    whole = ip.prefix + list(gen_ids) + ip.suffix
    gaps = []
    for g, (start, n) in enumerate(ip.gaps):
        ids = list(gen_ids[start:start + n])
        gaps.append({"index": g, "position": len(ip.prefix) + start, "token_ids": ids,
                     "text": _literal(decoder, ids)})
    return {"text": _literal(decoder, whole), "token_ids": list(gen_ids), "gaps": gaps}


class InfillChoice(BaseChoice):
    """A choice of an infill request: the whole span at once when it is done (no text grows from the
    left, so progress sends nothing), with the filled gaps in its body."""

    reports_logprobs = False

    def __init__(self, index: int, decoder, ip: InfillPrompt):
        super().__init__(index, decoder, len(ip.span))
        self.ip = ip
        self.filled: dict | None = None

    def on_progress(self, prefix_ids) -> str:
        return ""

    def on_done(self, gen_ids) -> str:
        self.filled = infill_choice(self.decoder, self.ip, list(gen_ids))
        self.answer = Answer(ids=list(gen_ids), text=self.filled["text"], finish_reason="stop",
                             completion_tokens=self.ip.masks)
        self.sent = self.answer.text
        return self.answer.text

    def body_extra(self) -> dict:
        return {"llada": {"gaps": self.filled["gaps"]}}
