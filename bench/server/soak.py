"""The ``soak`` profile: everything at once for N minutes; does anything leak or break?

One hubserver (``--server``, by default a single process) on 127.0.0.1 with a
free port and dev keys, every subject granted before it starts, then for
``--minutes``, all at the same time:

1. well-behaved subscribers (``--subscribers`` over ``--sites``, the load
   client of ``fanout``) that stay connected, ping every 15 s as the official
   clients do, and count every event of their site exactly (lost, duplicated)
   and its latency (publish time embedded in the event);
2. a publisher at ``--rate`` events/s spread over the sites;
3. churn (``--churn-rate`` connections/s), slow readers (``--slow-readers``)
   and garbage clients (``--garbage-rate`` connections/s), from
   ``bench.server.chaos`` in a process of their own. Churn clients reconnect
   from the last seq they saw, so their losses and repeats across
   reconnections are exact too.

Before the subscribers connect, ``--prefill`` events per site fill the
server's history, so that its growth is not mistaken for a leak. Every
``--sample-interval`` the server's RSS (``/proc``) is printed; at the end the
slope of RSS over time after ``--warmup`` (least squares, MiB per minute),
the counts, and handler crashes: log records of the server (captured to a
file) that say "connection handler failed" or hold a traceback.

The verdict is PASS when the server is alive, nothing was lost or
duplicated, no handler crashed, no well-behaved subscriber was cut off,
every publish was accepted, every complete garbage input was answered or
closed, and the slope is below ``--max-slope`` (not judged with fewer than
three samples, or less than 30 s, after the warm-up).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

from bench.profile import BenchError, Profile
from bench.report import JsonValue, Outcome, Progress, Table, percentile
from bench.server.chaos import ChaosPlan, run_chaos
from bench.server.harness import Counts, Stage, open_stage, parse_rate
from bench.server.procs import ServerGroup
from bench.server.publisher import EventFactory, Publisher, PublishResult, plan_requests
from bench.server.servers import (
    HTTP_PUBLISH,
    PUBLISH_PATH,
    SERVERS,
    add_hubserver_src_argument,
    describe_hubserver,
)

__all__ = [
    "PROFILE",
    "CrashCount",
    "SoakRun",
    "count_crashes",
    "rss_slope",
]

MIB: Final = 1 << 20
#: The slope is judged only over at least this many seconds after the warm-up.
MIN_SLOPE_SECONDS: Final = 30.0
#: The official clients' keep-alive interval (the server's client timeout is 30 s).
PING_INTERVAL: Final = 15.0
#: Subscriber subjects hold at most this many hub connections each (the server's
#: per-subject limit defaults to 100).
CONNECTIONS_PER_SUBJECT: Final = 50
#: Prefill events take n from here on: no subscriber counts them, and their ids
#: never collide with the measured events' (a publish is idempotent on its id).
PREFILL_FIRST_N: Final = 1_000_000_000
PREFILL_BATCH: Final = 100
#: How long the publisher may run past the deadline to finish its plan.
PUBLISH_GRACE: Final = 60.0
SETTLE_QUIET: Final = 5.0
RESUME_WINDOW_WAIT: Final = 1.0
SETTLE_TIMEOUT: Final = 60.0
#: Server options the soak runs with unless ``--server-arg`` says otherwise: ids
#: are remembered for a minute, not ten, so that the dedupe table reaches its
#: steady size within the warm-up rather than growing through a 10-minute run.
DEDUPE_WINDOW: Final = 60.0
DEFAULT_SERVER_ARGS: Final = ("--dedupe-window", f"{DEDUPE_WINDOW:g}")
#: The default warm-up lasts this much longer than the stores take to fill.
WARMUP_MARGIN: Final = 1.2
CRASH_MARKERS: Final = ("connection handler failed", "Traceback (most recent call last)")
SLOW_CLOSE_MARKER: Final = "closing slow client"
#: The layouts the soak can run: it publishes over HTTP.
HUBSERVERS: Final = tuple(
    name for name, kind in SERVERS.items() if kind.is_hubserver and kind.publish == HTTP_PUBLISH
)


# -- pure parts ---------------------------------------------------------------------


def rss_slope(samples: Sequence[tuple[float, int]], after: float) -> float | None:
    """Least-squares slope of RSS over time, in MiB per minute.

    Args:
        samples: (seconds since the start, RSS bytes).
        after: only samples at or after this many seconds count (the warm-up).

    Returns:
        The slope, or None with fewer than three samples to fit or when they
        span less than ``MIN_SLOPE_SECONDS`` (page-sized noise would dominate).
    """
    points = [(seconds / 60.0, rss / MIB) for seconds, rss in samples if seconds >= after]
    if len(points) < 3 or (points[-1][0] - points[0][0]) * 60 < MIN_SLOPE_SECONDS:
        return None
    minutes, mib = zip(*points, strict=True)
    return statistics.linear_regression(minutes, mib).slope


@dataclass(frozen=True, slots=True)
class CrashCount:
    """Crashes found in a server log: how many, and the first one's text."""

    crashes: int
    first: str


