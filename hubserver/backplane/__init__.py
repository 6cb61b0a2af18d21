"""Backplanes: numbering, history and cross-process fan-out of events."""

from __future__ import annotations

from ._contract import (
    Backplane,
    BackplaneError,
    BackplaneUnavailable,
    History,
    NumberedEvent,
    PendingEvent,
    PublishOutcomeUnknown,
)
from ._memory import MemoryBackplane
from ._redis import RedisBackplane
from ._unix import BrokerMessages, BrokerServer, UnixBackplane
from .redis_client import RedisAddress, RedisConnection, RedisReplyError, parse_redis_url

__all__ = [
    "Backplane",
    "BrokerMessages",
    "BrokerServer",
    "BackplaneError",
    "BackplaneUnavailable",
    "History",
    "MemoryBackplane",
    "NumberedEvent",
    "PendingEvent",
    "PublishOutcomeUnknown",
    "RedisAddress",
    "RedisBackplane",
    "RedisConnection",
    "RedisReplyError",
    "UnixBackplane",
    "parse_redis_url",
]
