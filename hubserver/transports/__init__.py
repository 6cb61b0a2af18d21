"""Transports: how hub bytes travel between a connection and its client.

``Transport`` is the seam (``_transport.py``): ``WebSocketTransport`` (one
socket both ways), ``SseTransport`` (Server-Sent Events out, POSTs in) and
``PollTransport`` (long polls out, POSTs in). Each transport frames hub bytes with its wires
(``_wire.py``), which key the shared per-delivery frame cache, so routing
never needs to know which transport a subscriber uses.
"""

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
from ._inbound import InboundItem, Reading, WebSocketInbound
from ._outbound import Outbound, Report
from ._poll import POLL_TIMEOUT, PollOutbound, PollTransport
from ._posted import PostedInbound
from ._sse import SSE_HEAD, SseTransport
from ._transport import Inbound, OutboundSide, StartTask, Transport, WebSocketTransport
from ._wire import TransportKind, Wire, sse_event, wire_for
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
    "POLL_TIMEOUT",
    "SSE_HEAD",
    "FrameReader",
    "Inbound",
    "InboundItem",
    "Outbound",
    "OutboundSide",
    "PeerClose",
    "PeerPing",
    "PollOutbound",
    "PollTransport",
    "PostedInbound",
    "Reading",
    "Report",
    "SseTransport",
    "StartTask",
    "Transport",
    "TransportError",
    "TransportKind",
    "UpgradeError",
    "WebSocketError",
    "WebSocketInbound",
    "WebSocketTransport",
    "Wire",
    "check_upgrade",
    "close_frame",
    "close_reply",
    "pong_frame",
    "server_frame",
    "sse_event",
    "websocket_accept",
    "wire_for",
]
