"""One hub connection, whatever its transport: the glue between its parts, in one task.

Each part owns its state: ``Phase`` (``_state``), the transport's
(``hubserver.transports``) inbound side (reading, paused over budget) and
outbound side (every byte to write, the budget, the writer, the wire that
frames it), ``ResumeGate`` (what a live delivery or a replay sends),
``Deadlines`` (token, slow client, goodbye), ``TaskGuard`` (the tasks the
connection starts), and hubcore's ``HubConnection``. An idle connection is one
task waiting in ``Inbound.receive``; one server-wide ``TimerQueue`` calls
``on_timer``. While nothing waits and no resume is under way, ``deliver``
writes an event's shared frame straight to the socket (one ``send``, no task
switch; hubcore hears of it in bulk through ``note_sent``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Final

import trio

from hubcore import (
    Close,
    Completion,
    ConnectionState,
    HandshakeRequest,
    HandshakeResponse,
    HubConnection,
    Invocation,
    LocalProtocolError,
    PreparedMessage,
    RemoteProtocolError,
    ReplayBufferFull,
    Sendable,
    StreamInvocation,
    TimeoutKind,
    TransportClosed,
)
from hubserver.backplane import BackplaneError
from hubserver.logs import session_fields
from hubserver.routing import Delivery, GroupKey, gap_message
from hubserver.transports import (
    InboundItem,
    PeerClose,
    PeerPing,
    PostedInbound,
    Reading,
    Report,
    Transport,
    TransportKind,
    WebSocketError,
    Wire,
)

from ._context import SessionContext
from ._deadlines import Deadlines, Due
from ._guard import TaskGuard
from ._publish import PUBLISH_TARGET, PublishCalls
from ._resume import (
    MAX_RESUME_SEQ,
    RESUME_BURST,
    RESUME_REFILL,
    HoldOverflow,
    ResumeGate,
    fetch_replay,
)
from ._state import Move, Phase, next_phase

__all__ = ["ACCESS_REVOKED_TEXT", "HubSession"]

log = logging.getLogger("hubserver.session")

#: How long we wait for the peer's closing handshake (ASP.NET Core: 5 s).
CLOSE_TIMEOUT: Final = 5.0
SLOW_CLIENT_TEXT: Final = "Connection closed: the client did not keep up with the event stream."
ACCESS_REVOKED_TEXT: Final = "Access to this stream was revoked."
_RESUME_BUSY: Final = "A resume is already in progress."
_RESUME_TOO_OFTEN: Final = (
    f"Resume was called too often: at most {RESUME_BURST} calls, then one every "
    f"{RESUME_REFILL:g} s."
)
_RESUME_FAILED: Final = "Resume failed: the event history is unavailable; try again."
_MAY_CLOSE: Final = (ConnectionState.OPEN, ConnectionState.CLOSING, ConnectionState.ERROR)


def _token_at(token_expires_at: float | None, now: float) -> float:
    """The token's expiry (unix seconds) on the trio clock (``now``)."""
    return math.inf if token_expires_at is None else now + (token_expires_at - time.time())


