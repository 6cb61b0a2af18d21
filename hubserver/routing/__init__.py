"""Routing: hubs, site and site-user groups, the broker that numbers and fans out events."""

from __future__ import annotations

from ._broker import Broker, LocalBroker, StreamEvent, deliver_to
from ._events import PublishError, parse_publish_body
from ._groups import Delivery, GroupKey, Hub, Router, Subscriber

__all__ = [
    "Broker",
    "Delivery",
    "GroupKey",
    "Hub",
    "LocalBroker",
    "PublishError",
    "Router",
    "StreamEvent",
    "Subscriber",
    "deliver_to",
    "parse_publish_body",
]
