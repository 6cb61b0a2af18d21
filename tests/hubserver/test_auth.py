"""Tests for hubserver.auth: real keys, real tokens, a real HTTP server for the JWKS.

Keys come from ``cryptography`` and tokens from PyJWT, as an identity provider
would make them; hostile tokens are forged by hand. ``NOW`` is a fixed unix
time, since ``verify`` takes the time from its caller.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import h11
import jwt
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from hubcore._errors import HubError
from hubserver.auth import (
    DEV_AUDIENCE,
    DEV_ISSUER,
    AuthError,
    Claims,
    Forbidden,
    InvalidToken,
    JwksCache,
    KeyConfigError,
    KeySet,
    KeysUnavailable,
    StaticKeys,
    TokenVerifier,
    UnknownKeyId,
    ensure_dev_key,
    extract_token,
    load_jwks_file,
    redact_url,
    verify,
)
from hubserver.auth._dev import jwk_thumbprint

NOW = 1_700_000_000.0
ISSUER = "https://idp.example"
AUDIENCE = "hubserver"
SCOPE = "user_api.full_access"
SECRET_CLAIM = "site-secret-7f3a"  # a claim value that must never reach a message

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


# --- keys and tokens ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def public_jwk(key: PrivateKey, kid: str | None, **members: str) -> dict[str, Any]:
    match key:
        case rsa.RSAPrivateKey():
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        case ec.EllipticCurvePrivateKey():
            jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        case _:
            jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, **({} if kid is None else {"kid": kid}), **members}


@pytest.fixture(scope="module")
def jwks(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey, ed_key: Any
) -> dict[str, Any]:
    return {
        "keys": [
            public_jwk(rsa_key, "rsa-1", use="sig"),
            public_jwk(ec_key, "ec-1"),
            public_jwk(ed_key, "ed-1"),
        ]
    }


@pytest.fixture(scope="module")
def keys(jwks: dict[str, Any]) -> KeySet:
    return KeySet.from_jwks(jwks)


def claims(**overrides: object) -> dict[str, object]:
    payload: dict[str, object] = {
        "sub": "user-42",
        "scope": f"{SCOPE} openid",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": int(NOW),
        "exp": int(NOW) + 300,
        "site_id": SECRET_CLAIM,
    }
    payload.update(overrides)
    return {name: value for name, value in payload.items() if value is not None}


def sign(
    key: PrivateKey, payload: Mapping[str, object], *, kid: str | None = "rsa-1", alg: str = "RS256"
) -> str:
    headers = {} if kid is None else {"kid": kid}
    return jwt.encode(dict(payload), key, algorithm=alg, headers=headers)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def forge_hs256(header: Mapping[str, object], payload: Mapping[str, object], secret: bytes) -> str:
    """An HS256 token made by hand: PyJWT itself refuses a PEM as an HMAC secret."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def check(token: str, keys: KeySet, **options: Any) -> Claims:
    options = {"issuer": ISSUER, "audience": AUDIENCE, **options}
    return verify(token, keys, options.pop("now", NOW), **options)


# --- verify: the good paths -----------------------------------------------------------------


def test_good_token(rsa_key: rsa.RSAPrivateKey, keys: KeySet) -> None:
    result = check(sign(rsa_key, claims()), keys)
    assert result.subject == "user-42"
    assert result.scopes == {SCOPE, "openid"}
    assert result.has_scope(SCOPE)
    assert not result.has_scope("admin")
    assert result.expires_at == NOW + 300
    assert result.issuer == ISSUER
    assert result.audience == (AUDIENCE,)
    assert result.raw["site_id"] == SECRET_CLAIM


@pytest.mark.parametrize(
    ("key_name", "kid", "alg"),
    [
        ("rsa_key", "rsa-1", "RS384"),
        ("rsa_key", "rsa-1", "RS512"),
        ("rsa_key", "rsa-1", "PS256"),
        ("rsa_key", "rsa-1", "PS512"),
        ("ec_key", "ec-1", "ES256"),
        ("ed_key", "ed-1", "EdDSA"),
    ],
)
def test_every_key_type_verifies(
    request: pytest.FixtureRequest, keys: KeySet, key_name: str, kid: str, alg: str
) -> None:
    key = request.getfixturevalue(key_name)
    assert check(sign(key, claims(), kid=kid, alg=alg), keys).subject == "user-42"


