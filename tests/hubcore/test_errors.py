"""Only hubcore's own exceptions escape, and each carries the right hint.

Events validate their fields and refuse wrong types (``LocalProtocolError``),
writers refuse values their encoding cannot carry, and ``get_protocol`` refuses
unknown names. The tree: HubError > ProtocolError > Local/RemoteProtocolError.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import pytest

import hubcore
from hubcore import (
    Ack,
    CancelInvocation,
    Close,
    Completion,
    HandshakeRequest,
    HandshakeResponse,
    HubError,
    Invocation,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    ReplayBufferFull,
    SequenceMessage,
    StreamInvocation,
    StreamItem,
)
from tests.hubcore.helpers import JSON, MSGPACK

BAD_EVENTS: list[tuple[str, Callable[[], object]]] = [
    ("Invocation target int", lambda: Invocation(target=1)),  # type: ignore[arg-type]
    ("Invocation target empty", lambda: Invocation(target="")),
    ("Invocation target bytes", lambda: Invocation(target=b"a")),  # type: ignore[arg-type]
    ("Invocation arguments str", lambda: Invocation(target="a", arguments="ab")),
    ("Invocation arguments dict", lambda: Invocation(target="a", arguments={"a": 1})),  # type: ignore[arg-type]
    ("Invocation arguments None", lambda: Invocation(target="a", arguments=None)),  # type: ignore[arg-type]
    ("Invocation id int", lambda: Invocation(target="a", invocation_id=1)),  # type: ignore[arg-type]
    ("Invocation id empty", lambda: Invocation(target="a", invocation_id="")),
    ("Invocation headers list", lambda: Invocation(target="a", headers=[("a", "b")])),  # type: ignore[arg-type]
    ("Invocation header value int", lambda: Invocation(target="a", headers={"a": 1})),  # type: ignore[dict-item]
    ("Invocation header key int", lambda: Invocation(target="a", headers={1: "a"})),  # type: ignore[dict-item]
    ("Invocation stream ids str", lambda: Invocation(target="a", stream_ids="ab")),
    ("Invocation stream id empty", lambda: Invocation(target="a", stream_ids=[""])),
    ("Invocation stream id int", lambda: Invocation(target="a", stream_ids=[1])),  # type: ignore[list-item]
    ("StreamItem id None", lambda: StreamItem(invocation_id=None)),  # type: ignore[arg-type]
    ("StreamItem headers", lambda: StreamItem(invocation_id="1", headers={"a": None})),  # type: ignore[dict-item]
    ("Completion id empty", lambda: Completion(invocation_id="")),
    ("Completion error int", lambda: Completion(invocation_id="1", error=1)),  # type: ignore[arg-type]
    ("Completion has_result int", lambda: Completion(invocation_id="1", has_result=1)),  # type: ignore[arg-type]
    (
        "Completion error and result",
        lambda: Completion(invocation_id="1", error="e", has_result=True),
    ),
    ("Completion result without flag", lambda: Completion(invocation_id="1", result=1)),
    ("StreamInvocation no id", lambda: StreamInvocation(invocation_id="", target="a")),
    ("StreamInvocation target", lambda: StreamInvocation(invocation_id="1", target=None)),  # type: ignore[arg-type]
    (
        "StreamInvocation arguments",
        lambda: StreamInvocation(invocation_id="1", target="a", arguments=1),  # type: ignore[arg-type]
    ),
    ("CancelInvocation id int", lambda: CancelInvocation(invocation_id=5)),  # type: ignore[arg-type]
    ("Close error empty", lambda: Close(error="")),
    ("Close error int", lambda: Close(error=1)),  # type: ignore[arg-type]
    ("Close allow_reconnect int", lambda: Close(allow_reconnect=1)),  # type: ignore[arg-type]
    ("Ack negative", lambda: Ack(sequence_id=-1)),
    ("Ack beyond int64", lambda: Ack(sequence_id=2**63)),
    ("Ack bool", lambda: Ack(sequence_id=True)),
    ("Ack float", lambda: Ack(sequence_id=1.0)),  # type: ignore[arg-type]
    ("Sequence str", lambda: SequenceMessage(sequence_id="1")),  # type: ignore[arg-type]
    ("HandshakeRequest protocol empty", lambda: HandshakeRequest(protocol="", version=1)),
    ("HandshakeRequest version str", lambda: HandshakeRequest(protocol="json", version="1")),  # type: ignore[arg-type]
    ("HandshakeRequest version bool", lambda: HandshakeRequest(protocol="json", version=True)),
    ("HandshakeResponse error empty", lambda: HandshakeResponse(error="")),
    ("HandshakeResponse error int", lambda: HandshakeResponse(error=1)),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("build", [b for _, b in BAD_EVENTS], ids=[n for n, _ in BAD_EVENTS])
def test_events_refuse_wrong_types(build: Callable[[], object]) -> None:
    with pytest.raises(LocalProtocolError):
        build()


def test_events_are_frozen_and_keep_their_inputs_safe() -> None:
    headers = {"a": "b"}
    arguments = [1, 2]
    message = Invocation(target="a", arguments=arguments, headers=headers, stream_ids=["s"])
    headers["a"] = "changed"
    arguments.append(3)
    assert message.headers == {"a": "b"} and isinstance(message.headers, MappingProxyType)
    assert message.arguments == (1, 2)
    assert message.stream_ids == ("s",)
    with pytest.raises(AttributeError):
        message.target = "b"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Invocation("a")  # type: ignore[misc]  # keyword-only


def test_get_protocol_refuses_unknown_names() -> None:
    for name in ("xml", "JSON", "", "MessagePack"):
        with pytest.raises(LocalProtocolError):
            hubcore.get_protocol(name)
    assert hubcore.get_protocol("json") is JSON
    assert hubcore.get_protocol("messagepack") is MSGPACK


UNWRITABLE_JSON: dict[str, Any] = {
    "nan": float("nan"),
    "inf": float("inf"),
    "-inf": -float("inf"),
    "set": {1, 2},
    "object": object(),
    "nested-nan": {"a": float("nan")},
    "5000-digit-int": 10**5000,  # beyond the interpreter's int-to-str limit
}
UNWRITABLE_MSGPACK: dict[str, Any] = {
    "2**64": 2**64,
    "below-int64": -(2**63) - 1,
    "set": {1, 2},
    "object": object(),
    "lone-surrogate": "\udc80",  # no UTF-8 form
    "surrogate-key": {"\ud800": 1},
}


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value", [*UNWRITABLE_JSON.values(), _nested(100_000)], ids=[*UNWRITABLE_JSON, "deep"]
)
def test_json_refuses_unwritable_values(value: Any) -> None:
    for message in (
        Invocation(target="a", arguments=[value]),
        Invocation(target="a", arguments=[value], invocation_id="1"),
        StreamItem(invocation_id="1", item=value),
        Completion.with_result("1", value),
    ):
        with pytest.raises(LocalProtocolError):
            JSON.write_message(message)


@pytest.mark.parametrize(
    "value", [*UNWRITABLE_MSGPACK.values(), _nested(100_000)], ids=[*UNWRITABLE_MSGPACK, "deep"]
)
def test_msgpack_refuses_unwritable_values(value: Any) -> None:
    for message in (
        Invocation(target="a", arguments=[value]),
        StreamItem(invocation_id="1", item=value),
        Completion.with_result("1", value),
    ):
        with pytest.raises(LocalProtocolError):
            MSGPACK.write_message(message)


def test_a_refused_write_does_not_spoil_the_next_one() -> None:
    for value in UNWRITABLE_MSGPACK.values():
        with pytest.raises(LocalProtocolError):
            MSGPACK.write_message(StreamItem(invocation_id="1", item=[1, "x", value]))
        assert MSGPACK.write_message(Invocation(target="a", arguments=[1])) == bytes.fromhex(
            "09960180c0a161910190"
        )
        assert MSGPACK.write_message(Completion.with_result("1", 2)) == bytes.fromhex(
            "07950380a1310302"
        )


def test_msgpack_refuses_an_unencodable_target() -> None:
    with pytest.raises(LocalProtocolError):
        MSGPACK.write_message(Invocation(target="\udc80"))


def test_refused_send_leaves_an_open_connection_usable() -> None:
    from tests.hubcore.helpers import open_server

    conn = open_server("json")
    with pytest.raises(LocalProtocolError):
        conn.send(Invocation(target="a", arguments=[float("nan")]), 1.0)
    assert conn.send(Invocation(target="a"), 1.0) == (b'{"type":1,"target":"a","arguments":[]}\x1e')


def test_exception_tree() -> None:
    assert issubclass(ProtocolError, HubError)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert issubclass(ReplayBufferFull, LocalProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)
    assert issubclass(HubError, Exception)


def test_hints() -> None:
    plain = RemoteProtocolError("bad")
    assert plain.handshake_error is None
    assert plain.close_hint == Close(error="Connection closed with an error.", allow_reconnect=True)
    custom = LocalProtocolError("x", close_hint=Close(), handshake_error="h")
    assert custom.close_hint == Close() and custom.handshake_error == "h"


def test_hub_limits_validate() -> None:
    # HubLimits is configuration, and raises ValueError as documented.
    for kwargs in (
        {"max_message_bytes": 0},
        {"max_message_bytes": 1.5},
        {"max_replay_buffer_bytes": -1},
        {"keepalive_interval": 0},
        {"client_timeout": -1.0},
        {"handshake_timeout": True},
        {"ack_interval": "1"},
    ):
        with pytest.raises(ValueError):
            hubcore.HubLimits(**kwargs)  # type: ignore[arg-type]
    assert hubcore.HubLimits(keepalive_interval=1).keepalive_interval == 1
