"""Prometheus metrics (``GET /metrics``), with prometheus-client's text exposition.

Theory of operation. Nothing on the per-delivery path touches a metric: the
server already keeps plain integer counters where events and connections
pass (``SessionStats``, the broker's deliveries, rounds and gaps), and
``sync`` turns their growth into Prometheus counters and recomputes the
gauges (open connections by hub, protocol and transport; bytes queued for
clients) by walking the open connections, at each scrape and, with
``--workers``, every few seconds. What is counted live is once per request
or per dispatch round: refusals, publish latency, delivery lag per round.

With ``--workers N`` every worker writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode, set up by
the parent before it starts them), and whichever worker a scrape reaches
answers for the whole node: counters and live gauges summed across workers.
Process metrics then come as sums too (``hubserver_process_*``), since the
standard ``process_*`` would describe only the worker that answered.
"""

from __future__ import annotations

import os
import resource
from typing import TYPE_CHECKING, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)

if TYPE_CHECKING:
    from .app import App

__all__ = ["MULTIPROCESS_ENV", "Metrics"]

#: prometheus-client's multiprocess mode: set (by the parent) before a worker imports it.
MULTIPROCESS_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE: Final = b"text/plain; version=0.0.4; charset=utf-8"
#: Seconds between syncs of a worker's values to its files (a scrape syncs its own):
#: another worker's counters in a scrape are at most this old. Each sync walks the
#: worker's connections once (a few ms for 10,000).
SYNC_INTERVAL: Final = 1.0
_LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_LAG_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
#: Close reasons the server decides; "client" is every other end.
_CLOSE_REASONS: Final = (
    "token_expired", "revoked", "slow_consumer", "client_timeout", "drain", "error",
)  # fmt: skip


