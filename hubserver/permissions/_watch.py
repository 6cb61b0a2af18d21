"""`watch_permissions`: poll the store's version, re-check open connections, survive outages.

Theory of operation. The store is polled every ``poll_interval``; when its
``version`` changed, ``recheck`` runs (the server closes the connections whose
subject lost the right to its stream). A store that cannot answer
(`PermissionStoreUnavailable`: a locked or corrupt database, a deadline
missed) must not take the server down, and must not close anyone either: the
open connections keep their last known roles. The watcher then logs once,
retries with doubling intervals up to ``max_retry_interval``, and once the
store answers again runs ``recheck`` whatever the version says, so a revoke
made during the outage still takes effect. A ``recheck`` cut short by a
failure is redone on recovery in the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from ._store import PermissionStore, PermissionStoreUnavailable

__all__ = ["MAX_RETRY_INTERVAL", "watch_permissions"]

log = logging.getLogger("hubserver")

#: The longest wait between two attempts while the store is failing, in seconds.
MAX_RETRY_INTERVAL: Final = 30.0


async def watch_permissions(
    store: PermissionStore,
    recheck: Callable[[], Awaitable[None]],
    *,
    poll_interval: float,
    max_retry_interval: float = MAX_RETRY_INTERVAL,
) -> None:
    """Run ``recheck`` whenever the grants change, until cancelled; never raises for the store.

    Args:
        store: the permission store to poll.
        recheck: re-checks every open connection against the current grants; it
            may raise `PermissionStoreUnavailable`, and is then run again once
            the store is back.
        poll_interval: seconds between polls; 0 or less turns the watcher off.
        max_retry_interval: the cap of the doubling retry interval while the
            store is failing.
    """
    if poll_interval <= 0:
        return
    known: int | None = None
    is_recheck_due = False
    failing_since: float | None = None
    retry_interval = poll_interval
    while True:
        try:
            current = await store.version()
            if is_recheck_due or (known is not None and current != known):
                is_recheck_due = True  # until a recheck completes
                await recheck()
            known, is_recheck_due = current, False
        except PermissionStoreUnavailable as exc:
            # What changed meanwhile is unknown: re-check everyone on recovery.
            is_recheck_due = True
            if failing_since is None:
                failing_since = trio.current_time()
                retry_interval = poll_interval
                log.warning(
                    "permission store unavailable, open connections keep their roles, "
                    "new ones get 503 (retrying with backoff): %s",
                    exc,
                    extra={"event": "permission_store_unavailable"},
                )
            else:
                retry_interval = min(retry_interval * 2, max(max_retry_interval, poll_interval))
                log.debug("permission store still unavailable: %s", exc)
            await trio.sleep(retry_interval)
            continue
        if failing_since is not None:
            log.info(
                "permission store available again after %.1f s; open connections re-checked",
                trio.current_time() - failing_since,
                extra={"event": "permission_store_available"},
            )
            failing_since = None
        await trio.sleep(poll_interval)
