"""Strategies and helpers shared by the hubcore tests (not a test module).

Values are generated per encoding: JSON carries arbitrary integers but no
bytes (hubcore writes ``bytes`` as base64 text, which reads back as ``str``);
MessagePack carries ``bytes`` but only 64-bit integers. Floats are finite.
Containers are lists and str-keyed dicts, since that is what parsing yields.
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
from collections.abc import Mapping
from typing import Any

from hypothesis import strategies as st

import hubcore
from hubcore import (
    Ack,
    CancelInvocation,
    Close,
    Completion,
    Event,
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

JSON = hubcore.get_protocol("json")
MSGPACK = hubcore.get_protocol("messagepack")
PROTOCOLS = (JSON, MSGPACK)
PROTOCOL_NAMES = ("json", "messagepack")

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
SEQUENCE_IDS = st.integers(min_value=0, max_value=2**63 - 1)

# st.characters() excludes surrogates; astral characters get their own branch so
# that JSON's \uXXXX surrogate-pair escapes are exercised often.
ASTRAL = st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF)
TEXT = st.one_of(
    st.text(max_size=12),
    st.text(st.one_of(ASTRAL, st.characters(codec="utf-8")), max_size=6),
    st.sampled_from(["", "\x1e", "\x00", "\u2028", "é", "😀", '"\\/']),
)
NON_EMPTY_TEXT = TEXT.filter(bool)
IDS = st.one_of(st.text(min_size=1, max_size=8), st.sampled_from(["0", "1", "xyz", "😀"]))
FLOATS = st.floats(allow_nan=False, allow_infinity=False)

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    INT64,
    st.integers(min_value=-(10**40), max_value=10**40),  # beyond 64 bits: JSON only
    FLOATS,
    TEXT,
)
MSGPACK_SCALARS = st.one_of(st.none(), st.booleans(), INT64, FLOATS, TEXT, st.binary(max_size=16))


def _values(scalars: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(TEXT, children, max_size=4),
        ),
        max_leaves=8,
    )


JSON_VALUES = _values(JSON_SCALARS)
MSGPACK_VALUES = _values(MSGPACK_SCALARS)

HEADERS = st.dictionaries(TEXT, TEXT, max_size=3)
STREAM_IDS = st.lists(IDS, max_size=3)


def messages(values: st.SearchStrategy[Any]) -> st.SearchStrategy[HubMessage]:
    """Every hub message type, with generated fields."""
    args = st.lists(values, max_size=4)
    completions = st.one_of(
        st.builds(Completion.void, IDS, headers=HEADERS),
        st.builds(Completion.with_result, IDS, values, headers=HEADERS),
        st.builds(Completion.with_result, IDS, st.none(), headers=HEADERS),
        st.builds(Completion.with_error, IDS, TEXT, headers=HEADERS),
    )
    return st.one_of(
        st.builds(
            Invocation,
            target=IDS,
            arguments=args,
            invocation_id=st.none() | IDS,
            headers=HEADERS,
            stream_ids=STREAM_IDS,
        ),
        st.builds(StreamItem, invocation_id=IDS, item=values, headers=HEADERS),
        completions,
        st.builds(
            StreamInvocation,
            invocation_id=IDS,
            target=IDS,
            arguments=args,
            headers=HEADERS,
            stream_ids=STREAM_IDS,
        ),
        st.builds(CancelInvocation, invocation_id=IDS, headers=HEADERS),
        st.just(Ping()),
        st.builds(Close, error=st.none() | NON_EMPTY_TEXT, allow_reconnect=st.booleans()),
        st.builds(Ack, sequence_id=SEQUENCE_IDS),
        st.builds(SequenceMessage, sequence_id=SEQUENCE_IDS),
    )


JSON_MESSAGES = messages(JSON_VALUES)
MSGPACK_MESSAGES = messages(MSGPACK_VALUES)
MESSAGES_BY_PROTOCOL = {"json": JSON_MESSAGES, "messagepack": MSGPACK_MESSAGES}


# -- exact comparison ---------------------------------------------------------


def same_value(a: object, b: object) -> bool:
    """Equal and of the same types all the way down (``True`` is not ``1``), floats bitwise."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return struct.pack("<d", a) == struct.pack("<d", b)  # type: ignore[arg-type]
    if type(a) in (list, tuple):
        assert isinstance(a, list | tuple) and isinstance(b, list | tuple)
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping):
        assert isinstance(b, Mapping)
        return list(a) == list(b) and all(same_value(a[k], b[k]) for k in a)
    return a == b


def assert_same_event(actual: object, expected: Event) -> None:
    """``actual == expected``, and every field has the same types as well."""
    assert actual == expected
    assert type(actual) is type(expected)
    for f in dataclasses.fields(expected):  # type: ignore[arg-type]
        left, right = getattr(actual, f.name), getattr(expected, f.name)
        if f.name == "headers":
            # Header order is not significant; compare as plain dicts of str.
            assert dict(left) == dict(right), f.name
            assert all(type(k) is str and type(v) is str for k, v in left.items())
        else:
            assert same_value(left, right), (f.name, left, right)


def assert_same_events(actual: list[Any], expected: list[Any]) -> None:
    assert len(actual) == len(expected), (actual, expected)
    for a, e in zip(actual, expected, strict=True):
        assert_same_event(a, e)


# -- connections --------------------------------------------------------------


def drain(conn: HubConnection, *, bound: int = 100_000) -> list[Event]:
    """Every event ``next_event`` has now; fails instead of looping forever."""
    events: list[Event] = []
    for _ in range(bound):
        event = conn.next_event()
        if event is None:
            return events
        events.append(event)
    raise AssertionError(f"next_event did not return None after {bound} events")


def handshake_bytes(protocol: str, version: int = 1) -> bytes:
    return f'{{"protocol":"{protocol}","version":{version}}}\x1e'.encode()


def open_server(
    protocol: str = "json",
    *,
    now: float = 0.0,
    version: int = 1,
    limits: hubcore.HubLimits | None = None,
    allow_stateful_reconnect: bool = False,
) -> HubConnection:
    """A server connection that has received the handshake and answered ``{}``."""
    conn = HubConnection(
        Role.SERVER, now=now, limits=limits, allow_stateful_reconnect=allow_stateful_reconnect
    )
    conn.receive_data(handshake_bytes(protocol, version), now)
    assert drain(conn) == [HandshakeRequest(protocol=protocol, version=version)]
    assert conn.send(HandshakeResponse(), now) == b"{}\x1e"
    assert conn.state is hubcore.ConnectionState.OPEN
    return conn


def open_client(
    protocol: str = "json",
    *,
    now: float = 0.0,
    version: int = 1,
    limits: hubcore.HubLimits | None = None,
    allow_stateful_reconnect: bool = False,
) -> HubConnection:
    """A client connection that has sent its handshake and received ``{}``."""
    conn = HubConnection(
        Role.CLIENT, now=now, limits=limits, allow_stateful_reconnect=allow_stateful_reconnect
    )
    request = HandshakeRequest(protocol=protocol, version=version)
    assert conn.send(request, now) == handshake_bytes(protocol, version)
    conn.receive_data(b"{}\x1e", now)
    assert drain(conn) == [HandshakeResponse()]
    assert conn.state is hubcore.ConnectionState.OPEN
    return conn


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, clamped, duplicates allowed)."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]