def test_claims_are_read_only(rsa_key: rsa.RSAPrivateKey, keys: KeySet) -> None:
    result = check(sign(rsa_key, claims()), keys)
    with pytest.raises(TypeError):
        result.raw["sub"] = "someone-else"  # type: ignore[index]  # proving it is refused
    assert result == Claims.from_payload(dict(result.raw))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"scope": "a b  c"}, {"a", "b", "c"}),
        ({"scope": ["a", "b"]}, {"a", "b"}),
        ({"scope": None, "scp": "x y"}, {"x", "y"}),
        ({"scope": None, "scp": ["x"]}, {"x"}),
        ({"scope": None}, set()),
    ],
)
def test_scope_forms(
    rsa_key: rsa.RSAPrivateKey, keys: KeySet, overrides: dict[str, object], expected: set[str]
) -> None:
    assert check(sign(rsa_key, claims(**overrides)), keys).scopes == expected


def test_require_scope_raises_forbidden(rsa_key: rsa.RSAPrivateKey, keys: KeySet) -> None:
    result = check(sign(rsa_key, claims(scope="openid")), keys)
    with pytest.raises(Forbidden, match=r"user-42.*user_api\.full_access") as info:
        result.require_scope(SCOPE)
    assert info.value.status == 403
    assert isinstance(info.value, AuthError) and isinstance(info.value, HubError)


# --- verify: times, issuer, audience --------------------------------------------------------


def test_expired_token_within_and_beyond_leeway(rsa_key: rsa.RSAPrivateKey, keys: KeySet) -> None:
    token = sign(rsa_key, claims(exp=int(NOW) - 10))
    assert check(token, keys).subject == "user-42"  # default leeway is 30 s
    with pytest.raises(InvalidToken, match="token expired") as info:
        check(token, keys, leeway=0)
    assert info.value.status == 401
    with pytest.raises(InvalidToken, match="token expired"):
        check(token, keys, now=NOW + 21)


def test_exp_is_exclusive(rsa_key: rsa.RSAPrivateKey, keys: KeySet) -> None:
    token = sign(rsa_key, claims(exp=int(NOW)))
    with pytest.raises(InvalidToken, match="expired"):
        check(token, keys, leeway=0)
    assert check(token, keys, now=NOW - 0.5, leeway=0).subject == "user-42"


def test_not_before_in_the_future(rsa_key: rsa.RSAPrivateKey, keys: KeySet) -> None:
    with pytest.raises(InvalidToken, match="not valid yet"):
        check(sign(rsa_key, claims(nbf=int(NOW) + 60)), keys)
    assert check(sign(rsa_key, claims(nbf=int(NOW) + 10)), keys).subject == "user-42"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"exp": None}, "no expiry"),
        ({"exp": "tomorrow"}, "'exp' claim is not a number"),
        ({"exp": True}, "'exp' claim is not a number"),
        ({"exp": 10**400}, "'exp' claim is out of range"),
        ({"nbf": [1]}, "'nbf' claim is not a number"),
        ({"sub": None}, "no subject"),
        ({"sub": ""}, "no subject"),
        ({"sub": 42}, "no subject"),
        ({"scope": 7}, "'scope' claim must be"),
        ({"scope": ["ok", 1]}, "'scope' claim must be"),
        ({"aud": 5}, "'aud' claim must be"),
        ({"iss": None}, "issuer is not"),
        ({"iss": "https://evil.example"}, "issuer is not the expected 'https://idp.example'"),
        ({"aud": "someone-else"}, "audience does not include 'hubserver'"),
        ({"aud": ["a", "b"]}, "audience does not include"),
        ({"aud": None}, "audience does not include"),
    ],
)
def test_bad_claims(
    rsa_key: rsa.RSAPrivateKey, keys: KeySet, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidToken, match=message):
        check(sign(rsa_key, claims(**overrides)), keys)


def test_audience_list_and_unchecked_issuer_audience(
    rsa_key: rsa.RSAPrivateKey, keys: KeySet
) -> None:
    token = sign(rsa_key, claims(aud=["other-api", AUDIENCE], iss="https://any.example"))
    assert check(token, keys, issuer=None).audience == ("other-api", AUDIENCE)
    assert check(sign(rsa_key, claims(aud=None)), keys, audience=None).audience == ()


# --- verify: signatures, keys and algorithms ------------------------------------------------


