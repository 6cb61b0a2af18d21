"""Authentication for hubserver: bearer JWTs checked against asymmetric keys.

``verify(token, keys, now)`` is a pure function; ``StaticKeys`` and ``JwksCache``
wrap it behind the ``TokenVerifier`` seam the server awaits. ``extract_token``
finds the token in a request and ``redact_url`` keeps it out of logs.
"""

from __future__ import annotations

from ._cache import CachingVerifier
from ._claims import Claims
from ._dev import DEV_AUDIENCE, DEV_ISSUER, DEV_KEY_FILENAME, DevKey, ensure_dev_key
from ._errors import (
    AuthError,
    Forbidden,
    InvalidToken,
    KeyConfigError,
    KeysUnavailable,
    UnknownKeyId,
)
from ._keys import (
    DEFAULT_ALGORITHMS,
    SUPPORTED_ALGORITHMS,
    KeySet,
    VerificationKey,
    load_jwks_file,
)
from ._request import ACCESS_TOKEN_PARAMETER, extract_token, redact_url
from ._sources import JwksCache, StaticKeys, TokenVerifier
from ._verify import DEFAULT_LEEWAY, MAX_TOKEN_BYTES, verify

__all__ = [
    "ACCESS_TOKEN_PARAMETER",
    "AuthError",
    "CachingVerifier",
    "Claims",
    "DEFAULT_ALGORITHMS",
    "DEFAULT_LEEWAY",
    "DEV_AUDIENCE",
    "DEV_ISSUER",
    "DEV_KEY_FILENAME",
    "DevKey",
    "Forbidden",
    "InvalidToken",
    "JwksCache",
    "KeyConfigError",
    "KeySet",
    "KeysUnavailable",
    "MAX_TOKEN_BYTES",
    "StaticKeys",
    "SUPPORTED_ALGORITHMS",
    "TokenVerifier",
    "UnknownKeyId",
    "VerificationKey",
    "ensure_dev_key",
    "extract_token",
    "load_jwks_file",
    "redact_url",
    "verify",
]
