"""The seam between a hub connection and the way its bytes travel.

A connection (``hubserver.connection.HubSession``) owns the hub's logic: the
handshake, its group, resumes, deadlines, hubcore. A transport owns the
bytes: how the client's data arrives (``inbound``), where the connection's
output goes and how it is framed (``outbound`` and its wire), and what the
transport says when the connection ends. ``WebSocketTransport`` is one
socket both ways; ``SseTransport`` (``_sse.py``) writes to a GET's response and
``PollTransport`` (``_poll.py``) keeps output for polls, both taking the
client's data from POSTs (``_posted.py``).
"""

from __future__ import annotations

from typing import Final, Protocol

import trio

from hubcore import HubProtocol

from ._frames import PeerClose, WebSocketError, close_frame, close_reply, pong_frame
from ._inbound import InboundItem, Reading, WebSocketInbound
from ._outbound import Outbound, ReportTo, StartTask
from ._wire import TransportKind, Wire, handshake_wire, wire_for

__all__ = ["Inbound", "OutboundSide", "StartTask", "Transport", "WebSocketTransport"]

NORMAL_CLOSURE: Final = 1000


class Inbound(Protocol):
    """The read side: the client's data as it arrives, paused when told."""

    state: Reading

    @property
    def is_stopped(self) -> bool: ...

    def pause(self) -> None: ...

    def unpause(self) -> None: ...

    def stop(self) -> None: ...

    async def receive(self) -> list[InboundItem] | None:
        """The items of one read; [] after a pause; None once the peer sends nothing more.

        Raises:
            WebSocketError: the peer broke its transport's framing (``code`` to close with).
        """
        ...


class OutboundSide(Protocol):
    """The write side: every byte still to go out, its budget and its framing.

    ``Outbound`` writes to a socket (WebSockets, SSE); ``PollOutbound`` keeps
    it for the next poll. Over ``max_bytes`` and back under it, and a lost
    socket, are told through the ``report`` callback given at creation.
    """

    wire: Wire
    max_bytes: int
    queued_bytes: int

    @property
    def is_idle(self) -> bool:
        """Nothing waits: a direct write would keep the order."""
        ...

    @property
    def is_sealed(self) -> bool: ...

    def queue_message(self, data: bytes) -> None:
        """Hub messages, framed by ``wire`` when they go out."""
        ...

    def queue_frame(self, frame: bytes) -> None:
        """Bytes already framed (a WebSocket control frame)."""
        ...

    def queue_rest(self, frame: bytes, sent: int) -> None:
        """A direct write took only ``sent`` bytes of ``frame``: the rest goes first."""
        ...

    def seal(self, close_frame: bytes | None) -> None:
        """Our last words (once): nothing is queued after them."""
        ...

    def drop_unsent(self) -> None:
        """Forget what waits (a slow client), except a frame already begun."""
        ...

    def close(self) -> None:
        """Drop everything, write and report nothing more."""
        ...

    async def wait_drained(self) -> None:
        """Until nothing waits (the caller bounds it)."""
        ...


class Transport(Protocol):
    """What a hub connection needs of its transport."""

    @property
    def kind(self) -> TransportKind: ...

    @property
    def fd(self) -> int:
        """The socket the output goes to, or -1 (no socket held: no direct writes)."""
        ...

    @property
    def inbound(self) -> Inbound: ...

    def outbound(
        self, *, max_bytes: int, report: ReportTo, start_writer: StartTask
    ) -> OutboundSide:
        """The output side (made once, by the connection that reports to itself)."""
        ...

    def begin(self, start_task: StartTask) -> None:
        """The connection's task runs: start what the transport watches (under its guard)."""
        ...

    def wire_for(self, protocol: HubProtocol) -> Wire | None:
        """How ``protocol`` travels here; None if it cannot (the handshake is refused)."""
        ...

    def pong(self, payload: bytes) -> bytes:
        """The answer to a transport-level ping (WebSockets only)."""
        ...

    def goodbye(self) -> bytes | None:
        """What ends the output when the server closes (a close frame), if anything."""
        ...

    def close_reply(self, close: PeerClose) -> bytes | None:
        """The answer to the peer's transport-level close."""
        ...

    def error_reply(self, error: WebSocketError) -> bytes | None:
        """What to send before dropping a peer that broke the framing."""
        ...

    def close(self) -> None:
        """Release the socket now: every wait on it wakes (ClosedResourceError)."""
        ...


class WebSocketTransport:
    """One WebSocket (RFC 6455) both ways, after an accepted upgrade.

    Args:
        stream: the upgraded TCP stream.
        received: bytes that arrived after the upgrade request.
    """

    __slots__ = ("_inbound", "_sock", "fd")

    kind: Final = TransportKind.WEBSOCKETS

    def __init__(self, stream: trio.SocketStream, received: bytes) -> None:
        self._sock = stream.socket
        self.fd = stream.socket.fileno()
        self._inbound = WebSocketInbound(self.fd, received)

    @property
    def inbound(self) -> WebSocketInbound:
        return self._inbound

    def outbound(self, *, max_bytes: int, report: ReportTo, start_writer: StartTask) -> Outbound:
        return Outbound(
            self.fd,
            wire=handshake_wire(self.kind),  # text frames until the handshake
            max_bytes=max_bytes,
            report=report,
            start_writer=start_writer,
        )

    def wire_for(self, protocol: HubProtocol) -> Wire | None:
        return wire_for(self.kind, protocol)

    def begin(self, start_task: StartTask) -> None:
        pass  # the connection's task itself reads the socket

    def pong(self, payload: bytes) -> bytes:
        return pong_frame(payload)

    def goodbye(self) -> bytes:
        return close_frame(NORMAL_CLOSURE)

    def close_reply(self, close: PeerClose) -> bytes:
        return close_reply(close)

    def error_reply(self, error: WebSocketError) -> bytes:
        return close_frame(error.code)

    def close(self) -> None:
        self._sock.close()
