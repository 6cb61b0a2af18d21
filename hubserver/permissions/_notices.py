"""Change notices between nodes over one Redis Pub/Sub channel.

A notice is a MessagePack array ``[version | false, pairs | false]``: the
store's version after the change (false for a notice that changed none) and
the ``[site_id, subject]`` pairs concerned (false: not named, re-check
everyone). The Redis store's scripts publish it in the same atomic step as
the change; ``announce`` (the ``POST /v1/permissions/changed`` endpoint) and
the URL store's relay publish it with ``publish``.

``NoticeChannel.run`` keeps a ``Subscription`` to the channel and hands every
notice to its callback. Losing the connection loses the notices sent
meanwhile, so each subscription after the first is announced as "re-check
everyone".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import msgpack
import trio

from hubserver.backplane import BackplaneError
from hubserver.backplane.redis_client import (
    ConnectionPool,
    RedisAddress,
    Subscription,
    parse_redis_url,
)

from ._store import PermissionChange, PermissionStoreUnavailable

__all__ = ["NoticeChannel", "channel_name", "decode_notice", "encode_notice"]

log = logging.getLogger("hubserver")


def channel_name(address: RedisAddress, key_prefix: str) -> str:
    """The channel of the notices of the stores under ``key_prefix`` at ``address``."""
    return address.channel(f"{key_prefix}:perm:changes")


def encode_notice(version: int | None, pairs: Iterable[tuple[str, str]] | None) -> bytes:
    """The bytes of one notice (see the module docstring)."""
    named = False if pairs is None else [[site, subject] for site, subject in pairs]
    data: bytes = msgpack.packb([False if version is None else version, named])
    return data


def decode_notice(data: bytes) -> PermissionChange:
    """The change a notice announces.

    Raises:
        ValueError: not a notice (the caller re-checks everyone).
    """
    try:
        message = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ValueError(f"not MessagePack: {exc}") from exc
    match message:
        case [int() | False as version, list() | False as named] if version is not True:
            pass
        case _:
            raise ValueError("expected [version | false, pairs | false]")
    if named is False:
        return PermissionChange(pairs=None, version=None if version is False else version)
    pairs = set()
    for item in named:
        match item:
            case [str(site_id), str(subject)]:
                pairs.add((site_id, subject))
            case _:
                raise ValueError("expected pairs of [site_id, subject] strings")
    return PermissionChange(pairs=frozenset(pairs), version=None if version is False else version)


class NoticeChannel:
    """Publish and receive change notices on one channel (see the module docstring).

    Args:
        address: the Redis server.
        channel: the Pub/Sub channel every node shares.
        pool: command connections, for ``publish``.
        op_timeout: the deadline of one command (and of a ``PING``'s answer).
        ping_interval: how long the subscription may stay silent before a ``PING``.
    """

    def __init__(
        self,
        address: RedisAddress,
        channel: str,
        *,
        pool: ConnectionPool,
        op_timeout: float,
        ping_interval: float,
    ) -> None:
        self._address = address
        self._channel = channel
        self._pool = pool
        self._op_timeout = op_timeout
        self._subscription = Subscription(
            address,
            channel,
            name="permission change notices",
            op_timeout=op_timeout,
            ping_interval=ping_interval,
            pool=pool,
            log_events=("permission_notices_lost", "permission_notices_back"),
        )

    @classmethod
    def for_url(
        cls, url: str, *, key_prefix: str, op_timeout: float = 2.0, ping_interval: float = 5.0
    ) -> NoticeChannel:
        """A channel with a pool of its own, to the Redis at ``url`` (close it with ``aclose``).

        Raises:
            BackplaneError: ``url`` is not a redis:// URL.
        """
        address = parse_redis_url(url)
        return cls(
            address,
            channel_name(address, key_prefix),
            pool=ConnectionPool(address, 2),
            op_timeout=op_timeout,
            ping_interval=ping_interval,
        )

    async def aclose(self) -> None:
        """Close the idle command connections."""
        await self._pool.close_idle()

    async def publish(self, data: bytes) -> None:
        """Send one notice to every subscribed node.

        Raises:
            PermissionStoreUnavailable: Redis could not be reached in time.
        """
        try:
            with trio.fail_after(self._op_timeout):
                async with self._pool.connection() as conn:
                    await conn.execute("PUBLISH", self._channel, data)
        except trio.TooSlowError as exc:
            raise PermissionStoreUnavailable(
                f"Redis at {self._address} did not take a change notice "
                f"within {self._op_timeout:g} s"
            ) from exc
        except BackplaneError as exc:
            raise PermissionStoreUnavailable(
                f"could not send a change notice through Redis at {self._address}: {exc}"
            ) from exc

    async def run(self, on_notice: Callable[[PermissionChange], None]) -> None:
        """Hand every notice to ``on_notice`` until cancelled; never raises for Redis."""
        await self._subscription.run(
            lambda data: on_notice(_decoded(data)),
            # What was sent while the subscription was lost is lost.
            lambda: on_notice(PermissionChange(pairs=None)),
        )


def _decoded(data: bytes) -> PermissionChange:
    try:
        return decode_notice(data)
    except ValueError as exc:
        # Someone else's message on our channel, or a bug: assume the worst.
        log.error(
            "a malformed permission change notice of %d bytes (re-checking every open "
            "connection): %s",
            len(data),
            exc,
            extra={"event": "permission_notice_malformed"},
        )
        return PermissionChange(pairs=None)
