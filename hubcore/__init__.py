"""hubcore: the ASP.NET Core SignalR hub protocol, sans I/O.

Data in, events out, bytes to send: ``HubConnection`` keeps one connection's
state (handshake, framing, keep-alive and timeouts from times you pass in,
close, stateful-reconnect bookkeeping) and never touches a socket or a clock.
``get_protocol("json")`` / ``get_protocol("messagepack")`` give the codecs, and
``PreparedMessage`` encodes a broadcast once for every recipient.

It imports no async library, so it can sit inside a Trio, asyncio, threaded or
any other server.
"""

from __future__ import annotations

from ._connection import ConnectionClosed, HubConnection, Sendable
from ._errors import (
    HubError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    ReplayBufferFull,
)
from ._events import (
    Ack,
    CancelInvocation,
    Close,
    Completion,
    Event,
    HandshakeRequest,
    HandshakeResponse,
    HubMessage,
    Invocation,
    MessageType,
    Ping,
    Sequence,
    StreamInvocation,
    StreamItem,
    Value,
)
from ._limits import HubLimits
from ._protocol import (
    PROTOCOL_VERSION,
    HubProtocol,
    MessageReader,
    PreparedBatch,
    PreparedMessage,
    TransferFormat,
    get_protocol,
    prepare,
)
from ._state import ConnectionState, Role
from ._varint import decode_varint, encode_varint

__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "CancelInvocation",
    "Close",
    "Completion",
    "ConnectionClosed",
    "ConnectionState",
    "Event",
    "HandshakeRequest",
    "HandshakeResponse",
    "HubConnection",
    "HubError",
    "HubLimits",
    "HubMessage",
    "HubProtocol",
    "Invocation",
    "LocalProtocolError",
    "MessageReader",
    "MessageType",
    "Ping",
    "PreparedBatch",
    "PreparedMessage",
    "ProtocolError",
    "RemoteProtocolError",
    "ReplayBufferFull",
    "Role",
    "Sendable",
    "Sequence",
    "StreamInvocation",
    "StreamItem",
    "TransferFormat",
    "Value",
    "decode_varint",
    "encode_varint",
    "get_protocol",
    "prepare",
]
