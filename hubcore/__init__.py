"""hubcore: the ASP.NET Core SignalR hub protocol, sans I/O.

Data in, events out, bytes to send: ``HubConnection`` keeps one connection's
state (handshake, framing, keep-alive and timeouts from times you pass in,
close, stateful-reconnect bookkeeping) and never touches a socket or a clock.
``get_protocol("json")`` / ``get_protocol("messagepack")`` give the codecs, and
``PreparedMessage`` encodes a broadcast once for every recipient.

It imports no async library, so it can sit inside a Trio, asyncio, threaded or
any other server. The README's "Embedding hubcore" section walks through it.

Deprecated names, kept working with a ``DeprecationWarning``:
``ConnectionClosed`` (now ``TransportClosed``), ``Sequence`` (now
``SequenceMessage``) and ``prepare(message)`` (now ``PreparedMessage(message)``).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from ._connection import HubConnection, Sendable, TimeoutKind, TransportClosed
from ._errors import (
    ConnectionNotOpen,
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
    SequenceMessage,
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
)
from ._protocol import (
    prepare as prepare,  # deprecated: PreparedMessage(message)
)
from ._state import ConnectionState, Role
from ._varint import decode_varint, encode_varint

# Deprecated aliases stay out of __all__, so ``from hubcore import *`` does not
# bring ``Sequence`` over ``typing.Sequence``.
__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "CancelInvocation",
    "Close",
    "Completion",
    "ConnectionNotOpen",
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
    "SequenceMessage",
    "StreamInvocation",
    "StreamItem",
    "TimeoutKind",
    "TransferFormat",
    "TransportClosed",
    "Value",
    "decode_varint",
    "encode_varint",
    "get_protocol",
]

_RENAMED: dict[str, tuple[str, type[Event]]] = {
    "ConnectionClosed": ("TransportClosed", TransportClosed),
    "Sequence": ("SequenceMessage", SequenceMessage),
}

if TYPE_CHECKING:
    # Type checkers see the old names as the classes they now are.
    ConnectionClosed = TransportClosed
    Sequence = SequenceMessage
else:

    def __getattr__(name: str) -> type[Event]:
        renamed = _RENAMED.get(name)
        if renamed is None:
            raise AttributeError(f"module 'hubcore' has no attribute {name!r}")
        new_name, cls = renamed
        warnings.warn(
            f"hubcore.{name} is deprecated; use hubcore.{new_name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return cls
