"""The HTTP/1.1 protocol uvicorn runs for this server: its h11 protocol plus a header read timeout
and a connection cap; the process's file-descriptor limit; a log that one error class cannot flood.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but never times out a client that
sends its request line and headers slowly, so a few hundred such clients hold as many connections for
as long as they like. Here a connection whose next request's headers are not complete within
`header_timeout` seconds of the connection opening (or of the previous response ending) is closed.
Slow bodies are timed out by server.guards (408); a reverse proxy in front adds the rest (see the
README: connection limits per client, TLS, its own header and body timeouts).

`--max-connections`: a connection opened while that many are open answers its request with 503
`too_many_connections` (the OpenAI error body, `Retry-After`, `Connection: close`) and is closed; one
that sends nothing is closed after at most OVER_CAP_TIMEOUT_S. Refusals are logged as one summary
line per LOG_WINDOW_S. uvicorn's own `limit_concurrency` answers a plain-text 503 and logs a warning
per refused request, so it is not used.
"""

from __future__ import annotations

import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.logsafe import LOG_WINDOW_S, Collapsed

log = logging.getLogger("llada.server")

DEFAULT_MAX_CONNECTIONS = 1024
FD_RESERVE = 64            # descriptors kept for the model files, the log, the engine, ...
OVER_CAP_TIMEOUT_S = 1.0   # a connection over the cap that sends no request is closed this soon


_refusals = Collapsed()


def _too_many_connections(limit: int):
    body = json.dumps({"error": {
        "message": f"the server has {limit} connections open, its limit (--max-connections); retry later",
        "type": "server_error", "param": None, "code": "too_many_connections"}}, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"retry-after", b"1"), (b"connection", b"close")]

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    return app


class _HeaderTimeoutH11(H11Protocol):
    header_timeout = 10.0
    max_connections: int | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        cap = self.max_connections
        self._over_cap = cap is not None and len(self.connections) > cap  # this one is counted
        if self._over_cap:
            self.app = _too_many_connections(cap)  # what handle_events runs for this connection's request
            first, held = _refusals.should_log("cap")
            if first:
                more = f" ({held} more since the last such line)" if held else ""
                log.warning("connection refused with 503: %d connections open, the limit (--max-connections)%s",
                            cap, more)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        wait = min(self.header_timeout, OVER_CAP_TIMEOUT_S) if self._over_cap else self.header_timeout
        self._header_timer = self.loop.call_later(wait, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def protocol_with_header_timeout(seconds: float, max_connections: int | None = None) -> type:
    """An h11 protocol class for uvicorn.Config(http=...) that closes connections whose request
    headers take longer than `seconds` to arrive and, past `max_connections` open ones, answers 503."""
    return type("HeaderTimeoutH11Protocol", (_HeaderTimeoutH11,),
                {"header_timeout": float(seconds), "max_connections": max_connections})


def raise_fd_limit() -> tuple[int, int] | None:
    """Raise the soft limit on open files to the hard limit (a service manager's soft default, 1024
    under systemd, is below what a few hundred clients need). Returns (soft, hard) after, or None
    where the platform has no such limit."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        for target in (hard, 1 << 20, 1 << 16):  # an unlimited hard limit, or a kernel cap below it
            if target == resource.RLIM_INFINITY or target <= soft:
                continue
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                break
            except (ValueError, OSError):
                continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def collapse_loop_errors(loop) -> None:
    """An event-loop exception handler under which one kind of error (same message, same exception
    type) is logged once per LOG_WINDOW_S: the first with its traceback, then one line with a count.
    asyncio logs every failed accept() when the process runs out of file descriptors (EMFILE), up to
    the listen backlog per loop turn: tens of thousands of tracebacks a second without this."""
    seen = Collapsed()

    def handler(loop, context):
        exc = context.get("exception")
        key = f"{context.get('message')}|{type(exc).__name__}|{getattr(exc, 'errno', '')}"
        first, held = seen.should_log(key)
        if not first:
            return
        if held or key in handler.logged:
            log.error("%s: %s (%d more like it in the last %gs)", context.get("message"), exc, held,
                      seen.window)
            return
        handler.logged.add(key)
        loop.default_exception_handler(context)
    handler.logged = set()
    loop.set_exception_handler(handler)
