"""Inbound WebSocket frames (RFC 6455 §5), sans I/O, for the server side.

This replaces wsproto on the inbound path for memory's sake: an idle
connection must cost a few kilobytes at most, and wsproto's ``Connection``,
``FrameProtocol``, ``Buffer`` and event deque hold about 1.6 KB each. An idle
``FrameReader`` is one small object whose slots point at shared constants
(``b""``, small ints, ``None``): it owns no buffer.

Data frame payload is streamed: the part of a frame that arrived is unmasked
and returned at once, so the reader never holds a frame or a message. Only an
incomplete frame header (at most 13 bytes), an incomplete control frame (at
most 130 bytes) and the end of a text message's code point split by a chunk
(at most 3 bytes) wait for more bytes.

The rules and close codes are wsproto's, so a peer sees no change: the tests
use wsproto's server as the oracle. The two places where the reader departs
from it (a close code 1014 is valid; a data frame out of order fails at its
header) are explained in the comments here and in
``tests/hubserver/test_ws_frames.py``.
"""

from __future__ import annotations

import struct
from codecs import utf_8_decode
from dataclasses import dataclass
from functools import cache
from typing import Final, TypeAlias

from .websocket import OPCODE_BINARY, OPCODE_TEXT, TransportError

__all__ = [
    "FrameReader",
    "PeerClose",
    "PeerPing",
    "WebSocketError",
    "close_frame",
    "close_reply",
    "pong_frame",
]

_OPCODE_CONTINUATION: Final = 0x0
_OPCODE_CLOSE: Final = 0x8
_OPCODE_PING: Final = 0x9
_OPCODE_PONG: Final = 0xA
_FIN: Final = 0x80
_RSV: Final = 0x70  # RSV1-3: no extension is negotiated, so they must be 0.
_OPCODE: Final = 0x0F
_MASKED: Final = 0x80
_LENGTH: Final = 0x7F
_LENGTH_16: Final = 126
_LENGTH_64: Final = 127
_MAX_CONTROL_PAYLOAD: Final = 125
_MAX_REASON_BYTES: Final = _MAX_CONTROL_PAYLOAD - 2
_MASK_BYTES: Final = 4
_U64: Final = struct.Struct("!Q")
_INT_XOR_MAX: Final = 1024

_PROTOCOL_ERROR: Final = 1002
_INVALID_PAYLOAD: Final = 1007


def _sendable(code: int) -> bool:
    """Whether a close frame may carry ``code`` (RFC 6455 §7.4 and its IANA registry).

    1004 is reserved; 1005, 1006 and 1015 are for local use only; the other
    codes below 3000 are unassigned. wsproto also refuses 1014 (Bad Gateway,
    in the IANA registry like 1012 and 1013, which it accepts) only because
    its enum stops at 1013; we follow the registry.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class WebSocketError(TransportError):
    """The peer broke RFC 6455; ``code`` is the close code to answer with (1002, 1007, 1009)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class PeerPing:
    """A ping from the peer; answer with ``pong_frame(payload)``."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class PeerClose:
    """A close frame from the peer; answer with ``close_reply(close)``.

    ``code`` is None when the frame had no body (RFC 6455 §7.1.5 then speaks
    of code 1005, which must never be sent back).
    """

    code: int | None
    reason: str


Received: TypeAlias = bytes | PeerPing | PeerClose


@cache
def _xor_table(key: int) -> bytes:
    """A ``bytes.translate`` table XOR-ing every byte with ``key`` (built once per key)."""
    return bytes(byte ^ key for byte in range(256))


def _unmask(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with ``mask`` repeated; ``mask[0]`` applies to ``data[0]``.

    Never a loop over the bytes in Python. Up to 1 KiB (hub messages mostly),
    one big-integer XOR is quickest; beyond, converting to and from an integer
    costs more than wsproto's way (``XorMaskerSimple``), which translates
    every fourth byte through a table, linear in the size.
    """
    size = len(data)
    if size <= _INT_XOR_MAX:
        key = int.from_bytes((mask * ((size + 3) >> 2))[:size], "little")
        return (int.from_bytes(data, "little") ^ key).to_bytes(size, "little")
    out = bytearray(data)
    for i in range(_MASK_BYTES):
        out[i::_MASK_BYTES] = out[i::_MASK_BYTES].translate(_xor_table(mask[i]))
    return bytes(out)