class Metrics:
    """One server's metrics (its own registry: tests run several servers in a process)."""

    def __init__(self) -> None:
        self.is_multiprocess = bool(os.environ.get(MULTIPROCESS_ENV))
        registry = self._registry = CollectorRegistry(auto_describe=True)
        self.connections_open = Gauge(
            "hubserver_connections_open",
            "Open hub connections (after their hub handshake).",
            ["hub", "protocol", "transport"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.connections_opened = Counter(
            "hubserver_connections_opened",
            "Hub connections accepted (their upgrade, event stream or first poll).",
            ["hub"],
            registry=registry,
        )
        self.connections_refused = Counter(
            "hubserver_connections_refused",
            "Hub connections refused, by reason.",
            ["hub", "reason"],
            registry=registry,
        )
        self.connections_closed = Counter(
            "hubserver_connections_closed",
            "Hub connections ended, by reason.",
            ["reason"],
            registry=registry,
        )
        self.events_published = Counter(
            "hubserver_events_published",
            "Events accepted, by hub and API (http: POST /v1/events, hub: the publisher hub).",
            ["hub", "api"],
            registry=registry,
        )
        self.events_rejected = Counter(
            "hubserver_events_rejected",
            "Events refused or failed (nothing accepted), by hub and API; a request "
            "refused before its events could be counted (an invalid body) counts one.",
            ["hub", "api"],
            registry=registry,
        )
        self.deliveries = Counter(
            "hubserver_deliveries", "Events handed to subscribers' connections.", registry=registry
        )
        self.events_replayed = Counter(
            "hubserver_events_replayed",
            "Events sent from history (Resume, since_seq).",
            registry=registry,
        )
        self.gaps = Counter(
            "hubserver_gaps_sent", "Gap invocations sent to subscribers.", registry=registry
        )
        self.publish_latency = Histogram(
            "hubserver_publish_latency_seconds",
            "A publish from its request to its answer.",
            ["api"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        # Bound once: ``labels()`` per publish cost as much as the observation
        # itself (2.5 us on the bench machine, of ~7 us metrics add per publish).
        self.observe_http_publish = self.publish_latency.labels("http").observe
        self.observe_hub_publish = self.publish_latency.labels("hub").observe
        self.delivery_lag = Histogram(
            "hubserver_delivery_lag_seconds",
            "Per dispatch round (sampled: at most one per 10 ms, every longer one): "
            "its oldest event from reaching this node to its sockets.",
            buckets=_LAG_BUCKETS,
            registry=registry,
        )
        self.queued_bytes = Gauge(
            "hubserver_outbound_queued_bytes",
            "Bytes waiting to be written to (or polled by) clients.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.backplane_up = Gauge(
            "hubserver_backplane_up",
            "1 when the event backplane takes publishes.",
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.backplane_reconnects = Counter(
            "hubserver_backplane_reconnects",
            "Backplane connections re-established.",
            registry=registry,
        )
        self.backplane_errors = Counter(
            "hubserver_backplane_errors", "Backplane operations that failed.", registry=registry
        )
        self.permission_store_up = Gauge(
            "hubserver_permission_store_up",
            "1 when the permission store answers.",
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.permission_store_errors = Counter(
            "hubserver_permission_store_errors",
            "Times the permission store was found failing (checked at each sync).",
            registry=registry,
        )
        self.loop_lag = Histogram(
            "hubserver_event_loop_lag_seconds",
            "How late a periodic timer wakes: the event loop's backlog.",
            buckets=_LAG_BUCKETS,
            registry=registry,
        )
        if self.is_multiprocess:
            self.process_rss = Gauge(
                "hubserver_process_resident_memory_bytes",
                "Resident memory of the node's processes.",
                multiprocess_mode="livesum",
                registry=registry,
            )
            self.process_fds = Gauge(
                "hubserver_process_open_fds",
                "Open file descriptors of the node's processes.",
                multiprocess_mode="livesum",
                registry=registry,
            )
            self.process_cpu = Gauge(
                "hubserver_process_cpu_seconds",
                "CPU time of the node's live processes.",
                multiprocess_mode="livesum",
                registry=registry,
            )
        else:
            ProcessCollector(registry=registry)
        # What each sync has already counted of the server's own counters.
        self._seen: dict[object, int] = {}
        self._store_was_up = True
        # The label sets of the open-connections gauge last set: gone ones go to 0.
        self._open_labels: set[tuple[str, str, str]] = set()

    # -- live counting (once per request or round) ------------------------------------

    def refused(self, hub: str, status: int) -> None:
        self.connections_refused.labels(hub, _reason(status)).inc()

    # -- sync --------------------------------------------------------------------------

    def _grow(self, key: object, value: int) -> int:
        """How much ``value`` grew since the last sync under ``key`` (never negative)."""
        delta = value - self._seen.get(key, 0)
        if delta > 0:
            self._seen[key] = value
            return delta
        return 0

    def _count(self, counter: Counter, key: object, value: int) -> None:
        if (delta := self._grow(key, value)) > 0:
            counter.inc(delta)

    def sync(self, app: App) -> None:
        """Bring the metrics up to the server's counters and state."""
        stats = app.stats
        broker = app.broker
        self._count(self.deliveries, "deliveries", broker.deliveries)
        self._count(self.gaps, "gaps", broker.gaps_sent + stats.gaps)
        self._count(self.events_replayed, "replayed", stats.replayed)
        self._count(self.backplane_reconnects, "reconnects", broker.reconnects)
        self._count(self.backplane_errors, "backplane_errors", broker.backplane_errors)
        for (hub, api), value in list(stats.published.items()):
            self._count(self.events_published.labels(hub, api), ("published", hub, api), value)
        for (hub, api), value in list(stats.rejected.items()):
            self._count(self.events_rejected.labels(hub, api), ("rejected", hub, api), value)
        for hub, value in list(stats.opened_by_hub.items()):
            self._count(self.connections_opened.labels(hub), ("opened", hub), value)
        for reason, value in (
            ("handshake_failed", stats.handshake_failed),
            ("timed_out", stats.handshake_timed_out),
        ):
            self._count(self.connections_refused.labels("any", reason), ("refused", reason), value)
        decided = {
            "token_expired": stats.expired_closed,
            "revoked": stats.revoked_closed,
            "slow_consumer": stats.slow_closed,
            "client_timeout": stats.client_timed_out,
            "drain": stats.drain_closed,
            "error": stats.crashed,
        }
        for reason in _CLOSE_REASONS:
            self._count(self.connections_closed.labels(reason), ("closed", reason), decided[reason])
        ended = stats.opened - stats.open
        self._count(
            self.connections_closed.labels("client"),
            ("closed", "client"),
            ended - sum(decided.values()),
        )
        self._gauges(app)

    def _gauges(self, app: App) -> None:
        by_labels: dict[tuple[str, str, str], int] = {}
        queued = 0
        for session in list(app.stats.by_id.values()):
            labels = session.metric_labels
            if labels is not None:
                by_labels[labels] = by_labels.get(labels, 0) + 1
            queued += session.queued_bytes
        for labels in self._open_labels:
            if labels not in by_labels:
                self.connections_open.labels(*labels).set(0)
        for labels, count in by_labels.items():
            self.connections_open.labels(*labels).set(count)
        self._open_labels = set(by_labels)
        self.queued_bytes.set(queued)
        self.backplane_up.set(1 if app.broker.backplane.is_available else 0)
        store_up = app.store.is_available
        if self._store_was_up and not store_up:
            self.permission_store_errors.inc()
        self._store_was_up = store_up
        self.permission_store_up.set(1 if store_up else 0)
        if self.is_multiprocess:
            self._process()

    def _process(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.process_cpu.set(usage.ru_utime + usage.ru_stime)
        try:
            with open("/proc/self/statm", "rb") as statm:
                pages = int(statm.read().split()[1])
            self.process_rss.set(pages * os.sysconf("SC_PAGE_SIZE"))
            self.process_fds.set(len(os.listdir("/proc/self/fd")))
        except OSError:
            pass  # not Linux: RSS and fds are left out

    # -- exposition --------------------------------------------------------------------

    def exposition(self, app: App) -> bytes:
        """The text exposition of this node (every worker's, with ``--workers``)."""
        self.sync(app)
        if not self.is_multiprocess:
            return generate_latest(self._registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


def _reason(status: int) -> str:
    if status == 401:
        return "unauthorized"
    if status == 403:
        return "forbidden"
    if status == 429:
        return "too_many_connections"
    if status == 503:
        return "unavailable"
    if status == 408:
        return "timed_out"
    return "bad_request"
