"""The permission watcher's two inputs: the version poll and change notices.

The store here is the I/O boundary: a version the test sets (and can make
fail); notices are put in the watcher's ``ChangeQueue`` as a store's
``watch_changes`` would. The clock is trio's autojump clock (a test function must ask for it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio
from trio.testing import MockClock

from hubserver.permissions import (
    ChangeQueue,
    PermissionChange,
    PermissionStoreUnavailable,
    Role,
    watch_permissions,
)

POLL = 1.0
Pairs = frozenset[tuple[str, str]]


class Versions:
    """A store reduced to its version."""

    def __init__(self) -> None:
        self.value = 0
        self.is_failing = False

    async def role_of(self, site_id: str, subject: str) -> Role | None:
        raise AssertionError("the watcher never looks up roles itself")

    async def version(self) -> int:
        await trio.lowlevel.checkpoint()
        if self.is_failing:
            raise PermissionStoreUnavailable("down")
        return self.value

    @property
    def is_available(self) -> bool:
        return not self.is_failing


@dataclass
class Rechecks:
    calls: list[tuple[float, Pairs | None]] = field(default_factory=list)
    failures_left: int = 0
    #: Seconds a re-check of everyone takes (a slow store, many pairs); it is
    #: recorded when it starts, and fails at its end if ``failures_left``.
    full_duration: float = 0.0
    #: Seconds a re-check of some pairs takes; it is recorded at its end.
    pair_duration: float = 0.0

    async def __call__(self, pairs: Pairs | None) -> None:
        if pairs is None and self.full_duration:
            self.calls.append((trio.current_time(), pairs))
            await trio.sleep(self.full_duration)
        elif pairs is not None and self.pair_duration:
            await trio.sleep(self.pair_duration)
        else:
            await trio.lowlevel.checkpoint()
        if self.failures_left:
            self.failures_left -= 1
            raise PermissionStoreUnavailable("down mid-way")
        if pairs is not None or not self.full_duration:
            self.calls.append((trio.current_time(), pairs))

    @property
    def full(self) -> list[float]:
        return [at for at, pairs in self.calls if pairs is None]

    @property
    def targeted(self) -> list[Pairs]:
        return [pairs for _, pairs in self.calls if pairs is not None]


@dataclass
class Watched:
    store: Versions
    rechecks: Rechecks
    changes: ChangeQueue

    def notice(self, *pairs: tuple[str, str], version: int | None = None) -> None:
        self.changes.put(PermissionChange(pairs=frozenset(pairs), version=version))

    def change(self, *pairs: tuple[str, str]) -> None:
        """A change in the store and its notice."""
        self.store.value += 1
        self.notice(*pairs, version=self.store.value)


@pytest.fixture
async def watched(nursery: trio.Nursery, request: pytest.FixtureRequest) -> AsyncIterator[Watched]:
    has_feed: bool = getattr(request, "param", True)  # False: parametrized indirectly
    w = Watched(Versions(), Rechecks(), ChangeQueue(max_pairs=5))
    nursery.start_soon(
        lambda: watch_permissions(
            w.store, w.rechecks, poll_interval=POLL, changes=w.changes, has_feed=has_feed
        )
    )
    await trio.sleep(0.1)  # the first poll: the version it starts from
    yield w
    nursery.cancel_scope.cancel()


async def test_notices_re_check_their_pairs_at_once_and_nothing_else(
    watched: Watched, autojump_clock: MockClock
) -> None:
    watched.change(("s1", "alice"))
    await trio.sleep(0.01)
    assert watched.rechecks.targeted == [{("s1", "alice")}]
    watched.change(("s1", "bob"), ("s2", "bob"))
    watched.notice(("s3", "carol"))  # a notice that changed no version (an announce)
    await trio.sleep(10 * POLL)
    assert watched.rechecks.targeted == [
        {("s1", "alice")},
        {("s1", "bob"), ("s2", "bob"), ("s3", "carol")},
    ]
    assert watched.rechecks.full == []


async def test_a_skipped_version_means_a_lost_notice(
    watched: Watched, autojump_clock: MockClock
) -> None:
    watched.store.value += 1  # its notice never comes
    watched.change(("s1", "alice"))
    await trio.sleep(0.01)
    assert len(watched.rechecks.full) == 1


async def test_a_version_without_its_notice_re_checks_everyone_one_poll_later(
    watched: Watched, autojump_clock: MockClock
) -> None:
    changed_at = trio.current_time()
    watched.store.value += 1
    await trio.sleep(3 * POLL)
    (full_at,) = watched.rechecks.full
    assert changed_at + POLL <= full_at <= changed_at + 2 * POLL + 0.01
    assert watched.rechecks.targeted == []


async def test_a_notice_still_on_its_way_at_a_poll_is_waited_for(
    watched: Watched, autojump_clock: MockClock
) -> None:
    watched.store.value += 1
    await trio.sleep(1.5 * POLL)  # a poll has seen the version ahead of the notices
    watched.notice(("s1", "alice"), version=watched.store.value)
    await trio.sleep(10 * POLL)
    assert watched.rechecks.full == []
    assert watched.rechecks.targeted == [{("s1", "alice")}]


async def test_a_version_that_went_back_re_checks_everyone_at_once(
    watched: Watched, autojump_clock: MockClock
) -> None:
    watched.change(("s1", "alice"))
    await trio.sleep(POLL)
    watched.store.value = 0  # an emptied Redis
    await trio.sleep(POLL + 0.01)
    assert len(watched.rechecks.full) == 1


async def test_a_flood_of_pairs_becomes_one_re_check_of_everyone(
    watched: Watched, autojump_clock: MockClock
) -> None:
    for index in range(6):  # the queue holds 5
        watched.change((f"s{index}", "alice"))
    await trio.sleep(0.01)
    assert len(watched.rechecks.full) == 1
    assert watched.rechecks.targeted == []
    await trio.sleep(5 * POLL)
    assert len(watched.rechecks.full) == 1  # the poll agrees with the notices since


async def test_a_notice_without_pairs_re_checks_everyone(
    watched: Watched, autojump_clock: MockClock
) -> None:
    watched.changes.put(PermissionChange(pairs=None))  # a subscription was lost
    await trio.sleep(0.01)
    assert len(watched.rechecks.full) == 1


async def test_a_targeted_re_check_cut_short_is_redone_for_everyone(
    watched: Watched, autojump_clock: MockClock
) -> None:
    watched.rechecks.failures_left = 1
    watched.change(("s1", "alice"))
    await trio.sleep(2 * POLL)  # the retry, after poll_interval
    assert watched.rechecks.targeted == []
    assert len(watched.rechecks.full) == 1


async def test_notices_wait_while_the_store_is_down_then_everyone_is_re_checked(
    watched: Watched, autojump_clock: MockClock
) -> None:
    watched.store.is_failing = True
    await trio.sleep(2 * POLL)
    watched.change(("s1", "alice"))
    await trio.sleep(POLL)
    assert watched.rechecks.calls == []
    watched.store.is_failing = False
    await trio.sleep(10 * POLL)
    assert len(watched.rechecks.full) == 1
    assert watched.rechecks.targeted == []


@pytest.mark.parametrize("watched", [False], indirect=True, ids=["no feed"])
async def test_without_a_feed_a_new_version_re_checks_everyone_at_the_poll(
    watched: Watched, autojump_clock: MockClock
) -> None:
    watched.store.value += 1
    await trio.sleep(POLL + 0.01)
    assert len(watched.rechecks.full) == 1
    # A notice (the change endpoint, for a store without a feed) is still targeted.
    watched.notice(("s1", "alice"))
    await trio.sleep(0.01)
    assert watched.rechecks.targeted == [{("s1", "alice")}]


async def test_a_notice_during_the_outage_backoff_is_acted_on_at_once(
    watched: Watched, autojump_clock: MockClock
) -> None:
    watched.store.is_failing = True
    await trio.sleep(40 * POLL)  # the retries backed off: the next one is 30 s apart
    watched.store.is_failing = False
    changed_at = trio.current_time()
    watched.change(("s1", "alice"))  # the store is back: its notices arrive again
    await trio.sleep(2 * POLL)
    # Everyone, as after any outage; not when a 30 s back-off happens to end.
    (full_at,) = watched.rechecks.full
    assert full_at - changed_at < 0.1


async def test_a_notice_during_a_re_check_of_everyone_is_acted_on_at_once(
    watched: Watched, autojump_clock: MockClock
) -> None:
    watched.rechecks.full_duration = 100 * POLL
    watched.changes.put(PermissionChange(pairs=None))
    await trio.sleep(POLL)
    (started_at,) = watched.rechecks.full
    changed_at = trio.current_time()
    watched.change(("s1", "alice"))
    await trio.sleep(0.01)
    # Not 99 s later, when everyone is through.
    assert [(at - changed_at, pairs) for at, pairs in watched.rechecks.calls[1:]] == [
        (0, {("s1", "alice")})
    ]
    watched.change(("s1", "bob"))
    await trio.sleep(0.01)
    assert watched.rechecks.targeted == [{("s1", "alice")}, {("s1", "bob")}]
    await trio.sleep(200 * POLL)
    # The notices' versions were counted: they start no re-check of everyone.
    assert watched.rechecks.full == [started_at]


async def test_a_notice_naming_no_pairs_during_a_re_check_of_everyone_starts_another(
    watched: Watched, autojump_clock: MockClock
) -> None:
    watched.rechecks.full_duration = 10 * POLL
    watched.changes.put(PermissionChange(pairs=None))
    await trio.sleep(POLL)
    watched.changes.put(PermissionChange(pairs=None))  # may concern those already re-checked
    watched.change(("s1", "alice"))  # a flood: the queue turned into "everyone"
    await trio.sleep(0.01)
    assert watched.rechecks.targeted == []
    await trio.sleep(30 * POLL)
    first, second = watched.rechecks.full
    assert second - first == pytest.approx(10 * POLL, abs=0.1)


async def test_a_re_check_of_everyone_that_fails_is_redone_and_its_notices_still_served(
    watched: Watched, autojump_clock: MockClock
) -> None:
    watched.rechecks.full_duration = 10 * POLL
    watched.changes.put(PermissionChange(pairs=None))
    await trio.sleep(POLL)
    watched.change(("s1", "alice"))
    await trio.sleep(0.01)
    assert watched.rechecks.targeted == [{("s1", "alice")}]
    watched.rechecks.failures_left = 1  # at the end of the re-check of everyone
    await trio.sleep(30 * POLL)
    first, second = watched.rechecks.full
    assert second >= first + 10 * POLL  # redone once the first was through


async def test_a_notice_still_being_applied_when_everyone_is_through_does_not_stall_the_watcher(
    watched: Watched, autojump_clock: MockClock
) -> None:
    watched.rechecks.full_duration = 10 * POLL
    watched.rechecks.pair_duration = 5 * POLL  # a slow store: it outlasts the re-check of everyone
    watched.changes.put(PermissionChange(pairs=None))
    await trio.sleep(7 * POLL)
    watched.change(("s1", "alice"))
    await trio.sleep(13 * POLL)
    assert watched.rechecks.targeted == [{("s1", "alice")}]
    # The watcher is back at its loop: a notice naming no pairs is acted on.
    watched.changes.put(PermissionChange(pairs=None))
    await trio.sleep(POLL)
    assert len(watched.rechecks.full) == 2


async def test_a_notice_taken_with_a_re_check_of_everyone_is_not_held_back_by_it(
    watched: Watched, autojump_clock: MockClock
) -> None:
    watched.rechecks.full_duration = 10 * POLL
    watched.rechecks.failures_left = 1  # the first re-check of everyone fails at its end
    watched.changes.put(PermissionChange(pairs=None))
    await trio.sleep(10.5 * POLL)  # failed; the watcher waits out its back-off
    assert watched.rechecks.full == [pytest.approx(0.1)]
    # The notice ends the wait and is taken by the loop, with everyone due again:
    # a revoke must not wait for the slow re-check of everyone to reach its pair.
    watched.change(("s1", "alice"))
    await trio.sleep(0.01)
    assert watched.rechecks.targeted == [{("s1", "alice")}]
    assert len(watched.rechecks.full) == 2


async def test_a_notice_being_applied_when_a_re_check_of_everyone_fails_is_seen_through(
    watched: Watched, autojump_clock: MockClock
) -> None:
    watched.rechecks.full_duration = 10 * POLL
    watched.rechecks.pair_duration = 5 * POLL
    watched.changes.put(PermissionChange(pairs=None))
    await trio.sleep(7 * POLL)
    watched.change(("s1", "alice"))  # its re-check runs until 12 s
    await trio.sleep(POLL)
    watched.rechecks.failures_left = 1  # taken by the re-check of everyone, at 10 s
    await trio.sleep(5 * POLL)
    # Taken from the queue, so nothing else would apply it before the next
    # re-check of everyone, a back-off later.
    assert watched.rechecks.targeted == [{("s1", "alice")}]
