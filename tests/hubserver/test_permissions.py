"""Tests for hubserver.permissions: the rule, both stores, and the CLI functions."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from hubcore._errors import HubError
from hubserver.permissions import (
    MAX_ID_CHARS,
    InMemoryPermissionStore,
    Member,
    PermissionStore,
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


# --- both stores ----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        yield InMemoryPermissionStore()
        return
    with SqlitePermissionStore.open(tmp_path) as sqlite_store:
        yield sqlite_store


def test_both_stores_satisfy_the_protocol(tmp_path: Path) -> None:
    # Checked by mypy: assignment fails if either store drifts from the seam.
    with SqlitePermissionStore.open(tmp_path) as sqlite_store:
        stores: list[PermissionStore] = [sqlite_store, InMemoryPermissionStore()]
        assert len(stores) == 2


async def test_grant_replace_revoke(store: Store) -> None:
    assert await store.role_of("s1", ME) is None
    store.grant("s1", ME, Role.SITE_USER)
    assert await store.role_of("s1", ME) is Role.SITE_USER
    assert await store.role_of("s2", ME) is None  # roles are per site
    store.grant("s1", ME, Role.SITE_ADMIN)  # one role per subject per site: replaces
    assert await store.role_of("s1", ME) is Role.SITE_ADMIN
    assert [m.role for m in store.list("s1")] == [Role.SITE_ADMIN]
    assert store.revoke("s1", ME) is True
    assert await store.role_of("s1", ME) is None
    assert store.revoke("s1", ME) is False


async def test_role_of_unknown_is_none(store: Store) -> None:
    store.grant("s1", ME, Role.SITE_ADMIN)
    assert await store.role_of("unknown-site", ME) is None
    assert await store.role_of("s1", "unknown-subject") is None
    # Ids that could never be granted are simply unknown, not an error.
    assert await store.role_of("", ME) is None
    assert await store.role_of("s" * (MAX_ID_CHARS + 1), ME) is None


async def test_list(store: Store) -> None:
    assert store.list() == []
    before = datetime.now(UTC)
    store.grant("s2", OTHER, Role.SITE_USER)
    store.grant("s1", OTHER, Role.SITE_SUPER_USER)
    store.grant("s1", ME, Role.SITE_ADMIN)
    members = store.list()
    assert [(m.site_id, m.subject, m.role) for m in members] == [
        ("s1", ME, Role.SITE_ADMIN),
        ("s1", OTHER, Role.SITE_SUPER_USER),
        ("s2", OTHER, Role.SITE_USER),
    ]
    assert all(isinstance(m, Member) and before <= m.granted_at for m in members)
    assert store.list("s2") == members[2:]
    assert store.list("nowhere") == []


async def test_version_changes_only_on_change(store: Store) -> None:
    start = await store.version()
    assert await store.version() == start
    store.grant("s1", ME, Role.SITE_USER)
    granted = await store.version()
    assert granted != start
    await store.role_of("s1", ME)
    store.list()
    assert store.revoke("s1", OTHER) is False  # nothing changed, nothing to re-check
    assert await store.version() == granted
    store.revoke("s1", ME)
    assert await store.version() != granted


async def test_grant_many_is_one_change_all_or_nothing(store: Store) -> None:
    store.grant("s1", ME, Role.SITE_USER)
    start = await store.version()
    grants = [(f"s{index}", ME, Role.SITE_ADMIN) for index in range(1, 6)]
    grants.append(("s2", OTHER, Role.SITE_USER))
    assert store.grant_many(grants) == 6
    # One version step for the lot: a server re-checks its connections once.
    assert await store.version() == start + 1
    assert await store.role_of("s1", ME) is Role.SITE_ADMIN  # replaced, like grant
    assert [(m.site_id, m.subject, m.role) for m in store.list("s2")] == [
        ("s2", ME, Role.SITE_ADMIN),
        ("s2", OTHER, Role.SITE_USER),
    ]

    # A bad row anywhere: nothing of the call is written, and the version stays.
    bad = [("s7", ME, Role.SITE_ADMIN), ("s8", "", Role.SITE_ADMIN)]
    with pytest.raises(ValueError, match="grant 1: subject must be a non-empty string"):
        store.grant_many(bad)
    with pytest.raises(ValueError, match="grant 0: role must be a Role"):
        store.grant_many([("s9", ME, "site_admin")])  # type: ignore[list-item]
    assert await store.role_of("s7", ME) is None
    assert await store.version() == start + 1
    assert store.grant_many([]) == 0
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
def test_ids_are_validated(store: Store, site_id: str, subject: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        store.grant(site_id, subject, Role.SITE_USER)
    with pytest.raises(ValueError, match=message):
        store.revoke(site_id, subject)
    assert store.list() == []


def test_longest_id_is_accepted(store: Store) -> None:
    longest = "s" * MAX_ID_CHARS
    store.grant(longest, longest, Role.SITE_USER)
    assert [m.site_id for m in store.list(longest)] == [longest]


def test_role_and_list_filter_are_validated(store: Store) -> None:
    with pytest.raises(ValueError, match="role must be a Role, got a str"):
        store.grant("s1", ME, "site_admin")  # type: ignore[arg-type]  # the point of the test
    with pytest.raises(ValueError, match="site_id must be"):
        store.list("")
    assert store.list() == []


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
