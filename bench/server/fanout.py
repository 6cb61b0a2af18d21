"""The ``fanout`` profile: events published over HTTP, delivered to C WebSocket subscribers.

For each row (connections, sites, mode) every server runs the same workload
with the same load client, in turn, each from a fresh start:

1. start the server; read its RSS;
2. open C subscribers (round-robin over S sites, spread over the client
   processes, paced by ``--connect-rate``), each through the upgrade and the
   SignalR handshake (hubserver: with a JWT); read its RSS again;
3. warm up: a few events per site, all of them delivered before going on;
4. measure: publish ``events_per_site`` events per site, spread over the
   sites round-robin or in a seeded random order (``--spread``), in the
   mode's way: ``rate``: one event per request at ``--rate`` events/s;
   ``burst``: one event per request, back to back, ``--publish-connections``
   W requests in flight (one per keep-alive connection; W = 1 is one publish
   at a time); ``batch``: ``--batch`` events per request, back to back;
5. wait until every subscriber has every event of its site, or deliveries
   stop for ``--quiet-timeout`` s, or ``--row-timeout`` passes;
6. count: every delivered record is matched by its site and its site
   sequence ``n``, so lost, duplicated and misrouted (another site's)
   events are exact per site; latency (now - ``t``) is sampled.

A row is sized by ``--connections`` (split evenly over the sites) or by
``--subscribers-per-site K`` (N sites get N x K connections): the service's
real shape is thousands of sites with one to a few subscribers each
(issue #10), ``--sites 500 --subscribers-per-site 2``.

deliveries/s is the number of measured deliveries over the time from the
first measured publish to the last delivery, events/s the events published
over the same time. CPU is read from ``/proc`` over the measured phase: the
server's process tree (also per event and per delivery, in microseconds),
each load-client process, and the publisher (this process).

``hubserver-pubhub`` is one hubserver process whose events the bench
publishes over the publisher hub (``/v1/hub/publish``: one ``Publish``
invocation per request, W connections with one invocation in flight each)
instead of HTTP POSTs; everything else is the same.

Scale-out layouts of hubserver (issue #5) run beside the single process in
the same run: ``hubserver-w2`` (``--workers 2``: one port, the server CPU is
the parent and both workers) and ``hubserver-redis2`` (two nodes sharing a
Redis backplane: the subscribers split evenly over the nodes, the publisher
posts to node 1 only, so every event crosses Redis to reach node 2; the
server CPU is both nodes, the redis-server's is reported apart, and
deliveries/s per node is deliveries/s over the node count). Their checks:
server CPU per delivery with 2 workers against one process's, deliveries/s
per node with Redis against the single node's, and exact counts.

``hubserver-nometrics`` is ``hubserver`` with ``--metrics off``: in a row
with both, deliveries/s of ``hubserver`` over ``hubserver-nometrics`` is the
cost of the metrics (issue #12: at most 3% in burst rows, ``METRICS_BAR``),
and their server CPU per delivery is shown beside it. On a shared machine a
few percent is within one run's noise: compare several runs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from bench.profile import BenchError, Profile
from bench.report import JsonValue, Outcome, Progress, Table, percentile
from bench.server.harness import (
    Stage,
    open_stage,
    parse_list,
    parse_rate,
    start_py_spy,
    stop_py_spy,
)
from bench.server.hubpublisher import HUB_PUBLISH_PATH, HubPublisher
from bench.server.procs import machine_busy_seconds, self_cpu_seconds
from bench.server.publisher import SPREADS, EventFactory, Publisher, plan_requests
from bench.server.servers import (
    FANOUT_DEFAULT_SERVERS,
    HUB_PUBLISH,
    PUBLISH_PATH,
    SERVERS,
    add_server_arguments,
    describe_hubserver,
    parse_servers,
    peer_versions,
)
from bench.server.wire import site_name

__all__ = [
    "BAR",
    "MODES",
    "PROFILE",
    "SCALE_OUT_BAR",
    "SITES_BAR",
    "METRICS_BAR",
    "FanoutRun",
    "RowResult",
    "judge",
]

MODES: Final = ("rate", "burst", "batch")
BAR: Final = (
    "at 1000 and 5000 connections (more than 4 subscribers per site), one event per "
    "publish, burst: hubserver >= 0.9x ceiling "
    "deliveries/s, >= 4x aiosignalr, >= 10x socketio, p99 latency <= 2x ceiling; "
    "batch 100 at 1000 connections >= 1,000,000 deliveries/s; 0 lost, 0 duplicated"
)
BAR_CONNECTIONS: Final = (1000, 5000)
MIN_VS_CEILING: Final = 0.9
MIN_VS_AIOSIGNALR: Final = 4.0
MIN_VS_SOCKETIO: Final = 10.0
MAX_P99_VS_CEILING: Final = 2.0
MIN_BATCH_DELIVERIES_PER_SECOND: Final = 1_000_000.0
SCALE_OUT_BAR: Final = (
    "scale-out (issue #5): server CPU per delivery with 2 workers <= 1.25x one worker's; "
    "two nodes with Redis keep >= 0.7x the single node's deliveries/s per node; "
    "0 lost, 0 duplicated"
)
MAX_CPU_PER_DELIVERY_WORKERS: Final = 1.25
MIN_PER_NODE_REDIS: Final = 0.7
#: The many-sites shape (issue #10): rows with at most this many subscribers per
#: site are judged by SITES_BAR; rows with more by BAR.
MAX_SITES_SHAPE_SUBSCRIBERS: Final = 4
SITES_BAR: Final = (
    "sites (<= 4 subscribers per site), burst, one event per publish (issue #10): "
    "hubserver >= 1.0x aiosignalr deliveries/s; over the publisher hub (hubserver-pubhub) "
    ">= 0.5x ceiling and >= 2x aiosignalr; 0 lost, duplicated or misrouted"
)
MIN_SITES_VS_AIOSIGNALR: Final = 1.0
MIN_SITES_PUBHUB_VS_CEILING: Final = 0.5
MIN_SITES_PUBHUB_VS_AIOSIGNALR: Final = 2.0
METRICS_BAR: Final = (
    "metrics (issue #12): burst rows lose <= 3% deliveries/s with metrics on "
    "(hubserver / hubserver-nometrics >= 0.97x); 0 lost, 0 duplicated"
)
MIN_METRICS_ON_VS_OFF: Final = 0.97
#: How many sites with a problem a row lists in its JSON (the totals are exact anyway).
MAX_PROBLEM_SITES: Final = 20
_SPREAD_TEXT: Final = {
    "round-robin": "round-robin over the sites (site 0, 1, ..., N-1, then again)",
    "random": "seeded random order over the sites (seed {seed}; each site's events in order)",
}

DEFAULT_DELIVERIES: Final = {"burst": 400_000, "batch": 2_000_000}
WARMUP_EVENTS_PER_SITE: Final = 3
QUANTILES: Final = (0.5, 0.9, 0.99)


@dataclass(frozen=True, slots=True, kw_only=True)
class FanoutRun:
    """One configured ``fanout`` run (see the module docstring)."""

    servers: tuple[str, ...] = FANOUT_DEFAULT_SERVERS
    connections: tuple[int, ...] = (1000,)
    sites: tuple[int, ...] = (1, 50)
    #: when set, a row of N sites has N x this many connections (``connections`` unused)
    subscribers_per_site: int | None = None
    spread: str = "round-robin"
    modes: tuple[str, ...] = ("burst",)
    batch: int = 100
    rate: float = 200.0
    duration: float = 5.0
    deliveries: int | None = None
    events_per_site: int | None = None
    warmup_events: int = WARMUP_EVENTS_PER_SITE
    client_procs: int = 2
    publish_connections: int = 4
    connect_rate: float = 2000.0
    connect_concurrency: int = 200
    sample_every: int = 10
    quiet_timeout: float = 10.0
    row_timeout: float = 180.0
    seed: int = 1
    plot: Path | None = None
    py_spy: Path | None = None
    py_spy_servers: tuple[str, ...] = ("hubserver",)

    hubserver_src: Path | None = None

    def __post_init__(self) -> None:
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        for name in self.servers:
            if name not in SERVERS:
                raise ValueError(f"unknown server {name!r}")
        if self.batch < 1 or self.client_procs < 1 or self.publish_connections < 1:
            raise ValueError("--batch, --client-procs and --publish-connections must be >= 1")
        if self.subscribers_per_site is not None and self.subscribers_per_site < 1:
            raise ValueError("--subscribers-per-site must be >= 1")
        if self.spread not in SPREADS:
            raise ValueError(f"unknown spread {self.spread!r}; choose from {', '.join(SPREADS)}")

    def shapes(self) -> list[tuple[int, int]]:
        """The (connections, sites) of every row, in order."""
        if self.subscribers_per_site is not None:
            return [(sites * self.subscribers_per_site, sites) for sites in self.sites]
        return [(connections, sites) for connections in self.connections for sites in self.sites]

    @property
    def parameters(self) -> Mapping[str, JsonValue]:
        return {
            "servers": list(self.servers),
            "hubserver": describe_hubserver(self.hubserver_src),
            "versions": dict(peer_versions()),
            "connections": list(self.connections)
            if self.subscribers_per_site is None
            else [connections for connections, _sites in self.shapes()],
            "sites": list(self.sites),
            "subscribers per site": self.subscribers_per_site
            if self.subscribers_per_site is not None
            else "connections / sites (round-robin)",
            "spread": _SPREAD_TEXT[self.spread].format(seed=self.seed),
            "modes": list(self.modes),
            "batch (batch mode)": self.batch,
            "rate (rate mode)": f"{self.rate:g} events/s for {self.duration:g} s",
            "events per site": self.events_per_site
            if self.events_per_site is not None
            else "from deliveries per row: "
            + ", ".join(
                f"{mode} {self.deliveries or DEFAULT_DELIVERIES.get(mode, 0):,}"
                for mode in self.modes
                if mode != "rate"
            ),
            "warm-up events per site": self.warmup_events,
            "client processes": self.client_procs,
            "publish connections": f"{self.publish_connections} (requests in flight: one per "
            "connection; hubserver-pubhub: one Publish invocation per hub connection)",
            "connect rate": f"{self.connect_rate:g}/s, {self.connect_concurrency} in flight",
            "latency sample": f"1 event in {self.sample_every}",
            "timeouts": f"quiet {self.quiet_timeout:g} s, row {self.row_timeout:g} s",
            "seed": self.seed,
        }

    def events_per_site_for(self, mode: str, connections: int, sites: int) -> int:
        if self.events_per_site is not None:
            return self.events_per_site
        if mode == "rate":
            return max(1, math.ceil(self.rate * self.duration / sites))
        target = self.deliveries or DEFAULT_DELIVERIES[mode]
        per_site = max(1, math.ceil(target / connections))
        if mode == "batch" and sites == 1:
            per_site = max(per_site, self.batch)
        return per_site

    def execute(self, progress: Progress) -> Outcome:
        rows: list[RowResult] = []
        for connections, sites in self.shapes():
            if sites > connections:
                raise BenchError(f"{sites} sites need at least as many connections")
            for mode in self.modes:
                for name in self.servers:
                    rows.append(self._row(name, connections, sites, mode, progress))
        progress.clear()
        outcome = _outcome(self, rows)
        if self.plot is not None:
            from bench.server.plot import plot_fanout

            plot_fanout(self.plot, rows)
        return outcome

    # -- one row -------------------------------------------------------------------

    def _row(
        self, name: str, connections: int, sites: int, mode: str, progress: Progress
    ) -> RowResult:
        kind = SERVERS[name]
        per_site = self.events_per_site_for(mode, connections, sites)
        warmup = self.warmup_events
        expected_n = warmup + per_site
        batch = self.batch if mode == "batch" else 1
        label = f"fanout {name} {connections} conns {sites} sites {mode}"
        row = RowResult(
            server=name,
            connections=connections,
            sites=sites,
            mode=mode,
            batch=batch,
            events_per_site=per_site,
            layout=kind.layout,
            nodes=kind.nodes,
            publish=kind.publish,
            publish_connections=self.publish_connections,
            spread=self.spread,
        )
        with open_stage(
            kind,
            sites=sites,
            connections=connections,
            client_procs=self.client_procs,
            expected=expected_n,
            sample_every=self.sample_every,
            label=label,
            progress=progress,
            hubserver_source=self.hubserver_src,
        ) as stage:
            server = stage.server
            time.sleep(0.3)
            row.rss_before = server.rss_bytes()
            progress.update(f"{label}: connecting", is_milestone=True)
            connected = stage.connect(
                connections,
                rate=self.connect_rate,
                concurrency=self.connect_concurrency,
                timeout=max(60.0, 3 * connections / self.connect_rate),
                progress=progress,
            )
            row.connected = connected.ok
            row.connect_errors = dict(connected.errors)
            if connected.ok == 0:
                raise BenchError(f"{label}: no connection opened: {connected.errors}")
            time.sleep(0.5)
            row.rss_connected = server.rss_bytes()
            if kind.is_scale_out:
                row.connections_by_process = server.connections_by_process()

            factory = EventFactory(sites, self.seed)
            publisher: Publisher | HubPublisher
            try:
                if kind.publish == HUB_PUBLISH:
                    publisher = HubPublisher(
                        "127.0.0.1",
                        server.port,
                        HUB_PUBLISH_PATH,
                        stage.credentials.publish_token,
                        connections=self.publish_connections,
                    )
                else:
                    publisher = Publisher(
                        "127.0.0.1",
                        server.port,
                        PUBLISH_PATH,
                        stage.credentials.publish_token,
                        connections=self.publish_connections,
                    )
            except OSError as exc:
                raise BenchError(f"{label}: the publisher cannot connect: {exc}") from exc
            except BenchError as exc:
                raise BenchError(f"{label}: {exc}") from exc
            try:
                self._warm_up(stage, publisher, factory, sites, warmup, connected.ok, progress)
                self._measure(stage, publisher, factory, row, progress, label)
            finally:
                publisher.close()
            row.rss_after = server.rss_bytes()
        return row

    def _warm_up(
        self,
        stage: Stage,
        publisher: Publisher | HubPublisher,
        factory: EventFactory,
        sites: int,
        warmup: int,
        is_open: int,
        progress: Progress,
    ) -> None:
        if warmup <= 0:
            return
        progress.update(f"{stage.label}: warm-up", is_milestone=True)
        result = publisher.run(plan_requests(sites, 1, warmup, 1), factory)
        if result.failed:
            raise BenchError(f"{stage.label}: warm-up publish failed: {dict(result.errors)}")
        stage.wait_received(
            warmup * is_open,
            key="received",
            quiet_timeout=self.quiet_timeout,
            deadline=time.monotonic() + 60,
            progress=progress,
            what="warm-up deliveries",
        )

    def _measure(
        self,
        stage: Stage,
        publisher: Publisher | HubPublisher,
        factory: EventFactory,
        row: RowResult,
        progress: Progress,
        label: str,
    ) -> None:
        sites, per_site = row.sites, row.events_per_site
        requests = plan_requests(
            sites, self.warmup_events + 1, per_site, row.batch, spread=self.spread, seed=self.seed
        )
        expected = per_site * row.connected  # every subscriber gets each event of its site
        stage.pool.ask("measure")
        server = stage.server
        spy = self._start_py_spy(row, server.pid)
        cpu_server0 = server.cpu_seconds()
        cpu_helpers0 = server.helper_cpu_seconds()
        cpu_processes0 = server.cpu_by_process()
        cpu_clients0 = stage.pool.cpu_each()
        cpu_publisher0 = self_cpu_seconds()
        busy0 = machine_busy_seconds()
        started = time.monotonic()
        progress.update(f"{label}: publishing {len(requests):,} requests", is_milestone=True)
        rate = self.rate if row.mode == "rate" else None
        published = publisher.run(
            requests,
            factory,
            rate=rate,
            deadline=started + self.row_timeout,
            on_progress=lambda sent: progress.update(
                f"{label}: published {sent:,}/{len(requests):,} requests"
            ),
        )
        cpu_publisher = self_cpu_seconds() - cpu_publisher0
        stage.wait_received(
            expected,
            key="measured",
            quiet_timeout=self.quiet_timeout,
            deadline=started + self.row_timeout,
            progress=progress,
            what="deliveries",
        )
        ended = time.monotonic()
        # A server that died took its CPU counters with it: 0 rather than negative.
        row.cpu_server = max(0.0, server.cpu_seconds() - cpu_server0)
        row.cpu_backplane = max(0.0, server.helper_cpu_seconds() - cpu_helpers0)
        row.cpu_processes = _cpu_deltas(cpu_processes0, server.cpu_by_process())
        row.cpu_clients = [
            after - before
            for after, before in zip(stage.pool.cpu_each(), cpu_clients0, strict=True)
        ]
        row.cpu_publisher = cpu_publisher
        row.wall = ended - started
        # Whatever else ran on the machine meanwhile (it is shared): busy minus ours.
        ours = row.cpu_server + row.cpu_backplane + sum(row.cpu_clients)
        ours += self_cpu_seconds() - cpu_publisher0
        row.cpu_others = max(0.0, machine_busy_seconds() - busy0 - ours)
        self._stop_py_spy(spy)
        counts = stage.report()
        row.expected = expected
        row.deliveries = counts.measured
        row.lost, row.duplicated, row.foreign = counts.lost, counts.duplicated, counts.foreign
        row.misrouted = counts.misrouted
        row.problem_sites = {
            site_name(site): values
            for site, values in sorted(counts.problem_sites.items())[:MAX_PROBLEM_SITES]
        }
        row.problem_site_count = len(counts.problem_sites)
        row.frames, row.reads = counts.frames, counts.reads
        row.closed_by_server = counts.closed_by_server
        row.close_reasons = counts.close_reasons
        row.latencies_ms = counts.latencies_ms
        row.requests = published.requests
        row.events = published.events_accepted
        row.publish_failed = published.failed
        row.publish_errors = dict(published.errors)
        row.statuses = dict(published.statuses)
        last_delivery = counts.last_delivery_ns
        if published.first_send_ns and last_delivery > published.first_send_ns:
            row.seconds = (last_delivery - published.first_send_ns) / 1e9
        if published.first_send_ns and published.last_response_ns:
            row.publish_seconds = (published.last_response_ns - published.first_send_ns) / 1e9
        if not server.is_alive():
            row.server_exit = server.exit_status()

    def _start_py_spy(self, row: RowResult, pid: int) -> subprocess.Popen[bytes] | None:
        if self.py_spy is None or row.server not in self.py_spy_servers:
            return None
        name = f"{row.server}-{row.connections}c-{row.sites}s-{row.mode}"
        spy, row.profile_path = start_py_spy(self.py_spy, name, pid)
        return spy

    @staticmethod
    def _stop_py_spy(spy: subprocess.Popen[bytes] | None) -> None:
        stop_py_spy(spy)


def _cpu_deltas(
    before: Mapping[int, tuple[str, float]], after: Mapping[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds per role over the phase (a process that started meanwhile: all of its)."""
    out: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        start = before.get(pid, (role, 0.0))[1]
        out[role] = out.get(role, 0.0) + max(0.0, seconds - start)
    return out


