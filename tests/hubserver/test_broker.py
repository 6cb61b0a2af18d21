"""The broker's dispatcher: batching of concurrent publishes, and backpressure on publishers.

A real Router, MemoryBackplane and Broker; the subscriber records what the
router hands it (it is the interface a session implements, not a stand-in
for a socket).
"""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from hubcore import PreparedMessage
from hubserver.backplane import MemoryBackplane
from hubserver.routing import Broker, Delivery, GroupKey, Hub, Router, to_pending


class Recorder:
    def __init__(self) -> None:
        self.deliveries: list[list[int]] = []

    def deliver(self, delivery: Delivery, now: float) -> None:
        self.deliveries.append([event.seq for event in delivery.events])

    def notify(self, message: PreparedMessage) -> None:
        pass

    def restart_numbering(self) -> None:
        pass

    @property
    def seqs(self) -> list[int]:
        return [seq for delivery in self.deliveries for seq in delivery]


async def _running_broker(nursery: trio.Nursery, window: int) -> tuple[Broker, Recorder]:
    router = Router()
    recorder = Recorder()
    router.add(GroupKey(Hub.ENTRIES, "s1"), recorder)
    broker = Broker(router, MemoryBackplane(), trio.current_time, publish_window=window)
    await nursery.start(broker.run)
    return broker, recorder


async def test_with_a_window_of_one_a_publish_returns_once_its_events_were_delivered(
    nursery: trio.Nursery,
) -> None:
    broker, recorder = await _running_broker(nursery, window=1)
    for n in range(1, 6):
        await broker.publish(Hub.ENTRIES, [{"site_id": "s1"}])
        assert recorder.seqs == list(range(1, n + 1))


async def test_below_the_window_a_publish_does_not_wait_for_delivery(
    nursery: trio.Nursery,
) -> None:
    broker, recorder = await _running_broker(nursery, window=1000)
    await broker.publish(Hub.ENTRIES, [{"site_id": "s1"}])
    assert recorder.seqs == []  # accepted; the dispatcher delivers it next
    await trio.testing.wait_all_tasks_blocked()
    assert recorder.seqs == [1]


async def test_publishes_of_one_scheduling_round_are_delivered_together(
    nursery: trio.Nursery,
) -> None:
    broker, recorder = await _running_broker(nursery, window=1)
    async with trio.open_nursery() as publishers:
        for _ in range(4):
            publishers.start_soon(broker.publish, Hub.ENTRIES, [{"site_id": "s1"}])
    assert recorder.seqs == [1, 2, 3, 4]
    # One delivery (one frame per subscriber) for the four concurrent publishes.
    assert recorder.deliveries == [[1, 2, 3, 4]]


def test_the_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="publish_window"):
        Broker(Router(), MemoryBackplane(), trio.current_time, publish_window=0)


class DroppingBackplane(MemoryBackplane):
    """The in-process backplane, with its broadcast to this node cut at will.

    What a node sees while its Pub/Sub connection (or the workers' event
    stream) is down: publishes are numbered and stored, nothing arrives.
    """

    def __init__(self) -> None:
        super().__init__()
        self.is_connected = True

    async def run(self, deliver, on_reconnect, *, task_status=trio.TASK_STATUS_IGNORED):  # type: ignore[no-untyped-def]
        def maybe(events):  # type: ignore[no-untyped-def]
            if self.is_connected:
                deliver(events)

        await super().run(maybe, on_reconnect, task_status=task_status)


async def test_a_site_with_no_live_event_yet_recovers_what_a_drop_missed(
    nursery: trio.Nursery,
) -> None:
    # Found in review: the broker knew a site's position only from a live
    # event, so a subscriber that had seen none lost what was published while
    # the connection was down (no event, no Gap).
    router = Router()
    recorder = Recorder()
    backplane = DroppingBackplane()
    broker = Broker(router, backplane, trio.current_time)
    await nursery.start(broker.run)
    router.add(GroupKey(Hub.ENTRIES, "s1"), recorder)
    broker.watch_site(Hub.ENTRIES, "s1")
    await trio.sleep(0.05)  # the position is learned
    backplane.is_connected = False
    for _ in range(3):
        await broker.publish(Hub.ENTRIES, [{"site_id": "s1"}])
    await trio.sleep(0.05)
    assert recorder.seqs == []
    backplane.is_connected = True
    broker.on_reconnect()  # what the backplane calls when it is back
    await trio.sleep(0.1)
    assert recorder.seqs == [1, 2, 3]
    await broker.publish(Hub.ENTRIES, [{"site_id": "s1"}])
    await trio.sleep(0.05)
    assert recorder.seqs == [1, 2, 3, 4]


def _server_ids(count: int) -> list[str]:
    return [str(to_pending(Hub.ENTRIES, {"site_id": "s"}, 0).event_id) for _ in range(count)]


def test_ids_given_by_the_server_are_distinct_across_processes() -> None:
    """Events published without an id get one that no other event, here or in a
    forked worker, will have: publishing is idempotent on id."""
    ours = _server_ids(10_000)
    assert len(set(ours)) == len(ours)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its ids and leave at once
        os.write(write, "\n".join(_server_ids(100)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        theirs = pipe.read().split("\n")
    os.waitpid(pid, 0)
    ours += _server_ids(100)
    assert len(theirs) == 100
    assert not set(theirs) & set(ours)
