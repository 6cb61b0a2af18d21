"""The soak's other clients, in a process of their own: churn, slow readers, garbage.

``python -m bench soak`` runs this beside its well-behaved subscribers (the
load client) and its publisher, for the run's duration, in one Trio loop over
plain non-blocking sockets on 127.0.0.1:

- churn: clients that open a hub connection, receive for a random short
  time and leave: with a WebSocket close, with a bare FIN, or with a TCP
  reset. Each belongs to an identity (a site and a subject) that reconnects
  from the last seq it saw, with ``since_seq`` on the URL or with
  ``Resume(lastSeq)``; a ``SeqBook`` per identity finds every hole and repeat
  across its reconnections.
- slow readers: hub connections with a tiny receive buffer that never read
  after the handshake; every other one also asks for replays
  (``Resume(0)``) so that it runs over its output budget in seconds rather
  than minutes. Each is expected to be closed by the server; a closed one is
  replaced.
- garbage: short-lived connections sending random bytes, broken HTTP heads,
  bad WebSocket frames or hub messages after a good opening, invalid
  ``Resume`` arguments, invalid publish bodies (to a site nobody watches).
  A complete bad input must get an answer or a close within
  ``answer_timeout``; an incomplete one is abandoned after a short wait.

Nothing is started after the deadline, and every connection still open at
the deadline is ended within ``answer_timeout`` after it. The process
answers one ``("report", dict)`` on its pipe, or ``("error", text)``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import random
import re
import select
import socket
import struct
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final

import trio

from bench.server.loadclient import raise_fd_limit
from bench.server.publisher import site_name
from bench.server.servers import PUBLISH_PATH
from bench.server.wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    SIGNALR_PING,
    Dialect,
    OpeningError,
    Tally,
    client_frame,
    feed_opening,
    next_frame,
    opening_frames,
    parse_upgrade_response,
    upgrade_request,
)

__all__ = ["ChaosPlan", "SeqBook", "run_chaos", "scan_records"]

HOST: Final = "127.0.0.1"
RECEIVE_BYTES: Final = 65536
#: SO_RCVBUF of a slow reader (the kernel doubles it and applies its minimum).
SLOW_RECEIVE_BYTES: Final = 4096
SLOW_PING_INTERVAL: Final = 2.0
SLOW_RESUME_INTERVAL: Final = 0.25
#: Bytes a slow reader keeps waiting to be written at most (it stops asking then).
SLOW_MAX_PENDING_BYTES: Final = 64 * 1024
#: How long a churn client leaving cleanly waits for the server's close.
CLOSE_WAIT: Final = 2.0
#: How long an incomplete garbage input waits before it is abandoned.
ABANDON_AFTER: Final = 1.5
#: The site garbage publishes name: nobody subscribes to it.
GARBAGE_SITE: Final = "garbage-site"
#: ``\\"seq\\":N}``: the server appends the seq last to every event's text.
SEQ_PATTERN: Final = re.compile(rb',\\"seq\\":(\d+)}')
RECORD_SEPARATOR: Final = b"\x1e"


# -- bookkeeping (pure) -------------------------------------------------------------


@dataclass(slots=True)
class SeqBook:
    """The seqs one reader of a site saw, across all its connections.

    The first seq seen is where its stream starts; from there every seq up
    to the highest seen must arrive exactly once, except those a ``Gap`` said
    have left the history.
    """

    first: int | None = None
    last: int = 0
    received: int = 0
    duplicated: int = 0
    forgiven: int = 0
    _marks: bytearray = field(default_factory=bytearray)

    def add(self, seq: int) -> None:
        """One event arrived (a repeat, or a seq before the first, is a duplicate)."""
        self.received += 1
        if self.first is None:
            self.first = seq
        index = seq - self.first
        if index < 0:
            self.duplicated += 1
            return
        if index >= len(self._marks):
            self._marks.extend(bytes(index + 1 - len(self._marks)))
        if self._marks[index]:
            self.duplicated += 1
            return
        self._marks[index] = 1
        self.last = max(self.last, seq)

    def gap(self, first_available: int) -> None:
        """``Gap(first_available)``: the seqs between the last seen and it are gone."""
        if self.first is None:
            return
        start, stop = self.last + 1 - self.first, first_available - self.first
        if stop <= start:
            return
        if stop > len(self._marks):
            self._marks.extend(bytes(stop - len(self._marks)))
        for index in range(start, stop):
            if not self._marks[index]:
                self._marks[index] = 2
                self.forgiven += 1

    @property
    def lost(self) -> int:
        """Seqs between the first and the highest seen that never arrived."""
        if self.first is None:
            return 0
        return self._marks.count(0, 0, self.last - self.first + 1)


@dataclass(frozen=True, slots=True)
class Scanned:
    """What one server frame of a hub connection held, in order.

    Attributes:
        items: ``("seq", n)`` per event, ``("gap", first)`` per ``Gap``.
        completion_errors: the error of every Completion that had one.
        close_error: a hub Close message's error ("" without one), or None.
    """

    items: list[tuple[str, int]]
    completion_errors: list[str]
    completion_count: int
    close_error: str | None


def scan_records(payload: bytes) -> Scanned:
    """The events, Gaps, Completions and Close of a JSON hub frame (spec §3: 0x1E records)."""
    items: list[tuple[str, int]] = []
    errors: list[str] = []
    completions = 0
    close_error: str | None = None
    for record in payload.split(RECORD_SEPARATOR):
        if not record:
            continue
        if b'"target":"ReceiveMessage"' in record:
            items.extend(("seq", int(n)) for n in SEQ_PATTERN.findall(record))
            continue
        try:
            message = json.loads(record)
        except ValueError:
            continue
        if not isinstance(message, dict):
            continue
        kind = message.get("type")
        if kind == 1 and message.get("target") == "Gap":
            arguments = message.get("arguments") or [0]
            if type(arguments[0]) is int:
                items.append(("gap", arguments[0]))
        elif kind == 3:
            completions += 1
            if message.get("error") is not None:
                errors.append(str(message["error"]))
        elif kind == 7:
            close_error = str(message.get("error") or "")
    return Scanned(items, errors, completions, close_error)


# -- the plan and the report --------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ChaosPlan:
    """What the chaos process does.

    Attributes:
        ports: the server's node ports (a client picks one).
        duration: seconds to run from its start.
        sites: the sites the bench publishes to (``site_name(i)``).
        hub_tokens: hub tokens, each of a subject with a role on every site.
        publish_token: a token with the publish scope.
        churn_rate: churn connections started per second.
        churn_max_life: longest a churn connection receives (seconds).
        slow_readers: slow readers kept connected at a time.
        garbage_rate: garbage connections started per second.
        answer_timeout: how long a complete bad input may wait for an answer.
        seed: for every random choice.
    """

    ports: tuple[int, ...]
    duration: float
    sites: int
    hub_tokens: tuple[str, ...]
    publish_token: str
    churn_rate: float = 10.0
    churn_max_life: float = 5.0
    slow_readers: int = 5
    garbage_rate: float = 5.0
    answer_timeout: float = 10.0
    seed: int = 1

    @property
    def churn_cap(self) -> int:
        """Churn connections open at most (identities, too)."""
        return max(2, math.ceil(1.5 * self.churn_rate * self.churn_max_life) + 1)

    @property
    def garbage_cap(self) -> int:
        """Garbage connections open at most."""
        return max(2, min(200, math.ceil(self.garbage_rate * (self.answer_timeout + 1))))

    @property
    def connections(self) -> int:
        """Connections this process holds at most (for descriptor limits)."""
        return self.churn_cap + self.garbage_cap + self.slow_readers


@dataclass(slots=True)
class _Stats:
    churn_opened: int = 0
    churn_failed: Counter[str] = field(default_factory=Counter)
    churn_skipped: int = 0  # every identity was busy
    churn_ends: Counter[str] = field(default_factory=Counter)
    churn_resumes: Counter[str] = field(default_factory=Counter)
    churn_closed_by_server: Counter[str] = field(default_factory=Counter)
    churn_completion_errors: Counter[str] = field(default_factory=Counter)
    slow_opened: int = 0
    slow_failed: Counter[str] = field(default_factory=Counter)
    slow_closed: int = 0
    slow_open_at_end: int = 0
    garbage_skipped: int = 0
    garbage: dict[str, Counter[str]] = field(default_factory=dict)
    garbage_statuses: dict[str, Counter[str]] = field(default_factory=dict)
    garbage_accepted: int = 0
    garbage_examples: dict[str, str] = field(default_factory=dict)

    def garbage_outcome(self, kind: str, outcome: str, example: str = "") -> None:
        self.garbage.setdefault(kind, Counter())[outcome] += 1
        if outcome == "unanswered" and kind not in self.garbage_examples:
            self.garbage_examples[kind] = example[:200]


@dataclass(slots=True)
class _Identity:
    site: int
    token: str
    book: SeqBook = field(default_factory=SeqBook)
    is_busy: bool = False
    connections: int = 0


def _report(stats: _Stats, identities: Sequence[_Identity]) -> dict[str, Any]:
    books = [identity.book for identity in identities]
    garbage_total = sum(sum(counts.values()) for counts in stats.garbage.values())
    return {
        "churn": {
            "opened": stats.churn_opened,
            "failed": dict(stats.churn_failed),
            "skipped_all_identities_busy": stats.churn_skipped,
            "ends": dict(stats.churn_ends),
            "resumes": dict(stats.churn_resumes),
            "closed_by_server": dict(stats.churn_closed_by_server),
            "completion_errors": dict(stats.churn_completion_errors),
            "identities": len(identities),
            "events": sum(book.received for book in books),
            "lost": sum(book.lost for book in books),
            "duplicated": sum(book.duplicated for book in books),
            "forgiven_by_gap": sum(book.forgiven for book in books),
        },
        "slow": {
            "opened": stats.slow_opened,
            "failed": dict(stats.slow_failed),
            "closed_by_server": stats.slow_closed,
            "open_at_end": stats.slow_open_at_end,
        },
        "garbage": {
            "connections": garbage_total,
            "skipped_at_cap": stats.garbage_skipped,
            "outcomes": {kind: dict(counts) for kind, counts in stats.garbage.items()},
            "statuses": {kind: dict(counts) for kind, counts in stats.garbage_statuses.items()},
            "accepted_publishes": stats.garbage_accepted,
            "examples": dict(stats.garbage_examples),
        },
    }


# -- a client socket under trio ------------------------------------------------------


class _Socket:
    """A non-blocking TCP client socket, waited on with trio's readiness calls."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = bytearray()

    @classmethod
    async def open(cls, port: int, *, receive_buffer_bytes: int | None = None) -> _Socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if receive_buffer_bytes is not None:
            # Before connect(), so the window the server sees is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        try:
            code = sock.connect_ex((HOST, port))
            if code == errno.EINPROGRESS:
                await trio.lowlevel.wait_writable(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, f"connect: {errno.errorcode.get(code, code)}")
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            view = view[sent:]

    def send_nowait(self, data: bytes) -> None:
        """Queue ``data`` and write what the kernel takes now (never a partial frame lost)."""
        self.pending += data
        try:
            sent = self.sock.send(self.pending)
        except BlockingIOError:
            return
        del self.pending[:sent]

    async def receive(self) -> bytes:
        """The next bytes; b"" at EOF (a reset raises OSError)."""
        while True:
            try:
                return self.sock.recv(RECEIVE_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)

    def is_ended_by_peer(self) -> bool:
        """The peer reset or shut down the connection (seen without reading)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLERR | select.POLLHUP | select.POLLRDHUP)
        return any(
            events & (select.POLLERR | select.POLLHUP | select.POLLRDHUP)
            for _, events in poller.poll(0)
        )

    def close(self, *, is_reset: bool = False) -> None:
        if is_reset:
            with contextlib.suppress(OSError):
                # SO_LINGER 0: close() sends a RST, as a dropped network or a killed client does.
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


async def _receive_until(conn: _Socket, deadline: float) -> bytes | None:
    """The next bytes before ``deadline`` (b"" at EOF or a reset), None when none came."""
    with trio.move_on_at(deadline):
        try:
            return await conn.receive()
        except OSError:
            return b""
    return None


async def _open_hub(
    port: int,
    target: str,
    *,
    after_handshake: bytes = b"",
    receive_buffer_bytes: int | None = None,
) -> tuple[_Socket, bytes]:
    """A hub connection past the handshake, and the bytes that followed its answer.

    Raises:
        OpeningError: the server refused the upgrade or the handshake.
        OSError: the connection failed.
    """
    conn = await _Socket.open(port, receive_buffer_bytes=receive_buffer_bytes)
    try:
        request, accept = upgrade_request(HOST, port, target)
        await conn.send_all(request)
        head = b""
        while (response := parse_upgrade_response(head)) is None:
            data = await conn.receive()
            if not data:
                raise OpeningError("closed during the upgrade")
            head += data
        if response.status != 101:
            raise OpeningError(f"HTTP {response.status}")
        if response.headers.get(b"sec-websocket-accept") != accept:
            raise OpeningError("wrong Sec-WebSocket-Accept")
        await conn.send_all(opening_frames(Dialect.SIGNALR) + after_handshake)
        tally = Tally(0)
        data = response.rest
        while True:
            if data:
                is_open, replies, rest = feed_opening(Dialect.SIGNALR, tally, data)
                if replies:
                    await conn.send_all(replies)
                if is_open:
                    return conn, rest
            data = await conn.receive()
            if not data:
                raise OpeningError("closed during the hub handshake")
    except BaseException:
        conn.close(is_reset=True)
        raise


def _hub_target(site: str, token: str, since_seq: int | None = None) -> str:
    target = f"/v1/hub/entries?site_id={site}&access_token={token}"
    return target if since_seq is None else f"{target}&since_seq={since_seq}"


def _invocation(target: str, arguments: str, invocation_id: str = "1") -> bytes:
    """A JSON hub invocation whose ``arguments`` is raw JSON text (so it can be anything)."""
    record = (
        f'{{"type":1,"invocationId":"{invocation_id}","target":"{target}","arguments":{arguments}}}'
    )
    return record.encode() + RECORD_SEPARATOR


class _Frames:
    """Server frames of one connection, from bytes as they arrive."""

    def __init__(self, data: bytes = b"") -> None:
        self.buffer = data

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """(opcode, payload) of every complete frame so far.

        Raises:
            OpeningError: the server broke RFC 6455 (a masked frame).
        """
        buffer = self.buffer + data
        pos = 0
        frames = []
        while (frame := next_frame(buffer, pos)) is not None:
            frames.append((frame.opcode, buffer[frame.start : frame.stop]))
            pos = frame.stop
        self.buffer = buffer[pos:]
        return frames


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return str(exc)[:80] or type(exc).__name__


# -- churn -----------------------------------------------------------------------------


class _Churn:
    def __init__(self, plan: ChaosPlan, stats: _Stats, rng: random.Random) -> None:
        self.plan = plan
        self.stats = stats
        self.rng = rng
        self.identities = [
            _Identity(index % plan.sites, plan.hub_tokens[index % len(plan.hub_tokens)])
            for index in range(plan.churn_cap)
        ]

    async def run(self, nursery: trio.Nursery, end_at: float) -> None:
        interval = 1.0 / self.plan.churn_rate
        next_at = trio.current_time()
        while next_at < end_at:
            await trio.sleep_until(next_at)
            next_at += interval
            idle = [identity for identity in self.identities if not identity.is_busy]
            if not idle:
                self.stats.churn_skipped += 1
                continue
            identity = self.rng.choice(idle)
            identity.is_busy = True
            nursery.start_soon(self.one, identity, end_at)

    async def one(self, identity: _Identity, end_at: float) -> None:
        try:
            await self._one(identity, end_at)
        finally:
            identity.is_busy = False

    async def _one(self, identity: _Identity, end_at: float) -> None:
        plan, rng, stats, book = self.plan, self.rng, self.stats, identity.book
        since_seq: int | None = None
        after_handshake = b""
        if book.first is not None:
            # Half resume on the URL, half with the hub method right after the handshake.
            if rng.random() < 0.5:
                since_seq = book.last
                stats.churn_resumes["since_seq"] += 1
            else:
                resume = _invocation("Resume", f"[{book.last}]", "r")
                after_handshake = client_frame(OP_TEXT, resume)
                stats.churn_resumes["Resume"] += 1
        target = _hub_target(site_name(identity.site), identity.token, since_seq)
        try:
            conn, rest = await _open_hub(
                rng.choice(plan.ports), target, after_handshake=after_handshake
            )
        except (OSError, OpeningError) as exc:
            stats.churn_failed[_reason(exc)] += 1
            return
        stats.churn_opened += 1
        identity.connections += 1
        frames = _Frames()
        ending = rng.choice(("close", "fin", "reset"))
        leave_at = min(end_at, trio.current_time() + rng.uniform(0.2, plan.churn_max_life))
        try:
            ended = self._take(frames, rest, book)
            while ended is None and (data := await _receive_until(conn, leave_at)) is not None:
                ended = self._take(frames, data, book) if data else "connection ended"
            if ended is not None:
                stats.churn_closed_by_server[ended] += 1
                return
            stats.churn_ends[ending] += 1
            if ending == "close":
                await conn.send_all(client_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
                # Events that were on their way still count; the server's close ends it.
                wait_until = trio.current_time() + CLOSE_WAIT
                while (data := await _receive_until(conn, wait_until)) and (
                    self._take(frames, data, book) is None
                ):
                    pass
        except (OSError, OpeningError) as exc:
            stats.churn_closed_by_server[_reason(exc)] += 1
        finally:
            conn.close(is_reset=ending == "reset")

    def _take(self, frames: _Frames, data: bytes, book: SeqBook) -> str | None:
        """Count the events ``data`` completes; why the server ended the connection, if it did."""
        for opcode, payload in frames.feed(data):
            if opcode == OP_CLOSE:
                return "WebSocket close: " + payload[2:80].decode("utf-8", "replace")
            if opcode not in (OP_TEXT, OP_BINARY):
                continue
            scanned = scan_records(payload)
            for kind, value in scanned.items:
                if kind == "seq":
                    book.add(value)
                else:
                    book.gap(value)
            for error in scanned.completion_errors:
                self.stats.churn_completion_errors[error[:80]] += 1
            if scanned.close_error is not None:
                return f"hub Close: {scanned.close_error[:80]}"
        return None


# -- slow readers -----------------------------------------------------------------------


async def _slow_slot(
    index: int, plan: ChaosPlan, stats: _Stats, end_at: float, rng: random.Random
) -> None:
    """Keep one slow reader connected until ``end_at``, replacing each one the server closes."""
    is_asking = index % 2 == 1
    resume_zero = client_frame(OP_TEXT, _invocation("Resume", "[0]", "z"))
    ping = client_frame(OP_TEXT, SIGNALR_PING)
    while trio.current_time() < end_at:
        site = site_name(index % plan.sites)
        token = plan.hub_tokens[index % len(plan.hub_tokens)]
        try:
            conn, _ = await _open_hub(
                rng.choice(plan.ports),
                _hub_target(site, token),
                receive_buffer_bytes=SLOW_RECEIVE_BYTES,
            )
        except (OSError, OpeningError) as exc:
            stats.slow_failed[_reason(exc)] += 1
            await trio.sleep(1.0)
            continue
        stats.slow_opened += 1
        try:
            next_ping_at = trio.current_time()
            while trio.current_time() < end_at:
                if conn.is_ended_by_peer():
                    stats.slow_closed += 1
                    break
                try:
                    # Pings keep the client timeout happy, and once the server has
                    # closed, one arriving gets the RST that tells us.
                    if trio.current_time() >= next_ping_at:
                        conn.send_nowait(ping)
                        next_ping_at = trio.current_time() + SLOW_PING_INTERVAL
                    if is_asking and len(conn.pending) < SLOW_MAX_PENDING_BYTES:
                        conn.send_nowait(resume_zero)
                except OSError:
                    stats.slow_closed += 1
                    break
                await trio.sleep(SLOW_RESUME_INTERVAL)
            else:
                stats.slow_open_at_end += 1
        finally:
            conn.close(is_reset=True)


# -- garbage ------------------------------------------------------------------------------


def _http(method: str, target: str, headers: str = "", body: bytes = b"") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: {HOST}\r\n{headers}"
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("latin-1") + body


def _nested(depth: int) -> bytes:
    return b'{"site_id":"' + GARBAGE_SITE.encode() + b'","x":' + b"[" * depth + b"]" * depth + b"}"


def _bad_heads(plan: ChaosPlan) -> list[bytes]:
    token = plan.hub_tokens[0]
    site = site_name(0)
    upgrade = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    return [
        b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"BREW /pot HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/7.0\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET /readyz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
        _http("HEAD", "/healthz"),
        _http("GET", "/%ZZ?site_id=%"),
        _http(
            "POST",
            f"/v1/hub/entries/negotiate?negotiateVersion=%C2%B2&site_id={site}",
            f"Authorization: Bearer {token}\r\n",
        ),
        _http("GET", f"/v1/hub/entries?site_id={'x' * 300}&access_token={token}", upgrade),
        _http(
            "GET",
            f"/v1/hub/entries?site_id={site}&access_token={token}&since_seq=" + "9" * 30,
            upgrade,
        ),
        _http("GET", f"/v1/hub/entries?site_id={site}&access_token=not.a.token", upgrade),
        _http(
            "GET",
            f"/v1/hub/entries?site_id={site}&access_token={token}",
            "Upgrade: websocket\r\nConnection: Upgrade\r\n",
        ),
        _http(
            "GET",
            f"/v1/hub/entries?site_id={site}&user_id={'u' * 300}&access_token={token}",
            upgrade,
        ),
    ]


def _bad_publishes(plan: ChaosPlan) -> list[bytes]:
    auth = f"Authorization: Bearer {plan.publish_token}\r\nContent-Type: application/json\r\n"
    bodies = [
        b"{not json",
        _nested(1000),
        _nested(40),
        b'{"site_id": 5}',
        b'{"lock":"no site"}',
        b'"just a string"',
        b'{"site_id":"' + b"s" * 300 + b'"}',
        b"\xff\xfe\x00",
        b'{"site_id":"' + GARBAGE_SITE.encode() + b'","name":"\\ud800"}',
    ]
    requests = [_http("POST", PUBLISH_PATH, auth, body) for body in bodies]
    requests.append(_http("POST", PUBLISH_PATH, "", _nested(1)))  # no token
    huge = f"POST {PUBLISH_PATH} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {1 << 24}\r\n\r\n"
    requests.append(huge.encode())  # announced over --max-publish-bytes, never sent
    return requests


def _incomplete_requests(plan: ChaosPlan) -> list[bytes]:
    """Requests that stop halfway: the server may wait for the rest (up to its deadline)."""
    auth = f"Authorization: Bearer {plan.publish_token}\r\n"
    return [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123",
        b"GET /readyz HTTP/1.1\r\nHo",
        f"POST {PUBLISH_PATH} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 50\r\n\r\n{{".encode(),
    ]


def _bad_frames() -> list[bytes]:
    ping = client_frame(OP_PING, b"x")
    text = client_frame(OP_TEXT, b"{}\x1e")
    return [
        bytes((0x81, 5)) + b"hello",  # unmasked (RFC 6455 §5.1: the server must close)
        client_frame(0x3, b"x"),  # reserved opcode
        client_frame(OP_PING, b"x" * 200),  # control frame over 125 bytes
        bytes((ping[0] & 0x7F,)) + ping[1:],  # fragmented control frame
        bytes((text[0] | 0x40,)) + text[1:],  # RSV1 without an extension
        client_frame(OP_CONTINUATION, b"x"),  # continuation with nothing to continue
        client_frame(OP_TEXT, b"\xff\xfe\x1e"),  # text that is not UTF-8
        bytes((0x81, 0xFF)) + (2**64 - 1).to_bytes(8, "big") + b"\x00\x00\x00\x00",  # MSB set
        client_frame(OP_CLOSE, (999).to_bytes(2, "big")),  # a close code nobody may send
    ]


def _bad_hub_messages() -> list[bytes]:
    """Hub messages that must get a Completion or a Close (an unknown message type
    would not: the spec has clients and servers ignore those, for newer versions)."""
    return [
        b"not json\x1e",
        b'{"type":1,"target":5,"arguments":[]}\x1e',
        b'{"type":1}\x1e',
        b"[1,2,3]\x1e",
        _invocation("NoSuchMethod", "[]"),
        b'{"type":1,"target":"x","arguments":["' + b"a" * 40_000 + b'"]}\x1e',
        _invocation("Resume", "[" + "[" * 5000 + "]" * 5000 + "]"),
    ]


#: Resume arguments that are not an int in 0..2^53.
BAD_RESUME_ARGUMENTS: Final = (
    "[10000000000000000000]",
    "[18446744073709551616]",
    "[9007199254740993]",
    "[-1]",
    '["5"]',
    "[1.5]",
    "[null]",
    "[[]]",
    "[{}]",
    "[1,2]",
    "[]",
    "[1e400]",
    "[true]",
)


class _Garbage:
    KINDS: Final = (
        "random bytes",
        "broken HTTP head",
        "incomplete request",
        "bad WebSocket frame",
        "bad hub message",
        "bad Resume argument",
        "bad publish",
    )

    def __init__(self, plan: ChaosPlan, stats: _Stats, rng: random.Random) -> None:
        self.plan = plan
        self.stats = stats
        self.rng = rng
        self.in_flight = 0
        self.heads = _bad_heads(plan)
        self.incomplete = _incomplete_requests(plan)
        self.publishes = _bad_publishes(plan)
        self.frames = _bad_frames()
        self.messages = _bad_hub_messages()

    async def run(self, nursery: trio.Nursery, end_at: float) -> None:
        interval = 1.0 / self.plan.garbage_rate
        next_at = trio.current_time()
        turn = 0
        while next_at < end_at:
            await trio.sleep_until(next_at)
            next_at += interval
            if self.in_flight >= self.plan.garbage_cap:
                self.stats.garbage_skipped += 1
                continue
            kind = self.KINDS[turn % len(self.KINDS)]
            turn += 1
            self.in_flight += 1
            nursery.start_soon(self.one, kind)

    async def one(self, kind: str) -> None:
        try:
            with trio.move_on_after(self.plan.answer_timeout + ABANDON_AFTER + 5):
                await self._one(kind)
        finally:
            self.in_flight -= 1

    async def _one(self, kind: str) -> None:
        rng, port = self.rng, self.rng.choice(self.plan.ports)
        stats = self.stats
        try:
            if kind == "random bytes":
                data = rng.randbytes(rng.randint(1, 4096))
                await self._http(kind, port, data, is_complete=False)
            elif kind == "broken HTTP head":
                await self._http(kind, port, rng.choice(self.heads), is_complete=True)
            elif kind == "incomplete request":
                await self._http(kind, port, rng.choice(self.incomplete), is_complete=False)
            elif kind == "bad publish":
                await self._http(kind, port, rng.choice(self.publishes), is_complete=True)
            elif kind == "bad WebSocket frame":
                await self._hub(kind, port, rng.choice(self.frames))
            elif kind == "bad hub message":
                message = rng.choice(self.messages)
                example = repr(message[:60])
                await self._hub(kind, port, client_frame(OP_TEXT, message), example=example)
            else:
                arguments = rng.choice(BAD_RESUME_ARGUMENTS)
                message = _invocation("Resume", arguments, "b")
                await self._hub(kind, port, client_frame(OP_TEXT, message), example=arguments)
        except OSError as exc:
            stats.garbage_outcome(kind, f"connect failed: {_reason(exc)}")

    async def _http(self, kind: str, port: int, data: bytes, *, is_complete: bool) -> None:
        """Send ``data``; an HTTP answer or a close must come (when it is a whole request)."""
        conn = await _Socket.open(port)
        outcome = "unanswered" if is_complete else "abandoned"
        try:
            with contextlib.suppress(OSError):  # the server may close before reading it all
                await conn.send_all(data)
            wait = self.plan.answer_timeout if is_complete else ABANDON_AFTER
            deadline = trio.current_time() + wait
            received = b""
            while (chunk := await _receive_until(conn, deadline)) is not None:
                if not chunk:
                    outcome = "closed"
                    break
                received += chunk
                if b"\r\n\r\n" in received or len(received) > 65536:
                    outcome = "answered"
                    break
            if received.startswith(b"HTTP/1.") and received.count(b" ") >= 2:
                status = received.split(b" ", 2)[1].decode("ascii", "replace")
                self.stats.garbage_statuses.setdefault(kind, Counter())[status] += 1
                if kind == "bad publish" and status.startswith("2"):
                    self.stats.garbage_accepted += 1
                    body = data.partition(b"\r\n\r\n")[2]
                    self.stats.garbage_examples.setdefault("accepted publish", repr(body[:120]))
            self.stats.garbage_outcome(kind, outcome, data[:120].decode("latin-1"))
        finally:
            conn.close(is_reset=self.rng.random() < 0.5)

    async def _hub(self, kind: str, port: int, data: bytes, example: str = "") -> None:
        """Open a good hub connection, send ``data``: an answer or a close must come."""
        token = self.rng.choice(self.plan.hub_tokens)
        target = _hub_target(site_name(self.rng.randrange(self.plan.sites)), token)
        try:
            conn, rest = await _open_hub(port, target)
        except OpeningError as exc:
            self.stats.garbage_outcome(kind, f"opening refused: {_reason(exc)}")
            return
        try:
            with contextlib.suppress(OSError):
                await conn.send_all(data)
            frames = _Frames()
            deadline = trio.current_time() + self.plan.answer_timeout
            outcome = self._answer(frames.feed(rest))
            while outcome is None and (chunk := await _receive_until(conn, deadline)) is not None:
                outcome = self._answer(frames.feed(chunk)) if chunk else "closed"
            self.stats.garbage_outcome(kind, outcome or "unanswered", example or repr(data[:60]))
        except OpeningError:
            self.stats.garbage_outcome(kind, "closed")
        finally:
            conn.close(is_reset=self.rng.random() < 0.5)

    @staticmethod
    def _answer(frames: list[tuple[int, bytes]]) -> str | None:
        """What ``frames`` say: a close, an answer (a Completion or hub Close), or nothing yet."""
        for opcode, payload in frames:
            if opcode == OP_CLOSE:
                return "closed"
            if opcode in (OP_TEXT, OP_BINARY):
                scanned = scan_records(payload)
                if scanned.completion_count or scanned.close_error is not None:
                    return "answered"
        return None


# -- the process -------------------------------------------------------------------------


async def _run(plan: ChaosPlan) -> dict[str, Any]:
    rng = random.Random(plan.seed)
    stats = _Stats()
    churn = _Churn(plan, stats, rng)
    garbage = _Garbage(plan, stats, rng)
    end_at = trio.current_time() + plan.duration
    # Whatever is still open at the deadline gets this long to end, then is cut.
    with trio.move_on_at(end_at + plan.answer_timeout + ABANDON_AFTER + 10):
        async with trio.open_nursery() as nursery:
            if plan.churn_rate > 0:
                nursery.start_soon(churn.run, nursery, end_at)
            if plan.garbage_rate > 0:
                nursery.start_soon(garbage.run, nursery, end_at)
            for index in range(plan.slow_readers):
                nursery.start_soon(_slow_slot, index, plan, stats, end_at, rng)
    return _report(stats, churn.identities)


def run_chaos(pipe: Connection, plan: ChaosPlan) -> None:
    """The entry point of the chaos process: run ``plan``, answer one report."""
    raise_fd_limit(plan.connections + 256)
    try:
        report = trio.run(_run, plan)
    except BaseException:
        pipe.send(("error", traceback.format_exc()[-4000:]))
        raise
    else:
        pipe.send(("report", report))
    finally:
        pipe.close()
