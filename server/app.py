"""The FastAPI application: OpenAI-compatible endpoints over the continuous-batching engine.

`create_app(bundle, engine_config, ...)` builds a complete app around any loaded ModelBundle, so
tests and the CLI share one code path. The engine thread starts with the app's lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sampler.params import MAX_SEED, ParamError, SamplingParams
from sampler.scheduler import Engine, EngineConfig, EngineError, Handle, QueueFull
from server import sse
from server.answer import Choice, Decoder
from server.guards import Guards, default_max_body_bytes
from server.metrics import CONTENT_TYPE, Metrics
from server.schemas import ChatCompletionRequest, CompletionRequest, refused_field

log = logging.getLogger("llada.server")
STATIC = Path(__file__).resolve().parent / "static"
SEED_STRIDE = 0x9E3779B97F4A7C15
DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks whether its client went away
KEEPALIVE_S = 15.0  # an SSE comment after this long without an event (proxies close idle streams)


@dataclass
class ServerLimits:
    max_n: int = 16                 # choices per request
    default_max_tokens: int = 128   # when the request gives none
    default_block_length: int = 32
    max_stop: int = 16              # stop strings per request


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    @classmethod
    def from_engine(cls, e: EngineError) -> "ApiError":
        headers = None
        if isinstance(e, QueueFull):
            headers = {"Retry-After": str(max(1, math.ceil(e.retry_after)))}
        return cls(e.status, e.message, e.type, e.param, e.code, headers)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status, message, type_="invalid_request_error", param=None, code=None, headers=None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def derive_seed(base: int, i: int) -> int:
    return base if i == 0 else (base + i * SEED_STRIDE) % (MAX_SEED + 1)


def _pydantic_error(e) -> ApiError:
    errs = e.errors()
    first = errs[0] if errs else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        msg = f"unknown field {param!r} (this server refuses fields it does not understand)"
    elif param:
        msg = f"{param}: {msg}"
    return ApiError(400, msg, param=param, code="invalid_value")


class Service:
    """What the handlers share: the model bundle, the engine, metrics, limits."""

    def __init__(self, bundle, engine: Engine, metrics: Metrics, served_name: str, api_key: str | None,
                 limits: ServerLimits, shutdown_grace: float):
        self.bundle = bundle
        self.engine = engine
        self.metrics = metrics
        self.name = served_name
        self.api_key = api_key
        self.limits = limits
        self.shutdown_grace = shutdown_grace
        self.tokenizer = bundle.tokenizer
        self.decoder = Decoder(bundle.tokenizer)
        self.config = bundle.config
        self.stop_ids = list(bundle.special.stop)
        self.created = int(time.time())

    # ---------------------------------------------------------------- request checks
    def check_auth(self, request: Request) -> None:
        if not self.api_key:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
        if not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                           code="missing_api_key")
        if not secrets.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "invalid API key", "authentication_error", code="invalid_api_key")

    async def parse(self, request: Request, model_cls):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            req = model_cls.model_validate(data)
        except ValidationError as e:
            raise _pydantic_error(e) from None
        refused = refused_field(req)
        if refused:
            raise ApiError(400, refused[1], param=refused[0], code="unsupported_parameter")
        if req.model is not None and req.model != self.name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")
        return req

    def _check_ids(self, ids, what="prompt") -> list[int]:
        if not ids:
            raise ApiError(400, f"the {what} is empty", param=what, code="empty_prompt")
        vocab = self.config.embedding_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ApiError(400, f"token id {t!r} is outside the vocabulary [0, {vocab})", param=what,
                               code="invalid_token_id")
        return list(ids)

    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ApiError(400, f"{what} needs a tokenizer and this checkpoint has none (tokenizer.json); "
                           "send the prompt as a list of token ids", param="prompt", code="no_tokenizer")
        return self.tokenizer

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if p is None or (isinstance(p, (str, list)) and len(p) == 0):
            raise ApiError(400, "the prompt is empty", param="prompt", code="empty_prompt")
        if isinstance(p, str):
            items = [p]
        elif all(isinstance(x, int) for x in p):
            return [self._check_ids(p)]
        else:
            items = p
        prompts = []
        for x in items:
            if isinstance(x, str):
                if not x:
                    raise ApiError(400, "the prompt is empty", param="prompt", code="empty_prompt")
                tok = self._need_tokenizer("a text prompt")
                prompts.append(self._check_ids(tok.encode(x)))
            else:
                prompts.append(self._check_ids(x))
        return prompts

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if not req.messages:
            raise ApiError(400, "messages is empty", param="messages", code="empty_prompt")
        tok = self._need_tokenizer("chat")
        msgs = []
        for m in req.messages:
            c = m.content
            if isinstance(c, list):
                parts = []
                for part in c:
                    if part.type != "text":
                        raise ApiError(400, f"content parts of type {part.type!r} are not supported",
                                       param="messages", code="unsupported_content")
                    parts.append(part.text or "")
                c = "".join(parts)
            msgs.append({"role": m.role, "content": c or ""})
        from weights.tokenizer import TemplateError

        try:
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
        except TemplateError as e:
            raise ApiError(400, str(e), param="messages", code="template_error") from None
        return self._check_ids(ids, "messages")

    def sampling(self, req, max_tokens: int | None, prompt_len: int, index: int, base_seed: int) -> SamplingParams:
        lim = self.limits
        if max_tokens is None:
            max_tokens = min(lim.default_max_tokens, max(1, self.config.max_sequence_length - prompt_len))
        if isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens",
                           code="invalid_value")
        if req.block_length is not None:
            block = req.block_length
            if block < 1:
                raise ApiError(400, f"block_length must be >= 1, got {block}", param="block_length",
                               code="invalid_value")
        else:
            block = min(lim.default_block_length, max_tokens)
        gen_length = -(-max_tokens // block) * block
        sp = SamplingParams(
            gen_length=gen_length, block_length=block, steps=req.steps,
            temperature=0.0 if req.temperature is None else req.temperature,
            remasking=req.remasking or "low_confidence",
            cfg_scale=0.0 if req.cfg_scale is None else req.cfg_scale,
            threshold=req.threshold, cache=req.cache or "none",
            seed=derive_seed(base_seed, index), ban_eos=req.ban_eos, defer_eos=req.defer_eos)
        try:
            if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
                raise ParamError("seed", f"seed must be an integer in [0, 2**63), got {req.seed}")
            sp.validate(prompt_len, self.config.max_sequence_length)
        except ParamError as e:
            raise ApiError(400, str(e), param=e.field, code="invalid_value") from None
        try:
            self.engine.check_fits(prompt_len, sp)
        except EngineError as e:
            raise ApiError.from_engine(e) from None
        return sp


def _stops(req, limits: ServerLimits) -> list[str]:
    s = req.stop
    if s is None:
        return []
    stops = [s] if isinstance(s, str) else list(s)
    if len(stops) > limits.max_stop:
        raise ApiError(400, f"at most {limits.max_stop} stop strings, got {len(stops)}", param="stop",
                       code="invalid_value")
    return [x for x in stops if x]


class Job:
    """One HTTP request in flight: its sub-requests in the engine and their answers."""

    def __init__(self, svc: Service, kind: str, req, prompts: list[list[int]], max_tokens):
        self.svc = svc
        self.kind = kind  # "completions" or "chat"
        self.req = req
        self.prompts = prompts
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.created = int(time.time())
        self.id = ("cmpl-" if kind == "completions" else "chatcmpl-") + uuid.uuid4().hex[:24]
        n = req.n
        lim = svc.limits
        if isinstance(n, bool) or not 1 <= n <= lim.max_n:
            raise ApiError(400, f"n must be between 1 and {lim.max_n}, got {n}", param="n", code="invalid_value")
        stops = _stops(req, lim)
        base_seed = req.seed if req.seed is not None else secrets.randbits(62)
        self.handles: list[Handle] = []
        self.choices: list[Choice] = []
        self.prompt_tokens = sum(len(p) for p in prompts)
        stream_steps = bool(req.stream_steps)
        for pi, p in enumerate(prompts):
            for j in range(n):
                idx = pi * n + j
                sp = svc.sampling(req, max_tokens, len(p), idx, base_seed)
                answer_limit = max_tokens if max_tokens is not None else sp.gen_length
                answer_limit = min(answer_limit, sp.gen_length)
                self.choices.append(Choice(idx, svc.decoder, svc.stop_ids, answer_limit, stops))
                self.handles.append(Handle(
                    prompt_ids=p, params=sp, sink=self._sink(idx), want_steps=stream_steps,
                    want_progress=bool(stops) or bool(req.stream), answer_limit=answer_limit))
        if len(self.handles) > svc.engine.config.max_queue:
            raise ApiError(400, f"the request asks for {len(self.handles)} generations; this server queues at "
                           f"most {svc.engine.config.max_queue}", param="n", code="invalid_value")

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
        comp = sum(c.answer.completion_tokens for c in self.choices if c.answer)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": comp,
                "total_tokens": self.prompt_tokens + comp}

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


def create_app(bundle, engine_config: EngineConfig | None = None, *, served_model_name: str | None = None,
               api_key: str | None = None, limits: ServerLimits | None = None, metrics: Metrics | None = None,
               shutdown_grace: float = 30.0, engine: Engine | None = None, max_body_bytes: int | None = None,
               body_timeout: float | None = 30.0, allowed_hosts: list[str] | None = None) -> FastAPI:
    metrics = metrics or Metrics()
    metrics.device = bundle.model.device
    engine = engine or Engine(bundle.model, bundle.special, engine_config or EngineConfig(), metrics=metrics)
    svc = Service(bundle, engine, metrics, served_model_name or bundle.name or "llada", api_key,
                  limits or ServerLimits(), shutdown_grace)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown, min(5.0, svc.shutdown_grace))

    app = FastAPI(title="llada-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc
    app.state.engine = engine
    app.state.metrics = metrics
    app.add_middleware(Guards, max_body_bytes=max_body_bytes or default_max_body_bytes(svc.config.max_sequence_length),
                       body_timeout=body_timeout, allowed_hosts=allowed_hosts, engine=engine, metrics=metrics,
                       metered=("/v1/completions", "/v1/chat/completions"))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        return _pydantic_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        t = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), t)

    @app.exception_handler(Exception)
    async def _unhandled(request, exc):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal server error", "server_error")

    # ------------------------------------------------------------------ operator endpoints
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if engine.alive and engine.accepting:
            return {"status": "ready", "model": svc.name}
        return JSONResponse({"status": "not ready"}, status_code=503)

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/")
    @app.get("/playground")
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    # ------------------------------------------------------------------ API
    @app.get("/v1/models")
    async def models(request: Request):
        try:
            svc.check_auth(request)
        except ApiError as e:
            return e.response()
        tok = svc.tokenizer
        return {"object": "list", "data": [{
            "id": svc.name, "object": "model", "created": svc.created, "owned_by": "llada-serve",
            "max_model_len": svc.config.max_sequence_length,
            "llada": {"tokenizer": tok is not None, "chat_template": bool(tok is not None and tok.chat_template),
                      "vocab_size": svc.config.vocab_size, "mask_token_id": bundle.special.mask,
                      "stop_token_ids": svc.stop_ids}}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(request, "chat")

    async def _serve(request: Request, kind: str):
        endpoint = "/v1/completions" if kind == "completions" else "/v1/chat/completions"
        t0 = time.monotonic()
        try:
            svc.check_auth(request)
            if kind == "completions":
                req = await svc.parse(request, CompletionRequest)
                prompts = svc.completion_prompts(req)
                max_tokens = req.max_tokens
            else:
                req = await svc.parse(request, ChatCompletionRequest)
                prompts = [svc.chat_prompt(req)]
                max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            job = Job(svc, kind, req, prompts, max_tokens)
            job.submit()
        except ApiError as e:
            metrics.request_done(endpoint, e.status)
            log.info("%s %d: %s", endpoint, e.status, e.message)
            return e.response()
        if req.stream or req.stream_steps:
            gen = _stream_steps(job, request) if req.stream_steps else _stream_openai(job, request)
            return StreamingResponse(_metered(gen, job, endpoint, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            body = await _collect(job, request)
        except ApiError as e:
            metrics.request_done(endpoint, e.status)
            return e.response()
        if body is None:  # the client went away
            metrics.request_done(endpoint, 499)
            return Response(status_code=499)
        metrics.request_done(endpoint, 200, time.monotonic() - t0)
        metrics.usage(body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
        _log_done(endpoint, 200, job, t0)
        return body

    def _log_done(endpoint: str, status: int, job: Job, t0: float, how: str = "") -> None:
        u = job.usage()
        log.info("%s %d%s: %d choice(s), %d prompt + %d generated tokens, %.3fs", endpoint, status, how,
                 len(job.choices), u["prompt_tokens"], u["completion_tokens"], time.monotonic() - t0)

    async def _collect(job: Job, request: Request):
        error = None
        async for idx, kind, payload in job.events(request):
            if kind == "done":
                job.choices[idx].on_done(payload.gen_ids)
            elif kind == "error":
                error = payload
                job.cancel()  # the other sub-requests stop too (they send nothing more)
                break
        if error is not None:
            raise ApiError.from_engine(error)
        if any(c.answer is None for c in job.choices):
            return None
        return _body(job)

    def _body(job: Job) -> dict:
        choices = []
        for c in job.choices:
            a = c.answer
            if job.kind == "completions":
                choices.append({"index": c.index, "text": a.text, "logprobs": None,
                                "finish_reason": a.finish_reason, "token_ids": a.ids})
            else:
                choices.append({"index": c.index, "message": {"role": "assistant", "content": a.text},
                                "logprobs": None, "finish_reason": a.finish_reason})
        obj = "text_completion" if job.kind == "completions" else "chat.completion"
        return {"id": job.id, "object": obj, "created": job.created, "model": svc.name,
                "choices": choices, "usage": job.usage()}

    async def _metered(gen, job: Job, endpoint: str, t0: float):
        state = {"status": 499}
        try:
            async for chunk in gen(state):
                yield chunk
        finally:
            job.cancel()
            status = state["status"]
            metrics.request_done(endpoint, status, time.monotonic() - t0)
            _log_done(endpoint, status, job, t0, " (stream)")
            if status == 200:
                u = job.usage()
                metrics.usage(u["prompt_tokens"], u["completion_tokens"])

    def _stream_openai(job: Job, request: Request):
        async def gen(state):
            chat = job.kind == "chat"
            mk = sse.chat_chunk if chat else sse.completion_chunk
            if chat:
                for c in job.choices:
                    yield sse.event(mk(job.id, job.created, svc.name, c.index, {"role": "assistant", "content": ""}))
            finished = set()

            def text_chunk(idx, text):
                return sse.event(mk(job.id, job.created, svc.name, idx, {"content": text} if chat else text))

            def finish_chunk(idx):
                finished.add(idx)
                a = job.choices[idx].answer
                return sse.event(mk(job.id, job.created, svc.name, idx, {} if chat else "", a.finish_reason))

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
            opts = job.req.stream_options
            if opts is not None and opts.include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield sse.event(sse.usage_chunk(job.id, job.created, svc.name, obj, job.usage()))
            state["status"] = 200
            yield sse.DONE
        return gen

    def _end_with_error(job: Job, state, err):
        """A stream's last events after a failure: the OpenAI error body, then [DONE]."""
        job.cancel()
        state["status"] = err.status
        return [sse.event(sse.error_event(err.status, err.message, err.type, err.code, err.param)), sse.DONE]

    def _stream_steps(job: Job, request: Request):
        async def gen(state):
            for c, h in zip(job.choices, job.handles):
                p = h.params
                yield sse.event({
                    "object": "diffusion.start", "id": job.id, "model": svc.name, "index": c.index,
                    "prompt_tokens": len(h.prompt_ids), "gen_length": p.gen_length, "block_length": p.block,
                    "steps": p.total_steps if p.threshold is None else None, "threshold": p.threshold,
                    "max_tokens": c.max_tokens, "mask_token_id": bundle.special.mask})
            done = 0
            async for idx, kind, payload in job.events(request):
                if kind == "ping":
                    yield b": keep-alive\n\n"
                elif kind == "step":
                    yield sse.event(sse.step_event(idx, payload, svc.decoder))
                elif kind == "done":
                    c = job.choices[idx]
                    c.on_done(payload.gen_ids)
                    a = c.answer
                    done += 1
                    yield sse.event({"object": "diffusion.done", "index": idx, "text": a.text,
                                     "token_ids": a.ids, "finish_reason": a.finish_reason,
                                     "completion_tokens": a.completion_tokens, "nfe": payload.nfe,
                                     "steps": payload.steps, "gen_ids": payload.gen_ids})
                elif kind == "error":
                    for chunk in _end_with_error(job, state, payload):
                        yield chunk
                    return
            if done < len(job.choices):
                return
            yield sse.event({"object": "diffusion.usage", "id": job.id, "usage": job.usage()})
            state["status"] = 200
            yield sse.DONE
        return gen

    return app
