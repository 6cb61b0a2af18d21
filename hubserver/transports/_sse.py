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

from typing import Final

import trio

from ._outbound import Outbound, ReportTo, StartTask
from ._posted import PostedTransport
from ._wire import TransportKind, handshake_wire

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


class SseTransport(PostedTransport):
    """An event stream on a GET's response socket, and the client's POSTs.

    Args:
        stream: the connection the GET came on (its response is the stream).
    """

    __slots__ = ("_sock", "fd")

    kind = TransportKind.SERVER_SENT_EVENTS

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__()
        self._sock = stream.socket
        self.fd = stream.socket.fileno()

    def outbound(self, *, max_bytes: int, report: ReportTo, start_writer: StartTask) -> Outbound:
        return Outbound(
            self.fd,
            wire=handshake_wire(self.kind),
            max_bytes=max_bytes,
            report=report,
            start_writer=start_writer,
        )

    async def _watch(self) -> None:
        try:
            await trio.lowlevel.wait_readable(self._sock)
        except trio.ClosedResourceError:
            return  # the connection ended first
        self._inbound.end()

    def close(self) -> None:
        self._sock.close()
