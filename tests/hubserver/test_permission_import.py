"""``hubserver members import``: a node's SQLite grants copied into the fleet's Redis.

The real CLI as a process, a real SQLite file and a real redis-server (one
per test: the CLI uses the default key prefix). What Redis holds is read
back raw, key by key, to show what a run changed and what it did not. A
running node hearing an import is in ``test_fleet_roles``.
"""

from __future__ import annotations

import sys
import uuid
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from hubserver.config import ServerConfig
from hubserver.permissions import (
    Member,
    PermissionStoreError,
    RedisPermissionStore,
    Role,
    SqlitePermissionStore,
)
from hubserver.permissions._redis import Found, Held
from hubserver.permissions.cli import import_from_sqlite

from .redis_fixture import (  # noqa: F401 (fixtures)
    RedisServer,
    own_redis_server_fixture,
    redis_server_fixture,
)
from .test_fleet_roles import _clean_env
from .test_permission_redis import raw

CAP = 20.0


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex}"


async def cli(*args: str, **env: str) -> tuple[int, str, str]:
    """``hubserver members import ARGS`` with no HUBSERVER_* variable but ``env``."""
    done = await trio.run_process(
        [sys.executable, "-m", "hubserver", "members", "import", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=_clean_env(**env),
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def snapshot(url: str) -> dict[str, Any]:
    """Every key of the Redis at ``url`` and its value (hashes and sets as Python ones)."""
    state: dict[str, Any] = {}
    keys = await raw(url, "KEYS", "*")
    assert isinstance(keys, list)
    for key in keys:
        assert isinstance(key, bytes)
        kind = await raw(url, "TYPE", key)
        if kind == b"hash":
            flat = await raw(url, "HGETALL", key)
            assert isinstance(flat, list)
            state[key.decode()] = dict(zip(flat[::2], flat[1::2], strict=True))
        elif kind == b"set":
            members = await raw(url, "SMEMBERS", key)
            assert isinstance(members, list)
            state[key.decode()] = set(members)  # type: ignore[arg-type]
        else:
            state[key.decode()] = await raw(url, "GET", key)
    return state


async def import_in_thread(path: Path, url: str, **options: bool) -> tuple[str, bool]:
    """``import_from_sqlite`` (which runs trio itself) in a thread of its own."""
    return await trio.to_thread.run_sync(partial(import_from_sqlite, path, url, **options))


def node_file(tmp_path: Path, *grants: tuple[str, str, Role]) -> Path:
    """A node's data directory whose SQLite file holds ``grants``."""
    data = tmp_path / "node-data"
    with SqlitePermissionStore.open(data) as store:
        store.grant_many(grants)
    return data


async def test_every_grant_is_copied_once_and_a_second_run_changes_nothing(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    url = own_redis_server.url
    data = node_file(
        tmp_path,
        ("s1", "alice", Role.SITE_ADMIN),
        ("s1", "bob", Role.SITE_USER),
        ("s2", "alice", Role.SITE_SUPER_USER),
    )
    with SqlitePermissionStore.open(data) as store:
        in_file = store.list()
    file_bytes = (data / "permissions.sqlite3").read_bytes()
    async with RedisPermissionStore(url) as fleet:
        await fleet.grant("s1", "alice", Role.SITE_ADMIN)  # already there: the same role
        (already,) = await fleet.list()
        version = await fleet.version()
    with trio.fail_after(CAP):
        code, out, err = await cli("--from-sqlite", str(data), "--redis", url)
        assert (code, err) == (0, ""), err
        assert out.startswith("imported 3 grant(s) of ")
        assert out.rstrip().endswith("2 added, 1 already there with the same role, 0 replaced")
        async with RedisPermissionStore(url) as fleet:
            # The file's grants, with their grant times; the one already there kept its own.
            assert await fleet.list() == [already if m.subject == "alice" and m.site_id == "s1"
                                          else m for m in in_file]  # fmt: skip
            assert await fleet.version() == version + 1  # one batch, one step
        before = await snapshot(url)

        # HUBSERVER_BACKPLANE stands for --redis, as on a node.
        code, out, err = await cli(
            "--from-sqlite", str(data / "permissions.sqlite3"), HUBSERVER_BACKPLANE=url
        )
        assert (code, err) == (0, ""), err
        assert "0 added, 3 already there with the same role, 0 replaced" in out
        assert await snapshot(url) == before  # not even the version moved
    # The node's file was only read.
    assert (data / "permissions.sqlite3").read_bytes() == file_bytes


async def test_another_role_in_redis_is_refused_unless_overwrite_and_a_dry_run_writes_nothing(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    url = own_redis_server.url
    data = node_file(
        tmp_path,
        ("s1", "alice", Role.SITE_ADMIN),
        ("s1", "bob", Role.SITE_USER),
        ("s2", "carol", Role.SITE_USER),
    )
    async with RedisPermissionStore(url) as fleet:
        await fleet.grant("s1", "bob", Role.SITE_ADMIN)  # the fleet says otherwise
    base = ("--from-sqlite", str(data), "--redis", url)
    conflict = "site s1, subject bob: site_user in the file, site_admin in Redis"
    with trio.fail_after(CAP):
        untouched = await snapshot(url)
        code, out, err = await cli(*base)
        assert code == 1 and out == "", (code, out, err)
        assert err.startswith("refused, nothing written: 3 grant(s) of ")
        assert conflict in err
        assert await snapshot(url) == untouched

        # Dry runs (in a thread: the CLI's function, without a process's start-up).
        report, is_ok = await import_in_thread(data, url, is_dry_run=True)
        assert not is_ok and report.startswith("dry run, nothing written")
        assert "(refused without --overwrite)" in report and conflict in report
        report, is_ok = await import_in_thread(data, url, is_dry_run=True, allow_overwrite=True)
        assert is_ok, report
        assert "2 to add, 0 already there with the same role, 1 with another role there" in report
        assert await snapshot(url) == untouched

        code, out, err = await cli(*base, "--overwrite")
        assert code == 0, err
        assert "2 added, 0 already there with the same role, 1 replaced (--overwrite)" in out
        async with RedisPermissionStore(url) as fleet:
            roles = {(m.site_id, m.subject): m.role for m in await fleet.list()}
        assert roles == {
            ("s1", "alice"): Role.SITE_ADMIN,
            ("s1", "bob"): Role.SITE_USER,
            ("s2", "carol"): Role.SITE_USER,
        }
        # Done: the same command without --overwrite now has nothing to refuse.
        code, out, err = await cli(*base)
        assert code == 0 and "0 added, 3 already there" in out, err


async def test_the_script_writes_a_batch_whole_or_not_at_all(
    redis_server: RedisServer, prefix: str
) -> None:
    """What the CLI relies on when Redis changes between its comparison and its
    writes: an ``add`` batch that meets another role writes nothing."""
    at = datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
    rows = [
        Member(site_id="s1", subject="new", role=Role.SITE_USER, granted_at=at),
        Member(site_id="s1", subject="same", role=Role.SITE_ADMIN, granted_at=at),
        Member(site_id="s1", subject="other", role=Role.SITE_USER, granted_at=at),
    ]
    async with RedisPermissionStore(redis_server.url, key_prefix=prefix) as store:
        await store.grant("s1", "same", Role.SITE_ADMIN)
        await store.grant("s1", "other", Role.SITE_ADMIN)
        version = await store.version()
        expected = [
            Held(Found.NOTHING, None),
            Held(Found.SAME_ROLE, Role.SITE_ADMIN),
            Held(Found.OTHER_ROLE, Role.SITE_ADMIN),
        ]
        for mode in ("compare", "add"):
            assert await store.import_grants(rows, mode=mode) == expected  # type: ignore[arg-type]
            assert await store.role_of("s1", "new") is None
            assert await store.version() == version
        assert await store.import_grants(rows, mode="replace") == expected
        assert await store.version() == version + 1
        members = {m.subject: m for m in await store.list("s1")}
        assert members["new"] == rows[0] and members["other"] == rows[2]  # the file's times
        assert members["same"].granted_at != at  # left as it was
        # A value that is not ours counts as another role; never as "nothing".
        await raw(redis_server.url, "HSET", f"{prefix}:perm:site:s1", "new", "garbage")
        assert (await store.import_grants(rows[:1], mode="add")) == [Held(Found.OTHER_ROLE, None)]


async def test_a_missing_or_foreign_file_is_an_error_and_nothing_is_created(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    with trio.fail_after(CAP):
        missing = tmp_path / "nowhere"
        code, _, err = await cli("--from-sqlite", str(missing), "--redis", own_redis_server.url)
        assert code == 2 and "is not a file" in err, err
        assert not missing.exists()
        code, _, err = await cli("--from-sqlite", str(missing))
        assert code == 2 and "needs --redis" in err, err
        foreign = tmp_path / "other.sqlite3"
        foreign.write_bytes(b"not a database at all, just text" * 100)
        with pytest.raises(PermissionStoreError, match="cannot read the grants in"):
            await import_in_thread(foreign, own_redis_server.url)
        empty = tmp_path / "empty"
        SqlitePermissionStore.open(empty).close()
        assert await import_in_thread(empty, own_redis_server.url) == (
            f"no grants in {empty / 'permissions.sqlite3'}; nothing to import",
            True,
        )
        assert await snapshot(own_redis_server.url) == {}


def test_the_unused_grants_warning_names_the_command_without_the_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from hubserver.server import _warn_of_unused_sqlite_roles

    data = node_file(tmp_path, ("s1", "alice", Role.SITE_ADMIN))
    config = ServerConfig(data_dir=data, backplane="redis://:s3cret@redis.internal:6379/0")
    _warn_of_unused_sqlite_roles(config)
    (record,) = [r for r in caplog.records if getattr(r, "event", "") == "sqlite_roles_unused"]
    command = f"hubserver members import --from-sqlite {data / 'permissions.sqlite3'} --redis "
    assert command + "'redis://:***@redis.internal:6379/0'" in record.getMessage()
    assert "s3cret" not in record.getMessage()
    assert record.command.startswith(command)  # type: ignore[attr-defined]
