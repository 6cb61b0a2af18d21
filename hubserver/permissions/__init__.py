"""Who may subscribe to which stream: roles per site, their stores, and the rule.

`may_subscribe` is the pure rule; a `PermissionStore` answers `role_of` and a
`version` the server polls to re-check open connections after a revoke.
Three stores hold the roles:

- `SqlitePermissionStore`: a file in the data directory, shared with the
  ``hubserver members`` CLI on the same machine (one node).
- `RedisPermissionStore`: the Redis of the backplane, shared by every node of
  a fleet and by the CLI anywhere.
- `UrlPermissionStore`: the access-control backend, asked over HTTP.

`InMemoryPermissionStore` is for embedding and tests. The Redis and URL
stores are also a `ChangeFeed`: they tell every node what changed at once
(the URL store through a `NoticeRelay`: Redis, or `WorkerNoticeChannel`
between the workers of one node).
`watch_permissions` is the poll and the notices' consumer, surviving store
outages.
"""

from __future__ import annotations

from ._cached import CachedPermissionStore
from ._model import MAX_ID_CHARS, Member, Role, is_id, may_subscribe, parse_role
from ._redis import RedisPermissionStore
from ._relay import NoticeRelay, WorkerNoticeChannel
from ._sqlite import SqlitePermissionStore
from ._store import (
    ChangeFeed,
    InMemoryPermissionStore,
    PermissionChange,
    PermissionStore,
    PermissionStoreError,
    PermissionStoreUnavailable,
)
from ._url import UrlPermissionStore
from ._watch import ChangeQueue, watch_permissions

__all__ = [
    "MAX_ID_CHARS",
    "CachedPermissionStore",
    "ChangeFeed",
    "ChangeQueue",
    "InMemoryPermissionStore",
    "Member",
    "NoticeRelay",
    "PermissionChange",
    "PermissionStore",
    "PermissionStoreError",
    "PermissionStoreUnavailable",
    "RedisPermissionStore",
    "Role",
    "SqlitePermissionStore",
    "UrlPermissionStore",
    "WorkerNoticeChannel",
    "is_id",
    "may_subscribe",
    "parse_role",
    "watch_permissions",
]
