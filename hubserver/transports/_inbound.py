"""What a WebSocket connection reads: its socket, through the RFC 6455 reader, paused when told.

The connection's task waits here for its socket to be readable (an idle
connection is this wait and nothing else). Reading pauses while the
connection's output is over its budget: the client must read before it may
make the server answer more, and what it sent meanwhile stays in the kernel.
"""

from __future__ import annotations

import enum
import os
from typing import Final

import trio

from ._frames import FrameReader, PeerClose, PeerPing

__all__ = ["InboundItem", "Reading", "WebSocketInbound"]

RECEIVE_BYTES: Final = 65536

InboundItem = bytes | PeerPing | PeerClose


class Reading(enum.Enum):
    """Reading has its own small state: the peer can stop talking (EOF, a close
    frame, a broken frame) while the server still writes, and the server stops
    reading a client whose unread output is over its budget."""

    ACTIVE = "active"
    #: Output waits over the budget: the client must read before it may send more.
    PAUSED = "paused"
    #: The peer sends nothing more (EOF, close frame, broken frame), or we aborted.
    DONE = "done"


class WebSocketInbound:
    """The read side of one WebSocket connection.

    Args:
        fd: the socket's descriptor (non-blocking).
        received: bytes that arrived with the upgrade request.
    """

    __slots__ = ("_fd", "_frames", "_received", "_unpaused", "state")

    def __init__(self, fd: int, received: bytes) -> None:
        self._fd = fd
        self._frames = FrameReader()
        self._received: bytes | None = received or None
        self._unpaused: trio.Event | None = None
        self.state = Reading.ACTIVE

    @property
    def is_stopped(self) -> bool:
        return self.state is Reading.DONE

    def pause(self) -> None:
        if self.state is Reading.ACTIVE:
            self.state = Reading.PAUSED

    def unpause(self) -> None:
        if self.state is Reading.PAUSED:
            self.state = Reading.ACTIVE
            if self._unpaused is not None:
                self._unpaused.set()

    def stop(self) -> None:
        """Read nothing more (the peer is done, or the connection ended)."""
        self.state = Reading.DONE
        if self._unpaused is not None:
            self._unpaused.set()

    async def receive(self) -> list[InboundItem] | None:
        """What the peer sent next, as hub data, pings and its close.

        Returns:
            The items of one read; an empty list after a pause (what the last
            read brought may still wait in hubcore); None when the peer sends
            nothing more (EOF, a broken socket) or reading was stopped.

        Raises:
            WebSocketError: the peer broke RFC 6455 (its ``code`` is the close code).
        """
        if self._received is not None:
            received, self._received = self._received, None
            return self._frames.receive_data(received)
        if self.state is Reading.PAUSED:
            self._unpaused = trio.Event()
            await self._unpaused.wait()
            self._unpaused = None
            return []  # unpaused (or stopped: the next call says so)
        if self.state is Reading.DONE:
            return None
        while True:
            try:
                await trio.lowlevel.wait_readable(self._fd)
            except trio.ClosedResourceError:
                return None  # the connection ended and closed its socket
            if self.is_stopped:
                return None  # the fd may already be someone else's
            try:
                data = os.read(self._fd, RECEIVE_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                return None
            if not data:
                return None
            return self._frames.receive_data(data)
