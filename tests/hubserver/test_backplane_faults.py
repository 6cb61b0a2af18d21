"""Issue #9: publishers retry, the backplane fails or holds garbage; the node keeps serving.

Idempotent publishing over HTTP (the retry of an accepted id is answered, not
published again), Redis refusing writes (OOM, a replica), garbage on the
Pub/Sub channel and in a site's history, a recovery that keeps failing, and
idle sites. Whole servers on 127.0.0.1 with real redis-servers; each test has
a bystander subscriber that must keep receiving. The broker-level tests use
the real Router, Broker and backplanes, with a subscriber that records what
the router hands it (the interface a connection implements).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from hubcore import Invocation, PreparedMessage
from hubserver.auth import DevKey
from hubserver.backplane import MemoryBackplane, RedisBackplane, RedisConnection
from hubserver.routing import Broker, Delivery, GroupKey, Hub, Router

from .conftest import Harness
from .helpers import bystander, http_request, publish
from .redis_fixture import (  # noqa: F401 (fixtures, found by pytest)
    RedisServer,
    own_redis_server_fixture,
    redis_server_fixture,
)
from .test_resume import Publisher, events_of, new_site, subscribe

CAP = 10.0  # seconds, per test


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    return shared_dev_key


@pytest.fixture(params=["memory", "redis"])
def backplane(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Config overrides: the in-process backplane, or a Redis of this test's own."""
    if request.param == "memory":
        yield {}
    else:
        redis: RedisServer = request.getfixturevalue("own_redis_server")
        yield {"backplane": redis.url}


async def redis_command(url: str, *command: str | int | bytes) -> Any:
    backplane = RedisBackplane(url)
    async with await RedisConnection.connect(backplane.address) as raw:
        return await raw.execute(*command)


# -- idempotent publishing -----------------------------------------------------------


async def test_a_retried_publish_is_answered_with_the_original_and_delivered_once(
    start_server: Any, backplane: dict[str, Any]
) -> None:
    h: Harness = await start_server(**backplane)
    site = new_site()
    token = h.publisher_token()
    with trio.fail_after(CAP):
        async with bystander(h, new_site()) as b, subscribe(h, site) as sub:
            first = await publish(
                h,
                "entries",
                [{"site_id": site, "id": "e-1"}, {"site_id": site, "id": "e-2"}],
                token=token,
            )
            assert first.status == 202, first
            # The publisher did not get the answer and retries, with one more event.
            retry = await publish(
                h,
                "entries",
                [{"site_id": site, "id": "e-2"}, {"site_id": site, "id": "e-3"}],
                token=token,
            )
            assert retry.status == 202, retry
            assert retry.json()["ids"] == ["e-2", "e-3"]
            if "seqs" in retry.json():  # the HTTP API's report of the seqs (issue #9)
                assert retry.json()["seqs"] == [2, 3]
            # What the HTTP API reports from: the original seq, marked as a duplicate.
            [again] = await h.server.app.broker.publish(
                Hub.ENTRIES, [{"site_id": site, "id": "e-1"}]
            )
            assert (again.event_id, again.seq, again.is_duplicate) == ("e-1", 1, True)
            assert await sub.take(3) == events_of(1, 2, 3)
            assert [e["id"] for e in sub.events] == ["e-1", "e-2", "e-3"]
            # Nothing else came for the site: the next event is numbered 4.
            await Publisher(h).some(site, 1, id="e-4")
            assert await sub.take(1) == events_of(4)
            await b.check()


# -- Redis refusing writes -----------------------------------------------------------


async def readyz(h: Harness) -> int:
    return (await http_request(h.port, "GET", "/readyz")).status


