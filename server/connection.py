"""The HTTP/1.1 protocol uvicorn runs for this server: its h11 protocol plus a header read timeout.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but never times out a client that
sends its request line and headers slowly, so a few hundred such clients hold as many connections for
as long as they like. Here a connection whose next request's headers are not complete within
`header_timeout` seconds of the connection opening (or of the previous response ending) is closed.
Slow bodies are timed out by server.guards (408); a reverse proxy in front adds the rest (see the
README: connection limits per client, TLS, its own header and body timeouts).
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class _HeaderTimeoutH11(H11Protocol):
    header_timeout = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
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
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def protocol_with_header_timeout(seconds: float) -> type:
    """An h11 protocol class for uvicorn.Config(http=...) that closes connections whose request
    headers take longer than `seconds` to arrive."""
    return type("HeaderTimeoutH11Protocol", (_HeaderTimeoutH11,), {"header_timeout": float(seconds)})
