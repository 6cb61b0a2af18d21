"""The accept loop: connection limits, and calm at descriptor exhaustion.

``trio.serve_listeners`` admits every connection and, at EMFILE, logs a
traceback every 100 ms. This loop instead:

- counts open connections, in total and per peer address (a live
  long-polling session counts as one too, see ``ConnectionGate``); one over
  ``max_connections`` is answered 503, one over ``max_connections_per_ip`` 429,
  both with ``Retry-After`` and a short JSON body, then closed, so a client
  learns at once why instead of waiting in the backlog. The answer goes out
  before the request is read (any client reads a response that arrives early),
  and at most ``MAX_REFUSING`` such answers wait for their client to read them:
  a new refusal ends the oldest wait, so refusing costs a bounded number of
  descriptors (part of ``FD_HEADROOM``) and clients that never read (the ones
  filling the server) cannot crowd out the answer to a newcomer;
- at EMFILE/ENFILE (and ENOBUFS/ENOMEM) stops accepting for a moment, longer
  while it lasts, and logs one line per ``LOG_INTERVAL`` rather than one per
  attempt.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import resource
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import trio

__all__ = [
    "FD_HEADROOM",
    "METRICS_MAX_CONNECTIONS",
    "ConnectionGate",
    "OverLimit",
    "accept_connections",
    "descriptor_budget",
    "fd_headroom",
    "refusal_bytes",
]

log = logging.getLogger("hubserver.http")

#: Descriptors kept free of client connections: listeners, SQLite, the Redis
#: pool and subscriber, the broker socket, trio's own, logs, JWKS fetches, and
#: the refusals in flight.
FD_HEADROOM: Final = 64
#: Over-limit connections waiting for their client to read the answer (per listener).
MAX_REFUSING: Final = 16
#: Connections the metrics listener (``--metrics-port``) serves at once: a few
#: scrapers and probes. Its own cap, so that a flood of the main port never
#: keeps a scrape from seeing it, and the scrapers never take the hubs' places.
METRICS_MAX_CONNECTIONS: Final = 8
#: How long a refused connection may take to read its answer.
REFUSAL_TIMEOUT: Final = 1.0
CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
FIRST_PAUSE_INTERVAL: Final = 0.1
MAX_PAUSE_INTERVAL: Final = 1.0
LOG_INTERVAL: Final = 1.0
REFUSAL_LOG_INTERVAL: Final = 10.0


def descriptor_budget(headroom: int = FD_HEADROOM) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the connections that leaves room for.

    Returns:
        The soft limit after raising it, minus ``headroom`` (at least 1).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        # Some systems refuse an infinite soft limit for files: ask for a large finite one.
        hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, hard, exc)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(soft - headroom, 1)


def fd_headroom(*, has_metrics_listener: bool) -> int:
    """Descriptors kept free of the main port's connections: ``FD_HEADROOM``, plus
    the metrics listener's own socket, connections and refusals when there is one."""
    if not has_metrics_listener:
        return FD_HEADROOM
    return FD_HEADROOM + 1 + METRICS_MAX_CONNECTIONS + MAX_REFUSING