class HubSession:
    """A hub connection, from its accepted upgrade to its end.

    A subscriber's connection receives one group's events; a publisher's
    (``key`` None) joins no group and calls ``Publish`` (``_publish``).

    Args:
        transport: how its bytes travel (a WebSocket about to open, ...).
        key: the group this connection receives; None for a publisher.
        token_expires_at: the token's ``exp`` in unix seconds, or None.
        since_seq: the resume point from the URL, if any.
    """

    __slots__ = (
        "_attached",
        "_calls",
        "_close_after_calls",
        "_ctx",
        "_deadlines",
        "_direct",
        "_early_close",
        "_fd",
        "_gate",
        "_guard",
        "_hub",
        "_in",
        "_is_detached",
        "_live_ceiling",
        "_out",
        "_phase",
        "_reattached",
        "_sent_at",
        "_since_seq",
        "_transport",
        "_wire",
        "key",
        "on_end",
        "session_id",
        "subject",
        "timer_at",
    )  # fmt: skip

    #: Its subject's count of hub connections is held for it until it ends
    #: (whatever transports it has meanwhile).
    has_subject_count: Final = True

    def __init__(
        self,
        *,
        transport: Transport,
        ctx: SessionContext,
        key: GroupKey | None,
        subject: str,
        token_expires_at: float | None,
        session_id: int,
        since_seq: int | None = None,
        allow_stateful: bool = False,
    ) -> None:
        now = trio.current_time()
        self.key, self.subject, self.session_id = key, subject, session_id
        self.timer_at = math.inf
        self._ctx = ctx
        self._transport = transport
        #: Called once when the connection's task ends (a live token is forgotten).
        self.on_end: Callable[[], None] | None = None
        self._fd = transport.fd
        self._calls: PublishCalls | None = None
        limits = ctx.limits
        if transport.kind is TransportKind.LONG_POLLING:
            # The polls are the keep-alive (spec §4): no Pings, and the client's
            # silence says nothing (its transport ends it when it stops polling).
            limits = dataclasses.replace(
                limits, keepalive_interval=math.inf, client_timeout=math.inf
            )
        if key is None:
            if ctx.publish is None:
                raise ValueError("a publisher connection needs the context's publish")
            self._calls = PublishCalls(ctx.publish, ctx.stats, session_id, ctx.publish_latency)
            limits = dataclasses.replace(
                ctx.publisher_limits or ctx.limits,
                keepalive_interval=limits.keepalive_interval,
                client_timeout=limits.client_timeout,
            )
        self._close_after_calls: Close | None = None  # asked while calls were being published
        self._hub = HubConnection(
            now=now, limits=limits, allow_stateful_reconnect=allow_stateful
        )
        # Stateful reconnect (spec §8): the transport dropped and the connection
        # waits for its client's next one (``_reattached`` wakes that wait); the
        # task of a later transport's request waits on ``_attached`` until that
        # transport is gone.
        self._is_detached = False
        self._reattached: trio.Event | None = None
        self._attached: trio.Event | None = None
        self._phase = Phase.UPGRADING
        self._guard = TaskGuard(ctx.tasks, self._crash)
        self._in = transport.inbound
        self._out = transport.outbound(
            max_bytes=ctx.max_outbox_bytes,
            report=self._on_output,
            start_writer=self._guard.start_soon,
        )
        self._gate = ResumeGate(None if key is None else key.user_id)
        self._deadlines = Deadlines(_token_at(token_expires_at, now))
        self._since_seq = since_seq
        self._direct = False  # a delivery may write its shared frame itself (see deliver)
        # Live events close a client at once only past this (twice the budget,
        # plus a replay still queued); over the budget alone the slow deadline decides.
        self._live_ceiling = 2 * ctx.max_outbox_bytes
        self._early_close: Close | None = None  # asked before the hub handshake
        self._wire: Wire | None = None  # set at the hub handshake
        self._sent_at = now  # last direct write, told to hubcore in bulk

    def register(self) -> None:
        """Known to role changes and the drain from now on: call before the 101 goes out."""
        stats = self._ctx.stats
        stats.register(self)
        hub = "publish" if self.key is None else self.key.hub.value
        stats.opened_by_hub[hub] = stats.opened_by_hub.get(hub, 0) + 1

    @property
    def metric_labels(self) -> tuple[str, str, str] | None:
        """(hub, protocol, transport) once open, for /metrics."""
        if self._phase is not Phase.OPEN or self._wire is None:
            return None
        hub = "publish" if self.key is None else self.key.hub.value
        return (hub, self._wire.protocol.name, self._transport.kind.value)

    @property
    def queued_bytes(self) -> int:
        return self._out.queued_bytes

    @property
    def kind(self) -> TransportKind:
        return self._transport.kind

    @property
    def transport(self) -> Transport:
        return self._transport

    async def post(self, body: bytes) -> bool:
        """A client's POST (SSE, long polling): True once the connection took ``body``."""
        inbound = self._in
        if not isinstance(inbound, PostedInbound) or self._phase is Phase.CLOSED:
            return False
        return await inbound.post(body)

    def discard(self) -> None:
        """The 101 never went out: end a registered connection that will not run."""
        self._abort()
        self._ctx.stats.unregister(self)
        self._ended()

    def _ended(self) -> None:
        if self.on_end is not None:
            on_end, self.on_end = self.on_end, None
            on_end()

    # -- called by the router, the watcher, the drain (synchronously) --------------

    def deliver(self, delivery: Delivery, now: float) -> None:
        try:
            if self._direct and delivery.first_seq > self._gate.replayed_upto:
                self._sent_at = now
                frame = delivery.framed(self._wire)  # type: ignore[arg-type]  # set at the handshake, before any delivery
                try:
                    sent = os.write(self._fd, frame)
                except BlockingIOError:
                    sent = 0
                if sent != len(frame):
                    self._out.queue_rest(frame, sent)  # reports BUSY: no more direct writes
                return
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
        except Exception as exc:  # the socket's OSError included: this connection ends
            self._crash_or_lost(exc)

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
        the Close can only follow the handshake's answer: it waits for it at
        most ``CLOSE_TIMEOUT``, and the connection never joins its group.
        """
        if self._phase is Phase.OPEN:
            if self._calls is not None and self._calls.is_running:
                # The call under way gets its answer first: a publisher cut off
                # before it could not know what was accepted. Those not yet
                # started are refused (nothing accepted) rather than each waiting
                # the backplane's deadline while the drain waits for them all.
                self._close_after_calls = self._close_after_calls or message
                self._calls.stop()
                return
            self._end_with(message)
        elif self._phase in (Phase.UPGRADING, Phase.HANDSHAKE) and self._early_close is None:
            self._early_close = message
            self._deadlines.goodbye_at = trio.current_time() + CLOSE_TIMEOUT
            self._schedule()

    # -- output ------------------------------------------------------------------

    def _send(self, item: Sendable, now: float) -> None:
        if self._phase is Phase.CLOSING or self._phase is Phase.CLOSED:
            # Closed part-way through a run of sends (a replay that filled the
            # stateful buffer): after our Close nothing more goes out.
            return
        self._direct = False
        try:
            data = self._hub.send(item, now)
        except ReplayBufferFull:
            # The client acknowledges nothing (or is away longer than its buffer
            # lasts): it resumes from history after it reconnects.
            self._close_slow("its stateful-reconnect buffer is full")
            return
        except LocalProtocolError as exc:
            self._crash(exc)  # we sent at a wrong moment: our bug, this connection's end
            return
        self._out.queue_message(data)

    def _on_output(self, report: Report, exc: BaseException | None) -> None:
        if report is Report.BUSY:
            self._direct = False
        elif report is Report.DRAINED:
            self._deadlines.slow_at = math.inf
            self._live_ceiling = 2 * self._out.max_bytes
            self._in.unpause()
            if self._out.is_sealed and self._in.state is Reading.DONE:
                self._abort()  # all said, and the peer is done: nothing left to wait for
            else:
                self._update_direct()
        elif report is Report.OVER_BUDGET:
            self._in.pause()  # the client must read before it may make us write more
            if self._phase in (Phase.HANDSHAKE, Phase.OPEN):
                self._deadlines.slow_at = trio.current_time() + self._ctx.slow_client_timeout
                self._schedule()
        else:
            self._lost(exc)

    def _close_slow(self, why: str) -> None:
        self._ctx.stats.slow_closed += 1
        log.warning(
            "session %d: closing slow client (%s)",
            self.session_id,
            why,
            extra=session_fields(self, "session_closing", reason="slow_consumer"),
        )
        self._out.drop_unsent()
        self.close(Close(error=SLOW_CLIENT_TEXT, allow_reconnect=True))

    def _update_direct(self) -> None:
        self._direct = (
            self._fd >= 0
            and self._phase is Phase.OPEN
            and self._out.is_idle
            and self._gate.is_passthrough
            and not self._hub.is_stateful
        )

    # -- resume ------------------------------------------------------------------

    def _start_resume(self, since_seq: int, invocation_id: str | None) -> None:
        if self._gate.begin():
            self._direct = False
            self._guard.start_soon(self._resume, since_seq, invocation_id)
        elif invocation_id is not None:
            self._send(Completion.with_error(invocation_id, _RESUME_BUSY), trio.current_time())

    async def _resume(self, since_seq: int, invocation_id: str | None) -> None:
        key = self.key
        assert key is not None  # only a subscriber's connection resumes
        try:
            replay, is_lost = await fetch_replay(self._ctx.replay, key, since_seq)
        except (BackplaneError, trio.TooSlowError) as exc:
            log.warning(
                "session %d: resume failed: %s",
                self.session_id,
                exc,
                extra=session_fields(self, "resume_failed"),
            )
            released = self._gate.fail(since_seq)
            if self._phase is Phase.OPEN:
                self._send_all(released, invocation_id, _RESUME_FAILED)
            return
        if self._phase is Phase.OPEN:
            outcome = self._gate.complete(since_seq, replay, is_lost=is_lost)
            queued_before = self._out.queued_bytes
            now = trio.current_time()
            stats = self._ctx.stats
            if outcome.gap is not None:
                stats.gaps += 1
                self._send(outcome.gap, now)
            if outcome.replay is not None:
                stats.replayed += outcome.replay.count
                self._send(outcome.replay.payload, now)
            self._send_all(outcome.released, invocation_id, None)
            # A replay says nothing of the client's speed: live events may queue
            # behind it before the slow deadline judges.
            self._live_ceiling += max(0, self._out.queued_bytes - queued_before)

    def _send_all(
        self, deliveries: list[Delivery], invocation_id: str | None, error: str | None
    ) -> None:
        """The resume's Completion (if asked for), then the live events it held."""
        now = trio.current_time()
        if invocation_id is not None:
            reply = Completion.void(invocation_id)
            if error is not None:
                reply = Completion.with_error(invocation_id, error)
            self._send(reply, now)
        for delivery in deliveries:
            self._send(delivery.payload, now)
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
        due = self._deadlines.due(now, is_closing=self._is_closing)
        if due is Due.GOODBYE:
            if phase is Phase.CLOSING:
                log.info(
                    "session %d: no closing handshake in time, dropping",
                    self.session_id,
                    extra=session_fields(self, "session_dropped", reason="close_timeout"),
                )
                self._abort()
                return
            self._finish()  # closed before a hub handshake that did not come in time
        elif due is Due.TOKEN:
            self._ctx.stats.expired_closed += 1
            # ASP.NET Core's close on authentication expiry: no error text,
            # reconnect allowed, so clients come back with a fresh token (spec §5).
            self.close(Close(allow_reconnect=True))
        elif due is Due.SLOW:
            self._close_slow(f"{self._out.queued_bytes} bytes unread for too long")
        elif (released := self._gate.on_timer(now)) is not None:
            self._send_all(released, None, None)  # no Resume came: held events go out as they are
        hub = self._hub
        if self._phase in (Phase.HANDSHAKE, Phase.OPEN):
            if hub.state is ConnectionState.OPEN and not hub.is_stateful:
                hub.note_sent(self._sent_at)
            timer = None if self._is_detached else hub.next_deadline()
            if timer is not None and now >= timer:
                self._out.queue_message(hub.handle_timer(now))
                if hub.state is ConnectionState.CLOSED:
                    if hub.timeout_kind is TimeoutKind.HANDSHAKE:
                        self._ctx.stats.handshake_timed_out += 1
                    else:
                        self._ctx.stats.client_timed_out += 1
                    log.info(
                        "session %d: timed out",
                        self.session_id,
                        extra=session_fields(self, "session_closing", reason="client_timeout"),
                    )
                    self._finish()
        self._schedule()

    @property
    def _is_closing(self) -> bool:
        return self._phase is Phase.CLOSING or self._early_close is not None

    @property
    def is_closing(self) -> bool:
        """A close was asked for (or the connection ended): asking again changes nothing."""
        return (
            self._is_closing or self._phase is Phase.CLOSED or self._close_after_calls is not None
        )

    def _schedule(self) -> None:
        phase = self._phase
        if phase is Phase.CLOSED or phase is Phase.UPGRADING:
            return
        deadline = self._deadlines.next(is_closing=self._is_closing)
        if phase is not Phase.CLOSING:
            # Detached, the client is silent by design: the reconnect window rules.
            hub_deadline = None if self._is_detached else self._hub.next_deadline()
            deadline = min(deadline, math.inf if hub_deadline is None else hub_deadline)
            if self._early_close is None:
                deadline = min(deadline, self._gate.hold_deadline)
        if deadline < math.inf:
            self._ctx.timers.schedule(self, deadline)

    # -- ending ----------------------------------------------------------------------

    def _end_with(self, message: Close) -> None:
        if self._hub.state in _MAY_CLOSE:
            with contextlib.suppress(LocalProtocolError):  # already closed: nothing to say
                self._out.queue_message(self._hub.send(message, trio.current_time()))
        self._finish()

    def _finish(self) -> None:
        """Stop taking events; say goodbye: a close frame after what is queued."""
        phase = self._phase
        if phase is Phase.CLOSING or phase is Phase.CLOSED:
            return
        self._direct = False
        if phase is Phase.OPEN:
            self._ctx.leave(self)
        self._phase = next_phase(phase, Move.FINISH)
        self._gate.close()
        # From here the connection has CLOSE_TIMEOUT, however the peer behaves.
        self._deadlines.goodbye_at = trio.current_time() + CLOSE_TIMEOUT
        self._ctx.timers.schedule(self, self._deadlines.goodbye_at)
        self._out.seal(self._transport.goodbye())
        if self._is_detached or (self._in.state is Reading.DONE and self._out.is_idle):
            self._abort()  # detached: nobody to say goodbye to

    def _lost(self, exc: BaseException | None) -> None:
        log.info(
            "session %d: peer went away: %s",
            self.session_id,
            exc,
            extra=session_fields(self, "peer_gone", reason="transport_lost"),
        )
        if self._can_reattach:
            # Output first: once the socket is closed its descriptor is the next
            # accept's, and a write still pending would go to that client.
            self._drop_transport()
            return
        self._abort()

    def _crash_or_lost(self, exc: BaseException) -> None:
        if isinstance(exc, OSError):
            self._lost(exc)  # the socket failed under a direct write: the peer's doing
        else:
            self._crash(exc)

    def _crash(self, exc: BaseException) -> None:
        self._ctx.stats.crashed += 1
        log.error(
            "session %d: connection handler failed",
            self.session_id,
            exc_info=exc,
            extra=session_fields(self, "session_failed", reason="error"),
        )
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
        self._in.stop()
        self._out.close()
        self._gate.close()
        self._guard.close()
        self._ctx.timers.cancel(self)
        self._transport.close()  # a wait on its socket raises ClosedResourceError
        if self._reattached is not None:
            self._reattached.set()
        if self._attached is not None:
            self._attached.set()

    # -- stateful reconnect (spec §8) --------------------------------------------------

    @property
    def _can_reattach(self) -> bool:
        return (
            self._phase is Phase.OPEN
            and self._hub.is_stateful
            and self._ctx.stateful_reconnect_window > 0
        )

    @property
    def accepts_reattach(self) -> bool:
        """A new WebSocket of the same client may take over (stateful and open)."""
        return self._can_reattach

    def _drop_transport(self) -> None:
        """Let go of the current transport: what it had queued is in hubcore's replay buffer."""
        if self._is_detached:
            return
        self._is_detached = True
        self._direct = False
        self._out.close()
        # A read of the old transport may wait for its output to drain (paused
        # over the budget), which it never will: it ends now.
        self._in.stop()
        self._transport.close()
        if self._attached is not None:
            self._attached.set()
            self._attached = None

    async def _wait_for_transport(self) -> bool:
        """The transport dropped: wait for the client's next one; whether it came."""
        self._drop_transport()
        window = self._ctx.stateful_reconnect_window
        log.info(
            "session %d: transport lost; waiting %g s for it",
            self.session_id,
            window,
            extra=session_fields(self, "transport_lost"),
        )
        self._schedule()  # hubcore's timers wait while detached
        self._reattached = event = trio.Event()
        with trio.move_on_after(window):
            await event.wait()
        self._reattached = None
        return not self._is_detached and self._phase is Phase.OPEN

    def attach(
        self, transport: Transport, *, token_expires_at: float | None
    ) -> trio.Event | None:
        """The client's new WebSocket (spec §8): it replaces the old transport.

        Its token (the same subject's; the caller checks) is the connection's from
        now on: ``token_expires_at`` (unix seconds, None: never), as in the
        constructor, so a client that came back with a refreshed token is not
        closed at the old one's expiry.

        Returns what tells the new transport's task that its transport is gone
        (replaced, dropped or the connection ended); None if the connection
        cannot take it (not stateful, or no longer open).
        """
        if not self._can_reattach:
            return None
        # The old one may not have been noticed dead yet: it is cancelled (no 409).
        self._drop_transport()
        now = trio.current_time()
        self._transport = transport
        self._fd = transport.fd
        self._in = transport.inbound
        self._out = transport.outbound(
            max_bytes=self._ctx.max_outbox_bytes,
            report=self._on_output,
            start_writer=self._guard.start_soon,
        )
        assert self._wire is not None  # open: the handshake chose it
        wire = transport.wire_for(self._wire.protocol)
        if wire is None:
            return None
        self._out.wire = self._wire = wire
        self._is_detached = False
        self._deadlines.token_at = _token_at(token_expires_at, now)
        transport.begin(self._guard.start_soon)
        # Our Sequence, then every message the client has not acknowledged.
        self._out.queue_message(self._hub.resume(now))
        attached = self._attached = trio.Event()
        if self._reattached is not None:
            self._reattached.set()
        log.info(
            "session %d: reconnected", self.session_id, extra=session_fields(self, "reconnected")
        )
        self._schedule()
        return attached

    # -- the connection's task --------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes; never raises for peer behaviour or our bugs."""
        try:
            await self._guard.run(self._serve)
        finally:
            self._abort()
            self._ctx.stats.unregister(self)
            self._ended()

    async def _serve(self) -> None:
        if self._phase is not Phase.UPGRADING:
            return  # discarded
        self._phase = next_phase(Phase.UPGRADING, Move.UPGRADED)
        self._transport.begin(self._guard.start_soon)
        self._schedule()  # the handshake timeout (and an early close's deadline)
        # Detached, the old transport's read is stopped: the loop goes on to wait for
        # the next one.
        while self._in.state is not Reading.DONE or self._is_detached:
            inbound = self._in
            try:
                items = await inbound.receive()
            except WebSocketError as exc:
                if inbound is not self._in:
                    continue  # an old transport's last words: a new one took over
                log.info(
                    "session %d: bad WebSocket data: %s",
                    self.session_id,
                    exc,
                    extra=session_fields(self, "session_closing", reason="bad_websocket_data"),
                )
                self._peer_done(self._transport.error_reply(exc))
                break
            if inbound is not self._in:
                continue  # a new transport took over while this read waited
            if items is None:
                if self._can_reattach:
                    if await self._wait_for_transport():
                        continue
                    log.info(
                        "session %d: no reconnect in time",
                        self.session_id,
                        extra=session_fields(self, "session_closing", reason="reconnect_timeout"),
                    )
                    self._abort()
                    break
                if self._phase is not Phase.CLOSED:
                    self._peer_done(None)  # EOF: nobody would read a close frame
                break
            self._on_input(items)
            if self._calls is not None and self._calls.has_work:
                await self._publish_calls(self._calls)
        if self._phase is not Phase.CLOSED:
            self._finish()
            with trio.move_on_at(self._deadlines.goodbye_at):
                try:
                    await self._out.wait_drained()
                except (trio.ClosedResourceError, OSError) as exc:
                    log.info(
                        "session %d: peer went away at goodbye: %s",
                        self.session_id,
                        exc,
                        extra=session_fields(self, "peer_gone", reason="transport_lost"),
                    )

    async def _publish_calls(self, calls: PublishCalls) -> None:
        """Publish what the last read brought, reading nothing meanwhile (backpressure)."""
        replies = await calls.run()
        if self._phase is Phase.OPEN and replies:
            # The answers to one read's calls leave together: one frame, one write.
            now = trio.current_time()
            try:
                data = b"".join([self._hub.send(reply, now) for reply in replies])
            except ReplayBufferFull:
                # As in _send: the client acknowledges nothing. Its calls' outcome is
                # unknown to it; a retry with the same ids is safe.
                self._close_slow("its stateful-reconnect buffer is full")
                return
            except LocalProtocolError as exc:
                self._crash(exc)  # we sent at a wrong moment: our bug, this connection's end
                return
            self._out.queue_message(data)
        if self._close_after_calls is not None:
            message, self._close_after_calls = self._close_after_calls, None
            self.close(message)

    def _peer_done(self, reply: bytes | None) -> None:
        """The peer sends nothing more: answer with ``reply`` (a close frame), then finish."""
        self._in.stop()
        self._out.seal(reply)
        if self._hub.state is not ConnectionState.CLOSED:
            self._hub.receive_eof(trio.current_time())
            self._on_hub_events()
        self._finish()

    def _on_input(self, items: list[InboundItem]) -> None:
        now = trio.current_time()
        for item in items:
            if type(item) is bytes:
                if self._phase in (Phase.HANDSHAKE, Phase.OPEN):
                    self._hub.receive_data(item, now)
            elif isinstance(item, PeerPing):
                self._out.queue_frame(self._transport.pong(item.payload))
            elif isinstance(item, PeerClose):
                self._peer_done(self._transport.close_reply(item))
                return
        self._on_hub_events()
        self._schedule()

    def _on_hub_events(self) -> None:
        hub, now = self._hub, trio.current_time()
        # Over its output budget, a client gets no more answers until it reads:
        # what it sent waits in hubcore (one read's worth at most).
        while self._phase in (Phase.HANDSHAKE, Phase.OPEN) and self._in.state is not Reading.PAUSED:
            try:
                event = hub.next_event()
            except RemoteProtocolError as exc:
                self._ctx.stats.protocol_errors += 1
                log.info(
                    "session %d: protocol error: %s",
                    self.session_id,
                    exc,
                    extra=session_fields(self, "session_closing", reason="protocol_error"),
                )
                if exc.handshake_error is None:
                    self._end_with(exc.close_hint)
                else:
                    self._ctx.stats.handshake_failed += 1
                    self._send(HandshakeResponse(error=exc.handshake_error), now)
                    self._finish()
                return
            match event:
                case None:
                    return
                case HandshakeRequest():
                    self._on_handshake(now)
                case Invocation() if self._calls is not None and (
                    event.target.lower() == PUBLISH_TARGET
                ):
                    if (reply := self._calls.take(event)) is not None:
                        self._send(reply, now)
                case Invocation() if self._calls is None and event.target.lower() == "resume":
                    self._on_resume(event, now)
                case Invocation() | StreamInvocation() if event.invocation_id is not None:
                    # No other server methods: ASP.NET Core's answer (spec §3.3).
                    error = (
                        f"Failed to invoke '{event.target}' due to an error on the server. "
                        "HubException: Method does not exist."
                    )
                    self._send(Completion.with_error(event.invocation_id, error), now)
                case Close():
                    self.close(Close())
                case TransportClosed():
                    self._finish()
                case _:
                    pass  # Ping, Ack, Sequence, StreamItem, Completion, CancelInvocation

    def _on_handshake(self, now: float) -> None:
        protocol = self._hub.protocol
        assert protocol is not None
        wire = self._transport.wire_for(protocol)
        if wire is None:
            # ASP.NET Core's answer (HubConnectionHandler), e.g. MessagePack over SSE.
            fmt = protocol.transfer_format.value
            self._send(
                HandshakeResponse(
                    error=f"Cannot use the '{protocol.name}' protocol on the current transport. "
                    f"The transport does not support '{fmt}' transfer format."
                ),
                now,
            )
            self._finish()
            return
        # ASP.NET Core picks the frame type before writing the response.
        self._out.wire = self._wire = wire
        self._send(HandshakeResponse(), now)
        early, self._early_close = self._early_close, None
        if self._phase is not Phase.HANDSHAKE:
            return  # the answer's write failed: the connection has ended
        if early is not None:  # revoked or drained before its handshake: told, never joined
            self._deadlines.goodbye_at = math.inf
            self._end_with(early)
            return
        self._phase = next_phase(Phase.HANDSHAKE, Move.HANDSHAKE_OK)
        self._ctx.join(self)
        if self.key is None:
            return  # a publisher: no events to hold for a resume
        if self._since_seq is not None:
            self._start_resume(self._since_seq, None)
        elif self._ctx.resume_window > 0:
            self._gate.hold_until(now + self._ctx.resume_window)
            self._schedule()
        else:
            self._update_direct()

    def _on_resume(self, event: Invocation, now: float) -> None:
        arguments = event.arguments
        since = arguments[0] if len(arguments) == 1 else None
        if type(since) is int and 0 <= since <= MAX_RESUME_SEQ:
            if self._gate.may_call_resume(now):
                self._start_resume(since, event.invocation_id)
            elif event.invocation_id is not None:
                self._send(Completion.with_error(event.invocation_id, _RESUME_TOO_OFTEN), now)
        elif event.invocation_id is not None:
            # ASP.NET Core's answer for arguments it cannot bind (spec §3.3).
            error = f"Failed to invoke '{event.target}' due to an error on the server."
            self._send(Completion.with_error(event.invocation_id, error), now)
