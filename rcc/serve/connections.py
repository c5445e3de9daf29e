"""The connection layer: uvicorn's h11 protocol with the limits it lacks.

uvicorn times out idle keep-alive connections, but not a client that opens a
connection and sends nothing, trickles its headers a byte at a time, or announces a
body and never sends it; each holds a connection (and a file descriptor) for as long
as it likes. :class:`GuardedProtocol` gives every request a deadline for its head
(request line and headers) and one for its body, answers 408 and closes the
connection when one passes, refuses connections past a cap with 503, and answers
malformed or oversized heads with the API's JSON error instead of plain text.

A response sent before the request's body was read (a 413 for a body announced too
large) closes with a lingering close: what the client still sends is read and dropped
for up to :data:`LINGER` seconds, so that it can finish sending and read the answer
(closing at once resets the connection, and the client sees a broken pipe instead).
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
           503: "Service Unavailable"}
LINGER = 2.0  # seconds, at most (and never past the body deadline)
KINDS = {400: "invalid_request_error", 408: "timeout_error", 431: "request_too_large", 503: "overloaded_error"}


def raw_error(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response carrying the API's JSON error, closing the connection."""
    body = json.dumps({"error": {"message": message, "type": KINDS[status], "code": status}}).encode()
    head = (f"HTTP/1.1 {status} {REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class _LingeringTransport:
    """The connection's transport, whose ``close`` lingers while the client is still
    sending a body (see the module's docstring); everything else is the transport's."""

    def __init__(self, transport, protocol: "GuardedProtocol"):
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def close(self) -> None:
        p = self._protocol
        if not p._lost and p.conn.their_state is h11.SEND_BODY and not self._transport.is_closing():
            p._linger()
        else:
            self._transport.close()


class GuardedProtocol(H11Protocol):
    """uvicorn's :class:`H11Protocol` with head and body deadlines and a connection cap.

    The limits are class attributes; :func:`protocol_class` makes a subclass with a
    server's settings (uvicorn builds one protocol object per connection).
    """

    header_timeout = 10.0
    body_timeout = 30.0
    max_connections = 512
    max_header_bytes = 16384

    def connection_made(self, transport) -> None:
        self._timer = None
        self._phase: str | None = None
        self._fresh = True  # no byte received yet: a silent client gets the head deadline too
        self._lost = False
        self._lingering = None  # the timer of a lingering close
        self._raw = transport
        super().connection_made(transport)
        self.transport = _LingeringTransport(transport, self)
        if len(self.connections) > self.max_connections:
            self._close_with(503, f"the server has {self.max_connections} connections open, its limit "
                                  "(--max-connections); retry in a moment")
            return
        self._arm()

    def connection_lost(self, exc) -> None:
        self._lost = True
        self._disarm()
        if self._lingering is not None:
            self._lingering.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            return  # the rest of a body already answered: dropped
        self._fresh = False
        super().data_received(data)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._lingering is not None:
            self._unset_keepalive_if_required()
        self._arm()

    def _linger(self) -> None:
        if self._lingering is None:
            self._unset_keepalive_if_required()
            self._lingering = self.loop.call_later(min(LINGER, self.body_timeout), self._raw.close)

    def send_400_response(self, msg: str) -> None:
        if len(self.conn.trailing_data[0]) > self.max_header_bytes:
            self._close_with(431, f"the request line and headers are over {self.max_header_bytes} bytes, this "
                                  "server's limit (--max-header-bytes)")
        else:
            self._close_with(400, "malformed HTTP request; send HTTP/1.1")

    # ----------------------------------------------------------- deadlines
    def _arm(self) -> None:
        """Run the deadline of what the client owes now: the head (a new connection, or
        the first bytes of a next request), the body, or nothing (waiting on us, or idle
        between requests, which uvicorn's keep-alive timeout covers)."""
        if self.transport is None or self.transport.is_closing():
            self._disarm()
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            phase = "body"
        elif state is h11.IDLE and (self._fresh or self.conn.trailing_data[0]):
            phase = "head"
        else:
            phase = None
        if phase == self._phase:
            return
        self._disarm()
        self._phase = phase
        if phase is not None:
            seconds = self.header_timeout if phase == "head" else self.body_timeout
            self._timer = self.loop.call_later(seconds, self._expired, phase, seconds)

    def _disarm(self) -> None:
        if getattr(self, "_timer", None) is not None:
            self._timer.cancel()
        self._timer, self._phase = None, None

    def _expired(self, phase: str, seconds: float) -> None:
        self._timer = None
        what, option = (("request line and headers", "--header-timeout") if phase == "head"
                        else ("request body", "--body-timeout"))
        self._close_with(408, f"the {what} did not arrive within {seconds:g} s ({option}); send it at once")

    def _close_with(self, status: int, message: str) -> None:
        """Answer ``status`` (unless a response is under way) and close the connection
        (no lingering); a request still running sees its client gone."""
        if self._raw.is_closing():
            return
        cycle = self.cycle
        if self._lingering is None and (cycle is None or not cycle.response_started):
            self._raw.write(raw_error(status, message))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self._raw.close()


def protocol_class(cfg) -> type[GuardedProtocol]:
    """:class:`GuardedProtocol` with the limits of a :class:`~rcc.serve.ServeConfig`."""
    return type("RCCProtocol", (GuardedProtocol,), {
        "header_timeout": float(cfg.header_timeout), "body_timeout": float(cfg.body_timeout),
        "max_connections": int(cfg.max_connections), "max_header_bytes": int(cfg.max_header_bytes)})
