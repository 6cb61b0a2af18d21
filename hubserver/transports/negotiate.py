"""Negotiate (spec §6), for clients that do not skip it: WebSockets only.

The reference service only documents ``skipNegotiation``; but the .NET and
Java clients negotiate unless told not to, and so does PyPI's pysignalr, which
has no switch for it. Answering negotiate costs little: a connection token
that the WebSocket request must present in ``id`` within the disconnect
timeout, once.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from typing import Final

__all__ = ["Negotiations", "negotiate_body"]

#: ASP.NET Core expires a negotiated connection that never gets a transport
#: after its DisconnectTimeout (spec §6).
PENDING_TIMEOUT: Final = 15.0
MAX_PENDING: Final = 100_000


def _random_id() -> str:
    # 16 random bytes, base64url without padding (22 chars), as ASP.NET Core does.
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class _Pending:
    path: str
    subject: str
    expires_at: float


class Negotiations:
    """Connection tokens handed out by negotiate and not yet used by a WebSocket."""

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}

    def create(self, path: str, subject: str, now: float) -> tuple[str, str]:
        """Register a negotiated connection; returns (connectionId, connectionToken)."""
        self._expire(now)
        if len(self._pending) >= MAX_PENDING:
            # Bounded: the oldest pending negotiation gives way.
            del self._pending[next(iter(self._pending))]
        token = _random_id()
        self._pending[token] = _Pending(path, subject, now + PENDING_TIMEOUT)
        return _random_id(), token

    def claim(self, token: str, path: str, subject: str, now: float) -> bool:
        """Use a connection token once; False if unknown, expired or for another stream."""
        self._expire(now)
        pending = self._pending.pop(token, None)
        return pending is not None and pending.path == path and pending.subject == subject

    def _expire(self, now: float) -> None:
        pending = self._pending
        while pending:
            token = next(iter(pending))
            if pending[token].expires_at > now:
                break
            del pending[token]


def negotiate_body(connection_id: str, connection_token: str, version: int) -> bytes:
    """The negotiate response: WebSockets only, both transfer formats."""
    body: dict[str, object] = {"negotiateVersion": version, "connectionId": connection_id}
    if version >= 1:
        body["connectionToken"] = connection_token
    body["availableTransports"] = [
        {"transport": "WebSockets", "transferFormats": ["Text", "Binary"]}
    ]
    return json.dumps(body, separators=(",", ":")).encode()
