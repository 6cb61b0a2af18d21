"""A failing permission store (real SQLite, broken by another process) never takes the server down.

The server here opens its own SQLite store in the data directory, as
``hubserver serve`` does; the test grants and revokes through a second
connection to the same file, as the ``hubserver members`` CLI does.

Two real failures:

- Another process holds SQLite's WAL locks (what a process recovering the
  WAL holds). A reader elsewhere retries inside SQLite for about 10 s and then
  fails with "locking protocol": the failure of issue #9, finding 4.
- The database files are overwritten with garbage ("file is not a database"
  on every call), then restored from a backup.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from hubserver.auth import DevKey
from hubserver.config import ServerConfig
from hubserver.permissions import (
    PermissionStoreUnavailable,
    Role,
    SqlitePermissionStore,
    watch_permissions,
)
from hubserver.permissions._sqlite import FILE_NAME
from hubserver.server import serve

from .conftest import Harness
from .helpers import (
    Bystander,
    HttpResponse,
    HubClient,
    bystander,
    http_request,
    hub_target,
    open_hub,
    publish_ok,
    upgrade_refused,
)

# SQLite's WAL locks are POSIX record locks on bytes 120..127 of the -shm file
# (write, checkpoint, recover and the five read marks); a process recovering
# the WAL holds them all. Held from here, every reader in another process spins
# in walTryBeginRead and fails with SQLITE_PROTOCOL after ~10 s.
_HOLD_WAL_LOCKS = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 8, 120, os.SEEK_SET)
print("held", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    return shared_dev_key


@asynccontextmanager
async def hold_wal_locks(db: Path) -> AsyncIterator[None]:
    """Another process holds the database's WAL locks until the block ends."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", _HOLD_WAL_LOCKS, f"{db}-shm"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        output = b""
        with trio.fail_after(10):
            while not output.endswith(b"\n"):
                chunk = await process.stdout.receive_some(100)
                assert chunk, f"the lock holder ended: {output!r}"
                output += chunk
        assert output == b"held\n"
        yield
    finally:
        with trio.fail_after(10):
            await process.stdin.send_all(b"\n")
            await process.wait()
    assert process.returncode == 0


@asynccontextmanager
async def sqlite_server(
    tmp_path: Path, dev_key: DevKey, nursery: trio.Nursery
) -> AsyncIterator[Harness]:
    data = tmp_path / "data"
    config = ServerConfig(port=0, data_dir=data, permission_poll_interval=0.2)
    cli_store = SqlitePermissionStore.open(data)  # the `hubserver members` side
    server = await nursery.start(partial(serve, config, verifier=dev_key.verifier()))
    try:
        yield Harness(server=server, key=dev_key, store=cli_store, config=config)  # type: ignore[arg-type]
    finally:
        server.request_shutdown()
        cli_store.close()


async def wait_for_readyz(h: Harness, status: int) -> None:
    while (await http_request(h.port, "GET", "/readyz")).status != status:  # noqa: ASYNC110 (polled as a balancer does)
        await trio.sleep(0.05)


def unavailable_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return [message for message in messages if "permission store unavailable" in message]


def corrupt(db: Path, backup_dir: Path) -> None:
    """Back the database up into ``backup_dir``, then overwrite its files with garbage."""
    backup_dir.mkdir()
    live, copy = sqlite3.connect(db), sqlite3.connect(backup_dir / FILE_NAME)
    try:
        live.backup(copy)
    finally:
        live.close()
        copy.close()
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        with path.open("r+b") as file:
            file.write(b"\x5a" * max(path.stat().st_size, 4096))


def restore(db: Path, backup_dir: Path) -> None:
    """Put the backup back in place, as an operator would, under the running server."""
    db.write_bytes((backup_dir / FILE_NAME).read_bytes())
    Path(f"{db}-wal").write_bytes(b"")
    shm = Path(f"{db}-shm")
    with shm.open("r+b") as file:  # the server has it mapped: zero it, do not truncate
        file.write(b"\0" * shm.stat().st_size)


