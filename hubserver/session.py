"""One hub connection over a WebSocket, around hubcore, in one task.

Memory per idle connection is what bounds how many subscribers a process
holds (issue #4: 10 KiB at 10,000), so an idle session is one Trio task
waiting for its socket to be readable, and nothing else:

- Reading: the connection's task (``run``) goes socket -> ``FrameReader``
  (RFC 6455, small state) -> hubcore -> dispatch.
- Writing happens where the bytes are made, with non-blocking sends: the
  router's ``deliver`` writes an event's shared frame straight to the socket
  (no task switch, no copy, no hubcore call: hubcore hears of those writes in
  bulk through ``note_sent``), and replies, pings and closes are written at
  once the same way. Only when the kernel does not take everything is a
  writer task started (in the server's task nursery); it waits with
  ``trio.lowlevel.wait_writable``, sends what is queued, joining queued hub
  messages into one WebSocket frame, and ends when nothing is left. At most
  one writes at a time: while it runs, everything queues behind it.
- Timers (keep-alive Ping, handshake and client timeouts, token expiry, the
  resume window, the closing handshake's bound) are served for every session
  by one server-wide ``TimerQueue`` calling ``on_timer``.

A connection whose queue grows past ``max_outbox_bytes`` is closed with a
Close that allows reconnect, and counted; it never slows anyone else. Ending
a connection closes its socket, which wakes whichever of its tasks waits on
it (``notify_closing``), so every wait has a cancel path.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import trio

from hubcore import (
    CancelInvocation,
    Close,
    Completion,
    ConnectionClosed,
    ConnectionState,
    HandshakeRequest,
    HandshakeResponse,
    HubConnection,
    HubLimits,
    HubProtocol,
    Invocation,
    LocalProtocolError,
    PreparedMessage,
    RemoteProtocolError,
    StreamInvocation,
    TransferFormat,
)

from .backplane import BackplaneError
from .routing import Delivery, GroupKey, Hub, Replay, gap_message
from .timers import TimerQueue
from .transports import (
    OPCODE_BINARY,
    OPCODE_TEXT,
    FrameReader,
    PeerClose,
    PeerPing,
    WebSocketError,
    close_frame,
    close_reply,
    pong_frame,
    server_frame,
)

__all__ = ["HubSession", "ReplayFn", "SessionContext", "SessionStats"]

ReplayFn = Callable[[Hub, str, int], Awaitable[Replay]]

log = logging.getLogger("hubserver.session")

RECEIVE_BYTES: Final = 65536
#: How long we wait for the peer's closing handshake (ASP.NET Core: 5 s).
CLOSE_TIMEOUT: Final = 5.0
#: A resume's history fetch must finish within this many seconds.
RESUME_TIMEOUT: Final = 10.0
#: Deliveries a connection may hold while its resume is prepared.
MAX_HELD_DELIVERIES: Final = 100_000
NORMAL_CLOSURE: Final = 1000
SLOW_CLIENT_TEXT: Final = "Connection closed: the client did not keep up with the event stream."
ACCESS_REVOKED_TEXT: Final = "Access to this stream was revoked."


def _method_missing(target: str) -> str:
    # What ASP.NET Core answers for an unknown hub method (spec §3.3).
    return (
        f"Failed to invoke '{target}' due to an error on the server. "
        "HubException: Method does not exist."
    )


@dataclass(slots=True)
class SessionStats:
    """Counters shared by all sessions of a server (read by tests and /metrics)."""

    open: int = 0
    opened: int = 0
    slow_closed: int = 0
    expired_closed: int = 0
    revoked_closed: int = 0
    protocol_errors: int = 0
    by_id: dict[int, HubSession] = field(default_factory=dict)
    #: Set by the server when it drains; fired when the last session ends.
    drained: trio.Event | None = None


@dataclass(slots=True, kw_only=True)
class SessionContext:
    """What every session of a server shares (one object, so a session stays small).

    Attributes:
        tasks: the nursery that owns writer and resume tasks; it outlives
            every session (the server's connection nursery).
        join / leave: add to / remove from the router (called once each).
    """

    limits: HubLimits
    max_outbox_bytes: int
    resume_window: float
    join: Callable[[HubSession], None]
    leave: Callable[[HubSession], None]
    replay: ReplayFn
    stats: SessionStats
    timers: TimerQueue
    tasks: trio.Nursery


class HubSession:
    """A subscriber connection to one group, after a successful upgrade.

    Args:
        stream: the TCP stream, already switched to WebSocket.
        received: bytes that arrived after the upgrade request.
        key: the group this connection receives.
        token_expires_at: the token's ``exp`` in unix seconds, or None.
        since_seq: the resume point from the URL, if any.
    """

    __slots__ = (
        "_aborted",
        "_close_queued",
        "_ctx",
        "_direct",
        "_fd",
        "_finishing",
        "_first_live_seq",
        "_flushed",
        "_frames",
        "_goodbye_at",
        "_held",
        "_hold_deadline",
        "_hub",
        "_joined",
        "_opcode",
        "_outbox",
        "_pending",
        "_protocol",
        "_queued_bytes",
        "_reading",
        "_received",
        "_replayed_upto",
        "_resuming",
        "_sent_at",
        "_since_seq",
        "_sock",
        "_token_deadline",
        "_writing",
        "key",
        "session_id",
        "subject",
        "timer_at",
    )

    def __init__(
        self,
        *,
        stream: trio.SocketStream,
        received: bytes,
        ctx: SessionContext,
        key: GroupKey,
        subject: str,
        token_expires_at: float | None,
        session_id: int,
        since_seq: int | None = None,
    ) -> None:
        now = trio.current_time()
        self.key = key
        self.subject = subject
        self.session_id = session_id
        self.timer_at = math.inf
        self._ctx = ctx
        self._sock = stream.socket
        self._fd = stream.socket.fileno()
        self._received: bytes | None = received or None
        self._frames = FrameReader()
        self._hub = HubConnection(now=now, limits=ctx.limits)
        self._joined = False
        self._opcode = OPCODE_TEXT
        self._protocol: HubProtocol | None = None
        # Outbound, in the order it goes out: whole frames (the unsent rest of a
        # direct write first), then hub messages still to be framed (several go
        # in one frame). Lists only while something waits: most sessions never
        # queue anything after their handshake.
        self._pending: list[bytes | memoryview] | None = None
        self._outbox: list[bytes] | None = None
        self._queued_bytes = 0
        # True while a writer (task, or ``run`` saying goodbye) owns the socket's output.
        self._writing = False
        self._flushed: trio.Event | None = None
        # True only while nothing is queued or being written and no resume, hold
        # or close is under way: ``deliver`` may then write the shared frame itself.
        self._direct = False
        self._sent_at = now  # last direct write, told to hubcore in bulk
        self._reading = True
        self._finishing = False
        self._close_queued = False
        self._aborted = False
        self._goodbye_at = math.inf
        # Resume (issue #5): live deliveries wait in ``_held`` while a replay
        # is prepared, or during the short window after the handshake in which
        # a reconnecting client calls Resume, so replay and live stay in order.
        self._since_seq = since_seq
        self._held: list[Delivery] | None = None
        self._hold_deadline = math.inf
        self._resuming = False
        self._first_live_seq: int | None = None
        # Seqs up to here went out in a replay: a live copy arriving late is dropped.
        self._replayed_upto = 0
        self._token_deadline = math.inf
        if token_expires_at is not None:
            self._token_deadline = now + (token_expires_at - time.time())

    # -- delivery (called by the router, synchronously) --------------------------

    def deliver(self, delivery: Delivery, now: float) -> None:
        if self._direct and delivery.first_seq > self._replayed_upto:
            # The common case: nothing queued, no resume under way. The shared
            # frame goes straight to the socket; hubcore hears of it in bulk
            # (note_sent) when the timer next looks. Most deliveries end here,
            # with one send() and no task switch.
            self._sent_at = now
            frame = delivery.frame_for(self._opcode, self._protocol)  # type: ignore[arg-type]  # set at the handshake, before any delivery
            try:
                sent = os.write(self._fd, frame)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._lost(exc)
                return
            if sent == len(frame):
                return
            rest = memoryview(frame)[sent:]
            self._pending = [rest]
            self._queued_bytes = len(rest)
            self._start_writer()
            return
        self._deliver_queued(delivery, now)

    def _deliver_queued(self, delivery: Delivery, now: float) -> None:
        if self._finishing:
            return
        if self._held is not None:
            self._hold(delivery)
            return
        if delivery.first_seq <= self._replayed_upto:
            # The backplane's history can be ahead of its broadcast (Redis: the history
            # reply may beat the Pub/Sub message): what the replay sent is not sent twice.
            rest = delivery.after(self._replayed_upto)
            if rest is None:
                return
            delivery = rest
        if self._first_live_seq is None:
            self._first_live_seq = delivery.first_seq
        self._queue(self._hub.send(delivery.payload, now))
        if self._queued_bytes > self._ctx.max_outbox_bytes:
            self._ctx.stats.slow_closed += 1
            log.warning(
                "session %d: closing slow client (%d bytes queued)",
                self.session_id,
                self._queued_bytes,
            )
            self._outbox = None
            self._queued_bytes = 0
            self.close(Close(error=SLOW_CLIENT_TEXT, allow_reconnect=True))

    def restart_numbering(self) -> None:
        # The client's seqs refer to a numbering that is gone: a Gap from 1 tells
        # it to resync, and nothing new is mistaken for a replayed duplicate.
        self._replayed_upto = 0
        self._first_live_seq = None
        self._direct = False
        self.notify(gap_message(1))

    def notify(self, message: PreparedMessage) -> None:
        if not self._finishing and self._joined:
            self._queue(self._hub.send(message, trio.current_time()))

    def _hold(self, delivery: Delivery) -> None:
        held = self._held
        assert held is not None
        held.append(delivery)
        if len(held) > MAX_HELD_DELIVERIES:
            self._ctx.stats.slow_closed += 1
            log.warning("session %d: too many events waiting for a resume", self.session_id)
            self._held = None
            self.close(Close(error=SLOW_CLIENT_TEXT, allow_reconnect=True))

    def _send_delivery(self, delivery: Delivery) -> None:
        """Queue a delivery through hubcore (replays and released live events)."""
        self._queue(self._hub.send(delivery.payload, trio.current_time()))

    def _release_held(self, after_seq: int) -> None:
        held, self._held = self._held or [], None
        self._hold_deadline = math.inf
        for delivery in held:
            rest = delivery.after(after_seq)
            if rest is not None:
                if self._first_live_seq is None:
                    self._first_live_seq = rest.events[0].seq
                self._send_delivery(rest)
                after_seq = rest.last_seq
        # What was held is bounded by MAX_HELD_DELIVERIES and says nothing about
        # this client's speed: only what queues up after it counts toward slowness.
        self._queued_bytes = 0
        self._update_direct()

    def _start_resume(self, since_seq: int, invocation_id: str | None) -> None:
        if self._resuming:
            if invocation_id is not None:
                error = "A resume is already in progress."
                self._queue(
                    self._hub.send(Completion.with_error(invocation_id, error), trio.current_time())
                )
            return
        self._resuming = True
        self._direct = False
        if self._held is None:
            self._held = []  # a late resume: hold what arrives during the fetch
        self._hold_deadline = math.inf
        self._ctx.tasks.start_soon(self._resume, since_seq, invocation_id)

    async def _resume(self, since_seq: int, invocation_id: str | None) -> None:
        key = self.key
        try:
            with trio.fail_after(RESUME_TIMEOUT):
                replay = await self._ctx.replay(key.hub, key.site_id, since_seq)
                is_lost = since_seq > replay.last_seq
                if is_lost:
                    # History after since_seq is empty: fetch all that is kept.
                    replay = await self._ctx.replay(key.hub, key.site_id, 0)
        except (BackplaneError, trio.TooSlowError) as exc:
            log.warning("session %d: resume failed: %s", self.session_id, exc)
            self._resuming = False
            if self._finishing:
                return
            self._release_held(since_seq)
            if invocation_id is not None:
                error = "Resume failed: the event history is unavailable; try again."
                self._queue(
                    self._hub.send(Completion.with_error(invocation_id, error), trio.current_time())
                )
            return
        if self._finishing:
            return
        after = since_seq
        if is_lost:
            # The client saw seqs this stream never reached (history was lost,
            # e.g. an in-memory backplane restarted): everything kept is new to it.
            after = 0
        events = [
            event
            for event in replay.events
            if event.seq > after and (key.user_id is None or event.user_id == key.user_id)
        ]
        if self._first_live_seq is not None:
            # Live events from this seq on were delivered already (a late Resume).
            events = [event for event in events if event.seq < self._first_live_seq]
        now = trio.current_time()
        if after + 1 < replay.first_available or after != since_seq:
            self._queue(self._hub.send(gap_message(replay.first_available), now))
        last = after
        if events:
            self._send_delivery(Delivery(events))
            last = events[-1].seq
        # The client has everything up to here; a live copy arriving late (the
        # backplane's broadcast can trail its history) is not sent again.
        self._replayed_upto = max(self._replayed_upto, last)
        if invocation_id is not None:
            self._queue(self._hub.send(Completion.void(invocation_id), now))
        self._resuming = False
        self._release_held(last)

    def close(self, message: Close) -> None:
        """Send ``message`` after what is queued, then end the connection."""
        if self._finishing:
            return
        self._leave_group()
        state = self._hub.state
        if state in (ConnectionState.OPEN, ConnectionState.CLOSING, ConnectionState.ERROR):
            with contextlib.suppress(LocalProtocolError):  # already closed: nothing to say
                self._queue(self._hub.send(message, trio.current_time()))
        self._finish()

    # -- timers (called by the server's TimerQueue) --------------------------------

    def on_timer(self, now: float) -> None:
        if self._aborted:
            return
        if now >= self._goodbye_at:
            log.info("session %d: no closing handshake in time, dropping", self.session_id)
            self._abort()
            return
        hub = self._hub
        if now >= self._hold_deadline and not self._resuming and not self._finishing:
            self._release_held(0)  # no Resume came: live events go out as they are
        if now >= self._token_deadline and not self._finishing:
            self._ctx.stats.expired_closed += 1
            # ASP.NET Core's close on authentication expiry: no error text,
            # reconnect allowed, so clients come back with a fresh token (spec §5).
            self.close(Close(allow_reconnect=True))
        elif not self._finishing:
            self._tell_hubcore_of_direct_writes()
            timer = hub.next_deadline()
            if timer is not None and now >= timer:
                self._queue(hub.handle_timer(now))
                if hub.state is ConnectionState.CLOSED:
                    log.info("session %d: timed out", self.session_id)
                    self._finish()
        self._schedule()

    def _schedule(self) -> None:
        deadline = self._goodbye_at
        if not self._finishing:
            deadline = min(
                self._hub.next_deadline() or math.inf, self._token_deadline, self._hold_deadline
            )
        if deadline < math.inf:
            self._ctx.timers.schedule(self, deadline)

    def _tell_hubcore_of_direct_writes(self) -> None:
        hub = self._hub
        if hub.state is ConnectionState.OPEN and not hub.is_stateful:
            hub.note_sent(self._sent_at)

    # -- output --------------------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        """Queue hub bytes (framed when written) and write what the socket takes now."""
        if data and not self._close_queued:  # nothing may follow a close frame
            self._direct = False
            if self._outbox is None:
                self._outbox = [data]
            else:
                self._outbox.append(data)
            self._queued_bytes += len(data)
            self._flush()

    def _queue_frame(self, frame: bytes) -> None:
        """Queue a whole WebSocket frame (a control frame) after everything queued."""
        if self._close_queued:
            return
        self._direct = False
        self._frame_outbox()
        if self._pending is None:
            self._pending = [frame]
        else:
            self._pending.append(frame)
        self._flush()

    def _queue_close(self, frame: bytes) -> None:
        """Queue our close frame (once): the last thing this connection sends."""
        if not self._close_queued:
            self._queue_frame(frame)
            self._close_queued = True
            if not self._writing and not self._reading and not self._aborted:
                self._abort()  # all said, and the peer is done: nothing left to wait for

    def _frame_outbox(self) -> None:
        outbox = self._outbox
        if outbox is not None:
            self._outbox = None
            payload = b"".join(outbox) if len(outbox) > 1 else outbox[0]
            frame = server_frame(self._opcode, payload)
            if self._pending is None:
                self._pending = [frame]
            else:
                self._pending.append(frame)

    def _take_output(self) -> bytes | memoryview | None:
        """Everything queued, as one buffer to write; None when nothing is."""
        self._frame_outbox()
        pending, self._pending = self._pending, None
        self._queued_bytes = 0
        if pending is None:
            return None
        return pending[0] if len(pending) == 1 else b"".join(pending)

    def _flush(self) -> None:
        """Write what is queued now, as far as the socket takes it; a task writes the rest."""
        if self._writing:
            return  # the writer sends it after what it is writing
        data = self._take_output()
        if data is None:
            self._update_direct()
            return
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(exc)
            return
        if sent < len(data):
            self._pending = [memoryview(data)[sent:]]
            self._queued_bytes = len(data) - sent
            self._start_writer()
            return
        self._update_direct()

    def _start_writer(self) -> None:
        self._writing = True
        self._direct = False
        self._ctx.tasks.start_soon(self._writer)

    async def _writer(self) -> None:
        try:
            await self._write_out()
        except (trio.ClosedResourceError, OSError) as exc:
            if not self._aborted:
                self._lost(exc)
        finally:
            self._writing = False
            if self._flushed is not None:
                self._flushed.set()
        if self._close_queued and not self._reading:
            self._abort()  # the close frame went out and the peer is done
        else:
            self._update_direct()

    async def _write_out(self) -> None:
        """Write until nothing is queued, waiting for writability between sends."""
        fd = self._fd
        while (data := self._take_output()) is not None:
            view = memoryview(data)
            while True:
                if self._aborted:
                    raise trio.ClosedResourceError("the session was closed")
                try:
                    sent = os.write(fd, view)
                except BlockingIOError:
                    sent = 0
                if sent == len(view):
                    break
                view = view[sent:]
                await trio.lowlevel.wait_writable(fd)

    def _update_direct(self) -> None:
        self._direct = (
            not self._writing
            and self._pending is None
            and self._outbox is None
            and self._held is None
            and not self._resuming
            and self._first_live_seq is not None
            and self._joined
            and not self._finishing
            and not self._hub.is_stateful
        )

    # -- ending ----------------------------------------------------------------------

    def _finish(self) -> None:
        """Stop taking events; say goodbye (a close frame after what is queued)."""
        self._direct = False
        self._leave_group()
        if self._finishing:
            return
        self._finishing = True
        # From here the session has CLOSE_TIMEOUT to say goodbye, however the
        # peer behaves (a slow reader, a silent one).
        self._goodbye_at = trio.current_time() + CLOSE_TIMEOUT
        self._ctx.timers.schedule(self, self._goodbye_at)
        self._queue_close(close_frame(NORMAL_CLOSURE))

    def _lost(self, exc: BaseException) -> None:
        log.info("session %d: peer went away: %s", self.session_id, exc)
        self._abort()

    def _abort(self) -> None:
        """End now: close the socket, which wakes this session's waiting tasks."""
        if self._aborted:
            return
        self._aborted = True
        self._close_queued = True  # nothing more goes out
        self._direct = False
        self._finishing = True
        self._reading = False
        self._pending = self._outbox = self._held = None
        self._leave_group()
        self._ctx.timers.cancel(self)
        self._sock.close()  # notify_closing: a wait on this fd raises ClosedResourceError

    def _leave_group(self) -> None:
        if self._joined:
            self._joined = False
            self._ctx.leave(self)

    # -- the connection's task --------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes; never raises for peer behaviour."""
        stats = self._ctx.stats
        stats.open += 1
        stats.opened += 1
        stats.by_id[self.session_id] = self
        try:
            self._schedule()  # the handshake timeout
            received, self._received = self._received, None
            if received:
                self._on_data(received)
            await self._read()
            if not self._aborted:
                self._finish()
                await self._say_goodbye()
        finally:
            self._abort()
            stats.open -= 1
            stats.by_id.pop(self.session_id, None)
            if stats.open == 0 and stats.drained is not None:
                stats.drained.set()

    async def _read(self) -> None:
        fd = self._fd
        while self._reading:
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:
                return  # ended by _abort
            if self._aborted:
                return  # the fd may already be someone else's
            try:
                data = os.read(fd, RECEIVE_BYTES)
            except BlockingIOError:
                continue
            except OSError as exc:
                log.info("session %d: transport lost: %s", self.session_id, exc)
                data = b""
            if not data:
                self._peer_done(None)
                return
            self._on_data(data)

    async def _say_goodbye(self) -> None:
        """Let queued output (the close frame last) go out, within the goodbye deadline."""
        with trio.move_on_at(self._goodbye_at):
            if self._writing:
                self._flushed = trio.Event()
                await self._flushed.wait()
            elif self._pending is not None or self._outbox is not None:
                self._writing = True
                try:
                    await self._write_out()
                except (trio.ClosedResourceError, OSError) as exc:
                    log.info("session %d: peer went away at goodbye: %s", self.session_id, exc)
                finally:
                    self._writing = False

    def _peer_done(self, reply: bytes | None) -> None:
        """The peer sends nothing more: answer with ``reply`` (a close frame), then finish.

        ``reply`` is None after a bare EOF: nobody would read a close frame.
        """
        self._reading = False
        if reply is not None:
            self._queue_close(reply)
        hub = self._hub
        if hub.state is not ConnectionState.CLOSED:
            hub.receive_eof(trio.current_time())
            self._on_hub_events()
        if reply is None:
            self._close_queued = True
        self._finish()

    def _on_data(self, data: bytes) -> None:
        try:
            items = self._frames.receive_data(data)
        except WebSocketError as exc:
            log.info("session %d: bad WebSocket data: %s", self.session_id, exc)
            self._peer_done(close_frame(exc.code))
            return
        now = trio.current_time()
        hub = self._hub
        for item in items:
            if type(item) is bytes:
                if not self._finishing:
                    hub.receive_data(item, now)
            elif isinstance(item, PeerPing):
                self._queue_frame(pong_frame(item.payload))
            elif isinstance(item, PeerClose):
                self._peer_done(close_reply(item))
                return
        self._on_hub_events()
        self._schedule()

    def _on_hub_events(self) -> None:
        hub = self._hub
        now = trio.current_time()
        while not self._finishing:
            try:
                event = hub.next_event()
            except RemoteProtocolError as exc:
                self._ctx.stats.protocol_errors += 1
                log.info("session %d: protocol error: %s", self.session_id, exc)
                if exc.handshake_error is not None:
                    self._queue(hub.send(HandshakeResponse(error=exc.handshake_error), now))
                    self._finish()
                else:
                    self.close(exc.close_hint)
                return
            if event is None:
                return
            match event:
                case HandshakeRequest():
                    self._on_handshake(now)
                case Invocation() if event.target.lower() == "resume":
                    self._on_resume(event)
                case Invocation() | StreamInvocation():
                    # No other server methods; answer like ASP.NET Core.
                    if event.invocation_id is not None:
                        reply = Completion.with_error(
                            event.invocation_id, _method_missing(event.target)
                        )
                        self._queue(hub.send(reply, now))
                case Close():
                    self.close(Close())
                case ConnectionClosed():
                    self._finish()
                case CancelInvocation() | _:
                    pass  # Ping, Ack, Sequence, StreamItem, Completion: nothing to do

    def _on_handshake(self, now: float) -> None:
        hub = self._hub
        protocol = hub.protocol
        assert protocol is not None
        # ASP.NET Core picks the frame type before writing the response.
        if protocol.transfer_format is TransferFormat.BINARY:
            self._opcode = OPCODE_BINARY
        self._protocol = protocol
        self._queue(hub.send(HandshakeResponse(), now))
        self._joined = True
        self._ctx.join(self)
        if self._since_seq is not None:
            self._start_resume(self._since_seq, None)
        elif self._ctx.resume_window > 0:
            self._held = []
            self._direct = False
            self._hold_deadline = now + self._ctx.resume_window
            self._ctx.timers.schedule(self, self._hold_deadline)

    def _on_resume(self, event: Invocation) -> None:
        arguments = event.arguments
        since = arguments[0] if len(arguments) == 1 else None
        if type(since) is not int or since < 0:
            if event.invocation_id is not None:
                # ASP.NET Core's answer for wrong arguments (spec §3.3).
                error = f"Failed to invoke '{event.target}' due to an error on the server."
                reply = Completion.with_error(event.invocation_id, error)
                self._queue(self._hub.send(reply, trio.current_time()))
            return
        self._start_resume(since, event.invocation_id)
