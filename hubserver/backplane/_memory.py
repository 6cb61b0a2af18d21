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
  read) one is forgotten first.
- History bytes: all histories together hold at most ``max_history_bytes``
  (each event counted as what its text and id strings take in memory, at
  1, 2 or 4 bytes a character, and a fixed overhead for the objects that
  hold them). Past it, the oldest events of the least
  recently used site with any history go first; the site keeps its counter,
  so a client resuming there gets a ``Gap`` for what went, never a wrong
  replay. Counts alone did not bound memory: 10,000 sites of 1,000 events of
  up to a megabyte each is far past any machine. This process holds the only copy, so a
  client resuming on a forgotten site gets a ``Gap``. Its numbering must not
  start over at 1, where a connected client would take new events for ones it
  already has: every site created after a site was forgotten starts after the
  highest seq any forgotten site reached (``History.last_seq`` of an unknown
  site says so). Seqs then stay increasing per site, only not from 1.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from itertools import islice
from typing import ClassVar, Final

import trio

from ._contract import History, NumberedEvent, PendingEvent, number

__all__ = ["MemoryBackplane"]

log = logging.getLogger(__name__)

_Deliver = Callable[[Sequence[NumberedEvent]], None]
_SiteKey = tuple[str, str]  # (hub, site_id)
_IdKey = tuple[str, str, str]  # (hub, site_id, event id): the scope of an id


#: Bytes an event costs beyond its strings' characters: the NumberedEvent, the
#: string objects' headers and its deque slot (tracemalloc: ~330 on CPython 3.12).
EVENT_OVERHEAD: Final = 400
#: What a str object takes beyond its characters (an empty one's size).
_STR_HEADER_BYTES: Final = sys.getsizeof("")


def _chars_bytes(text: str) -> int:
    """What ``text``'s characters take in memory: 1, 2 or 4 bytes each, as CPython
    stores the whole string at the width of its widest character (PEP 393)."""
    return sys.getsizeof(text) - _STR_HEADER_BYTES


def held_bytes(event: NumberedEvent) -> int:
    """What keeping ``event`` in a history costs, as ``max_history_bytes`` counts it."""
    user = event.user_id
    return (
        _chars_bytes(event.text)
        + _chars_bytes(event.event_id)
        + _chars_bytes(event.site_id)
        + (_chars_bytes(user) if user is not None else 0)
        + EVENT_OVERHEAD
    )


class _Site:
    __slots__ = ("bytes", "history", "last_seq", "sizes")

    def __init__(self, last_seq: int) -> None:
        self.last_seq = last_seq
        # Bounded by MemoryBackplane (history_size events, max_history_bytes overall).
        self.history: deque[NumberedEvent] = deque()
        # Each kept event's held_bytes, as counted when it came: what its drop
        # takes back (a str's size can grow later, with a cached UTF-8 form).
        self.sizes: deque[int] = deque()
        self.bytes = 0


class MemoryBackplane:
    """The embedded default ``Backplane``: nothing leaves the process.

    Args:
        history_size: events kept per (hub, site) for ``history``; the oldest
            go first.
        dedupe_window: seconds an accepted id keeps a retry from being
            published again (0 turns deduplication off).
        max_dedupe_ids: ids remembered at most (see the module docstring).
        max_sites: (hub, site) pairs with a counter and history kept at most.
        max_history_bytes: bytes all histories hold together, at most (see
            ``held_bytes``; the module docstring says what goes first).
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
        max_history_bytes: int = 1 << 30,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        for name, value in (
            ("history_size", history_size),
            ("max_dedupe_ids", max_dedupe_ids),
            ("max_sites", max_sites),
            ("max_history_bytes", max_history_bytes),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if not dedupe_window >= 0:
            raise ValueError(f"dedupe_window must not be negative, got {dedupe_window}")
        self._history_size = history_size
        self._dedupe_window = dedupe_window
        self._max_dedupe_ids = max_dedupe_ids
        self._max_sites = max_sites
        self._max_history_bytes = max_history_bytes
        self._clock = clock
        # A new process is a new numbering: nothing of a previous one survives.
        self._epoch = uuid.uuid4().hex
        # Least recently used first.
        self._sites: OrderedDict[_SiteKey, _Site] = OrderedDict()
        # The sites with any history, in the same order: trimming for bytes
        # starts at the first without walking past sites already emptied.
        self._holding: OrderedDict[_SiteKey, _Site] = OrderedDict()
        self._history_bytes = 0
        self._has_trimmed = False
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
    def history_bytes(self) -> int:
        """Bytes all histories hold, as ``max_history_bytes`` counts them."""
        return self._history_bytes

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
            self._keep(event.hub, event.site_id, site, item)
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
        if site_key in self._holding:
            self._holding.move_to_end(site_key)
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
            if self._holding.pop((forgotten_hub, forgotten_id), None) is not None:
                self._history_bytes -= forgotten.bytes
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
        site = self._sites[key] = _Site(self._floor)
        return site

    def _keep(self, hub: str, site_id: str, site: _Site, event: NumberedEvent) -> None:
        key = (hub, site_id)
        history = site.history
        if len(history) >= self._history_size:
            self._drop_oldest(site)
        size = held_bytes(event)
        history.append(event)
        site.sizes.append(size)
        site.bytes += size
        self._history_bytes += size
        holding = self._holding
        if key in holding:
            holding.move_to_end(key)
        else:
            holding[key] = site
        if self._history_bytes > self._max_history_bytes:
            self._trim()

    def _drop_oldest(self, site: _Site) -> None:
        site.history.popleft()
        size = site.sizes.popleft()
        site.bytes -= size
        self._history_bytes -= size

    def _trim(self) -> None:
        holding = self._holding
        # The event just kept is never dropped: a publish larger than the whole
        # budget still reaches the subscribers' history for its own site.
        while self._history_bytes > self._max_history_bytes:
            key, site = next(iter(holding.items()))
            if len(site.history) == 1 and len(holding) == 1:
                break
            self._drop_oldest(site)
            if not site.history:
                del holding[key]
        if not self._has_trimmed:
            self._has_trimmed = True
            log.warning(
                "histories hold more than %d bytes: dropping the oldest events of the "
                "least recently used sites (clients resuming there get a Gap)",
                self._max_history_bytes,
            )

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
