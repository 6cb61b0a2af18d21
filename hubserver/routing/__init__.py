"""Routing: hubs, site and site-user groups, the broker that numbers and fans out events."""

from __future__ import annotations

from ._broker import Broker, LocalBroker, StreamEvent
from ._events import PublishError, parse_publish_body
from ._groups import GroupKey, Hub, Router, Subscriber

__all__ = [
    "Broker",
    "GroupKey",
    "Hub",
    "LocalBroker",
    "PublishError",
    "Router",
    "StreamEvent",
    "Subscriber",
    "parse_publish_body",
]
