"""What a resume makes a connection send, as values (no sockets, no clock of its own).

A reconnecting client says where it stopped (``since_seq`` on the URL, or the
``Resume(lastSeq)`` hub method) and must get what it missed, in order, then
the live stream, with no duplicate and no hole at the switch. Live events
keep arriving while history is fetched, so the gate holds them, then sends
the replay, then what it held, each cut to what the client has not seen:

- ``hold_until``: after a handshake without ``since_seq``, a short window in
  which a client that reconnects calls ``Resume`` (so live events do not race
  ahead of the replay).
- ``begin`` / ``complete`` / ``fail``: one resume at a time.
- ``on_live``: what of a live delivery goes out now.

The backplane's history can be ahead of its broadcast (Redis: the history
reply may beat the Pub/Sub message), so seqs up to ``replayed_upto`` went
out in a replay and a live copy of them is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import trio

from hubcore import PreparedMessage
from hubserver.routing import Delivery, GroupKey, Replay, gap_message

from ._context import ReplayFn

__all__ = [
    "MAX_HELD_DELIVERIES",
    "MAX_RESUME_SEQ",
    "RESUME_BURST",
    "RESUME_REFILL",
    "RESUME_TIMEOUT",
    "HoldOverflow",
    "ResumeGate",
    "ResumeOutcome",
    "fetch_replay",
]

#: Deliveries a connection may hold while its resume is prepared.
MAX_HELD_DELIVERIES: Final = 100_000
#: A resume's history fetch must finish within this many seconds.
RESUME_TIMEOUT: Final = 10.0
#: ``Resume`` calls a connection may make at once, and the seconds that earn one
#: more. A replay sends up to ``--history-size`` events for a few bytes asked:
#: unlimited, one client calling it in a loop would take a core. A real client
#: calls it once per connection (after it reconnected).
RESUME_BURST: Final = 5
RESUME_REFILL: Final = 10.0
#: The largest seq a client may resume from: JavaScript's largest safe
#: integer, beyond anything a stream reaches and within every backplane's range.
MAX_RESUME_SEQ: Final = 2**53


class HoldOverflow(Exception):
    """More live deliveries arrived during a resume than a connection may hold."""


@dataclass(frozen=True, slots=True)
class ResumeOutcome:
    """What a finished resume sends, in this order (a Completion goes after ``replay``).

    Attributes:
        gap: ``Gap(first)`` when history no longer reaches back to the resume point.
        replay: the missed events, or None.
        released: live deliveries held during the resume, cut after the replay.
    """

    gap: PreparedMessage | None
    replay: Delivery | None
    released: list[Delivery]


class ResumeGate:
    """The resume bookkeeping of one connection.

    Args:
        user_id: the connection's user filter (a site-user stream), or None.
    """

    __slots__ = (
        "_first_live_seq",
        "_held",
        "_resumes",
        "_resumes_at",
        "_user_id",
        "hold_deadline",
        "is_resuming",
        "replayed_upto",
    )

    def __init__(self, user_id: str | None) -> None:
        self._user_id = user_id
        self._held: list[Delivery] | None = None
        self.hold_deadline = math.inf
        self.is_resuming = False
        self._first_live_seq: int | None = None
        self.replayed_upto = 0
        self._resumes = float(RESUME_BURST)
        self._resumes_at = -math.inf

    @property
    def is_passthrough(self) -> bool:
        """Live deliveries go out as they come: nothing held, no resume, the first one seen."""
        return self._held is None and not self.is_resuming and self._first_live_seq is not None

    def hold_until(self, deadline: float) -> None:
        """Hold live events until ``deadline`` in case the client calls ``Resume``."""
        self._held = []
        self.hold_deadline = deadline

    def may_call_resume(self, now: float) -> bool:
        """Whether a ``Resume`` call is within its rate (a token bucket); takes one if so."""
        earned = (now - self._resumes_at) / RESUME_REFILL
        self._resumes = min(float(RESUME_BURST), self._resumes + earned)
        self._resumes_at = now
        if self._resumes < 1:
            return False
        self._resumes -= 1
        return True

    def begin(self) -> bool:
        """Start a resume; False if one is under way (one at a time)."""
        if self.is_resuming:
            return False
        self.is_resuming = True
        if self._held is None:
            self._held = []  # a late resume: hold what arrives during the fetch
        self.hold_deadline = math.inf
        return True

    def on_live(self, delivery: Delivery) -> Delivery | None:
        """What of ``delivery`` to send now (None: held, or all of it already replayed).

        Raises:
            HoldOverflow: too many deliveries are held; the gate holds none any more.
        """
        held = self._held
        if held is not None:
            held.append(delivery)
            if len(held) > MAX_HELD_DELIVERIES:
                self._held = None
                raise HoldOverflow(f"{len(held)} deliveries held during a resume")
            return None
        if delivery.first_seq <= self.replayed_upto:
            rest = delivery.after(self.replayed_upto)
            if rest is None:
                return None
            delivery = rest
        if self._first_live_seq is None:
            self._first_live_seq = delivery.first_seq
        return delivery

    def complete(self, since_seq: int, replay: Replay, *, is_lost: bool) -> ResumeOutcome:
        """The resume's history arrived: what to send, and live again.

        Args:
            since_seq: where the client stopped.
            replay: history after ``since_seq`` (or all of it when ``is_lost``).
            is_lost: the client saw seqs this stream never reached (history
                was lost, e.g. an in-memory backplane restarted): everything
                kept is new to it.
        """
        after = 0 if is_lost else since_seq
        user_id = self._user_id
        events = [
            event
            for event in replay.events
            if event.seq > after and (user_id is None or event.user_id == user_id)
        ]
        first_live = self._first_live_seq
        if first_live is not None:
            # Live events from this seq on were delivered already (a late Resume).
            events = [event for event in events if event.seq < first_live]
        gap = None
        if after + 1 < replay.first_available or after != since_seq:
            gap = gap_message(replay.first_available)
        last = after
        delivery = None
        if events:
            delivery = Delivery(events)
            last = events[-1].seq
        self.replayed_upto = max(self.replayed_upto, last)
        self.is_resuming = False
        return ResumeOutcome(gap, delivery, self._release(last))

    def fail(self, since_seq: int) -> list[Delivery]:
        """The history fetch failed: live again from ``since_seq``; what was held, to send."""
        self.is_resuming = False
        return self._release(since_seq)

    def on_timer(self, now: float) -> list[Delivery] | None:
        """No ``Resume`` came in the hold window: what was held goes out as it is."""
        if now >= self.hold_deadline and not self.is_resuming:
            return self._release(0)
        return None

    def restart_numbering(self) -> None:
        """The stream's numbering started over: nothing new is a replayed duplicate."""
        self.replayed_upto = 0
        self._first_live_seq = None

    def close(self) -> None:
        """Drop what is held (the connection is ending)."""
        self._held = None
        self.hold_deadline = math.inf

    def _release(self, after_seq: int) -> list[Delivery]:
        held, self._held = self._held or [], None
        self.hold_deadline = math.inf
        released = []
        for delivery in held:
            rest = delivery.after(after_seq)
            if rest is not None:
                if self._first_live_seq is None:
                    self._first_live_seq = rest.first_seq
                released.append(rest)
                after_seq = rest.last_seq
        return released


async def fetch_replay(replay: ReplayFn, key: GroupKey, since_seq: int) -> tuple[Replay, bool]:
    """History after ``since_seq`` for ``key``'s stream, and whether the client is lost.

    Lost: the client saw seqs this stream never reached (history was lost,
    e.g. an in-memory backplane restarted), so all that is kept is fetched.

    Raises:
        BackplaneError: the history is unavailable.
        trio.TooSlowError: no answer within ``RESUME_TIMEOUT``.
    """
    with trio.fail_after(RESUME_TIMEOUT):
        found = await replay(key.hub, key.site_id, since_seq)
        is_lost = since_seq > found.last_seq
        if is_lost:
            found = await replay(key.hub, key.site_id, 0)
    return found, is_lost
