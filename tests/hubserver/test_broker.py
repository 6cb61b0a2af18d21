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
from hubserver.backplane import MemoryBackplane, NumberedEvent, PendingEvent
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


class GatedBackplane(MemoryBackplane):
    """The in-process backplane, whose publishes wait at a gate before they are numbered.

    What a node sees while its publish travels to the backplane and back (the
    parent of ``--workers``, or Redis): its events are on their way, not yet
    broadcast. ``publish_elsewhere`` is another node's publish: it passes.
    """

    publishes_in_one_round = False  # it holds publishes: the timed wait applies

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()

    async def publish(self, events):  # type: ignore[no-untyped-def]
        await self.gate.wait()
        return await super().publish(events)

    async def publish_elsewhere(self, event_id: str) -> list[NumberedEvent]:
        prefix = f'{{"site_id":"s1","id":"{event_id}","seq":'
        pending = PendingEvent(
            hub="entries", site_id="s1", user_id=None, event_id=event_id, prefix=prefix
        )
        return await super().publish([pending])


async def _gated_broker(
    nursery: trio.Nursery, **options: float
) -> tuple[Broker, GatedBackplane, Recorder]:
    router = Router()
    recorder = Recorder()
    router.add(GroupKey(Hub.ENTRIES, "s1"), recorder)
    backplane = GatedBackplane()
    broker = Broker(router, backplane, trio.current_time, **options)  # type: ignore[arg-type]
    await nursery.start(broker.run)
    return broker, backplane, recorder


async def test_a_round_waits_for_this_nodes_publishes_under_way(nursery: trio.Nursery) -> None:
    """Another node's event and ours, on its way back, go out in one delivery (one frame)."""
    broker, backplane, recorder = await _gated_broker(nursery)
    nursery.start_soon(broker.publish, Hub.ENTRIES, [{"site_id": "s1", "id": "ours"}])
    await trio.testing.wait_all_tasks_blocked()
    await backplane.publish_elsewhere("theirs")
    await trio.testing.wait_all_tasks_blocked()
    assert recorder.deliveries == []  # the round waits for our publish
    backplane.gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert recorder.deliveries == [[1, 2]]
    # Nothing under way: the next event goes out at once.
    await backplane.publish_elsewhere("later")
    await trio.testing.wait_all_tasks_blocked()
    assert recorder.deliveries == [[1, 2], [3]]


async def test_a_round_waits_no_longer_than_the_coalesce_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    broker, backplane, recorder = await _gated_broker(nursery, coalesce_timeout=0.002)
    nursery.start_soon(broker.publish, Hub.ENTRIES, [{"site_id": "s1", "id": "ours"}])
    await trio.testing.wait_all_tasks_blocked()
    started_at = trio.current_time()
    await backplane.publish_elsewhere("theirs")
    await trio.sleep(0.0015)
    assert recorder.deliveries == []
    await trio.sleep(0.001)
    assert recorder.deliveries == [[1]]  # our publish is still on its way: not waited for
    assert trio.current_time() - started_at < 0.003
    backplane.gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert recorder.deliveries == [[1], [2]]


class HoldingBackplane(GatedBackplane):
    """Holds only the publish of the event with id ``held``; the others pass."""

    async def publish(self, events):  # type: ignore[no-untyped-def]
        if events[0].event_id == "held":
            await self.gate.wait()
        return await MemoryBackplane.publish(self, events)