async def _refused_while_failing(h: Harness) -> HttpResponse:
    """dave's role was never looked up, so the store must answer: a 503 to retry."""
    refused = await upgrade_refused(h.port, hub_target("entries", "s1"), token=h.token("dave"))
    assert refused.status == 503, refused
    assert refused.headers["retry-after"] == "1"
    return refused


async def _open_connections_are_served(
    h: Harness, b: Bystander, alice: HubClient, carol: HubClient
) -> None:
    """The open connections keep their last known roles."""
    await b.check()
    for client, site in [(alice, "s1"), (carol, "s2")]:
        (event_id,) = await publish_ok(h, "entries", {"site_id": site})
        assert (await client.next_event())["id"] == event_id


async def _recovered(h: Harness, b: Bystander, alice: HubClient, carol: HubClient) -> None:
    """carol's revoke (made during the outage) applies; alice and dave are served."""
    ended = await carol.expect_close()
    assert ended.close is not None and not ended.close.get("allowReconnect", False)
    await wait_for_readyz(h, 200)
    (event_id,) = await publish_ok(h, "entries", {"site_id": "s1"})
    assert (await alice.next_event())["id"] == event_id
    await b.check()
    async with open_hub(h, hub_target("entries", "s1"), token=h.token("dave")):
        pass


