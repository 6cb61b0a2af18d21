"""`RedisPermissionStore`: roles in the Redis every node of a fleet shares.

Keys (``P`` is ``key_prefix``, the backplane's by default; its keys are
``P:seq:...``, ``P:hist:...``, ``P:id:...``, so these never meet them):

- ``P:perm:site:SITE``: a hash per site, ``subject -> "ROLE GRANTED_AT"``
  (the role's value, a space, the grant's ISO 8601 UTC time). The site id is
  the rest of the key, colons and all: the prefix before it is fixed.
- ``P:perm:sites``: the set of sites that have members (for ``list``).
- ``P:perm:version``: a counter ``INCR``-ed once per grant, bulk grant or
  actual revoke.

Every change is one Lua script: it writes, bumps the version, and publishes a
notice (see ``_notices``) naming the version and the pairs (or none past
``max_notice_pairs``: nodes then re-check everyone) on ``P:perm:changes``, or
``P:perm:changes:dbN`` on database N > 0 (channels are server-wide, keys are not).
Redis runs a script atomically, so a node that receives a notice reads the
change it announces, and notices arrive in version order.

A lookup is one ``HGET`` (the server caches answers per connection open, see
``CachedPermissionStore``); ``version`` is one ``GET``. Every command runs
under ``fail_after(op_timeout)``, from the wait for a pooled connection to
the reply; any failure raises `PermissionStoreUnavailable` (the server keeps
open connections on the roles they had and answers new ones 503). A value
that is not one of our roles is never taken for a grant: it is a failure too.
"""

from __future__ import annotations

import builtins
import enum
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Final, Literal

import trio

from hubserver.backplane import BackplaneError
from hubserver.backplane.redis_client import (
    Arg,
    ConnectionPool,
    RedisConnection,
    Reply,
    Script,
    parse_redis_url,
)

from ._model import Member, Role, check_id, check_role, is_id
from ._notices import NoticeChannel, channel_name, encode_notice
from ._store import PermissionChange, PermissionStoreError, PermissionStoreUnavailable

__all__ = ["DEFAULT_KEY_PREFIX", "Found", "Held", "RedisPermissionStore"]

log = logging.getLogger("hubserver")

DEFAULT_KEY_PREFIX: Final = "hubserver"
#: Pairs one notice names at most; a bigger change asks nodes to re-check everyone.
MAX_NOTICE_PAIRS: Final = 1000

_GRANT: Final = Script("""
-- KEYS[1]: the sites set; KEYS[2]: the version; KEYS[2 + i]: row i's site hash.
-- ARGV[1]: the channel; ARGV[2]: pairs a notice names at most; then three per
-- row: site, subject, value. Returns the new version.
local count = #KEYS - 2
for i = 1, count do
  local a = 3 + (i - 1) * 3
  redis.call('HSET', KEYS[2 + i], ARGV[a + 1], ARGV[a + 2])
  redis.call('SADD', KEYS[1], ARGV[a])
end
local version = redis.call('INCR', KEYS[2])
local named = false
if count <= tonumber(ARGV[2]) then
  named = {}
  for i = 1, count do
    local a = 3 + (i - 1) * 3
    named[i] = {ARGV[a], ARGV[a + 1]}
  end
end
redis.call('PUBLISH', ARGV[1], cmsgpack.pack({version, named}))
return version
""")

_REVOKE: Final = Script("""
-- KEYS[1]: the sites set; KEYS[2]: the version; KEYS[3]: the site's hash.
-- ARGV[1]: the channel; ARGV[2]: the site; ARGV[3]: the subject.
-- Returns 1 if the subject had a role there, else 0 (and nothing changes).
if redis.call('HDEL', KEYS[3], ARGV[3]) == 0 then
  return 0
end
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('SREM', KEYS[1], ARGV[2])
end
local version = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[1], cmsgpack.pack({version, {{ARGV[2], ARGV[3]}}}))
return 1
""")


