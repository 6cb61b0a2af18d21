"""The publishers' one run loop: requests over a few connections, one in flight on each.

Both publishers (HTTP POSTs in ``bench.server.publisher``, ``Publish``
invocations over the publisher hub in ``bench.server.hubpublisher``) pace,
write, wait and count the same way; only the wire differs. ``PublishLoop``
owns that common part (the selector, the idle and busy connections, rate
pacing, the deadline, buffered writes, progress, stall detection, reopening
a connection the server closed) and asks a subclass for the wire: how to
open a connection, how a request goes on it, how to read an answer.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Final, Generic, Protocol, TypeVar

from bench.profile import BenchError

if TYPE_CHECKING:
    from bench.server.publisher import EventFactory

__all__ = ["Conn", "PublishLoop", "PublishResult", "Request"]

_RECEIVE_BYTES: Final = 65536

#: One request: the (site index, sequence) of each event it carries.
Request = Sequence[tuple[int, int]]


@dataclass(slots=True)
class PublishResult:
    """What the publisher did."""

    requests: int = 0
    ok: int = 0
    events_sent: int = 0
    events_accepted: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    first_send_ns: int = 0  # time.time_ns()
    last_send_ns: int = 0
    last_response_ns: int = 0

    @property
    def failed(self) -> int:
        return self.requests - self.ok


class Conn(Protocol):
    """What the loop needs of a publisher's connection."""

    sock: socket.socket
    out: bytes  # what the kernel has not taken yet; sent on EVENT_WRITE
    events: int  # events in the request in flight
    last_send: float  # time.monotonic() of the last write

    @property
    def is_busy(self) -> bool:
        """A request is in flight (sent, its answer not yet read)."""
        ...


C = TypeVar("C", bound=Conn)


class PublishLoop(Generic[C]):
    """Sends requests over ``self._conns``, at most one in flight on each.

    A subclass opens its connections (``_open``, each registered for
    EVENT_READ with itself as the key's data) and supplies the wire:
    ``_start`` (a request's bytes; it marks the connection busy) and
    ``_take`` (what a read brought; clears busy once the answer is in). ``_tick`` runs
    once a round, for what a connection needs while it is quiet.
    """

    #: What a request is called in the result's errors ("requests").
    _REQUESTS: ClassVar[str]
    #: What its answer is called ("response").
    _ANSWER: ClassVar[str]

    def __init__(self, host: str, port: int, *, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._selector = selectors.DefaultSelector()
        self._conns: list[C] = []

    def _open_all(self, connections: int) -> None:
        try:
            for _ in range(max(1, connections)):
                self._conns.append(self._open())
        except BaseException:
            self.close()
            raise

    # -- the wire (a subclass's part) --------------------------------------------

    def _open(self) -> C:
        """A fresh connection, ready for requests and registered for EVENT_READ.

        Raises:
            OSError or BenchError: it could not be opened.
        """
        raise NotImplementedError

    def _start(self, conn: C, body: bytes) -> bytes:
        """Mark ``conn`` busy with a request carrying ``body``; return its bytes."""
        raise NotImplementedError

    def _take(self, conn: C, data: bytes, result: PublishResult) -> bool:
        """Take what was read (``b""``: the connection closed) and count what the
        answer says, clearing busy once it is in; False when the connection is over
        and must be reopened."""
        raise NotImplementedError

    def _tick(self, now: float) -> None:
        """Once a round (and before the first)."""

    # -- the loop ----------------------------------------------------------------

    def close(self) -> None:
        for conn in self._conns:
            self._selector.unregister(conn.sock)
            conn.sock.close()
        self._conns = []
        self._selector.close()

    def stop(self) -> None:
        self.close()

    def run(
        self,
        requests: Sequence[Request],
        factory: EventFactory,
        *,
        rate: float | None = None,
        deadline: float | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> PublishResult:
        """Send every request: back to back (``rate`` None) or ``rate`` per second.

        ``deadline`` (monotonic seconds) stops sending; what was not sent by then
        is simply not published (the clients will count it as lost).
        """
        result = PublishResult()
        started = time.monotonic()
        self._tick(started)
        idle = list(self._conns)
        busy = 0
        index = 0
        total = len(requests)
        next_progress = started
        selector = self._selector
        stopped = f"the server stopped taking {self._REQUESTS}"
        while index < total or busy:
            now = time.monotonic()
            if deadline is not None and now > deadline:
                result.errors["publisher deadline passed"] += total - index
                break
            while idle and index < total and (rate is None or index <= (now - started) * rate):
                conn = idle.pop()
                request = requests[index]
                index += 1
                t = time.time_ns()
                data = self._start(conn, factory.body(request, t))
                if not result.first_send_ns:
                    result.first_send_ns = t
                result.last_send_ns = t
                conn.events = len(request)
                busy += 1
                result.requests += 1
                result.events_sent += len(request)
                if not self._send(conn, data):
                    result.errors[stopped] += total - index + busy
                    return result
            if rate is not None and idle and index < total:
                wait = max(0.0, started + index / rate - time.monotonic())
            else:
                wait = 0.5
            for key, mask in selector.select(min(wait, 0.5)):
                conn = key.data
                if mask & selectors.EVENT_WRITE and conn.out:
                    out, conn.out = conn.out, b""
                    selector.modify(conn.sock, selectors.EVENT_READ, conn)
                    if not self._send(conn, out):
                        result.errors[stopped] += total - index + busy
                        return result
                if not mask & selectors.EVENT_READ:
                    continue
                try:
                    data = conn.sock.recv(_RECEIVE_BYTES)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    data = b""
                    result.errors[f"recv: {exc}"] += 1
                was_busy = conn.is_busy
                is_alive = self._take(conn, data, result)
                if was_busy and not conn.is_busy:
                    busy -= 1
                    if is_alive:
                        idle.append(conn)
                if not is_alive:
                    if conn in idle:
                        idle.remove(conn)
                    try:
                        idle.append(self._reopen(conn))
                    except (OSError, BenchError) as exc:
                        result.errors[f"cannot reconnect: {exc}"] += total - index + busy
                        return result
            if on_progress is not None and now >= next_progress:
                next_progress = now + 0.2
                on_progress(index)
            if busy and self._stalled(result):
                result.errors[f"no {self._ANSWER} within {self.timeout:g} s"] += busy
                break
            self._tick(now)
        return result

    def _stalled(self, result: PublishResult) -> bool:
        last = result.last_response_ns or result.first_send_ns
        return time.time_ns() - last > self.timeout * 1e9

    def _send(self, conn: C, data: bytes) -> bool:
        """Write (what the kernel does not take waits for EVENT_WRITE, behind any
        earlier rest); False if the connection broke (the server went away: the run
        records it, it does not hang)."""
        conn.last_send = time.monotonic()
        if conn.out:
            conn.out += data
            return True
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return False
        if sent < len(data):
            conn.out = data[sent:]
            self._selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
        return True

    def _reopen(self, conn: C) -> C:
        self._selector.unregister(conn.sock)
        conn.sock.close()
        self._conns.remove(conn)
        fresh = self._open()
        self._conns.append(fresh)
        return fresh
