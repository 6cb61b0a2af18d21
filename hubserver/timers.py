"""One task for every connection's timers: keep-alive, timeouts, token expiry.

A sleeping task per connection costs about 3 KB of Trio state (task, cancel
scope, parking lot, coroutine frames); at 10,000 idle connections that is most
of their memory. Here a single task sleeps until the earliest deadline of a
heap and calls ``on_timer(now)`` of whoever is due.

The heap is lazy. A connection's deadlines mostly move later (every message
sent postpones its keep-alive, every message received its timeout), and
moving an entry in a heap is expensive, so nothing is moved: an entry that
fires early just makes the connection compute its real next deadline and
schedule that. Only a deadline *earlier* than the one scheduled adds an entry;
the owner's ``timer_at`` tells which entry is current, so stale ones are
dropped when they come up. There are at most a few entries per connection.
"""

from __future__ import annotations

import heapq
import logging
import math
from typing import Protocol

import trio

__all__ = ["Timed", "TimerQueue"]

log = logging.getLogger("hubserver.timers")


class Timed(Protocol):
    """What the queue calls back; ``timer_at`` belongs to the queue."""

    #: The deadline of the owner's current entry (math.inf: none). Only the queue writes it.
    timer_at: float
    #: Unique and stable: orders equal deadlines, so owners are never compared.
    session_id: int

    def on_timer(self, now: float) -> None:
        """Do what is due; schedule the next deadline again if there is one. Never blocks."""
        ...


class TimerQueue:
    """Deadlines of many owners, served by one task (``run``)."""

    __slots__ = ("_heap", "_wake")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timed]] = []
        # The running task sleeps inside this scope until the earliest deadline;
        # an earlier one just moves the scope's deadline.
        self._wake: trio.CancelScope | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, owner: Timed, when: float) -> None:
        """Call ``owner.on_timer`` at ``when`` (or at its earlier deadline already set)."""
        if when >= owner.timer_at:
            return  # an entry fires at or before ``when``; it reschedules then
        owner.timer_at = when
        heapq.heappush(self._heap, (when, owner.session_id, owner))
        wake = self._wake
        if wake is not None and when < wake.deadline:
            wake.deadline = when

    def cancel(self, owner: Timed) -> None:
        """Forget the owner's deadlines (its entries are dropped as they come up)."""
        owner.timer_at = -math.inf

    async def run(self) -> None:
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                when, _, owner = heapq.heappop(heap)
                if owner.timer_at != when:
                    continue  # superseded by an earlier entry, or cancelled
                owner.timer_at = math.inf
                try:
                    owner.on_timer(now)
                except Exception:
                    # One connection's bug must not stop everyone's keep-alive.
                    log.exception("timer of session %d failed", owner.session_id)
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as wake:
                self._wake = wake
                await trio.sleep_forever()
            self._wake = None