# -- results -----------------------------------------------------------------------


@dataclass(slots=True)
class RowResult:
    """One server on one row."""

    server: str
    connections: int
    sites: int
    mode: str
    batch: int
    events_per_site: int
    connected: int = 0
    connect_errors: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    #: measured events the server accepted (a publish that failed is not counted)
    events: int = 0
    publish_failed: int = 0
    publish_errors: dict[str, int] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    expected: int = 0
    deliveries: int = 0
    lost: int = 0
    duplicated: int = 0
    foreign: int = 0
    #: deliveries of another site's events (a server that does not route by site)
    misrouted: int = 0
    #: site -> (lost, duplicated, misrouted, foreign) for the first sites with a problem
    problem_sites: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    problem_site_count: int = 0
    frames: int = 0  # data frames the subscribers received in the measured phase
    reads: int = 0  # their recv() calls that returned data
    closed_by_server: int = 0
    close_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    publish_seconds: float = 0.0
    wall: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    cpu_server: float = 0.0
    cpu_clients: list[float] = field(default_factory=list)
    cpu_publisher: float = 0.0
    cpu_others: float = 0.0
    rss_before: int = 0
    rss_connected: int = 0
    rss_after: int = 0
    server_exit: str | None = None
    profile_path: str | None = None
    #: how the server is laid out ("1 process", "2 workers", "2 nodes + redis").
    layout: str = "1 process"
    #: nodes on ports of their own (the subscribers split evenly over them).
    nodes: int = 1
    #: CPU of the backplane (the redis-server) over the measured phase, not in cpu_server.
    cpu_backplane: float = 0.0
    #: CPU per process of the server and its backplane over the measured phase, by role.
    cpu_processes: dict[str, float] = field(default_factory=dict)
    #: subscriber connections held by each process of a scale-out layout, by role.
    connections_by_process: dict[str, int] = field(default_factory=dict)
    #: how the bench published: "http" (POSTs) or "hub" (the publisher hub).
    publish: str = "http"
    #: requests in flight (keep-alive HTTP connections, or hub connections).
    publish_connections: int = 1
    spread: str = "round-robin"

    @property
    def row_key(self) -> tuple[int, int, str, int]:
        return (self.connections, self.sites, self.mode, self.batch)

    @property
    def deliveries_per_second(self) -> float | None:
        return self.deliveries / self.seconds if self.seconds > 0 and self.deliveries else None

    @property
    def events_per_second(self) -> float | None:
        """Events published over the same time as deliveries/s."""
        return self.events / self.seconds if self.seconds > 0 and self.events else None

    @property
    def subscribers_per_site(self) -> float:
        return self.connections / self.sites

    @property
    def is_sites_shape(self) -> bool:
        """Many sites with a few subscribers each (issue #10), judged by SITES_BAR."""
        return self.subscribers_per_site <= MAX_SITES_SHAPE_SUBSCRIBERS

    @property
    def deliveries_per_second_per_node(self) -> float | None:
        rate = self.deliveries_per_second
        return None if rate is None else rate / self.nodes

    @property
    def deliveries_per_frame(self) -> float | None:
        return self.deliveries / self.frames if self.frames else None

    @property
    def deliveries_per_read(self) -> float | None:
        return self.deliveries / self.reads if self.reads else None

    @property
    def cpu_per_delivery(self) -> float | None:
        """Server CPU-seconds per delivery."""
        return self.cpu_server / self.deliveries if self.deliveries else None

    @property
    def cpu_us_per_delivery(self) -> float | None:
        """Server CPU-microseconds per delivery."""
        return self.cpu_server * 1e6 / self.deliveries if self.deliveries else None

    @property
    def cpu_us_per_event(self) -> float | None:
        """Server CPU-microseconds per event published (its deliveries included)."""
        return self.cpu_server * 1e6 / self.events if self.events else None

    @property
    def deliveries_per_cpu_second(self) -> float | None:
        """Deliveries per second of server CPU: what the server would do with a core of
        its own, less sensitive to neighbours on a shared machine than deliveries/s."""
        return self.deliveries / self.cpu_server if self.cpu_server > 0 else None

    def latency(self, fraction: float) -> float | None:
        return percentile(self.latencies_ms, fraction)

    @property
    def latency_max(self) -> float | None:
        return self.latencies_ms[-1] if self.latencies_ms else None

    @property
    def rss_per_connection(self) -> float | None:
        if not self.connected:
            return None
        return (self.rss_connected - self.rss_before) / self.connected

    def percent(self, cpu: float) -> float:
        return 100.0 * cpu / self.wall if self.wall > 0 else 0.0

    @property
    def is_exact(self) -> bool:
        """Nothing lost, duplicated or foreign, and nothing refused."""
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.foreign == 0
            and self.misrouted == 0
            and self.publish_failed == 0
            and self.connected > 0
        )

    def to_json(self) -> dict[str, JsonValue]:
        lat = self.latencies_ms
        return {
            "server": self.server,
            "connections": self.connections,
            "connected": self.connected,
            "connect_errors": dict(self.connect_errors),
            "sites": self.sites,
            "mode": self.mode,
            "batch": self.batch,
            "events_per_site": self.events_per_site,
            "subscribers_per_site": self.subscribers_per_site,
            "spread": self.spread,
            "publish": self.publish,
            "publish_connections": self.publish_connections,
            "requests": self.requests,
            "events": self.events,
            "publish_failed": self.publish_failed,
            "publish_errors": dict(self.publish_errors),
            "http_statuses": {str(k): v for k, v in self.statuses.items()},
            "expected_deliveries": self.expected,
            "deliveries": self.deliveries,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "foreign": self.foreign,
            "misrouted": self.misrouted,
            "problem_site_count": self.problem_site_count,
            "problem_sites": {
                site: dict(zip(("lost", "duplicated", "misrouted", "foreign"), values, strict=True))
                for site, values in self.problem_sites.items()
            },
            "frames": self.frames,
            "reads": self.reads,
            "deliveries_per_frame": self.deliveries_per_frame,
            "deliveries_per_read": self.deliveries_per_read,
            "closed_by_server": self.closed_by_server,
            "close_reasons": dict(self.close_reasons),
            "seconds": self.seconds,
            "publish_seconds": self.publish_seconds,
            "events_per_second": self.events_per_second,
            "deliveries_per_second": self.deliveries_per_second,
            "deliveries_per_second_per_node": self.deliveries_per_second_per_node,
            "deliveries_per_server_cpu_second": self.deliveries_per_cpu_second,
            "latency_ms": {
                "samples": len(lat),
                "p50": self.latency(0.5),
                "p90": self.latency(0.9),
                "p99": self.latency(0.99),
                "max": self.latency_max,
                "mean": statistics.fmean(lat) if lat else None,
                # Every percentile 1..100: the samples themselves would be megabytes.
                "percentiles": [percentile(lat, q / 100) for q in range(1, 101)] if lat else [],
            },
            "layout": self.layout,
            "nodes": self.nodes,
            "server_cpu_seconds": self.cpu_server,
            "server_cpu_percent": self.percent(self.cpu_server),
            "server_cpu_us_per_event": self.cpu_us_per_event,
            "server_cpu_us_per_delivery": self.cpu_us_per_delivery,
            "server_cpu_seconds_by_process": dict(self.cpu_processes),
            "server_connections_by_process": dict(self.connections_by_process),
            "backplane_cpu_seconds": self.cpu_backplane,
            "backplane_cpu_percent": self.percent(self.cpu_backplane),
            "client_cpu_seconds": list(self.cpu_clients),
            "client_cpu_percent": [self.percent(c) for c in self.cpu_clients],
            "publisher_cpu_seconds": self.cpu_publisher,
            "publisher_cpu_percent": self.percent(self.cpu_publisher),
            "others_cpu_seconds": self.cpu_others,
            "others_cpu_percent": self.percent(self.cpu_others),
            "measured_wall_seconds": self.wall,
            "server_rss_bytes": {
                "before": self.rss_before,
                "connected": self.rss_connected,
                "after": self.rss_after,
            },
            "server_rss_per_connection_bytes": self.rss_per_connection,
            "server_exit": self.server_exit,
            "py_spy_profile": self.profile_path,
        }


