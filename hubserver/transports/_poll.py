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

from typing import Final

import trio

from ._outbound import OutputBudget, ReportTo, StartTask
from ._posted import PostedTransport
from ._wire import TransportKind, Wire, handshake_wire

__all__ = ["PollOutbound", "PollTransport"]

#: Seconds a poll waits for output before answering empty (ASP.NET Core's PollTimeout).
POLL_TIMEOUT: Final = 90.0
#: Seconds without a pending poll after which the client is gone (ASP.NET Core's
#: DisconnectTimeout).
DISCONNECT_TIMEOUT: Final = 15.0


class PollOutbound(OutputBudget):
    """What waits for the next poll, and the budget that counts it."""

    __slots__ = ("_chunks", "_drained", "_is_closed", "_is_sealed", "_ready", "wire")

    def __init__(self, *, wire: Wire, max_bytes: int, report: ReportTo) -> None:
        super().__init__(max_bytes, report)
        self.wire = wire
        self._chunks: list[bytes] = []
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
            self._ready.set()
            self._count(len(data))

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
        self._silence()

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
            self._report_drained()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class PollTransport(PostedTransport):
    """Long polling: no socket held; polls take the output, POSTs bring the input."""

    __slots__ = (
        "_last_poll", "_outbound", "_poll_scope", "_polls", "disconnect_timeout", "poll_timeout",
    )  # fmt: skip

    kind = TransportKind.LONG_POLLING
    fd: Final = -1

    def __init__(
        self, *, poll_timeout: float = POLL_TIMEOUT, disconnect_timeout: float = DISCONNECT_TIMEOUT
    ) -> None:
        super().__init__()
        self.poll_timeout = poll_timeout
        self._outbound: PollOutbound | None = None
        self._poll_scope: trio.CancelScope | None = None
        self._polls = 0  # polls started: a poll that is no longer the last one answers 204
        self._last_poll = trio.current_time()
        self.disconnect_timeout = disconnect_timeout

    def outbound(
        self, *, max_bytes: int, report: ReportTo, start_writer: StartTask
    ) -> PollOutbound:
        wire = handshake_wire(self.kind)
        self._outbound = PollOutbound(wire=wire, max_bytes=max_bytes, report=report)
        return self._outbound

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

    def close(self) -> None:
        if self._outbound is not None:
            self._outbound.close()
        self._cut_poll()