@pytest.mark.parametrize("refusal", ["OOM", "READONLY"])
async def test_redis_refusing_writes_answers_503_and_the_node_keeps_serving(
    start_server: Any, own_redis_server: RedisServer, refusal: str
) -> None:
    url = own_redis_server.url
    h: Harness = await start_server(backplane=url)
    site = new_site()
    with trio.fail_after(CAP):
        async with bystander(h, new_site()) as b, subscribe(h, site) as sub:
            await b.check()
            if refusal == "OOM":
                await redis_command(url, "CONFIG", "SET", "maxmemory-policy", "noeviction")
                await redis_command(url, "CONFIG", "SET", "maxmemory", 1)
            else:
                await redis_command(url, "REPLICAOF", "127.0.0.1", 1)
            for n in range(3):
                response = await publish(h, "entries", {"site_id": site, "id": f"refused-{n}"})
                assert response.status == 503, response
                assert response.headers.get("retry-after"), response
                assert response.json()["code"] == "unavailable"
            assert await readyz(h) == 503  # refused publishes in a row: not ready
            if refusal == "OOM":
                await redis_command(url, "CONFIG", "SET", "maxmemory", 0)
            else:
                await redis_command(url, "REPLICAOF", "NO", "ONE")
            await Publisher(h).some(site, 1)
            assert await readyz(h) == 200
            # None of the refused publishes was numbered or delivered.
            assert await sub.take(1) == events_of(1)
            await b.check()


# -- garbage from the backplane ------------------------------------------------------


async def test_garbage_on_the_redis_channel_is_skipped(
    start_server: Any, own_redis_server: RedisServer
) -> None:
    url = own_redis_server.url
    h: Harness = await start_server(backplane=url)
    site = new_site()
    with trio.fail_after(CAP):
        async with bystander(h, new_site()) as b, subscribe(h, site) as sub:
            await b.check()
            epoch = await redis_command(url, "GET", "hubserver:epoch")
            assert isinstance(epoch, bytes)

            def batch(*events: list[Any]) -> bytes:
                data: bytes = msgpack.packb([epoch.decode(), list(events)])
                return data

            for garbage in (
                b"\xc1",
                batch(["no-such-hub", site, False, "x", 1, "{}"]),  # crashed every node
                batch(["entries", site, False, "x", 0, "{}"]),
                batch(["entries", site, False, "x", 2**60, "{}"]),
            ):
                await redis_command(url, "PUBLISH", "hubserver:events", garbage)
            await b.check()
            await Publisher(h).some(site, 1)
            assert await sub.take(1) == events_of(1)
    assert h.server.app.broker.skipped_events == 3


async def test_a_malformed_history_entry_costs_a_gap_not_the_stream(
    start_server: Any, own_redis_server: RedisServer
) -> None:
    url = own_redis_server.url
    h: Harness = await start_server(backplane=url)
    site = new_site()
    pub = Publisher(h)
    with trio.fail_after(CAP):
        async with bystander(h, new_site()) as b, subscribe(h, site) as sub:
            await pub.some(site, 3)
            assert await sub.take(3) == events_of(1, 2, 3)
            # Event 4's history entry is garbage, and this node missed 4's broadcast;
            # event 5 arrives: the node fetches 4 from history to deliver in order.
            hist = f"hubserver:hist:entries:{site}"
            text = json.dumps({"site_id": site, "id": "e-5", "seq": 5}, separators=(",", ":"))
            await redis_command(url, "XADD", hist, "4-1", "garbage", "1")
            await redis_command(url, "XADD", hist, "5-1", "id", "e-5", "text", text)
            await redis_command(url, "SET", f"hubserver:seq:entries:{site}", 5)
            epoch = await redis_command(url, "GET", "hubserver:epoch")
            message = msgpack.packb([epoch.decode(), [["entries", site, False, "e-5", 5, text]]])
            await redis_command(url, "PUBLISH", "hubserver:events", message)
            # It once held the site forever; now: a Gap where 4 is missing, then on.
            assert await sub.take(2) == [("gap", 5), ("event", 5)]
            await pub.some(site, 1)
            assert await sub.take(1) == events_of(6)
            # A client resuming across the hole is told too.
            async with subscribe(h, site, since=2) as late:
                assert await late.take(3) == [("gap", 5), *events_of(5, 6)]
            await b.check()


# -- the broker: recovery that keeps failing, idle sites -------------------------------


