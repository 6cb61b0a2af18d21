"""A connection's own deadlines, and which one is due (sans-IO: times are passed in).

hubcore keeps the protocol's timers (keep-alive, handshake and client
timeouts) and the resume gate its hold window; these are the connection's:

- ``token``: the token's ``exp`` (plus the verifier's leeway). ASP.NET Core
  closes with a reconnectable Close so clients return with a fresh token.
- ``slow``: set when output goes over the budget, cleared when it drains.
- ``goodbye``: how long a close may take. In CLOSING, the closing handshake;
  before the hub handshake, how long a requested close waits for it.
"""

from __future__ import annotations

import enum
import math

__all__ = ["Deadlines", "Due"]


class Due(enum.Enum):
    NOTHING = "nothing"
    GOODBYE = "goodbye"
    TOKEN = "token expired"
    SLOW = "slow client"


class Deadlines:
    """The token, slow-client and goodbye deadlines of one connection.

    Args:
        token_at: when the token expires, on the caller's clock (math.inf: never).
    """

    __slots__ = ("goodbye_at", "slow_at", "token_at")

    def __init__(self, token_at: float) -> None:
        self.goodbye_at = math.inf
        self.slow_at = math.inf
        self.token_at = token_at

    def due(self, now: float, *, is_closing: bool) -> Due:
        """The one deadline to act on at ``now`` (goodbye first: it ends everything)."""
        if now >= self.goodbye_at:
            return Due.GOODBYE
        if is_closing:
            return Due.NOTHING  # only the goodbye counts once a close is under way
        if now >= self.token_at:
            return Due.TOKEN
        if now >= self.slow_at:
            return Due.SLOW
        return Due.NOTHING

    def next(self, *, is_closing: bool) -> float:
        """The earliest deadline still to watch."""
        if is_closing:
            return self.goodbye_at
        return min(self.goodbye_at, self.token_at, self.slow_at)
