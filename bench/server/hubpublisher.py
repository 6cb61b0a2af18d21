"""The publisher over hubserver's publisher hub: ``Publish`` invocations on WebSockets.

``/v1/hub/publish`` (issue #10, item 3) is a SignalR hub for publishers. The
bench speaks its JSON protocol directly, the same way the load client does
(``bench.server.wire``), so the publisher's own cost stays small and is
measured apart (pub CPU):

- upgrade ``GET /v1/hub/publish?access_token=TOKEN`` (skipNegotiation), send
  the handshake ``{"protocol":"json","version":1}\\x1e``, expect ``{}\\x1e``;
- per request: ``{"type":1,"invocationId":"7","target":"Publish",
  "arguments":["entries",EVENT or [EVENT, ...]]}\\x1e``, answered by a
  Completion ``{"type":3,"invocationId":"7","result":{"accepted":n,...}}``
  or ``{"type":3,"invocationId":"7","error":"..."}``;
- the server's Pings (``{"type":6}``) are ignored; the client sends its own
  Ping when a connection has been quiet for ``PING_INTERVAL`` seconds, so
  the server's client timeout (30 s) never closes a publisher between rows.

Shape (the same as the HTTP publisher's): ``connections`` WebSocket
connections, one invocation in flight on each, so ``--publish-connections
W`` means W publishes in flight either way; a request of several events
(batch mode) is one invocation with an array. Every client frame is masked
(RFC 6455 §5.3). When the server's dispatch window is full it stops reading
from the publisher; the unsent rest of a frame then waits for the socket to
take it, as with HTTP.
"""

from __future__ import annotations

import json
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote

from bench.profile import BenchError
from bench.server.publishloop import PublishLoop, PublishResult
from bench.server.wire import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    SIGNALR_HANDSHAKE,
    SIGNALR_PING,
    OpeningError,
    client_frame,
    next_frame,
    parse_upgrade_response,
    upgrade_request,
)

__all__ = [
    "HUB_PUBLISH_PATH",
    "HubClosed",
    "HubPublisher",
    "HubReader",
    "publish_invocation",
]

HUB_PUBLISH_PATH: Final = "/v1/hub/publish"
#: Seconds of silence after which the publisher sends a Ping (the server's
#: client timeout is 30 s, its own keep-alive 15 s).
PING_INTERVAL: Final = 10.0
_RECEIVE_BYTES: Final = 65536
_RECORD_SEPARATOR: Final = b"\x1e"
_MAX_RECORD_BYTES: Final = 16 * 2**20
_CLOSE_NORMAL: Final = b"\x03\xe8"


def publish_invocation(invocation_id: int, hub: str, events: bytes) -> bytes:
    """The ``Publish(hub, events)`` invocation record (JSON hub protocol).

    ``events`` is already JSON (one object or an array) and goes in as it is:
    no parse and no re-encode per request.
    """
    return b'{"type":1,"invocationId":"%d","target":"Publish","arguments":["%s",%s]}\x1e' % (
        invocation_id,
        hub.encode("ascii"),
        events,
    )


class HubClosed(Exception):
    """The server closed the hub connection (a Close record or a WebSocket close)."""


