"""The ``connect`` profile: N subscribers open as fast as they can.

Each opening is TCP connect + HTTP upgrade + (hubserver) JWT check and site
role lookup + the SignalR handshake (Socket.IO: the Engine.IO open and the
namespace connect), timed from ``connect()`` to the handshake answer. The
pool keeps ``--concurrency`` openings in flight (the listen backlog is 4096
on every server), with the same load client for every server.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from bench.profile import BenchError, Profile
from bench.report import JsonValue, Outcome, Progress, Table, percentile
from bench.server.harness import ConnectResult, open_stage, start_py_spy, stop_py_spy
from bench.server.servers import (
    DEFAULT_SERVERS,
    SERVERS,
    add_server_arguments,
    describe_hubserver,
    parse_servers,
    peer_versions,
)

__all__ = ["PROFILE", "ConnectRow", "ConnectRun"]

QUANTILES: Final = (0.5, 0.9, 0.99)


@dataclass(slots=True)
class ConnectRow:
    server: str
    result: ConnectResult
    cpu_server: float = 0.0
    cpu_clients: list[float] = field(default_factory=list)
    rss_before: int = 0
    rss_after: int = 0
    sites: int = 1
    profile_path: str | None = None

    @property
    def durations_ms(self) -> list[float]:
        return sorted(value / 1e6 for value in self.result.durations_ns)

    def to_json(self) -> dict[str, JsonValue]:
        durations = self.durations_ms
        result = self.result
        seconds = result.seconds
        return {
            "server": self.server,
            "requested": result.requested,
            "ok": result.ok,
            "failed": result.failed,
            "errors": dict(result.errors),
            "seconds": seconds,
            "connections_per_second": result.rate,
            "connect_ms": {
                "p50": percentile(durations, 0.5),
                "p90": percentile(durations, 0.9),
                "p99": percentile(durations, 0.99),
                "max": durations[-1] if durations else None,
                "samples": list(durations),
            },
            "server_cpu_seconds": self.cpu_server,
            "server_cpu_ms_per_connection": 1000 * self.cpu_server / result.ok
            if result.ok
            else None,
            "client_cpu_seconds": list(self.cpu_clients),
            "server_rss_bytes": {"before": self.rss_before, "after": self.rss_after},
            "server_rss_per_connection_bytes": (self.rss_after - self.rss_before) / result.ok
            if result.ok
            else None,
            "py_spy_profile": self.profile_path,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectRun:
    servers: tuple[str, ...] = DEFAULT_SERVERS
    clients: int = 1000
    sites: int = 1
    concurrency: int = 200
    client_procs: int = 2
    timeout: float = 120.0
    py_spy: Path | None = None
    py_spy_servers: tuple[str, ...] = ("hubserver",)

    hubserver_src: Path | None = None

    @property
    def parameters(self) -> Mapping[str, JsonValue]:
        return {
            "servers": list(self.servers),
            "hubserver": describe_hubserver(self.hubserver_src),
            "versions": dict(peer_versions()),
            "clients": self.clients,
            "sites": self.sites,
            "in flight": self.concurrency,
            "client processes": self.client_procs,
            "timeout": f"{self.timeout:g} s",
        }

    def execute(self, progress: Progress) -> Outcome:
        rows = [self._row(name, progress) for name in self.servers]
        progress.clear()
        return _outcome(rows)

    def _row(self, name: str, progress: Progress) -> ConnectRow:
        label = f"connect {name} {self.clients}"
        with open_stage(
            SERVERS[name],
            sites=self.sites,
            connections=self.clients,
            client_procs=self.client_procs,
            expected=0,
            label=label,
            progress=progress,
            hubserver_source=self.hubserver_src,
        ) as stage:
            server = stage.server
            time.sleep(0.3)
            rss_before = server.rss_bytes()
            cpu_server = server.cpu_seconds()
            cpu_clients = stage.pool.cpu_each()
            progress.update(f"{label}: connecting", is_milestone=True)
            spy = profile_path = None
            if self.py_spy is not None and name in self.py_spy_servers:
                spy, profile_path = start_py_spy(self.py_spy, f"connect-{name}", server.pid)
            try:
                result = stage.connect(
                    self.clients,
                    rate=0.0,
                    concurrency=self.concurrency,
                    timeout=self.timeout,
                    progress=progress,
                )
            finally:
                stop_py_spy(spy)
            row = ConnectRow(name, result, sites=self.sites, profile_path=profile_path)
            row.cpu_server = server.cpu_seconds() - cpu_server
            row.cpu_clients = [
                a - b for a, b in zip(stage.pool.cpu_each(), cpu_clients, strict=True)
            ]
            time.sleep(0.5)
            row.rss_before = rss_before
            row.rss_after = server.rss_bytes()
            if result.ok == 0:
                raise BenchError(f"{label}: no connection opened: {result.errors}")
        return row


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _outcome(rows: Sequence[ConnectRow]) -> Outcome:
    columns = (
        "server",
        "ok",
        "failed",
        "conn/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "srv CPU",
        "CPU ms/conn",
        "KB/conn",
        "client CPU",
    )
    cells = []
    notes = [
        "connect time: connect() -> handshake answer ({}\\x1e, or Socket.IO's 40); "
        "conn/s: opened / (first connect() -> last handshake answer).",
        "srv CPU: the server's process tree over the openings (from /proc); KB/conn: RSS "
        "growth / opened connections.",
    ]
    for row in rows:
        result = row.result
        durations = row.durations_ms
        rate = result.rate
        cells.append(
            (
                row.server,
                f"{result.ok:,}",
                f"{result.failed:,}",
                "-" if rate is None else f"{rate:,.0f}",
                *(_ms(percentile(durations, q)) for q in QUANTILES),
                _ms(durations[-1] if durations else None),
                f"{row.cpu_server:.2f}s",
                "-" if not result.ok else f"{1000 * row.cpu_server / result.ok:.2f}",
                "-"
                if not result.ok
                else f"{(row.rss_after - row.rss_before) / result.ok / 1024:.1f}",
                f"{sum(row.cpu_clients):.2f}s",
            )
        )
        if result.errors:
            notes.append(f"{row.server}: failures: {result.errors}")
        if row.profile_path:
            notes.append(f"{row.server}: py-spy profile {row.profile_path}")
    table = Table(columns, tuple(cells), right_aligned=frozenset(range(1, len(columns))))
    return Outcome(
        workload={
            "opening": "TCP + HTTP/1.1 upgrade (+ JWT in access_token and a site role, "
            "hubserver) + SignalR JSON handshake (Engine.IO open + 40 for socketio)",
        },
        table=table,
        results=[row.to_json() for row in rows],
        notes=notes,
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    parser.add_argument("--clients", type=int, default=1000, help="connections to open")
    parser.add_argument("--sites", type=int, default=1, help="sites the clients spread over")
    parser.add_argument("--concurrency", type=int, default=200, help="openings in flight")
    parser.add_argument("--client-procs", type=int, default=2, help="load-client processes")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for all openings")
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="record a py-spy profile (raw) of the server while the clients connect",
    )
    parser.add_argument(
        "--py-spy-servers", default="hubserver", help="which servers --py-spy profiles"
    )


def _prepare(args: argparse.Namespace) -> ConnectRun:
    if args.clients < 1 or args.concurrency < 1 or args.client_procs < 1 or args.sites < 1:
        raise ValueError("--clients, --sites, --concurrency, --client-procs must be >= 1")
    return ConnectRun(
        servers=parse_servers(args.servers),
        hubserver_src=args.hubserver_src,
        clients=args.clients,
        sites=args.sites,
        concurrency=args.concurrency,
        client_procs=args.client_procs,
        timeout=args.timeout,
        py_spy=args.py_spy,
        py_spy_servers=parse_servers(args.py_spy_servers),
    )


PROFILE = Profile(
    name="connect",
    summary="N subscribers open as fast as they can: connections/s and connect time",
    add_arguments=_add_arguments,
    prepare=_prepare,
)
