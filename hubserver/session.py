"""One hub connection over a WebSocket: a reader task and a writer task around hubcore.

The reader goes stream -> wsproto -> hubcore -> dispatch. The writer task
drains the outbox (whole hub messages, joined into one WebSocket frame per
flush) and, when ``HubConnection.next_deadline()`` passes, sends what
``handle_timer`` says (keep-alive Ping, timeout Close). Keep-alive therefore
never waits behind an application message.

Events reach the session through ``deliver``, called synchronously by the
router for every event of the groups it joined, and it never blocks. While
the writer sleeps with nothing queued (``_direct``), ``deliver`` writes the
delivery's shared frame to the socket itself with one non-blocking send: no
task switch, no copy, no hubcore call (hubcore learns of those writes in bulk
through ``note_sent``). Only what the kernel does not take, and whatever
arrives while the writer is busy, goes through the writer, which waits with
``trio.lowlevel.wait_writable``; the two never write at the same time. A
connection whose queue grows past ``max_outbox_bytes`` is closed with a Close
that allows reconnect, and counted; it never slows anyone else.
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
import wsproto
import wsproto.events as ws_events
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionState as WsState
from wsproto.frame_protocol import CloseReason

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
from .transports import OPCODE_BINARY, OPCODE_TEXT, server_frame

__all__ = ["HubSession", "ReplayFn", "SessionStats"]

ReplayFn = Callable[[Hub, str, int], Awaitable[Replay]]

log = logging.getLogger("hubserver.session")

RECEIVE_BYTES: Final = 65536
#: How long we wait for the peer's closing handshake (ASP.NET Core: 5 s).
CLOSE_TIMEOUT: Final = 5.0
#: A resume's history fetch must finish within this many seconds.
RESUME_TIMEOUT: Final = 10.0
#: Deliveries a connection may hold while its resume is prepared.
MAX_HELD_DELIVERIES: Final = 100_000
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


class HubSession:
    """A subscriber connection to one group, after a successful upgrade.

    Args:
        stream: the TCP stream, already switched to WebSocket.
        ws: wsproto's connection for frame parsing and control frames.
        key: the group this connection receives.
        token_expires_at: the token's ``exp`` in unix seconds, or None.
        join / leave: add to / remove from the router (called once each).
    """

    __slots__ = (
        "_control",
        "_direct",
        "_fd",
        "_finishing",
        "_first_live_seq",
        "_held",
        "_hold_deadline",
        "_hub",
        "_join",
        "_joined",
        "_leave",
        "_lot",
        "_max_outbox_bytes",
        "_nursery",
        "_opcode",
        "_outbox",
        "_peer_closed",
        "_protocol",
        "_queued_bytes",
        "_replay",
        "_replayed_upto",
        "_rest",
        "_resume_window",
        "_resuming",
        "_scope",
        "_sent_at",
        "_since_seq",
        "_stats",
        "_stream",
        "_token_deadline",
        "_ws",
        "key",
        "session_id",
        "subject",
    )

    def __init__(
        self,
        *,
        stream: trio.SocketStream,
        ws: WsConnection,
        key: GroupKey,
        subject: str,
        limits: HubLimits,
        max_outbox_bytes: int,
        token_expires_at: float | None,
        join: Callable[[HubSession], None],
        leave: Callable[[HubSession], None],
        stats: SessionStats,
        session_id: int,
        replay: ReplayFn,
        since_seq: int | None = None,
        resume_window: float = 0.0,
    ) -> None:
        now = trio.current_time()
        self.key = key
        self.subject = subject
        self.session_id = session_id
        self._stream = stream
        self._ws = ws
        self._hub = HubConnection(now=now, limits=limits)
        self._max_outbox_bytes = max_outbox_bytes
        self._join = join
        self._leave = leave
        self._stats = stats
        self._joined = False
        self._opcode = OPCODE_TEXT
        self._fd = stream.socket.fileno()
        # Outbound, in the order the writer sends it: the unsent rest of a frame
        # written directly by ``deliver``, control frames, then hub messages
        # still to be framed (several go in one frame).
        self._rest: memoryview | None = None
        self._control: list[bytes] = []
        self._outbox: list[bytes] = []
        self._queued_bytes = 0
        # True only while the writer is parked with nothing queued and no resume,
        # hold or close is under way: ``deliver`` may then write directly.
        self._direct = False
        self._sent_at = now  # last direct write, told to hubcore by the writer
        self._protocol: HubProtocol | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self._finishing = False
        self._peer_closed = False
        # The session nursery's own scope, once ``run`` opened it: cancelling it
        # ends the connection; its deadline bounds the goodbye.
        self._scope: trio.CancelScope | None = None
        # Resume (issue #5): live deliveries wait in ``_held`` while a replay
        # is prepared, or during the short window after the handshake in which
        # a reconnecting client calls Resume, so replay and live stay in order.
        self._replay = replay
        self._since_seq = since_seq
        self._resume_window = resume_window
        self._held: list[Delivery] | None = None
        self._hold_deadline = math.inf
        self._resuming = False
        self._first_live_seq: int | None = None
        # Seqs up to here went out in a replay: a live copy arriving late is dropped.
        self._replayed_upto = 0
        self._nursery: trio.Nursery | None = None
        self._token_deadline = math.inf
        if token_expires_at is not None:
            self._token_deadline = now + (token_expires_at - time.time())

    # -- delivery (called by the router, synchronously) --------------------------

    def deliver(self, delivery: Delivery, now: float) -> None:
        if self._direct and delivery.first_seq > self._replayed_upto:
            # The common case: nothing queued, the writer asleep, no resume
            # under way. The shared frame goes straight to the socket; hubcore
            # hears of it in bulk (note_sent) when the writer next wakes. Most
            # deliveries end here, with one send() and no task switch.
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
            self._direct = False
            self._rest = memoryview(frame)[sent:]
            self._queued_bytes = len(self._rest)
            self._lot.unpark()
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
        data = self._hub.send(delivery.payload, now)
        self._outbox.append(data)
        self._queued_bytes += len(data)
        if self._queued_bytes > self._max_outbox_bytes:
            self._stats.slow_closed += 1
            log.warning(
                "session %d: closing slow client (%d bytes queued)",
                self.session_id,
                self._queued_bytes,
            )
            self._outbox.clear()
            self._queued_bytes = 0
            self.close(Close(error=SLOW_CLIENT_TEXT, allow_reconnect=True))
            return
        self._lot.unpark()

    def restart_numbering(self) -> None:
        # The client's seqs refer to a numbering that is gone: a Gap from 1 tells
        # it to resync, and nothing new is mistaken for a replayed duplicate.
        self._replayed_upto = 0
        self._first_live_seq = None
        self.notify(gap_message(1))

    def notify(self, message: PreparedMessage) -> None:
        if not self._finishing and self._joined:
            self._queue(self._hub.send(message, trio.current_time()))

    def _hold(self, delivery: Delivery) -> None:
        held = self._held
        assert held is not None
        held.append(delivery)
        if len(held) > MAX_HELD_DELIVERIES:
            self._stats.slow_closed += 1
            log.warning("session %d: too many events waiting for a resume", self.session_id)
            self._held = None
            self.close(Close(error=SLOW_CLIENT_TEXT, allow_reconnect=True))

    def _send_delivery(self, delivery: Delivery) -> None:
        """Queue a delivery through the writer (replays and released live events)."""
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

    def _start_resume(self, since_seq: int, invocation_id: str | None) -> None:
        if self._resuming or self._nursery is None:
            if invocation_id is not None:
                error = "A resume is already in progress."
                self._queue(
                    self._hub.send(Completion.with_error(invocation_id, error), trio.current_time())
                )
            return
        self._resuming = True
        if self._held is None:
            self._held = []  # a late resume: hold what arrives during the fetch
            self._direct = False
        self._hold_deadline = math.inf
        self._nursery.start_soon(self._resume, since_seq, invocation_id)

    async def _resume(self, since_seq: int, invocation_id: str | None) -> None:
        key = self.key
        try:
            with trio.fail_after(RESUME_TIMEOUT):
                replay = await self._replay(key.hub, key.site_id, since_seq)
                is_lost = since_seq > replay.last_seq
                if is_lost:
                    # History after since_seq is empty: fetch all that is kept.
                    replay = await self._replay(key.hub, key.site_id, 0)
        except (BackplaneError, trio.TooSlowError) as exc:
            log.warning("session %d: resume failed: %s", self.session_id, exc)
            self._resuming = False
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

    def _lost(self, exc: OSError) -> None:
        log.info("session %d: peer went away: %s", self.session_id, exc)
        self._peer_closed = True
        self._finish()
        self._cancel()

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

    # -- internals -----------------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        if data:
            self._direct = False
            self._outbox.append(data)
            self._queued_bytes += len(data)
            self._lot.unpark()

    def _finish(self) -> None:
        self._direct = False
        if not self._finishing:
            self._finishing = True
            # From here the session has CLOSE_TIMEOUT to say goodbye, however
            # the peer behaves (a slow reader, a silent one).
            self._bound_goodbye()
        self._leave_group()
        self._lot.unpark()

    def _bound_goodbye(self) -> None:
        if self._scope is not None:
            deadline = trio.current_time() + CLOSE_TIMEOUT
            self._scope.deadline = min(self._scope.deadline, deadline)

    def _cancel(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def _leave_group(self) -> None:
        if self._joined:
            self._joined = False
            self._leave(self)

    async def run(self) -> None:
        """Serve the connection until it closes; never raises for peer behaviour."""
        self._stats.open += 1
        self._stats.opened += 1
        self._stats.by_id[self.session_id] = self
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._scope = nursery.cancel_scope
                if self._finishing:  # closed before it ran (a drain, a revocation)
                    self._bound_goodbye()
                nursery.start_soon(self._writer)
                await self._reader()
                self._finish()
        finally:
            self._leave_group()
            self._stats.open -= 1
            self._stats.by_id.pop(self.session_id, None)
            if self._stats.open == 0 and self._stats.drained is not None:
                self._stats.drained.set()
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await self._stream.aclose()

    async def _reader(self) -> None:
        ws = self._ws
        # Bytes that came with the upgrade request were given to wsproto already.
        self._on_ws_events()
        while not self._peer_closed:
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("session %d: transport lost: %s", self.session_id, exc)
                data = b""
            if not data:
                self._peer_closed = True
                self._on_eof()
                return
            try:
                ws.receive_data(bytes(data))
            except wsproto.utilities.RemoteProtocolError as exc:
                log.info("session %d: bad WebSocket data: %s", self.session_id, exc)
                self._peer_closed = True
                self._on_eof()
                return
            self._on_ws_events()

    def _on_eof(self) -> None:
        hub = self._hub
        if hub.state is not ConnectionState.CLOSED:
            hub.receive_eof(trio.current_time())
            self._on_hub_events()
        self._finish()

    def _on_ws_events(self) -> None:
        now = trio.current_time()
        hub = self._hub
        for event in self._ws.events():
            if isinstance(event, ws_events.TextMessage):
                if not self._finishing:
                    hub.receive_data(event.data.encode(), now)
            elif isinstance(event, ws_events.BytesMessage):
                if not self._finishing:
                    hub.receive_data(event.data, now)
            elif isinstance(event, ws_events.Ping):
                self._control.append(self._ws.send(event.response()))
                self._direct = False
                self._lot.unpark()
            elif isinstance(event, ws_events.CloseConnection):
                # The peer closed the WebSocket: answer its close frame and stop.
                self._peer_closed = True
                if self._ws.state is WsState.REMOTE_CLOSING:
                    self._control.append(self._ws.send(event.response()))
                    self._direct = False
                if hub.state is not ConnectionState.CLOSED:
                    hub.receive_eof(now)
                self._on_hub_events()
                self._finish()
                return
        self._on_hub_events()

    def _on_hub_events(self) -> None:
        hub = self._hub
        now = trio.current_time()
        while not self._finishing:
            try:
                event = hub.next_event()
            except RemoteProtocolError as exc:
                self._stats.protocol_errors += 1
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
                    protocol = hub.protocol
                    assert protocol is not None
                    # ASP.NET Core picks the frame type before writing the response.
                    if protocol.transfer_format is TransferFormat.BINARY:
                        self._opcode = OPCODE_BINARY
                    self._protocol = protocol
                    self._queue(hub.send(HandshakeResponse(), now))
                    self._joined = True
                    self._join(self)
                    if self._since_seq is not None:
                        self._start_resume(self._since_seq, None)
                    elif self._resume_window > 0:
                        self._held = []
                        self._direct = False
                        self._hold_deadline = now + self._resume_window
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

    async def _writer(self) -> None:
        try:
            await self._write_loop()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("session %d: peer went away while we were sending: %s", self.session_id, exc)
            self._peer_closed = True
            self._cancel()
            return
        if self._peer_closed:
            self._cancel()  # nothing more will come: do not wait for the reader

    def _has_output(self) -> bool:
        return self._rest is not None or bool(self._control) or bool(self._outbox)

    async def _write_loop(self) -> None:
        hub = self._hub
        while True:
            if not self._has_output() and not self._finishing:
                if hub.state is ConnectionState.OPEN and not hub.is_stateful:
                    hub.note_sent(self._sent_at)  # the direct writes since the last time
                deadline = min(
                    hub.next_deadline() or math.inf, self._token_deadline, self._hold_deadline
                )
                self._direct = (
                    self._held is None
                    and self._first_live_seq is not None
                    and not self._hub.is_stateful
                    and self._joined
                )
                with trio.move_on_at(deadline):
                    await self._lot.park()
                self._direct = False
                now = trio.current_time()
                if now >= self._hold_deadline and not self._resuming:
                    self._release_held(0)  # no Resume came: live events go out as they are
                if now >= self._token_deadline and not self._finishing:
                    self._stats.expired_closed += 1
                    # ASP.NET Core's close on authentication expiry: no error text,
                    # reconnect allowed, so clients come back with a fresh token (spec §5).
                    self.close(Close(allow_reconnect=True))
                else:
                    if hub.state is ConnectionState.OPEN and not hub.is_stateful:
                        hub.note_sent(self._sent_at)  # direct writes while we slept
                    timer = hub.next_deadline()
                    if timer is not None and now >= timer:
                        self._queue(hub.handle_timer(now))
                        if hub.state is ConnectionState.CLOSED:
                            log.info("session %d: timed out", self.session_id)
                            self._finish()
            if self._rest is not None:
                rest, self._rest = self._rest, None
                await self._write_all(rest)
            if self._control:
                control = b"".join(self._control)
                self._control.clear()
                await self._write_all(control)
            if self._outbox:
                outbox, self._outbox = self._outbox, []
                self._queued_bytes = 0
                payload = b"".join(outbox) if len(outbox) > 1 else outbox[0]
                await self._write_all(server_frame(self._opcode, payload))
            if self._finishing and not self._has_output():
                break
        if self._ws.state is WsState.OPEN:
            close = ws_events.CloseConnection(code=CloseReason.NORMAL_CLOSURE)
            await self._write_all(self._ws.send(close))

    async def _write_all(self, data: bytes | memoryview) -> None:
        """Write everything with non-blocking sends, waiting for writability between."""
        await trio.lowlevel.checkpoint_if_cancelled()
        fd = self._fd
        view = memoryview(data)
        while True:
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                sent = 0
            if sent == len(view):
                return
            view = view[sent:]
            await trio.lowlevel.wait_writable(fd)
