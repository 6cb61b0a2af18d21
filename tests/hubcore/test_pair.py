"""A client and a server ``HubConnection`` talking over a model network on a float clock.

Hypothesis picks the steps: the client invokes, the server broadcasts a
prepared message or a batch of them, bytes are delivered in arbitrary pieces,
time moves on, and timers are handled (early or when due). The driver behaves
like a real event loop: it never lets the clock run past either side's
``next_deadline`` without calling ``handle_timer``, and it flushes the network
before time moves.

Invariants: everything sent arrives, in order and intact; keep-alive Pings go
out when due and not before; neither side times out; on a stateful connection
the replay buffer holds exactly the unacknowledged messages.
"""

from __future__ import annotations

import math
from typing import Any

import hypothesis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import hubcore
from hubcore import (
    Ack,
    ConnectionState,
    Event,
    HandshakeRequest,
    HandshakeResponse,
    HubConnection,
    HubMessage,
    Invocation,
    Ping,
    Role,
)
from hubcore._events import TRACKABLE_TYPES
from tests.hubcore.helpers import (
    FLOATS,
    IDS,
    INT64,
    PROTOCOL_NAMES,
    TEXT,
    assert_same_event,
    drain,
)

KEEPALIVE = 15.0
SIDES = ("client", "server")
PEER = {"client": "server", "server": "client"}

# Values both encodings carry the same way.
COMMON_VALUES = st.recursive(
    st.none() | st.booleans() | INT64 | FLOATS | TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=6,
)
ARGUMENTS = st.lists(COMMON_VALUES, max_size=3)