def count_crashes(log: str) -> CrashCount:
    """Log records that report a crashed handler or carry a traceback, each counted once.

    A record starts at a line that begins with a timestamp (``2025-...``, the
    server's log format); the lines after it that do not (a traceback) belong
    to it. Lines before the first record form one of their own.
    """
    records: list[list[str]] = []
    for line in log.splitlines():
        if not records or (line[:4].isdigit() and line[4:5] == "-"):
            records.append([line])
        else:
            records[-1].append(line)
    crashed = [
        record
        for record in records
        if any(marker in line for line in record for marker in CRASH_MARKERS)
    ]
    first = "\n".join(crashed[0][:12]) if crashed else ""
    return CrashCount(len(crashed), first)


# -- the run ------------------------------------------------------------------------


@dataclass(slots=True)
class _Publishing:
    """The publisher, on a thread of its own while the main thread samples."""

    publisher: Publisher
    factory: EventFactory
    requests: list[list[tuple[int, int]]]
    rate: float
    deadline: float
    sent: int = 0
    result: PublishResult | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="soak-publisher", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.publisher.run(
                self.requests,
                self.factory,
                rate=self.rate,
                deadline=self.deadline,
                on_progress=self._on_progress,
            )
        except BaseException as exc:  # reported by the main thread, never lost
            self.error = exc

    def _on_progress(self, sent: int) -> None:
        self.sent = sent

    def join(self, timeout: float) -> PublishResult:
        assert self.thread is not None
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise BenchError(f"the publisher did not finish within {timeout:.0f} s")
        if self.error is not None:
            raise BenchError(f"the publisher failed: {self.error!r}") from self.error
        assert self.result is not None
        return self.result


@dataclass(slots=True)
class _Chaos:
    """The chaos process (``bench.server.chaos``) and its pipe."""

    process: multiprocessing.process.BaseProcess
    pipe: Connection

    @classmethod
    def start(cls, plan: ChaosPlan) -> _Chaos:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(target=run_chaos, args=(child, plan), daemon=True)
        process.start()
        child.close()
        return cls(process, parent)

    def report(self, timeout: float) -> dict[str, Any]:
        if not self.pipe.poll(timeout):
            raise BenchError(f"the chaos clients gave no report within {timeout:.0f} s")
        try:
            kind, value = self.pipe.recv()
        except (EOFError, OSError):
            raise BenchError(f"the chaos process died ({self.process.exitcode})") from None
        if kind != "report":
            raise BenchError(f"the chaos process failed:\n{value}")
        return dict(value)

    def stop(self) -> None:
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.pipe.close()


