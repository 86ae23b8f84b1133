"""One HTTP request in flight: its sub-requests in the engine, their events, the whole response.

A request with several prompts and `n` choices becomes prompts x n engine handles. The engine thread
posts each handle's events to the job's asyncio queue; `Job.events` turns them into text deltas
(via `server.answer.Choice`), watches for a client that went away, and yields keep-alive pings.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import Request

from sampler.scheduler import EngineError, Handle
from sampler.generate import cut_answer
from server.answer import BaseChoice, TokenIdPieces
from server.endpoints import Endpoint
from server.logprobs import tokens_covered
from server.errors import ApiError

DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks whether its client went away
KEEPALIVE_S = 15.0  # an SSE comment after this long without an event (proxies close idle streams)


class Job:
    """One HTTP request in flight: its sub-requests in the engine and their answers."""

    def __init__(self, svc, endpoint: Endpoint, req, plan):
        """`plan`: the request's checked generations (server.requests.plan)."""
        self.svc = svc
        self.endpoint = endpoint
        self.req = req
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.created = int(time.time())
        self.id = endpoint.new_id()
        self.prompt_tokens = plan.prompt_tokens
        self.decoder = plan.decoder
        # logprobs name tokens by their text, or as `token_id:N` (return_tokens_as_token_ids)
        self.pieces = TokenIdPieces(plan.decoder) if getattr(req, "return_tokens_as_token_ids", None) else plan.decoder
        self.known: dict[int, list[int]] = {}   # per choice: the final prefix ids seen so far
        self.lp_sent: dict[int, int] = {}       # per choice: answer tokens whose logprobs were streamed
        self.choices: list[BaseChoice] = plan.choices
        self.handles: list[Handle] = plan.handles
        for c, h in zip(self.choices, self.handles):
            h.sink = self._sink(c.index)

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
        if h.params.logprobs is None or not c.reports_logprobs or c.answer is None and end is None:
            return None
        ids = c.answer.ids if end is None else self.answer_ids(idx)
        end = len(ids) if end is None else end
        return self.endpoint.logprobs(self.pieces, ids[start:end], h.token_info[start:end], ids[:start])

    def answer_ids(self, idx: int) -> list[int]:
        """The answer's ids as far as they are known (the whole answer once it is final)."""
        c = self.choices[idx]
        if c.answer is not None:
            return c.answer.ids
        return cut_answer(self.known.get(idx, []), getattr(c, "stop_ids", self.svc.stop_ids), c.max_tokens,
                          getattr(c, "min_tokens", 0))

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
        choices = [self.endpoint.choice(c, self.logprobs(c.index)) for c in self.choices]
        return self.endpoint.body(self.id, self.created, self.svc.name, choices, self.usage())
