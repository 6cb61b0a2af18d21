"""``HubConnection``: handshake, size limits, timers, close, stateful reconnect, state table.

Times are injected: every ``now`` is a float chosen by the test, as the caller's
monotonic clock would be.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

import pytest

import hubcore
from hubcore import (
    Ack,
    Close,
    ConnectionState,
    HandshakeRequest,
    HandshakeResponse,
    HubConnection,
    HubLimits,
    Invocation,
    LocalProtocolError,
    Ping,
    RemoteProtocolError,
    ReplayBufferFull,
    Role,
    SequenceMessage,
    StreamItem,
    TransportClosed,
)
from hubcore._state import TRANSITIONS, Move
from tests.hubcore.helpers import (
    JSON,
    MSGPACK,
    drain,
    handshake_bytes,
    open_client,
    open_server,
)

S = ConnectionState
CANCELED = "Handshake was canceled."
FAILED = "An unexpected error occurred during connection handshake."
CONNECTION_ERROR = Close(error="Connection closed with an error.", allow_reconnect=True)
CLOSE_ERROR_JSON = (
    b'{"type":7,"error":"Connection closed with an error.","allowReconnect":true}\x1e'
)
CLOSE_ERROR_MSGPACK = bytes.fromhex(
    "259307d920436f6e6e656374696f6e20636c6f736564207769746820616e206572726f722ec3"
)
PING_JSON = b'{"type":6}\x1e'
PING_MSGPACK = b"\x02\x91\x06"


def _handshake_error(data: bytes, **kwargs: object) -> RemoteProtocolError:
    conn = HubConnection(Role.SERVER, now=0.0, **kwargs)  # type: ignore[arg-type]
    conn.receive_data(data, 0.0)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert conn.state is S.ERROR
    assert conn.next_event() is None
    # The reply the error hints at can still be sent; then the connection is over.
    reply = conn.send(HandshakeResponse(error=info.value.handshake_error), 0.1)
    assert reply == b'{"error":' + _json_str(info.value.handshake_error) + b"}\x1e"
    assert conn.state is S.CLOSED
    assert conn.next_deadline() is None
    return info.value


def _json_str(text: str | None) -> bytes:
    assert text is not None
    return json.dumps(text).encode()


# -- handshake ------------------------------------------------------------------------


def test_unknown_protocol() -> None:
    error = _handshake_error(b'{"protocol":"foo","version":1}\x1e')
    assert error.handshake_error == "The protocol 'foo' is not supported."


def test_protocol_not_offered_by_this_server() -> None:
    error = _handshake_error(handshake_bytes("messagepack"), protocols=("json",))
    assert error.handshake_error == "The protocol 'messagepack' is not supported."


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
@pytest.mark.parametrize("version", [3, 4, 100, -1])
def test_unsupported_version(protocol: str, version: int) -> None:
    error = _handshake_error(handshake_bytes(protocol, version))
    assert error.handshake_error == (
        f"The server does not support version {version} of the '{protocol}' protocol."
    )


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
@pytest.mark.parametrize("version", [0, 1, 2])
def test_supported_versions(protocol: str, version: int) -> None:
    conn = HubConnection(Role.SERVER, now=0.0)
    conn.receive_data(handshake_bytes(protocol, version), 0.0)
    assert drain(conn) == [HandshakeRequest(protocol=protocol, version=version)]
    assert conn.handshake == HandshakeRequest(protocol=protocol, version=version)
    assert conn.protocol is hubcore.get_protocol(protocol)
    assert conn.state is S.AWAITING_HANDSHAKE  # until the application answers
    assert conn.send(HandshakeResponse(), 0.0) == b"{}\x1e"
    assert conn.state is S.OPEN
    assert not conn.is_stateful  # not allowed by this server


def test_unknown_handshake_properties_are_ignored() -> None:
    conn = HubConnection(Role.SERVER, now=0.0)
    conn.receive_data(b'{"version":1,"minor":[1,{}],"protocol":"json","x":null}\x1e', 0.0)
    assert drain(conn) == [HandshakeRequest(protocol="json", version=1)]


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"{",
        b"[]",
        b'"json"',
        b"{}",
        b'{"protocol":"json"}',
        b'{"version":1}',
        b'{"protocol":1,"version":1}',
        b'{"protocol":"","version":1}',
        b'{"protocol":"json","version":"1"}',
        b'{"protocol":"json","version":1.0}',
        b'{"protocol":"json","version":true}',
        b'{"protocol":"json","version":null}',
        b'{"type":6}',
        b'{"type":1,"target":"a","arguments":[]}',
        b'{"protocol":"json","version":1,"type":1}',
        b'{"protocol":"json","version":1}}',
        b"\xff",
        b"",  # an empty record: used to be reported as "canceled"
    ],
)
def test_malformed_handshake(payload: bytes) -> None:
    assert _handshake_error(payload + b"\x1e").handshake_error == FAILED


def test_handshake_over_the_default_size_limit() -> None:
    # No RS yet, but already 32 KiB: ASP.NET Core cancels the handshake.
    head = b'{"protocol":"json","version":1,"pad":"'
    conn = HubConnection(Role.SERVER, now=0.0)
    conn.receive_data(head + b"x" * (32 * 1024 - len(head) - 1), 0.0)
    assert conn.next_event() is None  # 32767 bytes: could still end in time
    conn.receive_data(b"x", 0.0)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.handshake_error == CANCELED
    assert conn.state is S.ERROR


def test_handshake_exactly_at_the_size_limit() -> None:
    head, tail = b'{"protocol":"json","version":1,"pad":"', b'"}\x1e'
    record = head + b"x" * (32 * 1024 - len(head) - len(tail)) + tail
    assert len(record) == 32 * 1024
    conn = HubConnection(Role.SERVER, now=0.0)
    conn.receive_data(record, 0.0)
    assert drain(conn) == [HandshakeRequest(protocol="json", version=1)]

    longer = head + b"x" + record[len(head) :]
    assert _handshake_error(longer).handshake_error == CANCELED


def test_handshake_over_a_configured_size_limit() -> None:
    record = handshake_bytes("json")  # 32 bytes with its RS
    limits = HubLimits(max_message_bytes=len(record))
    conn = HubConnection(Role.SERVER, now=0.0, limits=limits)
    conn.receive_data(record, 0.0)
    assert drain(conn) == [HandshakeRequest(protocol="json", version=1)]
    limits = HubLimits(max_message_bytes=len(record) - 1)
    assert _handshake_error(record, limits=limits).handshake_error == CANCELED


def test_bytes_after_the_handshake_in_the_same_chunk_are_parsed() -> None:
    invocation = Invocation(target="Send", arguments=[1], invocation_id="7")
    for name, protocol in (("json", JSON), ("messagepack", MSGPACK)):
        data = handshake_bytes(name) + protocol.write_message(Ping())
        data += protocol.write_message(invocation) + protocol.write_message(invocation)[:3]
        conn = HubConnection(Role.SERVER, now=0.0)
        conn.receive_data(data, 0.0)
        assert conn.next_event() == HandshakeRequest(protocol=name, version=1)
        assert conn.next_event() is None  # nothing is parsed before the response is sent
        conn.send(HandshakeResponse(), 0.0)
        assert drain(conn) == [Ping(), invocation]
        conn.receive_data(protocol.write_message(invocation)[3:], 0.0)
        assert drain(conn) == [invocation]


def test_accepting_a_handshake_that_has_not_arrived_is_an_error() -> None:
    conn = HubConnection(Role.SERVER, now=0.0)
    with pytest.raises(LocalProtocolError):
        conn.send(HandshakeResponse(), 0.0)
    assert conn.state is S.ERROR


def test_client_handshake_error_response() -> None:
    client = HubConnection(Role.CLIENT, now=0.0)
    client.send(HandshakeRequest(protocol="json", version=1), 0.0)
    client.receive_data(b'{"error":"The protocol \'json\' is not supported."}\x1e', 0.0)
    assert drain(client) == [HandshakeResponse(error="The protocol 'json' is not supported.")]
    assert client.state is S.CLOSED


@pytest.mark.parametrize(
    "payload",
    [b'{"type":6}', b"[]", b'{"error":""}', b'{"error":1}', b"nope"],
)
def test_client_rejects_a_bad_handshake_response(payload: bytes) -> None:
    client = HubConnection(Role.CLIENT, now=0.0)
    client.send(HandshakeRequest(protocol="json", version=1), 0.0)
    client.receive_data(payload + b"\x1e", 0.0)
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    assert client.state is S.ERROR


# -- message size ---------------------------------------------------------------------


def _json_record(size: int) -> bytes:
    head, tail = b'{"type":1,"target":"a","arguments":["', b'"]}\x1e'
    record = head + b"x" * (size - len(head) - len(tail)) + tail
    assert len(record) == size
    return record


def _msgpack_record(size: int) -> bytes:
    for prefix_len in (1, 2, 3):
        body_len = size - prefix_len
        body = MSGPACK.write_message(StreamItem(invocation_id="1", item=b""))[1:]
        pad = body_len - len(body)
        if pad < 0:
            continue
        item = b"x" * pad
        body = MSGPACK.write_message(StreamItem(invocation_id="1", item=item))
        # Shrink the item until the framed record has exactly ``size`` bytes.
        while len(body) > size:
            item = item[: len(item) - (len(body) - size)]
            body = MSGPACK.write_message(StreamItem(invocation_id="1", item=item))
        if len(body) == size:
            return body
    raise AssertionError(f"cannot build a {size}-byte record")


@pytest.mark.parametrize("limit", [None, 100, 1000])
def test_inbound_json_size_limit(limit: int | None) -> None:
    size = limit or 32 * 1024
    limits = HubLimits(max_message_bytes=limit) if limit else None
    conn = open_server("json", limits=limits)
    conn.receive_data(_json_record(size), 1.0)
    (message,) = drain(conn)
    assert isinstance(message, Invocation)

    conn.receive_data(_json_record(size + 1), 1.0)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.close_hint == CONNECTION_ERROR
    assert f"{size}B" in str(info.value)
    assert conn.state is S.ERROR
    assert conn.send(info.value.close_hint, 1.0) == CLOSE_ERROR_JSON
    assert conn.state is S.CLOSED


@pytest.mark.parametrize("limit", [None, 100, 1000])
def test_inbound_msgpack_size_limit(limit: int | None) -> None:
    size = limit or 32 * 1024
    limits = HubLimits(max_message_bytes=limit) if limit else None
    conn = open_server("messagepack", limits=limits)
    conn.receive_data(_msgpack_record(size), 1.0)
    (message,) = drain(conn)
    assert isinstance(message, StreamItem)

    # Known from the prefix alone, before the body arrives.
    too_big = _msgpack_record(size + 1)
    prefix_len = hubcore.decode_varint(too_big, 0)[1]  # type: ignore[index]
    conn.receive_data(too_big[:prefix_len], 1.0)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.close_hint == CONNECTION_ERROR
    assert conn.send(info.value.close_hint, 1.0) == CLOSE_ERROR_MSGPACK


def test_oversized_json_is_refused_before_its_end_arrives() -> None:
    conn = open_server("json", limits=HubLimits(max_message_bytes=50))
    conn.receive_data(b"{" + b" " * 48, 1.0)
    assert conn.next_event() is None  # 49 bytes: the RS may still come
    conn.receive_data(b" ", 1.0)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.close_hint == CONNECTION_ERROR


@pytest.mark.parametrize("name", ["json", "messagepack"])
def test_message_reader_size_limit(name: str) -> None:
    record = _json_record(200) if name == "json" else _msgpack_record(200)
    reader = hubcore.get_protocol(name).reader(max_message_bytes=200)
    reader.feed(record)
    assert reader.next_message() is not None
    reader = hubcore.get_protocol(name).reader(max_message_bytes=199)
    reader.feed(record)
    with pytest.raises(RemoteProtocolError):
        reader.next_message()


# -- timers ---------------------------------------------------------------------------


def test_handshake_timeout() -> None:
    conn = HubConnection(Role.SERVER, now=100.0)
    assert conn.next_deadline() == 115.0
    assert conn.handle_timer(114.999) == b""
    assert conn.state is S.AWAITING_HANDSHAKE
    assert conn.handle_timer(115.0) == b'{"error":"Handshake was canceled."}\x1e'
    assert conn.state is S.CLOSED
    assert conn.next_deadline() is None
    assert conn.handle_timer(200.0) == b""


def test_handshake_timeout_while_the_application_has_not_answered() -> None:
    conn = HubConnection(Role.SERVER, now=0.0)
    conn.receive_data(handshake_bytes("json"), 14.0)
    assert drain(conn) == [HandshakeRequest(protocol="json", version=1)]
    assert conn.next_deadline() == 15.0
    assert conn.handle_timer(15.0) == b'{"error":"Handshake was canceled."}\x1e'
    assert conn.state is S.CLOSED


def test_client_handshake_timeout_sends_nothing() -> None:
    conn = HubConnection(Role.CLIENT, now=0.0, limits=HubLimits(handshake_timeout=5))
    conn.send(HandshakeRequest(protocol="json", version=1), 0.0)
    assert conn.next_deadline() == 5.0
    assert conn.handle_timer(5.0) == b""
    assert conn.state is S.CLOSED


@pytest.mark.parametrize(("name", "ping"), [("json", PING_JSON), ("messagepack", PING_MSGPACK)])
def test_keepalive_ping_is_due_15_s_after_the_last_send(name: str, ping: bytes) -> None:
    conn = open_server(name, now=1.0)  # the handshake response was the last send
    assert conn.next_deadline() == 16.0
    assert conn.handle_timer(15.999) == b""
    assert conn.next_deadline() == 16.0
    assert conn.handle_timer(16.0) == ping
    assert conn.next_deadline() == 31.0
    conn.receive_data(ping, 30.0)  # the client's pings keep its timeout away
    drain(conn)
    # Any send pushes the next ping back.
    conn.send(Invocation(target="a"), 20.0)
    assert conn.next_deadline() == 35.0
    assert conn.handle_timer(34.0) == b""
    assert conn.handle_timer(36.5) == ping  # late callers still get exactly one ping
    assert conn.next_deadline() == 51.5
    assert conn.state is S.OPEN


def test_receiving_does_not_delay_the_keepalive() -> None:
    conn = open_server("json", now=0.0)
    conn.receive_data(PING_JSON, 10.0)
    drain(conn)
    assert conn.next_deadline() == 15.0
    assert conn.handle_timer(15.0) == PING_JSON


def test_client_timeout_runs_from_the_end_of_the_handshake() -> None:
    # A client that never sends anything after its handshake is dropped after
    # 30 s (issue #9: the old rule, armed by the first Ping, held it forever).
    conn = open_server("json", now=0.0)
    assert conn.next_deadline() == 15.0  # keep-alive first
    assert conn.handle_timer(15.0) == PING_JSON
    assert conn.next_deadline() == 30.0
    assert conn.handle_timer(29.999) == b""
    assert conn.handle_timer(30.0) == CLOSE_ERROR_JSON
    assert conn.state is S.CLOSED
    assert conn.next_deadline() is None


def test_client_timeout_counts_from_the_last_receive() -> None:
    conn = open_server("json", now=0.0)
    conn.receive_data(b'{"type":1,"target":"a","arguments":[]}\x1e', 1000.0)
    drain(conn)
    assert conn.handle_timer(1015.0) == PING_JSON
    assert conn.handle_timer(1029.999) == b""
    assert conn.next_deadline() == 1030.0
    assert conn.handle_timer(1030.0) == CLOSE_ERROR_JSON
    assert conn.state is S.CLOSED


def test_the_handshake_response_starts_the_client_timeout_late() -> None:
    # The request came at 0, the application answered at 10: 30 s from 10.
    conn = HubConnection(now=0.0)
    conn.receive_data(b'{"protocol":"json","version":1}\x1e', 0.0)
    drain(conn)
    conn.send(HandshakeResponse(), 10.0)
    assert conn.handle_timer(39.999) == PING_JSON
    assert conn.state is S.OPEN
    assert conn.handle_timer(40.0) == CLOSE_ERROR_JSON


def test_any_received_data_resets_the_client_timeout() -> None:
    conn = open_server("messagepack", now=0.0)
    conn.receive_data(PING_MSGPACK, 2.0)
    drain(conn)
    conn.receive_data(MSGPACK.write_message(Invocation(target="a")), 20.0)
    drain(conn)
    conn.send(Invocation(target="b"), 40.0)  # keep the keep-alive out of the way
    assert conn.next_deadline() == 50.0
    assert conn.handle_timer(49.0) == b""
    assert conn.handle_timer(50.0) == CLOSE_ERROR_MSGPACK
    assert conn.state is S.CLOSED


def test_client_role_times_out_the_server_from_the_start() -> None:
    conn = open_client("json", now=0.0)
    assert conn.next_deadline() == 15.0
    assert conn.handle_timer(15.0) == PING_JSON
    assert conn.next_deadline() == 30.0
    assert conn.handle_timer(30.0) == CLOSE_ERROR_JSON
    assert conn.state is S.CLOSED


def test_custom_limits() -> None:
    limits = HubLimits(keepalive_interval=2.5, client_timeout=4.0, handshake_timeout=1.0)
    assert HubConnection(Role.SERVER, now=0.0, limits=limits).next_deadline() == 1.0
    conn = open_server("json", now=0.5, limits=limits)
    assert conn.limits is limits
    assert conn.next_deadline() == 3.0
    conn.receive_data(PING_JSON, 0.5)
    drain(conn)
    assert conn.handle_timer(3.0) == PING_JSON
    assert conn.next_deadline() == 4.5  # client timeout before the next ping at 5.5
    assert conn.handle_timer(4.5) == CLOSE_ERROR_JSON


def test_default_limits() -> None:
    limits = HubLimits()
    assert (limits.max_message_bytes, limits.max_replay_buffer_bytes) == (32768, 100_000)
    assert (limits.keepalive_interval, limits.client_timeout) == (15.0, 30.0)
    assert (limits.handshake_timeout, limits.ack_interval) == (15.0, 1.0)


def test_next_deadline_per_state() -> None:
    conn = HubConnection(Role.SERVER, now=3.0)
    assert conn.next_deadline() == 18.0
    conn.receive_data(handshake_bytes("json"), 4.0)
    drain(conn)
    assert conn.next_deadline() == 18.0
    conn.send(HandshakeResponse(), 5.0)
    assert conn.next_deadline() == 20.0
    conn.receive_data(b'{"type":7}\x1e', 6.0)
    drain(conn)
    assert conn.state is S.CLOSING
    assert conn.next_deadline() is None
    conn.send(Close(), 6.0)
    assert conn.next_deadline() is None

    error = open_server("json")
    error.receive_data(b"[]\x1e", 1.0)
    with pytest.raises(RemoteProtocolError):
        error.next_event()
    assert error.next_deadline() is None
    assert error.handle_timer(1000.0) == b""


# -- closing ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["json", "messagepack"])
def test_client_closes_first(name: str) -> None:
    client, server = open_client(name), open_server(name)
    close = client.send(Close(), 1.0)
    assert close == (b'{"type":7}\x1e' if name == "json" else bytes.fromhex("049307c0c2"))
    assert client.state is S.CLOSED
    server.receive_data(close + server.protocol.write_message(Ping()), 1.0)  # type: ignore[union-attr]
    assert drain(server) == [Close()]  # nothing after a Close is looked at
    assert server.state is S.CLOSING
    assert server.next_deadline() is None
    assert server.handle_timer(100.0) == b""
    reply = server.send(Close(), 1.0)
    assert reply == close
    assert server.state is S.CLOSED


def test_server_closes() -> None:
    server = open_server("json")
    data = server.send(Close(error="Server shutting down.", allow_reconnect=True), 1.0)
    assert data == b'{"type":7,"error":"Server shutting down.","allowReconnect":true}\x1e'
    assert server.state is S.CLOSED
    server.receive_data(PING_JSON, 1.0)
    assert server.next_event() is None
    with pytest.raises(hubcore.ConnectionNotOpen):
        server.send(Ping(), 2.0)
    assert server.state is S.CLOSED


@pytest.mark.parametrize("name", ["json", "messagepack"])
def test_receive_eof(name: str) -> None:
    server = open_server(name)
    protocol = server.protocol
    assert protocol is not None
    server.receive_data(protocol.write_message(Ping()) + protocol.write_message(Ping())[:-1], 1.0)
    server.receive_eof(2.0)
    assert drain(server) == [Ping(), TransportClosed()]  # the partial record is dropped
    assert server.state is S.CLOSED
    assert server.next_event() is None
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"x", 3.0)


def test_receive_eof_during_the_handshake_and_while_closing() -> None:
    conn = HubConnection(Role.SERVER, now=0.0)
    conn.receive_data(b'{"protocol":', 0.0)
    conn.receive_eof(1.0)
    assert drain(conn) == [TransportClosed()]
    assert conn.state is S.CLOSED

    conn = open_server("json")
    conn.receive_data(b'{"type":7}\x1e', 1.0)
    conn.receive_eof(1.0)
    assert drain(conn) == [Close(), TransportClosed()]
    assert conn.state is S.CLOSED


# -- stateful reconnect ------------------------------------------------------------------


def _stateful_server(name: str = "json", **limits: int) -> HubConnection:
    conn = open_server(name, version=2, allow_stateful_reconnect=True, limits=HubLimits(**limits))
    assert conn.is_stateful
    return conn


def test_trackable_messages_are_kept_until_acked() -> None:
    conn = _stateful_server()
    sent = [conn.send(Invocation(target="a", arguments=[i]), 1.0) for i in range(3)]
    assert conn.replay_buffer_bytes == sum(map(len, sent))
    # Ping and Ack are not trackable: not buffered, not counted.
    conn.send(Ping(), 1.0)
    conn.send(Ack(sequence_id=0), 1.0)
    assert conn.replay_buffer_bytes == sum(map(len, sent))

    conn.receive_data(b'{"type":8,"sequenceId":2}\x1e', 2.0)
    assert drain(conn) == [Ack(sequence_id=2)]
    assert conn.replay_buffer_bytes == len(sent[2])
    assert conn.resume(3.0) == b'{"type":9,"sequenceId":3}\x1e' + sent[2]

    conn.receive_data(b'{"type":8,"sequenceId":3}\x1e', 4.0)
    drain(conn)
    assert conn.replay_buffer_bytes == 0
    assert conn.resume(5.0) == b'{"type":9,"sequenceId":4}\x1e'


def test_resume_replays_unacked_messages_in_order() -> None:
    conn = _stateful_server("messagepack")
    sent = [conn.send(StreamItem(invocation_id="s", item=i), 1.0) for i in range(4)]
    out = conn.resume(2.0)
    assert out == MSGPACK.write_message(SequenceMessage(sequence_id=1)) + b"".join(sent)
    # Resuming again (another reconnect) replays the same, in the same order.
    assert conn.resume(3.0) == out
    assert MSGPACK.parse_messages(out) == [
        SequenceMessage(sequence_id=1),
        *(StreamItem(invocation_id="s", item=i) for i in range(4)),
    ]


def test_resume_restarts_the_timers() -> None:
    conn = _stateful_server()
    conn.receive_data(PING_JSON, 1.0)  # arms the client timeout: due at 31
    drain(conn)
    conn.send(Invocation(target="a"), 25.0)
    conn.resume(29.0)  # a new transport: its Sequence was just sent, nothing received yet
    assert conn.next_deadline() == 44.0  # keep-alive 29 + 15; client timeout 29 + 30
    assert conn.handle_timer(31.0) == b""
    assert conn.state is S.OPEN
    assert conn.handle_timer(59.0) == CLOSE_ERROR_JSON


def test_resume_with_nothing_sent() -> None:
    assert _stateful_server().resume(1.0) == b'{"type":9,"sequenceId":1}\x1e'


def test_resume_drops_a_partial_inbound_record() -> None:
    conn = _stateful_server()
    conn.receive_data(b'{"type":1,"tar', 1.0)
    conn.resume(2.0)
    conn.receive_data(b'{"type":9,"sequenceId":1}\x1e', 2.0)
    assert drain(conn) == [SequenceMessage(sequence_id=1)]


def test_replay_buffer_full_leaves_the_connection_as_it_was() -> None:
    conn = _stateful_server(max_replay_buffer_bytes=130)
    first = conn.send(Invocation(target="a", arguments=["x" * 20]), 1.0)
    second = conn.send(Invocation(target="a", arguments=["y" * 20]), 1.0)
    assert len(first) + len(second) == 122
    third = Invocation(target="a", arguments=["z" * 20])
    with pytest.raises(ReplayBufferFull):
        conn.send(third, 1.0)
    with pytest.raises(ReplayBufferFull):
        conn.send(hubcore.PreparedMessage(third), 1.0)
    assert isinstance(ReplayBufferFull("x"), LocalProtocolError)
    assert conn.state is S.OPEN
    assert conn.replay_buffer_bytes == len(first) + len(second)
    assert conn.next_deadline() == 16.0  # the refused sends did not count as sends
    # Not counted either: after an Ack for both, the next id is 3.
    conn.receive_data(b'{"type":8,"sequenceId":2}\x1e', 2.0)
    drain(conn)
    assert conn.resume(2.0) == b'{"type":9,"sequenceId":3}\x1e'
    assert conn.send(third, 3.0) == JSON.write_message(third)
    assert conn.resume(3.0) == b'{"type":9,"sequenceId":3}\x1e' + JSON.write_message(third)


def test_a_message_larger_than_the_replay_buffer_goes_out_alone() -> None:
    conn = _stateful_server(max_replay_buffer_bytes=10)
    big = conn.send(StreamItem(invocation_id="1", item="x" * 50), 1.0)
    assert conn.replay_buffer_bytes == len(big)
    with pytest.raises(ReplayBufferFull):
        conn.send(hubcore.Completion.void("1"), 1.0)


def test_prepared_messages_are_tracked() -> None:
    conn = _stateful_server()
    prepared = hubcore.PreparedMessage(Invocation(target="a", arguments=[1]))
    data = conn.send(prepared, 1.0)
    assert data is prepared.encoded(JSON)
    assert conn.resume(2.0) == b'{"type":9,"sequenceId":1}\x1e' + data


def test_duplicates_after_the_peers_sequence_are_dropped() -> None:
    conn = _stateful_server()
    messages = [Invocation(target="m", arguments=[i]) for i in range(1, 5)]
    conn.receive_data(b"".join(JSON.write_message(m) for m in messages[:3]), 1.0)
    assert drain(conn) == messages[:3]  # ids 1, 2, 3
    # The peer reconnects and replays from 2: only message 4 is new.
    conn.resume(2.0)
    replay = JSON.write_message(SequenceMessage(sequence_id=2))
    replay += b"".join(JSON.write_message(m) for m in messages[1:])
    conn.receive_data(replay, 2.0)
    assert drain(conn) == [SequenceMessage(sequence_id=2), messages[3]]
    # Pings in between are not counted.
    conn.receive_data(PING_JSON + JSON.write_message(SequenceMessage(sequence_id=5)), 3.0)
    assert drain(conn) == [Ping(), SequenceMessage(sequence_id=5)]
    fifth = Invocation(target="m", arguments=[5])
    conn.receive_data(JSON.write_message(fifth), 3.0)
    assert drain(conn) == [fifth]


def test_sequence_beyond_what_was_received_is_fatal() -> None:
    conn = _stateful_server()
    conn.receive_data(JSON.write_message(Invocation(target="m")) * 2, 1.0)
    drain(conn)
    conn.receive_data(JSON.write_message(SequenceMessage(sequence_id=3)), 1.0)  # next expected: 3
    assert drain(conn) == [SequenceMessage(sequence_id=3)]
    conn.receive_data(JSON.write_message(SequenceMessage(sequence_id=4)), 1.0)
    with pytest.raises(RemoteProtocolError, match="Sequence ID greater") as info:
        conn.next_event()
    assert info.value.close_hint == CONNECTION_ERROR
    assert conn.state is S.ERROR


def test_ack_is_sent_one_second_after_a_trackable_message() -> None:
    conn = _stateful_server("json")
    conn.receive_data(PING_JSON, 9.0)  # not trackable: no Ack
    drain(conn)
    assert conn.next_deadline() == 15.0
    conn.receive_data(JSON.write_message(Invocation(target="m")), 10.0)
    drain(conn)
    assert conn.next_deadline() == 11.0
    conn.receive_data(JSON.write_message(StreamItem(invocation_id="1")), 10.5)
    drain(conn)
    assert conn.next_deadline() == 11.0
    assert conn.handle_timer(10.99) == b""
    assert conn.handle_timer(11.0) == b'{"type":8,"sequenceId":2}\x1e'
    assert conn.next_deadline() == 15.0
    assert conn.handle_timer(12.0) == b""  # nothing new to acknowledge
    assert conn.replay_buffer_bytes == 0  # an Ack is not trackable
    conn.receive_data(JSON.write_message(Invocation(target="m")), 14.5)
    drain(conn)
    # Ack and keep-alive fall due together: both go out, Ack first.
    assert conn.handle_timer(15.5) == b'{"type":8,"sequenceId":3}\x1e' + PING_JSON


def test_stateful_client() -> None:
    client = open_client("messagepack", version=2, allow_stateful_reconnect=True)
    assert client.is_stateful
    data = client.send(Invocation(target="a", invocation_id="0"), 1.0)
    assert client.resume(2.0) == MSGPACK.write_message(SequenceMessage(sequence_id=1)) + data


@pytest.mark.parametrize(("version", "allowed"), [(0, True), (1, True), (2, False)])
def test_stateful_needs_version_2_and_permission(version: int, allowed: bool) -> None:
    conn = open_server("json", version=version, allow_stateful_reconnect=allowed)
    assert not conn.is_stateful
    conn.send(Invocation(target="a"), 1.0)
    assert conn.replay_buffer_bytes == 0
    conn.receive_data(JSON.write_message(Invocation(target="m")), 2.0)
    drain(conn)
    assert conn.next_deadline() == 16.0  # no Ack timer
    assert conn.handle_timer(3.0) == b""
    with pytest.raises(LocalProtocolError):
        conn.resume(4.0)


# -- the state table ---------------------------------------------------------------------

T = 1.0
SEND_MOVES = {
    Move.SEND_HANDSHAKE_REQUEST,
    Move.SEND_HANDSHAKE_OK,
    Move.SEND_HANDSHAKE_ERROR,
    Move.SEND_MESSAGE,
    Move.SEND_CLOSE,
}
RECEIVE_MOVES = {
    Move.RECV_HANDSHAKE_REQUEST,
    Move.RECV_HANDSHAKE_OK,
    Move.RECV_HANDSHAKE_ERROR,
    Move.RECV_MESSAGE,
    Move.RECV_CLOSE,
    Move.PROTOCOL_ERROR,
}
ROLES_FOR = {
    Move.SEND_HANDSHAKE_REQUEST: [Role.CLIENT],
    Move.SEND_HANDSHAKE_OK: [Role.SERVER],
    Move.SEND_HANDSHAKE_ERROR: [Role.SERVER],
    Move.RECV_HANDSHAKE_REQUEST: [Role.SERVER],
    Move.RECV_HANDSHAKE_OK: [Role.CLIENT],
    Move.RECV_HANDSHAKE_ERROR: [Role.CLIENT],
    Move.TIMEOUT: [Role.CLIENT],  # its peer timeout is armed from the start
}
RECEIVED = {
    Move.RECV_HANDSHAKE_REQUEST: handshake_bytes("json"),
    Move.RECV_HANDSHAKE_OK: b"{}\x1e",
    Move.RECV_HANDSHAKE_ERROR: b'{"error":"no"}\x1e',
    Move.RECV_MESSAGE: PING_JSON,
    Move.RECV_CLOSE: b'{"type":7}\x1e',
    Move.PROTOCOL_ERROR: b"garbage\x1e",
}


def _awaiting(role: Role, move: Move) -> HubConnection:
    conn = HubConnection(role, now=0.0)
    # A server can answer only a request it has; a client reads only after asking.
    if role is Role.SERVER and move in SEND_MOVES:
        conn.receive_data(handshake_bytes("json"), 0.0)
        drain(conn)
    if role is Role.CLIENT and move is not Move.SEND_HANDSHAKE_REQUEST:
        conn.send(HandshakeRequest(protocol="json", version=1), 0.0)
    return conn


def _open(role: Role, move: Move) -> HubConnection:
    return open_server("json") if role is Role.SERVER else open_client("json")


def _closing(role: Role, move: Move) -> HubConnection:
    conn = _open(role, move)
    conn.receive_data(b'{"type":7}\x1e', 0.5)
    assert drain(conn) == [Close()]
    return conn


def _closed(role: Role, move: Move) -> HubConnection:
    conn = _open(role, move)
    conn.send(Close(), 0.5)
    return conn


def _error(role: Role, move: Move) -> HubConnection:
    conn = _open(role, move)
    conn.receive_data(b"[]\x1e", 0.5)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    return conn


BUILDERS: dict[ConnectionState, Callable[[Role, Move], HubConnection]] = {
    S.AWAITING_HANDSHAKE: _awaiting,
    S.OPEN: _open,
    S.CLOSING: _closing,
    S.CLOSED: _closed,
    S.ERROR: _error,
}


def _perform(conn: HubConnection, move: Move) -> None:
    if move is Move.SEND_HANDSHAKE_REQUEST:
        conn.send(HandshakeRequest(protocol="json", version=1), T)
    elif move is Move.SEND_HANDSHAKE_OK:
        conn.send(HandshakeResponse(), T)
    elif move is Move.SEND_HANDSHAKE_ERROR:
        conn.send(HandshakeResponse(error="no"), T)
    elif move is Move.SEND_MESSAGE:
        conn.send(Invocation(target="a"), T)
    elif move is Move.SEND_CLOSE:
        conn.send(Close(), T)
    elif move is Move.END_OF_STREAM:
        conn.receive_eof(T)
        assert drain(conn)[-1:] == [TransportClosed()]
    elif move is Move.TIMEOUT:
        conn.handle_timer(T + 10_000.0)
    else:
        conn.receive_data(RECEIVED[move], T)
        drain(conn)


CASES = [
    pytest.param(state, move, role, id=f"{state.name}-{move.name}-{role.name}")
    for state, move in itertools.product(ConnectionState, Move)
    for role in ROLES_FOR.get(move, [Role.SERVER, Role.CLIENT])
]


@pytest.mark.parametrize(("state", "move", "role"), CASES)
def test_every_state_and_move(state: ConnectionState, move: Move, role: Role) -> None:
    """Each (state, move) is the table's move, or misuse that lands in ERROR.

    Local misuse raises LocalProtocolError; bad input while the peer is heard
    (AWAITING_HANDSHAKE, OPEN) raises RemoteProtocolError; input once the
    connection is closing, closed or failed is ignored, as are timers there.
    """
    conn = BUILDERS[state](role, move)
    assert conn.state is state
    target = TRANSITIONS.get((state, move))
    heard = state in (S.AWAITING_HANDSHAKE, S.OPEN)

    if move is Move.SEND_MESSAGE and state is not S.OPEN:
        # Refused without a move: a broadcast can race the handshake or a Close.
        with pytest.raises(hubcore.ConnectionNotOpen):
            _perform(conn, move)
        assert conn.state is state
        return
    if move in SEND_MOVES:
        if target is None:
            with pytest.raises(LocalProtocolError):
                _perform(conn, move)
            assert conn.state is S.ERROR
            return
    elif move in RECEIVE_MOVES and heard and (target is None or move is Move.PROTOCOL_ERROR):
        with pytest.raises(RemoteProtocolError):
            _perform(conn, move)
        assert conn.state is S.ERROR
        return
    elif (state, move) == (S.CLOSING, Move.TIMEOUT):
        # In the table, but nothing times out a CLOSING connection: it has no
        # deadline, and the application is expected to send its Close.
        assert conn.next_deadline() is None
        _perform(conn, move)
        assert conn.state is S.CLOSING
        return
    elif target is None:
        _perform(conn, move)  # ignored
        assert conn.state is state
        return
    _perform(conn, move)
    assert conn.state is target


def test_the_table_only_names_known_states_and_moves() -> None:
    for (state, move), target in TRANSITIONS.items():
        assert isinstance(state, ConnectionState) and isinstance(move, Move)
        assert isinstance(target, ConnectionState)
    # Every state can reach CLOSED by the end of the stream.
    assert all(TRANSITIONS[(state, Move.END_OF_STREAM)] is S.CLOSED for state in S)


def test_send_before_the_handshake_is_refused() -> None:
    for conn in (HubConnection(Role.SERVER, now=0.0), HubConnection(Role.CLIENT, now=0.0)):
        with pytest.raises(hubcore.ConnectionNotOpen):
            conn.send(Invocation(target="a"), 0.0)
        assert conn.state is S.AWAITING_HANDSHAKE


def test_send_after_closed_is_refused() -> None:
    conn = open_server("json")
    conn.send(Close(), 1.0)
    with pytest.raises(hubcore.ConnectionNotOpen):
        conn.send(Invocation(target="a"), 1.0)
    assert conn.state is S.CLOSED
    with pytest.raises(hubcore.ConnectionNotOpen):
        conn.send(hubcore.PreparedMessage(Invocation(target="a")), 1.0)
    assert conn.state is S.CLOSED


@pytest.mark.parametrize(
    ("role", "event"),
    [
        (Role.CLIENT, HandshakeResponse()),
        (Role.SERVER, HandshakeRequest(protocol="json", version=1)),
        (Role.CLIENT, HandshakeRequest(protocol="xml", version=1)),
        (Role.CLIENT, TransportClosed()),
        (Role.CLIENT, Close()),  # before a protocol was chosen
        (Role.SERVER, Close()),
    ],
)
def test_other_misuse_lands_in_error(role: Role, event: object) -> None:
    conn = HubConnection(role, now=0.0)
    with pytest.raises(LocalProtocolError):
        conn.send(event, 0.0)  # type: ignore[arg-type]
    assert conn.state is S.ERROR


def test_second_handshake_request_is_misuse() -> None:
    conn = HubConnection(Role.CLIENT, now=0.0)
    conn.send(HandshakeRequest(protocol="json", version=1), 0.0)
    with pytest.raises(LocalProtocolError):
        conn.send(HandshakeRequest(protocol="json", version=1), 0.0)
    assert conn.state is S.ERROR


def test_unknown_protocol_in_the_constructor() -> None:
    with pytest.raises(LocalProtocolError):
        HubConnection(Role.SERVER, now=0.0, protocols=("json", "xml"))


def test_role_property() -> None:
    assert HubConnection(Role.CLIENT, now=0.0).role is Role.CLIENT
    assert HubConnection(now=0.0).role is Role.SERVER


def test_a_resumed_client_drops_what_comes_before_the_servers_sequence() -> None:
    """Spec §8: until the server's Sequence, the client cannot place what it gets."""
    client = open_client(version=2, allow_stateful_reconnect=True)
    assert client.is_stateful
    client.receive_data(b'{"type":1,"target":"a","arguments":[1]}\x1e', 1.0)
    assert drain(client) == [Invocation(target="a", arguments=[1])]
    client.resume(2.0)
    # The old transport's last message, seen again before the server's Sequence: dropped.
    client.receive_data(b'{"type":1,"target":"a","arguments":[1]}\x1e{"type":6}\x1e', 2.0)
    assert drain(client) == []
    client.receive_data(
        b'{"type":9,"sequenceId":1}\x1e{"type":1,"target":"a","arguments":[1]}\x1e'
        b'{"type":1,"target":"a","arguments":[2]}\x1e',
        3.0,
    )
    # From the Sequence on: the replayed duplicate dropped, the new one delivered.
    assert drain(client) == [SequenceMessage(sequence_id=1), Invocation(target="a", arguments=[2])]


def test_a_resumed_server_takes_what_comes_first() -> None:
    """Only the client waits for a Sequence: the client sends its own first anyway."""
    conn = _stateful_server()
    conn.resume(1.0)
    conn.receive_data(b'{"type":1,"target":"a","arguments":[1]}\x1e', 1.0)
    assert drain(conn) == [Invocation(target="a", arguments=[1])]
