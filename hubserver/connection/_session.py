"""One hub connection over a WebSocket: the glue between its parts, in one task.

An idle connection is one Trio task waiting for its socket to be readable
(memory per idle connection bounds how many subscribers a process holds).
The parts, each owning its own state:

- ``Phase`` / ``Reading`` (``_state.py``): where the connection is in its life.
- ``Outbound``: every byte still to write, the one budget, the writer task.
- ``ResumeGate``: what a live delivery or a replay makes the connection send.
- ``TaskGuard``: the tasks the connection starts, and their failures.
- hubcore's ``HubConnection`` and the RFC 6455 ``FrameReader``.

Deliveries take a fast path while nothing waits and no resume is under way:
the router's call writes the event's shared frame straight to the socket (one
``send``, no task switch, no hubcore call; hubcore hears of those writes in
bulk through ``note_sent``). Timers (keep-alive, handshake and client
timeouts, token expiry, the resume window, the slow-client and goodbye
deadlines) are served for every connection by one ``TimerQueue``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
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
    HubProtocol,
    Invocation,
    LocalProtocolError,
    PreparedMessage,
    RemoteProtocolError,
    Sendable,
    StreamInvocation,
    TransferFormat,
)
from hubserver.backplane import BackplaneError
from hubserver.routing import Delivery, GroupKey, gap_message
from hubserver.transports import (
    OPCODE_BINARY,
    OPCODE_TEXT,
    FrameReader,
    PeerClose,
    PeerPing,
    WebSocketError,
    close_frame,
    close_reply,
    pong_frame,
)

from ._context import SessionContext
from ._guard import TaskGuard
from ._outbound import Outbound, Report
from ._resume import MAX_RESUME_SEQ, HoldOverflow, ResumeGate
from ._state import Move, Phase, Reading, next_phase

__all__ = ["ACCESS_REVOKED_TEXT", "HubSession"]

log = logging.getLogger("hubserver.session")

RECEIVE_BYTES: Final = 65536
#: How long we wait for the peer's closing handshake (ASP.NET Core: 5 s).
CLOSE_TIMEOUT: Final = 5.0
#: A resume's history fetch must finish within this many seconds.
RESUME_TIMEOUT: Final = 10.0
NORMAL_CLOSURE: Final = 1000
SLOW_CLIENT_TEXT: Final = "Connection closed: the client did not keep up with the event stream."
ACCESS_REVOKED_TEXT: Final = "Access to this stream was revoked."
BUSY_RESUMING_TEXT: Final = "A resume is already in progress."
RESUME_FAILED_TEXT: Final = "Resume failed: the event history is unavailable; try again."
#: hubcore states in which a Close can still be sent.
_MAY_CLOSE: Final = (ConnectionState.OPEN, ConnectionState.CLOSING, ConnectionState.ERROR)


def _method_missing(target: str) -> str:
    # What ASP.NET Core answers for an unknown hub method (spec §3.3).
    return (
        f"Failed to invoke '{target}' due to an error on the server. "
        "HubException: Method does not exist."
    )


class HubSession:
    """A subscriber connection to one group, from its accepted upgrade to its end.

    Args:
        stream: the TCP stream, about to switch to WebSocket.
        received: bytes that arrived after the upgrade request.
        key: the group this connection receives.
        token_expires_at: the token's ``exp`` in unix seconds, or None.
        since_seq: the resume point from the URL, if any.
    """

    __slots__ = (
        "_ctx",
        "_direct",
        "_early_close",
        "_fd",
        "_frames",
        "_gate",
        "_goodbye_at",
        "_guard",
        "_hub",
        "_live_ceiling",
        "_out",
        "_phase",
        "_protocol",
        "_reading",
        "_received",
        "_sent_at",
        "_since_seq",
        "_slow_deadline",
        "_sock",
        "_token_deadline",
        "_unpaused",
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
        self._phase = Phase.UPGRADING
        self._reading = Reading.ACTIVE
        self._unpaused: trio.Event | None = None
        self._guard = TaskGuard(ctx.tasks, self._crash)
        self._out = Outbound(
            self._fd,
            opcode=OPCODE_TEXT,
            max_bytes=ctx.max_outbox_bytes,
            report=self._on_output,
            start_writer=self._guard.start_soon,
        )
        self._gate = ResumeGate(key.user_id)
        self._since_seq = since_seq
        # True only while a delivery may write its shared frame itself (see ``deliver``).
        self._direct = False
        # Live events close a client at once only past this (2x the budget, plus
        # a replay still queued); over the budget alone, the slow deadline decides.
        self._live_ceiling = 2 * ctx.max_outbox_bytes
        # A close asked for before the hub handshake: sent right after it.
        self._early_close: Close | None = None
        self._protocol: HubProtocol | None = None
        self._sent_at = now  # last direct write, told to hubcore in bulk
        self._goodbye_at = math.inf
        self._slow_deadline = math.inf
        self._token_deadline = math.inf
        if token_expires_at is not None:
            self._token_deadline = now + (token_expires_at - time.time())

    # -- registration (before the 101 goes out) -----------------------------------

    def register(self) -> None:
        """Make the connection known to role changes and the drain (once, before the 101)."""
        stats = self._ctx.stats
        stats.open += 1
        stats.opened += 1
        stats.by_id[self.session_id] = self

    def discard(self) -> None:
        """The 101 never went out: end a registered connection that will not run."""
        self._abort()
        self._unregister()

    def _unregister(self) -> None:
        stats = self._ctx.stats
        if stats.by_id.pop(self.session_id, None) is not None:
            stats.open -= 1
            if stats.open == 0 and stats.drained is not None:
                stats.drained.set()

    # -- delivery (called by the router, synchronously) --------------------------

    def deliver(self, delivery: Delivery, now: float) -> None:
        try:
            if self._direct and delivery.first_seq > self._gate.replayed_upto:
                # The common case, with one send() and no task switch.
                self._sent_at = now
                frame = delivery.frame_for(self._out.opcode, self._protocol)  # type: ignore[arg-type]  # set at the handshake, before any delivery
                try:
                    sent = os.write(self._fd, frame)
                except BlockingIOError:
                    sent = 0
                if sent != len(frame):
                    self._out.queue_rest(frame, sent)  # reports BUSY: no more direct writes
                return
            self._deliver_queued(delivery, now)
        except Exception as exc:  # OSError of the socket included: this connection ends
            self._crash_or_lost(exc)

    def _deliver_queued(self, delivery: Delivery, now: float) -> None:
        if self._phase is not Phase.OPEN:
            return
        try:
            rest = self._gate.on_live(delivery)
        except HoldOverflow:
            self._close_slow("too many events waiting for a resume")
            return
        if rest is not None:
            self._send(rest.payload, now)
            if self._out.queued_bytes > self._live_ceiling:
                self._close_slow(f"{self._out.queued_bytes} bytes queued")

    def notify(self, message: PreparedMessage) -> None:
        if self._phase is Phase.OPEN:
            try:
                self._send(message, trio.current_time())
            except Exception as exc:
                self._crash_or_lost(exc)

    def restart_numbering(self) -> None:
        # The client's seqs refer to a numbering that is gone: a Gap from 1 tells
        # it to resync, and nothing new is mistaken for a replayed duplicate.
        self._gate.restart_numbering()
        self._direct = False
        self.notify(gap_message(1))

    def close(self, message: Close) -> None:
        """Send ``message`` after what is queued, then end the connection.

        Before the hub handshake (a revoke or a drain while the 101 goes out)
        the Close can only follow the handshake's answer: it waits for it, at
        most ``CLOSE_TIMEOUT``, and the connection never joins its group.
        """
        phase = self._phase
        if phase is Phase.UPGRADING or phase is Phase.HANDSHAKE:
            if self._early_close is None:
                self._early_close = message
                self._goodbye_at = trio.current_time() + CLOSE_TIMEOUT
                self._schedule()
        elif phase is Phase.OPEN:
            self._end_with(message)

    def _end_with(self, message: Close) -> None:
        if self._hub.state in _MAY_CLOSE:
            with contextlib.suppress(LocalProtocolError):  # already closed: nothing to say
                self._out.queue_message(self._hub.send(message, trio.current_time()))
        self._finish()

    # -- output ------------------------------------------------------------------

    def _send(self, item: Sendable, now: float) -> None:
        self._direct = False
        try:
            data = self._hub.send(item, now)
        except LocalProtocolError as exc:
            self._crash(exc)  # we sent at a wrong moment: our bug, this connection's end
            return
        self._out.queue_message(data)

    def _send_deliveries(self, deliveries: list[Delivery]) -> None:
        now = trio.current_time()
        for delivery in deliveries:
            self._send(delivery.payload, now)

    def _on_output(self, report: Report, exc: BaseException | None) -> None:
        if report is Report.BUSY:
            self._direct = False
        elif report is Report.DRAINED:
            self._slow_deadline = math.inf
            self._live_ceiling = 2 * self._out.max_bytes
            if self._reading is Reading.PAUSED:
                self._reading = Reading.ACTIVE
                if self._unpaused is not None:
                    self._unpaused.set()
            if self._out.is_sealed and self._reading is Reading.DONE:
                self._abort()  # all said, and the peer is done: nothing left to wait for
            else:
                self._update_direct()
        elif report is Report.OVER_BUDGET:
            # The client must read before it may make us write more.
            if self._reading is Reading.ACTIVE:
                self._reading = Reading.PAUSED
            if self._phase in (Phase.HANDSHAKE, Phase.OPEN):
                self._slow_deadline = trio.current_time() + self._ctx.slow_client_timeout
                self._schedule()
        else:
            self._lost(exc)

    def _close_slow(self, why: str) -> None:
        self._ctx.stats.slow_closed += 1
        log.warning("session %d: closing slow client (%s)", self.session_id, why)
        self._out.drop_unsent()
        self.close(Close(error=SLOW_CLIENT_TEXT, allow_reconnect=True))

    def _update_direct(self) -> None:
        self._direct = (
            self._phase is Phase.OPEN
            and self._out.is_idle
            and self._gate.is_passthrough
            and not self._hub.is_stateful
        )

    # -- resume ------------------------------------------------------------------

    def _on_resume(self, event: Invocation) -> None:
        arguments = event.arguments
        since = arguments[0] if len(arguments) == 1 else None
        if type(since) is not int or not 0 <= since <= MAX_RESUME_SEQ:
            if event.invocation_id is not None:
                # ASP.NET Core's answer for arguments it cannot bind (spec §3.3).
                error = f"Failed to invoke '{event.target}' due to an error on the server."
                self._send(Completion.with_error(event.invocation_id, error), trio.current_time())
            return
        self._start_resume(since, event.invocation_id)

    def _start_resume(self, since_seq: int, invocation_id: str | None) -> None:
        if not self._gate.begin():
            if invocation_id is not None:
                reply = Completion.with_error(invocation_id, BUSY_RESUMING_TEXT)
                self._send(reply, trio.current_time())
            return
        self._direct = False
        self._guard.start_soon(self._resume, since_seq, invocation_id)

    async def _resume(self, since_seq: int, invocation_id: str | None) -> None:
        key = self.key
        try:
            with trio.fail_after(RESUME_TIMEOUT):
                replay = await self._ctx.replay(key.hub, key.site_id, since_seq)
                is_lost = since_seq > replay.last_seq
                if is_lost:  # history after since_seq is empty: fetch all that is kept
                    replay = await self._ctx.replay(key.hub, key.site_id, 0)
        except (BackplaneError, trio.TooSlowError) as exc:
            log.warning("session %d: resume failed: %s", self.session_id, exc)
            released = self._gate.fail(since_seq)
            if self._phase is Phase.OPEN:
                self._send_deliveries(released)
                if invocation_id is not None:
                    reply = Completion.with_error(invocation_id, RESUME_FAILED_TEXT)
                    self._send(reply, trio.current_time())
                self._update_direct()
            return
        if self._phase is not Phase.OPEN:
            return
        outcome = self._gate.complete(since_seq, replay, is_lost=is_lost)
        now = trio.current_time()
        queued_before = self._out.queued_bytes
        if outcome.gap is not None:
            self._send(outcome.gap, now)
        if outcome.replay is not None:
            self._send(outcome.replay.payload, now)
        if invocation_id is not None:
            self._send(Completion.void(invocation_id), now)
        self._send_deliveries(outcome.released)
        if not self._out.is_idle:
            # A replay says nothing of the client's speed: live events may queue
            # behind it before the slow deadline judges.
            self._live_ceiling += self._out.queued_bytes - queued_before
        self._update_direct()

    # -- timers (called by the server's TimerQueue) --------------------------------

    def on_timer(self, now: float) -> None:
        try:
            self._on_timer(now)
        except Exception as exc:
            self._crash_or_lost(exc)

    def _on_timer(self, now: float) -> None:
        phase = self._phase
        if phase is Phase.CLOSED:
            return
        if phase is Phase.CLOSING:
            if now >= self._goodbye_at:
                log.info("session %d: no closing handshake in time, dropping", self.session_id)
                self._abort()
                return
        elif now >= self._goodbye_at:
            self._finish()  # closed before a hub handshake that did not come in time
        elif self._early_close is not None:
            pass  # only the handshake (hubcore's timer) or the goodbye deadline count now
        elif now >= self._token_deadline:
            self._ctx.stats.expired_closed += 1
            # ASP.NET Core's close on authentication expiry: no error text,
            # reconnect allowed, so clients come back with a fresh token (spec §5).
            self.close(Close(allow_reconnect=True))
        elif now >= self._slow_deadline:
            self._close_slow(f"{self._out.queued_bytes} bytes unread for too long")
        else:
            released = self._gate.on_timer(now)
            if released is not None:  # no Resume came: held events go out as they are
                self._send_deliveries(released)
                self._update_direct()
        hub = self._hub
        if self._phase is Phase.OPEN or self._phase is Phase.HANDSHAKE:
            if hub.state is ConnectionState.OPEN and not hub.is_stateful:
                hub.note_sent(self._sent_at)
            timer = hub.next_deadline()
            if timer is not None and now >= timer:
                self._out.queue_message(hub.handle_timer(now))
                if hub.state is ConnectionState.CLOSED:
                    log.info("session %d: timed out", self.session_id)
                    self._finish()
        self._schedule()

    def _schedule(self) -> None:
        phase = self._phase
        if phase is Phase.CLOSING:
            deadline = self._goodbye_at
        elif phase is Phase.CLOSED or phase is Phase.UPGRADING:
            return
        else:
            hub_deadline = self._hub.next_deadline()
            deadline = math.inf if hub_deadline is None else hub_deadline
            if self._early_close is not None:
                deadline = min(deadline, self._goodbye_at)
            else:
                deadline = min(
                    deadline, self._token_deadline, self._gate.hold_deadline, self._slow_deadline
                )
        if deadline < math.inf:
            self._ctx.timers.schedule(self, deadline)

    # -- ending ----------------------------------------------------------------------

    def _finish(self) -> None:
        """Stop taking events; say goodbye (a close frame after what is queued)."""
        phase = self._phase
        if phase is Phase.CLOSING or phase is Phase.CLOSED:
            return
        self._direct = False
        if phase is Phase.OPEN:
            self._ctx.leave(self)
        self._phase = next_phase(phase, Move.FINISH)
        self._gate.close()
        self._say_goodbye()

    def _say_goodbye(self) -> None:
        # From here the connection has CLOSE_TIMEOUT to say goodbye, however the
        # peer behaves (a slow reader, a silent one).
        self._goodbye_at = trio.current_time() + CLOSE_TIMEOUT
        self._ctx.timers.schedule(self, self._goodbye_at)
        self._out.seal(close_frame(NORMAL_CLOSURE))
        if self._reading is Reading.DONE and self._out.is_idle:
            self._abort()

    def _lost(self, exc: BaseException | None) -> None:
        log.info("session %d: peer went away: %s", self.session_id, exc)
        self._abort()

    def _crash_or_lost(self, exc: BaseException) -> None:
        if isinstance(exc, OSError):
            self._lost(exc)  # the socket failed under a direct write: the peer's doing
        else:
            self._crash(exc)

    def _crash(self, exc: BaseException) -> None:
        self._ctx.stats.crashed += 1
        log.error("session %d: connection handler failed", self.session_id, exc_info=exc)
        self._abort()

    def _abort(self) -> None:
        """End now: close the socket, which wakes this connection's waits."""
        phase = self._phase
        if phase is Phase.CLOSED:
            return
        if phase is Phase.OPEN:
            self._ctx.leave(self)
        self._phase = next_phase(phase, Move.ABORT)
        self._direct = False
        self._reading = Reading.DONE
        if self._unpaused is not None:
            self._unpaused.set()
        self._out.close()
        self._gate.close()
        self._guard.close()
        self._ctx.timers.cancel(self)
        self._sock.close()  # notify_closing: a wait on this fd raises ClosedResourceError

    # -- the connection's task --------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes; never raises for peer behaviour or our bugs."""
        try:
            await self._guard.run(self._serve)
        finally:
            self._abort()
            self._unregister()

    async def _serve(self) -> None:
        if self._phase is not Phase.UPGRADING:
            return  # discarded
        self._phase = next_phase(Phase.UPGRADING, Move.UPGRADED)
        self._schedule()  # the handshake timeout (and an early close's deadline)
        received, self._received = self._received, None
        if received:
            self._on_data(received)
        await self._read()
        if self._phase is not Phase.CLOSED:
            self._finish()
            with trio.move_on_at(self._goodbye_at):
                try:
                    await self._out.wait_drained()
                except (trio.ClosedResourceError, OSError) as exc:
                    log.info("session %d: peer went away at goodbye: %s", self.session_id, exc)

    async def _read(self) -> None:
        fd = self._fd
        while (reading := self._reading) is not Reading.DONE:
            if reading is Reading.PAUSED:
                self._unpaused = trio.Event()
                await self._unpaused.wait()
                self._unpaused = None
                self._on_hub_events()  # what the last read brought, before reading more
                continue
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:
                return  # ended by _abort
            if self._phase is Phase.CLOSED:
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

    def _peer_done(self, reply: bytes | None) -> None:
        """The peer sends nothing more: answer with ``reply`` (a close frame), then finish."""
        self._reading = Reading.DONE
        self._out.seal(reply)  # None after a bare EOF: nobody would read a close frame
        hub = self._hub
        if hub.state is not ConnectionState.CLOSED:
            hub.receive_eof(trio.current_time())
            self._on_hub_events()
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
                if self._phase is Phase.HANDSHAKE or self._phase is Phase.OPEN:
                    hub.receive_data(item, now)
            elif isinstance(item, PeerPing):
                self._out.queue_frame(pong_frame(item.payload))
            elif isinstance(item, PeerClose):
                self._peer_done(close_reply(item))
                return
        self._on_hub_events()
        self._schedule()

    def _on_hub_events(self) -> None:
        hub = self._hub
        now = trio.current_time()
        # Over its output budget, a client gets no more answers until it reads:
        # what it sent waits in hubcore (one read's worth at most).
        while (
            self._phase is Phase.HANDSHAKE or self._phase is Phase.OPEN
        ) and self._reading is not Reading.PAUSED:
            try:
                event = hub.next_event()
            except RemoteProtocolError as exc:
                self._ctx.stats.protocol_errors += 1
                log.info("session %d: protocol error: %s", self.session_id, exc)
                if exc.handshake_error is not None:
                    self._send(HandshakeResponse(error=exc.handshake_error), now)
                    self._finish()
                else:
                    self._end_with(exc.close_hint)
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
                        self._send(reply, now)
                case Close():
                    self.close(Close())
                case ConnectionClosed():
                    self._finish()
                case CancelInvocation() | _:
                    pass  # Ping, Ack, Sequence, StreamItem, Completion: nothing to do

    def _on_handshake(self, now: float) -> None:
        protocol = self._hub.protocol
        assert protocol is not None
        # ASP.NET Core picks the frame type before writing the response.
        if protocol.transfer_format is TransferFormat.BINARY:
            self._out.opcode = OPCODE_BINARY
        self._protocol = protocol
        self._send(HandshakeResponse(), now)
        if self._phase is not Phase.HANDSHAKE:
            return  # the answer's write failed: the connection has ended
        early, self._early_close = self._early_close, None
        if early is not None:
            # Revoked or drained before its handshake: answered, told, never joined.
            self._goodbye_at = math.inf
            self._end_with(early)
            return
        self._phase = next_phase(self._phase, Move.HANDSHAKE_OK)
        self._ctx.join(self)
        if self._since_seq is not None:
            self._start_resume(self._since_seq, None)
        elif self._ctx.resume_window > 0:
            self._gate.hold_until(now + self._ctx.resume_window)
            self._schedule()
        else:
            self._update_direct()
