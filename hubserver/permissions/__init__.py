"""Who may subscribe to which stream: roles per site, their store, and the rule.

`may_subscribe` is the pure rule; a `PermissionStore` answers `role_of` and a
`version` the server polls to re-check open connections after a revoke.
`SqlitePermissionStore` is the store shared with the ``hubserver members`` CLI
(see `hubserver.permissions.cli`); `InMemoryPermissionStore` is for embedding
and tests. `watch_permissions` is that poll, surviving store outages.
"""

from __future__ import annotations

from ._cached import CachedPermissionStore
from ._model import MAX_ID_CHARS, Member, Role, may_subscribe, parse_role
from ._sqlite import SqlitePermissionStore
from ._store import (
    InMemoryPermissionStore,
    PermissionStore,
    PermissionStoreError,
    PermissionStoreUnavailable,
)
from ._watch import watch_permissions

__all__ = [
    "MAX_ID_CHARS",
    "CachedPermissionStore",
    "InMemoryPermissionStore",
    "Member",
    "PermissionStore",
    "PermissionStoreError",
    "PermissionStoreUnavailable",
    "Role",
    "SqlitePermissionStore",
    "may_subscribe",
    "parse_role",
    "watch_permissions",
]
