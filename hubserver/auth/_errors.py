"""The auth branch of the exception tree.

``AuthError`` sits under hubcore's ``HubError`` and carries the HTTP status the
server answers with: ``InvalidToken`` is 401 (who are you?), ``Forbidden`` is
403 (we know who you are, and the answer is no), ``KeysUnavailable`` is 503 (we
cannot tell, because the signing keys could not be fetched). ``KeyConfigError``
is not an ``AuthError``: it means our own key configuration is wrong, which no
client request can cause or fix.

Messages never contain the token, nor any claim value other than the subject,
because they end up in logs and sometimes in responses.
"""

from __future__ import annotations

from typing import ClassVar, Final

from hubcore._errors import HubError

__all__ = [
    "AuthError",
    "Forbidden",
    "InvalidToken",
    "KeyConfigError",
    "KeysUnavailable",
    "UnknownKeyId",
    "quote_for_log",
]

_MAX_QUOTED_CHARS: Final = 64


def quote_for_log(value: str) -> str:
    """Quote an untrusted string for an error message: repr-escaped and truncated.

    ``repr`` escapes control characters, so a hostile ``kid`` or subject cannot
    forge log lines; truncation keeps a hostile one from flooding them.
    """
    if len(value) > _MAX_QUOTED_CHARS:
        return repr(value[:_MAX_QUOTED_CHARS]) + "..."
    return repr(value)


class AuthError(HubError):
    """A request could not be authenticated or authorized.

    Attributes:
        status: the HTTP status code to answer the request with.
    """

    status: ClassVar[int] = 401


class InvalidToken(AuthError):
    """The bearer token is missing, malformed, badly signed, expired or not for us (401)."""

    status: ClassVar[int] = 401


class UnknownKeyId(InvalidToken):
    """The token names a ``kid`` that the key set does not hold (401).

    The issuer may have rotated its keys, so a caller holding a JWKS URL should
    refresh the key set (rate-limited) and verify once more.

    Attributes:
        kid: the key id from the token header; untrusted, quote it when logging.
    """

    def __init__(self, kid: str) -> None:
        super().__init__(f"unknown signing key (kid {quote_for_log(kid)})")
        self.kid = kid


class Forbidden(AuthError):
    """The token is valid but lacks a required scope or role (403)."""

    status: ClassVar[int] = 403


class KeysUnavailable(AuthError):
    """No signing keys could be obtained (the JWKS fetch failed), so nothing verifies (503)."""

    status: ClassVar[int] = 503


class KeyConfigError(HubError):
    """A key set, JWKS document or key file is unusable (an operator error, not a client's)."""
