"""What ``hubserver members grant|revoke|list|import`` does; the argparse wiring is in ``__main__``.

Each function opens the store, does one thing, closes it, and returns the
line(s) to print. The store is the SQLite file in the data directory, or,
given ``redis_url``, the Redis a fleet shares (`RedisPermissionStore`). A
running server sees the change at once through Redis's change notices, or
at its next version poll. Granting many sites at once (``--site`` repeated,
``--sites-file``) is one transaction: thousands of sites take one commit.

``import_from_sqlite`` copies a node's SQLite grants into the fleet's Redis
(moving a fleet to ``--backplane``): first it compares every grant, and
refuses, writing nothing, when Redis holds another role for one of them
(unless ``overwrite``); then it writes in batches, each one script.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Final, Literal, TypeVar

import trio

from hubserver.backplane import BackplaneError, parse_redis_url

from ._model import Member, Role, check_id, parse_role
from ._redis import Found, Held, RedisPermissionStore
from ._sqlite import FILE_NAME as SQLITE_FILE_NAME
from ._sqlite import SqlitePermissionStore, read_members
from ._store import PermissionStoreError

__all__ = [
    "IMPORT_BATCH_GRANTS",
    "grant",
    "grant_sites",
    "import_from_sqlite",
    "list_members",
    "read_sites_file",
    "revoke",
]

_HEADERS = ("SITE", "SUBJECT", "ROLE", "GRANTED AT")
#: Grants per import script: Redis runs a script alone, so a big file is cut in
#: pieces that each hold it for a moment only (and whose notice names its pairs).
IMPORT_BATCH_GRANTS: Final = 500
#: Grants with another role in Redis listed by name; the rest are counted.
MAX_LISTED_CONFLICTS: Final = 20
_T = TypeVar("_T")


def _on_redis(redis_url: str, action: Callable[[RedisPermissionStore], Awaitable[_T]]) -> _T:
    async def run() -> _T:
        async with RedisPermissionStore(redis_url) as store:
            return await action(store)

    return trio.run(run)


def grant(
    data_dir: Path, site: str, subject: str, role_name: str, *, redis_url: str | None = None
) -> str:
    """Grant a role, replacing the subject's previous role on the site.

    Raises:
        ValueError: unknown role name (the message lists the valid ones) or bad id.
        PermissionStoreError: the database (or Redis) failed.
    """
    role = parse_role(role_name)
    if redis_url is not None:
        _on_redis(redis_url, lambda store: store.grant(site, subject, role))
    else:
        with SqlitePermissionStore.open(data_dir) as store:
            store.grant(site, subject, role)
    return f"granted {role.value} on site {site} to subject {subject}"


def grant_sites(
    data_dir: Path,
    sites: Iterable[str],
    subject: str,
    role_name: str,
    *,
    redis_url: str | None = None,
) -> str:
    """Grant one role on every site of ``sites`` in one transaction: all or none.

    A site named twice is granted once.

    Raises:
        ValueError: no site, an unknown role name or a bad id (nothing is granted).
        PermissionStoreError: the database (or Redis) failed (nothing is granted).
    """
    role = parse_role(role_name)
    unique = list(dict.fromkeys(sites))
    if not unique:
        raise ValueError("no site to grant: give --site or a non-empty --sites-file")
    if len(unique) == 1:
        return grant(data_dir, unique[0], subject, role_name, redis_url=redis_url)
    rows: list[tuple[str, str, Role]] = [(site, subject, role) for site in unique]
    if redis_url is not None:
        count = _on_redis(redis_url, lambda store: store.grant_many(rows))
    else:
        with SqlitePermissionStore.open(data_dir) as store:
            count = store.grant_many(rows)
    return f"granted {role.value} on {count} sites to subject {subject}"


def read_sites_file(path: Path) -> list[str]:
    """The site ids of a file, one per line (surrounding blanks and empty lines ignored).

    Raises:
        ValueError: the file cannot be read as UTF-8, or a line is not a usable
            site id (the message names the line).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read sites file {path}: {exc}") from exc
    sites = []
    for number, line in enumerate(text.splitlines(), start=1):
        site = line.strip()
        if not site:
            continue
        try:
            sites.append(check_id("site_id", site))
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}: {exc}") from exc
    return sites


def revoke(data_dir: Path, site: str, subject: str, *, redis_url: str | None = None) -> str:
    """Revoke the subject's role on the site, saying whether it had one.

    Raises:
        ValueError: bad id.
        PermissionStoreError: the database (or Redis) failed.
    """
    if redis_url is not None:
        removed = _on_redis(redis_url, lambda store: store.revoke(site, subject))
    else:
        with SqlitePermissionStore.open(data_dir) as store:
            removed = store.revoke(site, subject)
    if removed:
        return f"revoked subject {subject} on site {site}"
    return f"subject {subject} has no role on site {site}; nothing revoked"


def list_members(data_dir: Path, site: str | None = None, *, redis_url: str | None = None) -> str:
    """Return the members (of one site, or all) as an aligned table, or ``no members``.

    Raises:
        ValueError: bad site id.
        PermissionStoreError: the database (or Redis) failed.
    """
    if redis_url is not None:
        members = _on_redis(redis_url, lambda store: store.list(site))
    else:
        with SqlitePermissionStore.open(data_dir) as store:
            members = store.list(site)
    if not members:
        return "no members"
    rows = [_HEADERS, *(_row(member) for member in members)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _row(member: Member) -> tuple[str, str, str, str]:
    granted_at = member.granted_at.isoformat(timespec="seconds")
    return (member.site_id, member.subject, member.role.value, granted_at)


def import_from_sqlite(
    path: Path,
    redis_url: str,
    *,
    allow_overwrite: bool = False,
    is_dry_run: bool = False,
    batch_size: int = IMPORT_BATCH_GRANTS,
) -> tuple[str, bool]:
    """Copy every grant of a node's SQLite file into the fleet's Redis.

    Idempotent: a grant Redis holds with the same role is left as it is
    (grant time included), so a second run writes nothing. A grant whose
    subject holds another role there is a conflict: without
    ``allow_overwrite`` nothing at all is written and the conflicts are
    listed; with it, the file's role replaces Redis's. Grants keep the time
    they were granted in the file.

    Args:
        path: the ``permissions.sqlite3`` file, or the data directory holding it
            (read only; a node may still run on it).
        redis_url: the fleet's Redis (the nodes' ``--backplane``).
        allow_overwrite: replace the roles Redis holds that differ from the file's.
        is_dry_run: only compare, and say what a run would do.
        batch_size: grants per script.

    Returns:
        The report to print, and whether the import succeeded (or, dry, would).

    Raises:
        PermissionStoreError: the file cannot be read, or Redis failed (the
            message says whether a batch may have been written: run it again,
            it is idempotent).
    """
    members = read_members(path)
    source = path / SQLITE_FILE_NAME if path.is_dir() else path
    if not members:
        return f"no grants in {source}; nothing to import", True
    try:
        where = f"Redis at {parse_redis_url(redis_url)}"
    except BackplaneError as exc:
        raise PermissionStoreError(f"--redis: {exc}") from exc
    batches = [members[i : i + batch_size] for i in range(0, len(members), batch_size)]

    async def run(store: RedisPermissionStore) -> tuple[str, bool]:
        held, _ = await _import_batches(store, batches, "compare")
        counts = _count(held)
        conflicts = _conflicts(members, held)
        head = f"{len(members)} grant(s) of {source}"
        if is_dry_run:
            outcome = (
                "--overwrite replaces them" if allow_overwrite else "refused without --overwrite"
            )
            lines = [
                f"dry run, nothing written: {head} against {where}: "
                f"{counts[Found.NOTHING]} to add, {counts[Found.SAME_ROLE]} already there with "
                f"the same role, {len(conflicts)} with another role there ({outcome})",
                *conflicts,
            ]
            return "\n".join(lines), allow_overwrite or not conflicts
        if conflicts and not allow_overwrite:
            lines = [
                f"refused, nothing written: {head}: {counts[Found.OTHER_ROLE]} have another role "
                f"in {where}. Settle them (hubserver members grant|revoke --redis ...), or run "
                "again with --overwrite to give them the file's role:",
                *conflicts,
            ]
            return "\n".join(lines), False
        mode: Literal["add", "replace"] = "replace" if allow_overwrite else "add"
        held, accepted = await _import_batches(store, batches, mode)
        counts = _count(held)
        if accepted < len(members):
            # A batch found another role granted since the comparison: it wrote nothing.
            added = sum(h.found is Found.NOTHING for h in held[:accepted])
            lines = [
                f"stopped: {head}: another role was granted in {where} during the import; "
                f"{added} grant(s) were added before that, none after. Run again (what is "
                "done is not done twice):",
                *_conflicts(members, held),
            ]
            return "\n".join(lines), False
        replaced = counts[Found.OTHER_ROLE]
        report = (
            f"imported {head} into {where}: {counts[Found.NOTHING]} added, "
            f"{counts[Found.SAME_ROLE]} already there with the same role, {replaced} replaced"
        )
        return report + (" (--overwrite)" if replaced else ""), True

    return _on_redis(redis_url, run)


async def _import_batches(
    store: RedisPermissionStore,
    batches: Sequence[Sequence[Member]],
    mode: Literal["compare", "add", "replace"],
) -> tuple[list[Held], int]:
    """What each grant found, batch by batch, and how many were in batches not refused.

    An ``add`` stops at the first batch refused (it found another role: it
    wrote nothing).
    """
    held: list[Held] = []
    accepted = 0
    for batch in batches:
        outcome = await store.import_grants(batch, mode=mode)
        held += outcome
        if mode == "add" and any(h.found is Found.OTHER_ROLE for h in outcome):
            break
        accepted += len(batch)
    return held, accepted


def _count(held: Sequence[Held]) -> dict[Found, int]:
    return {found: sum(h.found is found for h in held) for found in Found}


def _conflicts(members: Sequence[Member], held: Sequence[Held]) -> list[str]:
    """One line per grant that found another role (the first few), then how many more."""
    lines = []
    for member, h in zip(members, held, strict=False):
        if h.found is Found.OTHER_ROLE:
            there = "a value that is not a role" if h.role is None else h.role.value
            lines.append(
                f"  site {member.site_id}, subject {member.subject}: "
                f"{member.role.value} in the file, {there} in Redis"
            )
    if len(lines) > MAX_LISTED_CONFLICTS:
        lines[MAX_LISTED_CONFLICTS:] = [f"  and {len(lines) - MAX_LISTED_CONFLICTS} more"]
    return lines
