"""Transports: how hub bytes travel. WebSockets now; SSE and long polling fit the same seam."""

from __future__ import annotations

from ._frames import (
    FrameReader,
    PeerClose,
    PeerPing,
    WebSocketError,
    close_frame,
    close_reply,
    pong_frame,
)
from .websocket import (
    OPCODE_BINARY,
    OPCODE_TEXT,
    TransportError,
    UpgradeError,
    check_upgrade,
    server_frame,
    websocket_accept,
)

__all__ = [
    "OPCODE_BINARY",
    "OPCODE_TEXT",
    "FrameReader",
    "PeerClose",
    "PeerPing",
    "TransportError",
    "UpgradeError",
    "WebSocketError",
    "check_upgrade",
    "close_frame",
    "close_reply",
    "pong_frame",
    "server_frame",
    "websocket_accept",
]
