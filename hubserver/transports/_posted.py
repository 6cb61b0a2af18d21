"""Transports whose client sends with POSTs (SSE, long polling): their read side, and
what else they share (``PostedTransport``).

Each POST's body is handed to the connection's task whole, in order, one at
a time (ASP.NET Core serialises a connection's POSTs too): ``post`` returns
once the connection took the body, so the 200 says it was received. While
the connection's output is over its budget it takes nothing, and the POST
waits (bounded by its request deadline): the same backpressure as a
WebSocket's unread socket.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import trio

from hubcore import HubProtocol

from ._frames import PeerClose, WebSocketError
from ._inbound import InboundItem, Reading
from ._outbound import StartTask
from ._wire import TransportKind, Wire, wire_for

__all__ = ["PostedInbound", "PostedTransport"]


class PostedInbound:
    """Bodies posted by the client, for the connection's task to receive."""

    __slots__ = ("_body", "_for_poster", "_for_receiver", "_is_ended", "_lock", "_taken", "state")

    def __init__(self) -> None:
        self.state = Reading.ACTIVE
        self._body: bytes | None = None
        # The body handed over was taken.
        self._taken = False
        # One wake-up each way: the connection's task waits for a body (or a
        # change of state), a POST waits for its body to be taken.
        self._for_receiver = trio.Event()
        self._for_poster = trio.Event()
        self._lock = trio.Lock()
        self._is_ended = False

    @property
    def is_stopped(self) -> bool:
        return self.state is Reading.DONE

    def pause(self) -> None:
        if self.state is Reading.ACTIVE:
            self.state = Reading.PAUSED

    def unpause(self) -> None:
        if self.state is Reading.PAUSED:
            self.state = Reading.ACTIVE
            self._for_receiver.set()

    def stop(self) -> None:
        """Take nothing more (the connection ended): a waiting POST is told so."""
        self.state = Reading.DONE
        self._for_receiver.set()
        self._for_poster.set()

    def end(self) -> None:
        """The client is gone (its stream closed, it stopped polling, it sent DELETE)."""
        self._is_ended = True
        self._for_receiver.set()
        self._for_poster.set()

    @property
    def _is_over(self) -> bool:
        return self.state is Reading.DONE or self._is_ended

    async def post(self, body: bytes) -> bool:
        """Hand ``body`` to the connection; True once taken, False if it never will be."""
        async with self._lock:
            if self._is_over:
                return False
            self._body, self._taken = body, False
            self._for_receiver.set()
            try:
                while not self._taken:
                    if self._is_over:
                        return False
                    self._for_poster = trio.Event()
                    await self._for_poster.wait()
            finally:
                if not self._taken:
                    self._body = None  # cancelled or refused: the connection must not take it
            return True

    async def receive(self) -> list[InboundItem] | None:
        """The next body; [] after a pause; None once the client is gone or reading stopped."""
        was_paused = False
        while True:
            if self._is_over:
                return None
            if self.state is Reading.PAUSED:
                was_paused = True
            elif was_paused:
                return []  # unpaused: what waits in hubcore goes first
            elif self._body is not None:
                body, self._body = self._body, None
                self._taken = True
                self._for_poster.set()
                return [body]
            self._for_receiver = trio.Event()
            await self._for_receiver.wait()


class PostedTransport(abc.ABC):
    """What SSE and long polling share: the client's data comes in POSTs, and
    there is nothing at the transport's level to answer (no pings, no close
    frames): a connection just ends.

    A subclass names its ``kind``, makes its output side (``outbound``), and
    watches for its client to be gone (``_watch``, started by ``begin``).
    """

    __slots__ = ("_inbound",)

    kind: ClassVar[TransportKind]

    def __init__(self) -> None:
        self._inbound = PostedInbound()

    @property
    def inbound(self) -> PostedInbound:
        return self._inbound

    def wire_for(self, protocol: HubProtocol) -> Wire | None:
        return wire_for(self.kind, protocol)

    def begin(self, start_task: StartTask) -> None:
        start_task(self._watch)

    @abc.abstractmethod
    async def _watch(self) -> None:
        """Until the client is gone (then ``end`` the inbound side) or the connection ended."""

    def pong(self, payload: bytes) -> bytes:
        return b""

    def goodbye(self) -> None:
        return None

    def close_reply(self, close: PeerClose) -> None:
        return None

    def error_reply(self, error: WebSocketError) -> None:
        return None
