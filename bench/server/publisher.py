"""The publisher: HTTP/1.1 POSTs of events over a few keep-alive connections.

Runs in the bench's own process, in a selectors loop. Each event is
``{"n":N,"t":T,"id":...,"site_id":...,<a typical entry>}``: ``n`` is the
per-site sequence the clients check, ``t`` is ``time.time_ns()`` taken just
before its request is written (one ``t`` per request in batch mode). The
rest comes from ``bench.workload``, so events look like real entries.
"""

from __future__ import annotations

import json
import random
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Final

from bench.profile import BenchError
from bench.server.publishloop import PublishLoop, PublishResult, Request
from bench.server.wire import site_name
from bench.workload import access_entries

__all__ = [
    "SPREADS",
    "EventFactory",
    "PublishResult",
    "Publisher",
    "Request",
    "plan_requests",
    "site_name",
]

_VARIANTS: Final = 64


class EventFactory:
    """Builds event JSON from a seeded set of typical entries."""

    def __init__(self, sites: int, seed: int = 1) -> None:
        self._names = [site_name(i).encode() for i in range(sites)]
        tails = []
        for text in access_entries(_VARIANTS, seed):
            entry = json.loads(text)
            for key in ("id", "site_id", "seq"):
                entry.pop(key, None)
            # hubserver routes on user_id too, and wants it as a string.
            entry["user_id"] = f"user-{entry['user_id']}"
            body = json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode()
            tails.append(b"," + body[1:])  # ',"lock_id":...}'
        self._tails = tails

    def event(self, site: int, n: int, t: int) -> bytes:
        name = self._names[site]
        return (
            b'{"n":%d,"t":%d,"id":"%s-%d","site_id":"%s"'
            % (
                n,
                t,
                name,
                n,
                name,
            )
            + self._tails[n % _VARIANTS]
        )

    def body(self, request: Request, t: int) -> bytes:
        """One event as an object, several as an array."""
        if len(request) == 1:
            site, n = request[0]
            return self.event(site, n, t)
        return b"[" + b",".join(self.event(site, n, t) for site, n in request) + b"]"


#: How ``plan_requests`` spreads the events over the sites.
SPREADS: Final = ("round-robin", "random")


def plan_requests(
    sites: int,
    first_n: int,
    events_per_site: int,
    batch: int,
    *,
    spread: str = "round-robin",
    seed: int = 1,
) -> list[list[tuple[int, int]]]:
    """Events n = first_n .. first_n + events_per_site - 1 of every site, cut into
    requests of ``batch`` events.

    ``spread`` orders them: ``round-robin`` takes the sites in turn (site 0, 1,
    ..., then again); ``random`` is a seeded shuffle of the same events (the
    same ``seed``, the same order). Either way each site's events keep their
    order (n increasing), and every site has the same number of events.
    """
    last = first_n + events_per_site
    if spread == "round-robin":
        events = [(site, n) for n in range(first_n, last) for site in range(sites)]
    elif spread == "random":
        order = [site for site in range(sites) for _ in range(events_per_site)]
        random.Random(seed).shuffle(order)
        next_n = [first_n] * sites
        events = []
        for site in order:
            events.append((site, next_n[site]))
            next_n[site] += 1
    else:
        raise ValueError(f"unknown spread {spread!r}; choose from {', '.join(SPREADS)}")
    return [events[i : i + batch] for i in range(0, len(events), batch)]


@dataclass(slots=True, eq=False)
class _HttpConn:
    sock: socket.socket
    inbox: bytes = b""
    out: bytes = b""
    events: int = 0  # events in the request awaiting its response
    is_busy: bool = False
    last_send: float = field(default_factory=time.monotonic)


class Publisher(PublishLoop[_HttpConn]):
    """POSTs requests to ``path`` over ``connections`` keep-alive connections."""

    _REQUESTS = "requests"
    _ANSWER = "response"

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        token: str | None,
        *,
        connections: int = 4,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self._head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode("ascii")
        self._open_all(connections)

    def _open(self) -> _HttpConn:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn = _HttpConn(sock)
        self._selector.register(sock, selectors.EVENT_READ, conn)
        return conn

    def _start(self, conn: _HttpConn, body: bytes) -> bytes:
        conn.is_busy = True
        return self._head + b"%d\r\n\r\n" % len(body) + body

    def _take(self, conn: _HttpConn, data: bytes, result: PublishResult) -> bool:
        """A complete response clears busy. False when the connection is over (closed
        under a request, or ``Connection: close``)."""
        if not data:
            if conn.is_busy:
                conn.is_busy = False
                result.errors["connection closed before the response"] += 1
                result.statuses[0] += 1
                return False
            return True
        conn.inbox += data
        head_end = conn.inbox.find(b"\r\n\r\n")
        if head_end < 0:
            return True
        head = conn.inbox[:head_end].decode("latin-1")
        lines = head.split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        is_closing = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and "close" in value.lower():
                is_closing = True
            elif name == "transfer-encoding":
                raise BenchError("publisher: chunked responses are not supported")
        if len(conn.inbox) < head_end + 4 + length:
            return True
        body = conn.inbox[head_end + 4 : head_end + 4 + length]
        conn.inbox = conn.inbox[head_end + 4 + length :]
        conn.is_busy = False
        result.statuses[status] += 1
        result.last_response_ns = time.time_ns()
        if 200 <= status < 300:
            result.ok += 1
            result.events_accepted += conn.events
        else:
            result.errors[f"HTTP {status}: {body[:160].decode('utf-8', 'replace')}"] += 1
        return not is_closing