_COLUMNS: Final = (
    "server",
    "conns",
    "sites",
    "mode",
    "events",
    "deliveries",
    "events/s",
    "deliv/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "max ms",
    "lost",
    "dup",
    "ev/frame,read",
    "srv CPU",
    "µs/event",
    "µs/deliv",
    "srv RSS",
    "KB/conn",
    "client CPU",
    "pub CPU",
    "others",
)


#: Added after "deliv/s" and "srv CPU" when a scale-out layout is in the run.
_SCALE_OUT_COLUMNS: Final = ("layout", "deliv/s/node", "redis CPU")


def _short(value: float | None) -> str:
    """A number in few characters: one decimal below 100."""
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def _scale_out_cells(row: RowResult) -> tuple[str, ...]:
    per_node = row.deliveries_per_second_per_node
    return (
        row.layout,
        "-" if per_node is None else f"{per_node:,.0f}",
        f"{row.cpu_backplane:.1f}s {row.percent(row.cpu_backplane):.0f}%" if row.nodes > 1 else "-",
    )


def _cells(row: RowResult) -> tuple[str, ...]:
    rate = row.deliveries_per_second
    event_rate = row.events_per_second
    per_conn = row.rss_per_connection
    clients = row.cpu_clients
    client_cell = (
        f"{row.percent(sum(clients)):.0f}% (max {max(row.percent(c) for c in clients):.0f}%)"
        if clients
        else "-"
    )
    mode = row.mode if row.mode != "batch" else f"batch {row.batch}"
    return (
        row.server,
        f"{row.connected}/{row.connections}"
        if row.connected != row.connections
        else str(row.connections),
        str(row.sites),
        mode,
        f"{row.events_per_site * row.sites:,}",
        f"{row.deliveries:,}",
        "-" if event_rate is None else f"{event_rate:,.0f}",
        "-" if rate is None else f"{rate:,.0f}",
        _short(row.latency(0.5)),
        _short(row.latency(0.9)),
        _short(row.latency(0.99)),
        _short(row.latency_max),
        f"{row.lost:,}",
        f"{row.duplicated:,}" + (f" +{row.misrouted:,} misr." if row.misrouted else ""),
        f"{_short(row.deliveries_per_frame)} {_short(row.deliveries_per_read)}",
        f"{row.cpu_server:.1f}s {row.percent(row.cpu_server):.0f}%",
        _short(row.cpu_us_per_event),
        _short(row.cpu_us_per_delivery),
        f"{row.rss_connected / 2**20:.0f} MB",
        "-" if per_conn is None else f"{per_conn / 1024:.1f}",
        client_cell,
        f"{row.percent(row.cpu_publisher):.0f}%",
        f"{row.percent(row.cpu_others):.0f}%",
    )


