"""Finding the token in a request, and keeping it out of logs.

ASP.NET Core SignalR clients send the token as ``Authorization: Bearer <token>``,
except browsers' WebSocket API, which cannot set headers: there it travels as
the ``access_token`` query parameter. So a request target may hold a token, and
must go through ``redact_url`` before anything logs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final
from urllib.parse import unquote_plus

__all__ = ["ACCESS_TOKEN_PARAMETER", "extract_token", "redact_url"]

#: The query parameter SignalR clients put the token in.
ACCESS_TOKEN_PARAMETER: Final = "access_token"
_REDACTED: Final = "***"


def extract_token(headers: Sequence[tuple[bytes, bytes]], query: Mapping[str, str]) -> str | None:
    """Find the bearer token of a request.

    The ``Authorization`` header wins over the query parameter. The scheme is
    matched case-insensitively (RFC 7235 §2.1); other schemes are ignored.

    Args:
        headers: the request headers, as h11 gives them (names in any case).
        query: the decoded query parameters.

    Returns:
        The token, or None when the request carries none.
    """
    for name, value in headers:
        if name.lower() != b"authorization":
            continue
        # Latin-1 never fails; a token with odd bytes then fails verification,
        # which is the right answer (401) for odd credentials.
        scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
        token = credentials.strip()
        if scheme.lower() == "bearer" and token:
            return token
    token = query.get(ACCESS_TOKEN_PARAMETER, "")
    return token or None


def redact_url(target: str) -> str:
    """Replace the value of every ``access_token`` query parameter with ``***``.

    The rest of the target stays byte for byte as it was. Parameter names are
    compared after percent-decoding and case-folding, so ``access%5Ftoken`` and
    ``Access_Token`` are caught too (ASP.NET Core reads the query case-insensitively).

    Args:
        target: a request target (``/path?query``) or a whole URL.

    Returns:
        The target, safe to log.
    """
    path, mark, rest = target.partition("?")
    if not mark:
        return target
    query, hash_mark, fragment = rest.partition("#")
    fields = []
    for field in query.split("&"):
        name, equals, _ = field.partition("=")
        if equals and unquote_plus(name).casefold() == ACCESS_TOKEN_PARAMETER:
            field = f"{name}={_REDACTED}"
        fields.append(field)
    return f"{path}?{'&'.join(fields)}{hash_mark}{fragment}"
