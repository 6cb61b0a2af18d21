"""Any split of a valid stream gives the same messages as the whole stream.

The transport hands over bytes in arbitrary pieces (§1.3: a message may span
WebSocket frames and a frame may hold many messages), so ``MessageReader`` and
``HubConnection.receive_data`` must not care where the cuts fall.
"""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

import hubcore
from hubcore import (
    Close,
    ConnectionState,
    HandshakeRequest,
    HandshakeResponse,
    HubConnection,
    HubMessage,
    Invocation,
    Ping,
    Role,
    TransportClosed,
)
from tests.hubcore.helpers import (
    MESSAGES_BY_PROTOCOL,
    PROTOCOL_NAMES,
    assert_same_events,
    drain,
    handshake_bytes,
    split_at,
)

CUTS = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)
LARGE_LIMIT = 1 << 20


@st.composite
def streams(draw: st.DrawFn, *, allow_close: bool = True) -> tuple[str, list[HubMessage]]:
    name = draw(st.sampled_from(PROTOCOL_NAMES))
    messages = MESSAGES_BY_PROTOCOL[name]
    if not allow_close:
        messages = messages.filter(lambda m: type(m) is not Close)
    return name, draw(st.lists(messages, min_size=1, max_size=6))


def _encode(name: str, messages: list[HubMessage]) -> bytes:
    protocol = hubcore.get_protocol(name)
    return b"".join(protocol.write_message(m) for m in messages)


def _read_in_chunks(name: str, chunks: list[bytes]) -> list[HubMessage]:
    reader = hubcore.get_protocol(name).reader(max_message_bytes=LARGE_LIMIT)
    out: list[HubMessage] = []
    for chunk in chunks:
        reader.feed(chunk)
        while (message := reader.next_message()) is not None:
            out.append(message)
    assert reader.buffered_bytes == 0
    return out


@given(streams(), CUTS)
def test_message_reader_is_split_invariant(
    stream: tuple[str, list[HubMessage]], cuts: list[int]
) -> None:
    name, messages = stream
    data = _encode(name, messages)
    whole = hubcore.get_protocol(name).parse_messages(data)
    assert_same_events(whole, messages)
    assert_same_events(_read_in_chunks(name, split_at(data, cuts)), whole)


@given(streams())
def test_message_reader_byte_by_byte(stream: tuple[str, list[HubMessage]]) -> None:
    name, messages = stream
    data = _encode(name, messages)
    chunks = [data[i : i + 1] for i in range(len(data))]
    assert_same_events(_read_in_chunks(name, chunks), messages)


def test_partial_record_is_kept_until_complete() -> None:
    for name, record in (
        ("json", b'{"type":1,"target":"a","arguments":[1]}\x1e'),
        ("messagepack", bytes.fromhex("09960180c0a161910190")),
    ):
        reader = hubcore.get_protocol(name).reader()
        reader.feed(record[:-1])
        assert reader.next_message() is None
        assert reader.buffered_bytes == len(record) - 1
        reader.feed(record[-1:] + record[:3])
        assert reader.next_message() == Invocation(target="a", arguments=[1])
        assert reader.next_message() is None
        assert reader.buffered_bytes == 3
        reader.clear()
        assert reader.buffered_bytes == 0


@given(streams(allow_close=False), CUTS, st.integers(min_value=0, max_value=2))
@example(("json", [Ping()]), [], 1)  # handshake and a message in one chunk
@example(("messagepack", [Ping()]), [1, 2, 3, 34], 1)
def test_server_connection_is_split_invariant(
    stream: tuple[str, list[HubMessage]], cuts: list[int], version: int
) -> None:
    name, messages = stream
    data = handshake_bytes(name, version) + _encode(name, messages)
    limits = hubcore.HubLimits(max_message_bytes=LARGE_LIMIT)
    conn = HubConnection(Role.SERVER, now=0.0, limits=limits)
    events: list[object] = []
    now = 0.0
    for chunk in split_at(data, cuts):
        now += 0.001
        conn.receive_data(chunk, now)
        for event in drain(conn):
            events.append(event)
            if type(event) is HandshakeRequest:
                assert conn.send(HandshakeResponse(), now) == b"{}\x1e"
                events.extend(drain(conn))  # what followed the handshake in this chunk
    conn.receive_eof(now)
    events.extend(drain(conn))
    expected = [HandshakeRequest(protocol=name, version=version), *messages, TransportClosed()]
    assert_same_events(events, expected)
    assert conn.state is ConnectionState.CLOSED


@given(streams(allow_close=False), CUTS)
def test_client_connection_is_split_invariant(
    stream: tuple[str, list[HubMessage]], cuts: list[int]
) -> None:
    name, messages = stream
    conn = HubConnection(Role.CLIENT, now=0.0, limits=hubcore.HubLimits(max_message_bytes=1 << 20))
    conn.send(HandshakeRequest(protocol=name, version=1), 0.0)
    events: list[object] = []
    for chunk in split_at(b"{}\x1e" + _encode(name, messages), cuts):
        conn.receive_data(chunk, 0.5)
        events.extend(drain(conn))
    assert_same_events(events, [HandshakeResponse(), *messages])
    assert conn.state is ConnectionState.OPEN
