"""The verified identity a token carries."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ._errors import Forbidden, InvalidToken, quote_for_log

__all__ = ["Claims"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Claims:
    """The claims of a verified token.

    Build it with ``verify()`` (or ``Claims.from_payload`` on a payload whose
    signature and times were already checked); the constructor does not verify.

    Attributes:
        subject: the ``sub`` claim, a non-empty string.
        scopes: from ``scope`` (a space-separated string, RFC 8693 §4.2, or an
            array of strings), else from ``scp`` (Azure AD's name), else empty.
        expires_at: the ``exp`` claim, unix seconds.
        issuer: the ``iss`` claim, if any.
        audience: the ``aud`` claim as a tuple (it may be a string or an array).
        raw: every claim, read-only (a proxy over a private deep copy).
    """

    subject: str
    scopes: frozenset[str] = frozenset()
    expires_at: float | None = None
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    # A mapping proxy is not hashable, and two tokens with the same identity
    # should compare equal whatever else they carry, so raw stays out of eq/hash.
    raw: Mapping[str, object] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    @classmethod
    def from_payload(cls, payload: Mapping[str, object]) -> Claims:
        """Read the identity claims from a decoded JWT payload.

        Args:
            payload: the JSON object of the token's payload.

        Returns:
            The claims. Times are not checked here; ``verify()`` does that.

        Raises:
            InvalidToken: ``sub`` is missing or empty, or a claim has the wrong type.
        """
        subject = payload.get("sub")
        if not isinstance(subject, str) or not subject:
            raise InvalidToken("token has no subject (a non-empty 'sub' claim is required)")
        exp = payload.get("exp")
        issuer = payload.get("iss")
        if issuer is not None and not isinstance(issuer, str):
            raise InvalidToken("token 'iss' claim must be a string")
        return cls(
            subject=subject,
            scopes=_read_scopes(payload),
            expires_at=float(exp) if isinstance(exp, int | float) else None,
            issuer=issuer,
            audience=read_audience(payload),
            raw=MappingProxyType(copy.deepcopy(dict(payload))),
        )

    def has_scope(self, name: str) -> bool:
        """Whether the token was granted the scope ``name``."""
        return name in self.scopes

    def require_scope(self, name: str) -> None:
        """Insist on the scope ``name``.

        Raises:
            Forbidden: the token lacks it.
        """
        if name not in self.scopes:
            raise Forbidden(f"subject {quote_for_log(self.subject)} lacks the scope {name!r}")


def read_audience(payload: Mapping[str, object]) -> tuple[str, ...]:
    """The ``aud`` claim as a tuple; RFC 7519 §4.1.3 allows a string or an array.

    Raises:
        InvalidToken: ``aud`` is neither a string nor an array of strings.
    """
    aud = payload.get("aud")
    if aud is None:
        return ()
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list) and all(isinstance(item, str) for item in aud):
        return tuple(str(item) for item in aud)
    raise InvalidToken("token 'aud' claim must be a string or an array of strings")


def _read_scopes(payload: Mapping[str, object]) -> frozenset[str]:
    for name in ("scope", "scp"):
        value = payload.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            return frozenset(value.split())
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return frozenset(str(item) for item in value)
        raise InvalidToken(f"token {name!r} claim must be a string or an array of strings")
    return frozenset()
