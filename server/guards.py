"""Checks every HTTP request passes before the application sees it (one ASGI middleware).

- Host: with an allow-list (`--allowed-hosts`), any other Host header gets 400 `invalid_host`, which
  stops DNS-rebinding pages from reaching a server bound to loopback. The header is parsed as RFC
  3986 `host[:port]` (IPv6 in brackets); anything else in it is refused; an entry with a port allows
  that port only.
- API bodies (POST under /v1/, and vLLM's /tokenize and /detokenize): the API key is checked before anything is read (401);
  `Content-Type: application/json` is required (415 otherwise; a web page
  cannot send that cross-origin without a CORS preflight, which this server never grants); the body is
  read here, before any handler runs, and is refused with 413 past `--max-body-bytes` (at once when
  Content-Length says so), with 408 when it takes longer than `--body-timeout` to arrive. A client that
  hangs up during the upload is counted as 499 and logged in one line. The handler then gets the body
  in one piece.
- While the server drains (SIGTERM), every response carries `Connection: close`, so keep-alive
  clients cannot hold the process open.
- Every response carries `x-request-id`: the body's `request_id` (set by the route), else the
  request's `x-request-id` header (an invalid one is a 400), else a generated `req-...` id; the log
  line names it.
- Every response is counted in `llada_requests_total` and logged in one line here, once, whoever
  produced it (a refusal here, a handler, an error handler, the catch-all 500, a stream that ended
  early): handlers only describe what happened in the request's `Outcome`.

Refusals use the OpenAI error body and echo at most a short prefix of what the client sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
import uuid

from starlette.requests import Request

from server import checks
from server.checks import MAX_REQUEST_ID_CHARS
from server.errors import API_PATHS, ApiError, clip, error_response
from server.logsafe import shown

log = logging.getLogger("llada.server")

BODY_PATHS = ("/tokenize", "/detokenize")  # API bodies outside /v1/ (vLLM's routes), guarded alike
MIN_BODY_BYTES = 1 << 20
BODY_BYTES_PER_TOKEN = 2048   # 64 prompts of the full context at 32 bytes of JSON per token


def default_max_body_bytes(max_sequence_length: int) -> int:
    """A body limit that fits every request the model can serve: 2 KiB per token of context, at least
    1 MiB (8 MiB for a 4096-token model)."""
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * max_sequence_length)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind_host: str) -> list[str] | None:
    """The Host names a server bound to `bind_host` answers by default: the bind address, localhost
    and 127.0.0.1 (and ::1) when it is a loopback address; any name otherwise (None)."""
    if not is_loopback(bind_host):
        return None
    return sorted({bind_host.strip("[]"), "localhost", "127.0.0.1", "::1"})


# RFC 3986 reg-name (unreserved, sub-delims, percent escapes) or IPv4; an IP-literal in brackets.
_REG_NAME = re.compile(r"[a-z0-9\-._~!$&'()*+,;=%]+")
_PORT = re.compile(r"[0-9]{1,5}")


def parse_host(value: str) -> tuple[str, int | None] | None:
    """A Host header (RFC 3986 `host [":" port]`) as (name, port or None): the name in lower case,
    an IPv6 literal without its brackets in its short form. None when it is not a valid Host:
    '[::1]evil.com', 'a.b:80@evil.com', 'a.b:', 'a b', ports past 65535."""
    h = value.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        if end < 0:
            return None
        name, rest = h[1:end], h[end + 1:]
        try:
            name = ipaddress.IPv6Address(name).compressed
        except ValueError:
            return None
    else:
        name, sep, port = h.partition(":")
        rest = sep + port
        if not _REG_NAME.fullmatch(name):
            return None
    if not rest:
        return name, None
    if rest[0] != ":" or not _PORT.fullmatch(rest[1:]) or int(rest[1:]) > 65535:
        return None
    return name, int(rest[1:])


def parse_allowed_host(entry: str) -> tuple[str, int | None]:
    """An --allowed-hosts entry: a name or address, with an optional port ('api.example.com:8443',
    '[::1]:8000'); a bare IPv6 address ('::1') has no port. ValueError when it is not one."""
    e = entry.strip()
    if e.count(":") > 1 and not e.startswith("["):
        e = f"[{e}]"
    parsed = parse_host(e)
    if parsed is None:
        raise ValueError(f"--allowed-hosts: {entry!r} is not a host name or address with an optional port")
    return parsed


def host_allowed(header: str, allowed: set, default_port: int) -> bool:
    """Whether a Host header names an allowed (name, port) pair; an entry without a port allows the
    name on any port, a Host without a port is on the scheme's default port."""
    parsed = parse_host(header)
    if parsed is None:
        return False
    name, port = parsed
    return (name, None) in allowed or (name, default_port if port is None else port) in allowed


