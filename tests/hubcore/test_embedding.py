"""What an embedding server relies on (issue #13): frame types, text frames in, the
error reply, why a timer ended a connection, and the deprecated names."""

from __future__ import annotations

import warnings

import pytest

import hubcore
from hubcore import (
    Close,
    ConnectionState,
    HandshakeRequest,
    HandshakeResponse,
    HubConnection,
    Invocation,
    RemoteProtocolError,
    Role,
    SequenceMessage,
    TimeoutKind,
    TransferFormat,
    TransportClosed,
)
from tests.hubcore.helpers import JSON, MSGPACK, drain, handshake_bytes, open_client, open_server

S = ConnectionState
CANCELED = b'{"error":"Handshake was canceled."}\x1e'

# -- frame types ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "after"), [("json", TransferFormat.TEXT), ("messagepack", TransferFormat.BINARY)]
)
def test_transfer_format_follows_the_handshake(name: str, after: TransferFormat) -> None:
    server = HubConnection(Role.SERVER, now=0.0)
    assert server.transfer_format is TransferFormat.TEXT
    server.receive_data(handshake_bytes(name), 0.0)
    drain(server)
    assert server.transfer_format is TransferFormat.TEXT
    # ASP.NET Core switches before writing the answer: `{}` goes out in the
    # protocol's frame type (spec §2), and so does everything after it.
    assert server.send(HandshakeResponse(), 0.0) == b"{}\x1e"
    assert server.transfer_format is after

    client = HubConnection(Role.CLIENT, now=0.0)
    client.send(HandshakeRequest(protocol=name, version=1), 0.0)
    assert client.transfer_format is TransferFormat.TEXT
    client.receive_data(b"{}\x1e", 0.0)
    assert drain(client) == [HandshakeResponse()]
    assert client.transfer_format is after


def test_handshake_errors_travel_as_text() -> None:
    # A protocol this server does not offer: no protocol is chosen at all.
    conn = HubConnection(Role.SERVER, now=0.0, protocols=("json",))
    conn.receive_data(handshake_bytes("messagepack"), 0.0)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert conn.protocol is None
    conn.send(info.value.reply, 0.0)
    assert conn.transfer_format is TransferFormat.TEXT
    # The application refuses a MessagePack handshake it could parse.
    conn = HubConnection(Role.SERVER, now=0.0)
    conn.receive_data(handshake_bytes("messagepack"), 0.0)
    drain(conn)
    assert conn.send(HandshakeResponse(error="no"), 0.0) == b'{"error":"no"}\x1e'
    assert conn.protocol is MSGPACK
    assert conn.transfer_format is TransferFormat.TEXT
    # The handshake timeout's answer.
    conn = HubConnection(Role.SERVER, now=0.0)
    assert conn.handle_timer(15.0) == CANCELED
    assert conn.transfer_format is TransferFormat.TEXT


def test_a_text_frame_goes_in_as_it_came() -> None:
    # websockets and most WebSocket libraries give a text frame as str.
    server = HubConnection(Role.SERVER, now=0.0)
    server.receive_data('{"protocol":"json","version":1}\x1e', 0.0)
    assert drain(server) == [HandshakeRequest(protocol="json", version=1)]
    server.send(HandshakeResponse(), 0.0)
    text = '{"type":1,"target":"Echo","arguments":["é😀"],"invocationId":"1"}\x1e{"type":6}'
    server.receive_data(text[:40], 1.0)  # split inside the record and inside nothing else
    server.receive_data(text[40:] + "\x1e", 1.0)
    assert drain(server) == [
        Invocation(target="Echo", arguments=["é😀"], invocation_id="1"),
        hubcore.Ping(),
    ]
    server.receive_data("", 2.0)
    assert server.next_event() is None


# -- errors -----------------------------------------------------------------------------


