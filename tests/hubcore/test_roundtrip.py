"""Round trip per encoding: write a message, parse it back, get an equal message.

"Equal" is strict: same event type, same field types all the way down (``True``
is not ``1``, ``1.0`` is not ``1``), floats bit for bit, headers as str->str.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import hubcore
from hubcore import (
    Ack,
    Close,
    Completion,
    ConnectionState,
    HandshakeRequest,
    HandshakeResponse,
    HubConnection,
    HubMessage,
    Invocation,
    Ping,
    Role,
    SequenceMessage,
    StreamInvocation,
    StreamItem,
)
from tests.hubcore.helpers import (
    IDS,
    JSON,
    JSON_MESSAGES,
    JSON_VALUES,
    MSGPACK,
    MSGPACK_MESSAGES,
    MSGPACK_VALUES,
    NON_EMPTY_TEXT,
    assert_same_event,
    assert_same_events,
    drain,
)

ASTRAL_INVOCATION = Invocation(
    target="😀", arguments=["𝄞 \U0010ffff", {"ключ": ["\x1e", "\u2028"]}], invocation_id="🙂"
)


@given(JSON_MESSAGES)
@example(ASTRAL_INVOCATION)
@example(Invocation(target="t", arguments=[2**64, -(2**70), 10**40, 1.0, -0.0, 5e-324]))
@example(StreamItem(invocation_id="i", item=[True, 1, 1.0, None, "1"]))
@example(Ack(sequence_id=2**63 - 1))
@example(StreamItem(invocation_id="\udc80", item="lone \ud800 surrogate"))  # escaped, so writable
@example(Invocation(target="t", arguments=["é \x1e 😀"]))  # the broadcast shape: UTF-8 text
def test_json_round_trip(message: HubMessage) -> None:
    data = JSON.write_message(message)
    assert data.endswith(b"\x1e") and data.count(b"\x1e") == 1
    data.decode("utf-8")
    (parsed,) = JSON.parse_messages(data)
    assert_same_event(parsed, message)


@given(MSGPACK_MESSAGES)
@example(ASTRAL_INVOCATION)
@example(Invocation(target="t", arguments=[2**63 - 1, -(2**63), b"\x00\xff", 1.0, -0.0]))
@example(StreamItem(invocation_id="i", item=[True, 1, 1.0, None, "1", b"1"]))
@example(SequenceMessage(sequence_id=2**63 - 1))
def test_msgpack_round_trip(message: HubMessage) -> None:
    data = MSGPACK.write_message(message)
    (parsed,) = MSGPACK.parse_messages(data)
    assert_same_event(parsed, message)


@given(st.lists(JSON_MESSAGES, max_size=5))
def test_json_round_trip_of_concatenated_records(messages: list[HubMessage]) -> None:
    data = b"".join(JSON.write_message(m) for m in messages)
    assert_same_events(JSON.parse_messages(data), messages)


@given(st.lists(MSGPACK_MESSAGES, max_size=5))
def test_msgpack_round_trip_of_concatenated_records(messages: list[HubMessage]) -> None:
    data = b"".join(MSGPACK.write_message(m) for m in messages)
    assert_same_events(MSGPACK.parse_messages(data), messages)


@pytest.mark.parametrize(
    ("protocol", "values"),
    [(JSON, JSON_VALUES), (MSGPACK, MSGPACK_VALUES)],
    ids=["json", "msgpack"],
)
@given(data=st.data())
def test_completion_kinds_stay_distinct(protocol: Any, values: Any, data: st.DataObject) -> None:
    invocation_id = data.draw(IDS)
    kinds = [
        Completion.void(invocation_id),
        Completion.with_result(invocation_id, None),
        Completion.with_error(invocation_id, data.draw(st.text())),
        Completion.with_result(invocation_id, data.draw(values)),
    ]
    parsed = [protocol.parse_messages(protocol.write_message(k))[0] for k in kinds]
    assert_same_events(parsed, kinds)
    void, null_result, error = parsed[:3]
    assert (void.has_result, void.error, void.result) == (False, None, None)
    assert (null_result.has_result, null_result.error, null_result.result) == (True, None, None)
    assert error.has_result is False and error.error is not None
    assert void != null_result


def test_completion_kinds_on_the_wire() -> None:
    assert JSON.write_message(Completion.void("1")) == b'{"type":3,"invocationId":"1"}\x1e'
    assert (
        JSON.write_message(Completion.with_result("1", None))
        == b'{"type":3,"invocationId":"1","result":null}\x1e'
    )
    assert (
        JSON.write_message(Completion.with_error("1", ""))
        == b'{"type":3,"invocationId":"1","error":""}\x1e'
    )
    assert MSGPACK.write_message(Completion.void("1")) == bytes.fromhex("06940380a13102")
    assert MSGPACK.write_message(Completion.with_result("1", None)) == bytes.fromhex(
        "07950380a13103c0"
    )
    assert MSGPACK.write_message(Completion.with_error("1", "")) == bytes.fromhex(
        "07950380a13101a0"
    )


@given(
    protocol=st.sampled_from(["json", "messagepack"]),
    version=st.integers(min_value=0, max_value=2),
    error=st.none() | NON_EMPTY_TEXT,
)
def test_handshake_round_trip_through_a_pair(
    protocol: str, version: int, error: str | None
) -> None:
    request = HandshakeRequest(protocol=protocol, version=version)
    client = HubConnection(Role.CLIENT, now=0.0)
    server = HubConnection(Role.SERVER, now=0.0)
    server.receive_data(client.send(request, 0.0), 0.0)
    assert_same_events(drain(server), [request])
    response = HandshakeResponse(error=error)
    client.receive_data(server.send(response, 0.0), 0.0)
    assert_same_events(drain(client), [response])
    expected = ConnectionState.OPEN if error is None else ConnectionState.CLOSED
    assert client.state is expected and server.state is expected


def test_bytes_travel_as_base64_text_in_json() -> None:
    message = StreamItem(invocation_id="1", item=b"\x00\xffhi")
    data = JSON.write_message(message)
    assert data == b'{"type":2,"invocationId":"1","item":"AP9oaQ=="}\x1e'
    (parsed,) = JSON.parse_messages(data)
    assert parsed == StreamItem(invocation_id="1", item="AP9oaQ==")


def test_close_forms() -> None:
    close = Close(error="bye", allow_reconnect=False)
    assert JSON.write_message(close) == b'{"type":7,"error":"bye"}\x1e'
    assert MSGPACK.write_message(close) == bytes.fromhex("079307a3627965c2")
    for protocol in (JSON, MSGPACK):
        assert_same_events(protocol.parse_messages(protocol.write_message(close)), [close])


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        # The JS client's key order, unknown keys, explicit nulls for optional fields.
        (
            b'{"arguments":[1],"x":{"y":[]},"target":"a","type":1}',
            Invocation(target="a", arguments=[1]),
        ),
        (
            b'{"type":1,"target":"a","arguments":[],"headers":null,"streamIds":null}',
            Invocation(target="a"),
        ),
        (
            b'{"type":1,"target":"a","arguments":[],"headers":{},"streamIds":[]}',
            Invocation(target="a"),
        ),
        (
            b'{"type":1,"target":"a","arguments":[],"invocationId":null}',
            Invocation(target="a"),
        ),
        # An empty invocation id means fire-and-forget, as in the .NET reader.
        (b'{"type":1,"target":"a","arguments":[],"invocationId":""}', Invocation(target="a")),
        (
            b'{"type":1,"target":"a","arguments":[],"invocationId":"","headers":{"k":"v"}}',
            Invocation(target="a", headers={"k": "v"}),
        ),
        (
            b'{"type":4,"target":"a","arguments":[],"invocationId":"1","streamIds":["2"]}',
            StreamInvocation(invocation_id="1", target="a", stream_ids=["2"]),
        ),
        (
            b'{"type":3,"invocationId":"1","error":null,"result":5}',
            Completion.with_result("1", 5),
        ),
        (b'{"type":3,"invocationId":"1","error":null}', Completion.void("1")),
        (b'{"type":7,"error":"","allowReconnect":false}', Close()),
        (b'{"type":7,"error":null}', Close()),
        (b' {"type":6} ', Ping()),
    ],
)
def test_json_accepted_shapes(record: bytes, expected: HubMessage) -> None:
    assert_same_events(JSON.parse_messages(record + b"\x1e"), [expected])


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # 5 elements (JS client), 6 with nil or empty stream ids, extra trailing elements.
        ("950180c0a16190", Invocation(target="a")),
        ("960180c0a16190c0", Invocation(target="a")),
        ("980180c0a1619090c0c3", Invocation(target="a")),
        ("960180a0a1619090", Invocation(target="a")),  # empty id: fire-and-forget
        ("960180a131a161909190", None),  # stream id 1 is an int: refused below
        ("960181a16ba176a0a1619090", Invocation(target="a", headers={"k": "v"})),
        ("960180a131a1619091a132", Invocation(target="a", invocation_id="1", stream_ids=["2"])),
        ("9207c0", Close()),
        ("9107", Close()),
        ("9307a0c2", Close()),
        ("9307a178c3", Close(error="x", allow_reconnect=True)),
        ("960380a13103c0c3", Completion.with_result("1", None)),  # extra element ignored
    ],
)
def test_msgpack_accepted_shapes(body: str, expected: HubMessage | None) -> None:
    data = bytes.fromhex(body)
    record = hubcore.encode_varint(len(data)) + data
    if expected is None:
        with pytest.raises(hubcore.RemoteProtocolError, match="stream ids"):
            MSGPACK.parse_messages(record)
    else:
        assert_same_events(MSGPACK.parse_messages(record), [expected])


def test_json_error_and_result_together_are_refused() -> None:
    record = b'{"type":3,"invocationId":"1","error":"e","result":1}\x1e'
    with pytest.raises(hubcore.RemoteProtocolError) as info:
        JSON.parse_messages(record)
    assert str(info.value) == "The 'error' and 'result' properties are mutually exclusive."


_STDLIB_COMPACT_ASCII = json.JSONEncoder(
    ensure_ascii=True, separators=(",", ":"), allow_nan=False
).encode
_ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(max_codepoint=0x2FF)),
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@given(_ANY_JSON)
@example("\x7f")
@example({"é": 2**64})
def test_json_writes_results_byte_for_byte_as_the_stdlib_would(value: Any) -> None:
    """orjson writes the plain values (about 5x faster); the bytes must not change:
    non-ASCII and DEL escaped, big integers and floats as the stdlib writes them."""
    record = JSON.write_message(Completion.with_result("1", value))
    expected = '{"type":3,"invocationId":"1","result":' + _STDLIB_COMPACT_ASCII(value) + "}"
    assert record == expected.encode("ascii") + b"\x1e"
