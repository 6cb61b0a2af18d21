"""The connection state machine, as a table.

Theory of operation
-------------------

A hub connection starts in AWAITING_HANDSHAKE. The client's first record is
the handshake request; the server answers ``{}`` (to OPEN) or an error (to
CLOSED). In OPEN both sides exchange hub messages. A Close received moves to
CLOSING, where the only thing left to do is to send our own Close (to CLOSED)
and close the transport. That Close is a courtesy, not a duty: the peer stops
reading hub messages once it has sent its own, and ASP.NET Core sends one
(``{"type":7}``), so a server should too. A Close sent moves straight to
CLOSED, since nothing may follow it. The end of the byte stream, or a timeout,
ends the connection wherever it is.

A hub message sent outside OPEN (a broadcast reaching a connection still in
its handshake, or one whose peer just closed) is refused with
``ConnectionNotOpen`` and no move at all: it is the one send that cannot be
told from a race, so it must not break the connection.

When the peer breaks the protocol, or the caller misuses the API, the
connection moves to ERROR. From there the only moves are the reply the error
asks for (a Close, or a handshake error) and the end of the stream, both to
CLOSED. Every (state, move) pair not in the table is itself an error: the
caller gets ``LocalProtocolError`` and the connection lands in ERROR.

Timers are not states: ``HubConnection`` derives its deadline from the state
and the times it was given.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["ConnectionState", "Move", "Role", "TRANSITIONS"]


class Role(enum.Enum):
    """Which side of the connection this object plays."""

    SERVER = "server"
    CLIENT = "client"


class ConnectionState(enum.Enum):
    """Where a ``HubConnection`` is in its life."""

    AWAITING_HANDSHAKE = "awaiting_handshake"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"
    ERROR = "error"


class Move(enum.Enum):
    """What happened to the connection; the table says where it goes next."""

    SEND_HANDSHAKE_REQUEST = "send handshake request"
    SEND_HANDSHAKE_OK = "send handshake response"
    SEND_HANDSHAKE_ERROR = "send handshake error"
    RECV_HANDSHAKE_REQUEST = "receive handshake request"
    RECV_HANDSHAKE_OK = "receive handshake response"
    RECV_HANDSHAKE_ERROR = "receive handshake error"
    SEND_MESSAGE = "send a hub message"
    RECV_MESSAGE = "receive a hub message"
    SEND_CLOSE = "send Close"
    RECV_CLOSE = "receive Close"
    END_OF_STREAM = "end of stream"
    TIMEOUT = "timeout"
    PROTOCOL_ERROR = "protocol error"


_S = ConnectionState
_M = Move

TRANSITIONS: Final[dict[tuple[ConnectionState, Move], ConnectionState]] = {
    (_S.AWAITING_HANDSHAKE, _M.SEND_HANDSHAKE_REQUEST): _S.AWAITING_HANDSHAKE,
    (_S.AWAITING_HANDSHAKE, _M.RECV_HANDSHAKE_REQUEST): _S.AWAITING_HANDSHAKE,
    (_S.AWAITING_HANDSHAKE, _M.SEND_HANDSHAKE_OK): _S.OPEN,
    (_S.AWAITING_HANDSHAKE, _M.SEND_HANDSHAKE_ERROR): _S.CLOSED,
    (_S.AWAITING_HANDSHAKE, _M.RECV_HANDSHAKE_OK): _S.OPEN,
    (_S.AWAITING_HANDSHAKE, _M.RECV_HANDSHAKE_ERROR): _S.CLOSED,
    (_S.AWAITING_HANDSHAKE, _M.END_OF_STREAM): _S.CLOSED,
    (_S.AWAITING_HANDSHAKE, _M.TIMEOUT): _S.CLOSED,
    (_S.AWAITING_HANDSHAKE, _M.PROTOCOL_ERROR): _S.ERROR,
    (_S.OPEN, _M.SEND_MESSAGE): _S.OPEN,
    (_S.OPEN, _M.RECV_MESSAGE): _S.OPEN,
    (_S.OPEN, _M.SEND_CLOSE): _S.CLOSED,
    (_S.OPEN, _M.RECV_CLOSE): _S.CLOSING,
    (_S.OPEN, _M.END_OF_STREAM): _S.CLOSED,
    (_S.OPEN, _M.TIMEOUT): _S.CLOSED,
    (_S.OPEN, _M.PROTOCOL_ERROR): _S.ERROR,
    (_S.CLOSING, _M.SEND_CLOSE): _S.CLOSED,
    (_S.CLOSING, _M.END_OF_STREAM): _S.CLOSED,
    (_S.CLOSING, _M.TIMEOUT): _S.CLOSED,
    (_S.ERROR, _M.SEND_CLOSE): _S.CLOSED,
    (_S.ERROR, _M.SEND_HANDSHAKE_ERROR): _S.CLOSED,
    (_S.ERROR, _M.END_OF_STREAM): _S.CLOSED,
    (_S.ERROR, _M.PROTOCOL_ERROR): _S.ERROR,
    (_S.CLOSED, _M.END_OF_STREAM): _S.CLOSED,
}
