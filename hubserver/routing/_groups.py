"""Groups of subscribers: one per (hub, site) and one per (hub, site, user)."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, NamedTuple, Protocol

from hubcore import PreparedMessage

if TYPE_CHECKING:
    from ._stream import Delivery

__all__ = ["GroupKey", "Hub", "Router", "Subscriber"]


class Hub(enum.Enum):
    """The two event hubs; entries and incidents are numbered separately."""

    ENTRIES = "entries"
    INCIDENTS = "incidents"


class GroupKey(NamedTuple):
    """A site stream (``user_id`` None) or a site-user stream."""

    hub: Hub
    site_id: str
    user_id: str | None = None


class Subscriber(Protocol):
    """A connection that receives events; ``deliver`` and ``notify`` never block."""

    def deliver(self, delivery: Delivery, now: float) -> None: ...

    def notify(self, message: PreparedMessage) -> None:
        """Send a message that is not an event (a ``Gap``)."""
        ...

    def restart_numbering(self) -> None:
        """The backplane's seqs started over: forget positions, tell the client."""
        ...


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

    def sites(self) -> set[tuple[str, str]]:
        """(hub value, site_id) of every site with local subscribers (to it or its users)."""
        return {(key.hub.value, key.site_id) for key in self._groups}

    def keys_of(self, hub: Hub, site_id: str) -> list[GroupKey]:
        """Every group with local subscribers for (hub, site): the site's and its users'."""
        return [key for key in self._groups if key.hub is hub and key.site_id == site_id]

    def restart_numbering(self) -> None:
        """Every subscriber: the backplane lost its data and its seqs start over."""
        for members in list(self._groups.values()):
            for subscriber in tuple(members):
                subscriber.restart_numbering()

    def notify(self, key: GroupKey, message: PreparedMessage) -> None:
        for subscriber in tuple(self._groups.get(key, ())):
            subscriber.notify(message)

    def dispatch(self, key: GroupKey, delivery: Delivery, now: float) -> int:
        """Hand ``delivery`` to every subscriber of ``key``; returns events delivered."""
        members = self._groups.get(key)
        if not members:
            return 0
        # A subscriber may leave the group while we deliver (a slow one is closed).
        for subscriber in tuple(members):
            subscriber.deliver(delivery, now)
        return len(members) * delivery.count
