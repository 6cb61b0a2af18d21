"""The one exception tree of hubcore.

``HubError`` is the root. ``RemoteProtocolError`` means the peer broke the
protocol (any input bytes can only ever raise this one); ``LocalProtocolError``
means the caller misused the API. Each protocol error carries the reply the
SignalR spec asks for (a ``Close`` message, or a handshake error text), in the
way h11 carries ``error_status_hint``: ``reply`` is the one to send.

Whether the connection is still usable after an exception is told by its state:
ERROR means send ``reply`` and close the transport. Any other state (after
``ReplayBufferFull``, ``ConnectionNotOpen``, or a value the protocol cannot encode)
means nothing was sent or counted, and the connection is as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._events import Close, HandshakeResponse

__all__ = [
    "ConnectionNotOpen",
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
            ``HandshakeResponse(error=...)`` (spec §2 lists the texts); else None.
        close_hint: the ``Close`` message to send, for errors after the handshake.
            Never None: a default exists even where a handshake error is due.
        reply: what to send, whichever applies; prefer it to the two above.
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

    @property
    def reply(self) -> HandshakeResponse | Close:
        """The reply the protocol asks for, to pass to ``HubConnection.send``.

        ``HandshakeResponse(error=handshake_error)`` when the handshake failed,
        else ``close_hint``. Send it, then close the transport.
        """
        if self.handshake_error is not None:
            from ._events import HandshakeResponse

            return HandshakeResponse(error=self.handshake_error)
        return self.close_hint


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids: malformed, oversized or out of order."""


class LocalProtocolError(ProtocolError):
    """The caller asked for something the protocol or the connection's state forbids."""


class ReplayBufferFull(LocalProtocolError):
    """A stateful-reconnect connection has ``max_replay_buffer_bytes`` unacknowledged.

    Nothing was sent and the connection is as it was: wait for the peer's ``Ack``
    (or treat the peer as too slow).
    """


class ConnectionNotOpen(LocalProtocolError):
    """A hub message was sent while the connection is not OPEN.

    Before the handshake completed, after either side's Close, after the end of the
    stream or a timeout: nothing was sent and the connection is as it was. A
    broadcast that may reach such connections checks ``HubConnection.is_open``
    first, or skips the ones that raise this.
    """