class Outcome:
    """What one HTTP request came to, filled in by whoever knows it and counted and logged once by
    the guard when the response is over. `status` overrides the HTTP status sent (a stream's HTTP
    status is 200 whatever its end); `job` (a generation) or `usage`/`detail` (scoring) describe a
    success; `message` an error."""

    __slots__ = ("status", "sent", "exc", "message", "job", "usage", "detail", "how", "request_id")

    def __init__(self):
        self.status = self.sent = self.exc = self.message = self.job = self.usage = self.detail = None
        self.how = ""
        self.request_id = "req-" + uuid.uuid4().hex[:24]  # the x-request-id sent back (see the module)


def outcome_of(request) -> Outcome:
    """The Outcome of a request (a detached one for an app run without the guard)."""
    rec = request.scope.get("state", {}).get("llada_outcome")
    return rec if rec is not None else Outcome()


def endpoint_label(path: str) -> str | None:
    """The `endpoint` label a response on `path` is counted under (a bounded set: a client cannot make
    new series), or None for operator and page routes, which are counted only when they fail (5xx)
    so probes and scrapes do not dilute the error ratio."""
    if path in API_PATHS:
        return path
    if path == "/v1/models" or path.startswith("/v1/models/"):
        return "/v1/models"
    if path.startswith("/v1/"):
        return "other"
    return None


class _BodyError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Disconnected(Exception):
    pass


