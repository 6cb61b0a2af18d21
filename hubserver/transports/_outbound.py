"""Everything a connection has yet to write to its socket, the one budget that counts it,
and its writer (WebSockets and Server-Sent Events: a socket the server writes to).

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
pongs and closes alike. Hub messages are framed by the connection's wire
(``_wire.py``): a WebSocket frame, or a Server-Sent Event. Crossing
``max_bytes`` is reported (the connection stops reading from its client, and
closes it if it stays over); so is the queue draining, and the socket
failing. That one callback is how this part speaks to its connection.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Awaitable, Callable

import trio

from ._wire import Wire

__all__ = ["Outbound", "OutputBudget", "Report", "ReportTo", "StartTask"]


class Report(enum.Enum):
    #: Bytes wait for a writer: the connection must not write directly now.
    BUSY = "busy"
    #: ``queued_bytes`` went over ``max_bytes``.
    OVER_BUDGET = "over budget"
    #: Nothing waits any more (the writer finished, or a flush wrote all).
    DRAINED = "drained"
    #: The socket failed; the connection must end.
    LOST = "lost"


#: The connection's callback: a ``Report``, and the error for LOST.
ReportTo = Callable[[Report, BaseException | None], None]
#: Starts a coroutine function under the connection's guard.
StartTask = Callable[[Callable[[], Awaitable[None]]], None]


def _ignore(report: Report, exc: BaseException | None) -> None:
    pass  # a closed output side reports nothing (and holds no reference to its owner)


class OutputBudget:
    """The one budget that counts every byte a connection has yet to send.

    The base of both output sides: ``Outbound`` (a socket's queue) and
    ``PollOutbound`` (what waits for the next poll). Going over ``max_bytes``
    is reported once (OVER_BUDGET), until the output is back under it
    (``_report_drained``).

    Args:
        max_bytes: the budget.
        report: the connection's callback.
    """

    __slots__ = ("_report", "is_over_budget", "max_bytes", "queued_bytes")

    def __init__(self, max_bytes: int, report: ReportTo) -> None:
        self.max_bytes = max_bytes
        self._report = report
        self.queued_bytes = 0
        self.is_over_budget = False

    def _count(self, size: int) -> None:
        self.queued_bytes += size
        if self.queued_bytes > self.max_bytes and not self.is_over_budget:
            self.is_over_budget = True
            self._report(Report.OVER_BUDGET, None)

    def _report_drained(self) -> None:
        """Nothing waits any more (so nothing over the budget)."""
        self.is_over_budget = False
        self._report(Report.DRAINED, None)

    def _silence(self) -> None:
        """Closed: report nothing more (no reference cycle through the owner's bound method)."""
        self._report = _ignore


class Outbound(OutputBudget):
    """A connection's output queue and budget.

    Args:
        fd: the socket's descriptor (non-blocking).
        wire: how hub messages are framed (set again at the hub handshake).
        max_bytes: the budget.
        report: the connection's callback (``Report``, and the error for LOST).
        start_writer: starts a coroutine function under the connection's guard.
    """

    __slots__ = (
        "_current",
        "_ends",
        "_fd",
        "_flushed",
        "_is_closed",
        "_is_sealed",
        "_is_writing",
        "_offset",
        "_outbox",
        "_pending",
        "_start_writer",
        "wire",
    )

    def __init__(
        self,
        fd: int,
        *,
        wire: Wire,
        max_bytes: int,
        report: ReportTo,
        start_writer: StartTask,
    ) -> None:
        super().__init__(max_bytes, report)
        self._fd = fd
        self.wire = wire
        self._start_writer = start_writer
        # The buffer being written, how far, and where each frame in it ends:
        # a slow client's close cuts what waits, never a frame already begun.
        self._current: bytes | None = None
        self._offset = 0
        self._ends: list[int] | None = None
        # Waiting behind it, in order: whole frames, then hub messages still to
        # be framed (several go in one frame). Lists only while something
        # waits: most connections queue nothing.
        self._pending: list[bytes] | None = None
        self._outbox: list[bytes] | None = None
        self._is_writing = False
        self._flushed: trio.Event | None = None
        # Our close frame is queued: nothing may follow it.
        self._is_sealed = False
        # The socket is closed: nothing is written any more.
        self._is_closed = False

    @property
    def is_idle(self) -> bool:
        """Nothing waits and nothing is being written: a direct write keeps the order."""
        return self._current is None and self._pending is None and self._outbox is None

    @property
    def is_sealed(self) -> bool:
        return self._is_sealed

    # -- queueing ----------------------------------------------------------------

    def queue_rest(self, frame: bytes, sent: int) -> None:
        """A direct write of ``frame`` took only ``sent`` bytes: the writer sends the rest.

        Only while idle (the caller's fast path checks): it goes first in line.
        """
        self._current, self._offset, self._ends = frame, sent, None
        self._count(len(frame) - sent)
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
        """Queue bytes already framed (a WebSocket control frame) after everything queued."""
        if not self._is_sealed:
            self._append_frame(frame)
            self.flush()

    def seal(self, close_frame: bytes | None) -> None:
        """Queue our close frame (once): the last thing this connection sends.

        None seals without a frame (after a bare EOF nobody would read one, or
        on a transport without close frames).
        """
        if not self._is_sealed:
            self._is_sealed = True
            if close_frame is not None:
                self._append_frame(close_frame)
                self.flush()

    def drop_unsent(self) -> None:
        """Forget what waits (a slow client): only a frame already begun stays, to finish it."""
        self._outbox = self._pending = None
        current, offset, ends = self._current, self._offset, self._ends
        self._ends = None
        if current is None or offset == 0:
            self._current = None
            self._offset = self.queued_bytes = 0
            return
        end = len(current) if ends is None else next(e for e in ends if e > offset)
        if end < len(current):
            self._current = current[:end]
        self.queued_bytes = end - offset

    def close(self) -> None:
        """The socket is closed: drop everything, write nothing more, report nothing."""
        self._is_closed = self._is_sealed = True
        self._current = self._pending = self._outbox = self._ends = None
        self.queued_bytes = 0
        self._silence()

    def _append_frame(self, frame: bytes) -> None:
        self._frame_outbox()
        if self._pending is None:
            self._pending = [frame]
        else:
            self._pending.append(frame)
        self._count(len(frame))

    # -- writing -----------------------------------------------------------------

    def flush(self) -> None:
        """Write what waits now, as far as the socket takes it; a task writes the rest."""
        if self._is_writing or self._is_closed:
            return  # the writer sends it after what it is writing
        if self._current is None and not self._take_output():
            return
        try:
            self._write_some()
        except OSError as exc:
            self._report(Report.LOST, exc)
            return
        if self._current is None:
            self._drained()
        else:
            self._begin_writing()

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
            self._report(Report.BUSY, None)
            self._start_writer(self._writer)

    async def _writer(self) -> None:
        try:
            await self._write_out()
        except (trio.ClosedResourceError, OSError) as exc:
            self._is_writing = False
            if not self._is_closed:
                self._report(Report.LOST, exc)
            return
        finally:
            self._is_writing = False
            if self._flushed is not None:
                self._flushed.set()
        self._drained()

    async def _write_out(self) -> None:
        """Write until nothing waits, waiting for writability between sends."""
        while self._current is not None or self._take_output():
            if self._is_closed:
                raise trio.ClosedResourceError("the connection was closed")
            self._write_some()
            if self._current is not None:
                await trio.lowlevel.wait_writable(self._fd)

    def _write_some(self) -> None:
        """One non-blocking send of the current buffer's rest."""
        current = self._current
        assert current is not None
        offset = self._offset
        try:
            sent = os.write(self._fd, memoryview(current)[offset:] if offset else current)
        except BlockingIOError:
            return
        self.queued_bytes -= sent
        offset += sent
        if offset == len(current):
            self._current = self._ends = None
            self._offset = 0
        else:
            self._offset = offset

    def _take_output(self) -> bool:
        """Make everything that waits the current buffer (one send for many frames)."""
        self._frame_outbox()
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        if len(pending) == 1:
            self._current, self._ends = pending[0], None
        else:
            self._current = b"".join(pending)
            total, ends = 0, []
            for frame in pending:
                total += len(frame)
                ends.append(total)
            self._ends = ends
        self._offset = 0
        return True

    def _frame_outbox(self) -> None:
        outbox = self._outbox
        if outbox is not None:
            self._outbox = None
            payload = b"".join(outbox) if len(outbox) > 1 else outbox[0]
            frame = self.wire.frame(payload)
            # The frame header is counted too: the budget counts bytes to write.
            self.queued_bytes += len(frame) - len(payload)
            if self._pending is None:
                self._pending = [frame]
            else:
                self._pending.append(frame)

    def _drained(self) -> None:
        if self.is_idle:
            self._report_drained()