def test_signed_by_another_key(other_rsa_key: rsa.RSAPrivateKey, keys: KeySet) -> None:
    with pytest.raises(InvalidToken, match="signature is invalid"):
        check(sign(other_rsa_key, claims(), kid="rsa-1"), keys)


def test_unknown_kid(rsa_key: rsa.RSAPrivateKey, keys: KeySet) -> None:
    with pytest.raises(UnknownKeyId, match="unknown signing key") as info:
        check(sign(rsa_key, claims(), kid="rotated-2"), keys)
    assert info.value.kid == "rotated-2"
    assert isinstance(info.value, InvalidToken) and info.value.status == 401


def test_missing_kid_needs_a_single_key(
    rsa_key: rsa.RSAPrivateKey, jwks: dict[str, Any], keys: KeySet
) -> None:
    token = sign(rsa_key, claims(), kid=None)
    with pytest.raises(InvalidToken, match="no 'kid'"):
        check(token, keys)
    single = KeySet.from_jwks({"keys": [jwks["keys"][0]]})
    assert check(token, single).subject == "user-42"
    kidless = KeySet.from_jwks({"keys": [public_jwk(rsa_key, None)]})
    assert check(sign(rsa_key, claims(), kid="whatever"), kidless).subject == "user-42"


def test_alg_none_is_rejected(keys: KeySet) -> None:
    token = jwt.encode(claims(), "", algorithm="none", headers={"kid": "rsa-1"})
    with pytest.raises(InvalidToken, match="algorithm none is not allowed"):
        check(token, keys)


def test_hs256_with_the_public_key_as_secret_is_rejected(
    rsa_key: rsa.RSAPrivateKey, keys: KeySet
) -> None:
    """The classic confusion attack: HMAC keyed with the server's own public PEM."""
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for kid in ("rsa-1", "no-such-kid"):  # refused before any key lookup
        token = forge_hs256({"alg": "HS256", "typ": "JWT", "kid": kid}, claims(), pem)
        with pytest.raises(InvalidToken, match="algorithm HS256 is not allowed") as info:
            check(token, keys)
        assert not isinstance(info.value, UnknownKeyId)
        # Even a caller who allows HS256 by mistake gets no HMAC check.
        with pytest.raises(InvalidToken, match="HS256 is not allowed"):
            check(token, keys, algorithms=frozenset({"HS256", "RS256"}))


def test_algorithm_must_suit_the_key(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey, keys: KeySet
) -> None:
    with pytest.raises(InvalidToken, match="ES256 does not suit the RSA signing key"):
        check(sign(ec_key, claims(), kid="rsa-1", alg="ES256"), keys)
    with pytest.raises(InvalidToken, match="algorithm RS256 is not allowed"):
        check(sign(rsa_key, claims()), keys, algorithms=frozenset({"ES256"}))


def test_jwk_alg_pins_the_algorithm(rsa_key: rsa.RSAPrivateKey) -> None:
    pinned = KeySet.from_jwks({"keys": [public_jwk(rsa_key, "rsa-1", alg="PS256")]})
    assert check(sign(rsa_key, claims(), alg="PS256"), pinned).subject == "user-42"
    with pytest.raises(InvalidToken, match="RS256 does not suit"):
        check(sign(rsa_key, claims()), pinned)


# --- verify: garbage in, InvalidToken out ---------------------------------------------------


def compact(header: Mapping[str, object], payload: bytes = b"{}", signature: bytes = b"x") -> str:
    return ".".join(b64url(part) for part in (json.dumps(header).encode(), payload, signature))


GARBAGE = [
    "",
    "abc",
    "a.b",
    "a.b.c",
    "a.b.c.d",
    "..",
    "\udcff\udcfe.x.y",  # what surrogateescape makes of non-UTF-8 bytes
    "é.é.é",
    "eyJhbGciOiJSUzI1NiJ9.e30.",
    f"{b64url(b'[1]')}.e30.AA",
    compact({"alg": ["RS256"]}),
    compact({"alg": "RS256", "kid": 7}),
    compact({"alg": "RS256", "kid": "rsa-1"}, b"[]"),
    compact({"alg": "RS256", "kid": "rsa-1"}, b"{"),
    compact({"alg": "RS256", "kid": "rsa-1", "crit": ["x"]}),
    compact({"alg": "RS256", "kid": "rsa-1", "b64": False}),
    compact({"alg": "EdDSA", "kid": "ed-1"}),
    compact({"alg": "ES256", "kid": "ec-1"}, signature=b"\0" * 64),
    "a" * 20_000,
]


