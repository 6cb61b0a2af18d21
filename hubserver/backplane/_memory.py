"""The in-process backplane: one process, one counter and one history per (hub, site).

``publish`` numbers, stores and hands the batch to every running ``run`` in
one synchronous step (no ``await`` between numbering and delivery), so the
order every subscriber sees is the order of the seqs, trivially.

Memory is bounded against publishers that invent ids and sites:

- Dedupe: the ids accepted within ``dedupe_window``, at most
  ``max_dedupe_ids`` of them. They expire in acceptance order; past the cap
  the oldest are forgotten early, so under a flood of distinct ids the window
  is shorter than configured (a retry of an id forgotten early is published
  again). A warning is logged when that starts.
- Sites: at most ``max_sites`` (hub, site) pairs keep a counter and a history
  (at most ``history_size`` events each); the least recently published (or
  read) one is forgotten first. This process holds the only copy, so a
  client resuming on a forgotten site gets a ``Gap``. Its numbering must not
  start over at 1, where a connected client would take new events for ones it
  already has: every site created after a site was forgotten starts after the
  highest seq any forgotten site reached (``History.last_seq`` of an unknown
  site says so). Seqs then stay increasing per site, only not from 1.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from itertools import islice
from typing import ClassVar

import trio

from ._contract import History, NumberedEvent, PendingEvent, number

__all__ = ["MemoryBackplane"]

log = logging.getLogger(__name__)

_Deliver = Callable[[Sequence[NumberedEvent]], None]
_SiteKey = tuple[str, str]  # (hub, site_id)
_IdKey = tuple[str, str, str]  # (hub, site_id, event id): the scope of an id


class _Site:
    __slots__ = ("history", "last_seq")

    def __init__(self, last_seq: int, history_size: int) -> None:
        self.last_seq = last_seq
        self.history: deque[NumberedEvent] = deque(maxlen=history_size)


class MemoryBackplane:
    """The embedded default ``Backplane``: nothing leaves the process.

    Args:
        history_size: events kept per (hub, site) for ``history``; the oldest
            go first.
        dedupe_window: seconds an accepted id keeps a retry from being
            published again (0 turns deduplication off).
        max_dedupe_ids: ids remembered at most (see the module docstring).
        max_sites: (hub, site) pairs with a counter and history kept at most.
        clock: monotonic seconds (``trio.current_time`` by default).
    """

    #: A publish is answered within one scheduling round (its checkpoint): the
    #: broker's dispatcher waits for publishes under way with a checkpoint.
    publishes_in_one_round: ClassVar[bool] = True

    def __init__(
        self,
        history_size: int = 1000,
        *,
        dedupe_window: float = 600.0,
        max_dedupe_ids: int = 100_000,
        max_sites: int = 10_000,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        for name, value in (
            ("history_size", history_size),
            ("max_dedupe_ids", max_dedupe_ids),
            ("max_sites", max_sites),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if not dedupe_window >= 0:
            raise ValueError(f"dedupe_window must not be negative, got {dedupe_window}")
        self._history_size = history_size
        self._dedupe_window = dedupe_window
        self._max_dedupe_ids = max_dedupe_ids
        self._max_sites = max_sites
        self._clock = clock
        # A new process is a new numbering: nothing of a previous one survives.
        self._epoch = uuid.uuid4().hex
        # Least recently used first.
        self._sites: OrderedDict[_SiteKey, _Site] = OrderedDict()
        # The highest seq a forgotten site reached: new sites number after it.
        self._floor = 0
        self._has_forgotten = False
        # Accepted ids, oldest first: (seq, accepted at).
        self._accepted: OrderedDict[_IdKey, tuple[int, float]] = OrderedDict()
        self._is_dedupe_full = False
        # One entry per running run(), keyed by an object only that run() holds.
        self._subscribers: dict[object, _Deliver] = {}

    @property
    def is_available(self) -> bool:
        """Always True: there is nothing to reach."""
        return True

    @property
    def site_count(self) -> int:
        """(hub, site) pairs with a counter and history in memory."""
        return len(self._sites)

    @property
    def dedupe_count(self) -> int:
        """Accepted ids remembered for deduplication."""
        return len(self._accepted)

    async def publish(self, events: Sequence[PendingEvent]) -> list[NumberedEvent]:
        """Number, store and deliver ``events`` (see ``Backplane.publish``)."""
        await trio.lowlevel.checkpoint()
        if not events:
            return []
        is_deduping = self._dedupe_window > 0
        if is_deduping:
            now = self._clock()
            self._expire(now)
        returned: list[NumberedEvent] = []
        numbered: list[NumberedEvent] = []
        for event in events:
            id_key = (event.hub, event.site_id, event.event_id)
            if is_deduping:
                prior = self._accepted.get(id_key)
                if prior is not None:
                    returned.append(number(event, prior[0], self._epoch, is_duplicate=True))
                    continue
            site = self._site(event.hub, event.site_id)
            seq = site.last_seq = site.last_seq + 1
            item = number(event, seq, self._epoch)
            site.history.append(item)
            numbered.append(item)
            returned.append(item)
            if is_deduping:
                self._remember(id_key, seq, now)
        if numbered:
            for deliver in list(self._subscribers.values()):
                deliver(numbered)
        return returned

    async def history(self, hub: str, site_id: str, after_seq: int) -> History:
        """Kept events of (hub, site) with ``seq > after_seq`` (see ``Backplane.history``)."""
        await trio.lowlevel.checkpoint()
        site_key = (hub, site_id)
        site = self._sites.get(site_key)
        if site is None:
            # Never seen, or forgotten: its seqs so far are at most the floor.
            return History(events=[], first_seq=None, last_seq=self._floor, epoch=self._epoch)
        self._sites.move_to_end(site_key)
        kept = site.history
        if not kept:
            return History(events=[], first_seq=None, last_seq=site.last_seq, epoch=self._epoch)
        first_seq, last_seq = kept[0].seq, kept[-1].seq
        if after_seq >= last_seq:
            # Also keeps islice's index small: after_seq may be any client's number.
            events: list[NumberedEvent] = []
        else:
            # Kept seqs are contiguous, so the slice starts at a computed index.
            events = list(islice(kept, max(0, after_seq - first_seq + 1), None))
        return History(events=events, first_seq=first_seq, last_seq=last_seq, epoch=self._epoch)

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

    # -- internals ---------------------------------------------------------------

    def _site(self, hub: str, site_id: str) -> _Site:
        key = (hub, site_id)
        site = self._sites.get(key)
        if site is not None:
            self._sites.move_to_end(key)
            return site
        if len(self._sites) >= self._max_sites:
            (forgotten_hub, forgotten_id), forgotten = self._sites.popitem(last=False)
            self._floor = max(self._floor, forgotten.last_seq)
            # One warning, then debug lines: a flood of new sites must not flood the log.
            log.log(
                logging.DEBUG if self._has_forgotten else logging.WARNING,
                "more than %d sites: forgot the history of the least recently used, "
                "%s/%.64s (last seq %d); new sites number from %d",
                self._max_sites,
                forgotten_hub,
                forgotten_id,
                forgotten.last_seq,
                self._floor + 1,
            )
            self._has_forgotten = True
        site = self._sites[key] = _Site(self._floor, self._history_size)
        return site

    def _expire(self, now: float) -> None:
        accepted = self._accepted
        oldest_kept = now - self._dedupe_window
        while accepted:
            # Acceptance order is time order, so the first entry is the oldest.
            _, accepted_at = accepted[next(iter(accepted))]
            if accepted_at > oldest_kept:
                break
            accepted.popitem(last=False)
        if self._is_dedupe_full and len(accepted) < self._max_dedupe_ids:
            self._is_dedupe_full = False

    def _remember(self, key: _IdKey, seq: int, now: float) -> None:
        self._accepted[key] = (seq, now)
        if len(self._accepted) > self._max_dedupe_ids:
            self._accepted.popitem(last=False)
            if not self._is_dedupe_full:
                self._is_dedupe_full = True
                log.warning(
                    "more than %d event ids accepted within the %.0f s dedupe window: "
                    "forgetting the oldest early (a retry of one of them would be "
                    "published again)",
                    self._max_dedupe_ids,
                    self._dedupe_window,
                )
