"""One HTTP request in flight: its sub-requests in the engine, their events, the whole response.

A request with several prompts and `n` choices becomes prompts x n engine handles. The engine thread
posts each handle's events to the job's asyncio queue; `Job.events` turns them into text deltas
(via `server.answer.Choice`), watches for a client that went away, and yields keep-alive pings.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid

from fastapi import Request

from sampler.scheduler import EngineError, Handle
from sampler.generate import cut_answer
from server.answer import Choice, Decoder
from server.infill import InfillChoice
from server.logprobs import chat_logprobs, completion_logprobs, tokens_covered
from server.errors import ApiError
from server.requests import check_fanout, sampling, stop_strings

DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks whether its client went away
KEEPALIVE_S = 15.0  # an SSE comment after this long without an event (proxies close idle streams)


class Job:
    """One HTTP request in flight: its sub-requests in the engine and their answers."""

    def __init__(self, svc, kind: str, req, prompts: list[list[int]], max_tokens, suffix_ids=None,
                 infills=None):
        """`suffix_ids`: fixed context after every prompt's span (OpenAI's suffix). `infills`: one
        InfillPrompt per prompt (the infill form; `prompts` are then their prefixes)."""
        self.svc = svc
        self.kind = kind  # "completions" or "chat"
        self.req = req
        self.prompts = prompts
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.created = int(time.time())
        self.id = ("cmpl-" if kind == "completions" else "chatcmpl-") + uuid.uuid4().hex[:24]
        n = check_fanout(svc, req, len(prompts))  # checked before tokenizing too; cheap
        stops = stop_strings(req)
        base_seed = req.seed if req.seed is not None else secrets.randbits(62)
        self.handles: list[Handle] = []
        self.choices: list[Choice] = []
        suffix = list(suffix_ids or [])
        self.prompt_tokens = sum(len(p) + len(suffix) for p in prompts)
        if infills is not None:
            self.prompt_tokens = sum(len(ip.prefix) + len(ip.span) - ip.masks + len(ip.suffix) for ip in infills)
        self.known: dict[int, list[int]] = {}   # per choice: the final prefix ids seen so far
        self.lp_sent: dict[int, int] = {}       # per choice: answer tokens whose logprobs were streamed
        stream_steps = bool(req.stream_steps)
        decoder = svc.decoder if req.skip_special_tokens is not False else Decoder(svc.tokenizer, skip_special=False)
        self.decoder = decoder
        for pi, p in enumerate(prompts):
            ip = infills[pi] if infills is not None else None
            for j in range(n):
                idx = pi * n + j
                if ip is not None:
                    sp = sampling(svc, req, None, len(ip.prefix) + len(ip.suffix), idx, base_seed, span=ip.span)
                    self.choices.append(InfillChoice(idx, decoder, ip))
                    self.handles.append(Handle(
                        prompt_ids=p, params=sp, sink=self._sink(idx), want_steps=stream_steps,
                        suffix_ids=list(ip.suffix), span_ids=list(ip.span)))
                    continue
                sp = sampling(svc, req, max_tokens, len(p) + len(suffix), idx, base_seed,
                              exact_length=suffix_ids is not None)
                answer_limit = max_tokens if max_tokens is not None else sp.gen_length
                answer_limit = min(answer_limit, sp.gen_length)
                self.choices.append(Choice(idx, decoder, svc.stop_ids, answer_limit, stops))
                self.handles.append(Handle(
                    prompt_ids=p, params=sp, sink=self._sink(idx), want_steps=stream_steps,
                    want_progress=bool(stops) or bool(req.stream), answer_limit=answer_limit,
                    suffix_ids=suffix))

    def _sink(self, idx):
        loop, q = self.loop, self.queue

        def put(item):
            loop.call_soon_threadsafe(q.put_nowait, (idx, item))
        return put

    def submit(self) -> None:
        try:
            self.svc.engine.submit(self.handles)
        except EngineError as e:
            raise ApiError.from_engine(e) from None

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()
        self.svc.engine.wake()

    def usage(self) -> dict:
        comp = sum(c.answer.completion_tokens if c.answer else c.tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": comp,
                "total_tokens": self.prompt_tokens + comp,
                "forwards": sum(h.forwards for h in self.handles)}

    async def events(self, request: Request | None = None):
        """Yield (index, kind, payload) until every sub-request is done; cancel on disconnect."""
        closed: set[int] = set()
        last = checked = time.monotonic()
        while len(closed) < len(self.handles):
            try:
                item = await asyncio.wait_for(self.queue.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                item = None
            now = time.monotonic()
            if request is not None and now - checked >= DISCONNECT_POLL_S:
                checked = now
                if await request.is_disconnected():
                    self.cancel()
                    return
            if item is None:
                if now - last >= KEEPALIVE_S:
                    last = now
                    yield None, "ping", None
                continue
            last = now
            idx, (kind, payload) = item
            if idx in closed:
                continue
            if kind in ("done", "error"):
                closed.add(idx)
            elif kind == "progress":
                ch = self.choices[idx]
                if ch.answer is not None:
                    continue
                self.known[idx] = payload
                delta = ch.on_progress(payload)
                if ch.answer is not None and not self.handles[idx].want_steps:
                    # A stop string ended it: nothing later can change the answer.
                    self.handles[idx].cancel()
                    self.svc.engine.wake()
                    closed.add(idx)
                    yield idx, "delta", delta
                    yield idx, "finished", None
                    continue
                payload = delta
                kind = "delta"
            yield idx, kind, payload

    async def collect(self, request: Request) -> dict | None:
        """The whole response body, or None when the client went away first."""
        error = None
        async for idx, kind, payload in self.events(request):
            if kind == "done":
                self.choices[idx].on_done(payload.gen_ids)
            elif kind == "error":
                error = payload
                self.cancel()  # the other sub-requests stop too (they send nothing more)
                break
        if error is not None:
            raise ApiError.from_engine(error)
        if any(c.answer is None for c in self.choices):
            return None
        return self.body()

    def logprobs(self, idx: int, start: int = 0, end: int | None = None) -> dict | None:
        """OpenAI's logprobs object for answer tokens [start, end) of choice idx (None when the
        request did not ask for logprobs)."""
        h, c = self.handles[idx], self.choices[idx]
        if h.params.logprobs is None or c.answer is None and end is None:
            return None
        ids = c.answer.ids if end is None else self.answer_ids(idx)
        end = len(ids) if end is None else end
        info = h.token_info[start:end]
        dec = self.decoder
        if self.kind == "completions":
            return completion_logprobs(dec, ids[start:end], info, prefix_ids=ids[:start])
        return chat_logprobs(dec, ids[start:end], info)

    def answer_ids(self, idx: int) -> list[int]:
        """The answer's ids as far as they are known (the whole answer once it is final)."""
        c = self.choices[idx]
        if c.answer is not None:
            return c.answer.ids
        return cut_answer(self.known.get(idx, []), self.svc.stop_ids, c.max_tokens)

    def logprobs_delta(self, idx: int) -> dict | None:
        """A stream chunk's logprobs: the answer tokens whose text has now been sent in full."""
        if self.handles[idx].params.logprobs is None:
            return None
        c = self.choices[idx]
        ids = self.answer_ids(idx)
        covered = len(ids) if c.answer is not None else tokens_covered(self.decoder, ids, len(c.sent))
        start = self.lp_sent.get(idx, 0)
        if covered <= start:
            return None
        self.lp_sent[idx] = covered
        return self.logprobs(idx, start, covered)

    def body(self) -> dict:
        choices = []
        for c in self.choices:
            a = c.answer
            lp = self.logprobs(c.index)
            if isinstance(c, InfillChoice):
                choices.append({"index": c.index, "text": a.text, "logprobs": None, "finish_reason": "stop",
                                "token_ids": a.ids, "llada": {"gaps": c.filled["gaps"]}})
            elif self.kind == "completions":
                choices.append({"index": c.index, "text": a.text, "logprobs": lp,
                                "finish_reason": a.finish_reason, "token_ids": a.ids})
            else:
                choices.append({"index": c.index, "message": {"role": "assistant", "content": a.text},
                                "logprobs": lp, "finish_reason": a.finish_reason})
        obj = "text_completion" if self.kind == "completions" else "chat.completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.svc.name,
                "choices": choices, "usage": self.usage()}
