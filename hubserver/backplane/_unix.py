"""The parent-process broker of ``--workers``, spoken over a unix socket.

Worker processes of one machine share one event stream without Redis: the
parent runs a ``MemoryBackplane`` behind ``BrokerServer``, and every worker
uses ``UnixBackplane``, which implements the same ``Backplane`` contract.

Wire: frames of a 4-byte big-endian length and a MessagePack array.
Requests ``["pub", id, [[hub, site, user, event_id, prefix], ...]]`` and
``["hist", id, hub, site, after_seq]`` are answered ``["ok", id, ...]`` or
``["err", id, text]``; ``["sub"]`` turns a connection into a stream of
``["ev", [[hub, site, user, event_id, seq, text], ...]]`` pushes, one per
published batch, in publish order.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import msgpack
import trio

from ._contract import BackplaneError, BackplaneUnavailable, History, NumberedEvent, PendingEvent
from ._memory import MemoryBackplane

__all__ = ["BrokerServer", "UnixBackplane"]

log = logging.getLogger("hubserver.backplane.unix")

_HEADER: Final = struct.Struct("!I")
MAX_FRAME_BYTES: Final = 64 << 20
#: A worker's subscription may fall this far behind before it is cut off; it
#: reconnects and recovers the rest from history.
MAX_SUBSCRIBER_BACKLOG_BYTES: Final = 64 << 20


def _pack(value: object) -> bytes:
    body: bytes = msgpack.packb(value, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


def _numbered_row(event: NumberedEvent) -> list[object]:
    return [
        event.hub,
        event.site_id,
        event.user_id,
        event.event_id,
        event.seq,
        event.text,
        event.epoch,
    ]


def _numbered(row: Sequence[object]) -> NumberedEvent:
    hub, site_id, user_id, event_id, seq, text, epoch = row
    return NumberedEvent(
        hub=str(hub),
        site_id=str(site_id),
        user_id=None if user_id is None else str(user_id),
        event_id=str(event_id),
        seq=int(seq),  # type: ignore[call-overload]  # msgpack gives an int here
        text=str(text),
        epoch=str(epoch),
    )


class _FrameReader:
    """Reads length-prefixed MessagePack frames from a stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def next(self) -> list[object] | None:
        while True:
            if len(self._buffer) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self._buffer)
                if size > MAX_FRAME_BYTES:
                    raise BackplaneError(f"broker frame of {size} bytes is over the limit")
                end = _HEADER.size + size
                if len(self._buffer) >= end:
                    body = bytes(self._buffer[_HEADER.size : end])
                    del self._buffer[:end]
                    value = msgpack.unpackb(body, raw=False)
                    if not isinstance(value, list):
                        raise BackplaneError("broker frame is not an array")
                    return value
            data = await self._stream.receive_some(65536)
            if not data:
                return None
            self._buffer += data


class BrokerServer:
    """Serves a ``MemoryBackplane`` to worker processes on a unix socket."""

    def __init__(self, backplane: MemoryBackplane, path: Path) -> None:
        self._backplane = backplane
        self._path = path
        self._listener: trio.SocketListener | None = None

    @property
    def backplane(self) -> MemoryBackplane:
        return self._backplane

    def listen(self) -> None:
        """Bind the socket now (synchronously), so workers can connect before ``serve``."""
        if self._listener is not None:
            return
        self._path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self._path))
            self._path.chmod(0o600)  # only our own user's processes may publish
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self._listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.listen()
        listener = self._listener
        assert listener is not None
        async with listener:
            task_status.started()
            try:
                await trio.serve_listeners(self._handle, [listener])
            finally:
                self._path.unlink(missing_ok=True)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                await self._conversation(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, BackplaneError) as exc:
            log.info("broker connection ended: %s", exc)
        except Exception:
            log.exception("broker connection failed")

    async def _conversation(self, stream: trio.SocketStream) -> None:
        reader = _FrameReader(stream)
        while True:
            request = await reader.next()
            if request is None:
                return
            op = request[0]
            if op == "sub":
                await self._stream_events(stream, reader)
                return
            request_id = request[1] if len(request) > 1 else None
            try:
                reply = await self._answer(op, request)
            except (ValueError, TypeError, BackplaneError) as exc:
                reply = ["err", request_id, f"bad request: {exc}"]
            await stream.send_all(_pack(reply))

    async def _answer(self, op: object, request: list[object]) -> list[object]:
        if op == "pub":
            rows = request[2]
            assert isinstance(rows, list)
            pending = [
                PendingEvent(hub=h, site_id=s, user_id=u, event_id=i, prefix=p)
                for h, s, u, i, p in rows
            ]
            numbered = await self._backplane.publish(pending)
            return ["ok", request[1], [_numbered_row(event) for event in numbered]]
        if op == "ping":
            await trio.lowlevel.checkpoint()
            return ["ok", request[1]]
        if op == "hist":
            _, request_id, hub, site_id, after = request
            history = await self._backplane.history(str(hub), str(site_id), int(after))  # type: ignore[call-overload]
            rows = [_numbered_row(event) for event in history.events]
            return ["ok", request_id, rows, history.first_seq, history.last_seq, history.epoch]
        raise ValueError(f"unknown operation {op!r}")

    async def _stream_events(self, stream: trio.SocketStream, reader: _FrameReader) -> None:
        outbox: list[bytes] = []
        backlog = 0
        wake = trio.lowlevel.ParkingLot()
        overflowed = False

        def deliver(events: Sequence[NumberedEvent]) -> None:
            nonlocal backlog, overflowed
            frame = _pack(["ev", [_numbered_row(event) for event in events]])
            outbox.append(frame)
            backlog += len(frame)
            if backlog > MAX_SUBSCRIBER_BACKLOG_BYTES:
                overflowed = True
            wake.unpark()

        async def write() -> None:
            nonlocal backlog
            while not overflowed:
                if not outbox:
                    await wake.park()
                    continue
                data = b"".join(outbox)
                outbox.clear()
                backlog = 0
                await stream.send_all(data)
            log.warning("a worker's subscription fell too far behind; cutting it off")

        async with trio.open_nursery() as nursery:
            await nursery.start(self._backplane.run, deliver, lambda: None)
            await stream.send_all(_pack(["subscribed"]))
            nursery.start_soon(write)
            # The worker sends nothing more; its end of the stream ends the subscription.
            while await reader.next() is not None:
                pass
            nursery.cancel_scope.cancel()


