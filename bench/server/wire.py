"""Sans-IO pieces of the load client: the upgrade, WebSocket frames, exact counting.

No sockets and no clock here: the load client (``bench.server.loadclient``)
feeds bytes and the time in, and the tests feed synthetic streams.

Counting works on raw bytes, never on parsed JSON. Every event the bench
publishes starts with ``{"n":N,"t":T,"id":"site-S-N",`` (``n``: the
publisher's per-site sequence, ``t``: ``time.time_ns()`` just before the
publish request left, ``S``: the site's number, as in its ``site_id``).
Every server under test delivers that text as a JSON string, so inside a
delivered record it reads ``{\\"n\\":N,\\"t\\":T,\\"id\\":\\"site-S-``: one
regular-expression scan per received chunk finds every event, ``S`` must be
the connection's own site (else the event is *misrouted*: a server that does
not route by site, or routes wrongly, cannot hide it), and ``n`` marks it in
the connection's bitmap of its site's sequences, which makes loss and
duplication exact per site. ``t`` is read for one event in ``sample_every``
only (a latency sample).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import os
import re
from array import array
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "EVENT_PATTERN",
    "SITE_PREFIX",
    "Dialect",
    "Frame",
    "OpeningError",
    "Receiver",
    "Tally",
    "UpgradeResponse",
    "client_frame",
    "next_frame",
    "parse_upgrade_response",
    "site_name",
    "upgrade_request",
]

#: What every site id starts with: ``site-00042`` is site 42.
SITE_PREFIX: Final = "site-"
#: An event inside a delivered record: the JSON-escaped ``"n":N,"t":T,"id":"site-S-``
#: (groups: n, t, the site's digits S).
EVENT_PATTERN: Final = re.compile(rb'\\"n\\":(\d+),\\"t\\":(\d+),\\"id\\":\\"site-(\d+)-')
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

SIGNALR_HANDSHAKE: Final = b'{"protocol":"json","version":1}\x1e'
SIGNALR_HANDSHAKE_OK: Final = b"{}\x1e"
SIGNALR_PING: Final = b'{"type":6}\x1e'
ENGINEIO_PING: Final = b"2"
ENGINEIO_PONG: Final = b"3"
ENGINEIO_CONNECT: Final = b"40"


def site_name(index: int) -> str:
    """The site id of site ``index`` (``site-00042``), in events and subscriptions alike."""
    return f"{SITE_PREFIX}{index:05d}"


class Dialect(enum.Enum):
    """What the client speaks over the WebSocket."""

    #: SignalR JSON hub protocol (hubserver, aiosignalr, ceiling).
    SIGNALR = "signalr"
    #: Engine.IO v4 + Socket.IO (python-socketio).
    ENGINEIO = "engineio"


class OpeningError(Exception):
    """The server refused or broke the upgrade or the hub handshake."""


# -- the upgrade -----------------------------------------------------------------


def upgrade_request(host: str, port: int, target: str) -> tuple[bytes, bytes]:
    """An HTTP/1.1 WebSocket upgrade request for ``target``; returns it and the expected accept."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + _GUID, usedforsecurity=False).digest())
    request = (
        f"GET {target} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode("ascii")
    return request, accept


@dataclass(frozen=True, slots=True)
class UpgradeResponse:
    """The head of the server's answer to an upgrade, and what came after it."""

    status: int
    headers: dict[bytes, bytes]
    rest: bytes


def parse_upgrade_response(data: bytes) -> UpgradeResponse | None:
    """Parse a response head; None while it is incomplete.

    Raises:
        OpeningError: the head is not HTTP.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > 65536:
            raise OpeningError("response head larger than 64 KiB")
        return None
    lines = data[:end].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise OpeningError(f"not an HTTP response: {lines[0][:80]!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return UpgradeResponse(int(parts[1]), headers, data[end + 4 :])


# -- frames ----------------------------------------------------------------------


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame (RFC 6455 §5.3: every client frame is masked)."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    elif size < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    mask = os.urandom(4)
    if not payload:
        return head + mask
    repeated = (mask * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        size, "big"
    )
    return head + mask + masked


@dataclass(frozen=True, slots=True)
class Frame:
    """Where one complete server frame lies in a buffer."""

    opcode: int
    start: int  # first payload byte
    stop: int  # one past the last payload byte


def next_frame(data: bytes, pos: int) -> Frame | None:
    """The complete frame at ``pos``, or None if it has not fully arrived.

    Raises:
        OpeningError: a masked server frame (RFC 6455 §5.1 forbids it).
    """
    end = len(data)
    if end - pos < 2:
        return None
    second = data[pos + 1]
    if second & 0x80:
        raise OpeningError("the server sent a masked frame")
    size = second & 0x7F
    start = pos + 2
    if size == 126:
        start = pos + 4
        if start > end:
            return None
        size = int.from_bytes(data[pos + 2 : start], "big")
    elif size == 127:
        start = pos + 10
        if start > end:
            return None
        size = int.from_bytes(data[pos + 2 : start], "big")
    stop = start + size
    if stop > end:
        return None
    return Frame(data[pos] & 0x0F, start, stop)


# -- counting --------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """One connection's receive state and exact event counts.

    ``seen[n]`` is 1 once the event with sequence ``n`` of this connection's
    site arrived; ``received`` counts every event that arrived (so duplicates
    are ``received - distinct - foreign - misrouted``). Sequences run from 1
    to ``expected``; anything else is ``foreign``. With ``site`` given, an
    event of another site is ``misrouted`` (and marks nothing); with None
    (a client that does not know its site) every event counts as its own.
    """

    expected: int
    site: int | None = None
    seen: bytearray = field(init=False)
    received: int = 0
    foreign: int = 0
    misrouted: int = 0
    buffer: bytes = b""
    is_closed_by_server: bool = False
    close_reason: bytes = b""
    is_open: bool = False  # past the hub handshake

    #: The site's digits as EVENT_PATTERN captures them (None: not checked).
    site_digits: bytes | None = field(init=False)

    def __post_init__(self) -> None:
        self.seen = bytearray(self.expected + 1)
        self.site_digits = (
            None if self.site is None else site_name(self.site)[len(SITE_PREFIX) :].encode()
        )

    @property
    def distinct(self) -> int:
        return self.seen.count(1, 1)

    @property
    def lost(self) -> int:
        """Sequences 1..expected that never arrived."""
        return self.expected - self.distinct

    @property
    def duplicated(self) -> int:
        """Arrivals beyond the first of a sequence of this connection's site."""
        return self.received - self.foreign - self.misrouted - self.distinct


class Receiver:
    """Parses server frames for every connection of a process, and samples latency.

    Args:
        dialect: what the connections speak.
        sample_every: read ``t`` of one event in this many.
    """

    def __init__(self, dialect: Dialect, sample_every: int = 10) -> None:
        if sample_every < 1:
            raise ValueError("sample_every must be >= 1")
        self.dialect = dialect
        self.sample_every = sample_every
        self.latencies_ns: array[int] = array("q")
        self.last_delivery_ns = 0
        #: Data frames and reads (``feed`` calls) so far, over every connection:
        #: events per frame show how a server batches its writes.
        self.frames = 0
        self.reads = 0
        self._skip = 0

    def clear_samples(self) -> None:
        self.latencies_ns = array("q")
        self._skip = 0

    def feed(self, tally: Tally, data: bytes, now_ns: int) -> bytes:
        """Take bytes received on an open connection; returns bytes to send back.

        Whole frames are consumed; a partial one waits in ``tally.buffer``.
        The replies answer WebSocket pings (pong) and Engine.IO pings (``3``).
        """
        if tally.buffer:
            data = tally.buffer + data
        end = len(data)
        pos = 0
        frames = 0
        replies = b""
        is_engineio = self.dialect is Dialect.ENGINEIO
        # The hot loop: walk frame headers only; payloads are scanned below in one go.
        while end - pos >= 2:
            second = data[pos + 1]
            size = second & 0x7F
            if size < 126:
                start = pos + 2
            elif size == 126:
                start = pos + 4
                if start > end:
                    break
                size = (data[pos + 2] << 8) | data[pos + 3]
            else:
                start = pos + 10
                if start > end:
                    break
                size = int.from_bytes(data[pos + 2 : start], "big")
            stop = start + size
            if stop > end:
                break
            opcode = data[pos] & 0x0F
            if opcode >= OP_CLOSE or second & 0x80:
                replies += self._control(tally, opcode, data[start:stop], is_masked=second >= 0x80)
            elif is_engineio and size == 1 and data[start] == 0x32:  # "2": Engine.IO ping
                replies += client_frame(OP_TEXT, ENGINEIO_PONG)
            else:
                frames += 1
            pos = stop
        self.frames += frames
        self.reads += 1
        if pos:
            self._count(tally, EVENT_PATTERN.findall(data, 0, pos), now_ns)
        tally.buffer = data[pos:] if pos < end else b""
        return replies

    def _count(self, tally: Tally, matches: list[tuple[bytes, bytes, bytes]], now_ns: int) -> None:
        count = len(matches)
        if not count:
            return
        tally.received += count
        self.last_delivery_ns = now_ns
        seen = tally.seen
        digits = tally.site_digits
        is_clean = True
        try:
            for n, _t, site in matches:
                if site != digits and digits is not None:
                    is_clean = False
                    break
                seen[int(n)] = 1
            is_clean = is_clean and not seen[0]
        except IndexError:
            is_clean = False
        if not is_clean:
            # Another site's event, or some n outside 1..expected: recount this
            # chunk carefully (marking is idempotent, so what the fast loop did
            # stays right; it marked only this site's events).
            seen[0] = 0
            for n, _t, site in matches:
                if site != digits and digits is not None:
                    tally.misrouted += 1
                    continue
                index = int(n)
                if 1 <= index < len(seen):
                    seen[index] = 1
                else:
                    tally.foreign += 1
        skip = self._skip
        if skip < count:
            every = self.sample_every
            append = self.latencies_ns.append
            for index in range(skip, count, every):
                append(now_ns - int(matches[index][1]))
        self._skip = (skip - count) % self.sample_every

    def _control(self, tally: Tally, opcode: int, payload: bytes, *, is_masked: bool) -> bytes:
        if is_masked:
            raise OpeningError("the server sent a masked frame")
        if opcode == OP_PING:
            return client_frame(OP_PONG, payload)
        if opcode == OP_CLOSE:
            if not tally.is_closed_by_server:
                tally.is_closed_by_server = True
                tally.close_reason = payload[2:200]
                return client_frame(OP_CLOSE, payload[:2])
            return b""
        return b""  # pong, or a reserved opcode: nothing to answer


# -- the opening handshake (after the 101) ---------------------------------------


def opening_frames(dialect: Dialect) -> bytes:
    """What the client sends right after the 101 (SignalR: the hub handshake)."""
    if dialect is Dialect.SIGNALR:
        return client_frame(OP_TEXT, SIGNALR_HANDSHAKE)
    return b""  # Engine.IO: the server speaks first (the open packet)


def feed_opening(dialect: Dialect, tally: Tally, data: bytes) -> tuple[bool, bytes, bytes]:
    """Consume opening frames until the connection is open.

    Returns:
        (is_open, bytes to send, bytes left over for ``Receiver.feed``).

    Raises:
        OpeningError: a handshake error, a close, or an unexpected frame.
    """
    if tally.buffer:
        data = tally.buffer + data
        tally.buffer = b""
    pos = 0
    replies = b""
    while (frame := next_frame(data, pos)) is not None:
        payload = data[frame.start : frame.stop]
        pos = frame.stop
        if frame.opcode == OP_PING:
            replies += client_frame(OP_PONG, payload)
            continue
        if frame.opcode == OP_CLOSE:
            raise OpeningError(f"closed during the handshake: {payload[2:120]!r}")
        if frame.opcode not in (OP_TEXT, OP_BINARY):
            continue
        if dialect is Dialect.SIGNALR:
            if not payload.startswith(SIGNALR_HANDSHAKE_OK):
                raise OpeningError(f"hub handshake refused: {payload[:120]!r}")
            tally.is_open = True
            rest = payload[len(SIGNALR_HANDSHAKE_OK) :]
            # Records that shared the handshake's frame go through the counter as
            # a frame of their own, followed by whatever else arrived.
            head = _server_frame(frame.opcode, rest) if rest else b""
            return True, replies, head + data[pos:]
        if payload.startswith(b"0{"):  # Engine.IO open packet
            replies += client_frame(OP_TEXT, ENGINEIO_CONNECT)
        elif payload.startswith(b"40"):  # Socket.IO connected to namespace "/"
            tally.is_open = True
            return True, replies, data[pos:]
        elif payload == ENGINEIO_PING:
            replies += client_frame(OP_TEXT, ENGINEIO_PONG)
        elif payload.startswith(b"44"):
            raise OpeningError(f"Socket.IO connect refused: {payload[:120]!r}")
    tally.buffer = data[pos:]
    return False, replies, b""


def _server_frame(opcode: int, payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 1 << 16:
        return bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big") + payload