class HubReader:
    """Server bytes in, SignalR records out (sans-IO): frames, then 0x1E-separated JSON.

    Records may share a frame or span several; control frames are answered
    (a ping gets a masked pong, in ``replies``) or raise ``HubClosed``.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._text = b""
        #: Masked frames to send back (pongs, the answer to a close).
        self.replies = b""

    def feed(self, data: bytes) -> list[dict[str, object]]:
        """Take received bytes; return the complete records they finish, in order.

        Raises:
            HubClosed: a WebSocket close frame, or a Close record (type 7).
            OpeningError: the server broke the protocol (a masked frame, bad JSON).
        """
        data = self._buffer + data if self._buffer else data
        pos = 0
        records: list[dict[str, object]] = []
        while (frame := next_frame(data, pos)) is not None:
            payload = data[frame.start : frame.stop]
            pos = frame.stop
            if frame.opcode == OP_PING:
                self.replies += client_frame(OP_PONG, payload)
            elif frame.opcode == OP_CLOSE:
                self.replies += client_frame(OP_CLOSE, payload[:2] or _CLOSE_NORMAL)
                self._buffer = b""
                reason = payload[2:200].decode("utf-8", "replace")
                raise HubClosed(f"WebSocket close {payload[:2].hex()} {reason}".strip())
            elif frame.opcode < OP_CLOSE:  # text, binary or a continuation
                records += self._records(payload)
        self._buffer = data[pos:]
        return records

    def _records(self, payload: bytes) -> list[dict[str, object]]:
        text = self._text + payload if self._text else payload
        *complete, self._text = text.split(_RECORD_SEPARATOR)
        if len(self._text) > _MAX_RECORD_BYTES:
            raise OpeningError("a hub record larger than 16 MiB")
        records = []
        for raw in complete:
            try:
                record = json.loads(raw)
            except ValueError as exc:
                raise OpeningError(f"not a JSON hub record: {raw[:80]!r}") from exc
            if not isinstance(record, dict):
                raise OpeningError(f"not a JSON hub record: {raw[:80]!r}")
            if record.get("type") == 7:
                error = record.get("error")
                raise HubClosed(f"hub Close: {error}" if error else "hub Close")
            records.append(record)
        return records


@dataclass(slots=True, eq=False)
class _HubConn:
    sock: socket.socket
    reader: HubReader
    out: bytes = b""
    next_id: int = 1
    waiting_id: str | None = None  # the invocation in flight
    events: int = 0  # events in that invocation
    last_send: float = field(default_factory=time.monotonic)

    @property
    def is_busy(self) -> bool:
        return self.waiting_id is not None


class HubPublisher(PublishLoop[_HubConn]):
    """Publishes requests as ``Publish`` invocations over ``connections`` hub connections.

    The same interface as ``bench.server.publisher.Publisher``: ``run`` then ``close``.

    Raises:
        BenchError: (from the constructor) a connection could not be opened:
            refused, no 101 (a server without the publisher hub answers 404),
            or the hub handshake failed.
    """

    _REQUESTS = "invocations"
    _ANSWER = "completion"

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        token: str | None,
        *,
        hub: str = "entries",
        connections: int = 4,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self.hub = hub
        self._target = path if token is None else f"{path}?access_token={quote(token, safe='')}"
        self._open_all(connections)

    # -- opening -------------------------------------------------------------------

    def _open(self) -> _HubConn:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise BenchError(f"publisher hub: cannot connect: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = HubReader()
            rest = self._upgrade(sock)
            sock.sendall(client_frame(OP_TEXT, SIGNALR_HANDSHAKE))
            self._handshake(sock, reader, rest)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise BenchError(f"publisher hub: opening failed: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        conn = _HubConn(sock, reader)
        self._selector.register(sock, selectors.EVENT_READ, conn)
        return conn

    def _upgrade(self, sock: socket.socket) -> bytes:
        request, accept = upgrade_request(self.host, self.port, self._target)
        sock.sendall(request)
        head = b""
        try:
            while (response := parse_upgrade_response(head)) is None:
                data = sock.recv(_RECEIVE_BYTES)
                if not data:
                    raise BenchError("publisher hub: the server closed during the upgrade")
                head += data
        except OpeningError as exc:
            raise BenchError(f"publisher hub: {exc}") from exc
        if response.status != 101:
            body = response.rest[:160].decode("utf-8", "replace")
            raise BenchError(
                f"publisher hub: GET {HUB_PUBLISH_PATH} answered {response.status}, not 101 "
                f"(does this server have the publisher hub?) {body}".rstrip()
            )
        if response.headers.get(b"sec-websocket-accept") != accept:
            raise BenchError("publisher hub: wrong Sec-WebSocket-Accept")
        return response.rest

    @staticmethod
    def _handshake(sock: socket.socket, reader: HubReader, data: bytes) -> None:
        """Read until the handshake response ``{}`` (the first record); more is an error."""
        try:
            while True:
                records = reader.feed(data) if data else []
                if reader.replies:
                    sock.sendall(reader.replies)
                    reader.replies = b""
                if records:
                    answer = records[0]
                    if answer.get("error"):
                        raise BenchError(f"publisher hub: handshake refused: {answer['error']}")
                    if answer:
                        raise BenchError(f"publisher hub: unexpected handshake answer {answer}")
                    if len(records) > 1 and any(r.get("type") != 6 for r in records[1:]):
                        raise BenchError(f"publisher hub: records before any call: {records[1:]}")
                    return
                data = sock.recv(_RECEIVE_BYTES)
                if not data:
                    raise BenchError("publisher hub: the server closed during the handshake")
        except (HubClosed, OpeningError) as exc:
            raise BenchError(f"publisher hub: handshake failed: {exc}") from exc

    # -- publishing ----------------------------------------------------------------

    def _start(self, conn: _HubConn, body: bytes) -> bytes:
        invocation_id = conn.next_id
        conn.next_id += 1
        conn.waiting_id = str(invocation_id)
        return client_frame(OP_TEXT, publish_invocation(invocation_id, self.hub, body))

    def _tick(self, now: float) -> None:
        """Ping each connection quiet for ``PING_INTERVAL``, so the server keeps it."""
        for conn in self._conns:
            if not conn.out and now - conn.last_send > PING_INTERVAL:
                self._send(conn, client_frame(OP_TEXT, SIGNALR_PING))

    def _take(self, conn: _HubConn, data: bytes, result: PublishResult) -> bool:
        """Take the completions; False when the connection is over."""
        reason = "connection closed"
        records: list[dict[str, object]] = []
        if data:
            try:
                records = conn.reader.feed(data)
            except HubClosed as exc:
                reason = str(exc)
                data = b""
            except OpeningError as exc:
                reason = f"protocol error: {exc}"
                data = b""
            if conn.reader.replies:
                replies, conn.reader.replies = conn.reader.replies, b""
                self._send(conn, replies)
        for record in records:
            self._complete(conn, record, result)
        if data:
            return True
        if conn.is_busy:
            conn.waiting_id = None
            result.errors[f"{reason[:160]} before the completion"] += 1
        return False

    @staticmethod
    def _complete(conn: _HubConn, record: dict[str, object], result: PublishResult) -> None:
        kind = record.get("type")
        if kind == 6:  # the server's keep-alive Ping
            return
        if kind != 3 or record.get("invocationId") != conn.waiting_id:
            result.errors[f"unexpected hub record: {str(record)[:120]}"] += 1
            return
        conn.waiting_id = None
        result.last_response_ns = time.time_ns()
        error = record.get("error")
        answer = record.get("result")
        accepted = answer.get("accepted") if isinstance(answer, dict) else None
        if error is not None:
            result.errors[f"Publish error: {str(error)[:160]}"] += 1
        elif accepted != conn.events:
            result.errors[f"Publish accepted {accepted!r} of {conn.events} events"] += 1
        else:
            result.ok += 1
            result.events_accepted += conn.events