def refusal_bytes(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response refusing a connection: JSON body, Retry-After, close."""
    body = json.dumps({"code": code, "message": message}, separators=(",", ":")).encode()
    reason = {429: "Too Many Requests", 503: "Service Unavailable"}.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "server: hubserver\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "cache-control: no-store\r\n"
        "retry-after: 1\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class OverLimit(NamedTuple):
    """Which connection limit a newcomer is over, and what it is told."""

    status: int
    code: str
    message: str
    #: The whole answer to a connection refused before its request is read.
    response: bytes


def _over_limit(status: int, code: str, message: str) -> OverLimit:
    return OverLimit(status, code, message, refusal_bytes(status, code, message))


_OVER_TOTAL: Final = _over_limit(
    503, "unavailable", "the server has too many open connections; retry later"
)
_OVER_PER_IP: Final = _over_limit(
    429, "too_many_connections", "too many open connections from this address; retry later"
)


@dataclass(slots=True)
class ConnectionGate:
    """Open connections, in total and per peer address, against their limits.

    What is counted is what the server holds for a client: an accepted TCP
    connection (``admit`` at accept, ``release`` at its close), and a live
    long-polling session, which holds no socket between polls (``admit`` at
    its first poll, under the first poll's address, ``release`` at its end).
    While a poll waits for its session's output, the poll's own TCP connection
    is that session's one count (``lend`` and ``reclaim`` around the wait): a
    long-polling client then counts as one, as a WebSocket does, plus the
    connection its POSTs use, as an event stream's do.

    Attributes:
        max_total: connections served at once (503 above).
        max_per_ip: connections per peer address (429 above; 0: no limit).
        open: connections (and long-polling sessions) admitted and not yet released.
        refused: connections answered 503 or 429 (or closed at once) so far.
    """

    max_total: int
    max_per_ip: int
    open: int = 0
    refused: int = 0
    _by_ip: dict[str, int] = field(default_factory=dict)
    _refused_unlogged: int = 0
    _refusal_logged_at: float = -math.inf
    #: The refusals waiting for their client, oldest first.
    _refusing: deque[trio.CancelScope] = field(default_factory=deque)

    def admit(self, ip: str) -> OverLimit | None:
        """Count a new connection from ``ip``; None, or the limit it is over (not counted)."""
        if self.open >= self.max_total:
            return _OVER_TOTAL
        count = self._by_ip.get(ip, 0)
        if self.max_per_ip and count >= self.max_per_ip:
            return _OVER_PER_IP
        self._by_ip[ip] = count + 1
        self.open += 1
        return None

    def release(self, ip: str) -> None:
        """An admitted connection from ``ip`` ended."""
        self.open -= 1
        count = self._by_ip.get(ip, 0) - 1
        if count > 0:
            self._by_ip[ip] = count
        else:
            self._by_ip.pop(ip, None)  # the map holds only addresses with open connections

    def lend(self, ip: str) -> None:
        """An admitted connection from ``ip`` waits in a long poll: its session counts for it.

        Matched by one ``reclaim`` when the wait ends, however it ends.
        """
        self.release(ip)

    def reclaim(self, ip: str) -> None:
        """A connection ``lend`` set aside is counted again, over the limits or not.

        It was admitted, and it is no new descriptor: what a limit bounds
        (descriptors, sessions) does not grow. Until it closes or waits again,
        newcomers may be refused a little earlier.
        """
        self.open += 1
        self._by_ip[ip] = self._by_ip.get(ip, 0) + 1

    def note_refusal(self, now: float) -> None:
        """Count a refused connection; log how many, at most once per ``REFUSAL_LOG_INTERVAL``."""
        self.refused += 1
        self._refused_unlogged += 1
        if now - self._refusal_logged_at >= REFUSAL_LOG_INTERVAL:
            log.warning(
                "refused %d connections over the limits since the last such line "
                "(%d open; limits: %d in total, %s per address)",
                self._refused_unlogged,
                self.open,
                self.max_total,
                self.max_per_ip or "none",
                extra={"event": "connections_refused", "refused": self._refused_unlogged},
            )
            self._refusal_logged_at, self._refused_unlogged = now, 0


def _peer_ip(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    return str(address[0]) if isinstance(address, tuple) else str(address)


async def accept_connections(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream, str], Awaitable[None]],
    handlers: trio.Nursery,
    gate: ConnectionGate,
) -> None:
    """Accept forever, starting ``handler`` in ``handlers`` for each admitted connection.

    ``handler`` gets the stream and the peer address it is counted under.

    The listener is closed when this returns (it is cancelled to stop accepting).

    Raises:
        OSError: accept failed for a reason other than resource exhaustion.
    """
    try:
        await _accept_forever(listener, handler, handlers, gate)
    finally:
        listener.socket.close()  # sync: no checkpoint while being cancelled


async def _accept_forever(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream, str], Awaitable[None]],
    handlers: trio.Nursery,
    gate: ConnectionGate,
) -> None:
    pause = FIRST_PAUSE_INTERVAL
    failures = 0
    last_logged_at = -LOG_INTERVAL
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in CAPACITY_ERRNOS:
                raise
            # The connection stays in the backlog; retrying at once would spin.
            failures += 1
            now = trio.current_time()
            if now - last_logged_at >= LOG_INTERVAL:
                log.warning(
                    "cannot accept connections: %s (%s); pausing accepts "
                    "(%d failed accepts since the last such line)",
                    errno.errorcode.get(exc.errno or 0, "?"),
                    exc.strerror,
                    failures,
                    extra={"event": "accept_failed", "reason": errno.errorcode.get(exc.errno or 0)},
                )
                last_logged_at, failures = now, 0
            await trio.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE_INTERVAL)
            continue
        pause = FIRST_PAUSE_INTERVAL
        ip = _peer_ip(stream)
        over = gate.admit(ip)
        if over is None:
            handlers.start_soon(_serve, stream, ip, handler, gate)
            continue
        gate.note_refusal(trio.current_time())
        if len(gate._refusing) >= MAX_REFUSING:
            gate._refusing.popleft().cancel()  # its task closes that socket
        waiting = trio.CancelScope(deadline=trio.current_time() + REFUSAL_TIMEOUT)
        gate._refusing.append(waiting)
        handlers.start_soon(_refuse, stream, over.response, gate, waiting)


async def _serve(
    stream: trio.SocketStream,
    ip: str,
    handler: Callable[[trio.SocketStream, str], Awaitable[None]],
    gate: ConnectionGate,
) -> None:
    try:
        await handler(stream, ip)
    finally:
        gate.release(ip)


async def _refuse(
    stream: trio.SocketStream, refusal: bytes, gate: ConnectionGate, waiting: trio.CancelScope
) -> None:
    """Answer, end our side, and let the client read the answer before closing.

    Closing with the request unread would make the kernel send a reset, which
    can destroy the answer before the client reads it; so read and discard
    until the client closes, within ``waiting`` (``REFUSAL_TIMEOUT``, or until
    a newer refusal needs the place).
    """
    try:
        with waiting:
            try:
                # A fresh socket's send buffer takes the small answer at once.
                await stream.send_all(refusal)
                stream.socket.shutdown(socket.SHUT_WR)
                while await stream.receive_some(4096):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
    finally:
        with suppress(ValueError):  # not there when a newer refusal ended this wait
            gate._refusing.remove(waiting)
        stream.socket.close()
