"""What every connection of a server shares: one object, so a connection stays small."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from hubcore import HubLimits
from hubserver.backplane import NumberedEvent
from hubserver.routing import Hub, Replay
from hubserver.timers import TimerQueue

if TYPE_CHECKING:
    from ._session import HubSession

__all__ = ["PublishFn", "ReplayFn", "SessionContext", "SessionStats"]

ReplayFn = Callable[[Hub, str, int], Awaitable[Replay]]
PublishFn = Callable[[Hub, list[dict[str, object]]], Awaitable[list[NumberedEvent]]]


@dataclass(slots=True)
class SessionStats:
    """Counters shared by all connections of a server (read by tests and /metrics).

    ``by_id`` holds every registered connection: from before its 101 goes
    out (so role changes and the drain reach it) until its task ends.
    """

    open: int = 0
    opened: int = 0
    slow_closed: int = 0
    expired_closed: int = 0
    revoked_closed: int = 0
    protocol_errors: int = 0
    #: Connections ended by a bug of ours (logged with their id).
    crashed: int = 0
    #: Publisher hub calls refused or failed (fire-and-forget ones included).
    publish_failed: int = 0
    #: For /metrics (see ``hubserver.metrics``): plain counters where things
    #: pass, read at each scrape. Events accepted and refused by (hub, api).
    published: dict[tuple[str, str], int] = field(default_factory=dict)
    rejected: dict[tuple[str, str], int] = field(default_factory=dict)
    opened_by_hub: dict[str, int] = field(default_factory=dict)
    handshake_failed: int = 0
    handshake_timed_out: int = 0
    client_timed_out: int = 0
    drain_closed: int = 0
    replayed: int = 0
    gaps: int = 0

    def count(self, table: dict[tuple[str, str], int], hub: str, api: str, events: int) -> None:
        key = (hub, api)
        table[key] = table.get(key, 0) + events
    by_id: dict[int, HubSession] = field(default_factory=dict)
    #: Set by the server when it drains; fired when the last connection ends.
    drained: trio.Event | None = None

    def register(self, session: HubSession) -> None:
        """Known to role changes and the drain from now on (before the 101 goes out)."""
        self.open += 1
        self.opened += 1
        self.by_id[session.session_id] = session

    def unregister(self, session: HubSession) -> None:
        if self.by_id.pop(session.session_id, None) is not None:
            self.open -= 1
            if self.open == 0 and self.drained is not None:
                self.drained.set()


@dataclass(slots=True, kw_only=True)
class SessionContext:
    """What every connection of a server shares.

    Attributes:
        limits: hubcore's limits and timers.
        max_outbox_bytes: one connection's output budget (every queued byte).
        slow_client_timeout: how long output may stay over the budget
            before the client is closed as too slow.
        resume_window: how long live events wait for a ``Resume`` after a
            handshake.
        join / leave: add to / remove from the router (once each).
        replay: fetches history for a resume.
        tasks: the nursery that runs connections' helper tasks (each under
            its connection's guard); it outlives every connection.
        publish: the broker's publish, for publisher connections.
        publisher_limits: hubcore's limits for publisher connections (a
            message may be as large as a publish request's body).
    """

    limits: HubLimits
    max_outbox_bytes: int
    resume_window: float
    join: Callable[[HubSession], None]
    leave: Callable[[HubSession], None]
    replay: ReplayFn
    stats: SessionStats
    timers: TimerQueue
    tasks: trio.Nursery
    slow_client_timeout: float = 5.0
    #: How long a stateful connection waits for its client's new transport (spec §8).
    stateful_reconnect_window: float = 30.0
    publish: PublishFn | None = None
    #: Told how long each publisher hub call took (seconds), for /metrics.
    publish_latency: Callable[[float], None] | None = None
    publisher_limits: HubLimits | None = None
