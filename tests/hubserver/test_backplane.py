"""The backplane contract, passed by MemoryBackplane and RedisBackplane alike.

The first half runs every test against both (``make_nodes`` gives "nodes":
for memory, the one in-process backplane several times; for Redis, separate
RedisBackplane objects sharing one real redis-server, each test under its own
key prefix and channel). The second half is what only Redis has: losing the
server and getting it back, scripts flushed, trimming, silent peers (a fake
TCP server at the I/O boundary), logins.

Every test has a ``fail_after`` cap, and waits on events, not on sleeps.
"""

from __future__ import annotations

import itertools
import json
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import msgpack
import pytest
import trio
import trio.testing

from hubserver.backplane import (
    Backplane,
    BackplaneError,
    BackplaneUnavailable,
    BrokerServer,
    MemoryBackplane,
    NumberedEvent,
    PendingEvent,
    PublishOutcomeUnknown,
    RedisBackplane,
    RedisConnection,
    UnixBackplane,
)
from hubserver.backplane._memory import held_bytes
from hubserver.backplane.redis_client import NeedData, ReplyParser

from .redis_fixture import (  # noqa: F401 (fixtures are found by pytest, not by name)
    RedisServer,
    own_redis_server_fixture,
    redis_server_fixture,
    start_redis_server,
)

CAP = 10.0  # seconds, per test

# -- helpers ---------------------------------------------------------------------------

_ids = itertools.count(1)


def make_event(
    hub: str = "entries",
    site_id: str = "site-a",
    user_id: str | None = "user-1",
    **fields: Any,
) -> tuple[PendingEvent, dict[str, Any]]:
    """A pending event and the JSON object its text must decode to (without ``seq``)."""
    event_id = f"evt-{next(_ids)}"
    body: dict[str, Any] = {"site_id": site_id, "id": event_id, **fields}
    if user_id is not None:
        body["user_id"] = user_id
    prefix = json.dumps(body, separators=(",", ":"), ensure_ascii=False)[:-1] + ',"seq":'
    pending = PendingEvent(
        hub=hub, site_id=site_id, user_id=user_id, event_id=event_id, prefix=prefix
    )
    return pending, body


def events(count: int, **kwargs: Any) -> list[PendingEvent]:
    return [make_event(**kwargs)[0] for _ in range(count)]


class Listener:
    """What one node's ``run`` delivered, with a way to wait for more."""

    def __init__(self) -> None:
        self.batches: list[list[NumberedEvent]] = []
        self.reconnects = 0
        self._changed = trio.Event()

    def deliver(self, batch: Sequence[NumberedEvent]) -> None:
        self.batches.append(list(batch))
        self._changed.set()

    def on_reconnect(self) -> None:
        self.reconnects += 1
        self._changed.set()

    @property
    def events(self) -> list[NumberedEvent]:
        return [event for batch in self.batches for event in batch]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self._changed = trio.Event()
            await self._changed.wait()

    async def wait_events(self, count: int) -> None:
        await self.wait_until(lambda: len(self.events) >= count)

    async def wait_batch(self, batch: list[NumberedEvent]) -> None:
        await self.wait_until(lambda: batch in self.batches)


async def start(nursery: trio.Nursery, node: Backplane, listener: Listener) -> None:
    await nursery.start(node.run, listener.deliver, listener.on_reconnect)


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Poll a flag that has no event of its own (``is_available``)."""
    while not predicate():  # noqa: ASYNC110 (nothing to wait on: the flag is all there is)
        await trio.sleep(0.01)


class MakeNodes(Protocol):
    def __call__(
        self, count: int = 1, *, history_size: int = 1000, dedupe_window: float = 600.0
    ) -> list[Backplane]: ...


@pytest.fixture(params=["memory", "unix", "redis"])
def backplane_url(request: pytest.FixtureRequest) -> str | None:
    """None for the in-process backplane, "unix" for the workers' broker, else a Redis URL."""
    if request.param in ("memory", "unix"):
        return None if request.param == "memory" else "unix"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