def _row_label(key: tuple[int, int, str, int]) -> str:
    connections, sites, mode, batch = key
    mode_text = f"batch {batch}" if mode == "batch" else mode
    return f"{connections} conns, {sites} site{'s' if sites != 1 else ''}, {mode_text}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def judge(rows: Sequence[RowResult]) -> tuple[list[tuple[str, ...]], bool | None]:
    """The bar's checks that these rows allow: (check, row, value, target, verdict) each.

    Returns:
        The check rows, and whether all passed (None when nothing could be judged).
    """
    by_key: dict[tuple[int, int, str, int], dict[str, RowResult]] = {}
    for row in rows:
        by_key.setdefault(row.row_key, {})[row.server] = row
    checks: list[tuple[str, ...]] = []
    informative: list[tuple[str, ...]] = []
    verdicts: list[bool] = []

    def check(
        name: str,
        key: tuple[int, int, str, int],
        value: float | None,
        target: str,
        passed: bool | None,
        fmt: str = "{:.2f}x",
    ) -> None:
        shown = "-" if value is None else fmt.format(value)
        if passed is None:
            verdict = "n/a"
        else:
            verdict = "PASS" if passed else "FAIL"
            verdicts.append(passed)
        checks.append((name, _row_label(key), shown, target, verdict))

    def info(name: str, key: tuple[int, int, str, int], value: float | None) -> None:
        shown = "-" if value is None else f"{value:.2f}x"
        informative.append((f"(info) {name}", _row_label(key), shown, "-", "info"))

    def exact(name: str, key: tuple[int, int, str, int], row: RowResult) -> None:
        # foreign and misrouted deliveries are counting failures as much as lost ones
        lost = float(row.lost + row.duplicated + row.foreign + row.misrouted)
        check(f"{name} lost + duplicated", key, lost, "0", row.is_exact, fmt="{:,.0f}")

    def versus(
        name: str, other_name: str, key: tuple[int, int, str, int], minimum: float | None
    ) -> None:
        """deliveries/s of one server over another's: judged against ``minimum``, or
        informative (None); and their server CPU per event, informative."""
        row, other = servers.get(name), servers.get(other_name)
        if row is None or other is None:
            return
        ratio = _ratio(row.deliveries_per_second, other.deliveries_per_second)
        if minimum is None:
            info(f"deliveries/s {name} / {other_name}", key, ratio)
        else:
            check(
                f"deliveries/s {name} / {other_name}",
                key,
                ratio,
                f">= {minimum:g}x",
                None if ratio is None else ratio >= minimum,
            )
        info(
            f"server CPU per event, {name} / {other_name}",
            key,
            _ratio(row.cpu_us_per_event, other.cpu_us_per_event),
        )

    for key, servers in by_key.items():
        connections, sites, mode, batch = key
        is_sites_shape = connections / sites <= MAX_SITES_SHAPE_SUBSCRIBERS
        if is_sites_shape and mode == "burst":
            # issue #10: the service's shape, one event per publish
            versus("hubserver", "aiosignalr", key, MIN_SITES_VS_AIOSIGNALR)
            versus("hubserver-pubhub", "ceiling", key, MIN_SITES_PUBHUB_VS_CEILING)
            versus("hubserver-pubhub", "aiosignalr", key, MIN_SITES_PUBHUB_VS_AIOSIGNALR)
            versus("hubserver", "ceiling", key, None)
            versus("hubserver-pubhub", "hubserver", key, None)
        hub = servers.get("hubserver")
        if hub is not None:
            hub_rate = hub.deliveries_per_second
            if mode == "burst" and connections in BAR_CONNECTIONS and not is_sites_shape:
                for peer, minimum in (
                    ("ceiling", MIN_VS_CEILING),
                    ("aiosignalr", MIN_VS_AIOSIGNALR),
                    ("socketio", MIN_VS_SOCKETIO),
                ):
                    other = servers.get(peer)
                    if other is None:
                        continue
                    ratio = _ratio(hub_rate, other.deliveries_per_second)
                    check(
                        f"deliveries/s hubserver / {peer}",
                        key,
                        ratio,
                        f">= {minimum:g}x",
                        None if ratio is None else ratio >= minimum,
                    )
                    info(
                        f"deliveries per server CPU-s, hubserver / {peer}",
                        key,
                        _ratio(hub.deliveries_per_cpu_second, other.deliveries_per_cpu_second),
                    )
                ceiling = servers.get("ceiling")
                if ceiling is not None:
                    ratio = _ratio(hub.latency(0.99), ceiling.latency(0.99))
                    check(
                        "p99 latency hubserver / ceiling",
                        key,
                        ratio,
                        f"<= {MAX_P99_VS_CEILING:g}x",
                        None if ratio is None else ratio <= MAX_P99_VS_CEILING,
                    )
            if mode == "batch" and batch == 100 and connections == 1000:
                check(
                    "hubserver deliveries/s, batch 100",
                    key,
                    hub_rate,
                    f">= {MIN_BATCH_DELIVERIES_PER_SECOND:,.0f}/s",
                    hub_rate is not None and hub_rate >= MIN_BATCH_DELIVERIES_PER_SECOND,
                    fmt="{:,.0f}/s",
                )
            exact("hubserver", key, hub)
        pubhub = servers.get("hubserver-pubhub")
        if pubhub is not None:
            if not (is_sites_shape and mode == "burst"):
                versus("hubserver-pubhub", "hubserver", key, None)
            exact("hubserver-pubhub", key, pubhub)
        nometrics = servers.get("hubserver-nometrics")
        if nometrics is not None:
            # issue #12: what the metrics cost, the same server with them off
            if hub is not None:
                name = "deliveries/s hubserver / hubserver-nometrics"
                ratio = _ratio(hub.deliveries_per_second, nometrics.deliveries_per_second)
                if mode == "burst":
                    check(
                        name,
                        key,
                        ratio,
                        f">= {MIN_METRICS_ON_VS_OFF:g}x",
                        None if ratio is None else ratio >= MIN_METRICS_ON_VS_OFF,
                    )
                else:
                    info(name, key, ratio)
                info(
                    "server CPU per delivery, hubserver / hubserver-nometrics",
                    key,
                    _ratio(hub.cpu_per_delivery, nometrics.cpu_per_delivery),
                )
            exact("hubserver-nometrics", key, nometrics)
        # Scale-out (issue #5): each layout against the single process of the same row.
        workers = servers.get("hubserver-w2")
        if workers is not None:
            if hub is not None:
                ratio = _ratio(workers.cpu_per_delivery, hub.cpu_per_delivery)
                check(
                    "server CPU per delivery, hubserver-w2 / hubserver",
                    key,
                    ratio,
                    f"<= {MAX_CPU_PER_DELIVERY_WORKERS:g}x",
                    None if ratio is None else ratio <= MAX_CPU_PER_DELIVERY_WORKERS,
                )
                info(
                    "deliveries/s, hubserver-w2 / hubserver",
                    key,
                    _ratio(workers.deliveries_per_second, hub.deliveries_per_second),
                )
            exact("hubserver-w2", key, workers)
        redis = servers.get("hubserver-redis2")
        if redis is not None:
            if hub is not None:
                ratio = _ratio(
                    redis.deliveries_per_second_per_node, hub.deliveries_per_second_per_node
                )
                check(
                    "deliveries/s per node, hubserver-redis2 / hubserver",
                    key,
                    ratio,
                    f">= {MIN_PER_NODE_REDIS:g}x",
                    None if ratio is None else ratio >= MIN_PER_NODE_REDIS,
                )
                info(
                    "server CPU per delivery, hubserver-redis2 (both nodes) / hubserver",
                    key,
                    _ratio(redis.cpu_per_delivery, hub.cpu_per_delivery),
                )
            exact("hubserver-redis2", key, redis)
    return checks + informative, (all(verdicts) if verdicts else None)


