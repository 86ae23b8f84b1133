"""From generated ids to the answer a client sees, identically for streamed and whole responses.

The answer is the generated span cut at the first EOS/EoT id and at `max_tokens` ids, decoded,
then cut before the first stop string (the match that ends first; on a tie the longer one).
While a request runs, only its final prefix (the unmasked run at the start of the span) is known;
`Choice.on_progress` turns each longer prefix into the text that can be sent without ever having
to take it back: it holds back a trailing partial UTF-8 character and any tail that could still
grow into a stop string. Deltas therefore concatenate to exactly the whole answer.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

from sampler.generate import cut_answer

log = logging.getLogger("llada.server")


class Decoder:
    """Token ids -> text. Without a tokenizer each id is written as `<id>`. skip_special=False keeps
    special tokens (EOS/EoT included) in the text."""

    def __init__(self, tokenizer=None, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special

    def text(self, ids) -> str:
        ids = list(ids)
        if not ids:
            return ""
        if self.tokenizer is None:
            return "".join(f"<{i}>" for i in ids)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def piece(self, i: int) -> str:
        """One token's own text (special tokens shown by name), for the per-step canvas."""
        if self.tokenizer is None:
            return f"<{i}>"
        return self.tokenizer.decode([i], skip_special_tokens=False)


class TokenIdPieces(Decoder):
    """A decoder whose per-token pieces are `token_id:N` (return_tokens_as_token_ids): the
    logprobs name tokens by id, the text stays the text."""

    def __init__(self, decoder: Decoder):
        super().__init__(decoder.tokenizer, decoder.skip_special)

    def piece(self, i: int) -> str:
        return f"token_id:{i}"


@dataclass
class Answer:
    ids: list[int]
    text: str
    finish_reason: str
    completion_tokens: int
    tool_calls: list[dict] | None = None  # a chat answer read as calls (server.tools.ToolChoice)


def find_stop(text: str, stops: list[str], after: int = 0) -> tuple[int, str] | None:
    """(start, stop string) of the stop-string match that ends first (ties: the longer match), or
    None. Only matches that end past character `after` count (min_tokens: the text of the first
    min_tokens tokens cannot end the answer)."""
    best = None  # (end, -length, start, stop)
    for s in stops:
        i = text.find(s, max(0, after - len(s) + 1))
        if i >= 0:
            key = (i + len(s), -len(s), i, s)
            if best is None or key < best:
                best = key
    return None if best is None else (best[2], best[3])


