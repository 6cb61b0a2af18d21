"""The Redis permission store beyond the shared contract: nodes, outages, garbage, the CLI.

Everything runs on a real redis-server; two store instances on one key
prefix stand for two nodes (or a node and the CLI).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from hubserver.backplane import RedisConnection, parse_redis_url
from hubserver.backplane.redis_client import Arg, Reply
from hubserver.permissions import (
    PermissionChange,
    PermissionStoreError,
    PermissionStoreUnavailable,
    RedisPermissionStore,
    Role,
    SqlitePermissionStore,
)

from .redis_fixture import (  # noqa: F401 (fixtures)
    RedisServer,
    own_redis_server_fixture,
    redis_server_fixture,
)

ME = "subject-1"


async def raw(url: str, *args: Arg) -> Reply:
    """One command on a connection of its own (what another program does to Redis)."""
    with trio.fail_after(5):
        async with await RedisConnection.connect(parse_redis_url(url)) as conn:
            return await conn.execute(*args)


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
async def node_a(redis_server: RedisServer, prefix: str) -> AsyncIterator[RedisPermissionStore]:
    async with RedisPermissionStore(redis_server.url, key_prefix=prefix) as store:
        yield store


@pytest.fixture
async def node_b(redis_server: RedisServer, prefix: str) -> AsyncIterator[RedisPermissionStore]:
    async with RedisPermissionStore(redis_server.url, key_prefix=prefix) as store:
        yield store


class Heard:
    """The changes one node's ``watch_changes`` reported."""

    def __init__(self) -> None:
        self.changes: list[PermissionChange] = []
        self._arrived = trio.Event()

    def __call__(self, change: PermissionChange) -> None:
        self.changes.append(change)
        self._arrived.set()

    async def next(self) -> PermissionChange:
        with trio.fail_after(5):
            while not self.changes:
                self._arrived = trio.Event()
                await self._arrived.wait()
        return self.changes.pop(0)


async def listen(nursery: trio.Nursery, store: RedisPermissionStore) -> Heard:
    heard = Heard()
    nursery.start_soon(store.watch_changes, heard)
    await trio.sleep(0.2)  # subscribed
    return heard


async def test_a_change_on_one_node_is_heard_and_read_on_the_other(
    node_a: RedisPermissionStore, node_b: RedisPermissionStore, nursery: trio.Nursery
) -> None:
    heard = await listen(nursery, node_b)
    await node_a.grant("s1", ME, Role.SITE_USER)
    change = await heard.next()
    assert change == PermissionChange(pairs=frozenset({("s1", ME)}), version=1)
    # Redis ran the write and the notice in one script: a reader told of it sees it.
    assert await node_b.role_of("s1", ME) is Role.SITE_USER
    assert await node_b.version() == 1
    assert await node_a.revoke("s1", ME)
    assert (await heard.next()).version == 2
    assert await node_b.role_of("s1", ME) is None


async def test_a_bulk_grant_past_the_notice_limit_asks_for_everyone(
    redis_server: RedisServer, prefix: str, node_b: RedisPermissionStore, nursery: trio.Nursery
) -> None:
    heard = await listen(nursery, node_b)
    async with RedisPermissionStore(redis_server.url, key_prefix=prefix, max_notice_pairs=3) as cli:
        await cli.grant_many([(f"s{i}", ME, Role.SITE_ADMIN) for i in range(3)])
        assert (await heard.next()).pairs == {(f"s{i}", ME) for i in range(3)}
        await cli.grant_many([(f"t{i}", ME, Role.SITE_ADMIN) for i in range(4)])
        assert await heard.next() == PermissionChange(pairs=None, version=2)


async def test_stores_on_two_databases_of_one_redis_hear_only_their_own_notices(
    redis_server: RedisServer, prefix: str, nursery: trio.Nursery
) -> None:
    base = f"redis://127.0.0.1:{redis_server.port}"
    async with (
        RedisPermissionStore(f"{base}/1", key_prefix=prefix) as one,
        RedisPermissionStore(f"{base}/2", key_prefix=prefix) as two,
    ):
        heard_one, heard_two = await listen(nursery, one), await listen(nursery, two)
        await one.grant("s1", ME, Role.SITE_ADMIN)
        assert await heard_one.next() == PermissionChange(pairs=frozenset({("s1", ME)}), version=1)
        await two.grant("s2", ME, Role.SITE_USER)
        # Its own change is the first it hears: nothing of the other database came before.
        assert await heard_two.next() == PermissionChange(pairs=frozenset({("s2", ME)}), version=1)
        await one.revoke("s1", ME)
        assert await heard_one.next() == PermissionChange(pairs=frozenset({("s1", ME)}), version=2)