def _outcome(run: FanoutRun, rows: Sequence[RowResult]) -> Outcome:
    scale_out = any(SERVERS[name].is_scale_out for name in run.servers)
    columns: tuple[str, ...] = _COLUMNS
    cells = [_cells(row) for row in rows]
    if scale_out:
        # layout after server; deliv/s/node after deliv/s; redis CPU after srv CPU.
        rate_at, cpu_at = _COLUMNS.index("deliv/s"), _COLUMNS.index("srv CPU")

        def spliced(base: Sequence[str], extra: Sequence[str]) -> tuple[str, ...]:
            return (
                base[0],
                extra[0],
                *base[1 : rate_at + 1],
                extra[1],
                *base[rate_at + 1 : cpu_at + 1],
                extra[2],
                *base[cpu_at + 1 :],
            )

        columns = spliced(_COLUMNS, _SCALE_OUT_COLUMNS)
        cells = [
            spliced(cell, _scale_out_cells(row)) for cell, row in zip(cells, rows, strict=True)
        ]
    left = {columns.index("server"), columns.index("mode")}
    if scale_out:
        left.add(columns.index("layout"))
    table = Table(
        columns,
        tuple(cells),
        right_aligned=frozenset(range(len(columns))) - left,
    )
    checks, passed = judge(rows)
    notes = [
        "deliveries/s: measured deliveries / (first measured publish -> last delivery); "
        "events/s: events published (accepted) over the same time; "
        "latency: delivery time - publish time t (set just before the request is written), "
        f"sampled 1 in {run.sample_every} events (nearest-rank percentiles).",
        "lost/dup: exact per site, from every record's site and per-site sequence n on every "
        "connection (warm-up included); a connection the server closed keeps counting as "
        "lost; misr.: deliveries of another site's events (a server that does not route by "
        "site); the JSON lists the first sites with a problem.",
        f"events spread: {_SPREAD_TEXT[run.spread].format(seed=run.seed)}; "
        f"{run.publish_connections} request(s) in flight.",
        "ev/frame,read: measured deliveries per WebSocket data frame and per recv() of the "
        "subscribers: how much the server batches its writes (and the clients their reads).",
        "srv CPU: the server's process tree (utime+stime from /proc) over the measured "
        "phase, and % of that wall time; µs/event, µs/deliv: that CPU per event published "
        "and per delivery (the JSON also has deliveries per server CPU-second); srv RSS: "
        "after connecting; KB/conn: (RSS after connecting - RSS before) / connections.",
        "client CPU: all load-client processes (sum, and the busiest one; 100% = one core "
        "saturated); pub CPU: the publisher (the bench's own process); others: the rest "
        "of the machine's busy CPU meanwhile (/proc/stat), i.e. neighbours on a shared host.",
    ]
    if scale_out:
        notes.append(
            "scale-out: hubserver-w2 is `hubserver serve --workers 2` (srv CPU: the parent with "
            "its broker + both workers); hubserver-redis2 is two `hubserver serve --backplane "
            "redis://...` nodes, subscribers split evenly, every publish to node 1 (srv CPU, "
            "RSS: both nodes; redis CPU: the redis-server, apart); deliv/s/node: deliv/s / nodes."
        )
        for row in rows:
            if len(row.cpu_processes) > 1:
                parts = ", ".join(
                    f"{role} {seconds:.1f}s ({row.percent(seconds):.0f}%)"
                    for role, seconds in row.cpu_processes.items()
                )
                if row.connections_by_process:
                    parts += "; connections: " + ", ".join(
                        f"{role} {count:,}" for role, count in row.connections_by_process.items()
                    )
                notes.append(f"{row.server} ({_row_label(row.row_key)}) CPU by process: {parts}")
    for row in rows:
        problems = []
        if row.connected != row.connections:
            problems.append(
                f"{row.connections - row.connected} connections failed: {row.connect_errors}"
            )
        if row.publish_failed or row.publish_errors:
            problems.append(f"publish errors: {row.publish_errors}")
        if row.closed_by_server:
            problems.append(
                f"{row.closed_by_server} connections closed by the server: {row.close_reasons}"
            )
        if row.foreign:
            problems.append(f"{row.foreign} events with a sequence outside the run")
        if row.misrouted:
            problems.append(f"{row.misrouted} deliveries of another site's events")
        if row.problem_site_count:
            shown = ", ".join(
                f"{site} {'/'.join(str(value) for value in values)}"
                for site, values in list(row.problem_sites.items())[:5]
            )
            more = row.problem_site_count - min(5, len(row.problem_sites))
            problems.append(
                f"{row.problem_site_count} sites with a problem (lost/dup/misr./foreign: "
                f"{shown}{f', {more} more' if more > 0 else ''})"
            )
        if row.server_exit:
            problems.append(f"server {row.server_exit}")
        if problems:
            notes.append(f"{row.server} ({_row_label(row.row_key)}): " + "; ".join(problems))
        if row.profile_path:
            notes.append(
                f"{row.server} ({_row_label(row.row_key)}): py-spy profile {row.profile_path}"
            )
    if any(SERVERS[name].publish == HUB_PUBLISH for name in run.servers):
        notes.append(
            "hubserver-pubhub: the same events published over the publisher hub "
            f'({HUB_PUBLISH_PATH}): one Publish("entries", event or [events]) invocation per '
            "request, one WebSocket per publish connection with one invocation in flight."
        )
    bars = [BAR]
    if scale_out:
        bars.append(SCALE_OUT_BAR)
    if any(row.is_sites_shape for row in rows):
        bars.append(SITES_BAR)
    if "hubserver-nometrics" in run.servers:
        bars.append(METRICS_BAR)
    sample = EventFactory(1, run.seed).event(0, 1, time.time_ns())
    workload: dict[str, JsonValue] = {
        "event": 'POST /v1/events/entries: {"n":N,"t":T,"id":"site-S-N","site_id":"site-S", '
        f"+ a typical entry (bench.workload)}}, {len(sample)} bytes",
        "delivery": "ReceiveMessage(text) as a SignalR JSON record (hubserver, aiosignalr, "
        "ceiling), a Socket.IO event (socketio)",
    }
    return Outcome(
        workload=workload,
        table=table,
        results=[row.to_json() for row in rows],
        notes=notes,
        bar="; ".join(bars),
        passed=passed,
        checks=Table(("check", "row", "value", "target", "verdict"), tuple(checks))
        if checks
        else None,
    )


