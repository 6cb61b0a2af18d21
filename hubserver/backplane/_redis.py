"""The Redis backplane: numbering, history and fan-out shared by every node.

Theory of operation
-------------------

Keys (``P`` is ``key_prefix``; hubs are fixed names without ``:``, so a key
names one (hub, site) even when the site id holds colons):

- ``P:seq:HUB:SITE``: the counter, ``INCR``-ed once per event.
- ``P:hist:HUB:SITE``: the history, a stream whose entry ids are ``<seq>-1``
  (so ``XRANGE`` by seq is direct), with fields ``id``, ``text`` and ``user``
  (left out when the event has no user), trimmed with ``MAXLEN ~ history_size``.
- ``P:id:HUB:LEN:SITE:ID``: the seq of an accepted event id, set with ``PX``
  = the dedupe window (``LEN`` is the site id's length, so a colon in a site
  or event id cannot make two (site, id) pairs share a key).

``publish`` is one Lua script for the whole batch: for every event, in order,
skip it if its id key exists (a retry: the key holds the original seq),
else take the next seq, build ``text = prefix .. seq .. "}"``, ``XADD``, set
the id key; then one ``PUBLISH`` of the new events (a MessagePack array of
``[hub, site, user or false, id, seq, text]``) on ``channel`` (with ``:dbN``
on database N > 0: channels are server-wide, keys are not). Redis runs a
script atomically, so per-site seq order, publish order and channel order are
the same on every node, a retry racing its original on another node is still
published once, and the events of one ``publish`` reach every node as one
message (one ``deliver`` call). Scripts go by ``EVALSHA``; after a
``NOSCRIPT`` (a restarted server, a ``SCRIPT FLUSH``) the same call is made
with ``EVAL``, which also caches it.

Dedupe keys are one small key per id with an expiry, rather than a per-site
sorted set trimmed by time: Redis reclaims them by itself (no trimming work
in the script, nothing to get wrong when a site goes quiet), a lookup is one
``GET``, and under ``maxmemory`` with a ``volatile-*`` policy they are what
Redis evicts first, before the counters and histories (which have no TTL).
Their memory is about (rate of published events) x (window) x ~100 bytes
plus the key; lower ``--dedupe-window`` if that is too much.

What a failed publish means (see ``Backplane.publish``): an error reply that
Redis gives before a script writes anything (``OOM``, ``READONLY``,
``MISCONF``, ``NOREPLICAS``, ``BUSY``, ``MASTERDOWN``, a ``NOPERM`` for the
script command itself, the script's own "nothing was published" refusal)
means it did nothing, because the script reads before it writes and a Redis
that refuses writes refuses the script's first one: ``BackplaneUnavailable``;
so is a failure before the command was sent whole. Any other error (one
raised inside the script after it wrote, such as an ACL refusing PUBLISH),
and a failure after the command was sent (timeout, lost connection, an
unreadable reply), is ``PublishOutcomeUnknown``.

``MAXLEN ~`` trims whole stream nodes (``stream-node-max-entries``, 100 by
default), never below the limit, so a stream holds between ``history_size``
and about ``history_size + 100`` entries. ``history`` therefore reports the
newest ``history_size`` seqs: ``first_seq = max(oldest entry actually there,
last_seq - history_size + 1)``, exactly what ``MemoryBackplane`` keeps. It
reads the counter, the oldest entry and the slice in one (read-only) script,
so the three agree even while other nodes publish.

Commands use a ``ConnectionPool`` (at most ``max_connections``). Every
command runs under ``fail_after(op_timeout)``, covering the wait for a pooled
connection, connecting, and the reply.

``run`` keeps a ``Subscription`` to the channel: after an outage it
subscribes again and calls ``on_reconnect``, so the caller can fetch from
``history`` what it missed; it probes a silent subscription with ``PING``
every ``ping_interval``.

``is_available`` is False after a command could not reach Redis (until one
succeeds or the subscriber reconnects), while ``run`` is not subscribed, and
after ``UNAVAILABLE_AFTER_FAILURES`` publishes in a row failed (Redis answers
but refuses writes: OOM, a replica, an ACL). In that last state ``run`` probes
every ``ping_interval`` with a write through a script, and the first success
(probe or publish) makes it available again.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Final

import msgpack
import trio

from ._contract import (
    BackplaneError,
    BackplaneUnavailable,
    History,
    NumberedEvent,
    PendingEvent,
    PublishOutcomeUnknown,
    number,
)
from .redis_client import (
    Arg,
    ConnectionPool,
    RedisAddress,
    RedisConnection,
    RedisReplyError,
    Reply,
    Script,
    Subscription,
    parse_redis_url,
)

__all__ = ["RedisBackplane", "decode_batch"]

log = logging.getLogger(__name__)

#: Publishes failing in a row before ``is_available`` turns False.
UNAVAILABLE_AFTER_FAILURES: Final = 3

_PUBLISH_LUA: Final = """
-- KEYS[1]: the epoch; event i has its counter at KEYS[3i-1], its history at
-- KEYS[3i] and the dedupe key of its id at KEYS[3i+1].
-- ARGV[1]: the channel; ARGV[2]: the history size (MAXLEN ~); ARGV[3]: an epoch
-- to use if there is none yet (a fresh or emptied Redis); ARGV[4]: the dedupe
-- window in milliseconds (0: off); then six per event: hub, site, has_user
-- ('1' or '0'), user, id, prefix.
-- Returns {epoch, seqs, duplicate flags (1/0), events not stored, first store error}.
--
-- Phase 1 only reads, so an error there (a corrupt counter) leaves nothing
-- written. Phase 2 writes the counters first: a Redis that refuses writes
-- (OOM, READONLY replica, ACL) refuses that first write, and the script ends
-- with nothing done. Storing in history may fail per event (a history key
-- someone overwrote with another type or a foreign entry id): the event is
-- still numbered and broadcast, the history gets a hole (resumers get a Gap).
local window = tonumber(ARGV[4])
local count = (#KEYS - 1) / 3
local epoch = redis.call('GET', KEYS[1])
local counters = {}
local first_seqs = {}
for i = 1, count do
  local key = KEYS[3 * i - 1]
  if counters[key] == nil then
    local value = redis.call('GET', key)
    local last = 0
    if value then
      last = tonumber(value)
      if last == nil or last < 0 or last ~= math.floor(last) then
        return redis.error_reply('ERR the counter ' .. key ..
          ' is not a seq; nothing was published')
      end
    end
    counters[key] = last
    first_seqs[key] = last
  end
end
local seqs = {}
local duplicates = {}
local taken = {}
local is_new = {}
local new_count = 0
for i = 1, count do
  local id_key = KEYS[3 * i + 1]
  local prior = nil
  if window > 0 then
    prior = taken[id_key]
    if prior == nil then
      -- A key of another type is not ours to trust: treat the id as new.
      local value = redis.pcall('GET', id_key)
      if type(value) == 'string' then
        prior = tonumber(value)
      end
    end
  end
  if prior then
    seqs[i] = prior
    duplicates[i] = 1
  else
    local key = KEYS[3 * i - 1]
    local seq = counters[key] + 1
    counters[key] = seq
    seqs[i] = seq
    duplicates[i] = 0
    is_new[i] = true
    new_count = new_count + 1
    if window > 0 then
      taken[id_key] = seq
    end
  end
end
if new_count == 0 then
  -- Only retries: nothing to write, so this answers even when writes are refused.
  return {epoch or '', seqs, duplicates, 0, ''}
end
if not epoch then
  epoch = ARGV[3]
  redis.call('SET', KEYS[1], epoch)
end
for key, last in pairs(counters) do
  if last ~= first_seqs[key] then
    redis.call('SET', key, string.format('%d', last))
  end
end
local batch = {}
local unstored = 0
local first_error = ''
for i = 1, count do
  if is_new[i] then
    local a = 5 + (i - 1) * 6
    local seq = seqs[i]
    local text = ARGV[a + 5] .. string.format('%d', seq) .. '}'
    local entry_id = string.format('%d-1', seq)
    -- cmsgpack arrays cannot hold nil: false stands for "no user"
    local user = false
    local stored
    if ARGV[a + 2] == '1' then
      user = ARGV[a + 3]
      stored = redis.pcall('XADD', KEYS[3 * i], 'MAXLEN', '~', ARGV[2], entry_id,
        'id', ARGV[a + 4], 'text', text, 'user', user)
    else
      stored = redis.pcall('XADD', KEYS[3 * i], 'MAXLEN', '~', ARGV[2], entry_id,
        'id', ARGV[a + 4], 'text', text)
    end
    if type(stored) == 'table' and stored.err then
      unstored = unstored + 1
      if first_error == '' then
        first_error = KEYS[3 * i] .. ': ' .. stored.err
      end
    end
    if window > 0 then
      redis.call('SET', KEYS[3 * i + 1], string.format('%d', seq), 'PX', window)
    end
    batch[#batch + 1] = {ARGV[a], ARGV[a + 1], user, ARGV[a + 4], seq, text}
  end
end
redis.call('PUBLISH', ARGV[1], cmsgpack.pack({epoch, batch}))
return {epoch, seqs, duplicates, unstored, first_error}
"""

#: Error codes Redis gives before a script's first write takes effect: Redis
#: refuses a script's writes as a whole in these states, so nothing was done.
_PRE_WRITE_CODES: Final = frozenset(
    {"OOM", "READONLY", "MISCONF", "NOREPLICAS", "BUSY", "MASTERDOWN", "NOSCRIPT"}
)


def _refused_before_any_write(exc: RedisReplyError) -> bool:
    if exc.code in _PRE_WRITE_CODES:
        return True
    text = str(exc)
    if exc.code == "NOPERM":
        return "@user_script" not in text  # the script command itself was refused
    return "nothing was published" in text  # our script's own read-phase refusal


#: A write through a script: what a publish needs (scripting, writing, memory).
_PROBE_LUA: Final = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', 60000)
return 1
"""

_HISTORY_LUA: Final = """
-- KEYS[1]: the counter; KEYS[2]: the history stream; KEYS[3]: the epoch.
-- ARGV[1]: after_seq; ARGV[2]: the history size.
-- Returns {last_seq, first_seq or false (nil), entries with seq > after_seq, epoch or false}.
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local epoch = redis.call('GET', KEYS[3])
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #oldest == 0 then
  return {last, false, {}, epoch}
end
local first = tonumber(string.match(oldest[1][1], '^(%d+)-'))
-- MAXLEN ~ may keep more than the size: the history is the newest ARGV[2] seqs.
local window_first = last - tonumber(ARGV[2]) + 1
if window_first > first then
  first = window_first
end
local start = tonumber(ARGV[1]) + 1
if start < first then
  start = first
end
if start > last then
  return {last, first, {}, epoch}
end
return {last, first, redis.call('XRANGE', KEYS[2], string.format('%d', start),
  string.format('%d', last), 'COUNT', ARGV[2]), epoch}
"""


_PUBLISH: Final = Script(_PUBLISH_LUA)
_HISTORY: Final = Script(_HISTORY_LUA)
_PROBE: Final = Script(_PROBE_LUA)


def decode_batch(data: bytes) -> list[NumberedEvent]:
    """Decode one channel message (a MessagePack array of event arrays).

    Raises:
        BackplaneError: not such a message.
    """
    try:
        message = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise BackplaneError(f"expected a MessagePack backplane message: {exc}") from exc
    match message:
        case [str(epoch), list(items)]:
            pass
        case _:
            raise BackplaneError("expected a backplane message [epoch, events]")
    if not items:
        raise BackplaneError(f"expected a non-empty array of events, got {type(items).__name__}")
    events: list[NumberedEvent] = []
    for index, item in enumerate(items):
        match item:
            case [
                str(hub),
                str(site_id),
                str() | False as user,
                str(event_id),
                int(seq),
                str(text),
            ]:
                if isinstance(seq, bool):
                    raise BackplaneError(f"event {index}: expected an integer seq, got a boolean")
                events.append(
                    NumberedEvent(
                        hub=hub,
                        site_id=site_id,
                        user_id=None if user is False else user,
                        event_id=event_id,
                        seq=seq,
                        text=text,
                        epoch=epoch,
                    )
                )
            case _:
                raise BackplaneError(
                    f"event {index}: expected [hub, site, user|false, id, seq, text], "
                    f"got {type(item).__name__}"
                )
    return events


def _decode_entry(hub: str, site_id: str, entry: Reply) -> NumberedEvent:
    match entry:
        case [bytes(entry_id), list(fields)] if len(fields) % 2 == 0:
            pass
        case _:
            raise BackplaneError(f"{hub}/{site_id}: expected a stream entry [id, fields]")
    values: dict[bytes, bytes] = {}
    for name, value in zip(fields[::2], fields[1::2], strict=True):
        if isinstance(name, bytes) and isinstance(value, bytes):
            values[name] = value
    text, event_id, user = values.get(b"text"), values.get(b"id"), values.get(b"user")
    seq_part, _, suffix = entry_id.partition(b"-")
    # Entries this backplane writes are <seq>-1; anything else was put there by someone else.
    if text is None or event_id is None or not seq_part.isdigit() or suffix != b"1":
        raise BackplaneError(
            f"{hub}/{site_id}: expected an entry <seq>-1 with id and text, "
            f"got {entry_id[:40]!r} with fields {sorted(values)[:8]!r}"
        )
    try:
        return NumberedEvent(
            hub=hub,
            site_id=site_id,
            user_id=None if user is None else user.decode(),
            event_id=event_id.decode(),
            seq=int(seq_part),
            text=text.decode(),
        )
    except UnicodeDecodeError as exc:
        raise BackplaneError(f"{hub}/{site_id}: history entry is not UTF-8") from exc


def _length_prefixed(site_id: str) -> str:
    return f"{len(site_id)}:{site_id}"


class RedisBackplane(trio.abc.AsyncResource):
    """The ``Backplane`` shared by every node through one Redis (see the module docstring).

    Args:
        url: ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``.
        history_size: events kept per (hub, site).
        channel: the Pub/Sub channel all nodes share, on database 0; on
            database N, ``channel:dbN`` (see ``RedisAddress.channel``).
        key_prefix: the prefix of every key this backplane writes.
        op_timeout: how long one command may take, from waiting for a pooled
            connection to the reply, and how long a ``PING`` may go unanswered.
        ping_interval: how long the subscription may stay silent before ``run``
            probes it with ``PING``; also how often ``run`` probes writes while
            publishes keep failing.
        max_connections: command connections kept at most (``run`` has its own).
        dedupe_window: seconds an accepted event id keeps a retry from being
            published again (0 turns deduplication off).

    Close it with ``aclose`` (or ``async with``); ``run`` also closes the idle
    command connections when it ends.

    Raises:
        BackplaneError: ``url`` is not a redis:// URL.
        ValueError: a size or duration is not positive.
    """

    def __init__(
        self,
        url: str,
        *,
        history_size: int = 1000,
        channel: str = "hubserver:events",
        key_prefix: str = "hubserver",
        op_timeout: float = 2.0,
        ping_interval: float = 5.0,
        max_connections: int = 4,
        dedupe_window: float = 600.0,
    ) -> None:
        for name, value in (
            ("history_size", history_size),
            ("op_timeout", op_timeout),
            ("ping_interval", ping_interval),
            ("max_connections", max_connections),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not dedupe_window >= 0:
            raise ValueError(f"dedupe_window must not be negative, got {dedupe_window}")
        self._address = parse_redis_url(url)
        self._history_size = history_size
        self._channel = self._address.channel(channel)
        self._key_prefix = key_prefix
        self._epoch_key = f"{key_prefix}:epoch"
        self._probe_key = f"{key_prefix}:probe"
        self._op_timeout = op_timeout
        self._ping_interval = ping_interval
        # PX takes whole milliseconds; a positive window never rounds to "off".
        self._dedupe_window_ms = 0 if dedupe_window == 0 else max(1, round(dedupe_window * 1000))
        self._pool = ConnectionPool(self._address, max_connections)
        self._subscription = Subscription(
            self._address,
            self._channel,
            name="backplane events",
            op_timeout=op_timeout,
            ping_interval=ping_interval,
            pool=self._pool,
        )
        self._is_command_ok = True
        self._is_running = False
        # Publishes (and write probes) that failed in a row.
        self._write_failures = 0

    @property
    def address(self) -> RedisAddress:
        return self._address

    @property
    def channel(self) -> str:
        """The Pub/Sub channel of the events, with the database in it (database 0: none)."""
        return self._channel

    @property
    def is_available(self) -> bool:
        """False while Redis cannot be reached, refuses publishes, or ``run`` is not subscribed."""
        return (
            self._is_command_ok
            and not self._subscription.is_lost
            and self._write_failures < UNAVAILABLE_AFTER_FAILURES
        )

    async def publish(self, events: Sequence[PendingEvent]) -> list[NumberedEvent]:
        """Number, store and broadcast ``events`` in one script (see ``Backplane.publish``).

        Raises:
            BackplaneUnavailable: nothing was done: Redis could not be reached,
                or refused the script (OOM, READONLY, NOPERM, ...: the message
                says why).
            PublishOutcomeUnknown: the script was sent and no usable reply came
                within ``op_timeout`` (it may have run).
        """
        if not events:
            await trio.lowlevel.checkpoint()
            return []
        keys: list[Arg] = [self._epoch_key]
        args: list[Arg] = [
            self._channel,
            self._history_size,
            uuid.uuid4().hex,
            self._dedupe_window_ms,
        ]
        for event in events:
            keys.append(self._key("seq", event.hub, event.site_id))
            keys.append(self._key("hist", event.hub, event.site_id))
            keys.append(
                f"{self._key_prefix}:id:{event.hub}:{_length_prefixed(event.site_id)}:"
                f"{event.event_id}"
            )
            has_user = event.user_id is not None
            args += [
                event.hub,
                event.site_id,
                "1" if has_user else "0",
                event.user_id or "",
                event.event_id,
                event.prefix,
            ]
        try:
            reply = await self._call(
                "publish", lambda conn: _PUBLISH.evaluate(conn, keys, args), is_write=True
            )
        except BackplaneError:
            self._write_failures += 1
            raise
        self._write_failures = 0
        match reply:
            case [
                bytes(epoch_bytes),
                list(seq_replies),
                list(duplicate_replies),
                int(unstored),
                bytes(store_error),
            ] if len(seq_replies) == len(duplicate_replies) == len(events):
                epoch = epoch_bytes.decode(errors="replace")
            case _:
                # It ran (Redis answered), but what it answered cannot be trusted.
                raise PublishOutcomeUnknown(
                    f"Redis at {self._address}: unexpected reply to the publish script"
                )
        if unstored:
            log.error(
                "Redis at %s: %d published event(s) could not be stored in history "
                "(resumers will get a Gap): %s",
                self._address,
                unstored,
                store_error.decode(errors="replace")[:300],
            )
        numbered: list[NumberedEvent] = []
        for event, seq, duplicate in zip(events, seq_replies, duplicate_replies, strict=True):
            if not isinstance(seq, int):
                raise PublishOutcomeUnknown(
                    f"Redis at {self._address}: a non-integer seq in the publish reply"
                )
            numbered.append(number(event, seq, epoch, is_duplicate=duplicate == 1))
        return numbered

    async def history(self, hub: str, site_id: str, after_seq: int) -> History:
        """The newest ``history_size`` events after ``after_seq`` (see ``Backplane.history``).

        An entry that does not decode (not written by this backplane) is logged
        and left out: the events around it still come, and the hole it leaves
        is what tells the caller an event is missing.

        Raises:
            BackplaneUnavailable: Redis could not be reached in time.
            BackplaneError: Redis refused, or its reply is not a history.
        """
        keys: list[Arg] = [
            self._key("seq", hub, site_id),
            self._key("hist", hub, site_id),
            self._epoch_key,
        ]
        # Redis parses the bound as a 64-bit integer: keep any caller's number in range.
        args: list[Arg] = [min(max(after_seq, 0), 2**62), self._history_size]
        reply = await self._call("history", lambda conn: _HISTORY.evaluate(conn, keys, args))
        match reply:
            case [int(last_seq), int() | None as first_seq, list(entries), bytes() | None as raw]:
                epoch = "" if raw is None else raw.decode(errors="replace")
            case _:
                raise BackplaneError(f"{hub}/{site_id}: unexpected reply from the history script")
        events: list[NumberedEvent] = []
        for entry in entries:
            try:
                events.append(replace(_decode_entry(hub, site_id, entry), epoch=epoch))
            except BackplaneError as exc:
                log.error("skipped a malformed history entry: %s", exc)
        return History(events=events, first_seq=first_seq, last_seq=last_seq, epoch=epoch)

    async def ping(self) -> None:
        """Readiness check: one ``PING`` under ``op_timeout``.

        Raises:
            BackplaneUnavailable: no answer.
        """
        await self._call("PING", lambda conn: conn.execute("PING"))

    async def run(
        self,
        deliver: Callable[[Sequence[NumberedEvent]], None],
        on_reconnect: Callable[[], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Deliver every batch published by any node, until cancelled (see ``Backplane.run``).

        Retries the first subscription too (with the same backoff), so
        ``task_status.started()`` waits for Redis: cap ``nursery.start`` with
        ``fail_after`` to bound that. Exceptions of ``deliver`` and
        ``on_reconnect`` propagate. A message that does not decode is logged and
        skipped (the caller sees a seq gap and recovers it from ``history``).
        Beside it, while publishes keep failing, a write probe runs every
        ``ping_interval`` (see the module docstring).

        Raises:
            BackplaneError: ``run`` is already running on this backplane.
        """
        if self._is_running:
            raise BackplaneError("run() is already running on this RedisBackplane")
        self._is_running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._probe_while_failing)
                await nursery.start(
                    self._subscription.run,
                    partial(_deliver_data, deliver),
                    partial(self._resubscribed, on_reconnect),
                )
                self._is_command_ok = True  # subscribed: Redis is reachable
                task_status.started()
        finally:
            self._is_running = False
            await self._pool.close_idle()

    async def aclose(self) -> None:
        """Close the idle command connections (the backplane stays usable: it reconnects)."""
        await self._pool.close_idle()

    # -- commands ----------------------------------------------------------------------

    def _key(self, kind: str, hub: str, site_id: str) -> str:
        return f"{self._key_prefix}:{kind}:{hub}:{site_id}"

    async def _call(
        self,
        what: str,
        operation: Callable[[RedisConnection], Awaitable[Reply]],
        *,
        is_write: bool = False,
    ) -> Reply:
        """Run ``operation`` on a pooled connection and map every failure to ours.

        With ``is_write``, a failure after the command was sent whole raises
        ``PublishOutcomeUnknown`` (it may have run), and an error reply raises
        ``BackplaneUnavailable`` (the scripts we write do nothing when refused).
        """
        used: list[RedisConnection] = []

        async def on_connection(conn: RedisConnection) -> Reply:
            used.append(conn)
            return await operation(conn)

        def is_sent() -> bool:
            return is_write and bool(used) and used[-1].is_awaiting_reply

        try:
            with trio.fail_after(self._op_timeout):
                async with self._pool.connection() as conn:
                    reply = await on_connection(conn)
        except trio.TooSlowError as exc:
            await self._lost_commands()
            message = (
                f"no reply from Redis at {self._address} to {what} within {self._op_timeout} s"
            )
            if is_sent():
                raise PublishOutcomeUnknown(f"{message}; it may have been applied") from exc
            raise BackplaneUnavailable(message) from exc
        except RedisReplyError as exc:
            if exc.code == "LOADING":
                # Restarted and still loading its dataset: nothing ran, retry later.
                self._is_command_ok = False
                raise BackplaneUnavailable(
                    f"Redis at {self._address} cannot run {what} yet: {exc}"
                ) from exc
            self._is_command_ok = True  # Redis answered: it is reachable
            if is_write and _refused_before_any_write(exc):
                raise BackplaneUnavailable(
                    f"Redis at {self._address} refused {what}, nothing was done: {exc}"
                ) from exc
            if is_write:
                # An error inside the script after its first write (an ACL on
                # PUBLISH, say): what it wrote stays. Say so.
                raise PublishOutcomeUnknown(
                    f"Redis at {self._address} failed {what} part way, "
                    f"which may have been applied: {exc}"
                ) from exc
            raise
        except BackplaneError as exc:
            # The connection failed, or what came back is not RESP.
            if isinstance(exc, BackplaneUnavailable) or is_sent():
                await self._lost_commands()
            if is_sent():
                raise PublishOutcomeUnknown(
                    f"lost the reply of Redis at {self._address} to {what}, "
                    f"which may have been applied: {exc}"
                ) from exc
            raise
        self._is_command_ok = True
        return reply

    async def _lost_commands(self) -> None:
        self._is_command_ok = False
        # The other idle connections most likely died with this one.
        await self._pool.close_idle()

    async def _probe_while_failing(self) -> None:
        """While publishes keep failing, try a write now and then: recovery shows without them."""
        while True:
            await trio.sleep(self._ping_interval)
            if self._write_failures < UNAVAILABLE_AFTER_FAILURES and self._is_command_ok:
                continue
            try:
                await self._call(
                    "a write probe",
                    lambda conn: _PROBE.evaluate(conn, [self._probe_key], [uuid.uuid4().hex]),
                    is_write=True,
                )
            except BackplaneError as exc:
                log.warning("Redis at %s still refuses writes: %s", self._address, exc)
                continue
            log.info("Redis at %s accepts writes again", self._address)
            self._write_failures = 0

    def _resubscribed(self, on_reconnect: Callable[[], None]) -> None:
        self._is_command_ok = True  # subscribed: Redis is reachable
        on_reconnect()


def _deliver_data(deliver: Callable[[Sequence[NumberedEvent]], None], data: bytes) -> None:
    try:
        batch = decode_batch(data)
    except BackplaneError as exc:
        log.error("skipped a malformed backplane message of %d bytes: %s", len(data), exc)
        return
    deliver(batch)