class UnixBackplane:
    """A worker's ``Backplane``: the parent's broker over a unix socket.

    Args:
        path: the broker's socket.
        op_timeout: seconds a publish or history request may take.
    """

    def __init__(
        self, path: Path | str, *, op_timeout: float = 2.0, max_connections: int = 4
    ) -> None:
        self._path = str(path)
        self._op_timeout = op_timeout
        # A few connections, each one request at a time: concurrent publishes of
        # one worker do not wait for each other's round trip to the parent.
        self._idle: list[tuple[trio.SocketStream, _FrameReader]] = []
        self._limiter = trio.CapacityLimiter(max_connections)
        self._ids = 0
        self._available = True
        self._running = False

    @property
    def is_available(self) -> bool:
        return self._available

    async def _request(self, request: list[object]) -> list[object]:
        async with self._limiter:
            conn: tuple[trio.SocketStream, _FrameReader] | None = None
            try:
                with trio.fail_after(self._op_timeout):
                    if self._idle:
                        conn = self._idle.pop()
                    else:
                        stream = await trio.open_unix_socket(self._path)
                        conn = (stream, _FrameReader(stream))
                    await conn[0].send_all(_pack(request))
                    reply = await conn[1].next()
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, BackplaneError) as exc:
                await self._close(conn)
                await self._drop()
                self._available = False
                raise BackplaneUnavailable(f"the workers' broker is unreachable: {exc}") from exc
            except trio.Cancelled:
                await self._close(conn)  # a request half done leaves the stream out of step
                raise
            if reply is None:
                await self._close(conn)
                self._available = False
                raise BackplaneUnavailable("the workers' broker closed the connection")
            self._idle.append(conn)
            self._available = True
            if reply[0] != "ok":
                raise BackplaneError(str(reply[2]) if len(reply) > 2 else "broker error")
            return reply

    @staticmethod
    async def _close(conn: tuple[trio.SocketStream, _FrameReader] | None) -> None:
        if conn is not None:
            with trio.CancelScope(shield=True):
                await conn[0].aclose()

    async def _drop(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._close(conn)

    async def publish(self, events: Sequence[PendingEvent]) -> list[NumberedEvent]:
        if not events:
            await trio.lowlevel.checkpoint()
            return []
        self._ids += 1
        rows = [[e.hub, e.site_id, e.user_id, e.event_id, e.prefix] for e in events]
        reply = await self._request(["pub", self._ids, rows])
        return [_numbered(row) for row in reply[2]]  # type: ignore[attr-defined]

    async def history(self, hub: str, site_id: str, after_seq: int) -> History:
        self._ids += 1
        reply = await self._request(["hist", self._ids, hub, site_id, after_seq])
        _, _, rows, first_seq, last_seq, epoch = reply
        return History(
            epoch=str(epoch),
            events=[_numbered(row) for row in rows],  # type: ignore[attr-defined]
            first_seq=None if first_seq is None else int(first_seq),  # type: ignore[call-overload]
            last_seq=int(last_seq),  # type: ignore[call-overload]
        )

    async def run(
        self,
        deliver: Callable[[Sequence[NumberedEvent]], None],
        on_reconnect: Callable[[], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if self._running:
            raise BackplaneError("UnixBackplane.run is already running")
        self._running = True
        delay = 0.05
        first = True
        try:
            while True:
                try:
                    stream = await trio.open_unix_socket(self._path)
                except OSError as exc:
                    self._available = False
                    log.warning("broker unreachable (%s); retrying in %.2f s", exc, delay)
                    await trio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                async with stream:
                    reader = _FrameReader(stream)
                    try:
                        await stream.send_all(_pack(["sub"]))
                        with trio.fail_after(self._op_timeout):
                            ack = await reader.next()
                        if ack != ["subscribed"]:
                            raise BackplaneError("the broker did not confirm the subscription")
                        self._available = True
                        delay = 0.05
                        if first:
                            first = False
                            task_status.started()
                        else:
                            on_reconnect()
                        while (frame := await reader.next()) is not None:
                            if frame[0] == "ev":
                                deliver([_numbered(row) for row in frame[1]])  # type: ignore[attr-defined]
                    except (
                        OSError,
                        trio.BrokenResourceError,
                        trio.TooSlowError,
                        BackplaneError,
                    ) as exc:
                        log.warning("broker subscription lost: %s", exc)
                self._available = False
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
        finally:
            self._running = False
            await self._drop()

    async def ping(self) -> None:
        """Round trip to the broker (readiness)."""
        self._ids += 1
        await self._request(["ping", self._ids])

    async def aclose(self) -> None:
        await self._drop()