# -- command line ------------------------------------------------------------------


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser, FANOUT_DEFAULT_SERVERS)
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--connections",
        default=None,
        help="comma-separated, e.g. 1000,5000 (default 1000), split evenly over the sites",
    )
    size.add_argument(
        "--subscribers-per-site",
        type=int,
        default=None,
        metavar="K",
        help="size each row by its sites instead: N sites get N x K connections",
    )
    parser.add_argument("--sites", default="1,50", help="comma-separated site counts")
    parser.add_argument(
        "--spread",
        default="round-robin",
        choices=SPREADS,
        help="how the events go over the sites: in turn, or in a seeded random order",
    )
    parser.add_argument("--mode", default="burst", help="comma-separated, from: rate, burst, batch")
    parser.add_argument("--batch", type=int, default=100, help="events per request (batch mode)")
    parser.add_argument("--rate", default="200/s", help="events per second (rate mode)")
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds of publishing (rate mode)"
    )
    parser.add_argument(
        "--deliveries",
        type=int,
        default=None,
        help="deliveries per row, sets events per site "
        f"(default burst {DEFAULT_DELIVERIES['burst']:,}, "
        f"batch {DEFAULT_DELIVERIES['batch']:,})",
    )
    parser.add_argument(
        "--events-per-site",
        type=int,
        default=None,
        help="measured events per site (overrides --deliveries)",
    )
    parser.add_argument(
        "--warmup-events", type=int, default=WARMUP_EVENTS_PER_SITE, help="warm-up events per site"
    )
    parser.add_argument("--client-procs", type=int, default=2, help="load-client processes")
    parser.add_argument(
        "--publish-connections",
        type=int,
        default=4,
        help="publishes in flight: keep-alive HTTP connections of the publisher, one "
        "request in flight each (hubserver-pubhub: hub connections, one invocation each)",
    )
    parser.add_argument("--connect-rate", default="2000/s", help="new connections per second")
    parser.add_argument("--connect-concurrency", type=int, default=200, help="openings in flight")
    parser.add_argument("--sample-every", type=int, default=10, help="latency: sample 1 event in N")
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=10.0,
        help="stop waiting when deliveries stall this many seconds",
    )
    parser.add_argument(
        "--row-timeout",
        type=float,
        default=180.0,
        help="most seconds a row's measured phase may take",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="draw latency percentiles and throughput per server",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="record a py-spy profile (raw) of the server in each measured phase",
    )
    parser.add_argument(
        "--py-spy-servers",
        default="hubserver",
        help="which servers --py-spy profiles (comma-separated)",
    )


