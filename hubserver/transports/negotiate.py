"""Negotiate (spec §6) and the connections it names.

The reference service only documents ``skipNegotiation``; but the .NET and
Java clients negotiate unless told not to, so does PyPI's pysignalr, and
Server-Sent Events and long polling need it. A negotiated connection token
must be presented in ``id`` by the transport's first request within the
disconnect timeout, once (``claim``), by the same subject for the same
stream. From then on the connection is live under its token
(``attach``/``find``) until it ends: the client's POSTs, polls and DELETE
find it there.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections import deque
from dataclasses import dataclass
from typing import Final, Protocol

from ._wire import TransportKind

__all__ = ["LiveConnection", "Negotiated", "Negotiations", "negotiate_body"]

#: ASP.NET Core expires a negotiated connection that never gets a transport
#: after its DisconnectTimeout (spec §6).
PENDING_TIMEOUT: Final = 15.0
MAX_PENDING: Final = 100_000
#: One subject's pending negotiations: past this its own oldest gives way, so a
#: client negotiating without connecting pushes out no one else's.
MAX_PENDING_PER_SUBJECT: Final = 1000


def _random_id() -> str:
    # 16 random bytes, base64url without padding (22 chars), as ASP.NET Core does.
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class Negotiated:
    """A negotiated connection, until its transport claims it."""

    path: str
    subject: str
    expires_at: float
    #: Stateful reconnect was asked for and granted (spec §8).
    is_stateful: bool = False


class LiveConnection(Protocol):
    """What the client's later requests reach of a live negotiated connection."""

    @property
    def subject(self) -> str: ...

    @property
    def kind(self) -> TransportKind: ...


class Negotiations:
    """Connection tokens handed out by negotiate, then the live connections they name."""

    def __init__(self) -> None:
        self._pending: dict[str, Negotiated] = {}
        # Each subject's pending tokens, oldest first (as in ``_pending``).
        self._pending_of: dict[str, deque[str]] = {}
        self._live: dict[str, tuple[LiveConnection, str]] = {}

    @property
    def live_count(self) -> int:
        return len(self._live)

    def attach(self, token: str, connection: LiveConnection, stream: str) -> None:
        """``token`` (just claimed) names ``connection`` (of ``stream``) until ``forget``."""
        self._live[token] = (connection, stream)

    def find(self, token: str) -> LiveConnection | None:
        live = self._live.get(token)
        return None if live is None else live[0]

    def stream_of(self, token: str) -> str | None:
        live = self._live.get(token)
        return None if live is None else live[1]

    def forget(self, token: str) -> None:
        self._live.pop(token, None)

    def create(
        self, path: str, subject: str, now: float, *, is_stateful: bool = False
    ) -> tuple[str, str]:
        """Register a negotiated connection; returns (connectionId, connectionToken)."""
        self._expire(now)
        tokens = self._pending_of.get(subject)
        if tokens is not None and len(tokens) >= MAX_PENDING_PER_SUBJECT:
            self._drop(tokens[0])
        elif len(self._pending) >= MAX_PENDING:
            # Bounded: the oldest pending negotiation gives way.
            self._drop(next(iter(self._pending)))
        token = _random_id()
        self._pending[token] = Negotiated(path, subject, now + PENDING_TIMEOUT, is_stateful)
        self._pending_of.setdefault(subject, deque()).append(token)
        return _random_id(), token

    def claim(self, token: str, path: str, subject: str, now: float) -> Negotiated | None:
        """Use a connection token once; None if unknown, expired or for another stream."""
        self._expire(now)
        pending = self._drop(token)
        if pending is None or pending.path != path or pending.subject != subject:
            return None
        return pending

    def _drop(self, token: str) -> Negotiated | None:
        pending = self._pending.pop(token, None)
        if pending is not None:
            tokens = self._pending_of[pending.subject]
            tokens.remove(token)  # at most MAX_PENDING_PER_SUBJECT; mostly the first
            if not tokens:
                del self._pending_of[pending.subject]
        return pending

    def _expire(self, now: float) -> None:
        pending = self._pending
        while pending:
            token = next(iter(pending))
            if pending[token].expires_at > now:
                break
            self._drop(token)


#: In the order clients should try them (the JS client takes the first that works).
_TRANSPORTS: Final = (
    {"transport": "WebSockets", "transferFormats": ["Text", "Binary"]},
    {"transport": "ServerSentEvents", "transferFormats": ["Text"]},
    {"transport": "LongPolling", "transferFormats": ["Text", "Binary"]},
)


def negotiate_body(
    connection_id: str,
    connection_token: str,
    version: int,
    *,
    is_stateful: bool = False,
    websockets_only: bool = False,
) -> bytes:
    """The negotiate response (ASP.NET Core's key order): every transport, in order.

    ``useStatefulReconnect`` only when the client asked for it (a client that did
    not fails on it, spec §6). ``websockets_only``: a process whose later
    requests of a connection may reach another process (see the caller).
    """
    body: dict[str, object] = {"useStatefulReconnect": True} if is_stateful else {}
    body["negotiateVersion"] = version
    body["connectionId"] = connection_id
    if version >= 1:
        body["connectionToken"] = connection_token
    body["availableTransports"] = list(_TRANSPORTS[:1] if websockets_only else _TRANSPORTS)
    return json.dumps(body, separators=(",", ":")).encode()
