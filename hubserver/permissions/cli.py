"""What ``hubserver members grant|revoke|list`` does; the argparse wiring is in ``__main__``.

Each function opens the store in the data directory, does one thing, closes
it, and returns the line(s) to print. A running server sees the change at its
next version poll.
"""

from __future__ import annotations

from pathlib import Path

from ._model import Member, parse_role
from ._sqlite import SqlitePermissionStore

__all__ = ["grant", "list_members", "revoke"]

_HEADERS = ("SITE", "SUBJECT", "ROLE", "GRANTED AT")


def grant(data_dir: Path, site: str, subject: str, role_name: str) -> str:
    """Grant a role, replacing the subject's previous role on the site.

    Raises:
        ValueError: unknown role name (the message lists the valid ones) or bad id.
        PermissionStoreError: the database failed.
    """
    role = parse_role(role_name)
    with SqlitePermissionStore.open(data_dir) as store:
        store.grant(site, subject, role)
    return f"granted {role.value} on site {site} to subject {subject}"


def revoke(data_dir: Path, site: str, subject: str) -> str:
    """Revoke the subject's role on the site, saying whether it had one.

    Raises:
        ValueError: bad id.
        PermissionStoreError: the database failed.
    """
    with SqlitePermissionStore.open(data_dir) as store:
        removed = store.revoke(site, subject)
    if removed:
        return f"revoked subject {subject} on site {site}"
    return f"subject {subject} has no role on site {site}; nothing revoked"


def list_members(data_dir: Path, site: str | None = None) -> str:
    """Return the members (of one site, or all) as an aligned table, or ``no members``.

    Raises:
        ValueError: bad site id.
        PermissionStoreError: the database failed.
    """
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