@dataclass(slots=True)
class SoakResult:
    """Everything one soak measured."""

    seconds: float = 0.0
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (s, RSS, fds)
    subscribers: int = 0
    connected: int = 0
    connect_errors: dict[str, int] = field(default_factory=dict)
    planned: int = 0
    published: PublishResult | None = None
    expected_deliveries: int = 0
    counts: Counts = field(default_factory=Counts)
    chaos: dict[str, Any] = field(default_factory=dict)
    crashes: CrashCount = CrashCount(0, "")
    slow_closes_logged: int = 0
    server_exit: str = ""
    slope: float | None = None
    warmup: float = 0.0

    @property
    def churn(self) -> dict[str, Any]:
        return dict(self.chaos.get("churn", {}))

    @property
    def garbage(self) -> dict[str, Any]:
        return dict(self.chaos.get("garbage", {}))

    @property
    def slow(self) -> dict[str, Any]:
        return dict(self.chaos.get("slow", {}))

    @property
    def unanswered(self) -> int:
        return sum(
            counts.get("unanswered", 0) for counts in self.garbage.get("outcomes", {}).values()
        )

    @property
    def publish_failed(self) -> int:
        """Events of the plan that were not accepted (refused, or never sent)."""
        accepted = self.published.events_accepted if self.published is not None else 0
        return self.planned - accepted

    def rss(self) -> tuple[int, int, int]:
        """(start, end, max) RSS in bytes."""
        values = [rss for _, rss, _ in self.samples] or [0]
        return values[0], values[-1], max(values)

    def latency(self, fraction: float) -> float | None:
        return percentile(self.counts.latencies_ms, fraction)


