"""Scale-out (issue #5): several nodes sharing one real redis-server.

Each node is a whole hubserver on its own port, started in this test's
process with ``backplane=redis://...``; subscribers and publishers talk to the
nodes over real sockets with real tokens. A node can be shut down gracefully
or killed (its task cancelled: connections just end, no Close); the tests that
take Redis away run their own redis-server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import hiredis
import pytest
import trio

from hubcore import HubLimits
from hubserver.auth import DevKey
from hubserver.config import ServerConfig
from hubserver.permissions import InMemoryPermissionStore
from hubserver.server import serve

from .conftest import Harness
from .helpers import HttpResponse, http_request, publish
from .redis_fixture import (  # noqa: F401 (fixtures, found by pytest)
    RedisServer,
    own_redis_server_fixture,
    redis_server_fixture,
    start_redis_server,
)
from .test_resume import (
    Publisher,
    Subscriber,
    assert_exactly,
    new_site,
    record_of,
    subscribe,
)

CAP = 15.0  # seconds, per test


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    return shared_dev_key


# -- nodes ---------------------------------------------------------------------------


@dataclass
class Node:
    """One running server; ``kill`` cancels it outright (no drain, no Close)."""

    h: Harness
    scope: trio.CancelScope
    stopped: trio.Event

    async def kill(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


StartNode = Callable[..., Any]


@pytest.fixture
async def start_node(
    nursery: trio.Nursery, tmp_path: Path, dev_key: DevKey
) -> AsyncIterator[StartNode]:
    """``await start_node(**config_overrides) -> Node``; every node stops at test end."""
    nodes: list[Node] = []

    async def start(**overrides: Any) -> Node:
        config = replace(
            ServerConfig(port=0, data_dir=tmp_path / "data", permission_poll_interval=0.2),
            **overrides,
        )
        store = InMemoryPermissionStore()
        scope = trio.CancelScope()
        stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[Any]) -> None:
            try:
                with scope:
                    await serve(
                        config, store=store, verifier=dev_key.verifier(), task_status=task_status
                    )
            finally:
                stopped.set()

        server = await nursery.start(run)
        node = Node(Harness(server=server, key=dev_key, store=store, config=config), scope, stopped)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.h.server.request_shutdown()


class Stream:
    """Publishes single events to one site until stopped, alternating between nodes."""

    def __init__(self, nodes: list[Node], site: str) -> None:
        self.publishers = [Publisher(node.h) for node in nodes]
        self.site = site
        self.ids: list[str] = []
        self._stop = trio.Event()
        self._changed = trio.Event()
        self._finished = trio.Event()

    @property
    def published(self) -> int:
        return len(self.ids)

    async def run(self) -> None:
        n = 0
        try:
            while not self._stop.is_set():
                publisher = self.publishers[n % len(self.publishers)]
                self.ids += await publisher.some(self.site, 1, n=n)
                n += 1
                self._changed.set()
                self._changed = trio.Event()
        finally:
            self._finished.set()

    async def stop(self) -> int:
        """Stop after the publish in flight; returns how many were published."""
        self._stop.set()
        await self._finished.wait()
        return self.published

    async def reached(self, count: int) -> None:
        while self.published < count:
            await self._changed.wait()


async def readyz(node: Node) -> HttpResponse:
    return await http_request(node.h.port, "GET", "/readyz")


async def wait_ready(node: Node, *, ready: bool) -> HttpResponse:
    """Poll /readyz until it says ``ready`` (or not): the backplane's state changes by itself."""
    while True:
        response = await readyz(node)
        if (response.status == 200) is ready:
            return response
        await trio.sleep(0.05)


# -- fan-out and numbering -------------------------------------------------------------


