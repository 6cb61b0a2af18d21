"""One contract for every permission store: SQLite, in memory, Redis and the backend's URL.

Each store runs on its real parts: a SQLite file, a real redis-server (each
test under its own key prefix), and for the URL store a real HTTP server on
127.0.0.1 (``role_backend``) whose roles the test changes, sending the store
the change notice the backend would.

- The lookup contract (all four): ``role_of``, ``version``, ``is_available``.
- The members contract (the three that hold roles themselves): ``grant``,
  ``grant_many``, ``revoke``, ``list`` and their validation.
- The change-feed contract (Redis and URL): every change reaches
  ``watch_changes``, named, with the store's version.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from hubserver.permissions import (
    MAX_ID_CHARS,
    ChangeFeed,
    InMemoryPermissionStore,
    Member,
    PermissionChange,
    PermissionStore,
    RedisPermissionStore,
    Role,
    SqlitePermissionStore,
    UrlPermissionStore,
)

from .redis_fixture import RedisServer, redis_server_fixture  # noqa: F401 (a fixture)
from .role_backend import RoleBackend, role_backend

ME, OTHER = "subject-1", "subject-2"
ALL_STORES = ["sqlite", "memory", "redis", "url"]
MEMBER_STORES = ["sqlite", "memory", "redis"]
FEED_STORES = ["redis", "url"]


class Roles:
    """A store under test, and the way its roles change (what the CLI or the backend does)."""

    def __init__(self, store: PermissionStore) -> None:
        self.store = store

    async def grant(self, site_id: str, subject: str, role: Role) -> None:
        raise NotImplementedError

    async def grant_many(self, grants: Iterable[tuple[str, str, Role]]) -> int:
        raise NotImplementedError

    async def revoke(self, site_id: str, subject: str) -> bool:
        raise NotImplementedError

    async def list(self, site_id: str | None = None) -> builtins.list[Member]:
        raise NotImplementedError


class LocalRoles(Roles):
    """SQLite and in memory: their own synchronous members API."""

    store: SqlitePermissionStore | InMemoryPermissionStore

    async def grant(self, site_id: str, subject: str, role: Role) -> None:
        self.store.grant(site_id, subject, role)

    async def grant_many(self, grants: Iterable[tuple[str, str, Role]]) -> int:
        return self.store.grant_many(grants)

    async def revoke(self, site_id: str, subject: str) -> bool:
        return self.store.revoke(site_id, subject)

    async def list(self, site_id: str | None = None) -> builtins.list[Member]:
        return self.store.list(site_id)


class RedisRoles(Roles):
    store: RedisPermissionStore

    async def grant(self, site_id: str, subject: str, role: Role) -> None:
        await self.store.grant(site_id, subject, role)

    async def grant_many(self, grants: Iterable[tuple[str, str, Role]]) -> int:
        return await self.store.grant_many(grants)

    async def revoke(self, site_id: str, subject: str) -> bool:
        return await self.store.revoke(site_id, subject)

    async def list(self, site_id: str | None = None) -> builtins.list[Member]:
        return await self.store.list(site_id)


class BackendRoles(Roles):
    """The backend owns the roles; it tells the store of each change."""

    store: UrlPermissionStore

    def __init__(self, store: UrlPermissionStore, backend: RoleBackend) -> None:
        super().__init__(store)
        self.backend = backend

    async def grant(self, site_id: str, subject: str, role: Role) -> None:
        self.backend.roles[site_id, subject] = role.value
        await self.store.announce(site_id, subject)

    async def revoke(self, site_id: str, subject: str) -> bool:
        if self.backend.roles.pop((site_id, subject), None) is None:
            return False
        await self.store.announce(site_id, subject)
        return True


async def _open(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Roles]:
    if kind == "memory":
        yield LocalRoles(InMemoryPermissionStore())
    elif kind == "sqlite":
        with SqlitePermissionStore.open(tmp_path) as sqlite_store:
            yield LocalRoles(sqlite_store)
    elif kind == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"test-{uuid.uuid4().hex}"
        async with RedisPermissionStore(redis.url, key_prefix=prefix) as redis_store:
            yield RedisRoles(redis_store)
    else:
        async with role_backend() as backend:
            url_store = UrlPermissionStore(backend.url(), ttl=60)
            try:
                yield BackendRoles(url_store, backend)
            finally:
                await url_store.aclose()


@pytest.fixture(params=ALL_STORES)
async def roles(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Roles]:
    async for opened in _open(request.param, request, tmp_path):
        yield opened


@pytest.fixture(params=MEMBER_STORES)
async def members(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Roles]:
    async for opened in _open(request.param, request, tmp_path):
        yield opened


@pytest.fixture(params=FEED_STORES)
async def feed(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Roles]:
    async for opened in _open(request.param, request, tmp_path):
        yield opened


# --- the lookup contract: every store ----------------------------------------------------------


async def test_every_store_satisfies_the_protocol(roles: Roles) -> None:
    # Checked by mypy for the classes; here for the instances.
    store: PermissionStore = roles.store
    assert store.is_available
    assert isinstance(store, ChangeFeed) == (not isinstance(roles, LocalRoles))


async def test_grant_replace_revoke(roles: Roles) -> None:
    store = roles.store
    assert await store.role_of("s1", ME) is None
    await roles.grant("s1", ME, Role.SITE_USER)
    assert await store.role_of("s1", ME) is Role.SITE_USER
    assert await store.role_of("s2", ME) is None  # roles are per site
    await roles.grant("s1", ME, Role.SITE_ADMIN)  # one role per subject per site: replaces
    assert await store.role_of("s1", ME) is Role.SITE_ADMIN
    assert await roles.revoke("s1", ME) is True
    assert await store.role_of("s1", ME) is None
    assert await roles.revoke("s1", ME) is False


async def test_every_role_round_trips(roles: Roles) -> None:
    for index, role in enumerate(Role):
        await roles.grant(f"site-{index}", ME, role)
    for index, role in enumerate(Role):
        assert await roles.store.role_of(f"site-{index}", ME) is role


async def test_ids_with_separators_and_unicode_stay_apart(roles: Roles) -> None:
    # Keys are built from ids: a colon or a space must not make two pairs meet.
    await roles.grant("a:b", "c", Role.SITE_ADMIN)
    await roles.grant("a", "b:c", Role.SITE_USER)
    await roles.grant("sité 1", "ü ser", Role.SITE_SUPER_USER)
    assert await roles.store.role_of("a:b", "c") is Role.SITE_ADMIN
    assert await roles.store.role_of("a", "b:c") is Role.SITE_USER
    assert await roles.store.role_of("a:b:c", "") is None
    assert await roles.store.role_of("sité 1", "ü ser") is Role.SITE_SUPER_USER


async def test_role_of_unknown_is_none(roles: Roles) -> None:
    store = roles.store
    await roles.grant("s1", ME, Role.SITE_ADMIN)
    assert await store.role_of("unknown-site", ME) is None
    assert await store.role_of("s1", "unknown-subject") is None
    # Ids that could never be granted are simply unknown, not an error.
    assert await store.role_of("", ME) is None
    assert await store.role_of("s" * (MAX_ID_CHARS + 1), ME) is None
    # A lone surrogate (a JSON "\ud800" in a token's sub) has no UTF-8 form to look up.
    assert await store.role_of("s1", "\ud800") is None
    assert await store.role_of("\udfff", ME) is None


async def test_version_changes_only_on_change(roles: Roles) -> None:
    store = roles.store
    start = await store.version()
    assert await store.version() == start
    await roles.grant("s1", ME, Role.SITE_USER)
    granted = await store.version()
    assert granted != start
    await store.role_of("s1", ME)
    assert await roles.revoke("s1", OTHER) is False  # nothing changed, nothing to re-check
    assert await store.version() == granted
    await roles.revoke("s1", ME)
    assert await store.version() != granted
    assert store.is_available


# --- the members contract: the stores that hold roles themselves ------------------------------


async def test_list(members: Roles) -> None:
    assert await members.list() == []
    before = datetime.now(UTC)
    await members.grant("s2", OTHER, Role.SITE_USER)
    await members.grant("s1", OTHER, Role.SITE_SUPER_USER)
    await members.grant("s1", ME, Role.SITE_ADMIN)
    listed = await members.list()
    assert [(m.site_id, m.subject, m.role) for m in listed] == [
        ("s1", ME, Role.SITE_ADMIN),
        ("s1", OTHER, Role.SITE_SUPER_USER),
        ("s2", OTHER, Role.SITE_USER),
    ]
    assert all(isinstance(m, Member) and before <= m.granted_at for m in listed)
    assert await members.list("s2") == listed[2:]
    assert await members.list("nowhere") == []
    await members.revoke("s2", OTHER)
    assert await members.list("s2") == []
    assert len(await members.list()) == 2


async def test_grant_many_is_one_change_all_or_nothing(members: Roles) -> None:
    store = members.store
    await members.grant("s1", ME, Role.SITE_USER)
    start = await store.version()
    grants = [(f"s{index}", ME, Role.SITE_ADMIN) for index in range(1, 6)]
    grants.append(("s2", OTHER, Role.SITE_USER))
    assert await members.grant_many(grants) == 6
    # One version step for the lot: a server re-checks its connections once.
    assert await store.version() == start + 1
    assert await store.role_of("s1", ME) is Role.SITE_ADMIN  # replaced, like grant
    assert [(m.site_id, m.subject, m.role) for m in await members.list("s2")] == [
        ("s2", ME, Role.SITE_ADMIN),
        ("s2", OTHER, Role.SITE_USER),
    ]

    # A bad row anywhere: nothing of the call is written, and the version stays.
    bad = [("s7", ME, Role.SITE_ADMIN), ("s8", "", Role.SITE_ADMIN)]
    with pytest.raises(ValueError, match="grant 1: subject must be a non-empty string"):
        await members.grant_many(bad)
    with pytest.raises(ValueError, match="grant 0: role must be a Role"):
        await members.grant_many([("s9", ME, "site_admin")])  # type: ignore[list-item]
    assert await store.role_of("s7", ME) is None
    assert await store.version() == start + 1
    assert await members.grant_many([]) == 0
    assert await store.version() == start + 1


@pytest.mark.parametrize(
    ("site_id", "subject", "message"),
    [
        ("", ME, "site_id must be a non-empty string"),
        ("s" * (MAX_ID_CHARS + 1), ME, f"at most {MAX_ID_CHARS} characters"),
        (42, ME, "site_id .* got a int"),
        ("s1", "", "subject must be a non-empty string"),
        ("s1", None, "subject .* got a NoneType"),
    ],
)
async def test_ids_are_validated(members: Roles, site_id: str, subject: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        await members.grant(site_id, subject, Role.SITE_USER)
    with pytest.raises(ValueError, match=message):
        await members.revoke(site_id, subject)
    assert await members.list() == []


async def test_longest_id_is_accepted(members: Roles) -> None:
    longest = "s" * MAX_ID_CHARS
    await members.grant(longest, longest, Role.SITE_USER)
    assert [m.site_id for m in await members.list(longest)] == [longest]
    assert await members.store.role_of(longest, longest) is Role.SITE_USER


async def test_role_and_list_filter_are_validated(members: Roles) -> None:
    with pytest.raises(ValueError, match="role must be a Role, got a str"):
        await members.grant("s1", ME, "site_admin")  # type: ignore[arg-type]  # the point
    with pytest.raises(ValueError, match="site_id must be"):
        await members.list("")
    assert await members.list() == []


# --- the change-feed contract: Redis and the backend's URL ------------------------------------


async def _next_change(changes: trio.MemoryReceiveChannel[PermissionChange]) -> PermissionChange:
    with trio.fail_after(5):
        return await changes.receive()


async def test_every_change_is_announced_with_its_pair_and_version(
    feed: Roles, nursery: trio.Nursery
) -> None:
    store = feed.store
    assert isinstance(store, ChangeFeed)
    send, changes = trio.open_memory_channel[PermissionChange](100)
    nursery.start_soon(store.watch_changes, send.send_nowait)
    await trio.sleep(0.2)  # subscribed (Redis): notices before that are not promised

    await feed.grant("s1", ME, Role.SITE_ADMIN)
    change = await _next_change(changes)
    assert change.pairs == {("s1", ME)}
    assert change.version == await store.version()

    await feed.revoke("s1", ME)
    change = await _next_change(changes)
    assert change.pairs == {("s1", ME)}
    assert change.version == await store.version()

    # A notice for a change made elsewhere (the backend's, or an operator's).
    await store.announce("s2", OTHER)
    change = await _next_change(changes)
    assert change.pairs == {("s2", OTHER)}
    with trio.move_on_after(0.3):
        extra = await changes.receive()
        raise AssertionError(f"one notice per change, got also {extra}")