@dataclass(frozen=True, slots=True, kw_only=True)
class SoakRun:
    """One configured ``soak`` run (see the module docstring)."""

    server: str = "hubserver"
    minutes: float = 10.0
    subscribers: int = 200
    sites: int = 20
    rate: float = 200.0
    churn_rate: float = 10.0
    churn_max_life: float = 5.0
    slow_readers: int = 5
    garbage_rate: float = 5.0
    answer_timeout: float = 10.0
    sample_interval: float | None = None
    warmup: float | None = None
    max_slope: float = 1.0
    prefill: int = 1000
    client_procs: int = 2
    sample_every: int = 10
    server_args: tuple[str, ...] = ()
    server_log: Path | None = None
    seed: int = 1
    hubserver_src: Path | None = None

    def __post_init__(self) -> None:
        if self.server not in HUBSERVERS:
            raise ValueError(f"--server must be one of {', '.join(HUBSERVERS)}")
        if self.minutes <= 0 or self.subscribers < 1 or self.sites < 1 or self.rate <= 0:
            raise ValueError("--minutes and --rate must be > 0, --subscribers and --sites >= 1")
        if self.sites > self.subscribers:
            raise ValueError("--sites must not exceed --subscribers")
        if min(self.churn_rate, self.garbage_rate, self.slow_readers, self.prefill) < 0:
            raise ValueError("--churn-rate, --garbage-rate, --slow-readers, --prefill must be >= 0")
        if self.client_procs < 1 or self.sample_every < 1 or self.answer_timeout <= 0:
            raise ValueError("--client-procs, --sample-every >= 1 and --answer-timeout > 0")
        if self.sample_interval is not None and self.sample_interval <= 0:
            raise ValueError("--sample-interval must be > 0")

    @property
    def duration(self) -> float:
        return self.minutes * 60.0

    @property
    def interval(self) -> float:
        """Seconds between RSS samples: 10, or a twelfth of a shorter run."""
        if self.sample_interval is not None:
            return self.sample_interval
        return min(10.0, max(0.5, self.duration / 12))

    @property
    def warmup_seconds(self) -> float:
        """RSS samples before this are left out of the slope.

        By default a fifth of the run, and at least until the bounded stores
        are full with live data: until the live events have replaced every
        prefilled one in the history (prefilled entries are smaller: nobody
        received them, so nothing was encoded for delivery) and the dedupe
        window has filled, RSS rises by design. A 2.5-minute run measured
        +16.6 MiB in the first minute, +4.2 in the second, then flat.
        """
        if self.warmup is not None:
            return self.warmup
        turnover = self.prefill * self.sites / self.rate
        return max(self.duration / 5, WARMUP_MARGIN * max(turnover, DEDUPE_WINDOW))

    @property
    def events_per_site(self) -> int:
        return max(1, math.ceil(self.rate * self.duration / self.sites))

    @property
    def subjects(self) -> int:
        chaos = self._plan((0,), (), "").connections
        return max(1, math.ceil((self.subscribers + chaos) / CONNECTIONS_PER_SUBJECT))

    @property
    def parameters(self) -> Mapping[str, JsonValue]:
        return {
            "server": self.server,
            "hubserver": describe_hubserver(self.hubserver_src),
            "server options": " ".join((*DEFAULT_SERVER_ARGS, *self.server_args)),
            "duration": f"{self.minutes:g} min",
            "subscribers": f"{self.subscribers} over {self.sites} sites, "
            f"ping every {PING_INTERVAL:g} s, {self.subjects} subjects",
            "publish rate": f"{self.rate:g} events/s ({self.events_per_site:,} per site)",
            "prefill": f"{self.prefill} events per site before the subscribers connect",
            "churn": f"{self.churn_rate:g} connections/s, each 0.2-{self.churn_max_life:g} s",
            "slow readers": self.slow_readers,
            "garbage": f"{self.garbage_rate:g} connections/s, "
            f"answer within {self.answer_timeout:g} s",
            "RSS samples": f"every {self.interval:g} s, slope after {self.warmup_seconds:g} s",
            "max slope": f"{self.max_slope:g} MiB/min",
            "client processes": self.client_procs,
            "latency sample": f"1 event in {self.sample_every}",
            "seed": self.seed,
        }

    def _plan(self, ports: Sequence[int], hub_tokens: Sequence[str], token: str) -> ChaosPlan:
        return ChaosPlan(
            ports=tuple(ports),
            duration=self.duration,
            sites=self.sites,
            hub_tokens=tuple(hub_tokens),
            publish_token=token,
            churn_rate=self.churn_rate,
            churn_max_life=self.churn_max_life,
            slow_readers=self.slow_readers,
            garbage_rate=self.garbage_rate,
            answer_timeout=self.answer_timeout,
            seed=self.seed,
        )

    def execute(self, progress: Progress) -> Outcome:
        kind = replace(SERVERS[self.server], extra_args=(*DEFAULT_SERVER_ARGS, *self.server_args))
        label = f"soak {self.server}"
        result = SoakResult(subscribers=self.subscribers, warmup=self.warmup_seconds)
        with open_stage(
            kind,
            sites=self.sites,
            connections=self.subscribers + self._plan((0,), (), "").connections,
            client_procs=self.client_procs,
            expected=self.events_per_site,
            sample_every=self.sample_every,
            ping_interval=PING_INTERVAL,
            label=label,
            progress=progress,
            hubserver_source=self.hubserver_src,
            subjects=self.subjects,
        ) as stage:
            self._soak(stage, result, progress)
            self._read_logs(stage.server, result)
        progress.clear()
        return _outcome(self, result)

    def _soak(self, stage: Stage, result: SoakResult, progress: Progress) -> None:
        server, credentials = stage.server, stage.credentials
        factory = EventFactory(self.sites, self.seed)
        try:
            # One keep-alive connection, always in use: spares would idle past the
            # server's --http-idle-timeout and be closed under a later request.
            publisher = Publisher(
                "127.0.0.1", server.port, PUBLISH_PATH, credentials.publish_token, connections=1
            )
        except OSError as exc:
            raise BenchError(f"{stage.label}: the publisher cannot connect: {exc}") from exc
        chaos: _Chaos | None = None
        try:
            self._prefill(stage, publisher, factory, progress)
            progress.update(f"{stage.label}: connecting {self.subscribers}", is_milestone=True)
            connected = stage.connect(
                self.subscribers,
                rate=1000.0,
                concurrency=100,
                timeout=max(60.0, self.subscribers / 100),
                progress=progress,
            )
            result.connected = connected.ok
            result.connect_errors = dict(connected.errors)
            if not connected.ok:
                raise BenchError(f"{stage.label}: no subscriber connected: {connected.errors}")

            # Past the server's resume window (0.5 s by default), in which a new
            # connection's first events wait for a Resume that may come.
            time.sleep(RESUME_WINDOW_WAIT)
            requests = plan_requests(self.sites, 1, self.events_per_site, 1)
            result.planned = len(requests)
            started = time.monotonic()
            publishing = _Publishing(
                publisher, factory, requests, self.rate, started + self.duration + PUBLISH_GRACE
            )
            plan = self._plan(server.ports, credentials.hub_tokens, credentials.publish_token or "")
            chaos = _Chaos.start(plan)
            publishing.start()
            progress.update(f"{stage.label}: soaking {self.minutes:g} min", is_milestone=True)
            self._sample(stage, result, publishing, started, progress)
            result.published = publishing.join(PUBLISH_GRACE + 30)
            result.chaos = chaos.report(plan.answer_timeout + 60)
            result.seconds = time.monotonic() - started
            self._settle(stage, result, progress)
        finally:
            publisher.close()
            if chaos is not None:
                chaos.stop()

    def _prefill(
        self, stage: Stage, publisher: Publisher, factory: EventFactory, progress: Progress
    ) -> None:
        if not self.prefill:
            return
        progress.update(f"{stage.label}: prefilling history", is_milestone=True)
        requests = plan_requests(self.sites, PREFILL_FIRST_N, self.prefill, PREFILL_BATCH)
        done = publisher.run(requests, factory, deadline=time.monotonic() + 300)
        if done.failed or done.errors:
            raise BenchError(f"{stage.label}: prefill failed: {dict(done.errors)}")

    def _sample(
        self,
        stage: Stage,
        result: SoakResult,
        publishing: _Publishing,
        started: float,
        progress: Progress,
    ) -> None:
        """Sample RSS every interval until the deadline (or the server's death), printing each."""
        server = stage.server
        end = started + self.duration
        progress.clear()
        print(
            f"\n{'seconds':>8}  {'RSS MiB':>8}  {'fds':>6}  {'published':>10}  "
            f"{'delivered':>11}  {'subscribers open':>16}",
            flush=True,
        )
        next_at = started
        while True:
            now = time.monotonic()
            if now < next_at:
                time.sleep(next_at - now)
            elapsed = min(time.monotonic() - started, self.duration)
            if not server.is_alive():
                result.server_exit = server.exit_status()
                print(f"{elapsed:8.0f}  server exited: {result.server_exit}", flush=True)
                return
            rss, fds = server.rss_bytes(), _descriptors(server)
            result.samples.append((elapsed, rss, fds))
            totals = stage.totals()
            progress.clear()
            print(
                f"{elapsed:8.0f}  {rss / MIB:8.1f}  {fds:6d}  {publishing.sent:10,}  "
                f"{totals['received']:11,}  {totals['open']:16,}",
                flush=True,
            )
            if next_at >= end:
                return
            next_at = min(next_at + self.interval, end)
            progress.update(f"{stage.label}: {elapsed:.0f}/{self.duration:g} s")

    def _settle(self, stage: Stage, result: SoakResult, progress: Progress) -> None:
        """Wait for the last deliveries, then collect the subscribers' counts."""
        accepted = result.published.events_accepted if result.published else 0
        per_subscriber = accepted / self.sites  # the plan is round-robin over the sites
        result.expected_deliveries = round(per_subscriber * result.connected)
        if stage.server.is_alive():
            stage.wait_received(
                result.expected_deliveries,
                key="received",
                quiet_timeout=SETTLE_QUIET,
                deadline=time.monotonic() + SETTLE_TIMEOUT,
                progress=progress,
                what="last deliveries",
            )
        result.counts = stage.report()
        if not stage.server.is_alive():
            result.server_exit = result.server_exit or stage.server.exit_status()
        result.slope = rss_slope([(s, rss) for s, rss, _ in result.samples], self.warmup_seconds)

    def _read_logs(self, server: ServerGroup, result: SoakResult) -> None:
        texts = []
        for node in server.nodes:
            with contextlib.suppress(OSError):
                texts.append(node.log_path.read_text(encoding="utf-8", errors="replace"))
        log = "\n".join(texts)
        result.crashes = count_crashes(log)
        result.slow_closes_logged = log.count(SLOW_CLOSE_MARKER)
        if self.server_log is not None:
            self.server_log.write_text(log, encoding="utf-8")


