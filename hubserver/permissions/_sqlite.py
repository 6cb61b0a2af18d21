"""`SqlitePermissionStore`: roles in a SQLite file shared by the server and the CLI."""

from __future__ import annotations

import builtins
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Final, Self, TypeVar

import trio

from ._model import Member, Role, check_id, check_role, is_id
from ._store import PermissionStoreError, PermissionStoreUnavailable

__all__ = ["SqlitePermissionStore", "read_members"]

_T = TypeVar("_T")

FILE_NAME: Final = "permissions.sqlite3"
#: How long a statement waits for another process's write lock, in seconds.
BUSY_TIMEOUT: Final = 5.0
#: How long `role_of` and `version` may take before they raise, in seconds.
CALL_TIMEOUT: Final = 2.0

_ROLE_VALUES: Final = ", ".join(f"'{role.value}'" for role in Role)
_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS members (
    site_id    TEXT NOT NULL,
    subject    TEXT NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ({_ROLE_VALUES})),
    granted_at TEXT NOT NULL,
    PRIMARY KEY (site_id, subject)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('version', 0);
"""
_BUMP_VERSION: Final = "UPDATE meta SET value = value + 1 WHERE key = 'version'"


class SqlitePermissionStore:
    """A `PermissionStore` over ``permissions.sqlite3`` in the data directory.

    Several processes may open the same file: the server reads while the
    ``hubserver members`` CLI writes. Every grant or revoke bumps the
    ``meta.version`` row in the same transaction, which is how `version` sees
    changes made by another process.

    One connection serves every thread. Trio runs `role_of` and `version` in
    its worker threads, which come and go, so per-thread connections could not
    all be closed by `close` (and would leak on each retired thread); the
    statements are single-row lookups, so serialising them on a
    ``threading.Lock`` costs nothing measurable.

    `role_of` and `version` raise `PermissionStoreUnavailable` for any
    database failure and after ``call_timeout`` seconds: a busy timeout alone
    would not do, since a reader that finds the WAL locks held by another
    process retries inside SQLite for about 10 s and then fails with
    "locking protocol", whatever the busy timeout. The thread of a call past
    its deadline is abandoned and finishes on its own; calls queued behind it
    on the lock give up after ``call_timeout`` too, so threads do not pile up.
    """

    def __init__(self, conn: sqlite3.Connection, *, call_timeout: float = CALL_TIMEOUT) -> None:
        """Wrap an open connection; prefer `open`, which also creates the schema."""
        self._conn = conn
        self._lock = threading.Lock()
        # One thread at a time: SQLite serializes on ``_lock`` anyway.
        self._limiter = trio.CapacityLimiter(1)
        self._call_timeout = call_timeout
        self._is_closed = False
        self._is_available = True

    @classmethod
    def open(cls, data_dir: Path, *, call_timeout: float = CALL_TIMEOUT) -> Self:
        """Open (creating if needed) ``data_dir`` and ``permissions.sqlite3`` in it.

        Args:
            data_dir: the data directory.
            call_timeout: the deadline of each `role_of` and `version`, in seconds.

        Raises:
            PermissionStoreError: the directory or database cannot be created or opened.
        """
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PermissionStoreError(f"cannot create data directory {data_dir}: {exc}") from exc
        try:
            # isolation_level=None: no implicit transaction stays open between
            # reads, so each read sees the latest commit of any process.
            conn = sqlite3.connect(
                data_dir / FILE_NAME,
                timeout=BUSY_TIMEOUT,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise PermissionStoreError(f"cannot open {data_dir / FILE_NAME}: {exc}") from exc
        store = cls(conn, call_timeout=call_timeout)
        try:
            with store._locked():
                # WAL lets the server read while the CLI writes; it is a
                # property of the file, so setting it on every open is harmless.
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
        except BaseException:
            conn.close()
            raise
        return store

    def close(self) -> None:
        """Close the connection; later calls raise `PermissionStoreError`. Idempotent.

        A lookup abandoned at its deadline may still be running in its thread;
        close waits for it at most ``call_timeout`` seconds, then leaves the
        connection to process exit rather than close it under that thread.
        """
        self._is_closed = True
        if self._lock.acquire(timeout=self._call_timeout):
            try:
                self._conn.close()
            finally:
                self._lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def role_of(self, site_id: str, subject: str) -> Role | None:
        """See `PermissionStore.role_of`; runs in a worker thread."""
        if not is_id(site_id) or not is_id(subject):
            await trio.lowlevel.checkpoint()
            return None  # never granted, so unknown (and no UTF-8 form to bind)
        return await self._call(lambda: self._role_of(site_id, subject))

    async def version(self) -> int:
        """See `PermissionStore.version`; runs in a worker thread."""
        return await self._call(self._version)

    @property
    def is_available(self) -> bool:
        """False since a lookup failed or timed out, until one succeeds."""
        return self._is_available

    async def _call(self, fn: Callable[[], _T]) -> _T:
        # abandon_on_cancel: a thread stuck in SQLite cannot be interrupted, and
        # the caller (a request, the watcher) must not wait for it. The
        # abandoned thread only ever touches the connection under the lock,
        # which `close` respects.
        with trio.move_on_after(self._call_timeout):
            try:
                # Its own limiter of one: while SQLite is stuck, the abandoned
                # thread keeps the slot, later calls wait for it (within their
                # deadline) instead of starting threads, and trio's default
                # limiter (name lookups use it) keeps all its slots.
                result = await trio.to_thread.run_sync(
                    fn, abandon_on_cancel=True, limiter=self._limiter
                )
            except PermissionStoreUnavailable:
                self._is_available = False
                raise
            self._is_available = True
            return result
        self._is_available = False
        raise PermissionStoreUnavailable(
            f"the permission database did not answer within {self._call_timeout:g} s"
        )

    def grant(self, site_id: str, subject: str, role: Role) -> None:
        """Give ``subject`` ``role`` on ``site_id``, replacing any role it had there.

        Raises:
            ValueError: an id is empty, too long or not a string, or role is not a Role.
            PermissionStoreError: the database failed.
        """
        row = (check_id("site_id", site_id), check_id("subject", subject), check_role(role).value)
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO members (site_id, subject, role, granted_at)"
                " VALUES (?, ?, ?, ?)",
                (*row, datetime.now(UTC).isoformat()),
            )
            conn.execute(_BUMP_VERSION)

    def grant_many(self, grants: Iterable[tuple[str, str, Role]]) -> int:
        """Give each ``(site_id, subject, role)``, all in one transaction.

        Every row is checked before anything is written, and the rows commit
        together with one version bump, or none does: a server re-checks its
        connections once, and setting up thousands of sites takes one fsync,
        not one per site. A later row for the same site and subject wins, as
        with `grant` one after the other.

        Returns:
            How many rows were given.

        Raises:
            ValueError: an id is empty, too long or not a string, or a role is
                not a Role (naming the row by its index); nothing is written.
            PermissionStoreError: the database failed; nothing is written.
        """
        rows = _checked_rows(grants)
        if not rows:
            return 0
        granted_at = datetime.now(UTC).isoformat()
        with self._write() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO members (site_id, subject, role, granted_at)"
                " VALUES (?, ?, ?, ?)",
                [(*row, granted_at) for row in rows],
            )
            conn.execute(_BUMP_VERSION)
        return len(rows)

    def revoke(self, site_id: str, subject: str) -> bool:
        """Remove ``subject``'s role on ``site_id``; False if it had none.

        Raises:
            ValueError: an id is empty, too long or not a string.
            PermissionStoreError: the database failed.
        """
        key = (check_id("site_id", site_id), check_id("subject", subject))
        with self._write() as conn:
            cursor = conn.execute("DELETE FROM members WHERE site_id = ? AND subject = ?", key)
            # Nothing changed, so nothing for the server to re-check.
            if cursor.rowcount > 0:
                conn.execute(_BUMP_VERSION)
        return cursor.rowcount > 0

    def list(self, site_id: str | None = None) -> builtins.list[Member]:
        """Return the members of one site (or of all sites), sorted by site and subject.

        Raises:
            ValueError: ``site_id`` is given but empty, too long or not a string.
            PermissionStoreError: the database failed.
        """
        query = "SELECT site_id, subject, role, granted_at FROM members"
        params: tuple[str, ...] = ()
        if site_id is not None:
            query, params = query + " WHERE site_id = ?", (check_id("site_id", site_id),)
        with self._locked() as conn:
            rows = conn.execute(query + " ORDER BY site_id, subject", params).fetchall()
        return [
            Member(
                site_id=site,
                subject=subject,
                role=Role(role),
                granted_at=datetime.fromisoformat(granted_at),
            )
            for site, subject, role, granted_at in rows
        ]

    def _role_of(self, site_id: str, subject: str) -> Role | None:
        with self._locked() as conn:
            row = conn.execute(
                "SELECT role FROM members WHERE site_id = ? AND subject = ?", (site_id, subject)
            ).fetchone()
        if row is None:
            return None
        try:
            return Role(row[0])
        except ValueError as exc:  # the file was edited around the CHECK constraint
            raise PermissionStoreUnavailable(
                "the permission database holds an unknown role"
            ) from exc

    def _version(self) -> int:
        with self._locked() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        if row is None or not isinstance(row[0], int):
            raise PermissionStoreUnavailable("the permission database has no version row")
        return row[0]

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        # The one place sqlite3 errors become ours. The lock wait is bounded:
        # a lookup abandoned at its deadline may still hold it.
        if not self._lock.acquire(timeout=self._call_timeout):
            raise PermissionStoreUnavailable("the permission database is busy with an earlier call")
        try:
            if self._is_closed:
                raise PermissionStoreUnavailable("the permission store is closed")
            yield self._conn
        except sqlite3.Error as exc:
            raise PermissionStoreUnavailable(f"permission database error: {exc}") from exc
        finally:
            self._lock.release()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # One transaction per change, so a change and its version bump commit
        # together or not at all. IMMEDIATE takes the write lock up front, so
        # two writers (server and CLI) queue on the busy timeout, not deadlock.
        with self._locked() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")


def read_members(path: Path) -> builtins.list[Member]:
    """Every grant of a store's file, sorted by site and subject, the file opened read-only.

    For copying a node's grants elsewhere (``hubserver members import``): the
    file is never created, migrated or written, so a node that still runs on
    it is not disturbed.

    Args:
        path: a ``permissions.sqlite3`` file, or the data directory holding one.

    Raises:
        PermissionStoreError: no such file, or it cannot be read as a store's file.
    """
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise PermissionStoreError(f"{path} is not a file")
    try:
        # mode=ro: nothing is created or changed (WAL readers still share the file's locks).
        conn = sqlite3.connect(
            f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT
        )
    except sqlite3.Error as exc:
        raise PermissionStoreError(f"cannot open {path}: {exc}") from exc
    try:
        rows = conn.execute(
            "SELECT site_id, subject, role, granted_at FROM members ORDER BY site_id, subject"
        ).fetchall()
        return [
            Member(
                site_id=check_id("site_id", site),
                subject=check_id("subject", subject),
                role=Role(role),
                granted_at=datetime.fromisoformat(granted_at),
            )
            for site, subject, role, granted_at in rows
        ]
    except (sqlite3.Error, ValueError, TypeError) as exc:
        raise PermissionStoreError(f"cannot read the grants in {path}: {exc}") from exc
    finally:
        conn.close()


def _checked_rows(grants: Iterable[tuple[str, str, Role]]) -> builtins.list[tuple[str, str, str]]:
    rows = []
    for index, (site_id, subject, role) in enumerate(grants):
        try:
            rows.append(
                (check_id("site_id", site_id), check_id("subject", subject), check_role(role).value)
            )
        except ValueError as exc:
            raise ValueError(f"grant {index}: {exc}") from exc
    return rows