def stop_tail(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class BaseChoice(ABC):
    """What every kind of choice (a plain answer, an infill) is to the job, the stream and the body:
    its index, the answer once final, the tokens known so far, the text sent so far, and the two
    events that move it on. A new kind implements the whole of it."""

    reports_logprobs = True  # whether the body's logprobs describe this choice's answer
    stop_reason: str | int | None = None  # the stop string or client stop id that ended it

    def __init__(self, index: int, decoder: Decoder, max_tokens: int):
        self.index = index
        self.decoder = decoder
        self.max_tokens = max_tokens  # answer tokens at most (the per-step stream's start event)
        self.sent = ""                # text streamed so far
        self.tokens = 0               # answer tokens known so far (usage of a stream cut short)
        self.answer: Answer | None = None

    @abstractmethod
    def on_progress(self, prefix_ids) -> str:
        """A longer final prefix is known: the text now safe to send (may be empty)."""

    @abstractmethod
    def on_done(self, gen_ids) -> str:
        """The request finished: sets `answer`; returns the text not sent yet."""

    def body_extra(self) -> dict:
        """Fields this kind adds to its choice in the whole body."""
        return {}


class Choice(BaseChoice):
    """The answer of one sub-request as it becomes known.

    `stop_ids`: the ids that end it (the model's EOS/EoT unless ignore_eos, plus the request's
    stop_token_ids, `client_stop_ids`); `min_tokens`: no stop id or stop string ends it before that
    many tokens; `include_stop`: the stop string (or stop id) that ended it stays in the answer.
    `stop_reason`: the stop string or client stop id that ended it (None: EOS/EoT or the length)."""

    def __init__(self, index: int, decoder: Decoder, stop_ids, max_tokens: int, stops: list[str],
                 client_stop_ids=(), min_tokens: int = 0, include_stop: bool = False):
        super().__init__(index, decoder, max_tokens)
        self.stop_ids = set(stop_ids) | set(client_stop_ids)
        self.client_stop_ids = set(client_stop_ids)
        self.stops = [s for s in stops if s]
        self.min_tokens = min_tokens
        self.include_stop = include_stop
        self.stop_reason: str | int | None = None

    def _cut_ids(self, ids) -> tuple[list[int], bool]:
        """(answer ids, ended by a stop id) for a run of known ids. A decoder that keeps special
        tokens (or include_stop) keeps the stop id that ended the answer too (within max_tokens)."""
        out = cut_answer(ids, self.stop_ids, self.max_tokens, self.min_tokens)
        stopped = len(out) < len(ids) and ids[len(out)] in self.stop_ids
        if stopped:
            self.stop_reason = ids[len(out)] if ids[len(out)] in self.client_stop_ids else None
            if (self.include_stop or not self.decoder.skip_special) and len(out) < self.max_tokens:
                out = out + [ids[len(out)]]
        self.tokens = max(self.tokens, len(out))
        return out, stopped

    def _stop_match(self, ids: list[int], text: str) -> tuple[int, str] | None:
        """The stop string that ends the answer in `text` (the decoded `ids`), if any."""
        if not self.stops or len(ids) < self.min_tokens:
            return None
        after = len(self.decoder.text(ids[:self.min_tokens])) if self.min_tokens else 0
        return find_stop(text, self.stops, after)

    def _finalize(self, ids: list[int], stopped: bool, text: str, match: tuple[int, str] | None) -> Answer:
        reason = "stop" if stopped or match is not None else "length"
        tokens = len(ids)
        if match is not None:
            self.stop_reason = match[1]
            cut = match[0] + (len(match[1]) if self.include_stop else 0)
            text = text[:cut]
            # tokens spent on the text kept: the shortest id prefix whose text covers it
            tokens = next((k for k in range(len(ids) + 1) if len(self.decoder.text(ids[:k])) >= cut), len(ids))
        return Answer(ids=ids[:tokens] if match is not None else ids, text=text, finish_reason=reason,
                      completion_tokens=tokens)

    def _delta(self, text: str) -> str:
        if not text.startswith(self.sent):
            # Cannot happen with a prefix-consistent decoder; never resend what was sent.
            log.warning("choice %d: decoded text no longer extends what was streamed", self.index)
            return ""
        d = text[len(self.sent):]
        self.sent = text
        return d

    def on_progress(self, prefix_ids) -> str:
        """A longer final prefix is known: the text that is now safe to send (may be empty)."""
        if self.answer is not None:
            return ""
        ids, stopped = self._cut_ids(prefix_ids)
        complete = stopped or len(ids) >= self.max_tokens
        text = self.decoder.text(ids)
        match = self._stop_match(ids, text)
        if match is not None or complete:
            self.answer = self._finalize(ids, stopped, text, match)
            return self._delta(self.answer.text)
        safe = text
        while safe.endswith("\ufffd"):
            safe = safe[:-1]
        hold = stop_tail(safe, self.stops)
        if hold:
            safe = safe[:-hold]
        if len(safe) <= len(self.sent):
            return ""
        return self._delta(safe)

    def on_done(self, gen_ids) -> str:
        """The request finished (or left early with a final prefix): the rest of the answer."""
        if self.answer is None:
            known = []
            for t in gen_ids:
                if t is None:
                    break
                known.append(t)
            ids, stopped = self._cut_ids(known)
            text = self.decoder.text(ids)
            self.answer = self._finalize(ids, stopped, text, self._stop_match(ids, text))
        return self._delta(self.answer.text)