async def test_events_published_on_one_node_reach_another_once_in_order(
    start_node: StartNode, redis_server: RedisServer
) -> None:
    a = await start_node(backplane=redis_server.url)
    b = await start_node(backplane=redis_server.url)
    site, pub = new_site(), Publisher(b.h)
    with trio.fail_after(CAP):
        async with (
            subscribe(a.h, site, since=0) as first,
            subscribe(a.h, site, since=0) as second,
            subscribe(a.h, site, user="u1", subject="u1", since=0) as user,
            subscribe(b.h, site, since=0) as local,
        ):
            ids: list[str] = []
            users: list[str] = []
            for size in (1, 5, 1, 13):
                batch = [{"site_id": site, "user_id": f"u{n % 3}"} for n in range(size)]
                ids += await pub.entries(batch)
                users += [f"u{n % 3}" for n in range(size)]
            for sub in (first, second, local):
                await sub.until_seq(20)
                assert [e["id"] for e in sub.events] == ids
            user_seqs = [seq for seq, user_id in enumerate(users, 1) if user_id == "u1"]
            await user.until_seq(user_seqs[-1])
            # A marker published on A: nothing (no second copy) came before it.
            marker = await Publisher(a.h).some(site, 1, user_id="u1")
            for sub in (first, second, local, user):
                assert await sub.take(1) == [("event", 21)]
                assert sub.events[-1]["id"] == marker[0]
    assert_exactly(first.seqs, 1, 21)
    assert user.seqs == [*user_seqs, 21]
    assert {e["user_id"] for e in user.events} == {"u1"}


async def test_two_nodes_publishing_at_once_share_one_seq_per_site(
    start_node: StartNode, redis_server: RedisServer
) -> None:
    a = await start_node(backplane=redis_server.url)
    b = await start_node(backplane=redis_server.url)
    site = new_site()
    accepted: list[str] = []

    async def publish_on(node: Node, count: int) -> None:
        pub = Publisher(node.h)
        for n in range(count):
            accepted.extend(await pub.some(site, 1 + n % 3, node=node.h.port))

    with trio.fail_after(CAP):
        async with subscribe(a.h, site, since=0) as on_a, subscribe(b.h, site, since=0) as on_b:
            async with trio.open_nursery() as nursery:
                for node in (a, b, a, b):  # two publishers per node, all concurrent
                    nursery.start_soon(publish_on, node, 30)
            total = len(accepted)
            assert total == 4 * (10 * (1 + 2 + 3))
            await on_a.until_seq(total)
            await on_b.until_seq(total)
    for sub in (on_a, on_b):
        assert_exactly(sub.seqs, 1, total)
        assert sorted(e["id"] for e in sub.events) == sorted(accepted)
    # Both nodes delivered the one order Redis decided.
    assert [e["id"] for e in on_a.events] == [e["id"] for e in on_b.events]


# -- fleets sharing one Redis -----------------------------------------------------------


async def test_fleets_on_two_databases_of_one_redis_never_get_each_others_events(
    start_node: StartNode, redis_server: RedisServer
) -> None:
    """Keys are per database, Pub/Sub channels are per server: the channel must say the db."""
    base = f"redis://127.0.0.1:{redis_server.port}"
    one = await start_node(backplane=f"{base}/1")
    two = await start_node(backplane=f"{base}/2")
    site = new_site()  # one site id, in both fleets
    with trio.fail_after(CAP):
        async with (
            subscribe(one.h, site, since=0) as bystander,
            subscribe(two.h, site, since=0) as other_fleet,
        ):
            ids = await Publisher(one.h).some(site, 3)
            await bystander.until_seq(3)
            assert [e["id"] for e in bystander.events] == ids
            # A marker of its own fleet: nothing of fleet one came before it.
            marker = await Publisher(two.h).some(site, 1)
            assert await other_fleet.take(1) == [("event", 1)]
            assert [e["id"] for e in other_fleet.events] == marker


# -- losing a node -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["since_seq", "Resume"])
@pytest.mark.parametrize("loss", ["killed", "shut down"])
async def test_clients_of_a_lost_node_resume_on_another_without_loss(
    start_node: StartNode, redis_server: RedisServer, loss: str, how: str
) -> None:
    a = await start_node(backplane=redis_server.url, drain_timeout=2.0)
    b = await start_node(backplane=redis_server.url)
    site = new_site()
    stream = Stream([b], site)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            async with subscribe(a.h, site, since=0) as on_a:
                nursery.start_soon(stream.run)
                await on_a.until_seq(30)
                if loss == "killed":
                    await a.kill()
                else:
                    a.h.server.request_shutdown()
                end = [r for r in await on_a.until_closed() if r[0] != "event"]
                await a.stopped.wait()
            if loss == "killed":
                assert end == [("closed",)]  # the connection just ended
            else:
                assert end == [("close", None, True), ("closed",)]  # come back, says A
            since = on_a.last_seq
            await stream.reached(stream.published + 5)  # events the client misses
            at_switch = stream.published
            async with subscribe(b.h, site, since=since if how == "since_seq" else None) as on_b:
                if how == "Resume":
                    await on_b.resume(since)
                await stream.reached(at_switch + 30)  # still publishing during the switch
                total = await stream.stop()
                await on_b.until_seq(total)
    seqs = on_a.seqs + on_b.seqs
    assert_exactly(seqs, 1, total)
    assert [e["id"] for e in on_a.events + on_b.events] == stream.ids
    assert since < at_switch, "the client had missed events to resume"


