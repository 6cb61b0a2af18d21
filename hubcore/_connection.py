"""``HubConnection``: one SignalR hub connection, without I/O and without a clock.

Bytes in: ``receive_data(data, now)`` and ``receive_eof(now)``.
Events out: ``next_event()``, until it returns ``None``.
Bytes out: ``send(event, now)`` for what the application sends, and
``handle_timer(now)`` for what the protocol sends by itself (keep-alive Ping,
Ack, timeout Close), due at ``next_deadline()``.

``now`` is the caller's monotonic clock in seconds; the connection only
compares the times it is given. Every returned ``bytes`` holds whole records
only, so the caller may put it in one WebSocket message, SSE event or poll
response (spec §1.3), or join several; ``transfer_format`` says which WebSocket
frame type it goes in.

Stateful reconnect (protocol version 2, spec §8) is kept here too: trackable
messages are counted both ways, the unacknowledged outbound ones are kept for
replay, and ``resume`` produces the Sequence and replay that a new transport
starts with.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Final, TypeAlias

from ._errors import ConnectionNotOpen, LocalProtocolError, RemoteProtocolError, ReplayBufferFull
from ._events import (
    TRACKABLE_TYPES,
    Ack,
    Close,
    Event,
    HandshakeRequest,
    HandshakeResponse,
    HubMessage,
    Ping,
    SequenceMessage,
)
from ._framing import RECORD_SEPARATOR, Buffer, find_text_record
from ._handshake import (
    HANDSHAKE_CANCELED,
    HANDSHAKE_FAILED,
    parse_handshake_request,
    parse_handshake_response,
    unsupported_protocol,
    unsupported_version,
    write_handshake_request,
    write_handshake_response,
)
from ._limits import HubLimits
from ._protocol import (
    PROTOCOL_VERSION,
    HubProtocol,
    PreparedBatch,
    PreparedMessage,
    TransferFormat,
    get_protocol,
)
from ._state import TRANSITIONS, ConnectionState, Move, Role

__all__ = ["HubConnection", "Sendable", "TimeoutKind", "TransportClosed"]

Sendable: TypeAlias = (
    HubMessage | PreparedMessage | PreparedBatch | HandshakeRequest | HandshakeResponse
)

_SUPPORTED: Final = ("json", "messagepack")
_LOWEST_VERSION: Final = 0  # PyPI signalrcore sends 0 (spec §13)


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportClosed(Event):
    """The byte stream ended (``receive_eof``); nothing follows this event.

    An event, not an exception (``hubcore.ConnectionClosed`` is its deprecated
    alias, renamed because it read like the exception of that name in websockets).
    """


class TimeoutKind(enum.Enum):
    """Which timer of ``handle_timer`` ended a connection (``HubConnection.timeout_kind``)."""

    #: The handshake did not complete within ``HubLimits.handshake_timeout``.
    HANDSHAKE = "handshake"
    #: Nothing was received for ``HubLimits.client_timeout``: the client, for a
    #: server (counted from the end of the handshake), or the server, for a client.
    PEER = "peer"


class HubConnection:
    """The protocol state of one hub connection, for either role.

    Args:
        role: ``Role.SERVER`` (answers the handshake) or ``Role.CLIENT``.
        now: the time the transport was established; starts the handshake timer.
        limits: sizes and timers (``HubLimits`` defaults follow ASP.NET Core).
        protocols: hub protocol names a server accepts.
        allow_stateful_reconnect: the server granted stateful reconnect in its
            negotiate response (or the client asked for it); takes effect only
            if the handshake says version 2.
    """

    __slots__ = (
        "_ack_due_at",
        "_acked_received",
        "_allow_stateful",
        "_awaiting_sequence",
        "_buffer",
        "_client_timeout_armed",
        "_eof",
        "_eof_reported",
        "_format",
        "_last_received_at",
        "_last_sent_at",
        "_limits",
        "_protocol",
        "_protocols",
        "_recv_latest",
        "_recv_next_id",
        "_replay",
        "_replay_bytes",
        "_request",
        "_role",
        "_sent_count",
        "_started_at",
        "_state",
        "_stateful",
        "_timeout_kind",
    )

    def __init__(
        self,
        role: Role = Role.SERVER,
        *,
        now: float,
        limits: HubLimits | None = None,
        protocols: tuple[str, ...] = _SUPPORTED,
        allow_stateful_reconnect: bool = False,
    ) -> None:
        for name in protocols:
            get_protocol(name)
        self._role = role
        # A resumed client drops what arrives before the server's Sequence (spec §8).
        self._awaiting_sequence = False
        self._limits = limits if limits is not None else HubLimits()
        self._protocols = protocols
        self._allow_stateful = allow_stateful_reconnect
        self._state = ConnectionState.AWAITING_HANDSHAKE
        self._buffer = Buffer()
        self._protocol: HubProtocol | None = None
        self._request: HandshakeRequest | None = None
        self._stateful = False
        self._eof = False
        self._eof_reported = False
        self._format = TransferFormat.TEXT
        self._timeout_kind: TimeoutKind | None = None
        self._started_at = now
        self._last_sent_at = now
        self._last_received_at = now
        self._client_timeout_armed = role is Role.CLIENT
        # Stateful reconnect bookkeeping (spec §8); ids start at 1.
        self._sent_count = 0
        # An empty deque costs ~600 bytes; most connections are never stateful.
        self._replay: deque[tuple[int, bytes]] | tuple[()] = ()
        self._replay_bytes = 0
        self._recv_next_id = 1
        self._recv_latest = 0
        self._acked_received = 0
        self._ack_due_at: float | None = None

    # -- introspection -----------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """The current ``ConnectionState``."""
        return self._state

    @property
    def role(self) -> Role:
        return self._role

    @property
    def protocol(self) -> HubProtocol | None:
        """The hub protocol chosen by the handshake, once known."""
        return self._protocol

    @property
    def handshake(self) -> HandshakeRequest | None:
        """The handshake request, once received (server) or sent (client)."""
        return self._request

    @property
    def is_open(self) -> bool:
        """Hub messages may be sent: the handshake completed and nobody closed yet.

        ``send`` of a hub message at any other time raises ``ConnectionNotOpen``
        and changes nothing, so a broadcast loop skips the connections for which
        this is False (in the handshake, or whose client just sent Close).
        """
        return self._state is ConnectionState.OPEN

    @property
    def transfer_format(self) -> TransferFormat:
        """The WebSocket frame type for the bytes this connection returns.

        ``TEXT`` until the handshake succeeds, so for a handshake request and for a
        handshake error (its ``protocol`` may be None); from the successful
        handshake response on, the protocol's (``BINARY`` for MessagePack): ASP.NET
        Core switches before writing that response. Inbound frames of either type
        go to ``receive_data`` as they are (spec §1.3).
        """
        return self._format

    @property
    def timeout_kind(self) -> TimeoutKind | None:
        """Which timeout ended the connection in ``handle_timer``, or None.

        The bytes ``handle_timer`` returned then are the last to send: a handshake
        error, or a Close with ASP.NET Core's generic text ("Connection closed with
        an error.", reconnect allowed), which is all the peer is told.
        """
        return self._timeout_kind

    @property
    def is_stateful(self) -> bool:
        """Stateful reconnect is in force (allowed, and handshake version 2)."""
        return self._stateful

    @property
    def replay_buffer_bytes(self) -> int:
        """Bytes of sent, unacknowledged trackable messages kept for replay."""
        return self._replay_bytes

    @property
    def limits(self) -> HubLimits:
        return self._limits

    # -- state machine -----------------------------------------------------

    def _move(self, move: Move) -> None:
        new = TRANSITIONS.get((self._state, move))
        if new is None:
            old = self._state
            self._state = ConnectionState.ERROR
            raise LocalProtocolError(f"cannot {move.value} in state {old.name}")
        self._state = new

    def _remote_error(self, exc: RemoteProtocolError) -> RemoteProtocolError:
        self._state = ConnectionState.ERROR
        return exc

    # -- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | str, now: float) -> None:
        """Take what the transport received; parse it with ``next_event``.

        Args:
            data: bytes, or the ``str`` of a WebSocket text frame (taken as UTF-8).
                Frame boundaries do not matter: a message may span frames and a
                frame may hold several (spec §1.3).
            now: the time it arrived; it resets the peer's timeout.

        Data after the end of the stream, or once closed, is ignored.

        Raises:
            LocalProtocolError: called after ``receive_eof``.
        """
        if self._eof:
            raise LocalProtocolError("receive_data after receive_eof")
        if isinstance(data, str):
            data = data.encode()
        if data and self._state is not ConnectionState.CLOSED:
            self._buffer.append(data)
            self._last_received_at = now

    def receive_eof(self, now: float) -> None:
        """The transport ended; ``next_event`` reports ``TransportClosed`` after the rest."""
        self._eof = True
        self._last_received_at = now

    def next_event(self) -> Event | None:
        """Parse the next event from received bytes.

        Returns:
            An event, or ``None`` when more bytes (or a ``send``) are needed.

        Raises:
            RemoteProtocolError: the peer broke the protocol. The connection is
                in ERROR: ``send`` the error's ``reply`` (a handshake error or a
                Close), then close the transport.
        """
        try:
            event = self._next_event()
        except RemoteProtocolError as exc:
            raise self._remote_error(exc) from None
        if event is None and self._eof and not self._eof_reported:
            self._eof_reported = True
            if self._state is not ConnectionState.CLOSED:
                self._move(Move.END_OF_STREAM)
            return TransportClosed()
        return event

    def _next_event(self) -> Event | None:
        state = self._state
        if state is ConnectionState.AWAITING_HANDSHAKE:
            return self._next_handshake_event()
        if state is not ConnectionState.OPEN:
            # CLOSING, CLOSED, ERROR: nothing the peer sends now can matter.
            self._buffer.clear()
            return None
        protocol = self._protocol
        assert protocol is not None
        buffer = self._buffer
        while True:
            found = protocol.find_record(buffer.data, buffer.offset, self._limits.max_message_bytes)
            if found is None:
                return None
            message = protocol.parse_record(buffer.take(*found))
            if message is None:
                continue  # unknown type: ignored for forward compatibility (spec §3)
            if self._accept(message):
                return message

    def _accept(self, message: HubMessage) -> bool:
        """Bookkeeping for one received message; False drops it (a replayed duplicate)."""
        kind = type(message)
        if kind is Close:
            self._move(Move.RECV_CLOSE)
        elif self._stateful:
            if self._awaiting_sequence:
                if kind is not SequenceMessage:
                    return False  # sent before the server knew of the new transport
                self._awaiting_sequence = False
            if message.message_type in TRACKABLE_TYPES:
                message_id = self._recv_next_id
                self._recv_next_id += 1
                if message_id <= self._recv_latest:
                    return False
                self._recv_latest = message_id
                if self._ack_due_at is None:
                    self._ack_due_at = self._last_received_at + self._limits.ack_interval
            elif kind is Ack:
                self._release(message.sequence_id)  # type: ignore[attr-defined]  # kind is Ack
            elif kind is SequenceMessage:
                sequence_id: int = message.sequence_id  # type: ignore[attr-defined]  # kind is SequenceMessage
                if sequence_id > self._recv_latest + 1:
                    raise RemoteProtocolError(
                        "Sequence ID greater than amount of messages we've received."
                    )
                self._recv_next_id = sequence_id
        return True

    def _replay_buffer(self) -> deque[tuple[int, bytes]]:
        replay = self._replay
        if not isinstance(replay, deque):
            replay = self._replay = deque()
        return replay

    def _release(self, sequence_id: int) -> None:
        replay = self._replay
        while replay and replay[0][0] <= sequence_id:
            self._replay_bytes -= len(replay.popleft()[1])

    def _next_handshake_event(self) -> Event | None:
        if (self._request is not None) is (self._role is Role.SERVER):
            # Server: the application has yet to send its HandshakeResponse.
            # Client: nothing to parse before our request chose a protocol.
            return None
        buffer = self._buffer
        try:
            found = find_text_record(buffer.data, buffer.offset, self._limits.max_message_bytes)
        except RemoteProtocolError as exc:
            # ASP.NET Core cancels a handshake longer than the message limit; an
            # empty record is just a malformed handshake.
            empty = buffer.data.startswith(RECORD_SEPARATOR, buffer.offset)
            text = HANDSHAKE_FAILED if empty else HANDSHAKE_CANCELED
            raise RemoteProtocolError(str(exc), handshake_error=text) from exc
        if found is None:
            return None
        payload = buffer.take(*found)
        if self._role is Role.CLIENT:
            response = parse_handshake_response(payload)
            self._move(
                Move.RECV_HANDSHAKE_OK if response.error is None else Move.RECV_HANDSHAKE_ERROR
            )
            if response.error is None and self._protocol is not None:
                self._format = self._protocol.transfer_format
            return response
        request = parse_handshake_request(payload)
        if request.protocol not in self._protocols:
            raise RemoteProtocolError(
                f"Unsupported hub protocol {request.protocol!r}",
                handshake_error=unsupported_protocol(request.protocol),
            )
        if not _LOWEST_VERSION <= request.version <= PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"Unsupported version {request.version} of {request.protocol!r}",
                handshake_error=unsupported_version(request.protocol, request.version),
            )
        self._move(Move.RECV_HANDSHAKE_REQUEST)
        self._request = request
        self._protocol = get_protocol(request.protocol)
        return request

    # -- sending -----------------------------------------------------------

    def send(self, event: Sendable, now: float) -> bytes:
        """Turn an event into bytes to send, and account for it.

        Accepts a ``PreparedMessage`` wherever a hub message goes, and a
        ``PreparedBatch`` of them: their bytes are encoded once per protocol and
        shared by every connection. Send the bytes in a frame of type
        ``transfer_format``.

        Write order: on a stateful connection (``is_stateful``) each trackable
        message is numbered when ``send`` returns its bytes, and the peer numbers
        them in the order they arrive. So the bytes of successive calls must reach
        the transport in call order: if several tasks send (a reader answering
        invocations, a broadcaster), write through one per-connection queue.

        Returns:
            The bytes to send; the caller owns them (for a prepared message, the
            same object every recipient gets: do not mutate it).

        Raises:
            ConnectionNotOpen: a hub message while the connection is not open
                (``is_open``); nothing changed.
            ReplayBufferFull: a stateful connection holds too many
                unacknowledged bytes; nothing changed: wait for an Ack, or give
                up on the peer.
            LocalProtocolError: any other event not allowed in this state (the
                connection is then in ERROR), or a value the protocol cannot
                encode (nothing changed).
        """
        if type(event) is PreparedMessage:
            message = event.message
            protocol = self._protocol
            if (
                protocol is None
                or self._state is not ConnectionState.OPEN
                or type(message) is Close
            ):
                return self._send_message(message, now)
            data = event.encoded(protocol)
            if self._stateful and message.message_type in TRACKABLE_TYPES:
                self._track(data)
            self._last_sent_at = now
            return data
        if type(event) is PreparedBatch:
            return self._send_batch(event, now)
        if isinstance(event, HubMessage):
            return self._send_message(event, now)
        if type(event) is HandshakeResponse:
            return self._send_handshake_response(event, now)
        if type(event) is HandshakeRequest:
            return self._send_handshake_request(event, now)
        self._state = ConnectionState.ERROR
        raise LocalProtocolError(f"cannot send {type(event).__name__}")

    def note_sent(self, now: float) -> None:
        """Record that application bytes went out at ``now`` without a ``send`` call.

        For a server that writes the same prepared bytes to many connections
        and accounts for them later: only the keep-alive clock moves. A
        stateful connection must use ``send`` (its messages are tracked).

        Raises:
            ConnectionNotOpen: the connection is not open (nothing changed).
            LocalProtocolError: the connection is stateful.
        """
        if self._state is not ConnectionState.OPEN:
            raise ConnectionNotOpen(f"note_sent in state {self._state.name}")
        if self._stateful:
            raise LocalProtocolError("note_sent is for connections without stateful reconnect")
        if now > self._last_sent_at:
            self._last_sent_at = now

    def _send_batch(self, batch: PreparedBatch, now: float) -> bytes:
        protocol = self._protocol
        if self._state is not ConnectionState.OPEN or protocol is None:
            raise ConnectionNotOpen(f"cannot send a batch in state {self._state.name}")
        if any(type(item.message) is Close for item in batch.messages):
            self._state = ConnectionState.ERROR
            raise LocalProtocolError("a Close cannot travel in a batch")
        data = batch.encoded(protocol)
        if self._stateful:
            tracked = [
                item.encoded(protocol)
                for item in batch.messages
                if item.message.message_type in TRACKABLE_TYPES
            ]
            size = sum(len(record) for record in tracked)
            # All or nothing, so the peer's sequence ids stay in step with ours.
            if self._replay and self._replay_bytes + size > self._limits.max_replay_buffer_bytes:
                raise ReplayBufferFull(
                    f"{self._replay_bytes} unacknowledged bytes; the batch needs {size} more"
                )
            for record in tracked:
                self._sent_count += 1
                self._replay_buffer().append((self._sent_count, record))
                self._replay_bytes += len(record)
        self._last_sent_at = now
        return data

    def _send_message(self, message: HubMessage, now: float) -> bytes:
        protocol = self._protocol
        if type(message) is Close:
            if protocol is None:
                self._state = ConnectionState.ERROR
                raise LocalProtocolError("cannot send Close before the handshake chose a protocol")
            self._move(Move.SEND_CLOSE)
            return protocol.write_message(message)
        if self._state is not ConnectionState.OPEN:
            # Harmless: a broadcast may reach a connection still in its handshake
            # or one whose peer just closed; nothing is sent and nothing changes.
            raise ConnectionNotOpen(
                f"cannot send {type(message).__name__} in state {self._state.name}"
            )
        self._move(Move.SEND_MESSAGE)
        assert protocol is not None  # OPEN implies a protocol
        data = protocol.write_message(message)
        if self._stateful and message.message_type in TRACKABLE_TYPES:
            self._track(data)
        self._last_sent_at = now
        return data

    def _track(self, data: bytes) -> None:
        size = len(data)
        # One message larger than the whole buffer still goes out alone.
        if self._replay and self._replay_bytes + size > self._limits.max_replay_buffer_bytes:
            raise ReplayBufferFull(
                f"{self._replay_bytes} unacknowledged bytes; the replay buffer holds "
                f"{self._limits.max_replay_buffer_bytes}"
            )
        self._sent_count += 1
        self._replay_buffer().append((self._sent_count, data))
        self._replay_bytes += size

    def _send_handshake_response(self, response: HandshakeResponse, now: float) -> bytes:
        if self._role is not Role.SERVER:
            self._state = ConnectionState.ERROR
            raise LocalProtocolError("only a server sends a handshake response")
        if response.error is None:
            if self._request is None:
                self._state = ConnectionState.ERROR
                raise LocalProtocolError("cannot accept a handshake that has not arrived")
            self._move(Move.SEND_HANDSHAKE_OK)
            assert self._protocol is not None  # chosen with the request
            self._format = self._protocol.transfer_format
            self._stateful = self._allow_stateful and self._request.version >= 2
            # The client timeout runs from the end of the handshake: a client
            # that never speaks again is dropped (ASP.NET Core's behaviour; the
            # older rule, armed by the client's first Ping, let a silent socket
            # be held forever). Every official client pings within 15 s.
            self._client_timeout_armed = True
            self._last_received_at = max(self._last_received_at, now)
        else:
            self._move(Move.SEND_HANDSHAKE_ERROR)
        self._last_sent_at = now
        return write_handshake_response(response)

    def _send_handshake_request(self, request: HandshakeRequest, now: float) -> bytes:
        if self._role is not Role.CLIENT or self._request is not None:
            self._state = ConnectionState.ERROR
            raise LocalProtocolError("only a client sends the handshake request, once")
        try:
            self._protocol = get_protocol(request.protocol)
        except LocalProtocolError:
            self._state = ConnectionState.ERROR
            raise
        self._move(Move.SEND_HANDSHAKE_REQUEST)
        self._request = request
        self._stateful = self._allow_stateful and request.version >= 2
        self._last_sent_at = now
        return write_handshake_request(request)

    # -- timers ------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` must next be called, or None if never."""
        state = self._state
        limits = self._limits
        if state is ConnectionState.AWAITING_HANDSHAKE:
            return self._started_at + limits.handshake_timeout
        if state is not ConnectionState.OPEN:
            return None
        deadline = self._last_sent_at + limits.keepalive_interval
        if self._client_timeout_armed:
            deadline = min(deadline, self._last_received_at + limits.client_timeout)
        if self._ack_due_at is not None:
            deadline = min(deadline, self._ack_due_at)
        return deadline

    def handle_timer(self, now: float) -> bytes:
        """Do what is due at ``now``: keep-alive Ping, Ack, or a timeout.

        Call it at ``next_deadline()`` (calling early or late is harmless).

        Returns:
            Bytes to send (possibly empty). After a timeout the state is CLOSED,
            ``timeout_kind`` says which timer it was, and the bytes are the last
            to send before closing the transport: a handshake error (server,
            handshake timeout) or a Close with ``allow_reconnect`` (peer timeout).
        """
        state = self._state
        limits = self._limits
        if state is ConnectionState.AWAITING_HANDSHAKE:
            if now < self._started_at + limits.handshake_timeout:
                return b""
            self._move(Move.TIMEOUT)
            self._timeout_kind = TimeoutKind.HANDSHAKE
            if self._role is Role.SERVER:
                return write_handshake_response(HandshakeResponse(error=HANDSHAKE_CANCELED))
            return b""
        if state is not ConnectionState.OPEN:
            return b""
        protocol = self._protocol
        assert protocol is not None
        if self._client_timeout_armed and now >= self._last_received_at + limits.client_timeout:
            self._move(Move.TIMEOUT)
            self._timeout_kind = TimeoutKind.PEER
            # ASP.NET Core's Close for a client timeout is its generic error one
            # (spec §4); the reason is for our caller, in timeout_kind.
            close = RemoteProtocolError("timeout").close_hint
            return protocol.write_message(close)
        out = b""
        if self._ack_due_at is not None and now >= self._ack_due_at:
            self._ack_due_at = None
            if self._recv_latest > self._acked_received:
                self._acked_received = self._recv_latest
                out = protocol.write_message(Ack(sequence_id=self._recv_latest))
        if now >= self._last_sent_at + limits.keepalive_interval:
            out += protocol.write_message(Ping())
            self._last_sent_at = now
        return out

    # -- stateful reconnect --------------------------------------------------

    def resume(self, now: float) -> bytes:
        """Start over on a new transport for a stateful connection (spec §8).

        Drops any partial inbound record of the old transport (a client also
        drops every message until the server's ``Sequence``) and returns what
        the new transport must start with: ``Sequence`` (the oldest
        unacknowledged id, or the next id if none) and then every
        unacknowledged message, in order.

        Raises:
            LocalProtocolError: the connection is not stateful, or not open.
        """
        if not self._stateful or self._state is not ConnectionState.OPEN:
            raise LocalProtocolError("cannot resume a connection that is not stateful and open")
        protocol = self._protocol
        assert protocol is not None
        self._buffer.clear()
        self._last_received_at = now
        self._last_sent_at = now
        first = self._replay[0][0] if self._replay else self._sent_count + 1
        # A client then drops everything until the server's Sequence, as the
        # official clients do: what comes before it on the new transport cannot
        # be placed in the sequence.
        self._awaiting_sequence = self._role is Role.CLIENT
        parts = [protocol.write_message(SequenceMessage(sequence_id=first))]
        parts.extend(data for _, data in self._replay)
        return b"".join(parts)