def _prepare(args: argparse.Namespace) -> FanoutRun:
    return FanoutRun(
        servers=parse_servers(args.servers),
        hubserver_src=args.hubserver_src,
        connections=parse_list(args.connections or "1000"),
        sites=parse_list(args.sites),
        subscribers_per_site=args.subscribers_per_site,
        spread=args.spread,
        modes=tuple(m.strip() for m in args.mode.split(",") if m.strip()),
        batch=args.batch,
        rate=parse_rate(args.rate),
        duration=args.duration,
        deliveries=args.deliveries,
        events_per_site=args.events_per_site,
        warmup_events=args.warmup_events,
        client_procs=args.client_procs,
        publish_connections=args.publish_connections,
        connect_rate=parse_rate(args.connect_rate),
        connect_concurrency=args.connect_concurrency,
        sample_every=args.sample_every,
        quiet_timeout=args.quiet_timeout,
        row_timeout=args.row_timeout,
        seed=args.seed,
        plot=args.plot,
        py_spy=args.py_spy,
        py_spy_servers=parse_servers(args.py_spy_servers),
    )


PROFILE = Profile(
    name="fanout",
    summary="events published over HTTP (or hubserver's publisher hub), delivered to many "
    "WebSocket subscribers of one or many sites: events/s, deliveries/s, latency, exact "
    "loss per site, CPU per event and per delivery, memory, hubserver beside its peers",
    add_arguments=_add_arguments,
    prepare=_prepare,
)
