"""The Redis client the backplane and the permission store share: what only it promises.

The RESP codec and one connection are tested in ``test_backplane_resp``; the
pool and scripts through their users. Here: channel names per database, and a
``Subscription`` riding out an outage of a real redis-server.
"""

from __future__ import annotations

import logging

import pytest
import trio

from hubserver.backplane.redis_client import (
    RedisConnection,
    Subscription,
    parse_redis_url,
)

from .redis_fixture import RedisServer, own_redis_server_fixture  # noqa: F401 (fixture)

CAP = 10.0  # seconds, per test


def test_a_channel_names_its_database_except_database_0() -> None:
    # Pub/Sub is server-wide: fleets on other databases of one Redis must not meet.
    assert parse_redis_url("redis://h/0").channel("hubserver:events") == "hubserver:events"
    assert parse_redis_url("redis://h").channel("hubserver:events") == "hubserver:events"
    assert parse_redis_url("redis://h:1/2").channel("p:perm:changes") == "p:perm:changes:db2"


class Received:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.resubscribed = 0
        self.changed = trio.Event()

    def on_message(self, data: bytes) -> None:
        self.messages.append(data)
        self.changed.set()

    def on_resubscribed(self) -> None:
        self.resubscribed += 1
        self.changed.set()

    async def until(self, messages: int, resubscribed: int = 0) -> None:
        while len(self.messages) < messages or self.resubscribed < resubscribed:
            self.changed = trio.Event()
            await self.changed.wait()


async def publish(server: RedisServer, channel: str, data: bytes) -> None:
    async with await RedisConnection.connect(parse_redis_url(server.url)) as conn:
        assert await conn.execute("PUBLISH", channel, data) == 1


async def test_an_outage_is_logged_once_and_the_subscription_comes_back(
    own_redis_server: RedisServer, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hubserver")
    subscription = Subscription(
        parse_redis_url(own_redis_server.url),
        "test-channel",
        name="test messages",
        op_timeout=0.5,
        ping_interval=0.5,
        log_events=("test_lost", "test_back"),
    )
    received = Received()
    with trio.fail_after(CAP):
        await nursery.start(subscription.run, received.on_message, received.on_resubscribed)
        await publish(own_redis_server, "test-channel", b"one")
        await received.until(messages=1)

        own_redis_server.stop()
        await trio.sleep(1.0)  # several attempts to subscribe again, backing off
        assert subscription.is_lost
        own_redis_server.start()
        await received.until(messages=1, resubscribed=1)
        assert not subscription.is_lost
        await publish(own_redis_server, "test-channel", b"two")
        await received.until(messages=2)
    assert received.messages == [b"one", b"two"]
    lines = [
        (r.levelname, getattr(r, "event", None), r.getMessage())
        for r in caplog.records
        if "test messages" in r.getMessage()
    ]
    # One warning for the whole outage, not one per attempt; one line when it is over.
    assert [line[:2] for line in lines] == [("WARNING", "test_lost"), ("INFO", "test_back")], lines
    assert lines[0][2].startswith("lost the subscription to test messages: "), lines
    address = f"127.0.0.1:{own_redis_server.port}/0"
    assert lines[1][2] == f"subscribed to test messages at {address} again", lines
