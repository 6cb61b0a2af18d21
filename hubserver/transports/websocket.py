"""WebSocket pieces (RFC 6455) of the server: the upgrade and outbound frames.

Inbound frames are parsed by ``FrameReader`` (``_frames.py``). Outbound data
frames are built here: a server frame is unmasked (RFC 6455 §5.1), so its
bytes depend only on the payload and can be shared by every recipient of the
same payload, which is what makes fan-out cheap.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Iterable
from typing import Final

from hubcore import HubError

__all__ = [
    "OPCODE_BINARY",
    "OPCODE_TEXT",
    "TransportError",
    "UpgradeError",
    "check_upgrade",
    "server_frame",
    "websocket_accept",
]

OPCODE_TEXT: Final = 0x1
OPCODE_BINARY: Final = 0x2
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_SHORT: Final = tuple(bytes([0x80 | op, n]) for op in range(3) for n in range(126))


class TransportError(HubError):
    """The transport failed: the peer went away, or a socket error."""


class UpgradeError(HubError):
    """A WebSocket upgrade request is malformed; ``status`` is the HTTP answer."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def server_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked data frame carrying ``payload``."""
    size = len(payload)
    if size < 126:
        return _SHORT[opcode * 126 + size] + payload
    if size < 1 << 16:
        return struct.pack("!BBH", 0x80 | opcode, 126, size) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, size) + payload


def websocket_accept(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value for a client's key (RFC 6455 §4.2.2)."""
    digest = hashlib.sha1(key + _GUID, usedforsecurity=False).digest()
    return base64.b64encode(digest)


def _tokens(value: bytes) -> set[bytes]:
    return {token.strip().lower() for token in value.split(b",")}


def check_upgrade(method: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Check an HTTP request is a valid WebSocket upgrade; return its key.

    Raises:
        UpgradeError: 400 for a malformed upgrade, 426 for an unsupported
            WebSocket version, 405 for a method other than GET.
    """
    if method != b"GET":
        raise UpgradeError("WebSocket upgrades use GET", status=405)
    seen: dict[bytes, bytes] = {}
    for name, value in headers:
        # h11 lower-cases names; repeated headers are joined as RFC 9110 allows.
        seen[name] = seen[name] + b", " + value if name in seen else value
    if b"websocket" not in _tokens(seen.get(b"upgrade", b"")):
        raise UpgradeError("expected 'Upgrade: websocket'")
    if b"upgrade" not in _tokens(seen.get(b"connection", b"")):
        raise UpgradeError("expected 'Connection: Upgrade'")
    if seen.get(b"sec-websocket-version", b"").strip() != b"13":
        raise UpgradeError("only WebSocket version 13 is supported", status=426)
    key = seen.get(b"sec-websocket-key", b"").strip()
    try:
        decoded = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != 16:
        raise UpgradeError("'Sec-WebSocket-Key' must be 16 bytes in base64")
    return key
