"""The HTTP routes, typed: FastAPI parses and validates bodies into the pydantic request models,
the API key is a dependency, and every route with its bodies and errors is in /openapi.json."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.routing import APIRoute
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import checks
from server.endpoints import CHAT, COMPLETIONS
from server.errors import API_ERRORS, ApiError
from server.job import Job
from server.metrics import CONTENT_TYPE
from server.requests import chat_prompt, completion_items, completion_prompts, plan
from server.responses import (EVENT_STREAM, ChatCompletionResponse, CompletionResponse, LoglikelihoodResponse,
                              ModelCard, ModelList, Status)
from server.schemas import ChatCompletionRequest, CompletionRequest, LoglikelihoodRequest
from server.infill import check_infill, infill_prompts, suffix_ids
from server.scoring import serve_loglikelihood
from server.guards import outcome_of
from server.streaming import metered, openai_stream, steps_stream

STATIC = Path(__file__).resolve().parent / "static"

_bearer = HTTPBearer(auto_error=False, description="the server's --api-key, when it has one")
_x_api_key = APIKeyHeader(name="x-api-key", auto_error=False, description="alternative to the bearer token")


def check_auth(request: Request) -> None:
    """Refuse a request without the server's API key (when it has one): 401 in the OpenAI body."""
    key = request.app.state.service.api_key
    if not key:
        return
    auth = request.headers.get("authorization", "")
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
    if not token:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                       code="missing_api_key")
    if not secrets.compare_digest(token.encode(), key.encode()):
        raise ApiError(401, "invalid API key", "authentication_error", code="invalid_api_key")


def require_api_key(request: Request, _bearer_token=Depends(_bearer), _header=Depends(_x_api_key)) -> None:
    check_auth(request)


class _SizeCheckedRequest(Request):
    """A request whose parsed JSON body passes `check_raw_sizes` before FastAPI validates it."""

    async def json(self):
        if not hasattr(self, "_json"):
            data = await super().json()
            checks.raw_sizes(self.app.state.service, data)  # FastAPI reports it as a parse error's cause
            self._json = data
        return self._json


class SizeCheckedRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def checked(request: Request):
            return await handler(_SizeCheckedRequest(request.scope, request.receive))
        return checked


ops = APIRouter(tags=["operations"])
api = APIRouter(prefix="/v1", tags=["OpenAI API"], dependencies=[Depends(require_api_key)],
                route_class=SizeCheckedRoute,
                responses=API_ERRORS)


@ops.get("/health", response_model=Status)
async def health(request: Request):
    return {"status": "ok", "model": request.app.state.service.name}


@ops.get("/ready", response_model=Status, responses={503: {"model": Status, "description": "not ready"}})
async def ready(request: Request):
    svc = request.app.state.service
    if svc.engine.alive and svc.engine.accepting:
        return {"status": "ready", "model": svc.name}
    status = "draining" if svc.engine.draining else "not ready"
    return JSONResponse({"status": status, "model": svc.name}, status_code=503)


@ops.get("/metrics", response_class=Response,
         responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                          "description": "Prometheus text format"}})
async def metrics_endpoint(request: Request):
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


@ops.get("/", response_class=FileResponse, include_in_schema=False)
@ops.get("/playground", response_class=FileResponse,
         responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}, "description": "the playground"}})
async def playground():
    return FileResponse(STATIC / "index.html", media_type="text/html")


# /docs: Swagger UI from files installed with the server (the fastapi-offline package ships them), so
# the page works without internet access; the page names no other origin.
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}


def _docs_assets_dir() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"


@ops.get("/docs", include_in_schema=False)
async def docs(request: Request):
    from fastapi.openapi.docs import get_swagger_ui_html

    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(openapi_url=root + request.app.openapi_url, title=request.app.title + " - API",
                               swagger_js_url=root + "/docs/assets/swagger-ui-bundle.js",
                               swagger_css_url=root + "/docs/assets/swagger-ui.css",
                               swagger_favicon_url=root + "/docs/assets/favicon.png",
                               swagger_ui_parameters={"validatorUrl": None})


