"""The broker: numbers events per site and hub, and fans them out.

``Broker`` is the seam between the publish API and delivery. ``LocalBroker``
is the in-process default: a sequence counter per (hub, site) and a
``Router`` for the local subscribers. A backplane broker puts the numbering
and the fan-out across nodes behind the same interface.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hubcore import Invocation, PreparedBatch, PreparedMessage

from ._events import PublishError
from ._groups import Delivery, GroupKey, Hub, Router

__all__ = ["Broker", "LocalBroker", "StreamEvent", "deliver_to", "encode_event"]

#: The client method every event is delivered to (the reference's samples).
TARGET = "ReceiveMessage"

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEvent:
    """One published event, numbered and encoded for delivery.

    ``message`` is the ``ReceiveMessage`` invocation carrying ``text`` (the
    event as compact JSON), prepared once for every recipient.
    """

    hub: Hub
    site_id: str
    user_id: str | None
    event_id: str
    seq: int
    text: str
    message: PreparedMessage
    delivery: Delivery


def encode_event(hub: Hub, event: dict[str, object], seq: int) -> StreamEvent:
    """Add ``id`` (if absent) and ``seq`` to a validated event and prepare it."""
    event_id = event.get("id")
    if event_id is None:
        event_id = event["id"] = uuid.uuid4().hex
    event["seq"] = seq
    text = _compact(event)
    if not text.isascii():
        # A lone surrogate ("\ud800" is valid JSON) cannot go out as UTF-8, and
        # delivery encodes lazily: fail here, while publish can still undo it all.
        text.encode("utf-8")
    user_id = event.get("user_id")
    message = PreparedMessage(Invocation(target=TARGET, arguments=(text,)))
    return StreamEvent(
        hub=hub,
        site_id=str(event["site_id"]),
        user_id=user_id if type(user_id) is str else None,
        event_id=str(event_id),
        seq=seq,
        text=text,
        message=message,
        delivery=Delivery(message),
    )


def deliver_to(router: Router, stream: list[StreamEvent], now: float) -> int:
    """Group ``stream`` by site and site-user group, in order, and dispatch; returns deliveries."""
    if len(stream) == 1:
        event = stream[0]
        count = router.dispatch(GroupKey(event.hub, event.site_id), event.delivery, now)
        if event.user_id is not None:
            key = GroupKey(event.hub, event.site_id, event.user_id)
            count += router.dispatch(key, event.delivery, now)
        return count
    groups: dict[GroupKey, list[StreamEvent]] = {}
    for event in stream:
        groups.setdefault(GroupKey(event.hub, event.site_id), []).append(event)
        if event.user_id is not None:
            groups.setdefault(GroupKey(event.hub, event.site_id, event.user_id), []).append(event)
    count = 0
    for key, events in groups.items():
        if not router.count(key):
            continue
        delivery = (
            events[0].delivery
            if len(events) == 1
            else Delivery(PreparedBatch([event.message for event in events]))
        )
        count += router.dispatch(key, delivery, now)
    return count


class Broker(Protocol):
    """Where the publish API hands validated events."""

    async def publish(self, hub: Hub, events: list[dict[str, object]]) -> list[StreamEvent]:
        """Number, encode and deliver ``events`` in order; all or nothing."""
        ...


class LocalBroker:
    """The in-process broker: one process, one sequence counter per site and hub.

    Args:
        router: the local subscriber groups.
        clock: the caller's monotonic clock (``trio.current_time`` in the server).
    """

    def __init__(self, router: Router, clock: Callable[[], float]) -> None:
        self._router = router
        self._clock = clock
        self._seq: dict[tuple[Hub, str], int] = {}
        self.deliveries = 0

    def next_seq(self, hub: Hub, site_id: str) -> int:
        seq = self._seq.get((hub, site_id), 0) + 1
        self._seq[(hub, site_id)] = seq
        return seq

    async def publish(self, hub: Hub, events: list[dict[str, object]]) -> list[StreamEvent]:
        # Numbering and encoding happen before any delivery, so a value that
        # cannot be encoded fails the whole request with nothing sent.
        saved = dict(self._seq)
        stream: list[StreamEvent] = []
        try:
            for event in events:
                stream.append(encode_event(hub, event, self.next_seq(hub, str(event["site_id"]))))
        except (TypeError, ValueError) as exc:
            self._seq = saved
            index = len(stream)
            raise PublishError(
                f"event {index}: cannot be encoded ({type(exc).__name__})", index=index
            ) from exc
        self.deliver(stream)
        return stream

    def deliver(self, stream: list[StreamEvent]) -> None:
        """Hand numbered events to local subscribers (site, then site-user group).

        Events of one publish that go to the same group travel together: each
        subscriber gets them as one joined payload in one write.
        """
        self.deliveries += deliver_to(self._router, stream, self._clock())
