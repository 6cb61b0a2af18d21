"""Groups of subscribers: one per (hub, site) and one per (hub, site, user)."""

from __future__ import annotations

import enum
from typing import NamedTuple, Protocol

from hubcore import PreparedBatch, PreparedMessage
from hubserver.transports import server_frame

__all__ = ["Delivery", "GroupKey", "Hub", "Router", "Subscriber"]


class Hub(enum.Enum):
    """The two event hubs; entries and incidents are numbered separately."""

    ENTRIES = "entries"
    INCIDENTS = "incidents"


class GroupKey(NamedTuple):
    """A site stream (``user_id`` None) or a site-user stream."""

    hub: Hub
    site_id: str
    user_id: str | None = None


class Delivery:
    """What one group receives at once: one event, or a run of them from one publish.

    ``payload`` is encoded once per hub protocol, and ``frame`` wraps it in a
    WebSocket frame once per frame type: server frames are unmasked, so every
    recipient with the same protocol gets the very same bytes.
    """

    __slots__ = ("_frames", "count", "payload")

    def __init__(self, payload: PreparedMessage | PreparedBatch) -> None:
        self.payload = payload
        self.count = 1 if type(payload) is PreparedMessage else len(payload.messages)  # type: ignore[union-attr]
        self._frames: dict[int, bytes] = {}

    def frame(self, opcode: int, data: bytes) -> bytes:
        """The WebSocket frame of ``data`` (this delivery's encoding for ``opcode``)."""
        frame = self._frames.get(opcode)
        if frame is None:
            frame = self._frames[opcode] = server_frame(opcode, data)
        return frame


class Subscriber(Protocol):
    """A connection that receives events; ``deliver`` must never block."""

    def deliver(self, delivery: Delivery, now: float) -> None: ...


class Router:
    """Maps groups to their local subscribers and hands each event to them.

    Delivery is synchronous: every subscriber of the group gets the same
    ``PreparedMessage`` (encoded once per protocol) before ``dispatch`` returns,
    so per-group order is dispatch order.
    """

    __slots__ = ("_groups",)

    def __init__(self) -> None:
        # dict as an ordered set: delivery order is subscription order.
        self._groups: dict[GroupKey, dict[Subscriber, None]] = {}

    def add(self, key: GroupKey, subscriber: Subscriber) -> None:
        self._groups.setdefault(key, {})[subscriber] = None

    def remove(self, key: GroupKey, subscriber: Subscriber) -> None:
        members = self._groups.get(key)
        if members is not None:
            members.pop(subscriber, None)
            if not members:
                del self._groups[key]

    def count(self, key: GroupKey) -> int:
        """Subscribers of one group."""
        return len(self._groups.get(key, ()))

    @property
    def subscriber_count(self) -> int:
        return sum(len(members) for members in self._groups.values())

    def dispatch(self, key: GroupKey, delivery: Delivery, now: float) -> int:
        """Hand ``delivery`` to every subscriber of ``key``; returns events delivered."""
        members = self._groups.get(key)
        if not members:
            return 0
        # A subscriber may leave the group while we deliver (a slow one is closed).
        for subscriber in tuple(members):
            subscriber.deliver(delivery, now)
        return len(members) * delivery.count
