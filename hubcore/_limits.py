"""Limits and timers of one hub connection, with ASP.NET Core's defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["HubLimits"]

DEFAULT_MAX_MESSAGE_BYTES: Final = 32 * 1024  # HubOptions.MaximumReceiveMessageSize
DEFAULT_MAX_REPLAY_BUFFER_BYTES: Final = 100_000  # HubOptions.StatefulReconnectBufferSize
DEFAULT_KEEPALIVE_INTERVAL: Final = 15.0  # seconds, HubOptions.KeepAliveInterval
DEFAULT_CLIENT_TIMEOUT: Final = 30.0  # seconds, HubOptions.ClientTimeoutInterval
DEFAULT_HANDSHAKE_TIMEOUT: Final = 15.0  # seconds, HubOptions.HandshakeTimeout
DEFAULT_ACK_INTERVAL: Final = 1.0  # seconds; ASP.NET Core acks from a 1 s timer


@dataclass(frozen=True, slots=True, kw_only=True)
class HubLimits:
    """Per-connection limits; every time is in seconds of the caller's clock.

    Attributes:
        max_message_bytes: largest inbound message, framing included (its RS, or
            its VarInt prefix). Also bounds the handshake request. Default 32 KiB.
        max_replay_buffer_bytes: unacknowledged outbound bytes kept for stateful
            reconnect before ``send`` refuses more. Default 100,000.
        keepalive_interval: a Ping is due after this long without sending. 15 s.
        client_timeout: the peer is gone after this long without receiving
            (a server counts from the end of the handshake). 30 s.
        handshake_timeout: the handshake must complete this long after the
            connection was made. 15 s.
        ack_interval: how soon received trackable messages are acknowledged on a
            stateful connection. 1 s.
    """

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_replay_buffer_bytes: int = DEFAULT_MAX_REPLAY_BUFFER_BYTES
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL
    client_timeout: float = DEFAULT_CLIENT_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    ack_interval: float = DEFAULT_ACK_INTERVAL

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_replay_buffer_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"HubLimits.{name} must be a positive int, got {value!r}")
        for name in ("keepalive_interval", "client_timeout", "handshake_timeout", "ack_interval"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"HubLimits.{name} must be a positive number, got {value!r}")