class FrameReader:
    """Inbound frames of the server side of one WebSocket (client frames, masked).

    Feed it the bytes that arrive (after the HTTP upgrade); it returns what
    the application needs and checks the rest of RFC 6455 §5: masking, no RSV
    bits, known opcodes, unfragmented short control frames, fragments in order,
    minimal payload lengths, UTF-8 text and valid close frames.

    There is no size limit here, neither on frames nor on messages: data is
    streamed, so a large frame costs the reader nothing, and the caller
    (hubcore) bounds the hub messages it assembles from the stream (answering
    with close code 1009 if it wants to).

    After a ``WebSocketError`` the reader is dead: every later call raises the
    same error again (a fresh instance), as the framing is lost. After a
    ``PeerClose`` it ignores whatever follows and returns ``[]``.
    """

    # Between frames every slot holds a shared constant (b"", 0, False, None).
    __slots__ = ("_end", "_fin", "_mask", "_message", "_pending", "_remaining", "_tail")

    def __init__(self) -> None:
        # Set once: the close received (then ignore all), or the error raised.
        self._end: PeerClose | WebSocketError | None = None
        # The start of a frame whose header or control payload is incomplete.
        self._pending = b""
        # The data frame being read: payload bytes still to come, its mask
        # rotated so that _mask[0] unmasks the next byte, and its FIN bit.
        self._remaining = 0
        self._mask = b""
        self._fin = False
        # The message being read: OPCODE_TEXT or OPCODE_BINARY, 0 between
        # messages; and the start of a code point split across a boundary.
        self._message = 0
        self._tail = b""

    @property
    def opcode(self) -> int | None:
        """The opcode (text or binary) of the message in progress; None between messages.

        Data returned may end mid-message: this says whether it did, and of
        which type that message is.
        """
        return self._message or None

    def receive_data(self, data: bytes) -> list[bytes | PeerPing | PeerClose]:
        """Parse what arrived; return, in wire order, unmasked application data (text and
        binary message payload bytes, consecutive pieces joined into one bytes object, may be
        partial messages: callers treat messages as a byte stream), PeerPing for each ping,
        and at most one PeerClose, after which the reader ignores everything (returns []).

        Data is never ``b""``; pongs give nothing.

        Raises:
            WebSocketError: the peer broke RFC 6455; ``code`` is the close
                code to answer with. What the same call had parsed before
                the violation is dropped, and the reader is dead from then on.
        """
        end = self._end
        if end is not None:
            if isinstance(end, WebSocketError):
                raise WebSocketError(end.code, str(end))
            return []
        if self._pending:
            data = self._pending + data
            self._pending = b""
        try:
            return self._parse(data)
        except WebSocketError as exc:
            # Keep a copy without the traceback, whose frames hold the chunk.
            self._end = WebSocketError(exc.code, str(exc))
            self._pending = self._mask = self._tail = b""
            raise

    def _parse(self, data: bytes) -> list[Received]:
        received: list[Received] = []
        pieces: list[bytes] = []
        pos = 0
        size = len(data)
        while pos < size:
            remaining = self._remaining
            if remaining:
                stop = min(pos + remaining, size)
                mask = self._mask
                piece = _unmask(data[pos:stop], mask)
                remaining -= stop - pos
                pos = stop
                self._remaining = remaining
                if remaining:
                    turn = len(piece) & 3
                    self._mask = mask[turn:] + mask[:turn]
                else:
                    self._mask = b""
                if self._message == OPCODE_TEXT and (self._tail or not piece.isascii()):
                    self._check_text(piece, final=self._fin and not remaining)
                if self._fin and not remaining:
                    self._message = 0
                pieces.append(piece)
                continue

            # A frame starts at pos. The checks are made as the bytes they need
            # arrive, in wsproto's order, so both fail on the same bytes.
            if size - pos < 2:
                break
            first = data[pos]
            second = data[pos + 1]
            opcode = first & _OPCODE
            length = second & _LENGTH
            if opcode >= _OPCODE_CLOSE:
                if opcode > _OPCODE_PONG:
                    raise WebSocketError(_PROTOCOL_ERROR, f"Invalid opcode {opcode:#x}")
                if not first & _FIN:
                    raise WebSocketError(_PROTOCOL_ERROR, "Fragmented control frame")
                if length > _MAX_CONTROL_PAYLOAD:
                    raise WebSocketError(_PROTOCOL_ERROR, "Control frame with payload len > 125")
            elif opcode > OPCODE_BINARY:
                raise WebSocketError(_PROTOCOL_ERROR, f"Invalid opcode {opcode:#x}")
            start = pos + 2
            if length == _LENGTH_16:
                start += 2
                if start > size:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length <= _MAX_CONTROL_PAYLOAD:
                    # RFC 6455 §5.2: "the minimal number of bytes MUST be used".
                    raise WebSocketError(_PROTOCOL_ERROR, "Payload length used 2 bytes, not 1")
            elif length == _LENGTH_64:
                start += 8
                if start > size:
                    break
                (length,) = _U64.unpack_from(data, pos + 2)
                if length <= 0xFFFF:
                    raise WebSocketError(_PROTOCOL_ERROR, "Payload length used 8 bytes, not 2")
                if length >> 63:
                    raise WebSocketError(_PROTOCOL_ERROR, "8-byte payload length with MSB set")
            if first & _RSV:
                raise WebSocketError(_PROTOCOL_ERROR, "Reserved bit set unexpectedly")
            if not second & _MASKED:
                raise WebSocketError(_PROTOCOL_ERROR, "Client frame not masked")
            body = start + _MASK_BYTES
            if body > size:
                break

            if opcode >= _OPCODE_CLOSE:
                stop = body + length
                if stop > size:
                    break
                payload = _unmask(data[body:stop], data[start:body]) if length else b""
                pos = stop
                if opcode == _OPCODE_PONG:
                    continue
                if pieces:
                    received.append(b"".join(pieces))
                    pieces = []
                if opcode == _OPCODE_PING:
                    received.append(PeerPing(payload))
                    continue
                close = _parse_close(payload)
                received.append(close)
                self._end = close
                self._mask = self._tail = b""
                return received

            # Detected here, at the header; wsproto waits for the first
            # payload byte (if any) to say so.
            if opcode == _OPCODE_CONTINUATION:
                if not self._message:
                    raise WebSocketError(_PROTOCOL_ERROR, "Unexpected continuation frame")
            elif self._message:
                raise WebSocketError(_PROTOCOL_ERROR, "Expected a continuation frame")
            else:
                self._message = opcode
            fin = bool(first & _FIN)
            pos = body
            self._fin = fin
            if length:
                self._remaining = length
                self._mask = data[start:body]
            elif fin:
                if self._message == OPCODE_TEXT and self._tail:
                    self._check_text(b"", final=True)  # a code point left unfinished
                self._message = 0

        if pos < size:
            # Less than a header, or less than a control frame (≤ 130 bytes).
            self._pending = data[pos:]
        if pieces:
            received.append(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        return received

    def _check_text(self, piece: bytes, *, final: bool) -> None:
        """Check a text message's next bytes are UTF-8, keeping a split code point's start.

        Only the validity matters (the data stays bytes); the decoded text is
        thrown away. ASCII, the common case, is waved through before the call.
        """
        if self._tail:
            piece = self._tail + piece
        try:
            _, used = utf_8_decode(piece, "strict", final)
        except UnicodeDecodeError as exc:
            raise WebSocketError(_INVALID_PAYLOAD, f"Text message is not UTF-8: {exc}") from None
        self._tail = piece[used:]


def _parse_close(payload: bytes) -> PeerClose:
    """Check a close frame's body (RFC 6455 §5.5.1, §7.4)."""
    if not payload:
        return PeerClose(None, "")
    if len(payload) == 1:
        raise WebSocketError(_PROTOCOL_ERROR, "Close frame with a 1-byte body")
    code = (payload[0] << 8) | payload[1]
    if not _sendable(code):
        raise WebSocketError(_PROTOCOL_ERROR, f"Close frame with invalid code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WebSocketError(_INVALID_PAYLOAD, f"Close reason is not UTF-8: {exc}") from None
    return PeerClose(code, reason)


def _control_frame(opcode: int, payload: bytes) -> bytes:
    size = len(payload)
    if size > _MAX_CONTROL_PAYLOAD:
        raise ValueError(f"control frame payload is {size} bytes, more than 125")
    return bytes((_FIN | opcode, size)) + payload


def pong_frame(payload: bytes) -> bytes:
    """The server's (unmasked) pong answering a ping with ``payload`` (at most 125 bytes)."""
    return _control_frame(_OPCODE_PONG, payload)


def close_frame(code: int | None, reason: str = "") -> bytes:
    """The server's (unmasked) close frame; ``code=None`` sends an empty body.

    A reason longer than 123 bytes in UTF-8 is cut at a code point boundary,
    since a control frame carries at most 125 bytes (as wsproto does).

    Raises:
        ValueError: ``code`` may not be sent (RFC 6455 §7.4: 1005, 1006 and
            1015 are local only), or a reason comes without a code.
    """
    if code is None:
        if reason:
            raise ValueError("a close reason needs a close code")
        return _control_frame(_OPCODE_CLOSE, b"")
    if not _sendable(code):
        raise ValueError(f"close code {code} may not be sent")
    text = reason.encode("utf-8")
    if len(text) > _MAX_REASON_BYTES:
        text = text[:_MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return _control_frame(_OPCODE_CLOSE, code.to_bytes(2, "big") + text)


def close_reply(close: PeerClose) -> bytes:
    """What the server answers to the peer's close: its code echoed, or an empty body.

    RFC 6455 §5.5.1: the answer "typically echos the status code it received";
    the reason is not echoed.
    """
    return close_frame(close.code)