_IMPORT: Final = Script("""
-- KEYS[1]: the sites set; KEYS[2]: the version; KEYS[2 + i]: row i's site hash.
-- ARGV[1]: the channel; ARGV[2]: pairs a notice names at most; ARGV[3]: the mode,
-- 'compare', 'add' or 'replace'; then three per row: site, subject, value.
-- Returns what each row found: 0 nothing, 1 the same role, or the value held
-- (another role, or a value not ours). 'compare' writes nothing; 'add' writes
-- the rows that found nothing, unless a row found another value (then
-- nothing); 'replace' writes every row that did not find the same role. A row
-- that found the same role is left as it is (its grant time too).
local count = #KEYS - 2
local mode = ARGV[3]
local found = {}
local others = 0
for i = 1, count do
  local a = 4 + (i - 1) * 3
  local current = redis.call('HGET', KEYS[2 + i], ARGV[a + 1])
  if not current then
    found[i] = 0
  elseif string.match(current, '^[^ ]*') == string.match(ARGV[a + 2], '^[^ ]*') then
    found[i] = 1
  else
    found[i] = current
    others = others + 1
  end
end
if mode == 'compare' or (mode == 'add' and others > 0) then
  return found
end
local written = {}
for i = 1, count do
  if found[i] ~= 1 then
    local a = 4 + (i - 1) * 3
    redis.call('HSET', KEYS[2 + i], ARGV[a + 1], ARGV[a + 2])
    redis.call('SADD', KEYS[1], ARGV[a])
    written[#written + 1] = {ARGV[a], ARGV[a + 1]}
  end
end
if #written > 0 then
  local version = redis.call('INCR', KEYS[2])
  local named = false
  if #written <= tonumber(ARGV[2]) then
    named = written
  end
  redis.call('PUBLISH', ARGV[1], cmsgpack.pack({version, named}))
end
return found
""")


class Found(enum.Enum):
    """What `RedisPermissionStore.import_grants` found in Redis for a grant it was given."""

    NOTHING = "nothing"
    SAME_ROLE = "the same role"
    #: Another role, or a value that is not one of ours.
    OTHER_ROLE = "another role"


@dataclass(frozen=True, slots=True)
class Held:
    """What Redis held for an imported grant: `Found`, and the role (None: none, or not ours)."""

    found: Found
    role: Role | None