class Recorder:
    """What the router hands one subscriber: ("event", seq) and ("gap", first) records."""

    def __init__(self) -> None:
        self.records: list[tuple[str, int]] = []
        self._changed = trio.Event()

    def deliver(self, delivery: Delivery, now: float) -> None:
        self.records += [("event", event.seq) for event in delivery.events]
        self._changed.set()

    def notify(self, message: PreparedMessage) -> None:
        invocation = message.message
        assert isinstance(invocation, Invocation) and invocation.target == "Gap"
        (first,) = invocation.arguments
        assert isinstance(first, int)
        self.records.append(("gap", first))
        self._changed.set()

    def restart_numbering(self) -> None:
        self.records.append(("restart", 0))

    async def wait_for(self, record: tuple[str, int]) -> None:
        while record not in self.records:
            self._changed = trio.Event()
            await self._changed.wait()


async def test_a_recovery_that_keeps_failing_gives_up_with_a_gap(
    nursery: trio.Nursery, redis_server: RedisServer
) -> None:
    name = f"test-{uuid.uuid4().hex}"
    backplane = RedisBackplane(redis_server.url, key_prefix=name, channel=name, op_timeout=0.5)
    router, recorder, bystander_ = Router(), Recorder(), Recorder()
    router.add(GroupKey(Hub.ENTRIES, "s1"), recorder)
    router.add(GroupKey(Hub.ENTRIES, "s2"), bystander_)
    broker = Broker(router, backplane, trio.current_time, recovery_timeout=0.5, max_held_events=2)
    with trio.fail_after(CAP):
        await nursery.start(broker.run)
        await broker.publish(Hub.ENTRIES, [{"site_id": "s1"}, {"site_id": "s1"}])
        await recorder.wait_for(("event", 2))
        # History of s1 becomes unreadable (WRONGTYPE), and event 3 is never broadcast.
        await redis_command(redis_server.url, "DEL", f"{name}:hist:entries:s1")
        await redis_command(redis_server.url, "LPUSH", f"{name}:hist:entries:s1", "junk")
        await redis_command(redis_server.url, "SET", f"{name}:seq:entries:s1", 3)
        # The recovery (and its timeout) starts once event 4 comes back: after this.
        started = trio.current_time()
        await broker.publish(
            Hub.ENTRIES, [{"site_id": "s1"} for _ in range(4)]
        )  # 4..7: held, 6 and 7 dropped
        await broker.publish(Hub.ENTRIES, [{"site_id": "s2"}])
        await bystander_.wait_for(("event", 1))  # other sites are not held up
        await recorder.wait_for(("event", 5))
        assert 0.5 <= trio.current_time() - started < 2.0
        assert recorder.records == [
            *[("event", n) for n in (1, 2)],
            ("gap", 4),
            ("event", 4),
            ("event", 5),
        ]
        # What was dropped is fetched again on the next event (and that fails too).
        await broker.publish(Hub.ENTRIES, [{"site_id": "s1"}])
        await recorder.wait_for(("event", 8))
        assert recorder.records[-2:] == [("gap", 8), ("event", 8)]
        assert broker.site_count == 2
    await backplane.aclose()


async def test_idle_sites_are_forgotten(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    router, watched = Router(), Recorder()
    router.add(GroupKey(Hub.ENTRIES, "watched"), watched)
    backplane = MemoryBackplane()
    broker = Broker(router, backplane, trio.current_time, site_idle_timeout=60.0)
    await nursery.start(broker.run)
    # A publisher inventing sites nobody here watches.
    for n in range(100):
        await broker.publish(Hub.ENTRIES, [{"site_id": f"invented-{n}"}])
    await broker.publish(Hub.ENTRIES, [{"site_id": "watched"}])
    await broker.publish(Hub.INCIDENTS, [{"site_id": "busy"}])
    await trio.testing.wait_all_tasks_blocked()
    assert broker.site_count == 102
    for _ in range(5):  # "busy" keeps getting events
        await trio.sleep(30)
        await broker.publish(Hub.INCIDENTS, [{"site_id": "busy"}])
    await trio.testing.wait_all_tasks_blocked()
    # Watched (a local subscriber) and busy (events) stay; the invented ones are gone.
    assert broker.site_count == 2
    # A forgotten site that comes back is delivered as before.
    router.add(GroupKey(Hub.ENTRIES, "invented-7"), watched)
    await broker.publish(Hub.ENTRIES, [{"site_id": "invented-7"}])
    await watched.wait_for(("event", 2))