# -- losing Redis --------------------------------------------------------------------


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server with an append-only file: its data (the seqs) survive a restart."""
    server = start_redis_server(tmp_path, ("--appendonly", "yes", "--appendfsync", "always"))
    try:
        yield server
    finally:
        server.stop()


class OutagePublisher:
    """Publishes one event at a time with its own id, recording 202s and 503s."""

    def __init__(self, nodes: list[Node], site: str) -> None:
        self.nodes = nodes
        self.tokens = [node.h.publisher_token() for node in nodes]
        self.site = site
        self.accepted: list[str] = []
        self.refused: list[str] = []
        self.refusals: list[HttpResponse] = []
        self._stop = trio.Event()
        self._changed = trio.Event()
        self._finished = trio.Event()

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self._finished.set()

    async def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            index = n % len(self.nodes)
            event_id = f"{self.site}-{n}"
            n += 1
            response = await publish(
                self.nodes[index].h,
                "entries",
                {"site_id": self.site, "id": event_id},
                token=self.tokens[index],
            )
            if response.status == 202:
                self.accepted.append(event_id)
            else:
                self.refused.append(event_id)
                self.refusals.append(response)
                await trio.sleep(0.02)  # a retrying publisher backs off a little
            self._changed.set()
            self._changed = trio.Event()

    async def stop(self) -> None:
        self._stop.set()
        await self._finished.wait()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()


async def count_pings(sub: Subscriber, seconds: float, out: dict[str, int], name: str) -> None:
    """Count the hub Pings ``sub`` gets in ``seconds``; events are kept, a Close fails."""
    out[name] = 0
    with trio.move_on_after(seconds):
        while True:
            message = await sub.client.next_message(skip_pings=False)
            if message == {"type": 6}:
                out[name] += 1
                continue
            record, event = record_of(message)
            assert event is not None, f"the connection did not stay open: {record}"
            sub.records.append(record)
            sub.events.append(event)


async def _ride_out_a_redis_outage(
    start_node: StartNode, redis: RedisServer
) -> tuple[OutagePublisher, list[Subscriber]]:
    """Subscribers on two nodes, a publisher on both, Redis stopped and started under them.

    Checks what must hold during the outage, and returns once every accepted
    event reached every subscriber (or fails at the cap).
    """
    limits = HubLimits(keepalive_interval=0.3)
    a = await start_node(backplane=redis.url, hub_limits=limits)
    b = await start_node(backplane=redis.url, hub_limits=limits)
    site = new_site()
    publisher = OutagePublisher([a, b], site)
    async with (
        subscribe(a.h, site, since=0) as on_a,
        subscribe(b.h, site, since=0) as on_b,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(publisher.run)
        await publisher.until(lambda: len(publisher.accepted) >= 20)
        await on_a.until_seq(20)

        await trio.to_thread.run_sync(redis.stop)
        refused_before = len(publisher.refused)
        await publisher.until(lambda: len(publisher.refused) >= refused_before + 6)
        accepted_in_outage = len(publisher.accepted)  # one at a time: none is in flight
        for response in publisher.refusals:
            assert response.status == 503, response
            assert response.headers.get("retry-after") == "1", response
            assert response.json()["code"] == "unavailable", response
        for node in (a, b):
            response = await wait_ready(node, ready=False)
            assert (response.status, response.text) == (503, "not ready\n")
        # The hub connections stay open and keep getting pings.
        pings: dict[str, int] = {}
        async with trio.open_nursery() as watchers:
            for name, sub in (("A", on_a), ("B", on_b)):
                watchers.start_soon(count_pings, sub, 1.0, pings, name)
        assert pings["A"] >= 2 and pings["B"] >= 2, pings
        assert len(publisher.accepted) == accepted_in_outage  # nothing accepted meanwhile

        await trio.to_thread.run_sync(redis.start)
        for node in (a, b):
            response = await wait_ready(node, ready=True)
            assert (response.status, response.text) == (200, "ready\n")
        await publisher.until(lambda: len(publisher.accepted) >= accepted_in_outage + 20)
        await publisher.stop()
        # Every accepted event is on its way: wait for them, but not forever (the
        # callers' assertions then say what is missing).
        with trio.move_on_after(2.0):
            for sub in (on_a, on_b):
                await sub.until_ids(publisher.accepted)
    return publisher, [on_a, on_b]


def assert_every_accepted_event_once(publisher: OutagePublisher, sub: Subscriber) -> None:
    ids = [e["id"] for e in sub.events]
    accepted = set(publisher.accepted)
    missing = [i for i in publisher.accepted if i not in set(ids)]
    assert not missing, f"{len(missing)} of {len(accepted)} accepted events never came: {missing}"
    # Once each, in publish order.
    assert [i for i in ids if i in accepted] == publisher.accepted
    # Anything else is the one publish in flight when Redis stopped: Redis may have run
    # it and died before answering, so the node could only say 503 (see the report).
    others = set(ids) - accepted
    assert len(others) <= 1 and others <= set(publisher.refused), others


async def test_redis_outage_refuses_publishes_keeps_connections_and_recovers(
    start_node: StartNode, persistent_redis: RedisServer
) -> None:
    with trio.fail_after(CAP * 2):
        publisher, subscribers = await _ride_out_a_redis_outage(start_node, persistent_redis)
    assert publisher.refused
    for sub in subscribers:
        assert_every_accepted_event_once(publisher, sub)
        # Numbered on from before the outage (the seqs survived in the append-only file).
        assert_exactly(sub.seqs, 1, len(sub.seqs))


async def test_redis_restart_without_persistence_still_delivers_every_accepted_event(
    start_node: StartNode, own_redis_server: RedisServer
) -> None:
    """Redis comes back empty: seqs start again at 1, events must still get through."""
    with trio.fail_after(CAP * 2):
        publisher, subscribers = await _ride_out_a_redis_outage(start_node, own_redis_server)
    for sub in subscribers:
        assert_every_accepted_event_once(publisher, sub)
        # The clients were told their positions are void: a Gap from seq 1.
        assert ("gap", 1) in sub.records, sub.records[-30:]


# -- Redis answering LOADING (it restarts with a dataset to load) ------------------------


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


async def _loading_redis(stream: trio.SocketStream) -> None:
    """A Redis that is loading its dataset: SUBSCRIBE and PING work, the rest says LOADING."""
    reader = hiredis.Reader()
    is_subscribed = False
    async with stream:
        while data := await stream.receive_some(65536):
            reader.feed(data)
            while (command := reader.gets()) is not False:
                name = command[0].upper()
                if name == b"SUBSCRIBE":
                    is_subscribed = True
                    reply = b"*3\r\n" + _bulk(b"subscribe") + _bulk(command[1]) + b":1\r\n"
                elif name == b"PING":
                    reply = b"*2\r\n$4\r\npong\r\n$0\r\n\r\n" if is_subscribed else b"+PONG\r\n"
                else:
                    reply = b"-LOADING Redis is loading the dataset in memory\r\n"
                await stream.send_all(reply)


async def test_redis_still_loading_its_dataset_is_unavailable_not_a_crash(
    start_node: StartNode, nursery: trio.Nursery
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, _loading_redis, listeners)
    node = await start_node(backplane=f"redis://127.0.0.1:{port}/0")
    site = new_site()
    with trio.fail_after(CAP):
        response = await publish(node.h, "entries", {"site_id": site})
        assert response.status == 503, response
        assert response.headers.get("retry-after") == "1"
        assert response.json()["code"] == "unavailable"
        assert (await readyz(node)).status == 503
        async with subscribe(node.h, site) as sub:
            await sub.resume(0)
            assert await sub.take(1) == [
                ("done", "r1", "Resume failed: the event history is unavailable; try again.")
            ]