@ops.get("/docs/assets/{name}", include_in_schema=False)
async def docs_asset(name: str):
    if name not in DOCS_ASSETS:
        raise StarletteHTTPException(404, "Not Found")
    return FileResponse(_docs_assets_dir() / name, media_type=DOCS_ASSETS[name],
                        headers={"Cache-Control": "public, max-age=86400"})


# Operator endpoints answer HEAD too (load balancers and uptime checks send it); the schema lists GET.
HEAD_PATHS = ("/health", "/ready", "/metrics", "/", "/playground")
for _path, _endpoint in zip(HEAD_PATHS, (health, ready, metrics_endpoint, playground, playground)):
    ops.add_api_route(_path, _endpoint, methods=["HEAD"], include_in_schema=False)


@api.get("/models", response_model=ModelList)
async def models(request: Request):
    svc = request.app.state.service
    return {"object": "list", "data": [svc.model_card()]}


@api.get("/models/{model_id:path}", response_model=ModelCard)
async def model(request: Request, model_id: str):
    svc = request.app.state.service
    checks.model(svc, model_id)
    return svc.model_card()


@api.post("/completions", response_model=None,
          responses={200: {"model": CompletionResponse, "content": EVENT_STREAM,
                           "description": "the completion, or an event stream with stream/stream_steps"}})
async def completions(request: Request, body: CompletionRequest):
    svc = request.app.state.service
    take_request_id(request, body)
    checks.fields(svc, body)
    items = completion_items(body)
    n = checks.fanout(svc, body.n, len(items))
    # Tokenizing (and scanning ids) runs in a worker thread: the event loop keeps answering.
    if body.infill:
        check_infill(body)
        infills = await asyncio.to_thread(infill_prompts, svc, items)
        planned = await asyncio.to_thread(plan, svc, body, [ip.prefix for ip in infills], n, None, infills=infills)
        return await _serve(request, body, COMPLETIONS, planned)
    prompts = await asyncio.to_thread(completion_prompts, svc, items)
    suffix = await asyncio.to_thread(suffix_ids, svc, body.suffix) if body.suffix else None
    # Planning compiles a structured-output constraint (first use of a grammar: milliseconds to a second).
    planned = await asyncio.to_thread(plan, svc, body, prompts, n, body.max_tokens, suffix_ids=suffix)
    return await _serve(request, body, COMPLETIONS, planned)


@api.post("/chat/completions", response_model=None,
          responses={200: {"model": ChatCompletionResponse, "content": EVENT_STREAM,
                           "description": "the chat completion, or an event stream with stream/stream_steps"}})
async def chat_completions(request: Request, body: ChatCompletionRequest):
    svc = request.app.state.service
    take_request_id(request, body)
    checks.fields(svc, body)
    n = checks.fanout(svc, body.n, 1)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    prompt = await asyncio.to_thread(chat_prompt, svc, body)  # template and tokenizer off the event loop
    return await _serve(request, body, CHAT, await asyncio.to_thread(plan, svc, body, [prompt], n, max_tokens))


@api.post("/loglikelihood", response_model=None, responses={200: {"model": LoglikelihoodResponse}})
async def loglikelihood(request: Request, body: LoglikelihoodRequest):
    """Monte Carlo estimate of log p(continuation | context) per pair (the LLaDA paper's estimator)."""
    out = await serve_loglikelihood(request, body)
    return Response(status_code=499) if out is None else out


def take_request_id(request: Request, body) -> None:
    """The body's request_id (checked), when its model has one, becomes the response's x-request-id
    (server.guards; without it the header's or a generated id is sent)."""
    rid = getattr(body, "request_id", None)
    if rid is not None:
        outcome_of(request).request_id = checks.request_id(rid)


async def _serve(request: Request, req, endpoint, planned):
    svc = request.app.state.service
    rec = outcome_of(request)  # the guard counts and logs the response from it
    job = Job(svc, endpoint, req, planned)
    job.submit()
    rec.job = job
    if req.stream or req.stream_steps:
        gen = steps_stream(job, request) if req.stream_steps else openai_stream(job, request)
        return StreamingResponse(metered(gen, job, rec), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    body = await job.collect(request)
    if body is None:  # the client went away
        return Response(status_code=499)
    return body
