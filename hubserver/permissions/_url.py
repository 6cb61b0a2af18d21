"""`UrlPermissionStore`: roles owned by the access-control backend, asked over HTTP.

Theory of operation. ``role_of(S, U)`` asks ``GET URL?site_id=S&subject=U``;
the backend answers 200 with ``{"role": "site_admin" | "site_super_user" |
"site_user" | null}``. Anything else (another status, a redirect, a body
that is not such an object, a role we do not know, more than
``max_response_bytes``, no whole answer within ``request_timeout``) is a
failure, `PermissionStoreUnavailable`, never a grant and never "no role":
the server then keeps open connections as they were and answers new ones
503.

Answers (``null`` ones too) are cached for ``ttl`` seconds, at most
``max_entries`` of them (the oldest go first). Concurrent questions about
the same pair share one request. After a failure of the backend (no whole
answer in time, a status other than 200, a body over the limit), questions
not answered from the cache fail at once for ``failure_backoff`` seconds
rather than queue up behind a backend that is down; ``version`` asks again
(the watcher's probe), and a success ends that. A 200 whose body is not a
role of ours fails that question only: the backend is up.

Change notices (``POST /v1/permissions/changed``, see ``announce``) drop the
pair's cached answer, and the server re-checks the open connections of that
pair. With ``relay`` (the backplane's Redis URL, or the ``--workers``
parent's broker), a notice received by one node or worker is published to
every one; without it, the backend must notify each node. A notice counts
as a change: ``version`` is the number of notices applied. Every ``ttl``
the store also asks the server to re-check every open connection: answers
older than that are asked again, so a revoke whose notice was lost ends
open connections within about ``ttl``.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import trio

from hubserver.backplane import BackplaneError

from ._http import HttpGetError, HttpGetter, redact_origin
from ._model import Role, is_id
from ._notices import NoticeChannel, encode_notice
from ._relay import NoticeRelay
from ._store import PermissionChange, PermissionStoreUnavailable

__all__ = ["UrlPermissionStore"]

log = logging.getLogger("hubserver")

DEFAULT_TTL: Final = 60.0
DEFAULT_MAX_ENTRIES: Final = 100_000
DEFAULT_REQUEST_TIMEOUT: Final = 2.0
#: A role answer is a few dozen bytes; anything near this is not one.
DEFAULT_MAX_RESPONSE_BYTES: Final = 16 * 1024
DEFAULT_MAX_CONNECTIONS: Final = 8
DEFAULT_FAILURE_BACKOFF: Final = 1.0
_ROLES: Final = {role.value: role for role in Role}


@dataclass(slots=True)
class _Lookup:
    """A request under way; later askers of the same pair wait for it."""

    done: trio.Event = field(default_factory=trio.Event)
    is_answered: bool = False
    role: Role | None = None
    error: PermissionStoreUnavailable | None = None


class UrlPermissionStore:
    """A `PermissionStore` (and `ChangeFeed`) asking an HTTP endpoint; see the module docstring.

    Args:
        url: ``http(s)://...``; ``site_id`` and ``subject`` are added to its query.
        ttl: seconds an answer is reused (and between two re-checks of everyone).
        max_entries: answers cached at most.
        request_timeout: the deadline of one question, from waiting for a
            free connection to the end of the answer, in seconds.
        max_response_bytes: the longest answer body accepted.
        max_connections: requests at once (and connections kept alive).
        failure_backoff: seconds questions fail at once after a failure.
        relay: how change notices reach every node: a ``redis://`` URL, or a
            `NoticeRelay` (the ``--workers`` parent's, `WorkerNoticeChannel`).
        key_prefix: the prefix of the relay's channel (the Redis store's).
        ssl_context: for https; the system's default trust by default.
        token: sent with every question as ``Authorization: Bearer TOKEN``
            (never logged; a 401 or 403 is a failure like any other).

    Close it with ``aclose``.

    Raises:
        ValueError: ``url`` is not http(s), or a number is out of range.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl: float = DEFAULT_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        failure_backoff: float = DEFAULT_FAILURE_BACKOFF,
        relay: str | NoticeRelay | None = None,
        key_prefix: str = "hubserver",
        ssl_context: ssl.SSLContext | None = None,
        token: str | None = None,
    ) -> None:
        for name, value in (
            ("ttl", ttl),
            ("max_entries", max_entries),
            ("request_timeout", request_timeout),
            ("max_response_bytes", max_response_bytes),
            ("max_connections", max_connections),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if not failure_backoff >= 0:
            raise ValueError(f"failure_backoff must not be negative, got {failure_backoff}")
        self._http = HttpGetter(
            url,
            max_connections=max_connections,
            max_body_bytes=max_response_bytes,
            ssl_context=ssl_context,
            headers=() if token is None else [("Authorization", f"Bearer {token}")],
        )
        self._url_for_log = redact_origin(url)
        self._ttl = ttl
        self._max_entries = max_entries
        self._request_timeout = request_timeout
        self._failure_backoff = failure_backoff
        # (site_id, subject) -> (role, the trio time it stops being fresh)
        self._answers: dict[tuple[str, str], tuple[Role | None, float]] = {}
        self._lookups: dict[tuple[str, str], _Lookup] = {}
        # Bumped whenever answers are dropped: a request under way then is not cached.
        self._generation = 0
        self._version = 0
        self._is_available = True
        self._failed_until = -math.inf
        self._last_failed: tuple[str, str] | None = None
        self._on_change: Callable[[PermissionChange], None] | None = None
        self._relay: NoticeRelay | None = None
        if not isinstance(relay, str):
            self._relay = relay
        else:
            try:
                self._relay = NoticeChannel.for_url(relay, key_prefix=key_prefix)
            except BackplaneError as exc:
                raise ValueError(f"relay: {exc}") from exc

    async def aclose(self) -> None:
        """Close the kept connections (to the backend and to the relay's Redis)."""
        await self._http.aclose()
        if self._relay is not None:
            await self._relay.aclose()

    # -- PermissionStore -------------------------------------------------------------

    async def role_of(self, site_id: str, subject: str) -> Role | None:
        """See `PermissionStore.role_of`: the cached answer, or one question to the backend."""
        if not is_id(site_id) or not is_id(subject):
            await trio.lowlevel.checkpoint()
            return None  # the backend is never asked about ids that cannot exist
        key = (site_id, subject)
        answer = self._answers.get(key)
        if answer is not None and trio.current_time() < answer[1]:
            await trio.lowlevel.checkpoint()
            return answer[0]
        while (lookup := self._lookups.get(key)) is not None:
            await lookup.done.wait()  # bounded: the asker's request has a deadline
            if lookup.is_answered:
                return lookup.role
            if lookup.error is not None:
                raise PermissionStoreUnavailable(str(lookup.error))
            # Its asker was cancelled: ask ourselves.
        return await self._ask(key)

    async def version(self) -> int:
        """The number of change notices applied; asks the backend again while it is failing.

        Raises:
            PermissionStoreUnavailable: the backend still fails.
        """
        if not self._is_available and self._last_failed is not None:
            await self._fetch(*self._last_failed, is_probe=True)
        else:
            await trio.lowlevel.checkpoint()
        return self._version

    @property
    def is_available(self) -> bool:
        """False since a question failed, until one is answered."""
        return self._is_available

    # -- ChangeFeed --------------------------------------------------------------------

    async def watch_changes(self, on_change: Callable[[PermissionChange], None]) -> None:
        """See `ChangeFeed.watch_changes`: notices, relayed ones, and a re-check every ``ttl``."""
        self._on_change = on_change
        try:
            async with trio.open_nursery() as nursery:
                if self._relay is not None:
                    nursery.start_soon(self._relay.run, self._apply_notice)
                while True:
                    await trio.sleep(self._ttl)
                    on_change(PermissionChange(pairs=None))
        finally:
            self._on_change = None

    async def announce(self, site_id: str, subject: str) -> None:
        """See `ChangeFeed.announce`: through the relay if any, else on this node.

        Raises:
            PermissionStoreUnavailable: the relay failed; the notice was
                applied on this node only.
        """
        pairs = frozenset({(site_id, subject)})
        if self._relay is None:
            await trio.lowlevel.checkpoint()
            self._apply(pairs)
            return
        try:
            # This node hears it back from the channel, like every other node.
            await self._relay.publish(encode_notice(None, pairs))
        except PermissionStoreUnavailable:
            self._apply(pairs)
            raise

    # -- internals ---------------------------------------------------------------------

    def _apply_notice(self, change: PermissionChange) -> None:
        # A relayed notice's version is another node's count, not ours.
        self._apply(change.pairs)

    def _apply(self, pairs: frozenset[tuple[str, str]] | None) -> None:
        self._generation += 1
        if pairs is None:
            self._answers.clear()
            self._lookups.clear()
        else:
            for pair in pairs:
                self._answers.pop(pair, None)
                # Later askers must not join a request that may predate the change.
                self._lookups.pop(pair, None)
        self._version += 1
        if self._on_change is not None:
            self._on_change(PermissionChange(pairs=pairs, version=self._version))

    async def _ask(self, key: tuple[str, str]) -> Role | None:
        lookup = self._lookups[key] = _Lookup()
        generation = self._generation
        try:
            role = await self._fetch(*key)
            lookup.role, lookup.is_answered = role, True
            if generation == self._generation:
                self._remember(key, role)
            return role
        except PermissionStoreUnavailable as exc:
            lookup.error = exc
            raise
        finally:
            if self._lookups.get(key) is lookup:
                del self._lookups[key]
            lookup.done.set()

    def _remember(self, key: tuple[str, str], role: Role | None) -> None:
        answers = self._answers
        answers.pop(key, None)  # re-inserted last: the oldest answers stay first
        while len(answers) >= self._max_entries:
            del answers[next(iter(answers))]
        answers[key] = (role, trio.current_time() + self._ttl)

    async def _fetch(self, site_id: str, subject: str, *, is_probe: bool = False) -> Role | None:
        now = trio.current_time()
        if now < self._failed_until and not is_probe:
            await trio.lowlevel.checkpoint()
            raise PermissionStoreUnavailable(
                f"the permissions URL {self._url_for_log} failed less than "
                f"{self._failure_backoff:g} s ago"
            )
        try:
            with trio.fail_after(self._request_timeout):
                status, body = await self._http.get({"site_id": site_id, "subject": subject})
        except trio.TooSlowError:
            raise self._failed(
                site_id, subject, f"no whole answer within {self._request_timeout:g} s"
            ) from None
        except HttpGetError as exc:
            raise self._failed(site_id, subject, str(exc)) from exc
        if status in (401, 403):
            hint = f"HTTP {status} instead of 200 (check --permissions-url-token-file)"
            raise self._failed(site_id, subject, hint)
        if status != 200:
            raise self._failed(site_id, subject, f"HTTP {status} instead of 200")
        if not self._is_available:
            log.info("the permissions URL %s answers again", self._url_for_log)
        self._is_available = True
        self._failed_until = -math.inf
        try:
            return _parse_answer(body)
        except ValueError as exc:
            # The backend is up; only this pair's answer is unusable (a role
            # it added, a bad record). It fails this question (never a grant),
            # not every other one, and is not the pair recovery is probed with:
            # that would hold the watcher, and every revoke, until it is fixed.
            raise PermissionStoreUnavailable(
                f"the permissions URL {self._url_for_log}: {exc}"
            ) from exc

    def _failed(self, site_id: str, subject: str, detail: str) -> PermissionStoreUnavailable:
        self._is_available = False
        self._failed_until = trio.current_time() + self._failure_backoff
        self._last_failed = (site_id, subject)
        return PermissionStoreUnavailable(f"the permissions URL {self._url_for_log}: {detail}")


def _parse_answer(body: bytes) -> Role | None:
    """``{"role": NAME | null}`` as a role; anything else raises ValueError."""
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError("the answer is not JSON") from exc
    if not isinstance(answer, dict) or "role" not in answer:
        raise ValueError('expected a JSON object {"role": ...}')
    name = answer["role"]
    if name is None:
        return None
    if isinstance(name, str) and name in _ROLES:
        return _ROLES[name]
    raise ValueError(f"expected a role ({', '.join(_ROLES)}) or null")
