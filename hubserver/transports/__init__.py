"""Transports: how hub bytes travel. WebSockets now; SSE and long polling fit the same seam."""

from __future__ import annotations

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
    "TransportError",
    "UpgradeError",
    "check_upgrade",
    "server_frame",
    "websocket_accept",
]
