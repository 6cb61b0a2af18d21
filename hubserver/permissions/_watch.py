"""`watch_permissions`: re-check open connections when grants change, survive store outages.

Theory of operation. Two ways of learning about changes feed one loop:

- The poll. The store's ``version`` is read every ``poll_interval``. For a
  store without change notices (SQLite, in memory) a new version means
  "anything may have changed": ``recheck(None)`` re-checks every open
  connection.
- Change notices (a `ChangeFeed`: Redis, the access-control backend, and the
  ``POST /v1/permissions/changed`` endpoint for any store) arrive in a
  `ChangeQueue` and wake the loop at once; ``recheck(pairs)`` re-checks only
  the connections of the ``(site_id, subject)`` pairs named. A notice that
  names no pairs re-checks everyone.

For a store whose notices carry its version (``has_feed``), the poll is the
safety net for notices lost on the way: the loop keeps the last version its
notices accounted for (``known``). A notice whose version skips one means
one was lost: everyone is re-checked. A polled version ahead of ``known``
is given one ``poll_interval`` for its notices to arrive (they are usually
in flight) before everyone is re-checked. A version that went back (an
emptied Redis) re-checks everyone at once.

A store that cannot answer (`PermissionStoreUnavailable`: a locked or
corrupt database, Redis or the backend unreachable, a deadline missed) must
not take the server down, and must not close anyone either: the open
connections keep their last known roles. The watcher then logs once, retries
with doubling intervals up to ``max_retry_interval`` (or at once when a
notice arrives: the store is likely back), and once the store
answers again re-checks everyone whatever the version says, so a revoke made
during the outage still takes effect. A re-check in which a lookup failed
(whether of everyone or of some pairs; cut short, or only one pair's answer
unusable) is redone in the same way, for everyone.

A re-check of everyone asks the store about every pair with an open
connection; against a slow store (the URL source's backend) that takes a
while. Notices that name pairs are not held back by it: while it runs,
``recheck(pairs)`` runs for them at once, beside it (their versions wait for
the loop, which handles them once it is through); so do the pairs the loop
took in the turn that started it (say, a notice that ended an outage's
back-off). A notice that names no pairs waits: only a re-check of everyone
that starts after it covers it. A notice taken from the queue is seen
through even when the re-check of everyone fails: nothing else would apply
it before the next one, a back-off later.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from ._store import PermissionChange, PermissionStore, PermissionStoreUnavailable

__all__ = ["MAX_QUEUED_PAIRS", "MAX_RETRY_INTERVAL", "ChangeQueue", "Recheck", "watch_permissions"]

log = logging.getLogger("hubserver")

#: The longest wait between two attempts while the store is failing, in seconds.
MAX_RETRY_INTERVAL: Final = 30.0
#: Pairs a `ChangeQueue` holds before it turns into "re-check everyone".
MAX_QUEUED_PAIRS: Final = 1000

#: Re-checks open connections: those of the given ``(site_id, subject)`` pairs,
#: or every one for None. May raise `PermissionStoreUnavailable`.
Recheck = Callable[[frozenset[tuple[str, str]] | None], Awaitable[None]]


class ChangeQueue:
    """Change notices heard of and not yet acted on, and the wake-up of the watcher.

    Bounded: past ``max_pairs`` pairs (a bulk grant, a flood of notices) it
    forgets them and keeps "re-check everyone", which covers them all.
    """

    def __init__(self, *, max_pairs: int = MAX_QUEUED_PAIRS) -> None:
        self._max_pairs = max_pairs
        self._pairs: set[tuple[str, str]] | None = set()  # None: everyone
        self._versions: list[int] = []
        self._arrived = trio.Event()
        # Set while named pairs wait (what a re-check of everyone does not hold back).
        self._pairs_arrived = trio.Event()

    def put(self, change: PermissionChange) -> None:
        """Queue ``change`` and wake the watcher (sync: callable from any task)."""
        if change.pairs is None or self._pairs is None:
            self._pairs = None
        else:
            self._pairs |= change.pairs
            if len(self._pairs) > self._max_pairs:
                self._pairs = None
        if change.version is not None and self._pairs is not None:
            self._versions.append(change.version)
            if len(self._versions) > self._max_pairs:
                self._pairs = None
        if self._pairs is None:
            # Everyone is re-checked, after which the polled version is the one known.
            self._versions = []
        elif self._pairs:
            self._pairs_arrived.set()
        self._arrived.set()

    def take(self) -> tuple[frozenset[tuple[str, str]] | None, list[int]]:
        """What was queued: the pairs (None: everyone) and the versions, in arrival order."""
        pairs = None if self._pairs is None else frozenset(self._pairs)
        versions = self._versions
        self._pairs, self._versions = set(), []
        if self._arrived.is_set():
            self._arrived = trio.Event()
        if self._pairs_arrived.is_set():
            self._pairs_arrived = trio.Event()
        return pairs, versions

    def take_pairs(self) -> frozenset[tuple[str, str]]:
        """The named pairs queued (none when "everyone" is), leaving their versions queued.

        For notices handled while everyone is being re-checked: the versions
        stay for the watcher's next turn, which compares them with the version
        it read before that re-check.
        """
        pairs = frozenset(self._pairs or ())
        if self._pairs:
            self._pairs = set()
        if self._pairs_arrived.is_set():
            self._pairs_arrived = trio.Event()
        return pairs

    async def wait_for_pairs(self) -> None:
        """Return once named pairs are queued (at once if some are)."""
        await self._pairs_arrived.wait()

    async def wait_until(self, deadline: float) -> None:
        """Return at ``deadline``, or as soon as a change is queued."""
        with trio.move_on_at(deadline):
            await self._arrived.wait()


async def watch_permissions(
    store: PermissionStore,
    recheck: Recheck,
    *,
    poll_interval: float,
    max_retry_interval: float = MAX_RETRY_INTERVAL,
    changes: ChangeQueue | None = None,
    has_feed: bool = False,
) -> None:
    """Re-check open connections when grants change, until cancelled; never raises for the store.

    Args:
        store: the permission store to poll.
        recheck: re-checks open connections (see `Recheck`); when it raises
            `PermissionStoreUnavailable`, everyone is re-checked once the store
            is back.
        poll_interval: seconds between polls; 0 or less turns the watcher off.
        max_retry_interval: the cap of the doubling retry interval while the
            store is failing.
        changes: where change notices arrive; they wake the watcher at once.
        has_feed: the store's own notices (in ``changes``) carry its version,
            so a polled version change is first waited for as a notice.
    """
    if poll_interval <= 0:
        return
    if changes is None:
        changes = ChangeQueue()
    known: int | None = None
    # A polled version the notices have not reached yet, and since when.
    awaited: tuple[int, float] | None = None
    is_recheck_due = False
    failing_since: float | None = None
    retry_interval = poll_interval
    next_poll_at = -math.inf
    while True:
        try:
            now = trio.current_time()
            is_poll = now >= next_poll_at
            if is_poll:
                next_poll_at = now + poll_interval
            # Taken before the poll: every notice taken is then covered by the
            # version read (a change is made before its notice is sent).
            pairs, versions = changes.take()
            current = await store.version()
            if pairs is None:
                is_recheck_due = True
            for version in versions:
                if known is None or version <= known:
                    continue
                if version > known + 1:
                    is_recheck_due = True  # a notice in between was lost
                known = version
            if known is None:
                known = current  # the first answer: nothing to compare it with
            elif current < known or (current != known and not has_feed):
                is_recheck_due = True
            elif current == known:
                awaited = None
            elif awaited is None or known >= awaited[0]:
                awaited = (current, now)  # the notices may be on their way
            elif is_poll and now >= awaited[1] + poll_interval:
                is_recheck_due = True  # they are not: lost
            if is_recheck_due:
                await _recheck_everyone(recheck, changes, pairs or frozenset())
                known, awaited, is_recheck_due = current, None, False
            elif pairs:
                is_recheck_due = True  # until this recheck completes
                await recheck(pairs)
                is_recheck_due = False
        except PermissionStoreUnavailable as exc:
            # What changed meanwhile is unknown: re-check everyone on recovery.
            is_recheck_due = True
            if failing_since is None:
                failing_since = trio.current_time()
                retry_interval = poll_interval
                log.warning(
                    "permission store unavailable, open connections keep their roles, "
                    "new ones get 503 (retrying with backoff): %s",
                    exc,
                    extra={"event": "permission_store_unavailable"},
                )
            else:
                retry_interval = min(retry_interval * 2, max(max_retry_interval, poll_interval))
                log.debug("permission store still unavailable: %s", exc)
            # A notice ends the wait: it says the store (or the backend) is
            # reachable again, and a revoke must not wait out a 30 s back-off.
            await changes.wait_until(trio.current_time() + retry_interval)
            next_poll_at = -math.inf
            continue
        if failing_since is not None:
            log.info(
                "permission store available again after %.1f s; open connections re-checked",
                trio.current_time() - failing_since,
                extra={"event": "permission_store_available"},
            )
            failing_since = None
        await changes.wait_until(next_poll_at)


async def _recheck_everyone(
    recheck: Recheck, changes: ChangeQueue, taken: frozenset[tuple[str, str]]
) -> None:
    """``recheck(None)``, while ``taken`` and the notices naming pairs are applied beside it.

    Raises:
        PermissionStoreUnavailable: the re-check of everyone failed, or one of
            the pairs' re-checks did (the watcher then re-checks everyone again,
            as after any failed re-check).
    """
    failure: PermissionStoreUnavailable | None = None
    pair_failure: PermissionStoreUnavailable | None = None
    is_done = False
    waiting: trio.CancelScope | None = None

    async def apply_notices() -> None:
        nonlocal pair_failure, waiting
        pairs = taken
        while True:
            if pairs:
                try:
                    # Not cancelled when everyone is through (or failed): a
                    # revoke taken from the queue is seen to its end.
                    await recheck(pairs)
                except PermissionStoreUnavailable as exc:
                    # Recorded, and the next notices still served: one pair's
                    # unusable answer must not hold back the others' revokes.
                    pair_failure = exc
            if is_done:
                # Everyone went through while a re-check of pairs ran: nobody
                # would cancel the wait below, and the watcher would stall
                # until the next notice naming pairs.
                return
            with trio.CancelScope() as waiting:
                await changes.wait_for_pairs()
            waiting = None
            if is_done:
                return  # what is queued now is the loop's
            # Empty if the queue turned into "everyone": a re-check after this one.
            pairs = changes.take_pairs()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(apply_notices)
        try:
            await recheck(None)
        except PermissionStoreUnavailable as exc:
            failure = exc  # everyone is re-checked again, after the back-off
        is_done = True
        if waiting is not None:
            waiting.cancel()
    if failure is not None:
        raise failure
    if pair_failure is not None:
        raise pair_failure