async def test_a_lost_subscription_is_reported_as_re_check_everyone(
    own_redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    async with RedisPermissionStore(own_redis_server.url, ping_interval=0.2) as store:
        heard = await listen(nursery, store)
        own_redis_server.stop()
        own_redis_server.start()
        change = await heard.next()
        # What was announced while it was away is lost: everyone is re-checked.
        assert change == PermissionChange(pairs=None)
        await store.grant("s1", ME, Role.SITE_USER)
        assert (await heard.next()).pairs == {("s1", ME)}


async def test_an_unreachable_redis_is_unavailable_then_recovers(
    own_redis_server: RedisServer,
) -> None:
    async with RedisPermissionStore(own_redis_server.url, op_timeout=0.5) as store:
        await store.grant("s1", ME, Role.SITE_ADMIN)
        own_redis_server.stop()
        with pytest.raises(PermissionStoreUnavailable, match="role lookup failed"):
            await store.role_of("s1", ME)
        assert not store.is_available
        with pytest.raises(PermissionStoreUnavailable):
            await store.version()
        with pytest.raises(PermissionStoreError, match="may or may not have been applied"):
            await store.grant("s2", ME, Role.SITE_ADMIN)
        own_redis_server.start()  # empty: nothing is saved
        assert await store.role_of("s1", ME) is None
        assert store.is_available


async def test_a_hung_redis_misses_the_deadline_and_nothing_piles_up(
    own_redis_server: RedisServer,
) -> None:
    async with RedisPermissionStore(own_redis_server.url, op_timeout=0.5) as store:
        await store.grant("s1", ME, Role.SITE_ADMIN)
        own_redis_server.pause()
        try:
            started = trio.current_time()
            with pytest.raises(PermissionStoreUnavailable, match=r"within 0\.5 s"):
                await store.role_of("s1", ME)
            assert trio.current_time() - started < 1.5
            # Many lookups at once: each gives up at its own deadline.
            failures = 0

            async def look_up(index: int) -> None:
                nonlocal failures
                with pytest.raises(PermissionStoreUnavailable):
                    await store.role_of("s1", f"user-{index}")
                failures += 1

            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                for index in range(20):
                    nursery.start_soon(look_up, index)
            assert failures == 20
            assert trio.current_time() - started < 1.5
            assert not store.is_available
        finally:
            own_redis_server.resume()
        assert await store.role_of("s1", ME) is Role.SITE_ADMIN  # the data survived the hang
        assert store.is_available


@pytest.mark.parametrize(
    "value", [b"owner 2024-01-01T00:00:00+00:00", b"site_admin", b"\xff\xfe", b""]
)
async def test_a_value_that_is_not_ours_is_never_a_grant(
    redis_server: RedisServer, node_a: RedisPermissionStore, prefix: str, value: bytes
) -> None:
    await node_a.grant("s1", "someone", Role.SITE_USER)
    await raw(redis_server.url, "HSET", f"{prefix}:perm:site:s1", ME, value)
    with pytest.raises(PermissionStoreUnavailable, match="not one of ours"):
        await node_a.role_of("s1", ME)
    assert node_a.is_available  # Redis answered: that lookup failed, not the store
    with pytest.raises(PermissionStoreError, match="not one of ours"):
        await node_a.list("s1")
    assert await node_a.role_of("s1", "someone") is Role.SITE_USER
    assert node_a.is_available


async def test_keys_of_another_type_are_a_failure_not_a_grant(
    redis_server: RedisServer, node_a: RedisPermissionStore, prefix: str
) -> None:
    await raw(redis_server.url, "SET", f"{prefix}:perm:site:s1", "site_admin")
    with pytest.raises(PermissionStoreUnavailable, match="WRONGTYPE"):
        await node_a.role_of("s1", ME)
    await raw(redis_server.url, "SET", f"{prefix}:perm:version", "not a number")
    with pytest.raises(PermissionStoreUnavailable, match="does not hold a version"):
        await node_a.version()


async def test_a_version_too_long_for_an_int_is_a_failure_not_a_crash(
    redis_server: RedisServer, node_a: RedisPermissionStore, prefix: str
) -> None:
    # int() refuses more than 4300 digits with a ValueError, which nothing expects.
    await raw(redis_server.url, "SET", f"{prefix}:perm:version", "9" * 5000)
    with pytest.raises(PermissionStoreUnavailable, match="does not hold a version"):
        await node_a.version()


def test_a_non_redis_url_is_refused() -> None:
    with pytest.raises(PermissionStoreError, match="redis://"):
        RedisPermissionStore("http://127.0.0.1:6379")


# --- the CLI, as an operator runs it on any machine of the fleet -----------------------------


def members(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hubserver", "members", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


async def test_cli_grants_and_revokes_in_redis_by_flag_or_by_setting(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    url = own_redis_server.url
    data_dir = str(tmp_path / "data")
    done = members(
        "grant", "--redis", url, "--site", "s1", "--subject", ME, "--role", "site_admin",
        "--data-dir", data_dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"granted site_admin on site s1 to subject {ME}\n"
    # HUBSERVER_BACKPLANE (the nodes' setting) is where the CLI looks too.
    setting = {"HUBSERVER_BACKPLANE": url}
    done = members(
        "grant", "--site", "s2", "--site", "s3", "--subject", ME, "--role", "site_user",
        "--data-dir", data_dir, env=setting,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"granted site_user on 2 sites to subject {ME}\n"

    listed = members("list", "--data-dir", data_dir, env=setting)
    assert [line.split()[:3] for line in listed.stdout.splitlines()] == [
        ["SITE", "SUBJECT", "ROLE"],
        ["s1", ME, "site_admin"],
        ["s2", ME, "site_user"],
        ["s3", ME, "site_user"],
    ]
    async with RedisPermissionStore(url) as store:
        assert await store.role_of("s2", ME) is Role.SITE_USER
        assert await store.version() == 2

    done = members("revoke", "--site", "s1", "--subject", ME, "--redis", url)
    assert done.stdout == f"revoked subject {ME} on site s1\n"
    async with RedisPermissionStore(url) as store:
        assert await store.role_of("s1", ME) is None
    # Nothing went to the SQLite file.
    with SqlitePermissionStore.open(tmp_path / "data") as sqlite_store:
        assert sqlite_store.list() == []


async def test_cli_keeps_the_sqlite_file_when_the_nodes_do(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    setting = {"HUBSERVER_BACKPLANE": own_redis_server.url, "HUBSERVER_PERMISSIONS": "sqlite"}
    done = members(
        "grant", "--site", "s1", "--subject", ME, "--role", "site_admin",
        "--data-dir", str(tmp_path), env=setting,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with SqlitePermissionStore.open(tmp_path) as sqlite_store:
        assert [m.site_id for m in sqlite_store.list()] == ["s1"]
    async with RedisPermissionStore(own_redis_server.url) as store:
        assert await store.version() == 0


def test_cli_refuses_when_the_backend_owns_the_roles(tmp_path: Path) -> None:
    setting = {"HUBSERVER_PERMISSIONS_URL": "http://127.0.0.1:9/roles"}
    done = members(
        "grant", "--site", "s1", "--subject", ME, "--role", "site_admin",
        "--data-dir", str(tmp_path), env=setting,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Change them there" in done.stderr


@pytest.fixture
def no_settings(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No HUBSERVER_* variable but those the test sets."""
    for name in os.environ:
        if name.startswith("HUBSERVER_"):
            monkeypatch.delenv(name)
    return monkeypatch


BACKEND_URL = "https://acl:s3cret@acl.internal/roles"
MEMBERS_ACTIONS = (
    ["grant", "--site", "s1", "--subject", ME, "--role", "site_admin"],
    ["revoke", "--site", "s1", "--subject", ME],
    ["list"],
)


@pytest.mark.parametrize(
    ("env", "argv", "file", "why"),
    [
        (
            {"HUBSERVER_PERMISSIONS": "url"},
            [],
            None,
            "permissions url, set by HUBSERVER_PERMISSIONS",
        ),
        (
            {"HUBSERVER_PERMISSIONS": "URL", "HUBSERVER_PERMISSIONS_URL": BACKEND_URL},
            [],
            None,
            "permissions url, set by HUBSERVER_PERMISSIONS",
        ),
        (
            {"HUBSERVER_PERMISSIONS_URL": BACKEND_URL},
            [],
            None,
            "a permissions URL, set by HUBSERVER_PERMISSIONS_URL",
        ),
        ({}, ["--permissions", "url"], None, "permissions url, set by the command line"),
        (
            {"HUBSERVER_CONFIG": "{file}"},
            [],
            'permissions = "url"\npermissions_url = "https://acl.internal/roles"\n',
            "permissions url, set by {file}",
        ),
        (
            {"HUBSERVER_BACKPLANE": "redis://127.0.0.1:9/0"},
            ["--config", "{file}"],
            f'permissions_url = "{BACKEND_URL}"\n',
            "a permissions URL, set by {file}",
        ),
    ],
    ids=["env", "env with a URL", "env URL only", "flag", "HUBSERVER_CONFIG", "--config"],
)
def test_members_say_roles_live_in_the_backend_wherever_that_is_set(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_settings: pytest.MonkeyPatch,
    env: dict[str, str],
    argv: list[str],
    file: str | None,
    why: str,
) -> None:
    """What serve would take roles from decides what members does: there is no
    file or Redis set to change then, and no error about a missing setting."""
    from hubserver.__main__ import main

    config = tmp_path / "hubserver.toml"
    if file is not None:
        config.write_text(file)
    for name, value in env.items():
        no_settings.setenv(name, value.format(file=config))
    data_dir = tmp_path / "data"
    argv = [arg.format(file=config) for arg in argv]
    for action in MEMBERS_ACTIONS:
        assert main(["members", *action, *argv, "--data-dir", str(data_dir)]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"hubserver: error: roles live in the access-control backend here "
            f"({why.format(file=config)}): the members commands do not apply. Change them "
            "there: the backend notifies the nodes (POST /v1/permissions/changed)\n"
        )
    assert not data_dir.exists(), "a SQLite file nobody reads was made"


def test_members_follow_the_config_file_as_serve_does(
    own_redis_server: RedisServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_settings: pytest.MonkeyPatch,
) -> None:
    from hubserver.__main__ import main

    config = tmp_path / "hubserver.toml"
    config.write_text(f'backplane = "{own_redis_server.url}"\ndata_dir = "data"\n')
    grant = ["members", "grant", "--site", "s1", "--subject", ME, "--role", "site_user"]
    assert main([*grant, "--config", str(config)]) == 0
    assert capsys.readouterr().out == f"granted site_user on site s1 to subject {ME}\n"

    async def role_in_redis() -> Role | None:
        async with RedisPermissionStore(own_redis_server.url) as store:
            return await store.role_of("s1", ME)

    assert trio.run(role_in_redis) is Role.SITE_USER
    assert not (tmp_path / "data").exists()
    # The nodes keep their files: so does members, in the file's data_dir.
    no_settings.setenv("HUBSERVER_CONFIG", str(config))
    no_settings.setenv("HUBSERVER_PERMISSIONS", "sqlite")
    assert main([*grant[:-1], "site_admin"]) == 0
    with SqlitePermissionStore.open(tmp_path / "data") as sqlite_store:
        assert [(m.site_id, m.role) for m in sqlite_store.list()] == [("s1", Role.SITE_ADMIN)]
    # Redis named for roles, and no Redis given: the flag members has for it.
    no_settings.setenv("HUBSERVER_PERMISSIONS", "redis")
    assert main(["members", "list", "--config", str(tmp_path / "none.toml")]) == 2
    assert "none.toml: cannot read the config file" in capsys.readouterr().err
    config.write_text("")
    assert main(["members", "list"]) == 2
    assert capsys.readouterr().err == (
        "hubserver: error: permissions redis (set by HUBSERVER_PERMISSIONS) keeps roles in "
        "the fleet's Redis: give --redis URL (or HUBSERVER_BACKPLANE)\n"
    )


def test_cli_says_when_redis_cannot_be_reached(tmp_path: Path) -> None:
    done = members(
        "revoke", "--site", "s1", "--subject", ME, "--redis", "redis://127.0.0.1:9/0",
    )  # fmt: skip
    assert done.returncode == 2
    assert "hubserver: error:" in done.stderr and "127.0.0.1:9" in done.stderr
