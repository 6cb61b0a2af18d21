"""Tests for hubserver.permissions: the rule, the SQLite store's specifics, and the CLI."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from hubcore._errors import HubError
from hubserver.permissions import (
    MAX_ID_CHARS,
    InMemoryPermissionStore,
    PermissionStoreError,
    Role,
    SqlitePermissionStore,
    cli,
    may_subscribe,
    parse_role,
)

Store = SqlitePermissionStore | InMemoryPermissionStore

# --- the rule -------------------------------------------------------------------------------

ME, OTHER = "subject-1", "subject-2"
SITE_STREAM, OWN_STREAM, OTHER_STREAM = None, ME, OTHER

RULES = [
    (Role.SITE_ADMIN, SITE_STREAM, True),
    (Role.SITE_ADMIN, OWN_STREAM, True),
    (Role.SITE_ADMIN, OTHER_STREAM, True),
    (Role.SITE_SUPER_USER, SITE_STREAM, True),
    (Role.SITE_SUPER_USER, OWN_STREAM, True),
    (Role.SITE_SUPER_USER, OTHER_STREAM, True),
    (Role.SITE_USER, SITE_STREAM, False),
    (Role.SITE_USER, OWN_STREAM, True),
    (Role.SITE_USER, OTHER_STREAM, False),
    (None, SITE_STREAM, False),
    (None, OWN_STREAM, False),
    (None, OTHER_STREAM, False),
]


@pytest.mark.parametrize(("role", "user_id", "allowed"), RULES)
def test_may_subscribe(role: Role | None, user_id: str | None, allowed: bool) -> None:
    assert may_subscribe(role, subject=ME, user_id=user_id) is allowed


def test_rule_table_is_exhaustive() -> None:
    assert {(role, user_id) for role, user_id, _ in RULES} == {
        (role, user_id) for role in [*Role, None] for user_id in (SITE_STREAM, ME, OTHER)
    }


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("site_admin", Role.SITE_ADMIN),
        ("Site-Super-User", Role.SITE_SUPER_USER),
        (" site_user ", Role.SITE_USER),
    ],
)
def test_parse_role(name: str, role: Role) -> None:
    assert parse_role(name) is role


def test_parse_role_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="site_admin, site_super_user, site_user"):
        parse_role("owner")


# The stores' shared contract is in test_permission_stores.py.


# --- SQLite specifics -----------------------------------------------------------------------


async def test_sqlite_sees_changes_from_another_process(tmp_path: Path) -> None:
    # A second store on the same directory stands in for the CLI process.
    with (
        SqlitePermissionStore.open(tmp_path) as server,
        SqlitePermissionStore.open(tmp_path) as cli_store,
    ):
        start = await server.version()
        assert await server.version() == start
        cli_store.grant("s1", ME, Role.SITE_ADMIN)
        granted = await server.version()
        assert granted != start
        assert await server.role_of("s1", ME) is Role.SITE_ADMIN
        assert await server.version() == granted
        cli_store.revoke("s1", ME)
        assert await server.version() != granted
        assert await server.role_of("s1", ME) is None


async def test_sqlite_persists_across_reopen(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"  # created on open
    with SqlitePermissionStore.open(data_dir) as store:
        store.grant("s1", ME, Role.SITE_SUPER_USER)
        version = await store.version()
    with SqlitePermissionStore.open(data_dir) as store:
        assert await store.role_of("s1", ME) is Role.SITE_SUPER_USER
        assert await store.version() == version


def test_sqlite_file_schema_and_wal(tmp_path: Path) -> None:
    SqlitePermissionStore.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "permissions.sqlite3")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(members)")]
        assert columns == ["site_id", "subject", "role", "granted_at"]
        primary_key = [row[1] for row in conn.execute("PRAGMA table_info(members)") if row[5]]
        assert primary_key == ["site_id", "subject"]
    finally:
        conn.close()


async def test_sqlite_closed_store_raises_store_error(tmp_path: Path) -> None:
    store = SqlitePermissionStore.open(tmp_path)
    store.close()
    store.close()  # idempotent
    with pytest.raises(PermissionStoreError):
        await store.role_of("s1", ME)
    with pytest.raises(PermissionStoreError):
        store.grant("s1", ME, Role.SITE_USER)
    assert issubclass(PermissionStoreError, HubError)


def test_sqlite_open_fails_cleanly(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(PermissionStoreError, match="cannot create data directory"):
        SqlitePermissionStore.open(not_a_dir)


async def test_sqlite_lookups_run_concurrently(tmp_path: Path) -> None:
    # Many worker threads share the one connection through its lock.
    with SqlitePermissionStore.open(tmp_path) as store:
        store.grant("s1", ME, Role.SITE_USER)
        results: list[Role | None] = []

        async def look_up() -> None:
            results.append(await store.role_of("s1", ME))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(look_up)
        assert results == [Role.SITE_USER] * 20


# --- CLI functions --------------------------------------------------------------------------


def test_cli_grant_list_revoke(tmp_path: Path) -> None:
    assert cli.list_members(tmp_path) == "no members"
    assert cli.grant(tmp_path, "site-a", "alice", "site_admin") == (
        "granted site_admin on site site-a to subject alice"
    )
    assert cli.grant(tmp_path, "b", "bob-the-builder", "SITE-USER") == (
        "granted site_user on site b to subject bob-the-builder"
    )
    lines = cli.list_members(tmp_path).splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["SITE", "SUBJECT", "ROLE"],
        ["b", "bob-the-builder", "site_user"],
        ["site-a", "alice", "site_admin"],
    ]
    # Aligned: every column starts at the same offset on every line.
    assert {line.index(line.split()[1]) for line in lines} == {len("site-a  ")}
    assert len(cli.list_members(tmp_path, "site-a").splitlines()) == 2
    assert cli.list_members(tmp_path, "nowhere") == "no members"
    assert cli.revoke(tmp_path, "site-a", "alice") == "revoked subject alice on site site-a"
    assert cli.revoke(tmp_path, "site-a", "alice") == (
        "subject alice has no role on site site-a; nothing revoked"
    )


def test_cli_rejects_unknown_role(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected one of: site_admin, site_super_user, site_user"):
        cli.grant(tmp_path, "s1", ME, "admin")
    assert cli.list_members(tmp_path) == "no members"


def _members_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``hubserver members ...`` as its own process, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "hubserver", "members", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_grants_two_thousand_sites_from_a_file_in_one_transaction(
    tmp_path: Path,
) -> None:
    sites = [f"building-{index:04d}" for index in range(2000)]
    sites_file = tmp_path / "sites.txt"
    # Blank lines and surrounding blanks are ignored; a site named twice is granted once.
    sites_file.write_text(
        "\n".join(sites[:1000]) + "\n\n  " + "\n".join(sites[1000:]) + "\nbuilding-0007\n",
        encoding="utf-8",
    )
    data_dir = tmp_path / "data"
    with SqlitePermissionStore.open(data_dir) as store:
        store.grant("elsewhere", "bob", Role.SITE_USER)  # a bystander row stays as it was
        before = await store.version()

    done = _members_cli(
        data_dir,
        "grant",
        "--sites-file",
        str(sites_file),
        "--site",
        "lobby",
        "--subject",
        "integration-1",
        "--role",
        "site_super_user",
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "granted site_super_user on 2001 sites to subject integration-1"
    with SqlitePermissionStore.open(data_dir) as store:
        members = store.list()
        # One transaction: the version moved by one step for 2,001 rows.
        assert await store.version() == before + 1
        assert await store.role_of("building-1999", "integration-1") is Role.SITE_SUPER_USER
        assert await store.role_of("elsewhere", "bob") is Role.SITE_USER
    granted = {(m.site_id, m.role) for m in members if m.subject == "integration-1"}
    assert granted == {(site, Role.SITE_SUPER_USER) for site in [*sites, "lobby"]}
    assert len(members) == 2002


def test_cli_bulk_grant_refuses_a_bad_line_and_grants_nothing(tmp_path: Path) -> None:
    sites_file = tmp_path / "sites.txt"
    sites_file.write_text("a\nb\n" + "x" * (MAX_ID_CHARS + 1) + "\nc\n", encoding="utf-8")
    data_dir = tmp_path / "data"

    done = _members_cli(
        data_dir, "grant", "--sites-file", str(sites_file), "--subject", ME, "--role", "site_admin"
    )

    assert done.returncode == 2
    assert f"{sites_file}, line 3: site_id must be a non-empty string" in done.stderr
    assert cli.list_members(data_dir) == "no members"

    done = _members_cli(data_dir, "grant", "--subject", ME, "--role", "site_admin")
    assert done.returncode == 2 and "no site to grant" in done.stderr


def test_cli_grant_sites_with_one_site_says_what_grant_says(tmp_path: Path) -> None:
    assert cli.grant_sites(tmp_path, ["s1", "s1"], ME, "site_user") == (
        f"granted site_user on site s1 to subject {ME}"
    )
    assert cli.grant_sites(tmp_path, ["s1", "s2"], ME, "site_admin") == (
        f"granted site_admin on 2 sites to subject {ME}"
    )
    with SqlitePermissionStore.open(tmp_path) as store:
        assert [m.role for m in store.list()] == [Role.SITE_ADMIN] * 2
