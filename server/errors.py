"""The OpenAI error body, the exception that carries it, and the app's exception handlers.

Every failure a client can cause answers `{"error": {"message", "type", "param", "code"}}` with a
4xx status; FastAPI's own validation errors (422) and HTTP errors are translated into that body.
"""

from __future__ import annotations

import logging
import math
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from sampler.scheduler import (EngineError, EngineStopped, InternalError, InvalidRequest, OutOfMemory, QueueFull,
                               RankFailed, RequestTimeout, RequestTooLarge)
from server.logsafe import ECHO_CHARS, shown

log = logging.getLogger("llada.server")

API_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/loglikelihood")
MAX_MESSAGE_CHARS = 1000  # and no error message is longer than this


def clip(value, limit: int = ECHO_CHARS) -> str:
    """repr() of a client's value cut to `limit` characters (see server.logsafe.shown)."""
    return shown(value, limit)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _doc(text: str) -> dict:
    return {"model": ErrorResponse, "description": text}


# The error statuses the API endpoints may answer, for the OpenAPI document.
API_ERRORS = {400: _doc("invalid request"), 401: _doc("missing or invalid API key"),
              404: _doc("unknown model"), 408: _doc("the request body arrived too slowly (--body-timeout)"),
              413: _doc("the request body is over --max-body-bytes"),
              415: _doc("the body was not sent as Content-Type: application/json"),
              429: _doc("the queue is full (see Retry-After)"),
              500: _doc("the engine failed while running the request"),
              503: _doc("out of memory in a step, or the server is shutting down"),
              504: _doc("the request outlived the server's request timeout")}


# The one place engine errors become HTTP: error class -> (status, OpenAI error type).
ENGINE_HTTP = {RequestTooLarge: (400, "invalid_request_error"), InvalidRequest: (400, "invalid_request_error"),
               QueueFull: (429, "rate_limit_error"), EngineStopped: (503, "server_error"),
               OutOfMemory: (503, "server_error"), RequestTimeout: (504, "timeout_error"),
               InternalError: (500, "server_error"), RankFailed: (503, "server_error")}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        message, param = _safe(message, MAX_MESSAGE_CHARS), _safe(param, ECHO_CHARS)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    @classmethod
    def from_engine(cls, e: EngineError) -> "ApiError":
        status, type_ = next((v for k, v in ENGINE_HTTP.items() if isinstance(e, k)), (500, "server_error"))
        headers = None
        if isinstance(e, QueueFull):
            headers = {"Retry-After": str(max(1, math.ceil(e.retry_after)))}
        return cls(status, e.message, type_, e.param, e.code, headers)

    @classmethod
    def bad_field(cls, param: str, message: str, code: str = "invalid_value") -> "ApiError":
        """A 400 about one request field, named by `param`."""
        return cls(400, message, param=param, code=code)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def _safe(text, limit: int):
    """Text fit for a JSON body and a log line: at most `limit` characters, lone surrogates escaped."""
    if text is None:
        return None
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status, message, type_="invalid_request_error", param=None, code=None, headers=None):
    message, param = _safe(message, MAX_MESSAGE_CHARS), _safe(param, ECHO_CHARS)
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|.*\[.*\])$")


def _param(loc) -> str | None:
    """`messages.0.role` from pydantic's error location (the body prefix and union type tags dropped)."""
    parts = [str(p) for p in loc[1:] if isinstance(p, int) or not _TYPE_TAG.match(str(p))] \
        if loc and loc[0] == "body" else [str(p) for p in loc]
    return ".".join(parts) or None


def validation_error(errors: list) -> ApiError:
    first = errors[0] if errors else {}
    kind = first.get("type")
    if kind == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON ({why})", code="invalid_json")
    loc = tuple(first.get("loc", ()))
    if loc == ("body",):
        what = "is missing" if kind == "missing" else "must be a JSON object"
        return ApiError(400, f"the request body {what}", code="invalid_json")
    param = _param(loc)
    msg = first.get("msg", "invalid request")
    if kind == "extra_forbidden":
        msg = f"unknown field {clip(param)} (this server refuses fields it does not understand)"
    elif param:
        msg = f"{param}: {msg}"
    return ApiError(400, msg, param=param, code="invalid_value")


def install_handlers(app: FastAPI, check_auth, outcome_of) -> None:
    """Register the handlers that turn every exception into the OpenAI error body. `outcome_of`
    (server.guards) gives a request's record, which the guard counts and logs once it is answered."""

    def _counted(request: Request, err: ApiError) -> JSONResponse:
        outcome_of(request).message = err.message
        return err.response()

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return _counted(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        # A body FastAPI could not parse is still an authenticated route: the key is checked first.
        try:
            if request.url.path.startswith("/v1/"):
                check_auth(request)
        except ApiError as e:
            return _counted(request, e)
        return _counted(request, validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, ApiError):  # refused while FastAPI parsed the body
            return _counted(request, exc.__cause__)
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not parse the body
            why = ("it nests deeper than the JSON parser allows" if isinstance(exc.__cause__, RecursionError)
                   else type(exc.__cause__).__name__)
            return _counted(request, ApiError(400, f"the request body cannot be parsed ({why})",
                                              code="invalid_json"))
        t = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405 and headers and "Allow" in headers:
            # The router names the first route's methods; the operator routes answer HEAD too.
            allow = [m.strip() for m in headers["Allow"].split(",") if m.strip()]
            if request.url.path in getattr(request.app.state, "head_paths", ()) and "HEAD" not in allow:
                allow.append("HEAD")
            headers = {**headers, "Allow": ", ".join(allow)}
        outcome_of(request).message = str(exc.detail)
        return error_response(exc.status_code, str(exc.detail), t, headers=headers)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception):
        # A fallback: server.guards.Guards answers (and logs) a handler's exception itself; this
        # runs only for one raised outside it.
        log.error("unhandled error on %s %s", request.method, clip(request.url.path), exc_info=exc)
        return error_response(500, "internal server error", "server_error")