@pytest.mark.parametrize("token", GARBAGE)
def test_garbage_tokens_raise_invalid_token(token: str, keys: KeySet) -> None:
    with pytest.raises(InvalidToken):
        check(token, keys)


def expect_only_invalid_token(token: str, keys: KeySet) -> None:
    try:
        check(token, keys)
    except InvalidToken:
        return
    pytest.fail("a garbage token verified")


@given(token=st.text())
def test_any_text_raises_only_invalid_token(token: str, keys: KeySet) -> None:
    expect_only_invalid_token(token, keys)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(
    header=st.fixed_dictionaries(
        {},
        optional={
            "alg": st.sampled_from(["RS256", "ES256", "EdDSA", "HS256", "none"]) | JSON_VALUES,
            "kid": st.sampled_from(["rsa-1", "ec-1", "ed-1"]) | JSON_VALUES,
            "crit": JSON_VALUES,
            "b64": JSON_VALUES,
        },
    ),
    payload=st.dictionaries(
        st.sampled_from(["sub", "exp", "nbf", "iss", "aud", "scope", "scp"]), JSON_VALUES
    ),
    signature=st.binary(max_size=300),
)
def test_any_forged_token_raises_only_invalid_token(
    header: dict[str, object], payload: dict[str, object], signature: bytes, keys: KeySet
) -> None:
    segments = [json.dumps(header).encode(), json.dumps(payload).encode(), signature]
    expect_only_invalid_token(".".join(b64url(part) for part in segments), keys)


def test_errors_never_show_the_token_or_claims(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey, keys: KeySet
) -> None:
    pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    bad_tokens = [
        sign(rsa_key, claims(exp=int(NOW) - 100)),
        sign(rsa_key, claims(aud="x", iss=SECRET_CLAIM)),
        sign(rsa_key, claims(iss=SECRET_CLAIM)),
        sign(rsa_key, claims(scope=[SECRET_CLAIM, 3])),
        sign(other_rsa_key, claims()),
        sign(rsa_key, claims(), kid="unknown"),
        forge_hs256({"alg": "HS256", "kid": "rsa-1"}, claims(), pem),
        forge_hs256({"alg": SECRET_CLAIM * 3, "kid": "rsa-1"}, claims(), pem),
    ]
    for token in bad_tokens:
        with pytest.raises(InvalidToken) as info:
            check(token, keys)
        chain = [info.value, info.value.__cause__]
        shown = " ".join(f"{error} {error!r}" for error in chain if error is not None)
        assert token not in shown
        assert token.split(".")[1] not in shown
        assert SECRET_CLAIM not in shown


# --- key sets -------------------------------------------------------------------------------


def test_key_set_from_jwks(jwks: dict[str, Any], keys: KeySet) -> None:
    assert keys.kids == {"rsa-1", "ec-1", "ed-1"}
    assert {key.key_type for key in keys.keys} == {"RSA", "EC", "OKP"}
    enc_key = {**jwks["keys"][0], "kid": "enc-1", "use": "enc", "alg": "RSA-OAEP"}
    with_enc = KeySet.from_jwks({"keys": [*jwks["keys"], enc_key]})
    assert with_enc.kids == keys.kids


def weak_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def bad_jwks_cases() -> list[tuple[Callable[[dict[str, Any]], object], str]]:
    def first(jwks: dict[str, Any]) -> dict[str, Any]:
        return dict(jwks["keys"][0])

    return [
        (lambda j: {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}, "'oct' keys are never"),
        (lambda j: {"keys": [*j["keys"], {"kty": "oct", "k": "c2VjcmV0"}]}, "'oct'"),
        (lambda j: {"keys": [{**first(j), "d": "AQAB"}]}, "private key material"),
        (lambda j: {"keys": [first(j), first(j)]}, "repeats a 'kid'"),
        (lambda j: {"keys": [{**first(j), "kid": None}, j["keys"][1]]}, "needs a 'kid'"),
        (lambda j: {"keys": [{**first(j), "kid": 5}]}, "'kid' must be a non-empty string"),
        (lambda j: {"keys": [{**first(j), "alg": "ES256"}]}, "'ES256' does not suit"),
        (lambda j: {"keys": [public_jwk(weak_rsa_key(), "weak")]}, "at least 2048 bits"),
        (lambda j: {"keys": [{**first(j), "n": "!!"}]}, "malformed key"),
        (lambda j: {"keys": [{"kty": "EC", "crv": "secp256k1", "x": "", "y": ""}]}, "unsupported"),
        (lambda j: {"keys": [{"kty": "OKP", "crv": "X25519", "x": ""}]}, "unsupported"),
        (lambda j: {"keys": ["not-a-key"]}, "not a JSON object"),
        (lambda j: {"keys": []}, "no signing keys"),
        (lambda j: {"keys": "nope"}, "'keys' array"),
        (lambda j: {}, "'keys' array"),
    ]


