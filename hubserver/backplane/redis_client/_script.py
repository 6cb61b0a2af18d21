"""`Script`: a Lua script sent by its SHA1, and whole only when Redis lacks it."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

from ._resp import Arg, RedisConnection, RedisReplyError, Reply

__all__ = ["Script"]

log = logging.getLogger(__name__)


class Script:
    """A Lua script run with ``EVALSHA``, and with ``EVAL`` after a ``NOSCRIPT``.

    Redis loses its script cache on a restart or a ``SCRIPT FLUSH``; ``EVAL``
    runs the script and caches it again.

    Args:
        source: the Lua text.
    """

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def evaluate(
        self, conn: RedisConnection, keys: Sequence[Arg], args: Sequence[Arg]
    ) -> Reply:
        """Run the script on ``conn`` with ``KEYS`` and ``ARGV``; returns its reply.

        Raises:
            RedisReplyError: the script failed, or Redis refused it.
            BackplaneError: the connection failed (see ``RedisConnection.execute``).
        """
        try:
            return await conn.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except RedisReplyError as exc:
            if exc.code != "NOSCRIPT":
                raise
        # NOSCRIPT means nothing ran, so running it again is safe.
        log.debug(
            "Redis at %s has no script %s cached; sending it with EVAL", conn.address, self.sha
        )
        return await conn.execute("EVAL", self.source, len(keys), *keys, *args)
