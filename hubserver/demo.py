"""``--demo``: plausible entries and incidents for one demo site, every second.

Shapes follow ``shared/reference/events.md``. Names are made up; nothing here
is personal data.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Final

import trio

from .backplane import BackplaneUnavailable
from .routing import Hub

__all__ = ["DEMO_SITE", "DEMO_SUBJECT", "make_entry", "make_incident", "publish_demo_events"]

log = logging.getLogger("hubserver.demo")

DEMO_SITE: Final = "demo-site"
DEMO_SUBJECT: Final = "demo-admin"
_LOCKS: Final = [("lock-1", "Main entrance"), ("lock-2", "Server room"), ("lock-3", "Garage")]
_USERS: Final = [("user-1", "Ana", "García"), ("user-2", "Ben", "Okafor"), ("user-3", "Chen", "Li")]
_INCIDENTS: Final = [
    ("door_left_open", "warning", {"open_seconds": 45}),
    ("low_battery", "info", {"battery_level": 0.12}),
    ("tamper", "critical", {}),
    ("lock_offline", "warning", {}),
]


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_entry(rng: random.Random, now: datetime) -> dict[str, object]:
    lock_id, lock_name = rng.choice(_LOCKS)
    user_id, first, last = rng.choice(_USERS)
    granted = rng.random() > 0.15
    return {
        "site_id": DEMO_SITE,
        "lock_id": lock_id,
        "lock_name": lock_name,
        "user_id": user_id,
        "user_first_name": first,
        "user_last_name": last,
        "user_alias": None,
        "event_type": "opening" if granted else "rejection",
        "access_by": rng.choice(["tag", "digital_key", "pin"]),
        "result": "granted" if granted else "denied",
        "reason": None if granted else rng.choice(["no_access_rights", "outside_schedule"]),
        "offline": False,
        "occurred_at": _stamp(now - timedelta(seconds=1)),
        "received_at": _stamp(now),
    }


def make_incident(rng: random.Random, now: datetime) -> dict[str, object]:
    lock_id, lock_name = rng.choice(_LOCKS)
    kind, severity, details = rng.choice(_INCIDENTS)
    return {
        "site_id": DEMO_SITE,
        "incident_type": kind,
        "severity": severity,
        "state": "raised",
        "lock_id": lock_id,
        "lock_name": lock_name,
        "iq_id": None,
        "user_id": None,
        "details": details,
        "occurred_at": _stamp(now - timedelta(seconds=2)),
        "received_at": _stamp(now),
    }


Publish = Callable[[Hub, list[dict[str, object]]], Awaitable[object]]


async def publish_demo_events(publish: Publish, interval: float) -> None:
    """Publish an entry every ``interval`` seconds and an incident every fifth time."""
    rng = random.Random()
    tick = 0
    while True:
        now = datetime.now(UTC)
        try:
            await publish(Hub.ENTRIES, [make_entry(rng, now)])
            if tick % 5 == 0:
                await publish(Hub.INCIDENTS, [make_incident(rng, now)])
        except BackplaneUnavailable as exc:
            log.warning("demo events paused: %s", exc)
        tick += 1
        await trio.sleep(interval)
