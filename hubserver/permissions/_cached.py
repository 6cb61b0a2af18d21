"""A cache of site roles in front of a ``PermissionStore``.

Every hub connection asks for a role; the SQLite store answers from a worker
thread, which cost a quarter of the server's CPU per connection in the
``connect`` bench. Answers are reused until the store's ``version`` changes
(the server polls it every second to re-check open connections anyway) and
for at most ``max_age`` seconds, so a grant or revoke is seen as fast as
before. A change notice drops the answers it names (`forget`) at once.

An answer whose lookup was under way while its pair was forgotten (`forget`:
the re-check of a change's pairs, or of everyone) is neither kept nor
returned: it may predate the change, and that re-check only saw connections
already open, so a connection opened on that answer would keep a revoked
role. The lookup is made again (a few times at most: then
`PermissionStoreUnavailable`).
"""

from __future__ import annotations

from typing import Final

import trio

from ._model import Role
from ._store import PermissionStore, PermissionStoreUnavailable

__all__ = ["CachedPermissionStore"]

DEFAULT_MAX_AGE: Final = 1.0
#: Answers live ``max_age`` (1 s): more entries than lookups in a second are
#: dead weight, and each distinct (site, subject) of a hostile client is one.
DEFAULT_MAX_ENTRIES: Final = 10_000
#: Lookups of one pair whose answers keep being dropped meanwhile, before giving up.
MAX_LOOKUP_ATTEMPTS: Final = 3


class _Lookup:
    """A lookup under way; ``is_stale`` once its pair's answers were dropped meanwhile."""

    __slots__ = ("is_stale",)

    def __init__(self) -> None:
        self.is_stale = False


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
        # The lookups under way, per pair; see the module docstring.
        self._lookups: dict[tuple[str, str], list[_Lookup]] = {}

    async def role_of(self, site_id: str, subject: str) -> Role | None:
        key = (site_id, subject)
        # Before the cache is read, not after: an answer dropped during the
        # checkpoint must not be returned.
        await trio.lowlevel.checkpoint()
        entry = self._roles.get(key)
        now = trio.current_time()
        if entry is not None and now - entry[1] < self._max_age:
            return entry[0]
        for _ in range(MAX_LOOKUP_ATTEMPTS):
            lookup = _Lookup()
            lookups = self._lookups.setdefault(key, [])
            lookups.append(lookup)
            try:
                role = await self._inner.role_of(site_id, subject)
            finally:
                lookups.remove(lookup)
                if not lookups:
                    del self._lookups[key]
            if not lookup.is_stale:
                break
        else:
            raise PermissionStoreUnavailable(
                f"the role kept changing during {MAX_LOOKUP_ATTEMPTS} lookups in a row"
            )
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
            # Answers only, not the lookups under way: the re-check a new version
            # leads to (at once, or when its notice names the pairs) calls
            # `forget` for them. Marking every lookup here would have a stream of
            # unrelated changes make every new connection's lookup give up.
            self._roles.clear()
        return version

    def forget(self, pairs: frozenset[tuple[str, str]] | None) -> None:
        """Drop the answers of these ``(site_id, subject)`` pairs (None: all answers)."""
        if pairs is None:
            self._roles.clear()
            for lookups in self._lookups.values():
                for lookup in lookups:
                    lookup.is_stale = True
            return
        for pair in pairs:
            self._roles.pop(pair, None)
            for lookup in self._lookups.get(pair, ()):
                lookup.is_stale = True

    @property
    def is_available(self) -> bool:
        return self._inner.is_available
