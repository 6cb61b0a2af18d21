"""A cache of site roles in front of a ``PermissionStore``.

Every hub connection asks for a role; the SQLite store answers from a worker
thread, which cost a quarter of the server's CPU per connection in the
``connect`` bench. Answers are reused until the store's ``version`` changes
(the server polls it every second to re-check open connections anyway) and
for at most ``max_age`` seconds, so a grant or revoke is seen as fast as
before. A change notice drops the answers it names (`forget`) at once.

An answer whose lookup was under way while answers were dropped is returned
but not kept: it may predate the change that dropped them.
"""

from __future__ import annotations

from typing import Final

import trio

from ._model import Role
from ._store import PermissionStore

__all__ = ["CachedPermissionStore"]

DEFAULT_MAX_AGE: Final = 1.0
#: Answers live ``max_age`` (1 s): more entries than lookups in a second are
#: dead weight, and each distinct (site, subject) of a hostile client is one.
DEFAULT_MAX_ENTRIES: Final = 10_000


class CachedPermissionStore:
    """A ``PermissionStore`` that remembers answers until the grants change."""

    def __init__(
        self,
        inner: PermissionStore,
        *,
        max_age: float = DEFAULT_MAX_AGE,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self._inner = inner
        self._max_age = max_age
        self._max_entries = max_entries
        self._roles: dict[tuple[str, str], tuple[Role | None, float]] = {}
        self._version: int | None = None
        # Bumped whenever answers are dropped; see the module docstring.
        self._generation = 0

    async def role_of(self, site_id: str, subject: str) -> Role | None:
        key = (site_id, subject)
        entry = self._roles.get(key)
        now = trio.current_time()
        if entry is not None and now - entry[1] < self._max_age:
            await trio.lowlevel.checkpoint()
            return entry[0]
        generation = self._generation
        role = await self._inner.role_of(site_id, subject)
        if generation != self._generation:
            return role
        roles = self._roles
        if len(roles) >= self._max_entries:
            # Expired answers go first; if every answer is fresh, all go: the
            # cache only saves store lookups, and its memory stays bounded.
            fresh = {k: v for k, v in roles.items() if now - v[1] < self._max_age}
            roles = self._roles = fresh if len(fresh) < self._max_entries // 2 else {}
        roles[key] = (role, now)
        return role

    async def version(self) -> int:
        version = await self._inner.version()
        if version != self._version:
            self._version = version
            self.forget(None)
        return version

    def forget(self, pairs: frozenset[tuple[str, str]] | None) -> None:
        """Drop the answers of these ``(site_id, subject)`` pairs (None: all answers)."""
        self._generation += 1
        if pairs is None:
            self._roles.clear()
            return
        for pair in pairs:
            self._roles.pop(pair, None)

    @property
    def is_available(self) -> bool:
        return self._inner.is_available
