"""The server's shared parts, passed explicitly (no global state)."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from .auth import TokenVerifier
from .config import ServerConfig
from .connection import HubSession, SessionContext, SessionStats
from .metrics import Metrics
from .permissions import (
    CachedPermissionStore,
    ChangeFeed,
    ChangeQueue,
    PermissionChange,
    PermissionStoreUnavailable,
    Role,
    may_subscribe,
)
from .routing import Broker, GroupKey, Router
from .transports.negotiate import Negotiations

if TYPE_CHECKING:
    from .http._accept import ConnectionGate

__all__ = ["ADMIN_SCOPE", "App", "HUB_SCOPE", "PUBLISH_SCOPE"]

log = logging.getLogger("hubserver")

#: The scope the reference requires for the hubs, and ours for the publish API.
HUB_SCOPE = "user_api.full_access"
PUBLISH_SCOPE = "event_streaming.publish"
#: The scope of the access-control backend's change notices (``/v1/permissions/changed``).
ADMIN_SCOPE = "event_streaming.admin"


@dataclass(slots=True, kw_only=True)
class App:
    """Everything a request handler needs; one per server."""

    config: ServerConfig
    verifier: TokenVerifier
    store: CachedPermissionStore
    router: Router
    broker: Broker
    stats: SessionStats = field(default_factory=SessionStats)
    #: None with ``--metrics off``: nothing is observed or served.
    metrics: Metrics | None
    negotiations: Negotiations = field(default_factory=Negotiations)
    is_ready: bool = False
    is_draining: bool = False
    #: What sessions share; set by the server once its connection nursery is open.
    sessions: SessionContext | None = None
    #: HTTP requests being handled (the drain waits for their answers).
    requests_in_flight: int = 0
    #: Set by the drain; fired when the last request in flight is answered.
    requests_done: trio.Event | None = None
    #: The accept loop's connection counts; set by the server once it listens.
    connections: ConnectionGate | None = None
    #: The store behind ``store`` when it announces changes to every node.
    permission_feed: ChangeFeed | None = None
    #: Change notices for the permission watcher (which re-checks open connections).
    permission_changes: ChangeQueue = field(default_factory=ChangeQueue)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    #: Open hub connections per token subject (``--max-hub-connections-per-subject``).
    _hubs_by_subject: dict[str, int] = field(default_factory=dict)

    def request_done(self) -> None:
        self.requests_in_flight -= 1
        if self.requests_in_flight == 0 and self.requests_done is not None:
            self.requests_done.set()

    def next_id(self) -> int:
        return next(self._ids)

    def session_context(self) -> SessionContext:
        if self.sessions is None:
            raise RuntimeError("the server is not running")
        return self.sessions

    def join(self, session: HubSession) -> None:
        key = session.key
        if key is not None:  # a publisher's connection joins no group
            self.router.add(key, session)
            self.broker.watch_site(key.hub, key.site_id)

    def leave(self, session: HubSession) -> None:
        if session.key is not None:
            self.router.remove(session.key, session)

    async def may_open(self, key: GroupKey, subject: str) -> bool:
        """The site-role rule for opening ``key`` (unknown site and no role look alike)."""
        role: Role | None = await self.store.role_of(key.site_id, subject)
        return may_subscribe(role, subject=subject, user_id=key.user_id)

    async def permissions_changed(self, site_id: str, subject: str) -> bool:
        """A change notice: re-check the pair's open connections, on every node if possible.

        Returns:
            True if every node was told; False if only this node could be (the
            store could not reach the others).
        """
        if self.permission_feed is None:
            await trio.lowlevel.checkpoint()
            self.permission_changes.put(PermissionChange(pairs=frozenset({(site_id, subject)})))
            return True
        try:
            await self.permission_feed.announce(site_id, subject)
        except PermissionStoreUnavailable as exc:
            log.warning(
                "a permission change notice reached this node only: %s",
                exc,
                extra={"event": "permission_notice_local_only"},
            )
            return False
        return True

    def hub_opened(self, subject: str) -> bool:
        """Count a hub connection of ``subject``; False (and not counted) over the limit.

        Every True must be matched by one ``hub_closed`` when that connection ends.
        """
        count = self._hubs_by_subject.get(subject, 0)
        limit = self.config.max_hub_connections_per_subject
        if limit and count >= limit:
            return False
        self._hubs_by_subject[subject] = count + 1
        return True

    def hub_closed(self, subject: str) -> None:
        """A hub connection counted by ``hub_opened`` ended."""
        count = self._hubs_by_subject.get(subject, 0) - 1
        if count > 0:
            self._hubs_by_subject[subject] = count
        else:
            # Forgotten at zero: the map holds only subjects with open connections.
            self._hubs_by_subject.pop(subject, None)
