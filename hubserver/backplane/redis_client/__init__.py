"""The Redis client of the backplane and of the Redis permission store.

Split by the state each part owns:

- ``_resp``: the sans-IO RESP2 codec (``encode_command``, ``ReplyParser``),
  where a server is (``RedisAddress``, ``parse_redis_url``), and
  ``RedisConnection``, one socket driving the codec.
- `ConnectionPool`: the idle command connections of one user of Redis.
- `Script`: a Lua script by ``EVALSHA``, resent with ``EVAL`` after ``NOSCRIPT``.
- `Subscription`: one Pub/Sub channel on a connection of its own, resubscribed
  with backoff after an outage and probed with ``PING`` when silent.

Pub/Sub channels are server-wide while keys are per database: a channel is
named through ``RedisAddress.channel`` so that users of different databases
never hear each other. Failures are ``BackplaneError``s: ``BackplaneUnavailable``
when Redis cannot be reached, ``RedisReplyError`` when it answers with an error.
Nothing here times out by itself except the subscription's probes; callers put
their deadline around each command.
"""

from __future__ import annotations

from ._pool import ConnectionPool
from ._resp import (
    Arg,
    NeedData,
    RedisAddress,
    RedisConnection,
    RedisReplyError,
    Reply,
    ReplyParser,
    RespProtocolError,
    encode_command,
    parse_redis_url,
)
from ._script import Script
from ._subscription import Subscription

__all__ = [
    "Arg",
    "ConnectionPool",
    "NeedData",
    "RedisAddress",
    "RedisConnection",
    "RedisReplyError",
    "Reply",
    "ReplyParser",
    "RespProtocolError",
    "Script",
    "Subscription",
    "encode_command",
    "parse_redis_url",
]
