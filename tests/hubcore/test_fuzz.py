"""Any input bytes give events or ``RemoteProtocolError``, nothing else, and never hang.

Targets: ``MessageReader`` and ``parse_messages`` of both protocols, a server
``HubConnection`` before and after the handshake, and a client connection.
Inputs: arbitrary bytes, valid streams with mutations, the seeds in
``tests/seeds/hubcore/`` (inputs that once found a bug or are worth keeping),
and specific regressions with exact expectations.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
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
    RemoteProtocolError,
    Role,
    TransportClosed,
    encode_varint,
)
from tests.hubcore.helpers import (
    JSON,
    MESSAGES_BY_PROTOCOL,
    MSGPACK,
    PROTOCOL_NAMES,
    drain,
    handshake_bytes,
    open_client,
    open_server,
    split_at,
)

SEEDS_DIR = Path(__file__).parents[1] / "seeds" / "hubcore"
CONNECTION_ERROR = Close(error="Connection closed with an error.", allow_reconnect=True)

Target = Callable[[list[bytes]], list[object]]


def _bound(chunks: list[bytes]) -> int:
    # Every event consumes at least one byte; anything more means a loop.
    return sum(len(c) for c in chunks) + 3


def _reader_target(name: str) -> Target:
    def run(chunks: list[bytes]) -> list[object]:
        reader = hubcore.get_protocol(name).reader()
        out: list[object] = []
        try:
            for chunk in chunks:
                reader.feed(chunk)
                for _ in range(_bound(chunks)):
                    message = reader.next_message()
                    if message is None:
                        break
                    assert isinstance(message, HubMessage)
                    out.append(message)
                else:
                    raise AssertionError("MessageReader kept returning messages")
        except RemoteProtocolError:
            pass
        return out

    return run


def _parse_target(name: str) -> Target:
    def run(chunks: list[bytes]) -> list[object]:
        try:
            messages = hubcore.get_protocol(name).parse_messages(b"".join(chunks))
        except RemoteProtocolError:
            return []
        assert all(isinstance(m, HubMessage) for m in messages)
        return list(messages)

    return run


def _drive(conn: HubConnection, chunks: list[bytes]) -> list[object]:
    """Feed chunks and drain; a server answers a handshake request with ``{}``."""
    out: list[object] = []
    now = 1.0
    try:
        for chunk in chunks:
            conn.receive_data(chunk, now)
            for _ in range(_bound(chunks)):
                event = conn.next_event()
                if event is None:
                    break
                out.append(event)
                if type(event) is HandshakeRequest:
                    conn.send(HandshakeResponse(), now)
            else:
                raise AssertionError("HubConnection kept returning events")
        conn.receive_eof(now)
        out.extend(drain(conn, bound=_bound(chunks)))
    except RemoteProtocolError as exc:
        assert conn.state is ConnectionState.ERROR
        assert conn.next_event() is None
        if exc.handshake_error is None:
            assert exc.close_hint == CONNECTION_ERROR
        # The connection can still be ended cleanly whatever happened.
        conn.receive_eof(now)
        assert drain(conn) == [TransportClosed()]
        assert conn.state is ConnectionState.CLOSED
        return out
    assert out[-1] == TransportClosed()
    assert conn.state is ConnectionState.CLOSED
    return out


def _server_target(protocol: str | None) -> Target:
    def run(chunks: list[bytes]) -> list[object]:
        conn = HubConnection(Role.SERVER, now=0.0) if protocol is None else open_server(protocol)
        return _drive(conn, chunks)

    return run


def _client_target(protocol: str | None) -> Target:
    def run(chunks: list[bytes]) -> list[object]:
        if protocol is None:  # has not sent its handshake request yet
            return _drive(HubConnection(Role.CLIENT, now=0.0), chunks)
        conn = HubConnection(Role.CLIENT, now=0.0)
        conn.send(HandshakeRequest(protocol=protocol, version=1), 0.0)
        return _drive(conn, chunks)

    return run


TARGETS: dict[str, Target] = {
    "reader-json": _reader_target("json"),
    "reader-messagepack": _reader_target("messagepack"),
    "parse-json": _parse_target("json"),
    "parse-messagepack": _parse_target("messagepack"),
    "server-fresh": _server_target(None),
    "server-json": _server_target("json"),
    "server-messagepack": _server_target("messagepack"),
    "client-no-request": _client_target(None),
    "client-json": _client_target("json"),
    "client-messagepack": _client_target("messagepack"),
}
TARGET_NAMES = sorted(TARGETS)
CUTS = st.lists(st.integers(min_value=0, max_value=400), max_size=6)


@pytest.mark.parametrize("target", TARGET_NAMES)
@given(data=st.binary(max_size=300), cuts=CUTS)
@example(data=b"\x1e", cuts=[])
@example(data=b"\xff\xff\xff\xff\x08", cuts=[])
@example(data=b'{}\x1e{"type":6}\x1e', cuts=[])
def test_arbitrary_bytes(target: str, data: bytes, cuts: list[int]) -> None:
    TARGETS[target](split_at(data, cuts))


@st.composite
def valid_streams(draw: st.DrawFn) -> bytes:
    """A handshake request followed by records of its protocol (or records alone)."""
    name = draw(st.sampled_from(PROTOCOL_NAMES))
    protocol = hubcore.get_protocol(name)
    messages = draw(st.lists(MESSAGES_BY_PROTOCOL[name], max_size=4))
    body = b"".join(protocol.write_message(m) for m in messages)
    if draw(st.booleans()):
        return handshake_bytes(name, draw(st.integers(0, 2))) + body
    return body


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_streams()))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "duplicate"]))
        at = draw(st.integers(min_value=0, max_value=len(data)))
        if op == "flip" and data:
            index = min(at, len(data) - 1)
            data[index] ^= draw(st.integers(min_value=1, max_value=255))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from([b"\x1e"]))
        elif op == "delete":
            del data[at : at + draw(st.integers(min_value=1, max_value=8))]
        else:
            data[at:at] = data[at : at + draw(st.integers(min_value=1, max_value=16))]
    return bytes(data)


@pytest.mark.parametrize("target", TARGET_NAMES)
@given(data=mutated_streams(), cuts=CUTS)
def test_mutated_valid_streams(target: str, data: bytes, cuts: list[int]) -> None:
    TARGETS[target](split_at(data, cuts))


# -- seeds ----------------------------------------------------------------------


def _seeds() -> list[Path]:
    return sorted(SEEDS_DIR.glob("*.bin"))


def test_seed_corpus_is_present() -> None:
    assert len(_seeds()) >= 10, f"seed files missing from {SEEDS_DIR}"


@pytest.mark.parametrize("seed", _seeds(), ids=lambda p: p.name)
@pytest.mark.parametrize("target", TARGET_NAMES)
def test_seed_replay(seed: Path, target: str) -> None:
    data = seed.read_bytes()
    TARGETS[target]([data])
    TARGETS[target]([data[i : i + 1] for i in range(min(len(data), 64))] + [data[64:]])


# -- regressions with exact outcomes ----------------------------------------------


def _json_error(record: bytes) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        JSON.parse_messages(record)
    conn = open_server("json")
    conn.receive_data(record, 1.0)
    with pytest.raises(RemoteProtocolError) as conn_info:
        conn.next_event()
    assert conn_info.value.close_hint == CONNECTION_ERROR
    assert conn.state is ConnectionState.ERROR
    return info.value


def _msgpack_error(body: bytes) -> RemoteProtocolError:
    record = encode_varint(len(body)) + body
    with pytest.raises(RemoteProtocolError) as info:
        MSGPACK.parse_messages(record)
    conn = open_server("messagepack")
    conn.receive_data(record, 1.0)
    with pytest.raises(RemoteProtocolError) as conn_info:
        conn.next_event()
    assert conn_info.value.close_hint == CONNECTION_ERROR
    assert conn.state is ConnectionState.ERROR
    return info.value


def test_deeply_nested_json_array_within_the_size_limit() -> None:
    nested = b"[" * 10_000 + b"]" * 10_000
    record = b'{"type":1,"target":"a","arguments":[' + nested + b"]}\x1e"
    assert len(record) < 32 * 1024
    assert "Invalid JSON" in str(_json_error(record))


def test_deeply_nested_json_object_within_the_size_limit() -> None:
    nested = b'{"a":' * 5_000 + b"1" + b"}" * 5_000
    record = b'{"type":2,"invocationId":"1","item":' + nested + b"}\x1e"
    assert len(record) < 32 * 1024
    assert "Invalid JSON" in str(_json_error(record))


def test_moderately_nested_json_is_fine() -> None:
    nested = b"[" * 100 + b"]" * 100
    (message,) = JSON.parse_messages(b'{"type":1,"target":"a","arguments":' + nested + b"}\x1e")
    assert isinstance(message, Invocation)
    value = message.arguments
    for _ in range(99):
        (value,) = value
    assert value == []


def test_deeply_nested_msgpack() -> None:
    error = _msgpack_error(bytes.fromhex("950180c0a161") + b"\x91" * 20_000 + b"\xc0")
    assert str(error) == "Invalid MessagePack: StackError"


def test_msgpack_extension_types_are_refused() -> None:
    for ext in ("d40500", "c70005", "d5050000", "c8000105"):  # fixext1/ext8/fixext2/ext16
        body = bytes.fromhex("960180c0a16191" + ext + "90")
        error = _msgpack_error(body)
        assert str(error) == "MessagePack extension type 5 is not supported."


def test_msgpack_malformed_timestamp_extension() -> None:
    error = _msgpack_error(bytes.fromhex("960180c0a16191d5ff000090"))  # 2-byte timestamp
    assert str(error) == "Invalid MessagePack: ValueError"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (b'{"type":1,"target":"\xff","arguments":[]}\x1e', "Invalid JSON"),
        (b'{"type":1,"target":"\xc3","arguments":[]}\x1e', "Invalid JSON"),
        (b'{"type":1,"target":"\xed\xa0\x80","arguments":[]}\x1e', "Invalid JSON"),  # surrogate
        (b'\xef\xbb\xbf{"type":6}\x1e', "Invalid JSON"),  # BOM
        ('{"type":6}'.encode("utf-16-le") + b"\x1e", "Invalid JSON"),
    ],
    ids=["ff", "truncated-sequence", "encoded-surrogate", "bom", "utf-16"],
)
def test_json_invalid_utf8(record: bytes, message: str) -> None:
    assert message in str(_json_error(record))


def test_msgpack_invalid_utf8() -> None:
    error = _msgpack_error(bytes.fromhex("960180c0a2ff6191a16190"))
    assert str(error) == "Invalid MessagePack: UnicodeDecodeError"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"[1]", "Expected a JSON object, got an array."),
        (b"1", "Expected a JSON object, got a number."),
        (b'"type"', "Expected a JSON object, got a string."),
        (b"null", "Expected a JSON object, got null."),
        (b"true", "Expected a JSON object, got a boolean."),
        (b"{}", "Missing required property 'type'."),
        (b'{"type":"1"}', "Expected 'type' to be an integer, got a string."),
        (b'{"type":true}', "Expected 'type' to be an integer, got a boolean."),
        (b'{"type":null}', "Expected 'type' to be an integer, got null."),
        (b'{"type":1.0}', "Expected 'type' to be an integer, got a number."),
        (b'{"type":6.5}', "Expected 'type' to be an integer, got a number."),
    ],
)
def test_json_non_object_and_mistyped_type(text: bytes, message: str) -> None:
    error = str(_json_error(text + b"\x1e"))
    if message.endswith("."):
        assert error == message
    else:
        assert error.startswith(message)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("91a136", "Expected the message type to be an integer, got a string."),
        ("91c3", "Expected the message type to be an integer, got a boolean."),
        ("91cb4018000000000000", "Expected the message type to be an integer, got a float."),
        ("c0", "Expected a non-empty MessagePack array, got nil."),
        ("90", "Expected a non-empty MessagePack array, got an array."),
        ("80", "Expected a non-empty MessagePack array, got a map."),
    ],
)
def test_msgpack_non_array_and_mistyped_type(body: str, message: str) -> None:
    assert str(_msgpack_error(bytes.fromhex(body))) == message


def test_msgpack_integers_beyond_int64() -> None:
    uint64_max = b"\xcf" + b"\xff" * 8
    # As a value it is an ordinary (unsigned 64-bit) integer ...
    body = bytes.fromhex("960180c0a16191") + uint64_max + b"\x90"
    assert MSGPACK.parse_messages(encode_varint(len(body)) + body) == [
        Invocation(target="a", arguments=[2**64 - 1])
    ]
    # ... but not a sequence id, which is a .NET long.
    assert "sequence_id" in str(_msgpack_error(b"\x92\x08" + uint64_max))
    assert "sequence_id" in str(_msgpack_error(b"\x92\x09\xcf\x80" + b"\x00" * 7))
    # And MessagePack has no wider integer: writing one is the caller's error.
    with pytest.raises(hubcore.LocalProtocolError):
        MSGPACK.write_message(Invocation(target="a", arguments=[2**64]))


@pytest.mark.parametrize(
    "token", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1" + b"0" * 30 + b"e400"]
)
def test_json_nan_and_infinity_are_refused(token: bytes) -> None:
    record = b'{"type":1,"target":"a","arguments":[' + token + b"]}\x1e"
    assert "Invalid JSON" in str(_json_error(record))


def test_json_integer_beyond_int_max_str_digits() -> None:
    record = b'{"type":1,"target":"a","arguments":[' + b"9" * 5000 + b"]}\x1e"
    assert "Invalid JSON" in str(_json_error(record))


def test_json_long_integers_keep_their_value() -> None:
    # Around the fast path's limits: orjson is exact up to 2**64 - 1 and down to -2**63.
    boundaries = (10**19 - 1, 2**64 - 1, 2**64, 10**19, -(2**63), -(2**63) - 1, -(10**19) + 1)
    for value in (2**63, 2**64, 10**100, -(10**18), *boundaries):
        record = b'{"type":1,"target":"a","arguments":[%d]}\x1e' % value
        assert JSON.parse_messages(record) == [Invocation(target="a", arguments=[value])]


def test_json_lone_surrogate_escape_is_kept() -> None:
    (message,) = JSON.parse_messages(b'{"type":1,"target":"a","arguments":["\\udc80"]}\x1e')
    assert message == Invocation(target="a", arguments=["\udc80"])
    assert JSON.write_message(message) == b'{"type":1,"target":"a","arguments":["\\udc80"]}\x1e'


def test_empty_records() -> None:
    with pytest.raises(RemoteProtocolError, match="Empty record"):
        JSON.parse_messages(b'{"type":6}\x1e\x1e')
    with pytest.raises(RemoteProtocolError, match="length 0"):
        MSGPACK.parse_messages(b"\x00")


def test_client_ignores_bytes_until_it_has_sent_its_request() -> None:
    """Regression: this used to trip an AssertionError (OPEN without a protocol)."""
    client = HubConnection(Role.CLIENT, now=0.0)
    client.receive_data(b'{}\x1e{"type":6}\x1e', 0.0)
    assert client.next_event() is None
    assert client.state is ConnectionState.AWAITING_HANDSHAKE
    client.send(HandshakeRequest(protocol="json", version=1), 0.1)
    assert drain(client) == [HandshakeResponse(), hubcore.Ping()]


def test_unknown_message_types_are_skipped() -> None:
    records = b'{"type":99}\x1e{"type":-1}\x1e{"type":0}\x1e{"type":10000000000000000000000}\x1e'
    assert JSON.parse_messages(records + b'{"type":6}\x1e') == [hubcore.Ping()]
    assert MSGPACK.parse_messages(bytes.fromhex("0291630391d0ff029100029106")) == [hubcore.Ping()]
    conn = open_client("messagepack")
    conn.receive_data(bytes.fromhex("029163029106"), 1.0)
    assert drain(conn) == [hubcore.Ping()]
