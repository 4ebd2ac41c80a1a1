"""Connections: a client that stalls while sending its request is closed, and their number is capped.

uvicorn closes an idle keep-alive connection, but not one whose client stops halfway through its headers or its
body (slowloris): each such client would hold a connection, and a file descriptor, for ever. The ASGI app cannot see
them (it is called once the headers are complete), so the guard lives in the HTTP protocol: `guarded_protocol` is
uvicorn's h11 protocol where a request has `header_timeout` seconds to finish its headers (counted from the
connection's start, or from the previous response's end on a kept-alive connection) and then `body_timeout` seconds to
finish its body. Past either, the client gets 408 and the connection is closed. A connection beyond
`max_connections` is answered 503 and closed at once. How long the server takes to answer is not limited here
(`--request-timeout` is).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_REASONS = {408: "Request Timeout", 503: "Service Unavailable"}


@dataclass
class ConnectionLimits:
    header_timeout: float = 10.0  # seconds to send a request's headers
    body_timeout: float = 60.0  # seconds, after the headers, to send its body
    max_connections: int = 512  # open connections at once, idle ones included; each waiting request holds one


def guarded_protocol(limits: ConnectionLimits, on_refusal: Callable[[str], None] | None = None) -> type[H11Protocol]:
    """uvicorn's h11 protocol with these limits; `on_refusal(reason)` counts each closed or refused connection
    ("read_timeout", "too_many_connections")."""

    class GuardedH11Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _phase: str | None = None  # "headers" or "body": what the client is expected to send now
        _partial = False  # bytes of a request in the headers phase

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                self._close_with(
                    503,
                    "too_many_connections",
                    f"the server has its limit of {limits.max_connections} connections open; retry shortly",
                )
                return
            self._watch()

        def data_received(self, data: bytes) -> None:
            if self._phase == "headers":
                self._partial = True
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel()
            super().connection_lost(exc)

        def _watch(self) -> None:
            """Start the clock of the phase the client is in now (if it changed)."""
            if self.transport is None or self.transport.is_closing():
                return
            state = self.conn.their_state
            phase = "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
            if phase == self._phase:
                return
            self._cancel()
            self._phase, self._partial = phase, False
            if phase is not None:
                timeout = limits.header_timeout if phase == "headers" else limits.body_timeout
                self._timer = self.loop.call_later(timeout, self._expire, phase)

        def _cancel(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expire(self, phase: str) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            limit = limits.header_timeout if phase == "headers" else limits.body_timeout
            # Answer a request that was begun and has no answer yet; an idle kept-alive connection just closes.
            begun = self._partial if phase == "headers" else not (self.cycle and self.cycle.response_started)
            message = f"the request's {phase} did not arrive within {limit:g} s; the connection is closed"
            if begun:
                self._close_with(408, "read_timeout", message)
            else:
                self.transport.close()
            if on_refusal is not None and begun:
                on_refusal("read_timeout")

        def _close_with(self, status: int, code: str, message: str) -> None:
            """Write a whole response outside h11's state machine (the request may be half read), then close."""
            if status == 503 and on_refusal is not None:
                on_refusal(code)
            kind = "invalid_request_error" if status < 500 else "server_error"
            error = {"message": message, "type": kind, "param": None, "code": code}
            body = json.dumps({"error": error}).encode()
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            ).encode()
            self.transport.write(head + body)
            if self.cycle is not None:  # an app reading this body sees the client gone
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.transport.close()

    return GuardedH11Protocol