async def test_publishes_waiting_for_a_round_go_on_when_the_dispatcher_stops(
    nursery: trio.Nursery,
) -> None:
    """The server stops the dispatcher before it drains: a publish waiting for its next
    round (the window full) must not wait for a round that never comes, and what
    waited for the round is delivered."""
    router, recorder = Router(), Recorder()
    router.add(GroupKey(Hub.ENTRIES, "s1"), recorder)
    backplane = HoldingBackplane()
    broker = Broker(router, backplane, trio.current_time, publish_window=1, coalesce_timeout=60.0)
    dispatcher = trio.CancelScope()

    async def run_broker(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with dispatcher:
            await broker.run(task_status=task_status)

    await nursery.start(run_broker)
    # A publish on its way (held): the next round waits for it (up to 60 s).
    nursery.start_soon(broker.publish, Hub.ENTRIES, [{"site_id": "s1", "id": "held"}])
    await trio.testing.wait_all_tasks_blocked()
    returned = trio.Event()

    async def publish_into_the_full_window() -> None:
        await broker.publish(Hub.ENTRIES, [{"site_id": "s1", "id": "waits"}])
        returned.set()

    nursery.start_soon(publish_into_the_full_window)
    await trio.testing.wait_all_tasks_blocked()
    assert not returned.is_set() and recorder.deliveries == []
    dispatcher.cancel()
    with trio.fail_after(2):
        await returned.wait()
    assert recorder.seqs == [1]  # what waited for the round went out
    backplane.gate.set()


async def test_a_coalesce_timeout_of_zero_never_waits(nursery: trio.Nursery) -> None:
    broker, backplane, recorder = await _gated_broker(nursery, coalesce_timeout=0)
    nursery.start_soon(broker.publish, Hub.ENTRIES, [{"site_id": "s1", "id": "ours"}])
    await trio.testing.wait_all_tasks_blocked()
    await backplane.publish_elsewhere("theirs")
    await trio.testing.wait_all_tasks_blocked()
    assert recorder.deliveries == [[1]]
    backplane.gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert recorder.deliveries == [[1], [2]]


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


class CountingBackplane(DroppingBackplane):
    """Records how many history reads run at once (each takes a while)."""

    def __init__(self) -> None:
        super().__init__()
        self.running = 0
        self.most = 0

    async def history(self, hub: str, site_id: str, after_seq: int):  # type: ignore[no-untyped-def]
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await trio.sleep(0.001)
            return await super().history(hub, site_id, after_seq)
        finally:
            self.running -= 1


async def test_a_reconnect_recovers_every_site_with_bounded_history_reads(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # 2,000 sites recovering at once used to be 2,000 history reads at once.
    router = Router()
    recorders = {f"s{i}": Recorder() for i in range(2000)}
    backplane = CountingBackplane()
    broker = Broker(router, backplane, trio.current_time)
    await nursery.start(broker.run)
    for site, recorder in recorders.items():
        router.add(GroupKey(Hub.ENTRIES, site), recorder)
        await broker.publish(Hub.ENTRIES, [{"site_id": site}])
    await trio.sleep(1)
    backplane.is_connected = False
    for site in recorders:
        await broker.publish(Hub.ENTRIES, [{"site_id": site}])
    backplane.is_connected = True
    backplane.most = 0
    broker.on_reconnect()
    await trio.sleep(5)
    assert all(recorder.seqs == [1, 2] for recorder in recorders.values())
    assert 1 < backplane.most <= 32


async def test_delivery_lag_is_sampled_but_every_long_round_is_observed(
    nursery: trio.Nursery,
) -> None:
    now = [100.0]
    took = [0.0]

    class SlowRecorder(Recorder):
        def deliver(self, delivery: Delivery, at: float) -> None:
            super().deliver(delivery, at)
            now[0] += took[0]  # the round's writes take this long

    router = Router()
    router.add(GroupKey(Hub.ENTRIES, "s1"), SlowRecorder())
    broker = Broker(router, MemoryBackplane(), lambda: now[0], publish_window=1)
    observed: list[float] = []
    broker.lag_observer = observed.append
    await nursery.start(broker.run)
    took[0] = 0.001  # short rounds: one observation per 10 ms
    for _ in range(5):
        await broker.publish(Hub.ENTRIES, [{"site_id": "s1"}])
    assert len(observed) == 1
    took[0] = 0.05  # long rounds: every one
    for _ in range(3):
        await broker.publish(Hub.ENTRIES, [{"site_id": "s1"}])
    assert observed[1:] == [pytest.approx(0.05)] * 3
