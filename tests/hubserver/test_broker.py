"""The broker's dispatcher: batching of concurrent publishes, and backpressure on publishers.

A real Router, MemoryBackplane and Broker; the subscriber records what the
router hands it (it is the interface a session implements, not a stand-in
for a socket).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from hubcore import PreparedMessage
from hubserver.backplane import MemoryBackplane
from hubserver.routing import Broker, Delivery, GroupKey, Hub, Router


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
