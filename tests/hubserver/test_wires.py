"""Wires: each transport's framing of hub bytes, and which protocols it carries."""

from __future__ import annotations

import pytest

from hubcore import Invocation, PreparedMessage, get_protocol
from hubserver.routing import Delivery, StreamEvent
from hubserver.routing._groups import Hub
from hubserver.transports import TransportKind, server_frame, sse_event, wire_for

JSON = get_protocol("json")
MSGPACK = get_protocol("messagepack")


@pytest.mark.parametrize(
    ("payload", "event"),
    [
        (b'{"type":6}\x1e', b'data: {"type":6}\x1e\r\n\r\n'),
        (b"a\nb", b"data: a\r\ndata: b\r\n\r\n"),
        # A trailing CR on a line is dropped (spec 7.2), as ASP.NET Core does.
        (b"a\r\nb\r", b"data: a\r\ndata: b\r\n\r\n"),
        (b"a\n", b"data: a\r\ndata: \r\n\r\n"),
        (b"", b"data: \r\n\r\n"),
    ],
)
def test_a_server_sent_event_has_a_data_line_per_line(payload: bytes, event: bytes) -> None:
    assert sse_event(payload) == event


def test_each_transport_carries_what_it_can() -> None:
    assert wire_for(TransportKind.SERVER_SENT_EVENTS, MSGPACK) is None  # text only
    for kind in TransportKind:
        wire = wire_for(kind, JSON)
        assert wire is not None and wire.protocol is JSON
        assert wire_for(kind, JSON) is wire  # one per transport and protocol: a cache key
    assert wire_for(TransportKind.LONG_POLLING, MSGPACK) is not None


def test_a_delivery_is_framed_once_per_wire() -> None:
    message = PreparedMessage(Invocation(target="ReceiveMessage", arguments=('{"seq":1}',)))
    event = StreamEvent(
        hub=Hub("entries"), site_id="s", user_id=None, event_id="e", seq=1, text="{}",
        message=message,
    )  # fmt: skip
    delivery = Delivery([event])
    ws_json = wire_for(TransportKind.WEBSOCKETS, JSON)
    ws_msgpack = wire_for(TransportKind.WEBSOCKETS, MSGPACK)
    sse = wire_for(TransportKind.SERVER_SENT_EVENTS, JSON)
    poll = wire_for(TransportKind.LONG_POLLING, MSGPACK)
    assert ws_json and ws_msgpack and sse and poll
    framed = delivery.framed(ws_json)
    assert framed == server_frame(1, message.encoded(JSON))
    assert delivery.framed(ws_json) is framed  # the same bytes for every recipient
    assert delivery.framed(ws_msgpack) == server_frame(2, message.encoded(MSGPACK))
    assert delivery.framed(sse) == sse_event(message.encoded(JSON))
    assert delivery.framed(poll) == message.encoded(MSGPACK)