async def test_locked_database_refuses_new_connections_and_keeps_the_others(
    tmp_path: Path, dev_key: DevKey, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async with sqlite_server(tmp_path, dev_key, nursery) as h:
        for site, subject in [("s1", "alice"), ("s1", "dave"), ("s2", "carol")]:
            h.grant(site, subject, Role.SITE_ADMIN)
        with trio.fail_after(40):
            async with (
                bystander(h) as b,
                open_hub(h, hub_target("entries", "s1")) as alice,
                open_hub(h, hub_target("entries", "s2"), token=h.token("carol")) as carol,
            ):
                await wait_for_readyz(h, 200)
                async with hold_wal_locks(tmp_path / "data" / FILE_NAME):
                    held_at = trio.current_time()
                    refused = await _refused_while_failing(h)
                    assert trio.current_time() - held_at < 5, "no timely answer"
                    assert refused.text == "permission store unavailable\n"
                    await wait_for_readyz(h, 503)
                    await _open_connections_are_served(h, b, alice, carol)
                    # Hold long enough for the watcher to fail more than once.
                    await trio.sleep_until(held_at + 5)
                    await b.check()
                await wait_for_readyz(h, 200)
                h.store.revoke("s2", "carol")
                await _recovered(h, b, alice, carol)
        assert h.server.app.stats.revoked_closed == 1
    assert len(unavailable_warnings(caplog)) == 1, unavailable_warnings(caplog)


async def test_corrupt_database_is_survived_and_a_restore_applies_its_revokes(
    tmp_path: Path, dev_key: DevKey, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hubserver")
    db = tmp_path / "data" / FILE_NAME
    backup_dir = tmp_path / "backup"
    async with sqlite_server(tmp_path, dev_key, nursery) as h:
        for site, subject in [("s1", "alice"), ("s1", "dave"), ("s2", "carol")]:
            h.grant(site, subject, Role.SITE_ADMIN)
        with trio.fail_after(40):
            async with (
                bystander(h) as b,
                open_hub(h, hub_target("entries", "s1")) as alice,
                open_hub(h, hub_target("entries", "s2"), token=h.token("carol")) as carol,
            ):
                await wait_for_readyz(h, 200)
                corrupt(db, backup_dir)

                await _refused_while_failing(h)
                await wait_for_readyz(h, 503)
                await trio.sleep(1.5)  # several failed polls
                await _open_connections_are_served(h, b, alice, carol)

                # The operator restores a backup in which carol was revoked meanwhile.
                with SqlitePermissionStore.open(backup_dir) as restored:
                    assert restored.revoke("s2", "carol")
                restore(db, backup_dir)
                await _recovered(h, b, alice, carol)
        assert h.server.app.stats.revoked_closed == 1
    assert len(unavailable_warnings(caplog)) == 1, unavailable_warnings(caplog)
    assert any("available again" in r.getMessage() for r in caplog.records)


# --- the store and the watcher on their own -------------------------------------------------


async def test_sqlite_lookup_has_a_deadline(tmp_path: Path) -> None:
    with SqlitePermissionStore.open(tmp_path, call_timeout=0.5) as store:
        store.grant("s1", "alice", Role.SITE_USER)
        assert store.is_available
        with trio.fail_after(10):
            async with hold_wal_locks(tmp_path / FILE_NAME):
                started = trio.current_time()
                with pytest.raises(PermissionStoreUnavailable, match=r"within 0\.5 s"):
                    await store.role_of("s1", "alice")
                assert trio.current_time() - started < 1.5
                assert not store.is_available
                # A call queued behind the stuck one gives up as well.
                with pytest.raises(PermissionStoreUnavailable):
                    await store.version()
            assert await store.role_of("s1", "alice") is Role.SITE_USER
            assert store.is_available


async def test_sqlite_store_without_its_version_row_is_unavailable(tmp_path: Path) -> None:
    with SqlitePermissionStore.open(tmp_path) as store:
        with sqlite3.connect(tmp_path / FILE_NAME) as other:
            other.execute("DELETE FROM meta")
        other.close()
        with pytest.raises(PermissionStoreUnavailable, match="no version row"):
            await store.version()
        assert not store.is_available


async def test_watcher_backs_off_logs_once_and_rechecks_after_recovery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="hubserver")
    rechecks = 0

    async def recheck(pairs: frozenset[tuple[str, str]] | None) -> None:
        nonlocal rechecks
        assert pairs is None  # a version change without notices: everyone
        rechecks += 1

    with SqlitePermissionStore.open(tmp_path) as store, trio.fail_after(10):
        other = sqlite3.connect(tmp_path / FILE_NAME, isolation_level=None)
        try:
            (version,) = other.execute("SELECT value FROM meta").fetchone()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(
                        watch_permissions,
                        store,
                        recheck,
                        poll_interval=0.05,
                        max_retry_interval=0.4,
                    )
                )
                await trio.sleep(0.3)
                assert rechecks == 0  # nothing changed
                other.execute("DELETE FROM meta")  # every version() now fails
                await trio.sleep(2)
                attempts = len(unavailable_warnings(caplog)) + sum(
                    "still unavailable" in r.getMessage() for r in caplog.records
                )
                # 0.05 s doubling to 0.4 s: ~8 attempts in 2 s, not 40.
                assert 4 <= attempts <= 12, attempts
                # Back with the very same version: re-checked all the same.
                other.execute("INSERT INTO meta (key, value) VALUES ('version', ?)", (version,))
                while rechecks == 0:  # noqa: ASYNC110 (the count is all there is)
                    await trio.sleep(0.05)
                await trio.sleep(0.3)
                assert rechecks == 1
                nursery.cancel_scope.cancel()
        finally:
            other.close()
    assert len(unavailable_warnings(caplog)) == 1


async def test_a_stuck_database_keeps_to_one_thread(tmp_path: Path) -> None:
    # Found in review: every lookup during a lock took (and abandoned) a thread
    # of trio's default limiter, so after 40 of them nothing else that needs a
    # thread (a Redis or JWKS host name lookup) could run.
    with SqlitePermissionStore.open(tmp_path, call_timeout=0.5) as store:
        store.grant("s1", "alice", Role.SITE_USER)
        with trio.fail_after(10):
            async with hold_wal_locks(tmp_path / FILE_NAME):

                async def look_up() -> None:
                    with pytest.raises(PermissionStoreUnavailable):
                        await store.role_of("s1", f"user-{trio.current_time()}")

                async with trio.open_nursery() as nursery:
                    for _ in range(60):
                        nursery.start_soon(look_up)
                    await trio.sleep(0.2)
                    started = trio.current_time()
                    await trio.to_thread.run_sync(lambda: None)
                    assert trio.current_time() - started < 0.2
