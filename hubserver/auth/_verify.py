"""Token verification as a pure function: token, keys and the time in, ``Claims`` out.

Order of checks, and why:

1. The token's shape (three base64url segments, bounded length), so that
   nothing below ever sees non-ASCII text or a megabyte of garbage.
2. The header's ``alg`` against the allow-list, *before* any key is chosen:
   ``none`` and HS* die here, so a public key can never be used as an HMAC
   secret (RFC 8725 §2.1, §3.1).
3. The key, by ``kid``, and that ``alg`` suits the key's type.
4. The signature, by PyJWT, with all of PyJWT's claim checks off: it would read
   the wall clock, and we take ``now`` from the caller so tests can pick it.
5. The claims: ``exp`` (required), ``nbf``, ``iss``, ``aud``, ``sub``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Final

import jwt
from jwt.types import Options

from ._claims import Claims, read_audience
from ._errors import InvalidToken, UnknownKeyId
from ._keys import DEFAULT_ALGORITHMS, SUPPORTED_ALGORITHMS, KeySet

__all__ = ["DEFAULT_LEEWAY", "MAX_TOKEN_BYTES", "verify"]

#: Default allowance for clock skew between the issuer and us, in seconds.
DEFAULT_LEEWAY: Final = 30.0
#: Longest token accepted, in bytes; far above real access tokens, far below harm.
MAX_TOKEN_BYTES: Final = 16 * 1024

# JWS compact serialization (RFC 7515 §7.1). The signature may be empty so that
# an unsigned token is refused for its algorithm, which is the clearer message.
_COMPACT_JWS: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Header values we are willing to echo in a message.
_PRINTABLE_NAME: Final = re.compile(r"[A-Za-z0-9+_-]{1,16}")

_SIGNATURE_ONLY: Final[Options] = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
}


def verify(
    token: str,
    keys: KeySet,
    now: float,
    *,
    issuer: str | None,
    audience: str | None,
    leeway: float = DEFAULT_LEEWAY,
    algorithms: frozenset[str] = DEFAULT_ALGORITHMS,
) -> Claims:
    """Verify a bearer token and return its claims.

    Pure: no clock, no I/O. For any string ``token`` this returns ``Claims`` or
    raises ``InvalidToken``; nothing else.

    Args:
        token: the compact JWS, as sent by the client.
        keys: the trusted public keys.
        now: the current time, unix seconds (the ``exp``/``nbf`` clock).
        issuer: the required ``iss``, or None to accept any.
        audience: a value the ``aud`` claim must hold, or None to accept any.
        leeway: seconds of clock skew allowed on ``exp`` and ``nbf``.
        algorithms: the allowed ``alg`` values; only those in
            ``SUPPORTED_ALGORITHMS`` are ever honoured.

    Returns:
        The token's claims.

    Raises:
        UnknownKeyId: the header names a ``kid`` the key set lacks (refresh, retry once).
        InvalidToken: anything else wrong with the token.
    """
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidToken(f"token is longer than {MAX_TOKEN_BYTES} bytes")
    if not _COMPACT_JWS.fullmatch(token):
        raise InvalidToken("token is malformed (expected a compact JWS: three base64url parts)")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise InvalidToken("token header is malformed") from exc

    alg = header.get("alg")
    if not isinstance(alg, str):
        raise InvalidToken("token header has no 'alg'")
    if alg not in algorithms or alg not in SUPPORTED_ALGORITHMS:
        shown = alg if _PRINTABLE_NAME.fullmatch(alg) else "in the header"
        raise InvalidToken(f"algorithm {shown} is not allowed")

    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise InvalidToken("token header 'kid' is not a string")
    key = keys.get(kid)
    if key is None:
        if kid is None:
            raise InvalidToken("token header has no 'kid' and the key set holds several keys")
        raise UnknownKeyId(kid)
    if alg not in key.algorithms:
        raise InvalidToken(f"algorithm {alg} does not suit the {key.key_type} signing key")

    try:
        payload = jwt.decode(token, key=key.public_key, algorithms=[alg], options=_SIGNATURE_ONLY)
    except jwt.InvalidSignatureError as exc:
        raise InvalidToken("token signature is invalid") from exc
    except jwt.PyJWTError as exc:
        raise InvalidToken("token is malformed") from exc

    _check_times(payload, now, leeway)
    if issuer is not None and payload.get("iss") != issuer:
        raise InvalidToken(f"token issuer is not the expected {issuer!r}")
    if audience is not None and audience not in read_audience(payload):
        raise InvalidToken(f"token audience does not include {audience!r}")
    return Claims.from_payload(payload)


def _check_times(payload: Mapping[str, object], now: float, leeway: float) -> None:
    # RFC 7519 §4.1.4: reject "on or after" exp; §4.1.5: reject "before" nbf.
    expires_at = _numeric_date(payload, "exp")
    if expires_at is None:
        raise InvalidToken("token has no expiry ('exp' is required)")
    if now >= expires_at + leeway:
        raise InvalidToken("token expired")
    not_before = _numeric_date(payload, "nbf")
    if not_before is not None and now + leeway < not_before:
        raise InvalidToken("token is not valid yet ('nbf' is in the future)")


def _numeric_date(payload: Mapping[str, object], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    # bool is an int in Python, but `"exp": true` is no date (RFC 7519 §2 NumericDate).
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"token {name!r} claim is not a number")
    try:
        seconds = float(value)
    except OverflowError as exc:
        raise InvalidToken(f"token {name!r} claim is out of range") from exc
    if not math.isfinite(seconds):
        raise InvalidToken(f"token {name!r} claim is out of range")
    return seconds
