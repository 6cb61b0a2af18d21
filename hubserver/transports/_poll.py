"""Long polling (spec §7.3): the client asks for what is queued; it sends with POSTs.

Output waits in ``PollOutbound`` until a poll takes all of it (one response
body; hub messages as they are, JSON text or MessagePack). The budget counts
it like a socket's queue: over it, the connection stops taking the client's
POSTs, and closes it if it stays over. A poll waits at most ``poll_timeout``
(ASP.NET Core: 90 s) and then answers empty; only one poll is pending: a newer
one supersedes it (the older gets 204). The client is gone when it has not
polled for ``disconnect_timeout`` (no poll pending meanwhile) or says so with
DELETE. No pings either way (spec §4): the polls are the keep-alive.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

import trio

from hubcore import HubProtocol, get_protocol

from ._frames import PeerClose, WebSocketError
from ._outbound import Report
from ._posted import PostedInbound
from ._wire import TransportKind, Wire, wire_for

__all__ = ["PollOutbound", "PollTransport"]

#: Seconds a poll waits for output before answering empty (ASP.NET Core's PollTimeout).
POLL_TIMEOUT: Final = 90.0
#: Seconds without a pending poll after which the client is gone (ASP.NET Core's
#: DisconnectTimeout).
DISCONNECT_TIMEOUT: Final = 15.0
_JSON: Final = get_protocol("json")


class PollOutbound:
    """What waits for the next poll, and the budget that counts it."""

    __slots__ = (
        "_chunks",
        "_drained",
        "_is_closed",
        "_is_sealed",
        "_ready",
        "_report",
        "is_over_budget",
        "max_bytes",
        "queued_bytes",
        "wire",
    )

    def __init__(
        self, *, wire: Wire, max_bytes: int, report: Callable[[Report, BaseException | None], None]
    ) -> None:
        self.wire = wire
        self.max_bytes = max_bytes
        self._report = report
        self._chunks: list[bytes] = []
        self.queued_bytes = 0
        self.is_over_budget = False
        self._is_sealed = False
        self._is_closed = False
        self._ready = trio.Event()  # output waits, or the stream ended
        self._drained: trio.Event | None = None

    @property
    def is_idle(self) -> bool:
        return not self._chunks

    @property
    def is_sealed(self) -> bool:
        return self._is_sealed

    @property
    def is_closed(self) -> bool:
        return self._is_closed

    def queue_message(self, data: bytes) -> None:
        if data and not self._is_sealed:
            self._chunks.append(data)
            self.queued_bytes += len(data)
            self._ready.set()
            if self.queued_bytes > self.max_bytes and not self.is_over_budget:
                self.is_over_budget = True
                self._report(Report.OVER_BUDGET, None)

    def queue_frame(self, frame: bytes) -> None:
        self.queue_message(frame)

    def queue_rest(self, frame: bytes, sent: int) -> None:
        self.queue_message(frame[sent:])

    def seal(self, close_frame: bytes | None) -> None:
        """Nothing more will be queued: the poll that takes the rest is the last to get data."""
        self._is_sealed = True
        self._ready.set()

    def drop_unsent(self) -> None:
        self._chunks = []
        self.queued_bytes = 0

    def close(self) -> None:
        self._is_closed = self._is_sealed = True
        self._chunks = []
        self.queued_bytes = 0
        self._ready.set()
        if self._drained is not None:
            self._drained.set()
        self._report = _ignore

    async def wait_drained(self) -> None:
        """Until a poll took everything (the caller bounds it)."""
        if self._chunks and not self._is_closed:
            self._drained = trio.Event()
            await self._drained.wait()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    def take(self) -> bytes:
        """Everything queued, for a poll's body."""
        chunks, self._chunks = self._chunks, []
        self.queued_bytes = 0
        if not self._is_sealed:
            self._ready = trio.Event()
        if self._drained is not None:
            self._drained.set()
        if self.is_over_budget:
            self.is_over_budget = False
            self._report(Report.DRAINED, None)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _ignore(report: Report, exc: BaseException | None) -> None:
    pass


class PollTransport:
    """Long polling: no socket held; polls take the output, POSTs bring the input."""

    __slots__ = (
        "_inbound", "_last_poll", "_outbound", "_poll_scope", "_polls", "disconnect_timeout",
        "poll_timeout",
    )  # fmt: skip

    kind: Final = TransportKind.LONG_POLLING
    fd: Final = -1

    def __init__(
        self, *, poll_timeout: float = POLL_TIMEOUT, disconnect_timeout: float = DISCONNECT_TIMEOUT
    ) -> None:
        self.poll_timeout = poll_timeout
        self._inbound = PostedInbound()
        self._outbound: PollOutbound | None = None
        self._poll_scope: trio.CancelScope | None = None
        self._polls = 0  # polls started: a poll that is no longer the last one answers 204
        self._last_poll = trio.current_time()
        self.disconnect_timeout = disconnect_timeout

    @property
    def inbound(self) -> PostedInbound:
        return self._inbound

    def outbound(
        self,
        *,
        max_bytes: int,
        report: Callable[[Report, BaseException | None], None],
        start_writer: Callable[[Callable[[], Awaitable[None]]], None],
    ) -> PollOutbound:
        wire = wire_for(TransportKind.LONG_POLLING, _JSON)
        assert wire is not None
        self._outbound = PollOutbound(wire=wire, max_bytes=max_bytes, report=report)
        return self._outbound

    def wire_for(self, protocol: HubProtocol) -> Wire | None:
        return wire_for(TransportKind.LONG_POLLING, protocol)

    def begin(self, start_task: Callable[[Callable[[], Awaitable[None]]], None]) -> None:
        start_task(self._watch)

    async def _watch(self) -> None:
        """End the connection once the client stopped polling."""
        while True:
            if self._poll_scope is None:
                idle_until = self._last_poll + self.disconnect_timeout
                if trio.current_time() >= idle_until:
                    self._inbound.end()
                    return
                await trio.sleep_until(idle_until)
            else:
                await trio.sleep(self.disconnect_timeout)

    async def poll(self) -> bytes | None:
        """What is queued (b"" after ``poll_timeout`` with nothing); None: stop polling (204)."""
        out = self._outbound
        if out is None or out.is_closed:
            return None
        self._cut_poll()  # superseded: that poll answers 204
        self._polls += 1
        number = self._polls
        scope = self._poll_scope = trio.CancelScope(
            deadline=trio.current_time() + self.poll_timeout
        )
        try:
            with scope:
                await out.wait_ready()
        finally:
            if self._poll_scope is scope:
                self._poll_scope = None
                self._last_poll = trio.current_time()
        if out.is_closed or number != self._polls:
            return None
        if out.is_idle:
            return None if out.is_sealed else b""
        return out.take()

    def _cut_poll(self) -> None:
        if self._poll_scope is not None:
            self._polls += 1
            self._poll_scope.cancel()

    def delete(self) -> None:
        """The client ends the connection (DELETE): a pending poll answers 204."""
        self._inbound.end()
        self._cut_poll()

    def pong(self, payload: bytes) -> bytes:
        return b""

    def goodbye(self) -> None:
        return None

    def close_reply(self, close: PeerClose) -> None:
        return None

    def error_reply(self, error: WebSocketError) -> None:
        return None

    def close(self) -> None:
        if self._outbound is not None:
            self._outbound.close()
        self._cut_poll()