async def make_nodes(
    backplane_url: str | None, nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[MakeNodes]:
    """``make_nodes(count, history_size=...)``: nodes sharing one backplane."""
    made: list[RedisBackplane | UnixBackplane] = []

    def make(
        count: int = 1, *, history_size: int = 1000, dedupe_window: float = 600.0
    ) -> list[Backplane]:
        if backplane_url is None:
            return [MemoryBackplane(history_size=history_size, dedupe_window=dedupe_window)] * count
        if backplane_url == "unix":
            # Worker processes' view: one parent broker, one UnixBackplane each.
            path = tmp_path / f"broker-{uuid.uuid4().hex[:8]}.sock"
            broker = BrokerServer(
                MemoryBackplane(history_size=history_size, dedupe_window=dedupe_window), path
            )
            broker.listen()
            nursery.start_soon(broker.serve)
            workers = [UnixBackplane(path) for _ in range(count)]
            made.extend(workers)
            return list(workers)
        name = f"test-{uuid.uuid4().hex}"
        nodes = [
            RedisBackplane(
                backplane_url,
                history_size=history_size,
                key_prefix=name,
                channel=name,
                op_timeout=2.0,
                dedupe_window=dedupe_window,
            )
            for _ in range(count)
        ]
        made.extend(nodes)
        return list(nodes)

    yield make
    for node in made:
        await node.aclose()


def seqs(numbered: Sequence[NumberedEvent]) -> list[int]:
    return [event.seq for event in numbered]


# -- the contract (memory and Redis) ---------------------------------------------------


async def test_publish_numbers_from_1_per_hub_and_site(make_nodes: MakeNodes) -> None:
    with trio.fail_after(CAP):
        [node] = make_nodes()
        batch = [
            make_event("entries", "site-a")[0],
            make_event("incidents", "site-a")[0],
            make_event("entries", "site-b", user_id=None)[0],
            make_event("entries", "site-a")[0],
            make_event("incidents", "site-a", user_id="user-2")[0],
            make_event("entries", "site-a")[0],
        ]
        numbered = await node.publish(batch)
        assert seqs(numbered) == [1, 1, 1, 2, 2, 3]
        for event, pending in zip(numbered, batch, strict=True):
            assert (event.hub, event.site_id, event.user_id, event.event_id) == (
                pending.hub,
                pending.site_id,
                pending.user_id,
                pending.event_id,
            )
        again = await node.publish([make_event("entries", "site-a")[0]])
        assert seqs(again) == [4]
        assert seqs(await node.publish(events(2, hub="incidents"))) == [3, 4]
        assert seqs(await node.publish(events(1, site_id="site-b"))) == [2]


async def test_text_is_prefix_plus_seq_and_the_event_plus_seq(make_nodes: MakeNodes) -> None:
    with trio.fail_after(CAP):
        [node] = make_nodes()
        listener = Listener()
        made = [
            make_event(event_type="opening", result="granted"),
            make_event(user_id=None, note='unicode: é 漢字 😀, quote " backslash \\ nl \n'),
            make_event(site_id="site:with:colons", nested={"a": [1, 2.5, None, True]}),
            make_event(user_id="", empty_user="an empty user id is still a user id"),
        ]
        async with trio.open_nursery() as nursery:
            await start(nursery, node, listener)
            numbered = await node.publish([pending for pending, _ in made])
            await listener.wait_events(len(made))
            nursery.cancel_scope.cancel()
        assert listener.events == numbered
        for event, (pending, body) in zip(numbered, made, strict=True):
            assert event.text == f"{pending.prefix}{event.seq}}}"
            assert json.loads(event.text) == {**body, "seq": event.seq}
            assert event.user_id == pending.user_id


async def test_every_node_gets_every_batch_once_in_order(make_nodes: MakeNodes) -> None:
    with trio.fail_after(CAP):
        first, second = make_nodes(2)
        listeners = [Listener(), Listener()]
        published: list[list[NumberedEvent]] = []
        async with trio.open_nursery() as nursery:
            await start(nursery, first, listeners[0])
            await start(nursery, second, listeners[1])
            for size, node in zip([1, 3, 2, 5, 1], itertools.cycle([first, second]), strict=False):
                published.append(await node.publish(events(size, site_id="site-x")))
            # An empty publish delivers nothing; the marker after it shows nothing came.
            assert await first.publish([]) == []
            marker = await second.publish(events(1, site_id="marker"))
            for listener in listeners:
                await listener.wait_batch(marker)
            nursery.cancel_scope.cancel()
        for listener in listeners:
            assert listener.batches == [*published, marker]
            assert listener.reconnects == 0


async def test_history_after_seq(make_nodes: MakeNodes) -> None:
    with trio.fail_after(CAP):
        [node] = make_nodes()
        published = await node.publish(events(4, user_id=None) + events(6))
        await node.publish(events(3, hub="incidents"))
        await node.publish(events(2, site_id="site-b"))

        everything = await node.history("entries", "site-a", 0)
        assert list(everything.events) == published
        assert (everything.first_seq, everything.last_seq) == (1, 10)

        tail = await node.history("entries", "site-a", 7)
        assert list(tail.events) == published[7:]
        assert (tail.first_seq, tail.last_seq) == (1, 10)

        for after in (10, 15):
            none_left = await node.history("entries", "site-a", after)
            assert list(none_left.events) == []
            assert (none_left.first_seq, none_left.last_seq) == (1, 10)

        incidents = await node.history("incidents", "site-a", 1)
        assert seqs(incidents.events) == [2, 3]
        assert all(event.hub == "incidents" for event in incidents.events)

        unknown = await node.history("entries", "nowhere", 0)
        assert (list(unknown.events), unknown.first_seq, unknown.last_seq) == ([], None, 0)


async def test_history_keeps_the_newest_history_size(make_nodes: MakeNodes) -> None:
    with trio.fail_after(CAP):
        size = 10
        [node] = make_nodes(history_size=size)
        for batch_size in (7, 1, 1, 12, 9):  # 30 events, 3 x the size
            await node.publish(events(batch_size))
        history = await node.history("entries", "site-a", 0)
        assert len(history.events) <= size
        assert history.last_seq == 30
        assert history.first_seq is not None
        assert seqs(history.events) == list(range(history.first_seq, 31))  # contiguous
        # Both backplanes keep exactly the newest `size` (see _redis.py on MAXLEN ~).
        assert history.first_seq == 21

        assert seqs((await node.history("entries", "site-a", 25)).events) == [26, 27, 28, 29, 30]
        behind = await node.history("entries", "site-a", 3)
        assert behind.first_seq == 21  # > 3 + 1: the caller knows 4..20 are gone
        assert seqs(behind.events) == list(range(21, 31))


async def test_concurrent_publishes_from_two_nodes(make_nodes: MakeNodes) -> None:
    with trio.fail_after(CAP):
        first, second = make_nodes(2)
        listeners = [Listener(), Listener()]
        returned: dict[str, int] = {}

        async def publish_one(node: Backplane) -> None:
            [event] = await node.publish(events(1, site_id="busy"))
            returned[event.event_id] = event.seq

        async with trio.open_nursery() as nursery:
            await start(nursery, first, listeners[0])
            await start(nursery, second, listeners[1])
            async with trio.open_nursery() as publishers:
                for index in range(200):
                    publishers.start_soon(publish_one, (first, second)[index % 2])
            for listener in listeners:
                await listener.wait_events(200)
            nursery.cancel_scope.cancel()
        assert sorted(returned.values()) == list(range(1, 201))
        for listener in listeners:
            assert seqs(listener.events) == list(range(1, 201))
            assert {event.event_id: event.seq for event in listener.events} == returned


async def test_is_available_and_ping(make_nodes: MakeNodes) -> None:
    with trio.fail_after(CAP):
        [node] = make_nodes()
        assert node.is_available
        assert isinstance(node, MemoryBackplane | RedisBackplane | UnixBackplane)
        await node.ping()
        assert node.is_available


# -- the contract: idempotent publish (memory, unix and Redis) --------------------------


def retry_of(pending: PendingEvent, **fields: Any) -> PendingEvent:
    """The same event id again (a publisher's retry), possibly with other content."""
    body = {"site_id": pending.site_id, "id": pending.event_id, **fields}
    prefix = json.dumps(body, separators=(",", ":"))[:-1] + ',"seq":'
    return PendingEvent(
        hub=pending.hub,
        site_id=pending.site_id,
        user_id=pending.user_id,
        event_id=pending.event_id,
        prefix=prefix,
    )


async def test_an_accepted_id_is_not_published_again(make_nodes: MakeNodes) -> None:
    with trio.fail_after(CAP):
        first, second = make_nodes(2)
        listeners = [Listener(), Listener()]
        async with trio.open_nursery() as nursery:
            await start(nursery, first, listeners[0])
            await start(nursery, second, listeners[1])
            pending = make_event()[0]
            [original] = await first.publish([pending])
            assert (original.seq, original.is_duplicate) == (1, False)
            # A retry, on this node and on another, even with other content.
            for node in (first, second, first):
                [again] = await node.publish([retry_of(pending, changed=True)])
                assert (again.event_id, again.seq, again.is_duplicate) == (
                    pending.event_id,
                    1,
                    True,
                )
            # Mixed with new events: only the new ones are numbered and broadcast.
            fresh = events(2)
            mixed = await second.publish([fresh[0], retry_of(pending), fresh[1]])
            assert [(e.seq, e.is_duplicate) for e in mixed] == [(2, False), (1, True), (3, False)]
            marker = await first.publish(events(1, site_id="marker"))
            for listener in listeners:
                await listener.wait_batch(marker)
            nursery.cancel_scope.cancel()
        for listener in listeners:
            assert listener.batches == [[original], [mixed[0], mixed[2]], marker]
        history = await first.history("entries", "site-a", 0)
        assert seqs(history.events) == [1, 2, 3]


async def test_a_repeated_id_in_one_batch_is_published_once(make_nodes: MakeNodes) -> None:
    with trio.fail_after(CAP):
        [node] = make_nodes()
        listener = Listener()
        async with trio.open_nursery() as nursery:
            await start(nursery, node, listener)
            pending, other = make_event()[0], make_event()[0]
            numbered = await node.publish([pending, other, retry_of(pending)])
            assert [(e.seq, e.is_duplicate) for e in numbered] == [
                (1, False),
                (2, False),
                (1, True),
            ]
            await listener.wait_events(2)
            marker = await node.publish(events(1, site_id="marker"))
            await listener.wait_batch(marker)
            nursery.cancel_scope.cancel()
        assert listener.batches == [numbered[:2], marker]


async def test_an_id_is_scoped_to_its_hub_and_site(make_nodes: MakeNodes) -> None:
    with trio.fail_after(CAP):
        [node] = make_nodes()
        pending = make_event(site_id="site:a")[0]
        await node.publish([pending])
        others = [
            replace(pending, site_id="site:a:x"),  # a colon cannot make two sites one
            replace(pending, site_id="site"),
            replace(pending, hub="incidents"),
        ]
        numbered = await node.publish(others)
        assert [(e.seq, e.is_duplicate) for e in numbered] == [(1, False)] * 3
        # The same id with a colon in it is another id, too.
        colon = replace(pending, event_id=pending.event_id + ":1")
        [event] = await node.publish([colon])
        assert (event.seq, event.is_duplicate) == (2, False)


async def test_an_id_is_published_again_after_the_window(make_nodes: MakeNodes) -> None:
    window = 0.3
    with trio.fail_after(CAP):
        [node] = make_nodes(dedupe_window=window)
        pending = make_event()[0]
        [first] = await node.publish([pending])
        [retry] = await node.publish([pending])
        assert (first.seq, retry.seq, retry.is_duplicate) == (1, 1, True)
        await trio.sleep(window + 0.1)
        [late] = await node.publish([pending])
        assert (late.seq, late.is_duplicate) == (2, False)
        # The new acceptance starts a new window.
        [retry] = await node.publish([pending])
        assert (retry.seq, retry.is_duplicate) == (2, True)


async def test_a_window_of_zero_turns_deduplication_off(make_nodes: MakeNodes) -> None:
    with trio.fail_after(CAP):
        [node] = make_nodes(dedupe_window=0)
        pending = make_event()[0]
        numbered = await node.publish([pending, pending])
        numbered += await node.publish([pending])
        assert [(e.seq, e.is_duplicate) for e in numbered] == [(1, False), (2, False), (3, False)]


# -- memory only -----------------------------------------------------------------------


async def test_memory_dedupe_ids_are_capped_oldest_forgotten_first() -> None:
    node = MemoryBackplane(max_dedupe_ids=3)
    first, *rest = events(4)
    await node.publish([first, *rest])
    assert node.dedupe_count == 3
    # The oldest id was forgotten early: its retry is published again (documented).
    [again] = await node.publish([first])
    assert (again.seq, again.is_duplicate) == (5, False)
    # The newer ones are still remembered.
    assert all(e.is_duplicate for e in await node.publish(rest[1:]))


async def test_memory_dedupe_ids_expire(autojump_clock: trio.testing.MockClock) -> None:
    node = MemoryBackplane(dedupe_window=60.0)
    await node.publish(events(100))
    assert node.dedupe_count == 100
    await trio.sleep(61)
    await node.publish(events(1))
    assert node.dedupe_count == 1


async def test_memory_sites_are_capped_and_a_new_numbering_starts_after_the_forgotten() -> None:
    node = MemoryBackplane(max_sites=2)
    await node.publish(events(5, site_id="a"))
    await node.publish(events(3, site_id="b"))
    await node.history("entries", "a", 0)  # a read counts as use: "b" is now the oldest
    await node.publish(events(1, site_id="c"))
    assert node.site_count == 2
    assert seqs((await node.history("entries", "a", 0)).events) == [1, 2, 3, 4, 5]
    # "b" is forgotten: a client that saw up to 3 learns that nothing after 3 is kept...
    forgotten = await node.history("entries", "b", 2)
    assert (list(forgotten.events), forgotten.first_seq) == ([], None)
    assert forgotten.last_seq >= 3
    # ...and new events of "b" are numbered after anything it saw (never 1 again).
    [event] = await node.publish(events(1, site_id="b"))
    assert event.seq > 3


async def test_memory_histories_are_bounded_in_bytes_oldest_site_first() -> None:
    # Counts alone let a publisher hold max_sites x history_size x event size:
    # the byte bound trims the least recently used site's oldest events first.
    first = events(6, site_id="old", note="x" * 1000) + events(4, site_id="new", note="x" * 1000)
    # Room for these ten (ids differ in length by a digit at most, so a few
    # bytes of slack and no room for an eleventh ~1.4 kB event).
    budget = sum(held_bytes(e) for e in await MemoryBackplane().publish(first)) + 10
    node = MemoryBackplane(max_history_bytes=budget)
    await node.publish(first[:6])
    await node.publish(first[6:])
    assert node.history_bytes == budget - 10
    await node.publish(events(3, site_id="new", note="x" * 1000))
    assert node.history_bytes <= budget
    old = await node.history("entries", "old", 0)
    # The oldest three of "old" went: what is left is contiguous and says where
    # it starts, so a client that saw less than 3 is told of a gap.
    assert (seqs(old.events), old.first_seq, old.last_seq) == ([4, 5, 6], 4, 6)
    assert seqs((await node.history("entries", "new", 0)).events) == list(range(1, 8))
    # "old" was just read, so "new" is now the least recently used: it gives next.
    await node.publish(events(2, site_id="old", note="x" * 1000))
    assert seqs((await node.history("entries", "new", 0)).events) == list(range(3, 8))
    assert seqs((await node.history("entries", "old", 0)).events) == [4, 5, 6, 7, 8]


async def test_memory_history_bytes_follow_every_way_an_event_goes() -> None:
    node = MemoryBackplane(history_size=3, max_sites=2)
    await node.publish(events(5, site_id="a"))  # two pushed out by history_size
    kept_a = (await node.history("entries", "a", 0)).events
    assert node.history_bytes == sum(held_bytes(e) for e in kept_a)
    await node.publish(events(2, site_id="b"))
    await node.publish(events(1, site_id="c"))  # "a" forgotten whole by max_sites
    kept = [*(await node.history("entries", "b", 0)).events]
    kept += (await node.history("entries", "c", 0)).events
    assert node.history_bytes == sum(held_bytes(e) for e in kept)


async def test_memory_history_bytes_count_what_non_ascii_text_takes() -> None:
    # CPython keeps a str with one character past U+FFFF at 4 bytes per
    # character (event text is JSON with ensure_ascii=False): counting
    # characters let a publisher hold about 4x --max-history-bytes.
    budget = 256 << 10
    node = MemoryBackplane(max_history_bytes=budget)
    for _ in range(100):
        await node.publish(events(1, site_id="a", note="\U0001f6aa" + "x" * 4000))
    kept = (await node.history("entries", "a", 0)).events
    assert len(kept) > 1
    assert sum(sys.getsizeof(e.text) for e in kept) <= budget


async def test_memory_history_bytes_do_not_drift_when_a_kept_text_is_packed() -> None:
    # The --workers parent msgpacks kept events for its workers, which caches
    # each str's UTF-8 form and grows its sys.getsizeof: a drop must take back
    # what was counted when the event came, or the total drifts below the truth.
    packed, untouched = MemoryBackplane(history_size=2), MemoryBackplane(history_size=2)
    note = "\U0001f6aa" + "x" * 1000
    for _ in range(4):
        for node in (packed, untouched):
            await node.publish(events(1, site_id="a", note=note))
        for event in (await packed.history("entries", "a", 0)).events:
            msgpack.packb(event.text)
    assert packed.history_bytes == untouched.history_bytes > 0


async def test_memory_one_event_over_the_byte_bound_is_still_kept() -> None:
    node = MemoryBackplane(max_history_bytes=1)
    await node.publish(events(3, site_id="a"))
    # The newest event of the only site stays: its subscribers can still resume to it.
    assert seqs((await node.history("entries", "a", 0)).events) == [3]


async def test_memory_history_after_any_seq() -> None:
    node = MemoryBackplane()
    await node.publish(events(3))
    for after in (2**63, 2**64, 10**30):
        history = await node.history("entries", "site-a", after)
        assert (list(history.events), history.last_seq) == ([], 3)


# -- Redis only ------------------------------------------------------------------------


def redis_node(url: str, **kwargs: Any) -> RedisBackplane:
    name = f"test-{uuid.uuid4().hex}"
    return RedisBackplane(url, **{"key_prefix": name, "channel": name, **kwargs})


async def test_redis_down_then_back(own_redis_server: RedisServer) -> None:
    op_timeout = 0.5
    with trio.fail_after(CAP):
        node = redis_node(own_redis_server.url, op_timeout=op_timeout)
        listener = Listener()
        async with node, trio.open_nursery() as nursery:
            await start(nursery, node, listener)
            assert seqs(await node.publish(events(1))) == [1]
            await listener.wait_events(1)

            own_redis_server.stop()
            started_at = trio.current_time()
            with pytest.raises(BackplaneUnavailable):
                await node.publish(events(1))
            assert trio.current_time() - started_at < op_timeout + 0.5
            assert not node.is_available
            with pytest.raises(BackplaneUnavailable):
                await node.history("entries", "site-a", 0)

            own_redis_server.start()  # same port, empty (nothing was saved)
            await listener.wait_until(lambda: listener.reconnects == 1)
            assert node.is_available
            [event] = await node.publish(events(1))
            assert event.seq == 1
            await listener.wait_until(lambda: event in listener.events)
            nursery.cancel_scope.cancel()


async def test_redis_publish_gives_up_within_op_timeout_without_run(
    own_redis_server: RedisServer,
) -> None:
    with trio.fail_after(CAP):
        async with redis_node(own_redis_server.url, op_timeout=0.5) as node:
            await node.publish(events(1))
            own_redis_server.stop()
            with pytest.raises(BackplaneUnavailable, match="Redis"):
                await node.publish(events(1))
            assert not node.is_available
            own_redis_server.start()
            # Without run(), the next command is what finds Redis again.
            assert seqs(await node.publish(events(1))) == [1]
            assert node.is_available


async def test_redis_run_waits_for_redis_and_is_cancellable(
    own_redis_server: RedisServer,
) -> None:
    with trio.fail_after(CAP):
        own_redis_server.stop()
        node = redis_node(own_redis_server.url, op_timeout=0.5)
        listener = Listener()
        is_started = trio.Event()

        async def run_node(nursery: trio.Nursery) -> None:
            await start(nursery, node, listener)
            is_started.set()

        async with node, trio.open_nursery() as nursery:
            nursery.start_soon(run_node, nursery)
            await wait_for(lambda: not node.is_available)
            own_redis_server.start()
            await is_started.wait()
            assert node.is_available
            assert listener.reconnects == 0  # the first subscription is not a reconnect
            nursery.cancel_scope.cancel()

        # Cancelled while retrying: returns promptly.
        own_redis_server.stop()
        with trio.move_on_after(0.5) as scope:
            await node.run(listener.deliver, listener.on_reconnect)
        assert scope.cancelled_caught


async def test_redis_noscript_is_handled(redis_server: RedisServer) -> None:
    with trio.fail_after(CAP):
        async with redis_node(redis_server.url) as node:
            listener = Listener()
            async with trio.open_nursery() as nursery:
                await start(nursery, node, listener)
                await node.publish(events(2))
                await flush_scripts(node)
                assert seqs(await node.publish(events(1))) == [3]  # EVALSHA -> NOSCRIPT -> EVAL
                await flush_scripts(node)
                assert seqs((await node.history("entries", "site-a", 1)).events) == [2, 3]
                await listener.wait_events(3)
                assert seqs(listener.events) == [1, 2, 3]
                nursery.cancel_scope.cancel()


async def flush_scripts(node: RedisBackplane) -> None:
    async with await RedisConnection.connect(node.address) as raw:
        assert await raw.execute("SCRIPT", "FLUSH") == b"OK"


async def test_redis_stream_is_trimmed(redis_server: RedisServer) -> None:
    with trio.fail_after(CAP):
        name = f"test-{uuid.uuid4().hex}"
        async with RedisBackplane(redis_server.url, history_size=10, key_prefix=name) as node:
            for _ in range(25):
                await node.publish(events(10))
            async with await RedisConnection.connect(node.address) as raw:
                length = await raw.execute("XLEN", f"{name}:hist:entries:site-a")
            assert isinstance(length, int)
            # MAXLEN ~ trims whole nodes (100 entries by default), never below 10.
            assert 10 <= length <= 10 + 100
            history = await node.history("entries", "site-a", 0)
            assert seqs(history.events) == list(range(241, 251))


async def test_redis_malformed_message_is_skipped(redis_server: RedisServer) -> None:
    with trio.fail_after(CAP):
        channel = f"test-{uuid.uuid4().hex}"
        async with RedisBackplane(redis_server.url, channel=channel, key_prefix=channel) as node:
            listener = Listener()
            async with trio.open_nursery() as nursery:
                await start(nursery, node, listener)
                async with await RedisConnection.connect(node.address) as raw:
                    for garbage in (b"\xc1", b"\x93\x01\x02\x03", b"\x91\x96" + b"\xc0" * 6):
                        assert await raw.execute("PUBLISH", channel, garbage) == 1
                published = await node.publish(events(1))
                await listener.wait_events(1)
                assert listener.batches == [published]
                nursery.cancel_scope.cancel()


async def test_redis_run_twice_is_refused(redis_server: RedisServer) -> None:
    with trio.fail_after(CAP):
        async with redis_node(redis_server.url) as node, trio.open_nursery() as nursery:
            listener = Listener()
            await start(nursery, node, listener)
            with pytest.raises(BackplaneError, match="already running"):
                await node.run(listener.deliver, listener.on_reconnect)
            nursery.cancel_scope.cancel()


async def test_redis_password_and_database(tmp_path: Path) -> None:
    server = start_redis_server(tmp_path, ("--requirepass", "s3cret:/@"))
    try:
        with trio.fail_after(CAP):
            base = f"127.0.0.1:{server.port}"
            name = f"test-{uuid.uuid4().hex}"
            async with (
                RedisBackplane(f"redis://:s3cret%3A%2F%40@{base}/1", key_prefix=name) as db1,
                RedisBackplane(f"redis://default:s3cret%3A%2F%40@{base}/2", key_prefix=name) as db2,
            ):
                assert seqs(await db1.publish(events(2))) == [1, 2]
                assert seqs(await db2.publish(events(1))) == [1]  # another database
            async with RedisBackplane(f"redis://:wrong@{base}/0", op_timeout=0.5) as wrong:
                with pytest.raises(BackplaneUnavailable, match="WRONGPASS") as caught:
                    await wrong.publish(events(1))
                assert "wrong" not in str(caught.value)
                assert not wrong.is_available
    finally:
        server.stop()


# -- Redis only, with a fake server at the TCP boundary --------------------------------


class FakeRedis:
    """Answers SUBSCRIBE, never anything else: a Redis that went silent."""

    def __init__(self) -> None:
        self.connections = 0
        self.closed_by_client = 0
        self.pings = 0
        self.client_closed = trio.Event()

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        parser = ReplyParser()
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    self.closed_by_client += 1
                    self.client_closed.set()
                    return
                parser.receive_data(data)
                while (command := parser.next_reply()) is not NeedData.NEED_DATA:
                    assert isinstance(command, list)
                    name = command[0]
                    assert isinstance(name, bytes)
                    if name.upper() == b"SUBSCRIBE":
                        channel = command[1]
                        assert isinstance(channel, bytes)
                        await stream.send_all(
                            b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n"
                            % (len(channel), channel)
                        )
                    elif name.upper() == b"PING":
                        self.pings += 1


async def serve_fake(nursery: trio.Nursery, fake: FakeRedis) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, fake.handle, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def test_redis_silent_server_times_out_publish() -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            port = await serve_fake(nursery, FakeRedis())
            async with RedisBackplane(f"redis://127.0.0.1:{port}", op_timeout=0.3) as node:
                started_at = trio.current_time()
                # The script was sent and no answer came: it may have run.
                with pytest.raises(PublishOutcomeUnknown, match=r"within 0\.3 s"):
                    await node.publish(events(1))
                assert 0.3 <= trio.current_time() - started_at < 1.0
                assert not node.is_available
            nursery.cancel_scope.cancel()


async def test_redis_silent_subscription_is_noticed_by_ping() -> None:
    with trio.fail_after(CAP):
        fake = FakeRedis()
        listener = Listener()
        async with trio.open_nursery() as nursery:
            port = await serve_fake(nursery, fake)
            node = RedisBackplane(f"redis://127.0.0.1:{port}", op_timeout=0.2, ping_interval=0.2)
            await start(nursery, node, listener)
            await listener.wait_until(lambda: listener.reconnects == 1)
            assert fake.pings >= 1
            assert fake.connections == 2
            await fake.client_closed.wait()  # the silent connection was dropped
            assert node.is_available
            nursery.cancel_scope.cancel()


# -- Redis refusing or corrupt: nothing half done, the node keeps going ----------------


async def raw_redis(node: RedisBackplane, *command: str | int) -> object:
    async with await RedisConnection.connect(node.address) as raw:
        return await raw.execute(*command)


@pytest.mark.parametrize("refusal", ["OOM", "READONLY", "NOPERM"])
async def test_redis_refusing_writes_is_unavailable_with_nothing_done(
    own_redis_server: RedisServer, refusal: str
) -> None:
    admin = redis_node(own_redis_server.url)
    url = own_redis_server.url
    if refusal == "NOPERM":
        # A user that may do anything but run scripts (a mis-set ACL).
        await raw_redis(admin, "ACL", "SETUSER", "pub", "on", ">pw", "~*", "&*", "+@all")
        url = url.replace("redis://", "redis://pub:pw@")
    refuse: dict[str, list[tuple[str | int, ...]]] = {
        "OOM": [
            ("CONFIG", "SET", "maxmemory-policy", "noeviction"),
            ("CONFIG", "SET", "maxmemory", 1),
        ],
        "READONLY": [("REPLICAOF", "127.0.0.1", 1)],  # a master that is not there
        "NOPERM": [("ACL", "SETUSER", "pub", "-evalsha", "-eval")],
    }
    allow: dict[str, list[tuple[str | int, ...]]] = {
        "OOM": [("CONFIG", "SET", "maxmemory", 0)],
        "READONLY": [("REPLICAOF", "NO", "ONE")],
        "NOPERM": [("ACL", "SETUSER", "pub", "+evalsha", "+eval")],
    }
    with trio.fail_after(CAP):
        node = redis_node(url, op_timeout=0.5, ping_interval=0.1)
        listener = Listener()
        async with node, trio.open_nursery() as nursery:
            await start(nursery, node, listener)
            accepted = make_event()[0]
            assert seqs(await node.publish([accepted])) == [1]
            for command in refuse[refusal]:
                await raw_redis(admin, *command)
            for _ in range(3):
                with pytest.raises(BackplaneUnavailable, match=refusal):
                    await node.publish(events(2))
            assert not node.is_available  # /readyz says not ready
            if refusal != "NOPERM":
                # A retry of what was accepted writes nothing, so it is still answered.
                [retry] = await node.publish([accepted])
                assert (retry.seq, retry.is_duplicate) == (1, True)
            for command in allow[refusal]:
                await raw_redis(admin, *command)
            # The write probe notices, without any publish.
            await wait_for(lambda: node.is_available)
            # Nothing of the refused publishes was numbered, stored or broadcast.
            assert seqs(await node.publish(events(1))) == [2]
            await listener.wait_events(2)
            assert seqs((await node.history("entries", "site-a", 0)).events) == [1, 2]
            nursery.cancel_scope.cancel()
        assert seqs(listener.events) == [1, 2]


async def test_redis_error_after_the_scripts_first_write_is_outcome_unknown(
    own_redis_server: RedisServer,
) -> None:
    # An ACL that allows everything but PUBLISH: the script numbers and stores
    # the event, then fails. "Nothing was done" would be false (found in review).
    admin = redis_node(own_redis_server.url)
    await raw_redis(admin, "ACL", "SETUSER", "pub", "on", ">pw", "~*", "&*", "+@all", "-publish")
    url = own_redis_server.url.replace("redis://", "redis://pub:pw@")
    with trio.fail_after(CAP):
        node = redis_node(url, op_timeout=0.5, ping_interval=0.1)
        async with node, trio.open_nursery() as nursery:
            await start(nursery, node, Listener())
            event = make_event()[0]
            with pytest.raises(PublishOutcomeUnknown, match="may have been applied"):
                await node.publish([event])
            # It was numbered: the retry with the same id says so, with its seq.
            [retry] = await node.publish([event])
            assert (retry.seq, retry.is_duplicate) == (1, True)
            nursery.cancel_scope.cancel()


async def test_redis_corrupt_counter_refuses_and_corrupt_history_costs_only_history(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(CAP):
        node = redis_node(redis_server.url)
        prefix = node._key_prefix
        listener = Listener()
        async with node, trio.open_nursery() as nursery:
            await start(nursery, node, listener)
            await node.publish(events(2))
            await raw_redis(node, "SET", f"{prefix}:seq:entries:site-a", "garbage")
            with pytest.raises(BackplaneUnavailable, match="not a seq"):
                await node.publish(events(1))
            assert await raw_redis(node, "XLEN", f"{prefix}:hist:entries:site-a") == 2

            await raw_redis(node, "SET", f"{prefix}:seq:entries:site-a", 2)
            await raw_redis(node, "DEL", f"{prefix}:hist:entries:site-a")
            await raw_redis(node, "LPUSH", f"{prefix}:hist:entries:site-a", "junk")
            # Still numbered and broadcast; only history cannot keep it.
            assert seqs(await node.publish(events(1))) == [3]
            with pytest.raises(BackplaneError, match="WRONGTYPE"):
                await node.history("entries", "site-a", 0)
            await listener.wait_events(3)
            nursery.cancel_scope.cancel()
        assert seqs(listener.events) == [1, 2, 3]


async def test_redis_history_skips_entries_it_cannot_read(redis_server: RedisServer) -> None:
    with trio.fail_after(CAP):
        async with redis_node(redis_server.url) as node:
            prefix = node._key_prefix
            hist = f"{prefix}:hist:entries:site-a"
            await node.publish(events(2))
            await raw_redis(node, "XADD", hist, "3-1", "junk", "1")  # no id, no text
            await raw_redis(node, "XADD", hist, "4-0", "id", "x", "text", "{}")  # not <seq>-1
            await raw_redis(node, "SET", f"{prefix}:seq:entries:site-a", 4)
            await node.publish(events(1))
            history = await node.history("entries", "site-a", 0)
            assert seqs(history.events) == [1, 2, 5]
            assert history.last_seq == 5


# -- the workers' broker: lost replies, malformed frames --------------------------------


def unix_listener(path: Path) -> trio.SocketListener:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


@pytest.mark.parametrize("broker", ["silent", "closes"])
async def test_unix_publish_whose_reply_is_lost_has_an_unknown_outcome(
    tmp_path: Path, nursery: trio.Nursery, broker: str
) -> None:
    """A parent that read the request and never answered may have published it."""
    path = tmp_path / "broker.sock"
    node = UnixBackplane(path, op_timeout=0.3)
    with trio.fail_after(CAP):
        # Nothing listening: certain that nothing was accepted.
        with pytest.raises(BackplaneUnavailable):
            await node.publish(events(1))

        async def handle(stream: trio.SocketStream) -> None:
            async with stream:
                await stream.receive_some(65536)
                if broker == "silent":
                    await trio.sleep_forever()

        nursery.start_soon(trio.serve_listeners, handle, [unix_listener(path)])
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(PublishOutcomeUnknown):
            await node.publish(events(1))
        assert not node.is_available


async def test_unix_malformed_frames_are_refused_or_resubscribed_never_fatal(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    from hubserver.backplane._unix import _FrameReader, _pack

    path = tmp_path / "broker.sock"
    server = BrokerServer(MemoryBackplane(), path)
    server.listen()
    nursery.start_soon(server.serve)
    node = UnixBackplane(path)
    listener = Listener()
    with trio.fail_after(CAP):
        await start(nursery, node, listener)
        # A publish whose rows are not [hub, site, user, id, prefix] of strings.
        async with await trio.open_unix_socket(str(path)) as raw:
            await raw.send_all(_pack(["pub", 1, [[1, "s", None, "i", "{"]]]))
            await raw.send_all(_pack(["pub", 2, [["entries", "s"]]]))
            # A history request whose hub, site or sequence is not what it says:
            # refused, not read as the hub "None" or the sequence int("0").
            await raw.send_all(_pack(["hist", 3, None, "s", 0]))
            await raw.send_all(_pack(["hist", 4, "entries", 7, 0]))
            await raw.send_all(_pack(["hist", 5, "entries", "s", "0"]))
            await raw.send_all(_pack(["hist", 6, "entries", "s", 0]))
            reader = _FrameReader(raw)
            replies = [await reader.next() for _ in range(6)]
        assert [reply[:2] for reply in replies if reply] == [
            ["err", 1],
            ["err", 2],
            ["err", 3],
            ["err", 4],
            ["err", 5],
            ["ok", 6],
        ]
        published = await node.publish(events(1))
        await listener.wait_batch(published)
        assert listener.batches == [published]

    # A parent sending rows a worker cannot read: the worker resubscribes, and says so.
    fake_path = tmp_path / "fake.sock"
    connections = 0

    async def fake_parent(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with stream:
            await stream.receive_some(65536)  # ["sub"]
            await stream.send_all(_pack(["subscribed"]))
            if connections == 1:
                bad_row = ["entries", "s", None, "i", "not a seq", "{}", "epoch"]
                await stream.send_all(_pack(["ev", [bad_row]]) + b"\x00\x00\x00\x01\xc1")
            await trio.sleep_forever()

    nursery.start_soon(trio.serve_listeners, fake_parent, [unix_listener(fake_path)])
    fake_node, fake_listener = UnixBackplane(fake_path), Listener()
    with trio.fail_after(CAP):
        await start(nursery, fake_node, fake_listener)
        await fake_listener.wait_until(lambda: fake_listener.reconnects == 1)
        assert fake_listener.batches == []
    nursery.cancel_scope.cancel()


# -- the workers' broker: shared publish requests, pushes written at once ----------------


class GatedMemoryBackplane(MemoryBackplane):
    """The parent's in-process backplane, whose publishes wait at a gate.

    Holds a worker's ``pub`` request in the parent as long as the test likes
    (a busy parent), so what queues behind it in the worker can be seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.gate.set()
        self.arrived: list[list[str]] = []  # event ids, per request that reached the parent
        self.published: list[list[str]] = []  # and per request it served

    async def publish(self, events: Sequence[PendingEvent]) -> list[NumberedEvent]:
        self.arrived.append([event.event_id for event in events])
        await self.gate.wait()
        self.published.append([event.event_id for event in events])
        return await super().publish(events)


async def _parent(nursery: trio.Nursery, tmp_path: Path) -> tuple[GatedMemoryBackplane, Path]:
    backplane = GatedMemoryBackplane()
    path = tmp_path / f"broker-{uuid.uuid4().hex[:8]}.sock"
    server = BrokerServer(backplane, path)
    server.listen()
    nursery.start_soon(server.serve)
    return backplane, path


async def test_unix_publishes_of_one_round_share_one_request_and_one_push(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Three concurrent publishes of a worker: one request, one push; each its own answer."""
    parent, path = await _parent(nursery, tmp_path)
    publisher, other = UnixBackplane(path), UnixBackplane(path)
    listener = Listener()
    answers: dict[int, list[NumberedEvent]] = {}

    async def publish(index: int, batch: list[PendingEvent]) -> None:
        answers[index] = await publisher.publish(batch)

    with trio.fail_after(CAP):
        await start(nursery, other, listener)
        batches = [events(2), events(1, site_id="site-b"), events(3)]
        async with trio.open_nursery() as publishers:
            for index, batch in enumerate(batches):
                publishers.start_soon(publish, index, batch)
        await listener.wait_events(6)
        assert len(parent.published) == 1
        assert sorted(parent.published[0]) == sorted(e.event_id for b in batches for e in b)
        assert len(listener.batches) == 1
        for index, batch in enumerate(batches):
            assert [event.event_id for event in answers[index]] == [e.event_id for e in batch]
        assert seqs(answers[0]) + seqs(answers[2]) in ([1, 2, 3, 4, 5], [4, 5, 1, 2, 3])
        assert seqs(answers[1]) == [1]
        assert sorted(listener.events, key=lambda e: e.event_id) == sorted(
            [*answers[0], *answers[1], *answers[2]], key=lambda e: e.event_id
        )
        # A publish alone still goes out alone, at once.
        alone = await publisher.publish(events(1))
        await listener.wait_batch(alone)
        assert len(parent.published) == 2
    await publisher.aclose()
    await other.aclose()


async def test_unix_a_publish_cancelled_before_its_request_went_out_takes_nobody_with_it(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The publish that was to send a shared request is cancelled: the others publish anyway."""
    parent, path = await _parent(nursery, tmp_path)
    node = UnixBackplane(path, max_connections=1)
    first, cancelled, bystander = events(1), events(1), events(1)
    answers: dict[str, list[NumberedEvent]] = {}

    two_answered = trio.Event()

    async def publish(name: str, batch: list[PendingEvent], scope: trio.CancelScope) -> None:
        with scope:
            answers[name] = await node.publish(batch)
            if len(answers) == 2:
                two_answered.set()

    with trio.fail_after(CAP):
        parent.gate = trio.Event()  # the parent is busy with the first request
        nursery.start_soon(publish, "first", first, trio.CancelScope())
        await trio.testing.wait_all_tasks_blocked()
        # These two share the next request, which waits for the only connection.
        doomed = trio.CancelScope()
        nursery.start_soon(publish, "cancelled", cancelled, doomed)
        nursery.start_soon(publish, "bystander", bystander, trio.CancelScope())
        await trio.testing.wait_all_tasks_blocked()
        doomed.cancel()
        await trio.testing.wait_all_tasks_blocked()
        parent.gate.set()
        await two_answered.wait()
    assert "cancelled" not in answers
    assert seqs(answers["first"]) == [1]
    assert seqs(answers["bystander"]) == [2]
    assert parent.published == [[first[0].event_id], [bystander[0].event_id]]
    history = await node.history("entries", "site-a", 0)
    assert [event.event_id for event in history.events] == [
        first[0].event_id,
        bystander[0].event_id,
    ]
    await node.aclose()


async def test_unix_cancelling_the_publish_that_sent_a_shared_request_fails_nobody(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    parent, path = await _parent(nursery, tmp_path)
    node = UnixBackplane(path)
    batches = {"a": events(1), "b": events(2)}
    scopes = {name: trio.CancelScope() for name in batches}
    answers: dict[str, list[NumberedEvent]] = {}
    answered = trio.Event()

    async def publish(name: str) -> None:
        with scopes[name]:
            answers[name] = await node.publish(batches[name])
            answered.set()

    with trio.fail_after(CAP):
        parent.gate = trio.Event()
        for name in batches:
            nursery.start_soon(publish, name)
        await trio.testing.wait_all_tasks_blocked()
        # One request, held in the parent; the publish that joined first sent it.
        [arrived] = parent.arrived
        sender = "a" if arrived[0] == batches["a"][0].event_id else "b"
        joiner = "b" if sender == "a" else "a"
        assert sorted(arrived) == sorted(e.event_id for b in batches.values() for e in b)
        scopes[sender].cancel()
        await trio.testing.wait_all_tasks_blocked()
        parent.gate.set()
        await answered.wait()
        await trio.testing.wait_all_tasks_blocked()
    assert [event.event_id for event in answers[joiner]] == [e.event_id for e in batches[joiner]]
    assert parent.published == [arrived]
    assert node.is_available
    await node.aclose()


async def test_unix_pushes_a_worker_does_not_read_queue_whole_and_in_order(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Written at once while the socket takes them, then queued: never cut, never reordered."""
    from hubserver.backplane._unix import _FrameReader, _pack

    _, path = await _parent(nursery, tmp_path)
    node = UnixBackplane(path)
    with trio.fail_after(CAP):
        raw = await trio.open_unix_socket(str(path))
        raw.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await raw.send_all(_pack(["sub"]))
        reader = _FrameReader(raw)
        assert await reader.next() == ["subscribed"]
        published: list[NumberedEvent] = []
        for _ in range(40):  # ~200 KB: more than the socket buffers hold
            published += await node.publish(events(4, pad="x" * 1200))
        received: list[object] = []
        while len(received) < len(published):
            frame = await reader.next()
            assert frame is not None and frame[0] == "ev"
            assert isinstance(frame[1], list)
            received += frame[1]
        assert [row[4] for row in received] == seqs(published)  # type: ignore[index]
        await raw.aclose()
    await node.aclose()