class HubPair(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.conns: dict[str, HubConnection] = {}
        self.pending: dict[str, bytearray] = {side: bytearray() for side in SIDES}
        self.sent: dict[str, list[HubMessage]] = {side: [] for side in SIDES}
        self.received: dict[str, list[Event]] = {side: [] for side in SIDES}
        # When each side last sent something that resets its keep-alive (a message or a Ping).
        self.keepalive_reset_at: dict[str, float] = {side: 0.0 for side in SIDES}
        # Stateful bookkeeping: (id, size) of each unacknowledged trackable message sent.
        self.unacked: dict[str, list[tuple[int, int]]] = {side: [] for side in SIDES}
        self.trackable_sent: dict[str, int] = {side: 0 for side in SIDES}
        self.stateful = False

    # -- helpers ----------------------------------------------------------------------

    @property
    def protocol(self) -> hubcore.HubProtocol:
        protocol = self.conns["server"].protocol
        assert protocol is not None
        return protocol

    def _record_sent(self, side: str, data: bytes, app_message: HubMessage | None = None) -> None:
        """Account for bytes a side produced.

        An application message is recorded as the application gave it; what a
        timer produced is parsed back from its bytes.
        """
        app = app_message is not None
        messages = [app_message] if app_message is not None else self.protocol.parse_messages(data)
        for message in messages:
            self.sent[side].append(message)
            if type(message) is Ping or app:
                self.keepalive_reset_at[side] = self.now
            if self.stateful and message.message_type in TRACKABLE_TYPES:
                self.trackable_sent[side] += 1
                size = len(self.protocol.write_message(message))
                self.unacked[side].append((self.trackable_sent[side], size))
        self.pending[side] += data

    def _deliver(self, side: str, count: int) -> None:
        """Hand the first ``count`` pending bytes of ``side`` to its peer."""
        chunk = bytes(self.pending[side][:count])
        del self.pending[side][:count]
        peer = PEER[side]
        self.conns[peer].receive_data(chunk, self.now)
        for event in drain(self.conns[peer]):
            index = len(self.received[peer])
            assert index < len(self.sent[side]), f"{peer} got more than {side} sent"
            assert_same_event(event, self.sent[side][index])
            self.received[peer].append(event)
            if type(event) is Ack:  # releases what ``peer`` itself sent
                self.unacked[peer] = [
                    (i, size) for i, size in self.unacked[peer] if i > event.sequence_id
                ]

    def _deadline(self) -> float:
        deadlines = [c.next_deadline() for c in self.conns.values()]
        assert all(d is not None for d in deadlines)
        return min(d for d in deadlines if d is not None)

    # -- rules ------------------------------------------------------------------------

    @initialize(protocol=st.sampled_from(PROTOCOL_NAMES), stateful=st.booleans())
    def connect(self, protocol: str, stateful: bool) -> None:
        self.stateful = stateful
        client = HubConnection(Role.CLIENT, now=0.0, allow_stateful_reconnect=stateful)
        server = HubConnection(Role.SERVER, now=0.0, allow_stateful_reconnect=stateful)
        request = HandshakeRequest(protocol=protocol, version=2 if stateful else 1)
        server.receive_data(client.send(request, 0.0), 0.0)
        assert drain(server) == [request]
        client.receive_data(server.send(HandshakeResponse(), 0.0), 0.0)
        assert drain(client) == [HandshakeResponse()]
        assert client.is_stateful is stateful and server.is_stateful is stateful
        self.conns = {"client": client, "server": server}
        # Like the JS client: one Ping right after the handshake (arms the server's timeout).
        self._record_sent("client", client.send(Ping(), 0.0), Ping())

    @rule(method=IDS, arguments=ARGUMENTS, invocation_id=st.none() | IDS)
    def client_invokes(self, method: str, arguments: list[Any], invocation_id: str | None) -> None:
        message = Invocation(target=method, arguments=arguments, invocation_id=invocation_id)
        data = self.conns["client"].send(message, self.now)
        assert data == self.protocol.write_message(message)
        self._record_sent("client", data, message)

    @rule(method=IDS, arguments=ARGUMENTS)
    def server_broadcasts(self, method: str, arguments: list[Any]) -> None:
        prepared = hubcore.PreparedMessage(Invocation(target=method, arguments=arguments))
        data = self.conns["server"].send(prepared, self.now)
        assert data is prepared.encoded(self.protocol)
        self._record_sent("server", data, prepared.message)

    @rule(items=st.lists(st.tuples(IDS, ARGUMENTS), min_size=1, max_size=3))
    def server_broadcasts_a_batch(self, items: list[tuple[str, list[Any]]]) -> None:
        prepared = [hubcore.PreparedMessage(Invocation(target=t, arguments=a)) for t, a in items]
        batch = hubcore.PreparedBatch(prepared)
        data = self.conns["server"].send(batch, self.now)
        assert data is batch.encoded(self.protocol)
        for item in prepared:
            self._record_sent("server", item.encoded(self.protocol), item.message)
        assert self.pending["server"].endswith(data)

    @precondition(lambda self: any(self.pending.values()))
    @rule(side=st.sampled_from(SIDES), count=st.integers(min_value=0, max_value=200))
    def deliver_some(self, side: str, count: int) -> None:
        self._deliver(side, count)

    @rule(dt=st.floats(0.0, 2.0) | st.floats(0.0, 40.0), cuts=st.integers(1, 5))
    def advance_time(self, dt: float, cuts: int) -> None:
        # The network is flushed (in a few pieces) before the clock moves ...
        for side in SIDES:
            while self.pending[side]:
                self._deliver(side, max(1, len(self.pending[side]) // cuts))
        # ... and the clock stops at the next deadline, where an event loop would wake.
        self.now = max(self.now, min(self.now + dt, self._deadline()))

    @rule()
    def sleep_until_the_deadline(self) -> None:
        self.advance_time(math.inf, 1)

    @rule()
    def handle_due_timers(self) -> None:
        for side in SIDES:
            conn = self.conns[side]
            deadline = conn.next_deadline()
            assert deadline is not None
            if self.now < deadline:
                continue
            data = conn.handle_timer(self.now)
            kinds = [type(m) for m in self.protocol.parse_messages(data)]
            assert set(kinds) <= {Ping, Ack}
            if Ping in kinds:
                # Not before it is due.
                assert self.now >= self.keepalive_reset_at[side] + KEEPALIVE
            for kind in kinds:
                hypothesis.event(f"timer sent {kind.__name__}")
            self._record_sent(side, data)
            assert conn.state is ConnectionState.OPEN, f"{side} timed out"
            new_deadline = conn.next_deadline()
            assert new_deadline is not None and new_deadline > self.now

    @rule(side=st.sampled_from(SIDES))
    def handle_timer_early(self, side: str) -> None:
        conn = self.conns[side]
        deadline = conn.next_deadline()
        assert deadline is not None
        if self.now < deadline:
            assert conn.handle_timer(self.now) == b""
            assert conn.next_deadline() == deadline

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def both_open(self) -> None:
        for side, conn in self.conns.items():
            assert conn.state is ConnectionState.OPEN, side

    @invariant()
    def keepalive_is_never_overdue(self) -> None:
        for side in self.conns:
            assert self.now <= self.keepalive_reset_at[side] + KEEPALIVE

    @invariant()
    def replay_buffer_matches_the_unacknowledged_messages(self) -> None:
        for side, conn in self.conns.items():
            expected = sum(size for _, size in self.unacked[side]) if self.stateful else 0
            assert conn.replay_buffer_bytes == expected, side

    def teardown(self) -> None:
        if not self.conns:
            return
        for side in SIDES:
            self._deliver(side, len(self.pending[side]))
            assert len(self.received[PEER[side]]) == len(self.sent[side])
        # One side closes first; the other answers and both end CLOSED.
        close = self.conns["client"].send(hubcore.Close(), self.now)
        self.conns["server"].receive_data(close, self.now)
        assert drain(self.conns["server"]) == [hubcore.Close()]
        self.conns["client"].receive_data(self.conns["server"].send(hubcore.Close(), self.now), 0)
        assert drain(self.conns["client"]) == []  # CLOSED: nothing more is read
        assert all(c.state is ConnectionState.CLOSED for c in self.conns.values())


HubPair.TestCase.settings = settings(settings.default, stateful_step_count=30)
TestHubPair = HubPair.TestCase
