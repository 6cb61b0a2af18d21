"""TimerQueue: one task serving many owners' deadlines, with a lazy heap (fake clock)."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable

import pytest
import trio
import trio.testing

from hubserver.timers import TimerQueue

_ids = itertools.count(1)


class Owner:
    """Records when it was called; may reschedule itself or fail."""

    def __init__(self, queue: TimerQueue, then: Callable[[Owner, float], None] | None = None):
        self.timer_at = math.inf
        self.session_id = next(_ids)
        self.calls: list[float] = []
        self._queue = queue
        self._then = then

    def on_timer(self, now: float) -> None:
        self.calls.append(now)
        if self._then is not None:
            self._then(self, now)


@pytest.fixture
async def queue(nursery: trio.Nursery) -> TimerQueue:
    timers = TimerQueue()
    nursery.start_soon(timers.run)
    await trio.testing.wait_all_tasks_blocked()
    return timers


async def test_owners_are_called_at_their_deadlines_in_order(
    queue: TimerQueue, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    late, early = Owner(queue), Owner(queue)
    queue.schedule(late, start + 20)
    queue.schedule(early, start + 5)  # earlier than what the task sleeps until
    await trio.sleep(30)
    assert early.calls == [start + 5]
    assert late.calls == [start + 20]
    assert len(queue) == 0


async def test_a_later_deadline_adds_nothing_and_the_owner_reschedules_when_called(
    queue: TimerQueue, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    wanted = [start + 10]

    def again(owner: Owner, now: float) -> None:
        # The owner knows its real deadline (here: the last it asked for).
        if now < wanted[-1]:
            queue.schedule(owner, wanted[-1])

    owner = Owner(queue, again)
    queue.schedule(owner, start + 3)
    for later in (start + 6, start + 10):
        wanted.append(later)
        queue.schedule(owner, later)
        assert len(queue) == 1  # a later deadline never pushes an entry
    await trio.sleep(20)
    assert owner.calls == [start + 3, start + 10]


async def test_an_earlier_deadline_supersedes_the_scheduled_one(
    queue: TimerQueue, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    owner = Owner(queue)
    queue.schedule(owner, start + 10)
    queue.schedule(owner, start + 2)
    await trio.sleep(20)
    # The entry at +10 is stale once the one at +2 ran: it is dropped, not called.
    assert owner.calls == [start + 2]
    assert len(queue) == 0


async def test_cancel_drops_entries_and_refuses_new_ones(
    queue: TimerQueue, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    owner, other = Owner(queue), Owner(queue)
    queue.schedule(owner, start + 1)
    queue.schedule(other, start + 2)
    queue.cancel(owner)
    queue.schedule(owner, start + 1.5)
    await trio.sleep(5)
    assert owner.calls == []
    assert other.calls == [start + 2]


async def test_one_owner_failing_does_not_stop_the_others(
    queue: TimerQueue, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    def fail(owner: Owner, now: float) -> None:
        raise RuntimeError("boom")

    start = trio.current_time()
    bad, good = Owner(queue, fail), Owner(queue)
    queue.schedule(bad, start + 1)
    queue.schedule(good, start + 1)
    with caplog.at_level(logging.ERROR, logger="hubserver.timers"):
        await trio.sleep(2)
    assert bad.calls == [start + 1] and good.calls == [start + 1]
    assert f"timer of session {bad.session_id} failed" in caplog.text
    queue.schedule(good, start + 3)
    await trio.sleep(2)
    assert good.calls == [start + 1, start + 3]
