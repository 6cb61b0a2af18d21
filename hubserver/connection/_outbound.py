"""Everything a connection has yet to write, the one budget that counts it, and its writer.

Most bytes never queue: a delivery's shared frame is written straight to the
socket by the router's call (see ``HubSession.deliver``), and replies go out
at once the same way. Only what the kernel does not take waits here, in
order: whole frames (the unsent rest of a direct write first), then hub
messages still to be framed (several go in one frame). Then a writer task,
started under the connection's guard, waits for writability, writes, and
ends when nothing is left. At most one writes at a time; while it runs,
everything queues behind it.

``queued_bytes`` counts every byte not yet taken by the kernel, including
the buffer the writer is in the middle of: deliveries, replays, completions,
pongs and closes alike. Crossing ``max_bytes`` is reported (the connection
stops reading from its client, and closes it if it stays over); so is the
queue draining, and the socket failing. That one callback is how this part
speaks to its connection.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from hubserver.transports import server_frame

__all__ = ["Outbound", "Report"]


class Report(enum.Enum):
    #: ``queued_bytes`` went over ``max_bytes``.
    OVER_BUDGET = "over budget"
    #: Nothing waits any more (the writer finished, or a flush wrote all).
    DRAINED = "drained"
    #: The socket failed; the connection must end.
    LOST = "lost"


#: Frames a write may join: one ``send`` for many small queued frames.
_JOIN: Final = b"".join


class Outbound:
    """A connection's output queue and budget.

    Args:
        fd: the socket's descriptor (non-blocking).
        opcode: the WebSocket frame type hub messages go in.
        max_bytes: the budget.
        report: the connection's callback (``Report``, and the error for LOST).
        start_writer: starts a coroutine function under the connection's guard.
    """

    __slots__ = (
        "_fd",
        "_flushed",
        "_in_flight",
        "_is_closed",
        "_is_sealed",
        "_is_writing",
        "_outbox",
        "_pending",
        "_report",
        "_start_writer",
        "is_over_budget",
        "max_bytes",
        "opcode",
        "queued_bytes",
    )

    def __init__(
        self,
        fd: int,
        *,
        opcode: int,
        max_bytes: int,
        report: Callable[[Report, BaseException | None], None],
        start_writer: Callable[[Callable[[], Awaitable[None]]], None],
    ) -> None:
        self._fd = fd
        self.opcode = opcode
        self.max_bytes = max_bytes
        self._report = report
        self._start_writer = start_writer
        # Lists only while something waits: most connections queue nothing.
        self._pending: list[bytes | memoryview] | None = None
        self._outbox: list[bytes] | None = None
        self.queued_bytes = 0
        self.is_over_budget = False
        self._is_writing = False
        # Bytes of the buffer the writer is in the middle of (a frame cannot be cut short).
        self._in_flight = 0
        self._flushed: trio.Event | None = None
        # Our close frame is queued: nothing may follow it.
        self._is_sealed = False
        # The socket is closed: nothing is written any more.
        self._is_closed = False

    @property
    def is_idle(self) -> bool:
        """Nothing waits and nothing is being written: a direct write keeps the order."""
        return not self._is_writing and self._pending is None and self._outbox is None

    @property
    def is_sealed(self) -> bool:
        return self._is_sealed

    # -- queueing ----------------------------------------------------------------

    def queue_rest(self, rest: memoryview) -> None:
        """The unsent rest of a direct write: first in line, the writer sends it."""
        self._pending = [rest]
        self._count(len(rest))
        self._begin_writing()

    def queue_message(self, data: bytes) -> None:
        """Queue hub bytes (framed when written) and write what the socket takes now."""
        if data and not self._is_sealed:
            if self._outbox is None:
                self._outbox = [data]
            else:
                self._outbox.append(data)
            self._count(len(data))
            self.flush()

    def queue_frame(self, frame: bytes) -> None:
        """Queue a whole WebSocket frame (a control frame) after everything queued."""
        if self._is_sealed:
            return
        self._frame_outbox()
        if self._pending is None:
            self._pending = [frame]
        else:
            self._pending.append(frame)
        self._count(len(frame))
        self.flush()

    def seal(self, close_frame: bytes | None) -> None:
        """Queue our close frame (once): the last thing this connection sends.

        None seals without a frame (after a bare EOF nobody would read one).
        """
        if not self._is_sealed:
            if close_frame is not None:
                self.queue_frame(close_frame)
            self._is_sealed = True

    def drop_unsent(self) -> None:
        """Forget what waits (a slow client): only a frame already begun stays, to finish it."""
        pending = self._pending
        self._outbox = self._pending = None
        self.queued_bytes = self._in_flight
        # The rest of a partial write is always a memoryview; whole frames are bytes.
        if pending and isinstance(pending[0], memoryview):
            self._pending = [pending[0]]
            self.queued_bytes += len(pending[0])

    def close(self) -> None:
        """The socket is closed: drop everything, write nothing more."""
        self._is_closed = self._is_sealed = True
        self._pending = self._outbox = None
        self.queued_bytes = 0

    def _count(self, size: int) -> None:
        self.queued_bytes += size
        if self.queued_bytes > self.max_bytes and not self.is_over_budget:
            self.is_over_budget = True
            self._report(Report.OVER_BUDGET, None)

    # -- writing -----------------------------------------------------------------

    def flush(self) -> None:
        """Write what is queued now, as far as the socket takes it; a task writes the rest."""
        if self._is_writing or self._is_closed:
            return  # the writer sends it after what it is writing
        data = self._take_output()
        if data is None:
            return
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._report(Report.LOST, exc)
            return
        self.queued_bytes -= sent
        if sent < len(data):
            self._pending = [memoryview(data)[sent:]]
            self._begin_writing()
            return
        self._drained()

    async def wait_drained(self) -> None:
        """Until nothing waits (the caller bounds it): the close frame's last chance."""
        if self._is_writing:
            self._flushed = trio.Event()
            await self._flushed.wait()
        elif not self.is_idle:
            self._is_writing = True
            try:
                await self._write_out()
            finally:
                self._is_writing = False

    def _begin_writing(self) -> None:
        if not self._is_writing:
            self._is_writing = True
            self._start_writer(self._writer)

    async def _writer(self) -> None:
        try:
            await self._write_out()
        except (trio.ClosedResourceError, OSError) as exc:
            if not self._is_closed:
                self._is_writing = False
                self._report(Report.LOST, exc)
            return
        finally:
            self._is_writing = False
            if self._flushed is not None:
                self._flushed.set()
        self._drained()

    async def _write_out(self) -> None:
        """Write until nothing is queued, waiting for writability between sends."""
        fd = self._fd
        while (data := self._take_output()) is not None:
            view = memoryview(data)
            self._in_flight = len(view)
            while True:
                if self._is_closed:
                    raise trio.ClosedResourceError("the connection was closed")
                try:
                    sent = os.write(fd, view)
                except BlockingIOError:
                    sent = 0
                self.queued_bytes -= sent
                self._in_flight -= sent
                if sent == len(view):
                    break
                view = view[sent:]
                await trio.lowlevel.wait_writable(fd)

    def _take_output(self) -> bytes | memoryview | None:
        """Everything queued, as one buffer to write; None when nothing is."""
        self._frame_outbox()
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        return pending[0] if len(pending) == 1 else _JOIN(pending)

    def _frame_outbox(self) -> None:
        outbox = self._outbox
        if outbox is not None:
            self._outbox = None
            payload = _JOIN(outbox) if len(outbox) > 1 else outbox[0]
            frame = server_frame(self.opcode, payload)
            # The frame header is counted too: the budget counts bytes to write.
            self.queued_bytes += len(frame) - len(payload)
            if self._pending is None:
                self._pending = [frame]
            else:
                self._pending.append(frame)

    def _drained(self) -> None:
        if self._pending is None and self._outbox is None:
            self.is_over_budget = False
            self._report(Report.DRAINED, None)
