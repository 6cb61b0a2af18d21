"""What every server profile does around its measurement.

A ``Stage`` is one server under test plus its load clients, from a fresh
temporary directory to the last killed process: start the server, start
the client processes, open the subscriber connections (paced, so the listen
backlog is never overrun; split evenly over the nodes of a multi-node
server), wait for deliveries, and tear everything down.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.profile import BenchError
from bench.report import Progress
from bench.server.loadclient import ClientOptions, raise_fd_limit
from bench.server.procs import ClientPool, ServerGroup
from bench.server.servers import Credentials, ServerKind, launch

__all__ = [
    "ConnectResult",
    "Counts",
    "Stage",
    "open_stage",
    "parse_list",
    "parse_rate",
    "start_py_spy",
    "stop_py_spy",
]

FD_HEADROOM: Final = 1024
POLL_INTERVAL: Final = 0.1


def parse_rate(text: str) -> float:
    """``200/s`` or ``200`` -> 200.0."""
    value = float(text.strip().removesuffix("/s"))
    if value <= 0:
        raise ValueError("a rate must be positive")
    return value


def parse_list(text: str) -> tuple[int, ...]:
    """``1000,5000`` -> (1000, 5000); every item positive."""
    values = tuple(int(item) for item in text.split(",") if item.strip())
    if not values or any(value <= 0 for value in values):
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


@dataclass(slots=True)
class ConnectResult:
    """How opening the subscribers went."""

    requested: int
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    durations_ns: list[int] = field(default_factory=list)
    seconds: float = 0.0  # first connect started -> last one open

    @property
    def rate(self) -> float | None:
        return self.ok / self.seconds if self.seconds > 0 else None


@dataclass(slots=True)
class Counts:
    """The load clients' exact counts, summed over their processes (``Stage.report``).

    ``received`` counts every event since the connections opened, ``measured``
    those since the last ``("measure",)``.
    """

    measured: int = 0
    received: int = 0
    lost: int = 0
    duplicated: int = 0
    foreign: int = 0
    #: events delivered to a subscriber of another site than theirs
    misrouted: int = 0
    #: site -> (lost, duplicated, misrouted, foreign), summed over its subscribers,
    #: for the sites where any is not 0
    problem_sites: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    frames: int = 0
    reads: int = 0
    closed_by_server: int = 0
    close_reasons: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    last_delivery_ns: int = 0

    @classmethod
    def of(cls, reports: list[dict[str, Any]]) -> Counts:
        counts = cls()
        latencies: array[int] = array("q")
        for report in reports:
            counts.measured += report["measured"]
            counts.received += report["received_all"]
            counts.lost += report["lost"]
            counts.duplicated += report["duplicated"]
            counts.foreign += report["foreign"]
            counts.misrouted += report["misrouted"]
            for site, values in report["problem_sites"].items():
                lost, duplicated, misrouted, foreign = counts.problem_sites.get(site, (0, 0, 0, 0))
                counts.problem_sites[site] = (
                    lost + values[0],
                    duplicated + values[1],
                    misrouted + values[2],
                    foreign + values[3],
                )
            counts.frames += report["frames"]
            counts.reads += report["reads"]
            counts.closed_by_server += report["closed_by_server"]
            for reason, count in report["close_reasons"].items():
                counts.close_reasons[reason] = counts.close_reasons.get(reason, 0) + count
            latencies.frombytes(report["latencies_ns"])
            counts.last_delivery_ns = max(counts.last_delivery_ns, report["last_delivery_ns"])
        counts.latencies_ms = sorted(value / 1e6 for value in latencies)
        return counts


@dataclass(slots=True)
class Stage:
    """A running server, its credentials and its load clients."""

    kind: ServerKind
    server: ServerGroup
    credentials: Credentials
    pool: ClientPool
    sites: int
    label: str

    def connect(
        self,
        connections: int,
        *,
        rate: float,
        concurrency: int,
        timeout: float,
        progress: Progress,
    ) -> ConnectResult:
        """Open ``connections`` subscribers, round-robin over sites and client processes.

        On a multi-node server the subscribers of every site are split
        evenly over the nodes (the site's k-th goes to node k mod nodes). ``rate``
        (connections/s, 0 for as fast as possible) and ``concurrency``
        (openings in flight) are for the whole pool.
        """
        procs = len(self.pool.pipes)
        ports = self.server.ports
        targets: list[list[tuple[int, str, int]]] = [[] for _ in range(procs)]
        for index in range(connections):
            site = index % self.sites
            node = (index // self.sites) % len(ports)  # the site's k-th subscriber
            target = self.kind.hub_target(site, self.credentials, subject=index)
            targets[index % procs].append((site, target, ports[node]))
        for index in range(procs):
            self.pool.send(
                index,
                ("connect", targets[index], rate / procs, max(1, concurrency // procs)),
            )
        deadline = time.monotonic() + timeout
        answers = None
        while answers is None:
            if time.monotonic() > deadline:
                raise BenchError(f"{self.label}: opening {connections} connections took too long")
            time.sleep(POLL_INTERVAL)
            answers = self.pool.poll("connected")
            if answers is None:
                self.pool.broadcast(("progress",))
                totals = self.pool.collect("progress", 10.0)
                opened = sum(t["open"] for t in totals)
                progress.update(f"{self.label}: connecting {opened}/{connections}")
        result = ConnectResult(requested=connections)
        first = min(a["started_ns"] for a in answers)
        last = max(a["last_open_ns"] for a in answers)
        for answer in answers:
            result.ok += answer["ok"]
            result.failed += answer["failed"]
            result.durations_ns.extend(answer["durations_ns"])
            for reason, count in answer["errors"].items():
                result.errors[reason] = result.errors.get(reason, 0) + count
        result.seconds = max(0.0, (last - first) / 1e9) if result.ok else 0.0
        return result

    def report(self, timeout: float = 60.0) -> Counts:
        """The exact counts of every subscriber so far."""
        return Counts.of(self.pool.ask("report", timeout=timeout))

    def totals(self) -> dict[str, Any]:
        """Summed running totals of the client processes."""
        answers = self.pool.ask("progress", timeout=10.0)
        return {
            "received": sum(a["received"] for a in answers),
            "measured": sum(a["measured"] for a in answers),
            "open": sum(a["open"] for a in answers),
            "closed_by_server": sum(a["closed_by_server"] for a in answers),
            "last_delivery_ns": max(a["last_delivery_ns"] for a in answers),
        }

    def wait_received(
        self,
        expected: int,
        *,
        key: str,
        quiet_timeout: float,
        deadline: float,
        progress: Progress,
        what: str,
    ) -> dict[str, Any]:
        """Poll until ``totals()[key]`` reaches ``expected``, stops moving for
        ``quiet_timeout`` seconds, or ``deadline`` (monotonic) passes."""
        last_value = -1
        last_change = time.monotonic()
        while True:
            totals = self.totals()
            now = time.monotonic()
            value = totals[key]
            if value != last_value:
                last_value, last_change = value, now
            progress.update(f"{self.label}: {what} {value:,}/{expected:,}")
            if value >= expected or now - last_change > quiet_timeout or now > deadline:
                return totals
            if not self.server.is_alive():
                return totals
            time.sleep(POLL_INTERVAL)


@contextlib.contextmanager
def open_stage(
    kind: ServerKind,
    *,
    sites: int,
    connections: int,
    client_procs: int,
    expected: int,
    sample_every: int = 10,
    ping_interval: float | None = 10.0,
    label: str,
    progress: Progress,
    hubserver_source: Path | None = None,
    subjects: int = 1,
) -> Iterator[Stage]:
    """Start ``kind`` and ``client_procs`` load clients; stop both on the way out.

    ``subjects``: subscriber subjects to mint tokens for (``Stage.connect``
    deals them out round-robin).
    """
    fd_limit = connections + FD_HEADROOM
    raise_fd_limit(fd_limit + 64)
    work_dir = Path(tempfile.mkdtemp(prefix=f"bench-{kind.name}-"))
    server: ServerGroup | None = None
    pool: ClientPool | None = None
    try:
        progress.update(f"{label}: starting {kind.name}", is_milestone=True)
        server, credentials = launch(
            kind,
            work_dir,
            sites=sites,
            fd_limit=fd_limit,
            hubserver_source=hubserver_source,
            subjects=subjects,
        )
        options = ClientOptions(
            host="127.0.0.1",
            port=server.port,
            dialect=kind.dialect,
            expected=expected,
            sample_every=sample_every,
            ping_interval=ping_interval,
            fd_limit=connections // max(1, client_procs) + FD_HEADROOM,
        )
        pool = ClientPool.start(client_procs, options)
        yield Stage(kind, server, credentials, pool, sites, label)
    except BenchError as exc:
        tail = server.log_tail() if server is not None else ""
        if tail and "server log" not in str(exc):
            raise BenchError(f"{exc}\n{kind.name} server log (tail):\n{tail}") from exc
        raise
    finally:
        if pool is not None:
            pool.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


def _py_spy_binary() -> str:
    candidate = Path(sys.executable).with_name("py-spy")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("py-spy")
    if found is None:
        raise BenchError("--py-spy needs py-spy (pip install py-spy)")
    return found


def start_py_spy(directory: Path, name: str, pid: int) -> tuple[subprocess.Popen[bytes], str]:
    """Record ``pid`` and its subprocesses (the workers of ``--workers``) with py-spy
    (raw collapsed stacks, 250 Hz, not pausing it) into ``directory/name.txt`` until
    ``stop_py_spy``; returns the recorder and the path.

    ``python -m bench.server.pyspy_summary FILE`` summarises the result.
    """
    directory.mkdir(parents=True, exist_ok=True)
    output = directory / f"{name}.txt"
    with (directory / f"{name}.log").open("wb") as log:
        spy = subprocess.Popen(
            [
                _py_spy_binary(),
                "record",
                "--pid",
                str(pid),
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "--subprocesses",
                "--output",
                str(output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    return spy, str(output)


def stop_py_spy(spy: subprocess.Popen[bytes] | None) -> None:
    """Stop a recorder (SIGINT makes py-spy write its file)."""
    if spy is None:
        return
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(timeout=5)
