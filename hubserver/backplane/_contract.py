"""The backplane seam: numbering, history and fan-out of events across processes.

A backplane owns three things that must be shared when several hubserver
processes serve one site: the per-site, per-hub ``seq`` counter, the capped
per-site history, and the stream of numbered events every node delivers to
its local subscribers. The in-process broker is the embedded default; Redis
(and the parent-process broker of ``--workers``) implement the same contract.

Event texts travel as *prefixes*: compact JSON of the event without its last
``}``, ending in ``"seq":``. The backplane assigns the seq and appends
``<seq>}``, inside the same atomic step that numbers, stores and publishes,
so per-site order on the wire is seq order on every node.

Publishing is idempotent on the event's ``id``, per (hub, site): an event whose
id was accepted for the same hub and site within the dedupe window is not
numbered, stored or broadcast again; ``publish`` returns it with its original
seq and ``is_duplicate`` set. The window runs from the first acceptance (a
retry does not extend it). Within one batch, a repeated id is treated the same
way: the first occurrence is published, the later ones report its seq. The
same id on another site or hub is another event.

Errors say what the publisher may assume. ``BackplaneUnavailable``: nothing
of the batch was accepted (the request never reached the backplane, or it
refused it before doing anything); retrying is safe and cannot duplicate.
``PublishOutcomeUnknown``: the request was sent and its answer was lost; the
batch may have been accepted. A retry with the same ids is still safe: the
dedupe window turns an accepted event into a duplicate answered with its
original seq.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from hubcore import HubError

__all__ = [
    "Backplane",
    "BackplaneError",
    "BackplaneUnavailable",
    "History",
    "PublishOutcomeUnknown",
    "NumberedEvent",
    "PendingEvent",
    "number",
]


class BackplaneError(HubError):
    """The backplane failed in a way the caller should report."""


class BackplaneUnavailable(BackplaneError):
    """Nothing was accepted: the backplane could not be reached or refused the request.

    Raised only when that is certain (the request was never sent, or the
    backplane answered that it did not run it). Publish answers 503; a retry
    cannot duplicate anything.
    """


class PublishOutcomeUnknown(BackplaneError):
    """A publish was sent, and its answer was lost (timed out, connection dropped).

    The batch may or may not have been accepted. Publish answers 503 with
    ``"outcome": "unknown"``; retrying with the same event ids is safe (see
    the module docstring on idempotency).
    """


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingEvent:
    """An event validated and encoded, waiting for its seq.

    Attributes:
        hub: "entries" or "incidents".
        site_id, user_id: routing keys.
        event_id: the event's id (given by the publisher or generated).
        prefix: compact JSON of the event minus its final ``}``, ending in
            ``"seq":``; the full text is ``prefix + str(seq) + "}"``.
    """

    hub: str
    site_id: str
    user_id: str | None
    event_id: str
    prefix: str


@dataclass(frozen=True, slots=True, kw_only=True)
class NumberedEvent:
    """An event with its seq, as every node receives it."""

    hub: str
    site_id: str
    user_id: str | None
    event_id: str
    seq: int
    text: str
    #: Identifies the backplane's numbering: it changes when the backplane lost
    #: its data (a Redis restarted without persistence) and seqs start over.
    epoch: str = ""
    #: Only in what ``publish`` returns: the id was already accepted within the
    #: dedupe window, ``seq`` is the original one and nothing was broadcast.
    is_duplicate: bool = False


def number(
    event: PendingEvent, seq: int, epoch: str, *, is_duplicate: bool = False
) -> NumberedEvent:
    """``event`` with its seq: what a backplane returns for it and broadcasts."""
    return NumberedEvent(
        hub=event.hub,
        site_id=event.site_id,
        user_id=event.user_id,
        event_id=event.event_id,
        seq=seq,
        text=f"{event.prefix}{seq}}}",
        epoch=epoch,
        is_duplicate=is_duplicate,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class History:
    """What a site's history holds after a given seq.

    Attributes:
        events: events with ``seq > after``, in order (all users of the site).
        first_seq: the oldest seq still kept, or None when the history is empty.
        last_seq: the newest seq assigned so far for the site and hub (0 if none).
        epoch: the numbering these seqs belong to (see ``NumberedEvent.epoch``).
    """

    events: Sequence[NumberedEvent]
    first_seq: int | None
    last_seq: int
    epoch: str = ""


class Backplane(Protocol):
    """Numbering, history and cross-node fan-out (see the module docstring)."""

    async def publish(self, events: Sequence[PendingEvent]) -> list[NumberedEvent]:
        """Number, store and broadcast ``events`` atomically, in order.

        Returns one numbered event per pending one, in order; an id accepted
        within the dedupe window comes back with its original seq and
        ``is_duplicate`` set, and is not broadcast again (see the module
        docstring). Raises ``BackplaneUnavailable`` when nothing was accepted,
        ``PublishOutcomeUnknown`` when the outcome is unknown (the publisher
        should retry with the same ids in both cases); never another exception
        type for a backplane failure.
        """
        ...

    async def history(self, hub: str, site_id: str, after_seq: int) -> History:
        """Events of (hub, site) with ``seq > after_seq`` still kept, oldest first."""
        ...

    async def aclose(self) -> None:
        """Release what ``run`` did not (connections opened for publishes and history)."""
        ...

    async def run(
        self,
        deliver: Callable[[Sequence[NumberedEvent]], None],
        on_reconnect: Callable[[], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Receive every event published by any node and call ``deliver`` (sync) in order.

        Calls ``task_status.started()`` once subscribed. Runs until cancelled and
        reconnects by itself, with backoff; after each re-subscription it calls
        ``on_reconnect`` (sync), so the caller can fetch from ``history`` what
        was published while it was away. Events of one ``publish`` call arrive
        in one ``deliver`` call.
        """
        ...

    @property
    def is_available(self) -> bool:
        """False while the backplane cannot be reached (``/readyz`` reports it)."""
        ...
