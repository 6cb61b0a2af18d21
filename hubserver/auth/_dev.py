"""A development signing key, so the server runs without an identity provider.

The key lives in the data directory (mode 0600) and survives restarts, so tokens
minted yesterday still verify today. Its ``kid`` is the RFC 7638 thumbprint of
its public key: stable, and different for every generated key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from ._errors import KeyConfigError
from ._keys import KeySet, VerificationKey
from ._sources import StaticKeys
from ._verify import DEFAULT_LEEWAY

__all__ = ["DEV_AUDIENCE", "DEV_ISSUER", "DEV_KEY_FILENAME", "DevKey", "ensure_dev_key"]

DEV_ISSUER: Final = "hubserver-dev"
DEV_AUDIENCE: Final = "hubserver"
DEV_KEY_FILENAME: Final = "dev-signing-key.pem"
_DEV_ALGORITHM: Final = "RS256"
_RSA_KEY_BITS: Final = 2048
_RSA_PUBLIC_EXPONENT: Final = 65537


@dataclass(frozen=True, slots=True)
class DevKey:
    """The development RSA key pair: mints tokens, and verifies them.

    Attributes:
        private_key: the signing key (never leaves the process but for its file).
        kid: the RFC 7638 thumbprint of the public key.
    """

    private_key: rsa.RSAPrivateKey
    kid: str

    @classmethod
    def from_private_key(cls, private_key: rsa.RSAPrivateKey) -> DevKey:
        """Wrap a key, deriving its ``kid``."""
        return cls(private_key, jwk_thumbprint(public_jwk(private_key.public_key())))

    def public_jwk(self) -> dict[str, str]:
        """The public key as a JWK with ``kid``, ``alg`` and ``use``."""
        return {
            **public_jwk(self.private_key.public_key()),
            "kid": self.kid,
            "alg": _DEV_ALGORITHM,
            "use": "sig",
        }

    def key_set(self) -> KeySet:
        """The public key set that verifies this key's tokens."""
        key = VerificationKey(
            kid=self.kid,
            algorithms=frozenset({_DEV_ALGORITHM}),
            public_key=self.private_key.public_key(),
        )
        return KeySet((key,))

    def verifier(self, *, leeway: float = DEFAULT_LEEWAY) -> StaticKeys:
        """The dev-mode verifier: this key, issuer ``hubserver-dev``, audience ``hubserver``."""
        return StaticKeys(
            keys=self.key_set(), issuer=DEV_ISSUER, audience=DEV_AUDIENCE, leeway=leeway
        )

    def mint(
        self,
        subject: str,
        scopes: Iterable[str],
        ttl_seconds: float,
        now: float,
        issuer: str | None = None,
        audience: str | None = None,
        extra_claims: Mapping[str, object] | None = None,
    ) -> str:
        """Sign an RS256 access token.

        Args:
            subject: the ``sub``.
            scopes: granted scopes, joined into a space-separated ``scope``.
            ttl_seconds: lifetime; ``exp`` is ``now + ttl_seconds``.
            now: unix seconds, for ``iat``, ``nbf`` and ``exp``.
            issuer: the ``iss``; ``hubserver-dev`` by default.
            audience: the ``aud``; ``hubserver`` by default.
            extra_claims: more claims (roles, site ids...); the standard ones
                above take precedence.

        Returns:
            The compact JWS, with this key's ``kid`` in its header.
        """
        payload: dict[str, object] = {
            **(extra_claims or {}),
            "sub": subject,
            "scope": " ".join(sorted(set(scopes))),
            "iss": DEV_ISSUER if issuer is None else issuer,
            "aud": DEV_AUDIENCE if audience is None else audience,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + ttl_seconds),
        }
        return jwt.encode(
            payload, self.private_key, algorithm=_DEV_ALGORITHM, headers={"kid": self.kid}
        )


def ensure_dev_key(data_dir: pathlib.Path) -> DevKey:
    """Load the development key from ``data_dir``, creating it the first time.

    Args:
        data_dir: the server's data directory; created if missing.

    Returns:
        The key; the same one (same ``kid``) on every call.

    Raises:
        KeyConfigError: the key file exists but is unreadable or not an RSA private key.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / DEV_KEY_FILENAME
    try:
        return _load_dev_key(path)
    except FileNotFoundError:
        pass
    private_key = rsa.generate_private_key(
        public_exponent=_RSA_PUBLIC_EXPONENT, key_size=_RSA_KEY_BITS
    )
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        # O_EXCL: if another process created the file first, use its key, so
        # two servers on one data directory agree.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _load_dev_key(path)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), 0o600)  # the mode above is filtered by the umask
        file.write(pem)
    return DevKey.from_private_key(private_key)


def _load_dev_key(path: pathlib.Path) -> DevKey:
    """Raises FileNotFoundError when there is no key file yet."""
    pem = path.read_bytes()
    try:
        private_key = serialization.load_pem_private_key(pem, password=None)
    except ValueError as exc:
        raise KeyConfigError(
            f"{str(path)!r} is not a PEM private key; delete it to generate a new one"
        ) from exc
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise KeyConfigError(f"{str(path)!r} is not an RSA private key")
    return DevKey.from_private_key(private_key)


def public_jwk(public_key: rsa.RSAPublicKey) -> dict[str, str]:
    """The public JWK members (``kty``, ``n``, ``e``) of an RSA key."""
    jwk = RSAAlgorithm.to_jwk(public_key, as_dict=True)
    return {"kty": "RSA", "n": str(jwk["n"]), "e": str(jwk["e"])}


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """The RFC 7638 thumbprint of an RSA JWK: SHA-256 of its required members, base64url.

    RFC 7638 §3.2: only ``e``, ``kty`` and ``n``, sorted, without whitespace.
    """
    members = {name: jwk[name] for name in ("e", "kty", "n")}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    digest = hashlib.sha256(canonical).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