@pytest.mark.parametrize(
    ("make", "message"), bad_jwks_cases(), ids=[message for _, message in bad_jwks_cases()]
)
def test_bad_jwks_is_refused_at_load(
    jwks: dict[str, Any], make: Callable[[dict[str, Any]], dict[str, Any]], message: str
) -> None:
    with pytest.raises(KeyConfigError, match=message):
        KeySet.from_jwks(make(jwks))


def test_load_jwks_file(tmp_path: Path, jwks: dict[str, Any]) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    assert load_jwks_file(path).kids == {"rsa-1", "ec-1", "ed-1"}
    with pytest.raises(KeyConfigError, match="cannot read"):
        load_jwks_file(tmp_path / "missing.json")
    path.write_bytes(b"\xff{")
    with pytest.raises(KeyConfigError, match="not valid JSON"):
        load_jwks_file(path)
    path.write_text("[]")
    with pytest.raises(KeyConfigError, match="not a JSON object"):
        load_jwks_file(str(path))


async def test_static_keys(rsa_key: rsa.RSAPrivateKey, keys: KeySet) -> None:
    verifier: TokenVerifier = StaticKeys(keys=keys, issuer=ISSUER, audience=AUDIENCE)
    assert (await verifier.verify(sign(rsa_key, claims()), NOW)).subject == "user-42"
    with pytest.raises(InvalidToken, match="expired"):
        await verifier.verify(sign(rsa_key, claims()), NOW + 400)
    with pytest.raises(KeyConfigError, match="unsupported: \\['HS256'\\]"):
        StaticKeys(keys=keys, issuer=None, audience=None, algorithms=frozenset({"HS256"}))


# --- JwksCache, against a real HTTP server --------------------------------------------------


