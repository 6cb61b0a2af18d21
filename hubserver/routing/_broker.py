"""The broker: the server's side of the backplane.

Publishing goes ``publish`` -> backplane (numbers, stores, broadcasts) and
comes back, on every node, through ``on_events`` -> router -> subscribers.

The broker keeps, per (hub, site), the last seq it delivered. An event that
skips ahead (the backplane connection dropped, a node missed a broadcast)
holds that site's delivery while the missing events are fetched from history,
so subscribers see every event once and in seq order. After a backplane
reconnect every known site is checked the same way.

Nothing the backplane sends can stall or crash a node:

- An event that cannot be delivered (an unknown hub, a seq out of range) is
  logged and skipped.
- Whenever what is released for a site skips seqs (history lost them, an
  entry could not be read, recovery gave up), the site's subscribers get a
  ``Gap`` naming the next seq they will see, before it.
- A recovery that keeps failing gives up after ``recovery_timeout`` and
  releases what it held, with a ``Gap``; at most ``max_held_events`` wait
  per site (later ones are dropped: the next event after the release finds
  them missing and fetches them from history again).
- A site with no local subscriber that saw no event for ``site_idle_timeout``
  (checked every ``site_idle_timeout``, so forgotten after one to two of
  them) is forgotten: its position is only needed to spot missed events for
  local subscribers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import trio

from hubserver.backplane import Backplane, BackplaneError, History, NumberedEvent

from ._groups import GroupKey, Hub, Router
from ._stream import (
    Delivery,
    StreamEvent,
    gap_message,
    malformation,
    to_pending,
    to_stream_event,
)

__all__ = ["Broker", "Replay", "deliver_to"]

log = logging.getLogger("hubserver.broker")

_Site = tuple[str, str]  # (hub value, site_id)
#: A seq no stream reaches: history after it is empty, but says where the stream stands.
_NO_SEQ_AFTER: Final = 2**53
#: Seconds a dispatch round waits at most for this node's publishes under way
#: (see ``Broker._dispatch_pending``). The parent's round trip of ``--workers``
#: took 0.5 to 1.9 ms (median) on a 2-core machine busy with the fan-out bench
#: and more: long waits are cut short, and no subscriber notices 2 ms.
COALESCE_TIMEOUT: Final = 0.002
#: Seconds between two delivery-lag observations (see ``_dispatch_pending``):
#: a histogram observation per round was ~1% of a publish's CPU.
LAG_SAMPLE_INTERVAL: Final = 0.01
#: History fetches of recoveries at once (a backplane has a few connections:
#: Redis 4). Enough to recover 10,000 sites in well under the recovery timeout
#: at a millisecond each.
MAX_HISTORY_FETCHES: Final = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class Replay:
    """History after a seq, ready to send: the events and where history starts."""

    events: list[StreamEvent]
    first_available: int
    last_seq: int


def deliver_to(router: Router, stream: Sequence[StreamEvent], now: float) -> int:
    """Group ``stream`` by site and site-user group, in order, and dispatch; returns deliveries."""
    if len(stream) == 1:
        event = stream[0]
        site_key = GroupKey(event.hub, event.site_id)
        user_key = (
            None if event.user_id is None else GroupKey(event.hub, event.site_id, event.user_id)
        )
        if not router.count(site_key) and (user_key is None or not router.count(user_key)):
            return 0
        delivery = Delivery(stream)
        count = router.dispatch(site_key, delivery, now)
        if user_key is not None:
            count += router.dispatch(user_key, delivery, now)
        return count
    groups: dict[GroupKey, list[StreamEvent]] = {}
    for event in stream:
        groups.setdefault(GroupKey(event.hub, event.site_id), []).append(event)
        if event.user_id is not None:
            groups.setdefault(GroupKey(event.hub, event.site_id, event.user_id), []).append(event)
    count = 0
    for key, events in groups.items():
        if router.count(key):
            count += router.dispatch(key, Delivery(events), now)
    return count


class _EventStatus:
    """A ``TaskStatus`` that only sets an event: lets ``run`` wait with a timeout."""

    def __init__(self, event: trio.Event) -> None:
        self._event = event

    def started(self, value: None = None) -> None:
        self._event.set()


class Broker:
    """Publishes through a backplane and delivers what it broadcasts, in order, once.

    Args:
        router: the local subscriber groups.
        backplane: numbering, history and cross-node fan-out.
        clock: the monotonic clock (``trio.current_time`` in the server).
        publish_window: events that may wait for the dispatcher before a
            publish waits for its next round (backpressure: publishers cannot
            outrun delivery, and what waits is bounded). 1 makes every publish
            return once what waited, its own events included, reached the
            local subscribers: the lowest latency, but fewer events share a
            frame, so less throughput in bursts.
        site_idle_timeout: seconds after which a site without local
            subscribers and without events is forgotten (0: never).
        recovery_timeout: how long a site's recovery retries an unavailable
            history before it gives up and releases what it held, with a Gap.
        max_held_events: live events held per site during its recovery.
        coalesce_timeout: the longest the dispatcher waits, before a round,
            for this node's publishes already under way (0: never waits).
    """

    def __init__(
        self,
        router: Router,
        backplane: Backplane,
        clock: Callable[[], float],
        *,
        publish_window: int = 1000,
        site_idle_timeout: float = 600.0,
        recovery_timeout: float = 10.0,
        max_held_events: int = 10_000,
        coalesce_timeout: float = COALESCE_TIMEOUT,
    ) -> None:
        if publish_window < 1:
            raise ValueError(f"publish_window must be positive, got {publish_window}")
        if max_held_events < 1:
            raise ValueError(f"max_held_events must be positive, got {max_held_events}")
        if not (site_idle_timeout >= 0 and recovery_timeout > 0):
            raise ValueError(
                f"site_idle_timeout must not be negative, got {site_idle_timeout}, and "
                f"recovery_timeout must be positive, got {recovery_timeout}"
            )
        self._window = publish_window
        self._site_idle_timeout = site_idle_timeout
        self._recovery_timeout = recovery_timeout
        self._max_held = max_held_events
        # Sites that saw an event since the last idle sweep.
        self._recent: set[_Site] = set()
        self.skipped_events = 0
        self._router = router
        self._backplane = backplane
        self._clock = clock
        self._last: dict[_Site, int] = {}
        # The backplane's numbering; when it changes, every seq starts over.
        self._epoch: str | None = None
        # Sites whose delivery waits for a history fetch: live events queue here.
        self._held: dict[_Site, list[NumberedEvent]] = {}
        # Where a subscribed site's history stood when it got its first local
        # subscriber, for sites with no delivered event yet (no ``_last``): after a
        # backplane drop, what was published meanwhile is fetched from there.
        self._known: dict[_Site, int] = {}
        # History fetches of recoveries and position lookups at once: after a
        # reconnect every known site recovers, and 10,000 sites must not become
        # 10,000 requests racing for the backplane's few connections (each
        # then timing out together) nor 10,000 warnings every retry.
        self._fetching = trio.CapacityLimiter(MAX_HISTORY_FETCHES)
        self._is_history_failing = False
        self._nursery: trio.Nursery | None = None
        # Events ready for delivery wait here for the dispatcher task, which runs
        # after the tasks that were ready with it: events published by several
        # requests in one scheduling round go out together, one write per
        # subscriber instead of one per event.
        self._pending: list[StreamEvent] = []
        self._dispatcher = trio.lowlevel.ParkingLot()
        # Rounds the dispatcher finished, and the event the next one sets: a
        # publish that finds the window full waits for the next round.
        self._rounds = 0
        self._round_done = trio.Event()
        self.deliveries = 0
        # For /metrics: gaps sent, backplane reconnects and failed publishes; and
        # per round, how long its oldest event waited (``lag_observer``).
        self.gaps_sent = 0
        self.reconnects = 0
        self.backplane_errors = 0
        self.lag_observer: Callable[[float], None] | None = None
        self._pending_since = 0.0
        self._next_lag_sample = 0.0
        # This node's publishes waiting for the backplane (by ticket), and those
        # of them the dispatcher waits for before its round (``_dispatch_pending``).
        self._tickets = 0
        self._publishing: set[int] = set()
        self._awaited: set[int] = set()
        self._awaited_done = trio.Event()
        self._coalesce_timeout = coalesce_timeout
        # A backplane that answers a publish within one scheduling round (the
        # in-process one) needs no timed wait for the publishes under way.
        self._is_local = getattr(backplane, "publishes_in_one_round", False) is True

    @property
    def backplane(self) -> Backplane:
        return self._backplane

    @property
    def site_count(self) -> int:
        """Sites whose last seq this node keeps (see ``site_idle_timeout``)."""
        return len(self._last)

    async def run(
        self,
        *,
        subscribe_timeout: float = 5.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Receive the backplane's events until cancelled.

        Reports started once subscribed, or after ``subscribe_timeout`` if the
        backplane cannot be reached yet: the server then starts not ready and the
        backplane keeps reconnecting by itself.
        """
        subscribed = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._dispatch_pending)
            nursery.start_soon(self._run_backplane, _EventStatus(subscribed))
            if self._site_idle_timeout > 0:
                nursery.start_soon(self._forget_idle_sites)
            with trio.move_on_after(subscribe_timeout):
                await subscribed.wait()
            if not subscribed.is_set():
                log.warning("backplane not reachable yet; starting not ready")
            task_status.started()

    async def _run_backplane(self, status: _EventStatus) -> None:
        await self._backplane.run(self.on_events, self.on_reconnect, task_status=status)

    async def publish(self, hub: Hub, events: list[dict[str, object]]) -> list[NumberedEvent]:
        """Number and broadcast validated events, in order, all or nothing.

        Returns one ``NumberedEvent`` per event, in order, with its ``event_id``
        and ``seq``; an id accepted within the dedupe window comes back with
        its original seq and ``is_duplicate`` set, and is not delivered again.

        Raises:
            PublishError: an event cannot be encoded (nothing was published).
            BackplaneUnavailable: nothing was accepted; the publisher should retry.
            PublishOutcomeUnknown: it may have been accepted; the publisher
                should retry with the same ids (a duplicate is answered, not
                published). Any other ``BackplaneError`` means the same.
        """
        pending = [to_pending(hub, event, index) for index, event in enumerate(events)]
        self._tickets += 1
        ticket = self._tickets
        self._publishing.add(ticket)
        try:
            published = await self._backplane.publish(pending)
        except BackplaneError:
            self.backplane_errors += 1
            raise
        finally:
            self._publishing.discard(ticket)
            if ticket in self._awaited:
                self._awaited.discard(ticket)
                if not self._awaited:
                    self._awaited_done.set()
        if len(self._pending) >= self._window and self._nursery is not None:
            # Backpressure: answer once the local subscribers were handed what
            # waited for delivery (this publish's events too, when the backplane
            # brought them back already, as the in-process one does).
            target = self._rounds + 1
            while self._rounds < target and self._nursery is not None:
                await self._round_done.wait()
        return published

    async def replay(self, hub: Hub, site_id: str, after_seq: int) -> Replay:
        """History of (hub, site) after ``after_seq``, prepared for sending.

        If what history returns skips seqs (an entry could not be read), only
        the part after the last hole is replayed, starting at
        ``first_available``: the client gets a Gap where events may be missing.
        """
        history = await self._backplane.history(hub.value, site_id, after_seq)
        first = history.first_seq if history.first_seq is not None else history.last_seq + 1
        events = [event for event in history.events if self._is_deliverable(event)]
        expected = max(after_seq + 1, first)
        start = 0
        for index, event in enumerate(events):
            if event.seq != expected:
                start = index
            expected = event.seq + 1
        if events and start == 0 and events[0].seq > max(after_seq + 1, first):
            first = events[0].seq
        elif start:
            first = events[start].seq
        events = events[start:]
        if history.last_seq >= max(after_seq + 1, first) and (
            not events or events[-1].seq < history.last_seq
        ):
            # The newest ones are missing: what comes next is after them.
            events, first = [], history.last_seq + 1
        return Replay(
            events=[to_stream_event(event) for event in events],
            first_available=first,
            last_seq=history.last_seq,
        )

    # -- the backplane's callbacks (sync) ---------------------------------------

    def on_events(self, events: Sequence[NumberedEvent]) -> None:
        if events and (events[0].epoch or None) != self._epoch:
            self._new_epoch(events[0].epoch or None)
        ready: list[NumberedEvent] = []
        is_tracking = self._site_idle_timeout > 0
        for event in events:
            if not self._is_deliverable(event):
                continue
            site = (event.hub, event.site_id)
            if is_tracking:
                self._recent.add(site)
            held = self._held.get(site)
            if held is not None:
                if len(held) < self._max_held:
                    held.append(event)
                continue
            last = self._last.get(site)
            if last is not None:
                if event.seq <= last:
                    continue  # already delivered (seen again after a recovery)
                if event.seq > last + 1:
                    self._held[site] = [event]
                    self._recover(site, last)
                    continue
            self._last[site] = event.seq
            ready.append(event)
        if ready:
            self._deliver(ready)

    def on_reconnect(self) -> None:
        self.reconnects += 1
        for site, last in list(self._last.items()):
            if site not in self._held:
                self._held[site] = []
                self._recover(site, last)
        for site in self._router.sites():
            known = self._known.get(site)
            is_unplaced = site not in self._last and site not in self._held
            if known is not None and known >= 0 and is_unplaced:
                self._held[site] = []
                self._recover(site, known)

    def watch_site(self, hub: Hub, site_id: str) -> None:
        """A local subscriber joined (hub, site): learn where its history stands.

        Without it, a site that has had no live event on this node since its
        subscribers joined has no position, and events published while the
        backplane connection was down would never be fetched for them.
        """
        site = (hub.value, site_id)
        if site not in self._last and site not in self._known and self._nursery is not None:
            self._known[site] = -1  # being learned
            self._nursery.start_soon(self._learn_position, site)

    async def _learn_position(self, site: _Site) -> None:
        try:
            with trio.fail_after(self._recovery_timeout):
                async with self._fetching:
                    history = await self._backplane.history(site[0], site[1], _NO_SEQ_AFTER)
        except (BackplaneError, trio.TooSlowError) as exc:
            log.info("%s/%.64s: position not learned (%s)", site[0], site[1], exc)
            self._known.pop(site, None)
            return
        if (history.epoch or None) == self._epoch or self._epoch is None:
            self._known[site] = history.last_seq
        else:
            self._known.pop(site, None)

    # -- internals ---------------------------------------------------------------

    def _is_deliverable(self, event: NumberedEvent) -> bool:
        reason = malformation(event)
        if reason is None:
            return True
        self.skipped_events += 1
        log.error(
            "skipped a malformed event from the backplane (%s/%.64s seq %.32r): %s",
            str(event.hub)[:32],
            event.site_id,
            event.seq,
            reason,
        )
        return False

    def _flush(self) -> None:
        """Deliver what waits for the dispatcher now: a Gap must not overtake it."""
        if self._pending:
            stream, self._pending = self._pending, []
            self.deliveries += deliver_to(self._router, stream, self._clock())

    def _deliver(self, events: Sequence[NumberedEvent]) -> None:
        stream = [to_stream_event(event) for event in events]
        if self._nursery is None:
            self.deliveries += deliver_to(self._router, stream, self._clock())
            return
        if not self._pending and self.lag_observer is not None:
            self._pending_since = self._clock()
        self._pending.extend(stream)
        self._dispatcher.unpark()

    async def _dispatch_pending(self) -> None:
        try:
            while True:
                if not self._pending:
                    await self._dispatcher.park()
                if self._publishing and self._coalesce_timeout > 0:
                    # This node's publishes under way bring their events back
                    # with (or just before) their answer. Waiting for them, and
                    # only for them, lets those events share this round's frames
                    # instead of needing a round of their own right after it: one
                    # write per subscriber instead of two. With --workers the
                    # answer is a round trip to the parent (so each worker's rounds
                    # carry as many events as one process's); in-process, one
                    # scheduling round. Bounded: a slow backplane delays no round
                    # by more than ``coalesce_timeout``.
                    if self._is_local:
                        # In-process, they finish within one scheduling round: one
                        # checkpoint waits for them, without a timed wait's cost.
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    else:
                        self._awaited = set(self._publishing)
                        self._awaited_done = trio.Event()
                        with trio.move_on_after(self._coalesce_timeout):
                            await self._awaited_done.wait()
                        self._awaited.clear()
                stream, self._pending = self._pending, []
                now = self._clock()
                self.deliveries += deliver_to(self._router, stream, now)
                if self.lag_observer is not None:
                    done_at = self._clock()
                    # Sampled: at most one observation per LAG_SAMPLE_INTERVAL.
                    # A round longer than that is always observed (the previous
                    # sample is at least that old when it ends): the tail the
                    # histogram is for is never the part sampled away.
                    if done_at >= self._next_lag_sample:
                        self._next_lag_sample = done_at + LAG_SAMPLE_INTERVAL
                        self.lag_observer(done_at - self._pending_since)
                self._rounds += 1
                done, self._round_done = self._round_done, trio.Event()
                done.set()
        finally:
            # From now on, deliver at once. What waited for this round goes out
            # now, and publishes waiting for a round go on (the server stops the
            # dispatcher before it drains: they would wait for nothing).
            self._nursery = None
            self._flush()
            self._round_done.set()

    def _recover(self, site: _Site, last: int) -> None:
        if self._nursery is None:
            self._release(site, [], last)
            return
        self._nursery.start_soon(self._fetch_missing, site, last, self._epoch)

    def _new_epoch(self, epoch: str | None) -> None:
        """Adopt the backplane's numbering; None means it has none yet (it was emptied)."""
        if self._epoch is not None:
            # The backplane lost its data (a Redis restarted without persistence):
            # its seqs started over. Forget positions; tell every subscriber.
            log.warning("the backplane lost its data (epoch changed); seqs start over")
            self._last.clear()
            self._known.clear()
            self._router.restart_numbering()
        self._epoch = epoch

    async def _fetch_missing(self, site: _Site, last: int, epoch: str | None) -> None:
        hub, site_id = site
        recovered: list[NumberedEvent] = []
        try:
            with trio.fail_after(self._recovery_timeout):
                history = await self._history(hub, site_id, last)
                if (history.epoch or None) != epoch:
                    # ``last`` counted in a numbering that is gone: take all that is kept.
                    if (history.epoch or None) != self._epoch:
                        self._new_epoch(history.epoch or None)
                    last = 0
                    history = await self._history(hub, site_id, 0)
            recovered = [event for event in history.events if self._is_deliverable(event)]
            if history.first_seq is not None and history.first_seq > last + 1:
                log.warning(
                    "%s/%.64s: events %d..%d are no longer in history; subscribers get a Gap",
                    hub,
                    site_id,
                    last + 1,
                    history.first_seq - 1,
                )
        except trio.TooSlowError:
            log.error(
                "%s/%.64s: history stayed unavailable for %.1f s; releasing %d held "
                "event(s) with a Gap",
                hub,
                site_id,
                self._recovery_timeout,
                len(self._held.get(site, ())),
            )
        except Exception:
            # One site's recovery must not take the node down, nor hold the site forever.
            log.exception("%s/%.64s: recovery failed; releasing held events", hub, site_id)
        self._release(site, recovered, last)

    async def _history(self, hub: str, site_id: str, after: int) -> History:
        """History, retried with backoff until the caller's deadline."""
        delay = 0.1
        while True:
            try:
                async with self._fetching:
                    history = await self._backplane.history(hub, site_id, after)
            except BackplaneError as exc:
                # One warning an outage, not one per site and retry.
                log.log(
                    logging.DEBUG if self._is_history_failing else logging.WARNING,
                    "history of %s/%.64s unavailable (%s); retrying",
                    hub,
                    site_id,
                    exc,
                )
                self._is_history_failing = True
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if self._is_history_failing:
                self._is_history_failing = False
                log.warning("history is available again")
            return history

    def _gap(self, site: _Site, first_available: int) -> None:
        self._flush()
        hub = Hub(site[0])
        message = gap_message(first_available)
        for key in self._router.keys_of(hub, site[1]):
            self.gaps_sent += self._router.count(key)
            self._router.notify(key, message)

    def _release(self, site: _Site, recovered: list[NumberedEvent], last: int) -> None:
        """Deliver what was recovered and held, in order, with a Gap before any hole."""
        # Held events of a numbering that has since been replaced are not these seqs.
        held = [
            event
            for event in self._held.pop(site, [])
            if (event.epoch or None) == self._epoch or self._epoch is None
        ]
        ready: list[NumberedEvent] = []
        for event in sorted([*recovered, *held], key=lambda e: e.seq):
            if event.seq <= last:
                continue
            if event.seq > last + 1:
                # Events last+1 .. seq-1 are not coming: say so before what follows.
                if ready:
                    self._deliver(ready)
                    ready = []
                self._gap(site, event.seq)
            ready.append(event)
            last = event.seq
        if ready:
            self._last[site] = last
            self._deliver(ready)

    async def _forget_idle_sites(self) -> None:
        while True:
            await trio.sleep(self._site_idle_timeout)
            subscribed = self._router.sites()
            recent, self._recent = self._recent, set()
            idle = [
                site
                for site in self._last
                if site not in recent and site not in self._held and site not in subscribed
            ]
            for site in idle:
                del self._last[site]
            for site in [site for site in self._known if site not in subscribed]:
                del self._known[site]
            if idle:
                log.debug("forgot %d idle sites", len(idle))
