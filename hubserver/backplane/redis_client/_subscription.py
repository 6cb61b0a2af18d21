"""`Subscription`: one Pub/Sub channel, kept subscribed through outages."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import trio

from .._contract import BackplaneError, BackplaneUnavailable
from ._pool import ConnectionPool
from ._resp import RedisAddress, RedisConnection

__all__ = ["FIRST_BACKOFF_INTERVAL", "MAX_BACKOFF_INTERVAL", "Subscription"]

log = logging.getLogger(__name__)

#: Resubscribe backoff: the first wait, doubled up to the last (seconds).
FIRST_BACKOFF_INTERVAL: Final = 0.1
MAX_BACKOFF_INTERVAL: Final = 2.0


class Subscription:
    """The messages of one channel, on a connection of its own, through outages.

    ``run`` retries a failed ``SUBSCRIBE`` with exponential backoff and
    subscribes again after losing the connection; what was published
    meanwhile never arrives, so it says so, and each user catches up its own
    way (the backplane from history, the permission watcher by re-checking
    everyone). A subscription silent for ``ping_interval`` is probed with
    ``PING``; no answer within ``op_timeout`` counts as lost (a silently dead
    peer would otherwise never be noticed). An outage is logged once: a
    warning when it starts, a line when the subscription is back.

    Args:
        address: the Redis server.
        channel: the channel (``RedisAddress.channel`` names the database in it).
        name: what the channel carries, for log lines ("permission change notices").
        op_timeout: the deadline of connecting and ``SUBSCRIBE``, and of a ``PING``'s answer.
        ping_interval: how long the subscription may stay silent before a ``PING``.
        pool: command connections to the same Redis, whose idle ones are closed
            when the subscription is lost (they most likely died with it).
        log_events: the JSON ``event`` of the lines saying the subscription was
            lost and is back, if they have one.
    """

    def __init__(
        self,
        address: RedisAddress,
        channel: str,
        *,
        name: str,
        op_timeout: float,
        ping_interval: float,
        pool: ConnectionPool | None = None,
        log_events: tuple[str, str] | None = None,
    ) -> None:
        self._address = address
        self._channel = channel
        self._name = name
        self._op_timeout = op_timeout
        self._ping_interval = ping_interval
        self._pool = pool
        self._lost_extra: dict[str, str] = {"event": log_events[0]} if log_events else {}
        self._back_extra: dict[str, str] = {"event": log_events[1]} if log_events else {}
        self._is_lost = False

    @property
    def is_lost(self) -> bool:
        """True while ``run`` is not subscribed: since a failure, until it subscribes again."""
        return self._is_lost

    async def run(
        self,
        on_message: Callable[[bytes], None],
        on_resubscribed: Callable[[], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Hand the data of every message to ``on_message`` until cancelled.

        ``task_status.started()`` comes with the first subscription, which is
        retried like the others (cap ``nursery.start`` with ``fail_after`` to
        bound the wait); ``on_resubscribed`` comes with every later one.
        Failures of Redis are never raised; exceptions of the callbacks
        propagate.
        """
        backoff = FIRST_BACKOFF_INTERVAL
        is_started = False
        try:
            while True:
                try:
                    conn = await self._subscribe()
                except BackplaneError as exc:
                    self._lose("cannot subscribe to %s (%s); retrying", exc)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_INTERVAL)
                    continue
                backoff = FIRST_BACKOFF_INTERVAL
                async with conn:
                    if self._is_lost:
                        self._is_lost = False
                        log.info(
                            "subscribed to %s at %s again",
                            self._name,
                            self._address,
                            extra=self._back_extra,
                        )
                    if is_started:
                        on_resubscribed()
                    else:
                        is_started = True
                        task_status.started()
                    await self._deliver_until_lost(conn, on_message)
                if self._pool is not None:
                    await self._pool.close_idle()
                await trio.sleep(backoff)
        finally:
            # Only a running subscription can be lost.
            self._is_lost = False

    def _lose(self, message: str, exc: BackplaneError) -> None:
        if not self._is_lost:
            log.warning(message, self._name, exc, extra=self._lost_extra)
        self._is_lost = True

    async def _subscribe(self) -> RedisConnection:
        conn: RedisConnection | None = None
        try:
            with trio.fail_after(self._op_timeout):
                conn = await RedisConnection.connect(self._address)
                await conn.subscribe(self._channel)
        except BaseException as exc:
            if conn is not None:
                await conn.aclose()
            if isinstance(exc, trio.TooSlowError):
                raise BackplaneUnavailable(
                    f"Redis at {self._address} did not confirm SUBSCRIBE "
                    f"within {self._op_timeout:g} s"
                ) from exc
            raise
        return conn

    async def _deliver_until_lost(
        self, conn: RedisConnection, on_message: Callable[[bytes], None]
    ) -> None:
        while True:
            try:
                data = await self._next_message_data(conn)
            except BackplaneError as exc:
                self._lose("lost the subscription to %s: %s", exc)
                return
            on_message(data)

    async def _next_message_data(self, conn: RedisConnection) -> bytes:
        """The data of the next message; probes a silent connection with PING."""
        is_ping_pending = False
        while True:
            wait = self._op_timeout if is_ping_pending else self._ping_interval
            with trio.move_on_after(wait):
                match await conn.next_push():
                    case [b"message", bytes(), bytes(data)]:
                        return data
                    case _:
                        is_ping_pending = False  # a pong (or any push) proves it alive
                continue
            if is_ping_pending:
                raise BackplaneUnavailable(
                    f"Redis at {self._address} did not answer PING within {self._op_timeout:g} s"
                )
            with trio.move_on_after(self._op_timeout) as sending:
                await conn.send_ping()
            if sending.cancelled_caught:
                raise BackplaneUnavailable(
                    f"could not send PING to Redis at {self._address} within {self._op_timeout:g} s"
                )
            is_ping_pending = True
