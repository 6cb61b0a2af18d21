"""The one exception tree of hubcore.

``HubError`` is the root. ``RemoteProtocolError`` means the peer broke the
protocol (any input bytes can only ever raise this one); ``LocalProtocolError``
means the caller misused the API. Each protocol error carries the reply the
SignalR spec asks for (a ``Close`` message, or a handshake error text), in the
way h11 carries ``error_status_hint``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._events import Close

__all__ = [
    "HubError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "ReplayBufferFull",
]

#: ASP.NET Core's text for every fatal protocol error after the handshake
#: (HubConnectionHandler: "Connection closed with an error.").
CONNECTION_ERROR_TEXT = "Connection closed with an error."


class HubError(Exception):
    """Base of every exception raised by hubcore (and by hubserver)."""


class ProtocolError(HubError):
    """The SignalR protocol was violated, by the peer or by the caller.

    Attributes:
        handshake_error: when set, the handshake failed and this text belongs in
            ``HandshakeResponse(error=...)`` (spec §2 lists the texts).
        close_hint: the ``Close`` message to send, for errors after the handshake.
    """

    def __init__(
        self,
        msg: str,
        *,
        handshake_error: str | None = None,
        close_hint: Close | None = None,
    ) -> None:
        super().__init__(msg)
        self.handshake_error = handshake_error
        self._close_hint = close_hint

    @property
    def close_hint(self) -> Close:
        """The Close to send: ``Connection closed with an error.``, reconnect allowed."""
        if self._close_hint is not None:
            return self._close_hint
        from ._events import Close

        return Close(error=CONNECTION_ERROR_TEXT, allow_reconnect=True)


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids: malformed, oversized or out of order."""


class LocalProtocolError(ProtocolError):
    """The caller asked for something the protocol or the connection's state forbids."""


class ReplayBufferFull(LocalProtocolError):
    """A stateful-reconnect connection has ``max_replay_buffer_bytes`` unacknowledged.

    The caller should wait for the peer's ``Ack`` (or treat the peer as too slow).
    """