def test_reply_is_the_handshake_error_during_the_handshake() -> None:
    conn = HubConnection(Role.SERVER, now=0.0)
    conn.receive_data(b'{"protocol":"json","version":99}\x1e', 0.0)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    reply = info.value.reply
    assert reply == HandshakeResponse(error=info.value.handshake_error)
    assert conn.state is S.ERROR
    data = conn.send(reply, 0.0)
    error = "The server does not support version 99 of the 'json' protocol."
    assert data == b'{"error":"' + error.encode() + b'"}\x1e'
    assert conn.state is S.CLOSED


@pytest.mark.parametrize("name", ["json", "messagepack"])
def test_reply_is_the_close_after_the_handshake(name: str) -> None:
    conn = open_server(name)
    conn.receive_data(b"\x1e" if name == "json" else b"\x01\xc1", 1.0)
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.handshake_error is None
    assert info.value.reply == info.value.close_hint
    assert info.value.reply == Close(error="Connection closed with an error.", allow_reconnect=True)
    protocol = JSON if name == "json" else MSGPACK
    assert conn.send(info.value.reply, 1.0) == protocol.write_message(info.value.close_hint)
    assert conn.state is S.CLOSED


def test_a_value_the_protocol_cannot_carry_leaves_the_connection_usable() -> None:
    conn = open_server("messagepack")
    with pytest.raises(hubcore.LocalProtocolError):
        conn.send(Invocation(target="a", arguments=[2**70]), 1.0)  # beyond 64 bits
    with pytest.raises(hubcore.LocalProtocolError):
        conn.send(hubcore.PreparedMessage(Invocation(target="a", arguments=[2**70])), 1.0)
    assert conn.state is S.OPEN
    assert conn.next_deadline() == 15.0  # nothing was counted as sent
    assert conn.send(Invocation(target="a"), 2.0) == MSGPACK.write_message(Invocation(target="a"))


# -- timers -----------------------------------------------------------------------------


def test_timeout_kind_says_which_timer_ended_the_connection() -> None:
    conn = HubConnection(Role.SERVER, now=0.0)
    assert conn.timeout_kind is None
    assert conn.handle_timer(15.0) == CANCELED
    assert (conn.state, conn.timeout_kind) == (S.CLOSED, TimeoutKind.HANDSHAKE)

    conn = open_server("json")
    assert conn.handle_timer(15.0) == b'{"type":6}\x1e'  # a keep-alive ends nothing
    assert conn.timeout_kind is None
    conn.handle_timer(30.0)
    assert (conn.state, conn.timeout_kind) == (S.CLOSED, TimeoutKind.PEER)

    client = open_client("json")
    client.handle_timer(30.0)
    assert client.timeout_kind is TimeoutKind.PEER


def test_no_timeout_kind_for_other_ends() -> None:
    conn = open_server("json")
    conn.receive_eof(1.0)
    assert drain(conn) == [TransportClosed()]
    assert (conn.state, conn.timeout_kind) == (S.CLOSED, None)


# -- deprecated names -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new"), [("ConnectionClosed", TransportClosed), ("Sequence", SequenceMessage)]
)
def test_renamed_classes_keep_their_old_names(old: str, new: type) -> None:
    with pytest.warns(DeprecationWarning, match=f"hubcore.{old} is deprecated"):
        cls = getattr(hubcore, old)
    assert cls is new
    with pytest.warns(DeprecationWarning):
        from hubcore import Sequence  # noqa: F401  (the old import still works)
    assert old not in hubcore.__all__


def test_prepare_is_the_deprecated_spelling_of_prepared_message() -> None:
    with pytest.warns(DeprecationWarning, match="PreparedMessage"):
        prepared = hubcore.prepare(Invocation(target="a"))
    assert type(prepared) is hubcore.PreparedMessage
    assert "prepare" not in hubcore.__all__


def test_star_import_does_not_shadow_typing_sequence() -> None:
    namespace: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and touches no deprecated name
        exec("from typing import Sequence\nfrom hubcore import *", namespace)
    assert namespace["Sequence"] is __import__("typing").Sequence
    assert namespace["SequenceMessage"] is SequenceMessage


def test_unknown_names_still_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        hubcore.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
