"""One load-client process: many WebSocket subscribers in a tight epoll loop.

The bench starts several of these (``ClientPool``) so that reading the
fan-out never waits on one core. Each process speaks to its parent over a
``multiprocessing`` pipe, and only ever answers a command (it never sends on
its own, so the pipe cannot fill up while the parent is busy publishing):

- ``("connect", targets, rate, concurrency)``: open one connection per
  ``(site, target, port)`` (the port of the node to connect to) at a bounded
  rate and concurrency; answers ``("connected", summary)`` once
  every connection is open or failed.
- ``("progress",)``: answers the running totals.
- ``("measure",)``: forget latency samples and remember the counts: the
  measured phase starts now.
- ``("report",)``: answers the exact counts (in all, and per site for the
  sites where something was lost, duplicated, misrouted or foreign), the
  data frames and reads of the measured phase, and the latency samples.
- ``("close",)``: close everything and exit.

Sockets are non-blocking and level-triggered under ``select.epoll``; frames
are parsed from bytes and events counted without parsing JSON
(``bench.server.wire``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import select
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final

from bench.server.wire import (
    OP_TEXT,
    SIGNALR_PING,
    Dialect,
    OpeningError,
    Receiver,
    Tally,
    client_frame,
    feed_opening,
    opening_frames,
    parse_upgrade_response,
    upgrade_request,
)

__all__ = ["ClientOptions", "raise_fd_limit", "run_client"]

RECEIVE_BYTES: Final = 1 << 20
CONNECTING: Final = 0
UPGRADING: Final = 1
OPENING: Final = 2
OPEN: Final = 3
CLOSED: Final = 4


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE towards ``wanted`` (the hard limit too, if allowed); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """How a client process behaves; the same for every process of a pool.

    Attributes:
        host, port: the server (``connect`` names each connection's port).
        dialect: SignalR or Engine.IO.
        expected: sequences per site that will be published (bitmap size).
        sample_every: read the publish time of one event in this many.
        ping_interval: seconds between the client's own SignalR Pings
            (keeps a hub's client timeout happy); None sends none.
        connect_timeout: seconds one connection may take to open.
        fd_limit: RLIMIT_NOFILE to ask for.
    """

    host: str
    port: int
    dialect: Dialect
    expected: int = 0
    sample_every: int = 10
    ping_interval: float | None = 10.0
    connect_timeout: float = 30.0
    fd_limit: int = 65536


@dataclass(slots=True, eq=False)
class _Conn:
    sock: socket.socket
    site: int
    target: str
    port: int
    tally: Tally
    state: int = CONNECTING
    started_ns: int = 0
    opened_ns: int = 0
    accept: bytes = b""
    head: bytes = b""
    out: bytes = b""
    is_writing: bool = False
    next_ping_ns: int = 0


@dataclass(slots=True)
class _Batch:
    """One ``connect`` command in progress."""

    pending: deque[tuple[int, str, int]]
    rate: float  # connections per second, 0 = unlimited
    concurrency: int
    started_ns: int
    issued: int = 0
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    durations_ns: list[int] = field(default_factory=list)
    last_open_ns: int = 0


class _Client:
    def __init__(self, pipe: Connection, options: ClientOptions) -> None:
        self.pipe = pipe
        self.options = options
        self.receiver = Receiver(options.dialect, options.sample_every)
        self.epoll = select.epoll()
        self.conns: dict[int, _Conn] = {}
        self.in_flight = 0
        self.batch: _Batch | None = None
        self.closed_by_server = 0
        self.close_reasons: dict[str, int] = {}
        self.measured_from = 0  # total received when the measured phase began
        self.frames_from = 0  # data frames and reads when the measured phase began
        self.reads_from = 0
        self.running = True
        self.ping_frame = client_frame(OP_TEXT, SIGNALR_PING)
        self.ping_interval_ns = (
            int(options.ping_interval * 1e9)
            if options.ping_interval and options.dialect is Dialect.SIGNALR
            else 0
        )

    # -- commands ------------------------------------------------------------------

    def on_command(self) -> None:
        while self.pipe.poll():
            try:
                message = self.pipe.recv()
            except EOFError:
                self.running = False
                return
            kind = message[0]
            if kind == "connect":
                targets, rate, concurrency = message[1], message[2], message[3]
                self.batch = _Batch(
                    pending=deque(targets),
                    rate=rate,
                    concurrency=max(1, concurrency),
                    started_ns=time.monotonic_ns(),
                )
                if not targets:
                    self.finish_batch()
            elif kind == "progress":
                self.pipe.send(("progress", self.totals()))
            elif kind == "measure":
                self.receiver.clear_samples()
                self.measured_from = sum(c.tally.received for c in self.conns.values())
                self.frames_from, self.reads_from = self.receiver.frames, self.receiver.reads
                self.pipe.send(("measuring", self.totals()))
            elif kind == "report":
                self.pipe.send(("report", self.report()))
            elif kind == "close":
                self.close_all()
                self.pipe.send(("closed", self.totals()))
                self.running = False
                return

    def totals(self) -> dict[str, Any]:
        received = 0
        is_open = 0
        for conn in self.conns.values():
            received += conn.tally.received
            is_open += conn.state == OPEN
        return {
            "received": received,
            "measured": received - self.measured_from,
            "open": is_open,
            "closed_by_server": self.closed_by_server,
            "last_delivery_ns": self.receiver.last_delivery_ns,
            "connecting": self.in_flight + (len(self.batch.pending) if self.batch else 0),
        }

    def report(self) -> dict[str, Any]:
        lost = duplicated = foreign = misrouted = received = 0
        # Per site, only where something is wrong: site -> [lost, duplicated, misrouted, foreign].
        problem_sites: dict[int, list[int]] = {}
        for conn in self.conns.values():
            tally = conn.tally
            if not tally.is_open:
                continue
            counts = (tally.lost, tally.duplicated, tally.misrouted, tally.foreign)
            lost += counts[0]
            duplicated += counts[1]
            misrouted += counts[2]
            foreign += counts[3]
            received += tally.received
            if any(counts):
                site = problem_sites.setdefault(conn.site, [0, 0, 0, 0])
                for index, count in enumerate(counts):
                    site[index] += count
        return {
            **self.totals(),
            "connections": sum(1 for c in self.conns.values() if c.tally.is_open),
            "lost": lost,
            "duplicated": duplicated,
            "foreign": foreign,
            "misrouted": misrouted,
            "problem_sites": problem_sites,
            "received_all": received,
            "frames": self.receiver.frames - self.frames_from,
            "reads": self.receiver.reads - self.reads_from,
            "close_reasons": dict(self.close_reasons),
            "latencies_ns": self.receiver.latencies_ns.tobytes(),
        }

    def finish_batch(self) -> None:
        batch = self.batch
        assert batch is not None
        self.pipe.send(
            (
                "connected",
                {
                    "ok": batch.ok,
                    "failed": batch.failed,
                    "errors": batch.errors,
                    "durations_ns": batch.durations_ns,
                    "started_ns": batch.started_ns,
                    "last_open_ns": batch.last_open_ns,
                },
            )
        )
        self.batch = None

    # -- connecting ----------------------------------------------------------------

    def start_connects(self, now_ns: int) -> None:
        batch = self.batch
        if batch is None:
            return
        options = self.options
        while batch.pending and self.in_flight < batch.concurrency:
            if batch.rate > 0 and batch.issued >= (now_ns - batch.started_ns) * batch.rate / 1e9:
                break
            site, target, port = batch.pending.popleft()
            batch.issued += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, site, target, port, Tally(options.expected, site=site))
            conn.started_ns = time.monotonic_ns()
            self.in_flight += 1
            self.conns[sock.fileno()] = conn
            code = sock.connect_ex((options.host, port))
            if code not in (0, errno.EINPROGRESS):
                self.fail(conn, f"connect: {os.strerror(code)}")
                continue
            self.epoll.register(sock.fileno(), select.EPOLLOUT)

    def fail(self, conn: _Conn, reason: str) -> None:
        batch = self.batch
        if conn.state != CLOSED:
            if conn.state < OPEN:
                self.in_flight -= 1
            self.drop(conn)
        if batch is not None:
            batch.failed += 1
            key = reason[:120]
            batch.errors[key] = batch.errors.get(key, 0) + 1
            self.check_batch_done()

    def check_batch_done(self) -> None:
        batch = self.batch
        if batch is not None and not batch.pending and self.in_flight == 0:
            self.finish_batch()

    def drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd >= 0:
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(fd)
        conn.sock.close()
        conn.state = CLOSED
        # Keep its tally (the counts) but not under a reusable fd number.
        self.conns.pop(fd, None)
        self.conns[-id(conn)] = conn

    def on_connecting(self, conn: _Conn, events: int) -> None:
        sock = conn.sock
        if conn.state == CONNECTING:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self.fail(conn, f"connect: {os.strerror(code)}")
                return
            request, conn.accept = upgrade_request(self.options.host, conn.port, conn.target)
            conn.state = UPGRADING
            self.epoll.modify(sock.fileno(), select.EPOLLIN)
            self.send(conn, request)
            return
        try:
            data = sock.recv(RECEIVE_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(conn, f"recv: {exc.strerror or exc}")
            return
        if not data:
            self.fail(conn, "closed by the server during the opening")
            return
        dialect = self.options.dialect
        try:
            if conn.state == UPGRADING:
                conn.head += data
                response = parse_upgrade_response(conn.head)
                if response is None:
                    return
                conn.head = b""
                if response.status != 101:
                    line = response.rest[:80].decode("utf-8", "replace").strip()
                    self.fail(conn, f"HTTP {response.status} {line}".strip())
                    return
                if response.headers.get(b"sec-websocket-accept") != conn.accept:
                    self.fail(conn, "wrong Sec-WebSocket-Accept")
                    return
                conn.state = OPENING
                self.send(conn, opening_frames(dialect))
                data = response.rest
                if not data:
                    return
            is_open, replies, rest = feed_opening(dialect, conn.tally, data)
        except OpeningError as exc:
            self.fail(conn, str(exc))
            return
        if replies:
            self.send(conn, replies)
        if not is_open:
            return
        now = time.monotonic_ns()
        conn.state = OPEN
        conn.opened_ns = now
        conn.next_ping_ns = now + self.ping_interval_ns
        self.in_flight -= 1
        batch = self.batch
        if batch is not None:
            batch.ok += 1
            batch.durations_ns.append(now - conn.started_ns)
            batch.last_open_ns = now
        if rest:
            self.on_data(conn, rest)
        self.check_batch_done()

    # -- the open connection -------------------------------------------------------

    def on_data(self, conn: _Conn, data: bytes) -> None:
        try:
            replies = self.receiver.feed(conn.tally, data, time.time_ns())
        except OpeningError as exc:
            self.lose(conn, str(exc))
            return
        if replies:
            self.send(conn, replies)
        if conn.tally.is_closed_by_server:
            self.lose(
                conn, "WebSocket close: " + conn.tally.close_reason.decode("utf-8", "replace")
            )

    def lose(self, conn: _Conn, reason: str) -> None:
        """An open connection ended (the server closed it, or broke the protocol)."""
        if conn.state == CLOSED:
            return
        self.closed_by_server += 1
        key = reason[:160]
        self.close_reasons[key] = self.close_reasons.get(key, 0) + 1
        self.drop(conn)

    def send(self, conn: _Conn, data: bytes) -> None:
        if not data or conn.state == CLOSED:
            return
        if conn.out:
            conn.out += data
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            if conn.state == OPEN:
                self.lose(conn, f"send: {exc.strerror or exc}")
            else:
                self.fail(conn, f"send: {exc.strerror or exc}")
            return
        if sent < len(data):
            conn.out = data[sent:]
            self.want_write(conn, True)

    def want_write(self, conn: _Conn, on: bool) -> None:
        if conn.is_writing == on:
            return
        conn.is_writing = on
        mask = select.EPOLLIN | (select.EPOLLOUT if on else 0)
        self.epoll.modify(conn.sock.fileno(), mask)

    def flush(self, conn: _Conn) -> None:
        data, conn.out = conn.out, b""
        self.want_write(conn, False)
        self.send(conn, data)

    def ping_due(self, now_ns: int) -> None:
        frame = self.ping_frame
        interval = self.ping_interval_ns
        for conn in list(self.conns.values()):
            if conn.state == OPEN and conn.next_ping_ns <= now_ns:
                conn.next_ping_ns = now_ns + interval
                self.send(conn, frame)

    def expire_connects(self, now_ns: int) -> None:
        limit = int(self.options.connect_timeout * 1e9)
        for conn in list(self.conns.values()):
            if conn.state < OPEN and now_ns - conn.started_ns > limit:
                self.fail(conn, "timed out while opening")

    def close_all(self) -> None:
        for conn in list(self.conns.values()):
            if conn.state != CLOSED:
                with contextlib.suppress(OSError):
                    conn.sock.close()
                conn.state = CLOSED
        self.epoll.close()

    # -- the loop ------------------------------------------------------------------

    def run(self) -> None:
        pipe_fd = self.pipe.fileno()
        self.epoll.register(pipe_fd, select.EPOLLIN)
        conns = self.conns
        on_data = self.on_data
        receive_bytes = RECEIVE_BYTES
        next_chores_ns = 0
        while self.running:
            batch = self.batch
            timeout = 0.005 if batch is not None and batch.pending else 0.1
            for fd, events in self.epoll.poll(timeout):
                if fd == pipe_fd:
                    self.on_command()
                    if not self.running:
                        return
                    continue
                conn = conns.get(fd)
                if conn is None:
                    continue
                if conn.state == OPEN:
                    if events & select.EPOLLOUT and conn.out:
                        self.flush(conn)
                    if not events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        continue
                    try:
                        data = conn.sock.recv(receive_bytes)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        self.lose(conn, f"recv: {exc.strerror or exc}")
                        continue
                    if data:
                        on_data(conn, data)
                    else:
                        self.lose(conn, "connection closed without a WebSocket close")
                else:
                    if events & select.EPOLLOUT and conn.out and conn.state != CONNECTING:
                        self.flush(conn)
                        continue
                    self.on_connecting(conn, events)
            now = time.monotonic_ns()
            if self.batch is not None:
                self.start_connects(now)
            if now >= next_chores_ns:
                next_chores_ns = now + 200_000_000
                if self.in_flight:
                    self.expire_connects(now)
                if self.ping_interval_ns:
                    self.ping_due(now)


def run_client(pipe: Connection, options: ClientOptions) -> None:
    """The entry point of a client process."""
    raise_fd_limit(options.fd_limit)
    client = _Client(pipe, options)
    try:
        client.run()
    finally:
        pipe.close()
