"""The ``idle`` profile: memory and CPU per idle subscriber, keep-alive running.

N subscribers open (paced), then sit for ``--hold`` seconds: the clients send
nothing of their own and only read, answering what the transport requires
(WebSocket pings with pongs, Engine.IO pings with ``3``). The server's RSS is
read before, after the openings and at the end of the hold; its CPU over the
hold is what keeping idle connections alive costs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.profile import BenchError, Profile
from bench.report import JsonValue, Outcome, Progress, Table
from bench.server.harness import open_stage, parse_rate
from bench.server.servers import (
    DEFAULT_SERVERS,
    SERVERS,
    add_server_arguments,
    describe_hubserver,
    parse_servers,
    peer_versions,
)

__all__ = ["PROFILE", "IdleRow", "IdleRun"]


@dataclass(slots=True)
class IdleRow:
    server: str
    requested: int
    connected: int = 0
    open_at_end: int = 0
    closed_by_server: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    rss_before: int = 0
    rss_connected: int = 0
    rss_end: int = 0
    rss_peak: int = 0
    hold: float = 0.0
    cpu_server: float = 0.0
    cpu_clients: float = 0.0

    @property
    def per_connection(self) -> float | None:
        if not self.connected:
            return None
        return (self.rss_end - self.rss_before) / self.connected

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "server": self.server,
            "requested": self.requested,
            "connected": self.connected,
            "open_at_end": self.open_at_end,
            "closed_by_server": self.closed_by_server,
            "errors": dict(self.errors),
            "server_rss_bytes": {
                "before": self.rss_before,
                "connected": self.rss_connected,
                "end": self.rss_end,
                "peak": self.rss_peak,
            },
            "server_rss_per_connection_bytes": self.per_connection,
            "hold_seconds": self.hold,
            "server_cpu_seconds": self.cpu_server,
            "server_cpu_percent": 100 * self.cpu_server / self.hold if self.hold else None,
            "client_cpu_seconds": self.cpu_clients,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class IdleRun:
    servers: tuple[str, ...] = DEFAULT_SERVERS
    connections: int = 10_000
    sites: int = 1
    hold: float = 20.0
    client_procs: int = 4
    connect_rate: float = 2000.0
    connect_concurrency: int = 200

    hubserver_src: Path | None = None

    @property
    def parameters(self) -> Mapping[str, JsonValue]:
        return {
            "servers": list(self.servers),
            "hubserver": describe_hubserver(self.hubserver_src),
            "versions": dict(peer_versions()),
            "connections": self.connections,
            "sites": self.sites,
            "hold": f"{self.hold:g} s",
            "client processes": self.client_procs,
            "connect rate": f"{self.connect_rate:g}/s, {self.connect_concurrency} in flight",
        }

    def execute(self, progress: Progress) -> Outcome:
        rows = [self._row(name, progress) for name in self.servers]
        progress.clear()
        return _outcome(rows)

    def _row(self, name: str, progress: Progress) -> IdleRow:
        label = f"idle {name} {self.connections}"
        row = IdleRow(name, self.connections)
        with open_stage(
            SERVERS[name],
            sites=self.sites,
            connections=self.connections,
            client_procs=self.client_procs,
            expected=0,
            ping_interval=None,  # the clients send nothing of their own
            label=label,
            progress=progress,
            hubserver_source=self.hubserver_src,
        ) as stage:
            server = stage.server
            time.sleep(0.3)
            row.rss_before = server.rss_bytes()
            progress.update(f"{label}: connecting", is_milestone=True)
            result = stage.connect(
                self.connections,
                rate=self.connect_rate,
                concurrency=self.connect_concurrency,
                timeout=max(120.0, 3 * self.connections / self.connect_rate),
                progress=progress,
            )
            row.connected = result.ok
            row.errors = dict(result.errors)
            if not result.ok:
                raise BenchError(f"{label}: no connection opened: {result.errors}")
            time.sleep(1.0)
            row.rss_connected = server.rss_bytes()
            row.rss_peak = row.rss_connected
            cpu_server = server.cpu_seconds()
            cpu_clients = sum(stage.pool.cpu_each())
            started = time.monotonic()
            progress.update(f"{label}: holding {self.hold:g} s", is_milestone=True)
            while (elapsed := time.monotonic() - started) < self.hold:
                time.sleep(min(1.0, self.hold - elapsed))
                row.rss_peak = max(row.rss_peak, server.rss_bytes())
                totals = stage.totals()
                progress.update(
                    f"{label}: holding {elapsed:.0f}/{self.hold:g} s, {totals['open']:,} open"
                )
            row.hold = time.monotonic() - started
            row.cpu_server = server.cpu_seconds() - cpu_server
            row.cpu_clients = sum(stage.pool.cpu_each()) - cpu_clients
            row.rss_end = server.rss_bytes()
            row.rss_peak = max(row.rss_peak, row.rss_end)
            totals = stage.totals()
            row.open_at_end = totals["open"]
            row.closed_by_server = totals["closed_by_server"]
        return row


def _outcome(rows: Sequence[IdleRow]) -> Outcome:
    columns = (
        "server",
        "connected",
        "open at end",
        "RSS before",
        "RSS connected",
        "RSS end",
        "KB/conn",
        "srv CPU (hold)",
        "client CPU",
    )
    cells = []
    notes = [
        "KB/conn: (RSS at the end of the hold - RSS before connecting) / connections; "
        "RSS is VmRSS summed over the server's process tree.",
        "srv CPU (hold): CPU seconds of the server over the hold, and % of one core: "
        "the cost of keeping idle connections alive (timers, pings).",
    ]
    for row in rows:
        per_conn = row.per_connection
        cells.append(
            (
                row.server,
                f"{row.connected:,}",
                f"{row.open_at_end:,}",
                f"{row.rss_before / 2**20:.0f} MB",
                f"{row.rss_connected / 2**20:.0f} MB",
                f"{row.rss_end / 2**20:.0f} MB",
                "-" if per_conn is None else f"{per_conn / 1024:.1f}",
                f"{row.cpu_server:.2f}s {100 * row.cpu_server / row.hold if row.hold else 0:.1f}%",
                f"{row.cpu_clients:.2f}s",
            )
        )
        if row.errors:
            notes.append(f"{row.server}: failed openings: {row.errors}")
        if row.closed_by_server:
            notes.append(f"{row.server}: {row.closed_by_server} connections closed by the server")
    return Outcome(
        workload={"connection": "SignalR JSON over WebSocket (Engine.IO for socketio), idle"},
        table=Table(columns, tuple(cells), right_aligned=frozenset(range(1, len(columns)))),
        results=[row.to_json() for row in rows],
        notes=notes,
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument("--connections", type=int, default=10_000, help="idle connections")
    parser.add_argument("--sites", type=int, default=1, help="sites they spread over")
    parser.add_argument("--hold", type=float, default=20.0, help="seconds to hold them")
    parser.add_argument("--client-procs", type=int, default=4, help="load-client processes")
    parser.add_argument("--connect-rate", default="2000/s", help="new connections per second")
    parser.add_argument("--connect-concurrency", type=int, default=200, help="openings in flight")


def _prepare(args: argparse.Namespace) -> IdleRun:
    if args.connections < 1 or args.client_procs < 1 or args.sites < 1 or args.hold < 0:
        raise ValueError("--connections, --sites, --client-procs must be >= 1, --hold >= 0")
    return IdleRun(
        servers=parse_servers(args.servers),
        hubserver_src=args.hubserver_src,
        connections=args.connections,
        sites=args.sites,
        hold=args.hold,
        client_procs=args.client_procs,
        connect_rate=parse_rate(args.connect_rate),
        connect_concurrency=args.connect_concurrency,
    )


PROFILE = Profile(
    name="idle",
    summary="RSS and keep-alive CPU per idle subscriber, hubserver beside its peers",
    add_arguments=_add_arguments,
    prepare=_prepare,
)
