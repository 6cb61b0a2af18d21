"""The `PermissionStore` seam, its error, and the in-memory implementation."""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

import trio

from hubcore._errors import HubError

from ._model import Member, Role, check_id, check_role

__all__ = [
    "ChangeFeed",
    "InMemoryPermissionStore",
    "PermissionChange",
    "PermissionStore",
    "PermissionStoreError",
    "PermissionStoreUnavailable",
]


class PermissionStoreError(HubError):
    """The permission store could not answer (database error, closed store, backend down)."""


class PermissionStoreUnavailable(PermissionStoreError):
    """A lookup failed or missed its deadline; the same call may succeed later.

    Raised by `PermissionStore.role_of` and `PermissionStore.version` for any
    failure of the store behind them (a locked or corrupt database, an I/O
    error, a closed store). The server keeps open connections on their last
    known roles and refuses new ones with 503 and ``Retry-After`` meanwhile.
    """


class PermissionStore(Protocol):
    """Where the server learns roles; SQLite now, the access-control backend later."""

    async def role_of(self, site_id: str, subject: str) -> Role | None:
        """Return the subject's role on the site, or None if it has none.

        Raises:
            PermissionStoreUnavailable: the store could not answer in time.
        """
        ...

    async def version(self) -> int:
        """Return a number that changes whenever any grant or revoke happened.

        The server polls this and re-checks every open connection when it
        changes, so a revoke reaches open connections within seconds.

        Raises:
            PermissionStoreUnavailable: the store could not answer in time.
        """
        ...

    @property
    def is_available(self) -> bool:
        """False since a lookup failed, until one succeeds (``/readyz`` reports it)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class PermissionChange:
    """A change notice: some subjects' roles on some sites may have changed.

    Attributes:
        pairs: the ``(site_id, subject)`` pairs concerned; None when it is not
            known which (a notice that could not name them all, notices that
            may have been lost): then every open connection is re-checked.
        version: the store's `PermissionStore.version` right after this
            change, when the store numbers its changes one by one (a notice
            whose number skips one tells the watcher that a notice was lost);
            None for a notice that changed no version.
    """

    pairs: frozenset[tuple[str, str]] | None
    version: int | None = None


@runtime_checkable
class ChangeFeed(Protocol):
    """What a store that hears of changes as they happen offers beside `PermissionStore`.

    A store shared by several nodes (Redis, the access-control backend) tells
    each node what changed, so a node re-checks only the connections concerned,
    at once, instead of everyone at its next version poll. The version poll
    stays as the safety net for notices lost on the way.
    """

    async def watch_changes(self, on_change: Callable[[PermissionChange], None]) -> None:
        """Report every change made on any node through ``on_change``, until cancelled.

        ``on_change`` is also called with ``pairs=None`` whenever notices may
        have been missed (a subscription lost and made again). Never raises for
        the store's own failures: it retries.
        """
        ...

    async def announce(self, site_id: str, subject: str) -> None:
        """Tell every node (this one included) that ``subject``'s role on ``site_id`` changed.

        Every node drops what it cached of that pair and re-checks the open
        connections concerned. What the store's ``watch_changes`` reports of it
        is how this node learns it, too.

        Raises:
            PermissionStoreUnavailable: the other nodes could not be told; the
                caller should apply the change on this node itself.
        """
        ...


class InMemoryPermissionStore:
    """A dict-backed `PermissionStore` for embedding and for tests of other components."""

    def __init__(self) -> None:
        self._members: dict[tuple[str, str], Member] = {}
        self._version = 0

    async def role_of(self, site_id: str, subject: str) -> Role | None:
        """See `PermissionStore.role_of`."""
        # Checkpoint like the SQLite store does, so callers behave the same on both.
        await trio.lowlevel.checkpoint()
        member = self._members.get((site_id, subject))
        return None if member is None else member.role

    async def version(self) -> int:
        """See `PermissionStore.version`."""
        await trio.lowlevel.checkpoint()
        return self._version

    @property
    def is_available(self) -> bool:
        """Always True: a dict cannot fail."""
        return True

    def grant(self, site_id: str, subject: str, role: Role) -> None:
        """Give ``subject`` ``role`` on ``site_id``, replacing any role it had there.

        Raises:
            ValueError: an id is empty, too long or not a string, or role is not a Role.
        """
        key = (check_id("site_id", site_id), check_id("subject", subject))
        self._members[key] = Member(
            site_id=site_id, subject=subject, role=check_role(role), granted_at=datetime.now(UTC)
        )
        self._version += 1

    def grant_many(self, grants: Iterable[tuple[str, str, Role]]) -> int:
        """Give each ``(site_id, subject, role)`` at once, with one version change.

        Returns:
            How many rows were given.

        Raises:
            ValueError: an id is empty, too long or not a string, or a role is
                not a Role (naming the row by its index); nothing is given.
        """
        members = []
        for index, (site_id, subject, role) in enumerate(grants):
            try:
                key = (check_id("site_id", site_id), check_id("subject", subject))
                members.append((key, check_role(role)))
            except ValueError as exc:
                raise ValueError(f"grant {index}: {exc}") from exc
        if not members:
            return 0
        granted_at = datetime.now(UTC)
        for (site, subject), role in members:
            self._members[site, subject] = Member(
                site_id=site, subject=subject, role=role, granted_at=granted_at
            )
        self._version += 1
        return len(members)

    def revoke(self, site_id: str, subject: str) -> bool:
        """Remove ``subject``'s role on ``site_id``; False if it had none.

        Raises:
            ValueError: an id is empty, too long or not a string.
        """
        key = (check_id("site_id", site_id), check_id("subject", subject))
        if self._members.pop(key, None) is None:
            return False
        self._version += 1
        return True

    def list(self, site_id: str | None = None) -> builtins.list[Member]:
        """Return the members of one site (or of all sites), sorted by site and subject.

        Raises:
            ValueError: ``site_id`` is given but empty, too long or not a string.
        """
        if site_id is not None:
            check_id("site_id", site_id)
        return [
            member
            for key, member in sorted(self._members.items())
            if site_id is None or key[0] == site_id
        ]
