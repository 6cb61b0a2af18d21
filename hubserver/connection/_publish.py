"""The publisher hub's one method, ``Publish(hub, events)``: calls run one at a time, in order.

A publisher connection takes the calls one read brought (``take``
validates each at once, so a bad call is answered without touching the
backplane), then publishes them in order (``run``) before it reads again.
That is the backpressure: while the broker's dispatch window is full,
``run`` waits, the connection does not read, and what the publisher sends
meanwhile stays in its socket. What waits here is one read's worth.

Every wait of a call has the backplane's deadline: each backplane bounds
its own operations (Redis and the workers' broker: ``op_timeout``, after
which the outcome is unknown; the in-process one never waits), and the
broker's window waits only for its dispatcher's next round, which runs
without waiting. A cancel scope per call would add nothing but its cost
(measured: about a quarter of a small call's server CPU, through Trio's
deadline bookkeeping).

A call is published all or nothing, with the HTTP API's rules and answers:
its Completion carries ``{"accepted", "ids", "seqs"}``, and an error says
whether anything may have been accepted (a retry with the same ids is
safe: publishing is idempotent on id). A call without an invocation id is
fire-and-forget: its errors are counted and logged, never answered
(SignalR sends nothing back for those).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

from hubcore import Completion, Invocation
from hubserver.backplane import BackplaneError, BackplaneUnavailable
from hubserver.routing import MAX_DEPTH, Hub, PublishError, check_events, is_within_depth

from ._context import PublishFn, SessionStats

__all__ = ["PUBLISH_TARGET", "PublishCalls"]

log = logging.getLogger("hubserver.publisher")

#: The method's name, lower-cased: hub methods match case-insensitively (ASP.NET Core).
PUBLISH_TARGET: Final = "publish"
_HUBS: Final = {hub.value: hub for hub in Hub}
_THREW: Final = "An unexpected error occurred invoking 'Publish' on the server. HubException: "
_BAD_ARGUMENTS: Final = "Failed to invoke 'Publish' due to an error on the server. HubException: "
_UNAVAILABLE: Final = "the event backplane is unavailable; nothing was accepted, retry later"
_CLOSING: Final = "the connection is closing; nothing was accepted, retry with the same ids"
_UNKNOWN: Final = (
    "the event backplane failed or did not answer in time; the events may or may not "
    "have been accepted: retry later with the same ids"
)


@dataclass(slots=True)
class _Call:
    invocation_id: str | None
    hub: Hub
    events: list[dict[str, object]]


class PublishCalls:
    """The Publish calls of one publisher connection.

    Args:
        publish: the broker's publish (all or nothing; backpressure inside).
        stats: the server's counters (``publish_failed`` counts every call
            refused or failed, answered or not).
        session_id: for the log.
    """

    __slots__ = (
        "_is_stopping", "_latency", "_publish", "_queue", "_session_id", "_silent", "_stats",
        "is_running",
    )  # fmt: skip

    def __init__(
        self,
        publish: PublishFn,
        stats: SessionStats,
        session_id: int,
        latency: Callable[[float], None] | None = None,
    ) -> None:
        self._publish = publish
        self._latency = latency
        self._stats = stats
        self._session_id = session_id
        self._queue: list[_Call] = []
        self.is_running = False
        self._silent = 0  # fire-and-forget calls that failed
        # The connection is closing: calls not yet started are refused, not published.
        self._is_stopping = False

    @property
    def has_work(self) -> bool:
        return bool(self._queue)

    def take(self, call: Invocation) -> Completion | None:
        """Queue a valid call; the error Completion of an invalid one (None: nothing to send)."""
        arguments = call.arguments
        if len(arguments) != 2:
            return self._refuse(
                call.invocation_id,
                _BAD_ARGUMENTS,
                f"Publish takes 2 arguments (hub, events), got {len(arguments)}.",
            )
        name, value = arguments
        hub = _HUBS.get(name) if type(name) is str else None
        if hub is None:
            names = " or ".join(f"'{h}'" for h in _HUBS)
            return self._refuse(call.invocation_id, _THREW, f"hub must be {names}.")
        count = len(value) if type(value) is list else 1
        try:
            # MessagePack has no nesting bound of its own, and JSON's is far
            # deeper than the encoder should meet later.
            if (type(value) is dict or type(value) is list) and not is_within_depth(value):
                raise PublishError(f"events nest deeper than {MAX_DEPTH} levels")
            events = check_events(value, what="events")
        except PublishError as exc:
            return self._refuse(call.invocation_id, _THREW, str(exc), hub.value, count)
        self._queue.append(_Call(call.invocation_id, hub, events))
        return None

    def stop(self) -> None:
        """Start no more calls: those not yet under way are refused (nothing accepted).

        Each call may wait the backplane's deadline; a drain or an ending
        connection waits for the call under way only, not for a read's worth.
        """
        self._is_stopping = True

    async def run(self) -> list[Completion]:
        """Publish what is queued, in order; the answers to send (none for fire-and-forget)."""
        queue, self._queue = self._queue, []
        replies: list[Completion] = []
        self.is_running = True
        try:
            for call in queue:
                if self._is_stopping:
                    reply = self._refuse(
                        call.invocation_id, _THREW, _CLOSING, call.hub.value, len(call.events)
                    )
                else:
                    reply = await self._run_one(call)
                if reply is not None:
                    replies.append(reply)
        finally:
            self.is_running = False
        return replies

    async def _run_one(self, call: _Call) -> Completion | None:
        hub, count = call.hub.value, len(call.events)
        # --metrics off: no latency to observe, so not even the clock is read.
        started = 0.0 if self._latency is None else trio.current_time()
        try:
            published = await self._publish(call.hub, call.events)
        except PublishError as exc:  # an event cannot be encoded: nothing was published
            return self._refuse(call.invocation_id, _THREW, str(exc), hub, count)
        except BackplaneUnavailable as exc:
            log.warning(
                "session %d: publish refused, backplane unavailable: %s",
                self._session_id,
                exc,
                extra={
                    "event": "publish_refused",
                    "session_id": self._session_id,
                    "reason": "backplane_unavailable",
                },
            )
            return self._refuse(call.invocation_id, _THREW, _UNAVAILABLE, hub, count)
        except BackplaneError as exc:
            log.warning(
                "session %d: publish failed, outcome unknown: %s",
                self._session_id,
                exc,
                extra={
                    "event": "publish_failed",
                    "session_id": self._session_id,
                    "reason": "backplane_error",
                },
            )
            return self._refuse(call.invocation_id, _THREW, _UNKNOWN, hub, count)
        finally:
            if self._latency is not None:
                self._latency(trio.current_time() - started)
        self._stats.count(self._stats.published, hub, "hub", len(published))
        if call.invocation_id is None:
            return None
        return Completion.with_result(
            call.invocation_id,
            {
                "accepted": len(published),
                "ids": [event.event_id for event in published],
                "seqs": [event.seq for event in published],
            },
        )

    def _refuse(
        self,
        invocation_id: str | None,
        prefix: str,
        why: str,
        hub: str = "unknown",
        events: int = 1,
    ) -> Completion | None:
        self._stats.publish_failed += 1
        self._stats.count(self._stats.rejected, hub, "hub", events)
        if invocation_id is not None:
            return Completion.with_error(invocation_id, prefix + why)
        # Nobody hears of a fire-and-forget call's failure but the log: the first
        # is logged, then every 1,000th, so a flood of bad calls cannot flood it.
        self._silent += 1
        if self._silent == 1 or self._silent % 1000 == 0:
            log.warning(
                "session %d: a fire-and-forget Publish failed (%d so far on this connection): %s",
                self._session_id,
                self._silent,
                why,
                extra={
                    "event": "publish_refused",
                    "session_id": self._session_id,
                    "reason": "fire_and_forget_failed",
                },
            )
        return None
