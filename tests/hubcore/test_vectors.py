"""The spec's wire vectors (shared/protocol/vectors.json, SIGNALR.md §11) as example tests.

Every vector parses to an event written out by hand below, in both encodings;
every vector a server may write (server->client and "both", plus the JS-identical
CancelInvocation) is written back byte for byte. ``*_from_js_client`` vectors are
the JS client's shorter forms: they parse, but a server writes the ASP.NET form.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from hubcore import (
    Ack,
    CancelInvocation,
    Close,
    Completion,
    ConnectionState,
    Event,
    HandshakeRequest,
    HandshakeResponse,
    HubConnection,
    Invocation,
    Ping,
    RemoteProtocolError,
    Role,
    SequenceMessage,
    StreamInvocation,
    StreamItem,
    decode_varint,
    encode_varint,
)
from tests.hubcore.helpers import (
    JSON,
    MSGPACK,
    assert_same_event,
    assert_same_events,
    drain,
    handshake_bytes,
    open_client,
    open_server,
)

UNKNOWN_METHOD = (
    "Failed to invoke 'Nope' due to an error on the server. HubException: Method does not exist."
)

EXPECTED: dict[str, Event] = {
    "handshake_request_json": HandshakeRequest(protocol="json", version=1),
    "handshake_request_messagepack": HandshakeRequest(protocol="messagepack", version=1),
    "handshake_request_json_v2": HandshakeRequest(protocol="json", version=2),
    "handshake_response_ok": HandshakeResponse(),
    "handshake_response_error": HandshakeResponse(error="The protocol 'foo' is not supported."),
    "ping": Ping(),
    "close_empty": Close(),
    "close_error_allow_reconnect": Close(
        error="Connection closed with an error.", allow_reconnect=True
    ),
    "close_error_short_allow_reconnect": Close(error="Error!", allow_reconnect=True),
    "close_from_js_client": Close(),
    "invocation_receivemessage_noid": Invocation(target="ReceiveMessage", arguments=["hello"]),
    "invocation_method_noid_int": Invocation(target="method", arguments=[42]),
    "invocation_with_headers": Invocation(
        target="method", arguments=[42], invocation_id="xyz", headers={"x": "y", "z": "z"}
    ),
    "invocation_from_js_client": Invocation(
        target="SendMessage", arguments=["alice", "hi"], invocation_id="0"
    ),
    "invocation_long_arg_2byte_varint": Invocation(target="ReceiveMessage", arguments=["x" * 200]),
    "stream_invocation_from_js_client": StreamInvocation(
        invocation_id="1", target="Counter", arguments=[10, 500]
    ),
    "cancel_invocation": CancelInvocation(invocation_id="xyz"),
    "stream_item_int": StreamItem(invocation_id="xyz", item=42),
    "stream_item_string": StreamItem(invocation_id="1", item="tick"),
    "completion_result_int": Completion.with_result("xyz", 42),
    "completion_result_string": Completion.with_result("0", "ok"),
    "completion_result_null": Completion.with_result("0", None),
    "completion_void": Completion.void("xyz"),
    "completion_error_upstream": Completion.with_error("xyz", "Error not found!"),
    "completion_error_unknown_method": Completion.with_error("1", UNKNOWN_METHOD),
    "ack": Ack(sequence_id=42),
    "sequence": SequenceMessage(sequence_id=146),
    "sequence_1": SequenceMessage(sequence_id=1),
}


def _is_handshake(vector: dict[str, Any]) -> bool:
    return str(vector["name"]).startswith("handshake_")


def _written_by_hubcore(vector: dict[str, Any]) -> bool:
    # JS-client forms differ from the ASP.NET form hubcore writes (5-element
    # Invocation, [7, nil] Close, "type" last); everything else is written exactly.
    return not str(vector["name"]).endswith("_from_js_client")


HUB_MESSAGES = pytest.mark.vector_filter(lambda v: not _is_handshake(v))
MSGPACK_VECTORS = pytest.mark.vector_filter(lambda v: "msgpack_framed_hex" in v)
WRITTEN_JSON = pytest.mark.vector_filter(lambda v: not _is_handshake(v) and _written_by_hubcore(v))
WRITTEN_MSGPACK = pytest.mark.vector_filter(
    lambda v: "msgpack_framed_hex" in v and _written_by_hubcore(v)
)


def _json_bytes(vector: dict[str, Any]) -> bytes:
    data = str(vector["json_text"]).encode("utf-8")
    assert data == bytes.fromhex(vector["json_hex"])  # the two columns agree
    return data


def _msgpack_bytes(vector: dict[str, Any]) -> bytes:
    framed = bytes.fromhex(vector["msgpack_framed_hex"])
    body = bytes.fromhex(vector["msgpack_body_hex"])
    assert framed == encode_varint(len(body)) + body
    return framed


def test_every_vector_has_a_hand_written_expectation(vectors: dict[str, Any]) -> None:
    assert sorted(v["name"] for v in vectors["vectors"]) == sorted(EXPECTED)


@HUB_MESSAGES
def test_json_vector_parses(vector: dict[str, Any]) -> None:
    assert_same_events(JSON.parse_messages(_json_bytes(vector)), [EXPECTED[vector["name"]]])


@MSGPACK_VECTORS
def test_msgpack_vector_parses(vector: dict[str, Any]) -> None:
    expected = EXPECTED[vector["name"]]
    assert_same_events(MSGPACK.parse_messages(_msgpack_bytes(vector)), [expected])
    # The decoded array in the vector is the same message as our hand-written one.
    body = bytes.fromhex(vector["msgpack_body_hex"])
    assert msgpack.unpackb(body, raw=False) == vector["msgpack_array"]


@WRITTEN_JSON
def test_json_vector_writes_exact_bytes(vector: dict[str, Any]) -> None:
    assert JSON.write_message(EXPECTED[vector["name"]]) == _json_bytes(vector)  # type: ignore[arg-type]


@WRITTEN_MSGPACK
def test_msgpack_vector_writes_exact_bytes(vector: dict[str, Any]) -> None:
    assert MSGPACK.write_message(EXPECTED[vector["name"]]) == _msgpack_bytes(vector)  # type: ignore[arg-type]


@HUB_MESSAGES
@pytest.mark.parametrize("protocol", ["json", "messagepack"])
def test_vector_reaches_the_right_side_through_a_connection(
    vector: dict[str, Any], protocol: str
) -> None:
    """Client->server vectors through a server connection, server->client through a client."""
    data = _json_bytes(vector) if protocol == "json" else _msgpack_bytes(vector)
    expected = EXPECTED[vector["name"]]
    sides = {"client->server": ["server"], "server->client": ["client"]}
    for side in sides.get(vector["direction"], ["server", "client"]):
        conn = open_server(protocol) if side == "server" else open_client(protocol)
        conn.receive_data(data, 1.0)
        events = drain(conn)
        assert_same_events(events, [expected])
        closing = type(expected) is Close
        assert conn.state is (ConnectionState.CLOSING if closing else ConnectionState.OPEN)


def test_handshake_request_vectors(vectors: dict[str, Any]) -> None:
    by_name = {v["name"]: v for v in vectors["vectors"]}
    for name in ("handshake_request_json", "handshake_request_messagepack"):
        data = _json_bytes(by_name[name])
        expected = EXPECTED[name]
        assert isinstance(expected, HandshakeRequest)
        # A server parses it ...
        server = HubConnection(Role.SERVER, now=0.0)
        server.receive_data(data, 0.0)
        assert_same_events(drain(server), [expected])
        assert server.protocol is not None and server.protocol.name == expected.protocol
        assert server.handshake == expected
        # ... and a client writes exactly these bytes (JS key order).
        client = HubConnection(Role.CLIENT, now=0.0)
        assert client.send(expected, 0.0) == data

    v2 = _json_bytes(by_name["handshake_request_json_v2"])
    server = HubConnection(Role.SERVER, now=0.0, allow_stateful_reconnect=True)
    server.receive_data(v2, 0.0)
    assert_same_events(drain(server), [EXPECTED["handshake_request_json_v2"]])
    assert server.send(HandshakeResponse(), 0.0) == b"{}\x1e"
    assert server.is_stateful


def test_handshake_response_vectors(vectors: dict[str, Any]) -> None:
    by_name = {v["name"]: v for v in vectors["vectors"]}
    ok = _json_bytes(by_name["handshake_response_ok"])
    error = _json_bytes(by_name["handshake_response_error"])
    assert ok == bytes.fromhex("7b7d1e")

    server = HubConnection(Role.SERVER, now=0.0)
    server.receive_data(handshake_bytes("json"), 0.0)
    drain(server)
    assert server.send(HandshakeResponse(), 0.0) == ok

    # The error vector is exactly what a server answers to protocol "foo".
    server = HubConnection(Role.SERVER, now=0.0)
    server.receive_data(handshake_bytes("foo"), 0.0)
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.handshake_error == "The protocol 'foo' is not supported."
    assert server.send(HandshakeResponse(error=info.value.handshake_error), 0.0) == error
    assert server.state is ConnectionState.CLOSED

    # And a client reads both.
    for data, expected, state in (
        (ok, EXPECTED["handshake_response_ok"], ConnectionState.OPEN),
        (error, EXPECTED["handshake_response_error"], ConnectionState.CLOSED),
    ):
        client = HubConnection(Role.CLIENT, now=0.0)
        client.send(HandshakeRequest(protocol="json", version=1), 0.0)
        client.receive_data(data, 0.0)
        assert_same_events(drain(client), [expected])
        assert client.state is state


def test_varint_example(varint_example: dict[str, Any]) -> None:
    value, data = varint_example["value"], bytes.fromhex(varint_example["hex"])
    assert encode_varint(value) == data
    assert decode_varint(data, 0) == (value, len(data))
    # At an offset, followed by other bytes.
    assert decode_varint(b"\xaa" + data + b"\xff", 1) == (value, 1 + len(data))


def test_varint_examples_cover_the_spec_list(vectors: dict[str, Any]) -> None:
    values = {v["value"] for v in vectors["varint_examples"]}
    assert {53, 127, 128, 5248, 16383, 16384, 0x7FFFFFFF} <= values


def test_ws_binary_frame_handshake_plus_ping(vectors: dict[str, Any]) -> None:
    examples = {t["name"]: t for t in vectors["transport_examples"]}
    example = examples["ws_binary_frame_handshake_plus_ping"]
    frame = bytes.fromhex(example["hex"])
    assert frame == b"{}\x1e\x02\x91\x06"
    client = HubConnection(Role.CLIENT, now=0.0)
    client.send(HandshakeRequest(protocol="messagepack", version=1), 0.0)
    client.receive_data(frame, 1.0)  # one chunk: response, then a framed MessagePack Ping
    assert_same_events(drain(client), [HandshakeResponse(), Ping()])
    assert client.state is ConnectionState.OPEN
    assert client.next_event() is None


def test_vectors_and_server_forms_of_js_messages() -> None:
    """What a server writes for the JS client's messages: 6-element Invocation, 3-element Close."""
    js_invocation = EXPECTED["invocation_from_js_client"]
    assert isinstance(js_invocation, Invocation)
    assert MSGPACK.write_message(js_invocation) == bytes.fromhex(
        "1c960180a130ab53656e644d65737361676592a5616c696365a2686990"
    )
    assert JSON.write_message(js_invocation) == (
        b'{"type":1,"invocationId":"0","target":"SendMessage","arguments":["alice","hi"]}\x1e'
    )
    assert MSGPACK.write_message(Close()) == bytes.fromhex("049307c0c2")
    assert_same_event(EXPECTED["close_from_js_client"], Close())
