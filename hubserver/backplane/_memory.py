"""The in-process backplane: one process, one counter and one history per (hub, site).

``publish`` numbers, stores and hands the batch to every running ``run`` in
one synchronous step (no ``await`` between numbering and delivery), so the
order every subscriber sees is the order of the seqs, trivially.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice

import trio

from ._contract import History, NumberedEvent, PendingEvent

__all__ = ["MemoryBackplane"]

_Deliver = Callable[[Sequence[NumberedEvent]], None]


class MemoryBackplane:
    """The embedded default ``Backplane``: nothing leaves the process.

    Args:
        history_size: events kept per (hub, site) for ``history``; the oldest
            go first.
    """

    def __init__(self, history_size: int = 1000) -> None:
        if history_size < 1:
            raise ValueError(f"history_size must be positive, got {history_size}")
        self._history_size = history_size
        # A new process is a new numbering: nothing of a previous one survives.
        self._epoch = uuid.uuid4().hex
        self._last_seq: dict[tuple[str, str], int] = {}
        self._history: dict[tuple[str, str], deque[NumberedEvent]] = {}
        # One entry per running run(), keyed by an object only that run() holds.
        self._subscribers: dict[object, _Deliver] = {}

    @property
    def is_available(self) -> bool:
        """Always True: there is nothing to reach."""
        return True

    async def publish(self, events: Sequence[PendingEvent]) -> list[NumberedEvent]:
        """Number, store and deliver ``events`` (see ``Backplane.publish``)."""
        await trio.lowlevel.checkpoint()
        if not events:
            return []
        numbered: list[NumberedEvent] = []
        for event in events:
            site = (event.hub, event.site_id)
            seq = self._last_seq.get(site, 0) + 1
            self._last_seq[site] = seq
            item = NumberedEvent(
                hub=event.hub,
                site_id=event.site_id,
                user_id=event.user_id,
                event_id=event.event_id,
                seq=seq,
                text=f"{event.prefix}{seq}}}",
                epoch=self._epoch,
            )
            kept = self._history.get(site)
            if kept is None:
                kept = self._history[site] = deque(maxlen=self._history_size)
            kept.append(item)
            numbered.append(item)
        for deliver in list(self._subscribers.values()):
            deliver(numbered)
        return numbered

    async def history(self, hub: str, site_id: str, after_seq: int) -> History:
        """Kept events of (hub, site) with ``seq > after_seq`` (see ``Backplane.history``)."""
        await trio.lowlevel.checkpoint()
        site = (hub, site_id)
        kept = self._history.get(site)
        if not kept:
            return History(
                events=[], first_seq=None, last_seq=self._last_seq.get(site, 0), epoch=self._epoch
            )
        first_seq = kept[0].seq
        # Kept seqs are contiguous, so the slice starts at a computed index.
        skip = max(0, after_seq - first_seq + 1)
        events = list(islice(kept, skip, None))
        return History(events=events, first_seq=first_seq, last_seq=kept[-1].seq, epoch=self._epoch)

    async def run(
        self,
        deliver: Callable[[Sequence[NumberedEvent]], None],
        on_reconnect: Callable[[], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Deliver every published batch until cancelled (``on_reconnect`` is never called)."""
        token = object()
        self._subscribers[token] = deliver
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            del self._subscribers[token]

    async def ping(self) -> None:
        """Readiness check: always succeeds."""
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Nothing to release; here so both backplanes close the same way."""
        await trio.lowlevel.checkpoint()