class RedisPermissionStore(trio.abc.AsyncResource):
    """A `PermissionStore` (and `ChangeFeed`) over Redis; see the module docstring.

    Args:
        url: ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, the backplane's.
        key_prefix: the prefix of every key and of the channel (which also
            names the database, unless it is 0: see ``RedisAddress.channel``).
        op_timeout: the deadline of one command, from waiting for a pooled
            connection to the reply, in seconds.
        ping_interval: how long the notice subscription may stay silent
            before it is probed with ``PING``, in seconds.
        max_connections: command connections at most (the subscription has its own).
        max_notice_pairs: pairs a notice names at most.

    Close it with ``aclose`` (or ``async with``).

    Raises:
        PermissionStoreError: ``url`` is not a redis:// URL.
        ValueError: a duration or count is not positive.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        op_timeout: float = 2.0,
        ping_interval: float = 5.0,
        max_connections: int = 4,
        max_notice_pairs: int = MAX_NOTICE_PAIRS,
    ) -> None:
        for name, value in (
            ("op_timeout", op_timeout),
            ("ping_interval", ping_interval),
            ("max_connections", max_connections),
            ("max_notice_pairs", max_notice_pairs),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        try:
            self._address = parse_redis_url(url)
        except BackplaneError as exc:
            raise PermissionStoreError(f"permission store: {exc}") from exc
        self._op_timeout = op_timeout
        self._max_notice_pairs = max_notice_pairs
        self._pool = ConnectionPool(self._address, max_connections)
        self._site_key_prefix = f"{key_prefix}:perm:site:"
        self._sites_key = f"{key_prefix}:perm:sites"
        self._version_key = f"{key_prefix}:perm:version"
        self._channel = channel_name(self._address, key_prefix)
        self._notices = NoticeChannel(
            self._address,
            self._channel,
            pool=self._pool,
            op_timeout=op_timeout,
            ping_interval=ping_interval,
        )
        self._is_available = True
        self._on_change: Callable[[PermissionChange], None] | None = None

    @property
    def channel(self) -> str:
        """The Pub/Sub channel of the change notices, with the database in it (0: none)."""
        return self._channel

    async def aclose(self) -> None:
        """Close the idle connections (the store stays usable: it reconnects)."""
        await self._pool.close_idle()

    # -- PermissionStore -------------------------------------------------------------

    async def role_of(self, site_id: str, subject: str) -> Role | None:
        """See `PermissionStore.role_of`: one ``HGET``."""
        if not is_id(site_id) or not is_id(subject):
            await trio.lowlevel.checkpoint()
            return None  # never granted, so unknown: not worth a round trip
        reply = await self._call(
            "a role lookup", lambda conn: conn.execute("HGET", self._site_key(site_id), subject)
        )
        if reply is None:
            return None
        parsed = _parse_value(reply)
        if parsed is None:
            # Never taken for a grant: a value someone else wrote, or a bug of ours.
            # Redis answered, so only this lookup fails, not the store.
            raise PermissionStoreUnavailable(
                f"Redis at {self._address}: the role of a subject on a site is not one of ours"
            )
        return parsed[0]

    async def version(self) -> int:
        """See `PermissionStore.version`: one ``GET``."""
        reply = await self._call("the version", lambda conn: conn.execute("GET", self._version_key))
        if reply is None:
            return 0
        # INCR counts up to 2**63 - 1 (19 digits); past 4300 digits int() raises
        # ValueError, which would end the watcher and the server with it.
        if isinstance(reply, bytes) and reply.isdigit() and len(reply) <= 19:
            return int(reply)
        raise self._unavailable(f"Redis key {self._version_key} does not hold a version")

    @property
    def is_available(self) -> bool:
        """False since a command failed or missed its deadline, until one succeeds."""
        return self._is_available

    # -- ChangeFeed --------------------------------------------------------------------

    async def watch_changes(self, on_change: Callable[[PermissionChange], None]) -> None:
        """See `ChangeFeed.watch_changes`: the subscription to the notices' channel."""
        self._on_change = on_change
        try:
            await self._notices.run(on_change)
        finally:
            self._on_change = None

    async def announce(self, site_id: str, subject: str) -> None:
        """See `ChangeFeed.announce`: a notice without a version (nothing changed in Redis).

        Raises:
            PermissionStoreUnavailable: Redis could not take it; the notice
                was applied on this node only.
        """
        pairs = frozenset({(site_id, subject)})
        try:
            # This node hears it back from the channel, like every other node.
            await self._notices.publish(encode_notice(None, pairs))
        except PermissionStoreUnavailable:
            if self._on_change is not None:
                self._on_change(PermissionChange(pairs=pairs))
            raise

    # -- members: what ``hubserver members`` does --------------------------------------

    async def grant(self, site_id: str, subject: str, role: Role) -> None:
        """Give ``subject`` ``role`` on ``site_id``, replacing any role it had there.

        Raises:
            ValueError: an id is empty, too long or not a string, or role is not a Role.
            PermissionStoreError: Redis failed (the message says whether the
                grant may have been applied).
        """
        row = (check_id("site_id", site_id), check_id("subject", subject), check_role(role))
        await self._grant_rows([row])

    async def grant_many(self, grants: Iterable[tuple[str, str, Role]]) -> int:
        """Give each ``(site_id, subject, role)`` in one script: all or none, one version step.

        A later row for the same site and subject wins.

        Returns:
            How many rows were given.

        Raises:
            ValueError: an id or role is bad (naming the row by its index);
                nothing is written.
            PermissionStoreError: Redis failed.
        """
        rows = []
        for index, (site_id, subject, role) in enumerate(grants):
            try:
                rows.append(
                    (check_id("site_id", site_id), check_id("subject", subject), check_role(role))
                )
            except ValueError as exc:
                raise ValueError(f"grant {index}: {exc}") from exc
        if not rows:
            await trio.lowlevel.checkpoint()
            return 0
        await self._grant_rows(rows)
        return len(rows)

    async def revoke(self, site_id: str, subject: str) -> bool:
        """Remove ``subject``'s role on ``site_id``; False if it had none (nothing changes).

        Raises:
            ValueError: an id is empty, too long or not a string.
            PermissionStoreError: Redis failed.
        """
        check_id("site_id", site_id)
        check_id("subject", subject)
        keys: list[Arg] = [self._sites_key, self._version_key, self._site_key(site_id)]
        args: list[Arg] = [self._channel, site_id, subject]
        reply = await self._call(
            "a revoke", lambda conn: _REVOKE.evaluate(conn, keys, args), is_write=True
        )
        return reply == 1

    async def import_grants(
        self, members: Sequence[Member], *, mode: Literal["compare", "add", "replace"]
    ) -> builtins.list[Held]:
        """Copy grants made elsewhere (another store's), with their grant times, in one script.

        A grant Redis already holds with the same role is left as it is, so
        importing the same grants twice changes nothing (not even the version).
        The version moves and a notice goes out only when something is written.

        Args:
            members: the grants; one script, so keep it to a few hundred.
            mode: ``"compare"`` writes nothing; ``"add"`` writes the grants
                Redis does not hold, unless it holds another role for one of
                them (then nothing is written); ``"replace"`` also replaces
                those other roles.

        Returns:
            What Redis held for each grant before, in order.

        Raises:
            ValueError: an id or role is bad (naming the grant by its index);
                nothing is written.
            PermissionStoreError: Redis failed.
        """
        keys: list[Arg] = [self._sites_key, self._version_key]
        args: list[Arg] = [self._channel, self._max_notice_pairs, mode]
        for index, member in enumerate(members):
            try:
                site_id = check_id("site_id", member.site_id)
                subject = check_id("subject", member.subject)
                role = check_role(member.role)
            except ValueError as exc:
                raise ValueError(f"grant {index}: {exc}") from exc
            keys.append(self._site_key(site_id))
            args += [site_id, subject, f"{role.value} {member.granted_at.isoformat()}"]
        if not members:
            await trio.lowlevel.checkpoint()
            return []
        reply = await self._call(
            "an import",
            lambda conn: _IMPORT.evaluate(conn, keys, args),
            is_write=mode != "compare",
        )
        if not isinstance(reply, builtins.list) or len(reply) != len(members):
            raise self._unavailable("an import got a malformed reply")
        held = []
        for member, item in zip(members, reply, strict=True):
            if item == 0:
                held.append(Held(Found.NOTHING, None))
            elif item == 1:
                held.append(Held(Found.SAME_ROLE, member.role))
            elif isinstance(item, bytes):
                parsed = _parse_value(item)
                held.append(Held(Found.OTHER_ROLE, None if parsed is None else parsed[0]))
            else:
                raise self._unavailable("an import got a malformed reply")
        return held

    async def list(self, site_id: str | None = None) -> builtins.list[Member]:
        """The members of one site (or of all sites), sorted by site and subject.

        Raises:
            ValueError: ``site_id`` is given but empty, too long or not a string.
            PermissionStoreError: Redis failed, or holds something that is not a grant.
        """
        if site_id is not None:
            sites = [check_id("site_id", site_id)]
        else:
            reply = await self._call(
                "the list of sites", lambda conn: conn.execute("SMEMBERS", self._sites_key)
            )
            if not isinstance(reply, builtins.list):
                raise self._unavailable(f"Redis key {self._sites_key} is not a set")
            sites = sorted(_text(item) for item in reply)
        members = []
        for site in sites:
            key = self._site_key(site)
            reply = await self._call("a site's members", partial(_hgetall, key=key))
            if not isinstance(reply, builtins.list) or len(reply) % 2:
                raise self._unavailable(f"Redis key {key} is not a hash")
            for name, value in zip(reply[::2], reply[1::2], strict=True):
                parsed = _parse_value(value)
                if parsed is None:
                    raise PermissionStoreError(
                        f"Redis key {key} holds a role that is not one of ours"
                    )
                members.append(
                    Member(site_id=site, subject=_text(name), role=parsed[0], granted_at=parsed[1])
                )
        return sorted(members, key=lambda member: (member.site_id, member.subject))

    # -- internals ---------------------------------------------------------------------

    def _site_key(self, site_id: str) -> str:
        return self._site_key_prefix + site_id

    async def _grant_rows(self, rows: builtins.list[tuple[str, str, Role]]) -> None:
        granted_at = datetime.now(UTC).isoformat()
        keys: list[Arg] = [self._sites_key, self._version_key]
        args: list[Arg] = [self._channel, self._max_notice_pairs]
        for site_id, subject, role in rows:
            keys.append(self._site_key(site_id))
            args += [site_id, subject, f"{role.value} {granted_at}"]
        await self._call("a grant", lambda conn: _GRANT.evaluate(conn, keys, args), is_write=True)

    def _unavailable(self, message: str) -> PermissionStoreUnavailable:
        self._is_available = False
        return PermissionStoreUnavailable(f"Redis at {self._address}: {message}")

    async def _call(
        self,
        what: str,
        operation: Callable[[RedisConnection], Awaitable[Reply]],
        *,
        is_write: bool = False,
    ) -> Reply:
        """Run ``operation`` on a pooled connection under the deadline; map failures to ours."""
        maybe = "; it may or may not have been applied" if is_write else ""
        try:
            with trio.fail_after(self._op_timeout):
                async with self._pool.connection() as conn:
                    reply = await operation(conn)
        except trio.TooSlowError as exc:
            await self._pool.close_idle()  # the others most likely died with this one
            raise self._unavailable(
                f"no answer to {what} within {self._op_timeout:g} s{maybe}"
            ) from exc
        except BackplaneError as exc:
            await self._pool.close_idle()
            raise self._unavailable(f"{what} failed{maybe}: {exc}") from exc
        self._is_available = True
        return reply


def _parse_value(value: Reply) -> tuple[Role, datetime] | None:
    """``b"ROLE GRANTED_AT"`` as a role and a time, or None if it is not that."""
    if not isinstance(value, bytes):
        return None
    role_text, _, granted_text = value.partition(b" ")
    try:
        return Role(role_text.decode()), datetime.fromisoformat(granted_text.decode())
    except (UnicodeDecodeError, ValueError):
        return None


async def _hgetall(conn: RedisConnection, *, key: str) -> Reply:
    return await conn.execute("HGETALL", key)


def _text(value: Reply) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    raise PermissionStoreError(f"expected a string from Redis, got {type(value).__name__}")