class Guards:
    """ASGI middleware (see the module's docstring)."""

    def __init__(self, app, *, max_body_bytes: int, body_timeout: float | None = 30.0,
                 allowed_hosts: list[str] | None = None, engine=None, metrics=None,
                 authenticate=None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout if body_timeout and body_timeout > 0 else None
        self.allowed = None
        if allowed_hosts is not None and "*" not in [h.strip() for h in allowed_hosts]:
            self.allowed = {parse_allowed_host(h) for h in allowed_hosts}
        self.engine = engine
        self.metrics = metrics
        self.authenticate = authenticate  # raises ApiError (401) for a request without the API key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rec = Outcome()
        scope.setdefault("state", {})["llada_outcome"] = rec
        t0 = time.monotonic()

        async def observed(message):
            if message["type"] == "http.response.start":
                rec.sent = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                message = {**message, "headers": headers + [(b"x-request-id", rec.request_id.encode())]}
            await send(message)
        reply = self._closing_while_draining(observed)
        try:
            await self._guarded(scope, receive, reply, rec)
        except Exception as e:  # noqa: BLE001 - a bug in a handler: one traceback, one OpenAI-style 500
            rec.exc = e
            if rec.sent is not None or _client_gone(e):
                raise  # mid-response: uvicorn ends the connection
            log.error("unhandled error on %s %s", scope.get("method", "-"), clip(scope.get("path", "")), exc_info=e)
            rec.status, rec.message = 500, "internal server error"
            await error_response(500, "internal server error", "server_error")(scope, receive, reply)
        except BaseException as e:
            rec.exc = e
            raise
        finally:
            try:
                self._account(scope, rec, time.monotonic() - t0)
            except Exception:  # noqa: BLE001 - bookkeeping must never fail a response
                log.error("counting a response on %s failed", clip(scope.get("path", "")), exc_info=True)

    async def _guarded(self, scope, receive, send, rec: Outcome):
        path = scope.get("path", "")
        headers = {}
        for k, v in scope.get("headers", ()):
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))

        if "x-request-id" in headers:
            try:
                rec.request_id = checks.request_id(headers["x-request-id"], "x-request-id")
            except ApiError as e:
                return await self._refuse(scope, receive, send, e.status, e.message, e.code, param=e.param)
        if self.allowed is not None:
            host = headers.get("host", "")
            if not host_allowed(host, self.allowed, 443 if scope.get("scheme") == "https" else 80):
                why = f"the Host header {clip(host)} is not one this server answers to (see --allowed-hosts)"
                return await self._refuse(scope, receive, send, 400, why, "invalid_host")

        if scope.get("method") == "POST" and (path.startswith("/v1/") or path in BODY_PATHS):
            if self.authenticate is not None:  # no body is read for a client without the key
                try:
                    self.authenticate(Request(scope))
                except ApiError as e:
                    return await self._refuse(scope, receive, send, e.status, e.message, e.code, e.type)
            ctype = headers.get("content-type")
            media = (ctype or "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                got = "none" if ctype is None else clip(ctype)
                why = f"the request body must be JSON sent with 'Content-Type: application/json' (got {got})"
                return await self._refuse(scope, receive, send, 415, why, "unsupported_media_type")
            try:
                body = await self._read_body(headers, receive)
            except _BodyError as e:
                return await self._refuse(scope, receive, send, e.status, e.message, e.code)
            except _Disconnected:
                rec.status, rec.message = 499, "the client disconnected while sending the request body"
                return None
            receive = _replay(body, receive)
        return await self.app(scope, receive, send)

    def _account(self, scope, rec: Outcome, seconds: float) -> None:
        """Count and log one response (see the module's docstring)."""
        status = rec.status or rec.sent
        if rec.exc is not None and (status is None or status < 400):
            # The catch-all handler answered 500 outside this middleware; a client that went away
            # mid-stream raises too and is a 499.
            status = 499 if _client_gone(rec.exc) else 500
        status = status or 499  # no response at all: the client went away
        path = scope.get("path", "")
        endpoint = endpoint_label(path)
        if endpoint is None and status < 500:
            return
        endpoint = endpoint or "other"
        m = self.metrics
        job = rec.job
        if m is not None:
            m.request_done(endpoint, status, seconds)
            if job is not None:
                u = job.usage()
                if status == 200:
                    m.usage(u["prompt_tokens"], u["completion_tokens"])
                    for c in job.choices:
                        m.finished_reason(c.answer.finish_reason if c.answer is not None else "abort")
                else:
                    m.finished_reason("abort" if status == 499 else "error", len(job.choices))
            elif status == 200 and rec.usage is not None:
                m.usage(rec.usage["prompt_tokens"], None)
        where = endpoint if endpoint != "other" else clip(path)
        if job is not None:
            u = job.usage()
            what = (f"{len(job.choices)} choice(s), {u['prompt_tokens']} prompt + {u['completion_tokens']} "
                    "generated tokens")
            if rec.message:
                what = f"{rec.message}; {what}"
        else:
            what = rec.detail or rec.message or ""
        if status >= 500 and not what:
            what = "internal server error" if rec.exc is not None else ""
        log.info("%s %s %d%s: %s, %.3fs, request %s", scope.get("method", "-"), where, status, rec.how, what,
                 seconds, shown(rec.request_id, MAX_REQUEST_ID_CHARS + 2))

    async def _read_body(self, headers: dict, receive) -> bytes:
        limit = self.max_body_bytes
        too_large = _BodyError(413, f"the request body is larger than this server's limit of {limit} bytes "
                               "(--max-body-bytes)", "body_too_large")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = None if self.body_timeout is None else loop.time() + self.body_timeout
        while True:
            try:
                if deadline is None:
                    message = await receive()
                else:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise _BodyError(408, f"the request body did not arrive within {self.body_timeout:g} s "
                                 "(--body-timeout)", "body_timeout") from None
            if message["type"] == "http.disconnect":
                raise _Disconnected()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _closing_while_draining(self, send):
        engine = self.engine
        if engine is None:
            return send

        async def wrapped(message):
            if message["type"] == "http.response.start" and not engine.accepting:
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), (b"connection", b"close")]
            await send(message)
        return wrapped

    async def _refuse(self, scope, receive, send, status: int, message: str, code: str,
                      type_: str = "invalid_request_error", param: str | None = None) -> None:
        rec = scope["state"]["llada_outcome"]
        rec.message = message
        # The body (or its rest) is left unread: the connection cannot carry another request.
        await error_response(status, message, type_, param=param, code=code,
                             headers={"Connection": "close"})(scope, receive, send)


def _client_gone(exc: BaseException) -> bool:
    """An exception that means the client went away (or the server cancelled the request)."""
    return isinstance(exc, (OSError, asyncio.CancelledError)) or type(exc).__name__ == "ClientDisconnect"


def _replay(body: bytes, receive):
    """A receive() that hands the app the whole body first, then whatever the client does next."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed
