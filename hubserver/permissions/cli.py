"""What ``hubserver members grant|revoke|list`` does; the argparse wiring is in ``__main__``.

Each function opens the store, does one thing, closes it, and returns the
line(s) to print. The store is the SQLite file in the data directory, or,
given ``redis_url``, the Redis a fleet shares (`RedisPermissionStore`). A
running server sees the change at once through Redis's change notices, or
at its next version poll. Granting many sites at once (``--site`` repeated,
``--sites-file``) is one transaction: thousands of sites take one commit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TypeVar

import trio

from ._model import Member, Role, check_id, parse_role
from ._redis import RedisPermissionStore
from ._sqlite import SqlitePermissionStore

__all__ = ["grant", "grant_sites", "list_members", "read_sites_file", "revoke"]

_HEADERS = ("SITE", "SUBJECT", "ROLE", "GRANTED AT")
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
