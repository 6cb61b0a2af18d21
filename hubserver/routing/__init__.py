"""Routing: hubs, site and site-user groups, and the broker that delivers in order."""

from __future__ import annotations

from ._broker import Broker, Replay, deliver_to
from ._events import (
    MAX_DEPTH,
    MAX_ID_CHARS,
    PublishError,
    check_events,
    is_within_depth,
    parse_publish_body,
)
from ._groups import GroupKey, Hub, Router, Subscriber
from ._stream import Delivery, StreamEvent, Wire, gap_message, to_pending, to_stream_event

__all__ = [
    "MAX_DEPTH",
    "MAX_ID_CHARS",
    "Broker",
    "Delivery",
    "GroupKey",
    "Hub",
    "PublishError",
    "Replay",
    "Router",
    "StreamEvent",
    "Subscriber",
    "Wire",
    "check_events",
    "deliver_to",
    "gap_message",
    "is_within_depth",
    "parse_publish_body",
    "to_pending",
    "to_stream_event",
]
