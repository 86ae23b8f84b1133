"""The FastAPI application: wiring only (the shared service, the engine's lifespan, routes, handlers).

`create_app(bundle, engine_config, ...)` builds a complete app around any loaded ModelBundle, so
tests and the CLI share one code path. The engine thread starts with the app's lifespan. The routes
are in server/routes.py (vLLM's /tokenize, /detokenize, /version in server/vllm_routes.py), request checks in server/checks.py, request reading in server/requests.py,
one request in flight in server/job.py, the SSE bodies in server/streaming.py and the error body in
server/errors.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time

from fastapi import FastAPI

from sampler.scheduler import Engine, EngineConfig
from server.answer import Decoder
from server.connection import collapse_loop_errors
from server.errors import ApiError, install_handlers
from server.guards import Guards, default_max_body_bytes, outcome_of
from server.metrics import Metrics
from server.requests import ServerLimits, derive_seed
from server.responses_api import router as responses_router
from server.routes import HEAD_PATHS, api, check_auth, ops
from server.vllm_routes import vllm, vllm_open

__all__ = ["ApiError", "Service", "ServerLimits", "create_app", "derive_seed"]

DESCRIPTION = ("OpenAI-compatible server for LLaDA masked-diffusion language models. The request bodies "
               "take OpenAI's fields plus the diffusion extensions (steps, block_length, remasking, "
               "cfg_scale, threshold, cache, ban_eos, defer_eos, eos_bias, stream_steps; on LLaDA2.x "
               "checkpoints also "
               "minimal_topk, eos_early_stop, editing_threshold, max_post_steps, num_to_transfer). "
               "Errors use OpenAI's body.")


class Service:
    """What the handlers share: the model bundle, the engine, metrics, limits."""

    def __init__(self, bundle, engine: Engine, metrics: Metrics, served_name: str, api_key: str | None,
                 limits: ServerLimits, shutdown_grace: float, strict_fields: bool = False,
                 chat_special_tokens: bool = False):
        self.bundle = bundle
        self.engine = engine
        self.metrics = metrics
        self.name = served_name
        self.api_key = api_key
        self.limits = limits
        self.shutdown_grace = shutdown_grace
        self.strict_fields = strict_fields  # unknown request fields: 400 instead of a warning
        self.chat_special_tokens = chat_special_tokens  # special tokens in chat content are parsed
        self.tokenizer = bundle.tokenizer
        self.decoder = Decoder(bundle.tokenizer)
        self.config = bundle.config
        self.stop_ids = list(bundle.special.stop)
        self.vocab_size = bundle.vocab_size  # the one bound on client token ids (checks.in_vocabulary)
        self.block_diffusion = bool(bundle.config.block_diffusion)  # the strategy's parameter meanings
        self.max_batch_tokens = engine.config.max_batch_tokens  # the request fit (checks.params)
        self.max_queue = engine.config.max_queue  # generations per request at most (checks.fanout)
        self.created = int(time.time())

    def model_card(self) -> dict:
        tok = self.tokenizer
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "llada-serve",
                "max_model_len": self.config.max_sequence_length,
                "llada": {"family": self.config.family, "decoding": self.bundle.decoding,
                          "tokenizer": tok is not None, "chat_template": bool(tok is not None and tok.chat_template),
                          "vocab_size": self.vocab_size, "mask_token_id": self.bundle.special.mask,
                          "stop_token_ids": self.stop_ids}}


def _openapi_without_422(app: FastAPI):
    """FastAPI documents its 422 validation error; this server answers those as 400 (documented)."""
    def openapi():
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema
    return openapi


def create_app(bundle, engine_config: EngineConfig | None = None, *, served_model_name: str | None = None,
               api_key: str | None = None, limits: ServerLimits | None = None, metrics: Metrics | None = None,
               shutdown_grace: float = 30.0, engine: Engine | None = None, max_body_bytes: int | None = None,
               body_timeout: float | None = 30.0, allowed_hosts: list[str] | None = None,
               strict_fields: bool = False, chat_special_tokens: bool = False, freeze_gc: bool = False) -> FastAPI:
    """The app serving `bundle`. `freeze_gc` (the CLI sets it): once started, everything allocated
    so far (torch, the model, modules) moves to the garbage collector's permanent generation, so a
    request that allocates many objects (a large JSON body) does not make full collections walk
    them all (a 1 MiB body of 174k lists: 0.35 s of collections without it, 0.04 s with it)."""
    name = served_model_name or bundle.name or "llada"
    metrics = metrics or Metrics(model_name=name)
    metrics.describe(bundle)
    engine = engine or Engine(bundle.model, bundle.special, engine_config or EngineConfig(), metrics=metrics)
    svc = Service(bundle, engine, metrics, name, api_key,
                  limits or ServerLimits(), shutdown_grace, strict_fields, chat_special_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        collapse_loop_errors(asyncio.get_running_loop())  # an error storm (EMFILE on accept) logs a line per 10 s
        engine.start()
        if freeze_gc:
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown, min(5.0, svc.shutdown_grace))

    app = FastAPI(title="llada-serve", description=DESCRIPTION, lifespan=lifespan, redoc_url=None, docs_url=None)
    app.state.service = svc
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.head_paths = frozenset(HEAD_PATHS)  # a 405 there says Allow: GET, HEAD
    install_handlers(app, check_auth, outcome_of)
    app.add_middleware(Guards, max_body_bytes=max_body_bytes or default_max_body_bytes(svc.config.max_sequence_length),
                       body_timeout=body_timeout, allowed_hosts=allowed_hosts, engine=engine, metrics=metrics,
                       authenticate=check_auth)
    app.include_router(ops)
    app.include_router(api)
    app.include_router(vllm)
    app.include_router(vllm_open)
    app.include_router(responses_router)
    app.openapi = _openapi_without_422(app)
    return app
