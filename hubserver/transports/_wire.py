"""Wires: how each transport frames hub bytes (``hubserver.routing.Wire``).

One wire per transport and hub protocol, made once: a delivery caches its
framed bytes per wire, so every recipient on the same wire gets the same
bytes, framed once.

- WebSockets: one unmasked data frame, text for JSON, binary for
  MessagePack (spec §1, §7.1).
- Server-Sent Events: one unnamed event, ``data: `` + line + CRLF for every
  LF-separated line, then CRLF (spec §7.2); JSON only.
- Long polling: the bytes as they are (a poll's body is what was buffered).
"""

from __future__ import annotations

import enum
from typing import Final

from hubcore import HubProtocol, TransferFormat
from hubcore import get_protocol as _get_protocol

from .websocket import OPCODE_BINARY, OPCODE_TEXT, server_frame

__all__ = ["TransportKind", "WebSocketWire", "handshake_wire", "sse_event", "wire_for"]


class TransportKind(enum.Enum):
    """The transports, by their names in negotiate (spec §6)."""

    WEBSOCKETS = "WebSockets"
    SERVER_SENT_EVENTS = "ServerSentEvents"
    LONG_POLLING = "LongPolling"


class WebSocketWire:
    """A WebSocket data frame of the protocol's type."""

    __slots__ = ("opcode", "protocol")

    def __init__(self, protocol: HubProtocol) -> None:
        self.protocol = protocol
        is_binary = protocol.transfer_format is TransferFormat.BINARY
        self.opcode = OPCODE_BINARY if is_binary else OPCODE_TEXT

    def frame(self, payload: bytes) -> bytes:
        return server_frame(self.opcode, payload)


def sse_event(payload: bytes) -> bytes:
    """``payload`` as one Server-Sent Event (spec §7.2: a trailing CR on a line is dropped)."""
    if b"\n" not in payload and b"\r" not in payload:
        return b"data: " + payload + b"\r\n\r\n"
    lines = [line[:-1] if line.endswith(b"\r") else line for line in payload.split(b"\n")]
    return b"".join([b"data: " + line + b"\r\n" for line in lines]) + b"\r\n"


class SseWire:
    """A Server-Sent Event (text protocols only)."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: HubProtocol) -> None:
        self.protocol = protocol

    def frame(self, payload: bytes) -> bytes:
        return sse_event(payload)


class RawWire:
    """The bytes as they are: a long poll's body."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: HubProtocol) -> None:
        self.protocol = protocol

    def frame(self, payload: bytes) -> bytes:
        return payload


Wire = WebSocketWire | SseWire | RawWire

_JSON: Final = _get_protocol("json")
_MESSAGEPACK: Final = _get_protocol("messagepack")
_WIRES: Final[dict[tuple[TransportKind, HubProtocol], Wire]] = {
    (TransportKind.WEBSOCKETS, _JSON): WebSocketWire(_JSON),
    (TransportKind.WEBSOCKETS, _MESSAGEPACK): WebSocketWire(_MESSAGEPACK),
    (TransportKind.SERVER_SENT_EVENTS, _JSON): SseWire(_JSON),
    (TransportKind.LONG_POLLING, _JSON): RawWire(_JSON),
    (TransportKind.LONG_POLLING, _MESSAGEPACK): RawWire(_MESSAGEPACK),
}


def wire_for(kind: TransportKind, protocol: HubProtocol) -> Wire | None:
    """The wire of ``protocol`` on ``kind``; None when the transport cannot carry it
    (a binary protocol over Server-Sent Events)."""
    return _WIRES.get((kind, protocol))


def handshake_wire(kind: TransportKind) -> Wire:
    """The wire of ``kind`` until the hub handshake picks a protocol: JSON's (the
    handshake is JSON, and so is its answer unless MessagePack is asked for)."""
    return _WIRES[(kind, _JSON)]
