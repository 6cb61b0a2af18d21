"""Verification keys: which public keys we trust, by ``kid``, and for which algorithms.

Only asymmetric keys are ever accepted. A symmetric (``oct``) key in a JWKS is
refused outright: a server that holds an HMAC secret next to public keys is one
header away from the RS256/HS256 confusion attack (RFC 8725 §2.1).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from ._errors import KeyConfigError, quote_for_log

__all__ = [
    "DEFAULT_ALGORITHMS",
    "KeySet",
    "SUPPORTED_ALGORITHMS",
    "VerificationKey",
    "load_jwks_file",
]

_RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
# RFC 7518 §3.4 ties each ECDSA algorithm to one curve.
_EC_ALGORITHMS: Final = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_OKP_ALGORITHMS: Final = {"Ed25519": "EdDSA"}

#: Every algorithm this package can verify. No ``none`` and no HS*, whatever the caller asks.
SUPPORTED_ALGORITHMS: Final = (
    _RSA_ALGORITHMS | frozenset(_EC_ALGORITHMS.values()) | frozenset(_OKP_ALGORITHMS.values())
)
#: The default allow-list of ``verify()``.
DEFAULT_ALGORITHMS: Final = SUPPORTED_ALGORITHMS

_MIN_RSA_KEY_BITS: Final = 2048  # RFC 7518 §3.3; PyJWT warns on every verify below this
_MAX_JWKS_FILE_BYTES: Final = 1024 * 1024

PublicKey: TypeAlias = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey


@dataclass(frozen=True, slots=True, kw_only=True)
class VerificationKey:
    """One trusted public key.

    Attributes:
        kid: the JWK ``kid``, or None for the lone key of a one-key set.
        algorithms: the algorithms this key may verify: those of its type, or
            only its JWK ``alg`` when it names one.
        public_key: the key itself.
    """

    kid: str | None
    algorithms: frozenset[str]
    public_key: PublicKey

    @property
    def key_type(self) -> str:
        """The JWK ``kty`` of the key: ``RSA``, ``EC`` or ``OKP``."""
        match self.public_key:
            case RSAPublicKey():
                return "RSA"
            case EllipticCurvePublicKey():
                return "EC"
            case _:
                return "OKP"


@dataclass(frozen=True, slots=True)
class KeySet:
    """The public keys a verifier trusts, looked up by ``kid``.

    Kids are unique, and a key without a kid is allowed only as the set's one
    key (with several, a token could not say which one signed it).

    Attributes:
        keys: the keys, in JWKS order.

    Raises:
        KeyConfigError: the set is empty, a kid repeats, or a key lacks a kid
            in a set of several.
    """

    keys: tuple[VerificationKey, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeyConfigError("the key set holds no signing keys")
        kids = [key.kid for key in self.keys]
        if len(kids) > 1 and None in kids:
            raise KeyConfigError("a key set of several keys needs a 'kid' on every key")
        if len(set(kids)) != len(kids):
            raise KeyConfigError("the key set repeats a 'kid'")

    @classmethod
    def from_jwks(cls, document: Mapping[str, object]) -> KeySet:
        """Build a key set from a JWKS document (RFC 7517 §5).

        Keys whose ``use`` is ``enc`` are skipped: they encrypt, and never sign.

        Args:
            document: the parsed JSON, ``{"keys": [...]}``.

        Returns:
            The key set.

        Raises:
            KeyConfigError: the document is not a JWKS, or holds a symmetric,
                private, unsupported or malformed key.
        """
        entries = document.get("keys")
        if not isinstance(entries, list):
            raise KeyConfigError("a JWKS must be a JSON object with a 'keys' array")
        keys = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise KeyConfigError(f"JWKS key #{index} is not a JSON object")
            if entry.get("use") == "enc":
                continue
            keys.append(_key_from_jwk(entry, index))
        return cls(tuple(keys))

    def get(self, kid: str | None) -> VerificationKey | None:
        """The key to check a token with ``kid`` in its header, or None if unknown.

        A set of one kid-less key answers for every token: whoever configured
        it trusts that key, and the token's kid cannot name another.
        A token without a kid is only matched in a set of one key.
        """
        if len(self.keys) == 1 and (kid is None or self.keys[0].kid in (None, kid)):
            return self.keys[0]
        return next((key for key in self.keys if key.kid is not None and key.kid == kid), None)

    @property
    def kids(self) -> frozenset[str]:
        """The key ids in the set."""
        return frozenset(key.kid for key in self.keys if key.kid is not None)


def load_jwks_file(path: pathlib.Path | str) -> KeySet:
    """Read a JWKS document from a file.

    Args:
        path: a UTF-8 JSON file holding ``{"keys": [...]}``.

    Returns:
        The key set.

    Raises:
        KeyConfigError: the file is unreadable, too large, not JSON, or not a usable JWKS.
    """
    path = pathlib.Path(path)
    try:
        with path.open("rb") as file:
            data = file.read(_MAX_JWKS_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyConfigError(f"cannot read the JWKS file {str(path)!r}: {exc.strerror}") from exc
    if len(data) > _MAX_JWKS_FILE_BYTES:
        raise KeyConfigError(f"the JWKS file {str(path)!r} is over {_MAX_JWKS_FILE_BYTES} bytes")
    return KeySet.from_jwks(parse_jwks_json(data, source=f"the JWKS file {str(path)!r}"))


def parse_jwks_json(data: bytes, *, source: str) -> Mapping[str, object]:
    """Parse JWKS bytes into a JSON object.

    Raises:
        KeyConfigError: the bytes are not a UTF-8 JSON object.
    """
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise KeyConfigError(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise KeyConfigError(f"{source} is not a JSON object")
    return document


def _key_from_jwk(jwk: dict[str, object], index: int) -> VerificationKey:
    raw_kid = jwk.get("kid")
    kid = raw_kid if isinstance(raw_kid, str) else None
    where = f"JWKS key #{index}" + (f" (kid {quote_for_log(kid)})" if kid else "")
    if raw_kid is not None and not kid:
        raise KeyConfigError(f"{where}: 'kid' must be a non-empty string")
    kty = jwk.get("kty")
    if kty == "oct":
        raise KeyConfigError(f"{where}: symmetric 'oct' keys are never accepted")
    if "d" in jwk:
        raise KeyConfigError(f"{where}: holds private key material; publish only public keys")
    crv = jwk.get("crv")
    if kty == "RSA":
        family = _RSA_ALGORITHMS
    elif kty == "EC" and isinstance(crv, str) and crv in _EC_ALGORITHMS:
        family = frozenset({_EC_ALGORITHMS[crv]})
    elif kty == "OKP" and isinstance(crv, str) and crv in _OKP_ALGORITHMS:
        family = frozenset({_OKP_ALGORITHMS[crv]})
    else:
        raise KeyConfigError(f"{where}: unsupported key type {kty!r} (curve {crv!r})")
    alg = jwk.get("alg")
    if alg is not None and alg not in family:
        raise KeyConfigError(f"{where}: algorithm {alg!r} does not suit a {kty} key")
    algorithms = family if alg is None else frozenset({str(alg)})
    try:
        # PyJWK binds one algorithm; any of the family parses the same key.
        public_key = jwt.PyJWK(jwk, algorithm=min(algorithms)).key
    except jwt.PyJWTError as exc:
        raise KeyConfigError(f"{where}: malformed key ({type(exc).__name__})") from exc
    if not isinstance(public_key, RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey):
        raise KeyConfigError(f"{where}: not a public key")
    if isinstance(public_key, RSAPublicKey) and public_key.key_size < _MIN_RSA_KEY_BITS:
        raise KeyConfigError(f"{where}: RSA keys need at least {_MIN_RSA_KEY_BITS} bits")
    return VerificationKey(kid=kid, algorithms=algorithms, public_key=public_key)
