"""Connection limits uvicorn lacks: a header-read timeout and a cap on open connections.

uvicorn (kept: FastAPI's own server, one event loop we already run the engine on, a pluggable protocol class)
closes idle keep-alive connections after a response, but a connection that never sends a request, or stops
half-way through its headers, is kept for ever; its `limit_concurrency` answers 503 only once a request has been
read. This protocol subclass (of uvicorn's httptools protocol where httptools is installed, as uvicorn itself would
pick, else of its h11 one) closes a connection that has not completed a request's headers within
`header_timeout_s` (408 if it sent part of one), and answers 503 to connections beyond `max_connections` before
reading anything. Body-read time is bounded in the app (`body_timeout_s`), keep-alive by uvicorn's
`timeout_keep_alive`. hypercorn and granian have header timeouts built in, but either would be a second server
stack for one missing timer.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # the C parser: what uvicorn uses by default when it is installed (uvicorn[standard])
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # pragma: no cover - depends on the install
    _Base = H11Protocol

_NEVER = object()


def _raw_response(status: str, body: dict | None = None, retry_after: int | None = None) -> bytes:
    data = json.dumps(body).encode() if body else b""
    head = [f"HTTP/1.1 {status}", "connection: close", f"content-length: {len(data)}"]
    if data:
        head.append("content-type: application/json")
    if retry_after:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def guarded_protocol(max_connections: int, header_timeout_s: float,
                     on_event: Callable[[str, int], None] = lambda event, open_now: None, base: type = _Base) -> type:
    """A protocol class for `uvicorn.Config(http=...)`, on `base` (uvicorn's httptools or h11 protocol: both keep
    `connections`, `cycle`, `transport`, `loop`). `on_event(event, open_connections)` is told of 'open', 'close',
    'header_timeout' and 'over_cap' (metrics)."""

    class GuardedProtocol(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._armed_for, self._timer, self._partial = _NEVER, None, False
            if len(self.connections) > max_connections:
                on_event("over_cap", len(self.connections))
                transport.write(_raw_response("503 Service Unavailable", {"error": {
                    "message": f"the server holds {max_connections} open connections, its limit; retry later",
                    "type": "unavailable", "param": None, "code": "too_many_connections"}}, retry_after=1))
                transport.close()
                return
            on_event("open", len(self.connections))
            self._arm()

        def connection_lost(self, exc) -> None:
            super().connection_lost(exc)
            if self._timer is not None:
                self._timer.cancel()
            on_event("close", len(self.connections))

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is None or self.cycle.response_complete:  # still no complete request headers
                self._partial = self._partial or bool(data)
                if self._armed_for is not self.cycle:  # the first bytes of a new request: its clock starts
                    self._arm()
            else:
                self._partial = False

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._armed_for = self.cycle
            self._timer = self.loop.call_later(header_timeout_s, self._on_header_timeout)

        def _on_header_timeout(self) -> None:
            self._timer = None
            if self.transport.is_closing() or self.cycle is not self._armed_for:
                return  # a request's headers arrived in time
            if self.cycle is not None and not self.cycle.response_complete:
                return
            on_event("header_timeout", len(self.connections))
            if self._partial:
                self.transport.write(_raw_response("408 Request Timeout", {"error": {
                    "message": f"the request's headers did not arrive within {header_timeout_s:g} s",
                    "type": "invalid_request_error", "param": "headers", "code": "header_timeout"}}))
            self.transport.close()

    return GuardedProtocol
