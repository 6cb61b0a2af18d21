"""The typical event: one access-control entry as compact JSON text, seeded.

hubserver pushes each entry to subscribers as ``ReceiveMessage(text)``: one
string argument holding the entry as compact JSON, about 300 bytes. Every
profile measures that message. A run uses many distinct events from one seed,
so no cache of a single value can flatter a result, and the same seed gives
the same bytes on every machine.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Final

__all__ = ["TARGET", "access_entries", "access_entry"]

#: The client method every entry is pushed to.
TARGET: Final = "ReceiveMessage"

_EPOCH: Final = datetime(2025, 1, 1, tzinfo=UTC)
_YEAR_SECONDS: Final = 365 * 24 * 3600
_ASCII_FIRST: Final = ("Anna", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines")
_ASCII_LAST: Final = ("Andersen", "Brown", "Costa", "Dubois", "Evans", "Fischer", "Garcia")
# Every entry carries exactly one of these, so the JSON escape path always runs.
_NON_ASCII_FIRST: Final = ("José", "Zoë", "Łukasz", "Søren", "Małgorzata", "Chloé")
_NON_ASCII_LAST: Final = ("Müller", "Ångström", "Nuñez", "Çelik", "Dvořák", "Øvergård")
_LOCKS: Final = ("Main door", "North door", "Bike room", "Server room", "Garage", "Lab 2")
_ACCESS_BY: Final = ("card", "pin", "mobile_key", "remote", "fob")
_DENIAL_REASONS: Final = ("outside_schedule", "no_permission", "card_blocked", "lock_offline")


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def access_entry(rng: random.Random, seq: int) -> str:
    """One entry as compact JSON text (non-ASCII kept as is), drawn from ``rng``."""
    if rng.random() < 0.5:
        first, last = rng.choice(_NON_ASCII_FIRST), rng.choice(_ASCII_LAST)
    else:
        first, last = rng.choice(_ASCII_FIRST), rng.choice(_NON_ASCII_LAST)
    is_granted = rng.random() < 0.9
    is_offline = rng.random() < 0.05
    occurred = _EPOCH + timedelta(seconds=rng.randrange(_YEAR_SECONDS))
    # Offline locks upload their log later; online ones within a few seconds.
    delay = rng.randrange(60, 3_600) if is_offline else rng.randrange(0, 5)
    entry = {
        "id": rng.randrange(10**9, 10**10),
        "site_id": rng.randrange(1_000, 100_000),
        "seq": seq,
        "lock_id": rng.randrange(100_000, 1_000_000),
        "lock_name": rng.choice(_LOCKS),
        "user_id": rng.randrange(1_000_000, 10_000_000),
        "user_first_name": first,
        "user_last_name": last,
        "event_type": "entry",
        "access_by": rng.choice(_ACCESS_BY),
        "result": "granted" if is_granted else "denied",
        "reason": None if is_granted else rng.choice(_DENIAL_REASONS),
        "offline": is_offline,
        "occurred_at": _iso(occurred),
        "received_at": _iso(occurred + timedelta(seconds=delay)),
    }
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


def access_entries(count: int, seed: int) -> list[str]:
    """``count`` distinct entries from ``seed``; the same seed gives the same texts."""
    rng = random.Random(seed)
    first_seq = rng.randrange(1, 10_000_000)
    return [access_entry(rng, first_seq + index) for index in range(count)]
