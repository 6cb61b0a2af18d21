"""Where keys come from: a fixed key set, or a JWKS URL fetched and cached.

Both offer the ``TokenVerifier`` seam the server uses. This module and ``_dev``
are the only parts of ``hubserver.auth`` that do I/O.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import urlsplit

import h11
import trio

from ._claims import Claims
from ._errors import KeyConfigError, KeysUnavailable, UnknownKeyId
from ._keys import DEFAULT_ALGORITHMS, SUPPORTED_ALGORITHMS, KeySet, parse_jwks_json
from ._request import redact_url
from ._verify import DEFAULT_LEEWAY, verify

__all__ = [
    "DEFAULT_FETCH_TIMEOUT",
    "DEFAULT_MAX_JWKS_BYTES",
    "DEFAULT_MIN_REFRESH_INTERVAL",
    "DEFAULT_REFRESH_INTERVAL",
    "JwksCache",
    "StaticKeys",
    "TokenVerifier",
]

logger = logging.getLogger(__name__)

DEFAULT_MIN_REFRESH_INTERVAL: Final = 60.0  # seconds between two JWKS fetches, at least
DEFAULT_REFRESH_INTERVAL: Final = 3600.0  # seconds; older keys are refetched on next use
DEFAULT_FETCH_TIMEOUT: Final = 10.0  # seconds for one whole JWKS fetch
DEFAULT_MAX_JWKS_BYTES: Final = 1024 * 1024
_RECEIVE_CHUNK_BYTES: Final = 64 * 1024


class TokenVerifier(Protocol):
    """What the server needs from auth: a token in, claims out (or an ``AuthError``)."""

    async def verify(self, token: str, now: float) -> Claims:
        """Verify ``token`` at unix time ``now``.

        Raises:
            InvalidToken: the token is bad (401).
            KeysUnavailable: no keys to check it with (503).
        """
        ...


def _check_algorithms(algorithms: frozenset[str]) -> None:
    if not algorithms or not algorithms <= SUPPORTED_ALGORITHMS:
        unsupported = sorted(algorithms - SUPPORTED_ALGORITHMS)
        raise KeyConfigError(
            f"algorithms must be a non-empty subset of {sorted(SUPPORTED_ALGORITHMS)};"
            f" unsupported: {unsupported}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StaticKeys:
    """A ``TokenVerifier`` over a fixed key set (a JWKS file, or the dev key).

    Attributes:
        keys: the trusted keys.
        issuer: the required ``iss``, or None.
        audience: the required ``aud`` member, or None.
        leeway: clock skew allowed on ``exp``/``nbf``, seconds.
        algorithms: the allowed ``alg`` values.

    Raises:
        KeyConfigError: ``algorithms`` names one this package never accepts.
    """

    keys: KeySet
    issuer: str | None
    audience: str | None
    leeway: float = DEFAULT_LEEWAY
    algorithms: frozenset[str] = DEFAULT_ALGORITHMS

    def __post_init__(self) -> None:
        _check_algorithms(self.algorithms)

    async def verify(self, token: str, now: float) -> Claims:
        """Verify ``token`` against the fixed keys; see ``hubserver.auth.verify``."""
        await trio.lowlevel.checkpoint()
        return verify(
            token,
            self.keys,
            now,
            issuer=self.issuer,
            audience=self.audience,
            leeway=self.leeway,
            algorithms=self.algorithms,
        )


class JwksCache:
    """A ``TokenVerifier`` whose keys come from a JWKS URL, fetched lazily and cached.

    Theory of operation: the first ``verify`` fetches the JWKS. A token whose
    ``kid`` is unknown triggers one refetch (the issuer may have rotated keys)
    and one retry; keys older than ``refresh_interval`` are refetched on next
    use, so a revoked key does not stay trusted forever. Every fetch, failed or
    not, starts a ``min_refresh_interval`` during which no other fetch happens,
    so tokens with made-up kids cannot make us hammer the issuer. Concurrent
    callers share one fetch. When a refetch fails the old keys stay in use.

    Times (``min_refresh_interval``...) are measured with ``trio.current_time()``;
    the ``now`` given to ``verify`` is only the unix time for ``exp``/``nbf``.
    """

    def __init__(
        self,
        url: str,
        *,
        issuer: str | None,
        audience: str | None,
        leeway: float = DEFAULT_LEEWAY,
        algorithms: frozenset[str] = DEFAULT_ALGORITHMS,
        min_refresh_interval: float = DEFAULT_MIN_REFRESH_INTERVAL,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
        max_jwks_bytes: int = DEFAULT_MAX_JWKS_BYTES,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Configure the cache; nothing is fetched until first use (or ``refresh``).

        Args:
            url: the ``http://`` or ``https://`` JWKS URL.
            issuer: the required ``iss``, or None.
            audience: the required ``aud`` member, or None.
            leeway: clock skew allowed on ``exp``/``nbf``, seconds.
            algorithms: the allowed ``alg`` values.
            min_refresh_interval: least time between two fetches, seconds.
            refresh_interval: age after which cached keys are refetched, seconds.
            fetch_timeout: limit on one whole fetch (connect, TLS, response), seconds.
            max_jwks_bytes: largest JWKS response body accepted.
            ssl_context: for https; defaults to ``ssl.create_default_context()``.

        Raises:
            KeyConfigError: the URL or the algorithms are unusable.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise KeyConfigError(f"the JWKS URL must be http:// or https://, not {url!r}")
        _check_algorithms(algorithms)
        self._url = url
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._algorithms = algorithms
        self._min_refresh_interval = min_refresh_interval
        self._refresh_interval = refresh_interval
        self._fetch_timeout = fetch_timeout
        self._max_jwks_bytes = max_jwks_bytes
        self._ssl_context = ssl_context
        self._lock = trio.Lock()
        self._keys: KeySet | None = None
        self._loaded_at = 0.0  # trio time of the last successful fetch
        self._fetched_at: float | None = None  # trio time of the last attempt
        self._generation = 0  # counts fetch attempts, so waiters can tell one happened

    @property
    def keys(self) -> KeySet | None:
        """The cached key set, or None before the first successful fetch."""
        return self._keys

    async def verify(self, token: str, now: float) -> Claims:
        """Verify ``token``, fetching or refreshing the JWKS when needed.

        Args:
            token: the compact JWS.
            now: unix seconds, for ``exp``/``nbf``.

        Returns:
            The token's claims.

        Raises:
            InvalidToken: the token is bad, or its kid stays unknown after a refresh.
            KeysUnavailable: no JWKS could be fetched yet.
        """
        await trio.lowlevel.checkpoint()
        generation, keys = self._generation, self._keys
        if keys is None or trio.current_time() - self._loaded_at >= self._refresh_interval:
            await self._refresh_if_allowed(generation)
            generation, keys = self._generation, self._keys
        if keys is None:
            raise KeysUnavailable(f"no signing keys: the JWKS {self._url_for_log} was not fetched")
        try:
            return self._verify_with(token, keys, now)
        except UnknownKeyId:
            await self._refresh_if_allowed(generation)
            if self._keys is None or self._keys is keys:
                raise
            fresh_keys = self._keys
        return self._verify_with(token, fresh_keys, now)

    async def refresh(self) -> KeySet:
        """Fetch the JWKS now, whatever the intervals say (e.g. at startup, to fail fast).

        Returns:
            The new key set, now cached.

        Raises:
            KeysUnavailable: the fetch failed; the previous keys stay cached.
        """
        async with self._lock:
            return await self._fetch_locked()

    def _verify_with(self, token: str, keys: KeySet, now: float) -> Claims:
        return verify(
            token,
            keys,
            now,
            issuer=self._issuer,
            audience=self._audience,
            leeway=self._leeway,
            algorithms=self._algorithms,
        )

    @property
    def _url_for_log(self) -> str:
        return repr(redact_url(self._url))

    def _fetch_failed(self, detail: str) -> KeysUnavailable:
        return KeysUnavailable(f"fetching the JWKS {self._url_for_log} failed: {detail}")

    async def _refresh_if_allowed(self, seen_generation: int) -> None:
        async with self._lock:
            if self._generation != seen_generation:
                return  # someone fetched while we waited for the lock; use theirs
            if (
                self._fetched_at is not None
                and trio.current_time() - self._fetched_at < self._min_refresh_interval
            ):
                return
            try:
                await self._fetch_locked()
            except KeysUnavailable as exc:
                # Not fatal: old keys (if any) stay in use and the caller reports
                # the token or the missing keys; this log says why.
                logger.warning("%s", exc)

    async def _fetch_locked(self) -> KeySet:
        self._generation += 1
        self._fetched_at = trio.current_time()
        try:
            with trio.fail_after(self._fetch_timeout):
                body = await _http_get(
                    self._url, max_body_bytes=self._max_jwks_bytes, ssl_context=self._ssl_context
                )
            keys = KeySet.from_jwks(parse_jwks_json(body, source="the JWKS"))
        except trio.TooSlowError as exc:
            raise self._fetch_failed(f"took over {self._fetch_timeout} s") from exc
        except KeysUnavailable as exc:
            raise self._fetch_failed(str(exc)) from exc
        except (OSError, trio.BrokenResourceError, h11.ProtocolError, KeyConfigError) as exc:
            raise self._fetch_failed(f"{type(exc).__name__}: {exc}") from exc
        self._keys = keys
        self._loaded_at = self._fetched_at
        logger.info("loaded %d signing keys from %s", len(keys.keys), self._url_for_log)
        return keys


async def _http_get(url: str, *, max_body_bytes: int, ssl_context: ssl.SSLContext | None) -> bytes:
    """GET ``url`` over one HTTP/1.1 connection and return the 200 response body.

    No redirects, no compression, no keep-alive: a JWKS endpoint needs none.
    The caller bounds the time.

    Raises:
        KeysUnavailable: the status is not 200, or the body is over ``max_body_bytes``.
        OSError, trio.BrokenResourceError, h11.ProtocolError: the connection failed.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    is_https = parts.scheme == "https"
    port = parts.port or (443 if is_https else 80)
    stream: trio.abc.Stream
    if is_https:
        context = ssl_context if ssl_context is not None else ssl.create_default_context()
        stream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=context, https_compatible=True
        )
    else:
        stream = await trio.open_tcp_stream(host, port)
    async with stream:
        conn = h11.Connection(our_role=h11.CLIENT)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = h11.Request(
            method="GET",
            target=target,
            headers=[
                ("Host", parts.netloc.rpartition("@")[2]),
                ("Accept", "application/json"),
                ("User-Agent", "hubserver"),
                ("Connection", "close"),
            ],
        )
        await stream.send_all(_bytes(conn.send(request)) + _bytes(conn.send(h11.EndOfMessage())))
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(_RECEIVE_CHUNK_BYTES)))
            elif isinstance(event, h11.Response) and event.status_code != 200:
                raise KeysUnavailable(f"HTTP {event.status_code} instead of 200")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body_bytes:
                    raise KeysUnavailable(f"the response is over {max_body_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            # Anything else (1xx, the 200 head) needs no action.


def _bytes(data: bytes | None) -> bytes:
    # h11 returns None only for ConnectionClosed, which we never send.
    assert data is not None
    return data
