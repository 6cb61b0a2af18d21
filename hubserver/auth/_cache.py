"""A bounded cache of verified tokens, in front of any ``TokenVerifier``.

A publisher sends the same token with every request and a reconnecting client
presents the same token again: verifying an RS256 signature each time cost a
sixth of the server's CPU in the bench. Only successes are kept, keyed by the
exact token text, and only while the token has not expired and for at most
``max_age`` seconds, so a key removed from the JWKS stops working within that
time.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

import trio

from ._claims import Claims
from ._sources import TokenVerifier

__all__ = ["CachingVerifier"]

DEFAULT_MAX_ENTRIES: Final = 4096
DEFAULT_MAX_AGE: Final = 60.0


class CachingVerifier:
    """A ``TokenVerifier`` that remembers recent successful verifications.

    Args:
        inner: the verifier that decides.
        max_entries: tokens remembered; the least recently used go first.
        max_age: seconds (of ``trio.current_time``) a success is reused.
    """

    def __init__(
        self,
        inner: TokenVerifier,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_age: float = DEFAULT_MAX_AGE,
    ) -> None:
        self._inner = inner
        self._max_entries = max_entries
        self._max_age = max_age
        self._cache: OrderedDict[str, tuple[Claims, float]] = OrderedDict()

    async def verify(self, token: str, now: float) -> Claims:
        entry = self._cache.get(token)
        clock = trio.current_time()
        if entry is not None:
            claims, verified_at = entry
            # ``now`` is unix time: a cached token still ends at its exp.
            fresh = clock - verified_at < self._max_age
            if fresh and (claims.expires_at is None or now < claims.expires_at):
                self._cache.move_to_end(token)
                await trio.lowlevel.checkpoint()
                return claims
            del self._cache[token]
        claims = await self._inner.verify(token, now)
        self._cache[token] = (claims, clock)
        if len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)
        return claims