def _descriptors(server: ServerGroup) -> int:
    """Open file descriptors of the server's processes (a leak shows here first)."""
    total = 0
    for pid in server.tree():
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


# -- the outcome --------------------------------------------------------------------


def _checks(run: SoakRun, result: SoakResult) -> list[tuple[str, str, str, bool | None]]:
    churn = result.churn
    lost = result.counts.lost + churn.get("lost", 0)
    duplicated = result.counts.duplicated + churn.get("duplicated", 0)
    slope = result.slope
    return [
        ("server alive", result.server_exit or "yes", "yes", not result.server_exit),
        ("lost (subscribers + churn)", f"{lost:,}", "0", lost == 0),
        ("duplicated (subscribers + churn)", f"{duplicated:,}", "0", duplicated == 0),
        (
            "misrouted (another site's events)",
            f"{result.counts.misrouted:,}",
            "0",
            result.counts.misrouted == 0,
        ),
        ("handler crashes", f"{result.crashes.crashes}", "0", result.crashes.crashes == 0),
        (
            "subscribers cut off",
            f"{result.counts.closed_by_server + result.subscribers - result.connected}",
            "0",
            result.counts.closed_by_server == 0 and result.connected == result.subscribers,
        ),
        ("publish failures", f"{result.publish_failed:,}", "0", result.publish_failed == 0),
        ("garbage unanswered", f"{result.unanswered:,}", "0", result.unanswered == 0),
        (
            "RSS slope",
            "-" if slope is None else f"{slope:+.2f} MiB/min",
            f"< {run.max_slope:g} MiB/min",
            None if slope is None else slope < run.max_slope,
        ),
    ]


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _summary(counts: Mapping[str, Any]) -> str:
    return ", ".join(f"{key} {_count(value)}" for key, value in counts.items()) or "-"


