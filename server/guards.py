"""Checks every HTTP request passes before the application sees it (one ASGI middleware).

- Host: with an allow-list (`--allowed-hosts`), any other Host header gets 400 `invalid_host`, which
  stops DNS-rebinding pages from reaching a server bound to loopback. The header is parsed as RFC
  3986 `host[:port]` (IPv6 in brackets); anything else in it is refused; an entry with a port allows
  that port only.
- API bodies (POST under /v1/): the API key is checked before anything is read (401);
  `Content-Type: application/json` is required (415 otherwise; a web page
  cannot send that cross-origin without a CORS preflight, which this server never grants); the body is
  read here, before any handler runs, and is refused with 413 past `--max-body-bytes` (at once when
  Content-Length says so), with 408 when it takes longer than `--body-timeout` to arrive. A client that
  hangs up during the upload is counted as 499 and logged in one line. The handler then gets the body
  in one piece.
- While the server drains (SIGTERM), every response carries `Connection: close`, so keep-alive
  clients cannot hold the process open.

Refusals use the OpenAI error body and echo at most a short prefix of what the client sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re

from starlette.requests import Request

from server.errors import ApiError, clip, error_response

log = logging.getLogger("llada.server")

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


class _BodyError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Disconnected(Exception):
    pass


class Guards:
    """ASGI middleware; `metered` are the paths whose refusals are counted in llada_requests_total."""

    def __init__(self, app, *, max_body_bytes: int, body_timeout: float | None = 30.0,
                 allowed_hosts: list[str] | None = None, engine=None, metrics=None,
                 metered: tuple[str, ...] = (), authenticate=None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout if body_timeout and body_timeout > 0 else None
        self.allowed = None
        if allowed_hosts is not None and "*" not in [h.strip() for h in allowed_hosts]:
            self.allowed = {parse_allowed_host(h) for h in allowed_hosts}
        self.engine = engine
        self.metrics = metrics
        self.metered = set(metered)
        self.authenticate = authenticate  # raises ApiError (401) for a request without the API key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {}
        for k, v in scope.get("headers", ()):
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        send = self._closing_while_draining(send)

        if self.allowed is not None:
            host = headers.get("host", "")
            if not host_allowed(host, self.allowed, 443 if scope.get("scheme") == "https" else 80):
                why = f"the Host header {clip(host)} is not one this server answers to (see --allowed-hosts)"
                return await self._refuse(scope, receive, send, 400, why, "invalid_host")

        if scope.get("method") == "POST" and path.startswith("/v1/"):
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
                log.info("%s 499: the client disconnected while sending the request body", path)
                if path in self.metered and self.metrics is not None:
                    self.metrics.request_done(path, 499)
                return None
            receive = _replay(body, receive)
        return await self.app(scope, receive, send)

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
                      type_: str = "invalid_request_error") -> None:
        path = scope.get("path", "")
        if path in self.metered and self.metrics is not None:
            self.metrics.request_done(path, status)
        log.info("%s %d: %s", path, status, message)
        # The body (or its rest) is left unread: the connection cannot carry another request.
        await error_response(status, message, type_, code=code, headers={"Connection": "close"})(scope, receive, send)


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
