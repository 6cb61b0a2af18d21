"""``PreparedMessage``: a broadcast is encoded once per protocol and shared by every recipient."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given

import hubcore
from hubcore import (
    Close,
    ConnectionState,
    Invocation,
    LocalProtocolError,
    Ping,
    PreparedMessage,
    StreamItem,
)
from tests.hubcore.helpers import JSON, JSON_MESSAGES, MSGPACK, open_client, open_server

HELLO = Invocation(target="ReceiveMessage", arguments=["hello"])
HELLO_JSON = b'{"type":1,"target":"ReceiveMessage","arguments":["hello"]}\x1e'
HELLO_MSGPACK = bytes.fromhex("1b960180c0ae526563656976654d65737361676591a568656c6c6f90")


def test_encoded_returns_the_same_bytes_object() -> None:
    prepared = hubcore.PreparedMessage(HELLO)
    assert isinstance(prepared, PreparedMessage) and prepared.message is HELLO
    first_json, first_msgpack = prepared.encoded(JSON), prepared.encoded(MSGPACK)
    assert first_json == HELLO_JSON
    assert first_msgpack == HELLO_MSGPACK
    for _ in range(3):
        assert prepared.encoded(JSON) is first_json
        assert prepared.encoded(MSGPACK) is first_msgpack
    assert hubcore.get_protocol("json").write_message(HELLO) == first_json


def test_send_returns_the_shared_bytes_to_every_connection() -> None:
    prepared = PreparedMessage(HELLO)
    conns = [open_server("json") for _ in range(3)] + [open_server("messagepack") for _ in range(3)]
    conns.append(open_client("json"))
    sent = [conn.send(prepared, 1.0) for conn in conns]
    assert all(data is prepared.encoded(JSON) for data in sent[:3])
    assert all(data is prepared.encoded(MSGPACK) for data in sent[3:6])
    assert sent[6] is prepared.encoded(JSON)
    assert sent[0] == HELLO_JSON and sent[3] == HELLO_MSGPACK
    # A prepared send counts as a send: the keep-alive is pushed back.
    assert all(conn.next_deadline() == 16.0 for conn in conns[:6])


@given(JSON_MESSAGES.filter(lambda m: type(m) is not Close))
def test_each_encoding_matches_write_message(message: hubcore.HubMessage) -> None:
    prepared = hubcore.PreparedMessage(message)
    assert prepared.encoded(JSON) == JSON.write_message(message)
    try:
        msgpack_bytes = MSGPACK.write_message(message)
    except LocalProtocolError:
        return  # a JSON-only value (an integer beyond 64 bits)
    assert prepared.encoded(MSGPACK) == msgpack_bytes
    assert prepared.encoded(JSON) != prepared.encoded(MSGPACK)
    conn = open_server("messagepack")
    assert conn.send(prepared, 1.0) is prepared.encoded(MSGPACK)


def _in_handshake() -> hubcore.HubConnection:
    conn = hubcore.HubConnection(hubcore.Role.SERVER, now=0.0)
    conn.receive_data(b'{"protocol":"json","version":1}\x1e', 0.0)
    assert conn.next_event() is not None  # the application has yet to answer it
    return conn


def _client_closed() -> hubcore.HubConnection:
    conn = open_server("json")
    conn.receive_data(b'{"type":7}\x1e', 0.5)
    assert conn.next_event() == Close()
    return conn


@pytest.mark.parametrize(
    "make",
    [_in_handshake, _client_closed],
    ids=["in-handshake", "client-closed"],
)
def test_a_broadcast_reaching_a_connection_not_open_is_refused_harmlessly(
    make: Callable[[], hubcore.HubConnection],
) -> None:
    # Issue #13: it used to put the connection into ERROR for good.
    conn = make()
    state = conn.state
    assert not conn.is_open
    for item in (PreparedMessage(HELLO), hubcore.PreparedBatch([PreparedMessage(HELLO)]), HELLO):
        with pytest.raises(hubcore.ConnectionNotOpen):
            conn.send(item, 1.0)  # type: ignore[arg-type]
        assert conn.state is state
    with pytest.raises(hubcore.ConnectionNotOpen):
        conn.note_sent(1.0)
    assert conn.state is state
    # What it was waiting for still works: the handshake answer, or our Close.
    if state is ConnectionState.AWAITING_HANDSHAKE:
        assert conn.send(hubcore.HandshakeResponse(), 2.0) == b"{}\x1e"
        assert conn.is_open
        assert conn.send(PreparedMessage(HELLO), 2.0) == HELLO_JSON
    else:
        assert conn.send(Close(), 2.0) == b'{"type":7}\x1e'
        assert conn.state is ConnectionState.CLOSED


def test_is_open_only_between_the_handshake_and_a_close() -> None:
    conn = hubcore.HubConnection(hubcore.Role.SERVER, now=0.0)
    assert not conn.is_open
    conn = open_server("messagepack")
    assert conn.is_open
    conn.send(Close(), 1.0)
    assert not conn.is_open


def test_prepared_close_closes() -> None:
    conn = open_server("json")
    data = conn.send(hubcore.PreparedMessage(Close(error="bye")), 1.0)
    assert data == b'{"type":7,"error":"bye"}\x1e'
    assert conn.state is ConnectionState.CLOSED


def test_prepared_ping_and_stream_item() -> None:
    ping = hubcore.PreparedMessage(Ping())
    assert ping.encoded(JSON) == b'{"type":6}\x1e'
    assert ping.encoded(MSGPACK) == b"\x02\x91\x06"
    item = hubcore.PreparedMessage(StreamItem(invocation_id="1", item=[1, "a"]))
    assert item.encoded(JSON) == b'{"type":2,"invocationId":"1","item":[1,"a"]}\x1e'


def test_prepared_needs_a_hub_message() -> None:
    with pytest.raises(LocalProtocolError):
        PreparedMessage(hubcore.HandshakeResponse())  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        hubcore.PreparedMessage("hello")  # type: ignore[arg-type]


def test_unencodable_prepared_message_raises_on_use() -> None:
    prepared = hubcore.PreparedMessage(Invocation(target="a", arguments=[float("nan")]))
    with pytest.raises(LocalProtocolError):
        prepared.encoded(JSON)
    assert prepared.encoded(MSGPACK) == MSGPACK.write_message(prepared.message)


# -- PreparedBatch ------------------------------------------------------------------------


def _batch() -> hubcore.PreparedBatch:
    return hubcore.PreparedBatch(
        [
            hubcore.PreparedMessage(HELLO),
            hubcore.PreparedMessage(Ping()),
            hubcore.PreparedMessage(StreamItem(invocation_id="1", item="x")),
        ]
    )


def test_batch_is_joined_once_per_protocol() -> None:
    batch = _batch()
    json_bytes, msgpack_bytes = batch.encoded(JSON), batch.encoded(MSGPACK)
    assert json_bytes == HELLO_JSON + b'{"type":6}\x1e' + (
        b'{"type":2,"invocationId":"1","item":"x"}\x1e'
    )
    assert msgpack_bytes == b"".join(item.encoded(MSGPACK) for item in batch.messages)
    assert batch.encoded(JSON) is json_bytes and batch.encoded(MSGPACK) is msgpack_bytes
    assert JSON.parse_messages(json_bytes) == [item.message for item in batch.messages]
    assert MSGPACK.parse_messages(msgpack_bytes) == [item.message for item in batch.messages]


def test_send_batch_shares_the_bytes_and_counts_as_a_send() -> None:
    batch = _batch()
    for name, protocol in (("json", JSON), ("messagepack", MSGPACK)):
        conns = [open_server(name) for _ in range(2)]
        sent = [conn.send(batch, 5.0) for conn in conns]
        assert sent[0] is sent[1] is batch.encoded(protocol)
        assert all(conn.next_deadline() == 20.0 for conn in conns)


def test_batch_on_a_stateful_connection_tracks_each_trackable_message() -> None:
    conn = open_server("json", version=2, allow_stateful_reconnect=True)
    batch = _batch()
    conn.send(batch, 1.0)
    records = [item.encoded(JSON) for item in batch.messages]
    # The Ping is not trackable: ids 1 and 2 are HELLO and the StreamItem.
    assert conn.replay_buffer_bytes == len(records[0]) + len(records[2])
    assert conn.resume(2.0) == b'{"type":9,"sequenceId":1}\x1e' + records[0] + records[2]
    conn.receive_data(b'{"type":8,"sequenceId":1}\x1e', 3.0)
    assert conn.next_event() == hubcore.Ack(sequence_id=1)
    assert conn.resume(3.0) == b'{"type":9,"sequenceId":2}\x1e' + records[2]


def test_batch_is_all_or_nothing_against_the_replay_buffer() -> None:
    conn = open_server(
        "json",
        version=2,
        allow_stateful_reconnect=True,
        limits=hubcore.HubLimits(max_replay_buffer_bytes=120),
    )
    first = conn.send(HELLO, 1.0)
    with pytest.raises(hubcore.ReplayBufferFull):
        conn.send(_batch(), 1.0)
    assert conn.state is ConnectionState.OPEN
    assert conn.replay_buffer_bytes == len(first)
    assert conn.resume(1.0) == b'{"type":9,"sequenceId":1}\x1e' + first


@pytest.mark.parametrize(
    "items",
    [[], [HELLO], ["x"], [hubcore.PreparedMessage(HELLO), HELLO]],
    ids=["empty", "bare-message", "str", "mixed"],
)
def test_batch_needs_prepared_messages(items: list[object]) -> None:
    with pytest.raises(LocalProtocolError):
        hubcore.PreparedBatch(items)  # type: ignore[arg-type]


def test_a_close_in_a_batch_lands_in_error() -> None:
    conn = open_server("json")
    with pytest.raises(LocalProtocolError):
        batch = [hubcore.PreparedMessage(HELLO), hubcore.PreparedMessage(Close())]
        conn.send(hubcore.PreparedBatch(batch), 1.0)
    assert conn.state is ConnectionState.ERROR
    fresh = hubcore.HubConnection(hubcore.Role.SERVER, now=0.0)
    with pytest.raises(hubcore.ConnectionNotOpen):
        fresh.send(_batch(), 0.0)
    assert fresh.state is ConnectionState.AWAITING_HANDSHAKE