def _outcome(run: SoakRun, result: SoakResult) -> Outcome:
    start, end, peak = result.rss()
    churn, slow, garbage = result.churn, result.slow, result.garbage
    published = result.published
    p50, p99 = result.latency(0.5), result.latency(0.99)
    slope = result.slope
    garbage_outcomes: dict[str, int] = {}
    for counts in garbage.get("outcomes", {}).values():
        for outcome, count in counts.items():
            garbage_outcomes[outcome] = garbage_outcomes.get(outcome, 0) + count
    rows = [
        ("RSS start / end / max", f"{start / MIB:.1f} / {end / MIB:.1f} / {peak / MIB:.1f} MiB"),
        (
            f"RSS slope after {result.warmup:g} s",
            "-" if slope is None else f"{slope:+.2f} MiB/min",
        ),
        (
            "server fds start / end",
            f"{result.samples[0][2]} / {result.samples[-1][2]}" if result.samples else "-",
        ),
        (
            "events published",
            f"{published.events_accepted:,} of {result.planned:,}" if published else "-",
        ),
        ("subscribers connected", f"{result.connected} of {result.subscribers}"),
        ("deliveries", f"{result.counts.received:,} of {result.expected_deliveries:,}"),
        ("lost / duplicated", f"{result.counts.lost:,} / {result.counts.duplicated:,}"),
        ("latency p50 / p99", f"{_ms(p50)} / {_ms(p99)} ms"),
        (
            "churn connections",
            f"{churn.get('opened', 0):,} ({_summary(churn.get('ends', {}))}; "
            f"resumed {_summary(churn.get('resumes', {}))})",
        ),
        (
            "churn events / lost / duplicated",
            f"{churn.get('events', 0):,} / {churn.get('lost', 0):,} / "
            f"{churn.get('duplicated', 0):,}",
        ),
        (
            "slow readers opened / closed",
            f"{slow.get('opened', 0)} / {slow.get('closed_by_server', 0)} "
            f"(server log: {result.slow_closes_logged} slow-client closes)",
        ),
        (
            "garbage connections",
            f"{garbage.get('connections', 0):,} ({_summary(garbage_outcomes)})",
        ),
        ("handler crashes", str(result.crashes.crashes)),
    ]
    checks = _checks(run, result)
    verdicts = [passed for *_, passed in checks if passed is not None]
    notes = _notes(result)
    return Outcome(
        workload={
            "measured": f"{result.seconds:.0f} s",
            "RSS samples": len(result.samples),
        },
        table=Table(("metric", "value"), tuple(rows)),
        results=[_to_json(run, result)],
        notes=notes,
        bar="nothing lost or duplicated, no handler crash, nobody well-behaved cut off, "
        "every publish accepted, every bad input answered or closed, "
        f"RSS slope < {run.max_slope:g} MiB/min",
        passed=all(verdicts),
        checks=Table(
            ("check", "value", "target", "verdict"),
            tuple(
                (name, value, target, "n/a" if passed is None else "PASS" if passed else "FAIL")
                for name, value, target, passed in checks
            ),
        ),
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _notes(result: SoakResult) -> list[str]:
    churn, slow, garbage = result.churn, result.slow, result.garbage
    notes = [
        "RSS is VmRSS summed over the server's process tree; the slope is a least-squares "
        "fit of the samples after the warm-up.",
        "handler crashes: server log records saying 'connection handler failed' or holding "
        "a traceback.",
    ]
    if result.connect_errors:
        notes.append(f"subscribers that did not connect: {result.connect_errors}")
    if result.counts.close_reasons:
        notes.append(f"subscribers cut off by the server: {result.counts.close_reasons}")
    if result.counts.foreign:
        notes.append(
            f"{result.counts.foreign} deliveries were of events the subscribers did not expect"
        )
    if result.published is not None and result.published.errors:
        notes.append(f"publish errors: {dict(result.published.errors)}")
    for key, label in (
        ("failed", "churn openings failed"),
        ("closed_by_server", "churn connections ended by the server"),
        ("completion_errors", "churn Resume errors"),
    ):
        if churn.get(key):
            notes.append(f"{label}: {churn[key]}")
    if churn.get("forgiven_by_gap"):
        notes.append(f"churn: {churn['forgiven_by_gap']} seqs announced gone by a Gap")
    if slow.get("failed"):
        notes.append(f"slow readers that could not open: {slow['failed']}")
    for kind, counts in garbage.get("outcomes", {}).items():
        statuses = garbage.get("statuses", {}).get(kind)
        notes.append(
            f"garbage {kind}: {_summary(counts)}"
            + (f"; HTTP statuses {_summary(statuses)}" if statuses else "")
        )
    if garbage.get("accepted_publishes"):
        notes.append(f"garbage publishes accepted (2xx): {garbage['accepted_publishes']}")
    for kind, example in garbage.get("examples", {}).items():
        what = kind if kind == "accepted publish" else f"unanswered {kind}"
        notes.append(f"{what}, e.g. {example}")
    if result.crashes.first:
        notes.append("first crash in the server log:\n" + result.crashes.first)
    return notes


def _to_json(run: SoakRun, result: SoakResult) -> dict[str, JsonValue]:
    start, end, peak = result.rss()
    published = result.published
    lat = result.counts.latencies_ms
    return {
        "server": run.server,
        "seconds": result.seconds,
        "rss_samples": [
            {"seconds": s, "rss_bytes": rss, "fds": fds} for s, rss, fds in result.samples
        ],
        "rss_bytes": {"start": start, "end": end, "max": peak},
        "rss_slope_mib_per_minute": result.slope,
        "warmup_seconds": result.warmup,
        "subscribers": result.subscribers,
        "connected": result.connected,
        "connect_errors": dict(result.connect_errors),
        "planned_events": result.planned,
        "published_events": published.events_accepted if published else 0,
        "publish_failed": result.publish_failed,
        "publish_errors": dict(published.errors) if published else {},
        "deliveries": result.counts.received,
        "expected_deliveries": result.expected_deliveries,
        "lost": result.counts.lost,
        "duplicated": result.counts.duplicated,
        "foreign": result.counts.foreign,
        "misrouted": result.counts.misrouted,
        "closed_by_server": result.counts.closed_by_server,
        "close_reasons": dict(result.counts.close_reasons),
        "latency_ms": {
            "samples": len(lat),
            "p50": result.latency(0.5),
            "p99": result.latency(0.99),
            "max": lat[-1] if lat else None,
        },
        "churn": result.churn,
        "slow_readers": result.slow,
        "garbage": result.garbage,
        "handler_crashes": result.crashes.crashes,
        "first_crash": result.crashes.first or None,
        "slow_closes_logged": result.slow_closes_logged,
        "server_exit": result.server_exit or None,
    }


# -- the command line ---------------------------------------------------------------


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_hubserver_src_argument(parser)
    parser.add_argument(
        "--server",
        default="hubserver",
        help=f"the layout to soak: {', '.join(HUBSERVERS)}",
    )
    parser.add_argument(
        "--minutes", type=float, default=10.0, help="how long (fractions allowed: 0.5)"
    )
    parser.add_argument("--subscribers", type=int, default=200, help="well-behaved subscribers")
    parser.add_argument("--sites", type=int, default=20, help="sites they spread over")
    parser.add_argument(
        "--rate", type=parse_rate, default=200.0, help="events published per second (200 or 200/s)"
    )
    parser.add_argument("--churn-rate", type=float, default=10.0, help="churn connections/s")
    parser.add_argument(
        "--churn-max-life", type=float, default=5.0, help="longest a churn connection lasts (s)"
    )
    parser.add_argument("--slow-readers", type=int, default=5, help="slow readers at a time")
    parser.add_argument("--garbage-rate", type=float, default=5.0, help="garbage connections/s")
    parser.add_argument(
        "--answer-timeout",
        type=float,
        default=10.0,
        help="seconds a complete bad input may wait for an answer or a close",
    )
    parser.add_argument(
        "--sample-interval",
        type=float,
        default=None,
        help="seconds between RSS samples (default 10, or a twelfth of a shorter run)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of samples left out of the slope (default: a fifth of the run, and "
        "at least 1.2x the time the history and the dedupe window take to fill)",
    )
    parser.add_argument(
        "--max-slope", type=float, default=1.0, help="RSS slope for a PASS (MiB per minute)"
    )
    parser.add_argument(
        "--prefill", type=int, default=1000, help="events per site published before the soak"
    )
    parser.add_argument("--client-procs", type=int, default=2, help="load-client processes")
    parser.add_argument("--sample-every", type=int, default=10, help="latency: sample 1 event in N")
    parser.add_argument(
        "--server-arg",
        dest="server_args",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for `hubserver serve` (repeatable; use --server-arg=--flag)",
    )
    parser.add_argument(
        "--server-log", type=Path, metavar="FILE", help="keep the server's log in FILE"
    )
    parser.add_argument("--seed", type=int, default=1)


def _prepare(args: argparse.Namespace) -> SoakRun:
    # Every option's dest is the name of a SoakRun field.
    options = {f.name: getattr(args, f.name) for f in fields(SoakRun) if hasattr(args, f.name)}
    options["server_args"] = tuple(options["server_args"])
    return SoakRun(**options)


PROFILE = Profile(
    name="soak",
    summary="churn, publishing, slow readers and garbage for N minutes: RSS slope, "
    "lost deliveries, handler crashes, p99 latency (not run in CI)",
    add_arguments=_add_arguments,
    prepare=_prepare,
)
