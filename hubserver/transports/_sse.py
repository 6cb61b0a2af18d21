"""Server-Sent Events (spec §7.2): the server writes events on a GET's response; the
client sends with POSTs.

The output side is a socket like a WebSocket's (the same ``Outbound``, its
budget and its direct writes), framed by the SSE wire: every flush is one
event. The client ends the stream by dropping its request: the one thing
that may come on the socket after the request is its EOF (anything else is
a client breaking the protocol, and ends the connection too), watched by a
task the connection starts (``begin``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

import trio

from hubcore import HubProtocol, get_protocol

from ._frames import PeerClose, WebSocketError
from ._outbound import Outbound, Report
from ._posted import PostedInbound
from ._wire import TransportKind, Wire, wire_for

__all__ = ["SSE_HEAD", "SseTransport"]

#: The response head and ASP.NET Core's first bytes: a comment line, since some
#: browsers fire ``open`` only on the first byte of the body (spec §7.2). No
#: length and no chunking: the body ends when the connection does.
SSE_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream\r\n"
    b"cache-control: no-cache,no-store\r\n"
    b"pragma: no-cache\r\n"
    b"content-encoding: identity\r\n"
    b"connection: close\r\n"
    b"\r\n"
    b":\r\n"
)
_JSON: Final = get_protocol("json")


class SseTransport:
    """An event stream on a GET's response socket, and the client's POSTs.

    Args:
        stream: the connection the GET came on (its response is the stream).
    """

    __slots__ = ("_inbound", "_sock", "fd")

    kind: Final = TransportKind.SERVER_SENT_EVENTS

    def __init__(self, stream: trio.SocketStream) -> None:
        self._sock = stream.socket
        self.fd = stream.socket.fileno()
        self._inbound = PostedInbound()

    @property
    def inbound(self) -> PostedInbound:
        return self._inbound

    def outbound(
        self,
        *,
        max_bytes: int,
        report: Callable[[Report, BaseException | None], None],
        start_writer: Callable[[Callable[[], Awaitable[None]]], None],
    ) -> Outbound:
        wire = wire_for(TransportKind.SERVER_SENT_EVENTS, _JSON)
        assert wire is not None
        return Outbound(
            self.fd, wire=wire, max_bytes=max_bytes, report=report, start_writer=start_writer
        )

    def wire_for(self, protocol: HubProtocol) -> Wire | None:
        return wire_for(TransportKind.SERVER_SENT_EVENTS, protocol)

    def begin(self, start_task: Callable[[Callable[[], Awaitable[None]]], None]) -> None:
        start_task(self._watch)

    async def _watch(self) -> None:
        try:
            await trio.lowlevel.wait_readable(self._sock)
        except trio.ClosedResourceError:
            return  # the connection ended first
        self._inbound.end()

    def pong(self, payload: bytes) -> bytes:
        return b""  # no transport-level pings on SSE

    def goodbye(self) -> None:
        return None  # the stream just ends

    def close_reply(self, close: PeerClose) -> None:
        return None

    def error_reply(self, error: WebSocketError) -> None:
        return None

    def close(self) -> None:
        self._sock.close()
