"""`ConnectionPool`: the command connections one Redis user keeps."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ._resp import RedisAddress, RedisConnection

__all__ = ["ConnectionPool"]


class ConnectionPool:
    """At most ``max_connections`` command connections, opened on demand.

    A connection carries one command at a time. One left unusable (failed, or
    cut short mid-command) is closed on its way back instead of kept; an idle
    one that Redis closed meanwhile is noticed before reuse (``is_stale``).
    Nothing here times out: the caller's deadline covers the wait for a free
    connection, connecting and the reply.
    """

    def __init__(self, address: RedisAddress, max_connections: int) -> None:
        self._address = address
        self._limiter = trio.CapacityLimiter(max_connections)
        self._idle: list[RedisConnection] = []  # never longer than max_connections

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[RedisConnection]:
        """A connection of the pool for the block (``AUTH`` and ``SELECT`` done).

        Raises:
            BackplaneUnavailable: a new connection could not be opened.
        """
        async with self._limiter:
            conn = None
            while self._idle:
                conn = self._idle.pop()
                if not conn.is_stale():
                    break
                await conn.aclose()
                conn = None
            if conn is None:
                conn = await RedisConnection.connect(self._address)
            try:
                yield conn
            finally:
                if conn.is_usable:
                    self._idle.append(conn)
                else:
                    await conn.aclose()

    async def close_idle(self) -> None:
        """Close the idle connections (after a failure the others most likely died too)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()
