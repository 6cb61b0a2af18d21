"""Roles, members and the subscription rule, with no I/O.

The rule comes from the Event Streaming reference ("Authorization / User
permissions"), identical for the entries and incidents hubs:

- Site entries / incidents: Site Admin, Site Super User
- Site user entries / incidents: Site Admin, Site Super User, Site User (own events)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Final, assert_never

__all__ = ["MAX_ID_CHARS", "Member", "Role", "is_id", "may_subscribe", "parse_role"]

#: Longest site id or subject accepted, in characters.
MAX_ID_CHARS: Final = 256


class Role(enum.Enum):
    """A subject's role on one site; the value is what the store and CLI spell."""

    SITE_ADMIN = "site_admin"
    SITE_SUPER_USER = "site_super_user"
    SITE_USER = "site_user"


def may_subscribe(role: Role | None, *, subject: str, user_id: str | None) -> bool:
    """Decide whether a subject may open one stream of a site (entries or incidents).

    Args:
        role: the subject's role on the stream's site, ``None`` when it has none
            (or the site is unknown).
        subject: the authenticated subject (the JWT ``sub``).
        user_id: the ``user_id`` query parameter; ``None`` for the site stream.

    Returns:
        True if the reference's permission table allows the stream.
    """
    match role:
        case None:
            return False
        case Role.SITE_ADMIN | Role.SITE_SUPER_USER:
            return True
        case Role.SITE_USER:
            # "Site User (own events)": only the user stream named after themselves.
            return user_id is not None and user_id == subject
        case _:
            assert_never(role)


def parse_role(name: str) -> Role:
    """Turn a role name such as ``site_admin`` (or ``Site-Admin``) into a `Role`.

    Raises:
        ValueError: the name is not one of the roles; the message lists them.
    """
    try:
        return Role(name.strip().lower().replace("-", "_"))
    except ValueError:
        valid = ", ".join(role.value for role in Role)
        raise ValueError(f"unknown role {name!r}; expected one of: {valid}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    """One grant: ``subject`` holds ``role`` on ``site_id`` since ``granted_at`` (UTC)."""

    site_id: str
    subject: str
    role: Role
    granted_at: datetime


def check_id(name: str, value: object) -> str:
    """Return ``value`` if it is a usable site id or subject, else raise ValueError."""
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise ValueError(
            f"{name} must be a non-empty string of at most {MAX_ID_CHARS} characters, "
            f"got {_describe(value)}"
        )
    if not _has_utf8_form(value):
        raise ValueError(f"{name} must be text with a UTF-8 form, got a lone surrogate")
    return value


def is_id(value: object) -> bool:
    """True if ``value`` could be a site id or subject (what `check_id` accepts)."""
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS and _has_utf8_form(value)


def _has_utf8_form(value: str) -> bool:
    # Every store keys on UTF-8 (SQLite, Redis, the URL's query) and raises
    # UnicodeEncodeError on a lone surrogate, which JSON ("\ud800" in a token's
    # sub or a notice) and non-UTF-8 command-line bytes can both produce.
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_role(value: object) -> Role:
    """Return ``value`` if it is a `Role`, else raise ValueError."""
    if not isinstance(value, Role):
        raise ValueError(f"role must be a Role, got {_describe(value)}")
    return value


def _describe(value: object) -> str:
    # Ids come from tokens and query strings: show the type and length, not the text.
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    return f"a {type(value).__name__}"
