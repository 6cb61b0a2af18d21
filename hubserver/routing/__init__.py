"""Routing: hubs, site and site-user groups, and the broker that delivers in order."""

from __future__ import annotations

from ._broker import Broker, Replay, deliver_to
from ._events import PublishError, parse_publish_body
from ._groups import GroupKey, Hub, Router, Subscriber
from ._stream import Delivery, StreamEvent, gap_message, to_pending, to_stream_event

__all__ = [
    "Broker",
    "Delivery",
    "GroupKey",
    "Hub",
    "PublishError",
    "Replay",
    "Router",
    "StreamEvent",
    "Subscriber",
    "deliver_to",
    "gap_message",
    "parse_publish_body",
    "to_pending",
    "to_stream_event",
]