class JwksServer:
    """Serves ``document`` as JSON over HTTP/1.1 on loopback, and counts requests."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.status = 200
        self.is_stalled = False
        self.requests = 0

    async def start(self, nursery: trio.Nursery) -> str:
        serve = partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        port = listeners[0].socket.getsockname()[1]
        return f"http://127.0.0.1:{port}/.well-known/jwks.json?access_token=x"

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.requests += 1
        conn = h11.Connection(h11.SERVER)
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(4096))
            elif isinstance(event, h11.Request):
                assert event.target == b"/.well-known/jwks.json?access_token=x"
        if self.is_stalled:
            await trio.sleep_forever()
        body = json.dumps(self.document).encode()
        head = h11.Response(
            status_code=self.status,
            headers=[("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        data = [conn.send(head), conn.send(h11.Data(data=body)), conn.send(h11.EndOfMessage())]
        await stream.send_all(b"".join(part for part in data if part is not None))


def make_cache(url: str, **options: Any) -> JwksCache:
    return JwksCache(url, issuer=ISSUER, audience=AUDIENCE, **options)


async def test_jwks_cache_refreshes_once_for_an_unknown_kid(
    mock_clock: trio.testing.MockClock,
    rsa_key: rsa.RSAPrivateKey,
    other_rsa_key: rsa.RSAPrivateKey,
) -> None:
    server = JwksServer({"keys": [public_jwk(rsa_key, "rsa-1")]})
    async with trio.open_nursery() as nursery:
        cache = make_cache(await server.start(nursery))
        assert cache.keys is None
        assert (await cache.verify(sign(rsa_key, claims()), NOW)).subject == "user-42"
        assert (await cache.verify(sign(rsa_key, claims()), NOW)).subject == "user-42"
        assert server.requests == 1  # cached

        # The issuer rotates in a second key; a token signed with it arrives later.
        server.document = {
            "keys": [public_jwk(rsa_key, "rsa-1"), public_jwk(other_rsa_key, "rsa-2")]
        }
        mock_clock.jump(61)
        assert (await cache.verify(sign(other_rsa_key, claims(), kid="rsa-2"), NOW)).subject
        assert server.requests == 2  # exactly one refresh

        # Another unknown kid within min_refresh_interval: no fetch, just 401.
        with pytest.raises(UnknownKeyId):
            await cache.verify(sign(other_rsa_key, claims(), kid="rsa-3"), NOW)
        assert server.requests == 2

        mock_clock.jump(61)
        with pytest.raises(UnknownKeyId):
            await cache.verify(sign(other_rsa_key, claims(), kid="rsa-3"), NOW)
        assert server.requests == 3
        nursery.cancel_scope.cancel()


async def test_jwks_cache_concurrent_unknown_kids_share_one_fetch(
    mock_clock: trio.testing.MockClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    server = JwksServer({"keys": [public_jwk(rsa_key, "rsa-1")]})
    async with trio.open_nursery() as nursery:
        cache = make_cache(await server.start(nursery))
        await cache.refresh()
        mock_clock.jump(61)
        failures: list[UnknownKeyId] = []

        async def verify_unknown(kid: str) -> None:
            try:
                await cache.verify(sign(rsa_key, claims(), kid=kid), NOW)
            except UnknownKeyId as exc:
                failures.append(exc)

        async with trio.open_nursery() as clients:
            for index in range(5):
                clients.start_soon(verify_unknown, f"made-up-{index}")
        assert len(failures) == 5
        assert server.requests == 2
        nursery.cancel_scope.cancel()


async def test_jwks_cache_keeps_old_keys_when_refresh_fails(
    mock_clock: trio.testing.MockClock, rsa_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    server = JwksServer({"keys": [public_jwk(rsa_key, "rsa-1")]})
    async with trio.open_nursery() as nursery:
        cache = make_cache(await server.start(nursery), refresh_interval=600)
        await cache.verify(sign(rsa_key, claims()), NOW)
        server.status = 500
        mock_clock.jump(601)  # the keys are stale, so the next verify refetches
        assert (await cache.verify(sign(rsa_key, claims()), NOW)).subject == "user-42"
        assert server.requests == 2
        assert "HTTP 500 instead of 200" in caplog.text
        assert "access_token=***" in caplog.text and "access_token=x" not in caplog.text
        nursery.cancel_scope.cancel()


async def test_jwks_cache_unavailable(
    mock_clock: trio.testing.MockClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    server = JwksServer({"keys": [public_jwk(rsa_key, "rsa-1")]})
    server.status = 404
    async with trio.open_nursery() as nursery:
        cache = make_cache(await server.start(nursery))
        with pytest.raises(KeysUnavailable, match="no signing keys") as info:
            await cache.verify(sign(rsa_key, claims()), NOW)
        assert info.value.status == 503
        with pytest.raises(KeysUnavailable):
            await cache.verify(sign(rsa_key, claims()), NOW)
        assert server.requests == 1  # failed fetches are rate-limited too
        with pytest.raises(KeysUnavailable, match="HTTP 404"):
            await cache.refresh()
        server.status = 200
        mock_clock.jump(61)
        assert (await cache.verify(sign(rsa_key, claims()), NOW)).subject == "user-42"
        nursery.cancel_scope.cancel()


async def test_jwks_fetch_times_out(
    autojump_clock: trio.testing.MockClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    server = JwksServer({"keys": [public_jwk(rsa_key, "rsa-1")]})
    server.is_stalled = True
    async with trio.open_nursery() as nursery:
        cache = make_cache(await server.start(nursery), fetch_timeout=5)
        with pytest.raises(KeysUnavailable, match="took over 5 s"):
            await cache.refresh()
        nursery.cancel_scope.cancel()


async def test_jwks_response_size_is_bounded(rsa_key: rsa.RSAPrivateKey) -> None:
    server = JwksServer({"keys": [public_jwk(rsa_key, "rsa-1")]})
    async with trio.open_nursery() as nursery:
        cache = make_cache(await server.start(nursery), max_jwks_bytes=100)
        with trio.fail_after(10), pytest.raises(KeysUnavailable, match="over 100 bytes"):
            await cache.refresh()
        nursery.cancel_scope.cancel()


async def test_jwks_connection_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        cache = make_cache(f"http://127.0.0.1:{port}/jwks")
        with trio.fail_after(10), pytest.raises(KeysUnavailable, match="failed: OSError"):
            await cache.refresh()


@pytest.mark.parametrize("url", ["ftp://idp.example/jwks", "file:///etc/jwks.json", "https://"])
def test_jwks_url_must_be_http(url: str) -> None:
    with pytest.raises(KeyConfigError, match="http:// or https://"):
        make_cache(url)


# --- development keys -----------------------------------------------------------------------


async def test_dev_key(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    dev = ensure_dev_key(data_dir)
    path = data_dir / "dev-signing-key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_dev_key(data_dir).kid == dev.kid  # idempotent

    token = dev.mint("dev-user", [SCOPE], 3600, NOW, extra_claims={"site_id": "s1", "sub": "x"})
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "typ": "JWT", "kid": dev.kid}
    result = await dev.verifier().verify(token, NOW + 10)
    assert (result.subject, result.scopes) == ("dev-user", frozenset({SCOPE}))
    assert (result.issuer, result.audience) == (DEV_ISSUER, (DEV_AUDIENCE,))
    assert result.raw["site_id"] == "s1"
    with pytest.raises(InvalidToken, match="expired"):
        await dev.verifier().verify(token, NOW + 3600 + 30)

    other = dev.mint("u", [], 60, NOW, issuer="elsewhere", audience="other")
    with pytest.raises(InvalidToken, match="issuer"):
        verify(other, dev.key_set(), NOW, issuer=DEV_ISSUER, audience=DEV_AUDIENCE)
    assert KeySet.from_jwks({"keys": [dev.public_jwk()]}).kids == {dev.kid}


def test_dev_key_file_must_be_an_rsa_key(tmp_path: Path) -> None:
    (tmp_path / "dev-signing-key.pem").write_text("not a key")
    with pytest.raises(KeyConfigError, match="not a PEM private key"):
        ensure_dev_key(tmp_path)


def test_kid_is_the_rfc7638_thumbprint() -> None:
    # RFC 7638 §3.1's example key and its thumbprint.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_"
        "FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhA"
        "I4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    thumbprint = jwk_thumbprint({"kty": "RSA", "n": n, "e": "AQAB", "alg": "RS256"})
    assert thumbprint == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


# --- finding and hiding the token -----------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ([(b"authorization", b"Bearer abc.def.ghi")], {}, "abc.def.ghi"),
        ([(b"Authorization", b"bearer   abc ")], {}, "abc"),
        ([(b"AUTHORIZATION", b"BEARER abc")], {"access_token": "q"}, "abc"),
        ([(b"host", b"x")], {"access_token": "q.r.s"}, "q.r.s"),
        ([(b"authorization", b"Basic dXNlcjpwdw==")], {"access_token": "q"}, "q"),
        ([(b"authorization", b"Bearer ")], {}, None),
        ([(b"authorization", b"Bearer")], {"access_token": ""}, None),
        ([], {}, None),
    ],
)
def test_extract_token(
    headers: list[tuple[bytes, bytes]], query: dict[str, str], expected: str | None
) -> None:
    assert extract_token(headers, query) == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (
            "/v1/hub/entries?site_id=1&access_token=abc.def",
            "/v1/hub/entries?site_id=1&access_token=***",
        ),
        ("/hub?access_token=a&x=1&access_token=b", "/hub?access_token=***&x=1&access_token=***"),
        ("/hub?access%5Ftoken=a%2Eb&id=2", "/hub?access%5Ftoken=***&id=2"),
        ("/hub?Access_Token=abc", "/hub?Access_Token=***"),
        (
            "wss://h.example/hub?id=%20x&access_token=t#frag",
            "wss://h.example/hub?id=%20x&access_token=***#frag",
        ),
        ("/hub?my_access_token=keep&access_token", "/hub?my_access_token=keep&access_token"),
        ("/hub", "/hub"),
        ("/hub?", "/hub?"),
    ],
)
def test_redact_url(target: str, expected: str) -> None:
    assert redact_url(target) == expected


@given(
    token=st.text(alphabet="ABCDEFabcdef0123456789-_.", min_size=12),
    before=st.lists(st.sampled_from(["id=1", "site_id=s", "x", "a=b=c"]), max_size=3),
    after=st.lists(st.sampled_from(["id=1", "user_id=u", ""]), max_size=3),
)
def test_redact_url_never_leaks_the_token(token: str, before: list[str], after: list[str]) -> None:
    target = "/v1/hub/entries?" + "&".join([*before, f"access_token={token}", *after])
    redacted = redact_url(target)
    assert token not in redacted
    assert redacted.count("&") == target.count("&")
