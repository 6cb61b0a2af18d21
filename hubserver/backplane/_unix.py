"""The parent-process broker of ``--workers``, spoken over a unix socket.

Worker processes of one machine share one event stream without Redis: the
parent runs a ``MemoryBackplane`` behind ``BrokerServer``, and every worker
uses ``UnixBackplane``, which implements the same ``Backplane`` contract.

Wire: frames of a 4-byte big-endian length and a MessagePack array.
Requests ``["pub", id, [[hub, site, user, event_id, prefix], ...]]`` and
``["hist", id, hub, site, after_seq]`` are answered ``["ok", id, ...]`` or
``["err", id, text]``; ``["sub"]`` turns a connection into a stream of
``["ev", [[hub, site, user, event_id, seq, text, epoch, is_duplicate], ...]]``
pushes, one per published batch, in publish order (``pub`` answers rows of
the same shape).

The publishes a worker starts in one scheduling round share one ``pub``
request, so they cost one round trip and reach every worker as one push,
whose events share their subscribers' frames. The parent writes a push to
each worker as the batch is numbered, before it answers the ``pub``: the
worker that published reads its events with the answer, and its dispatcher,
which waits for its own publishes under way, delivers them in the round that
follows (``Broker``).

Beside the event stream, the parent relays small opaque messages between
workers (a permission change notice must reach every worker of the node):
``["msg", id, data]`` is answered ``["ok", id]`` once ``data`` is queued for
every worker listening, itself included; ``["msgs"]`` turns a connection into
a stream of ``["msg", data]`` pushes (``BrokerMessages``).

A publish whose reply is lost after its frame was written whole raises
``PublishOutcomeUnknown`` (the parent may have published it); one that fails
before, or that the parent answers with an error, ``BackplaneUnavailable``.
A frame that does not decode ends that connection (a subscription then
reconnects and the caller recovers from history), never the process.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

import msgpack
import trio

from ._contract import (
    BackplaneError,
    BackplaneUnavailable,
    History,
    NumberedEvent,
    PendingEvent,
    PublishOutcomeUnknown,
)
from ._memory import MemoryBackplane

__all__ = ["BrokerMessages", "BrokerServer", "UnixBackplane"]

log = logging.getLogger("hubserver.backplane.unix")

_HEADER: Final = struct.Struct("!I")
MAX_FRAME_BYTES: Final = 64 << 20
#: Bytes the parent queues for one worker's event stream (frames waiting plus
#: the chunk being written) before it disconnects that worker, which then
#: resubscribes and fetches what it missed from history. The kernel's socket
#: buffer holds a few hundred KiB more.
DEFAULT_MAX_QUEUE_BYTES: Final = 8 << 20
#: Event text (prefix bytes) that publishes of one worker may share in one request.
MAX_SHARED_PUBLISH_BYTES: Final = 1 << 20
#: The longest message one worker may relay to the others (a change notice is
#: under 4 KiB).
MAX_MESSAGE_BYTES: Final = 64 << 10
#: Messages queued for one worker's message stream before the parent
#: disconnects it: it reconnects at once and is told some may have been lost.
MAX_QUEUED_MESSAGES: Final = 1024


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
        event.is_duplicate,
    ]


def _numbered(row: object) -> NumberedEvent:
    """A row of ``_numbered_row`` back as an event; anything else is a ``BackplaneError``."""
    match row:
        case [
            str(hub),
            str(site_id),
            str() | None as user_id,
            str(event_id),
            int(seq),
            str(text),
            str(epoch),
            *rest,
        ] if not isinstance(seq, bool) and rest in ([], [True], [False]):
            return NumberedEvent(
                hub=hub,
                site_id=site_id,
                user_id=user_id,
                event_id=event_id,
                seq=seq,
                text=text,
                epoch=epoch,
                is_duplicate=rest == [True],
            )
    raise BackplaneError(f"expected a numbered event row from the broker, got {_describe(row)}")


def _pending(row: object) -> PendingEvent:
    match row:
        case [str(hub), str(site_id), str() | None as user_id, str(event_id), str(prefix)]:
            return PendingEvent(
                hub=hub, site_id=site_id, user_id=user_id, event_id=event_id, prefix=prefix
            )
    raise BackplaneError(f"expected [hub, site, user, id, prefix], got {_describe(row)}")


async def _follow(
    path: str,
    op: str,
    op_timeout: float,
    what: str,
    *,
    on_frame: Callable[[list[object]], None],
    on_up: Callable[[bool], None],
    on_down: Callable[[], None],
) -> NoReturn:
    """Hold one of the parent's push streams (``op``) open forever, reconnecting.

    ``on_up(is_first)`` once each subscription is confirmed, ``on_frame`` for
    each frame (a ``BackplaneError`` it raises ends that subscription),
    ``on_down`` whenever it is lost. One warning per outage, not per retry:
    a parent that is restarting must not fill the log of every worker.
    """
    delay = 0.05
    is_first = True
    is_down = False

    def lost(reason: object) -> None:
        nonlocal is_down
        on_down()
        log.log(
            logging.DEBUG if is_down else logging.WARNING,
            "broker %s lost (%s); retrying with backoff",
            what,
            reason,
        )
        is_down = True

    while True:
        try:
            stream = await trio.open_unix_socket(path)
        except OSError as exc:
            lost(exc)
        else:
            async with stream:
                reader = _FrameReader(stream)
                try:
                    await stream.send_all(_pack([op]))
                    with trio.fail_after(op_timeout):
                        ack = await reader.next()
                    if ack != ["subscribed"]:
                        raise BackplaneError(f"the broker did not confirm the {what}")
                    delay = 0.05
                    if is_down:
                        is_down = False
                        log.warning("broker %s back", what)
                    on_up(is_first)
                    is_first = False
                    while (frame := await reader.next()) is not None:
                        on_frame(frame)
                    # Not an outage: the parent ends a stream that fell behind.
                    on_down()
                    log.warning("broker closed the %s; resubscribing", what)
                except (
                    OSError,
                    trio.BrokenResourceError,
                    trio.TooSlowError,
                    BackplaneError,
                ) as exc:
                    lost(exc)
        await trio.sleep(delay)
        delay = min(delay * 2, 2.0)


def _describe(value: object) -> str:
    """The shape of a malformed value, without its content (it may be a payload)."""
    if isinstance(value, list):
        return f"an array of {len(value)}: [{', '.join(type(v).__name__ for v in value[:8])}]"
    return type(value).__name__


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
                    try:
                        value = msgpack.unpackb(body, raw=False)
                    except (ValueError, msgpack.UnpackException) as exc:
                        raise BackplaneError(f"broker frame is not MessagePack: {exc}") from exc
                    if not isinstance(value, list) or not value:
                        raise BackplaneError("broker frame is not a non-empty array")
                    return value
            data = await self._stream.receive_some(65536)
            if not data:
                return None
            self._buffer += data


class BrokerServer:
    """Serves a ``MemoryBackplane`` to worker processes on a unix socket.

    Args:
        backplane: numbering, history and fan-out, shared by every worker.
        path: where to listen.
        max_queue_bytes: what may wait for one worker's event stream; over
            it that stream is closed (see ``DEFAULT_MAX_QUEUE_BYTES``).
        max_queued_messages: relayed messages that may wait for one worker;
            over it that worker's message stream is closed.
    """

    def __init__(
        self,
        backplane: MemoryBackplane,
        path: Path,
        *,
        max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES,
        max_queued_messages: int = MAX_QUEUED_MESSAGES,
    ) -> None:
        if max_queue_bytes < 1:
            raise ValueError(f"max_queue_bytes must be positive, got {max_queue_bytes}")
        if max_queued_messages < 1:
            raise ValueError(f"max_queued_messages must be positive, got {max_queued_messages}")
        self._max_queued_messages = max_queued_messages
        self._backplane = backplane
        self._path = path
        self._max_queue_bytes = max_queue_bytes
        self._listener: trio.SocketListener | None = None
        #: Event streams closed because their worker fell too far behind.
        self.streams_dropped = 0
        # The workers' message streams: where a relayed message is queued, and
        # the scope that ends a stream whose worker stopped reading.
        self._listeners: list[_Listener] = []

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
            if op == "msgs":
                await self._stream_messages(stream, reader)
                return
            request_id = request[1] if len(request) > 1 else None
            try:
                reply = await self._answer(op, request)
            except (ValueError, TypeError, BackplaneError) as exc:
                reply = ["err", request_id, f"bad request: {exc}"]
            await stream.send_all(_pack(reply))

    async def _answer(self, op: object, request: list[object]) -> list[object]:
        if op == "pub":
            rows = request[2] if len(request) > 2 else None
            if not isinstance(rows, list):
                raise BackplaneError('expected ["pub", id, rows]')
            pending = [_pending(row) for row in rows]
            numbered = await self._backplane.publish(pending)
            return ["ok", request[1], [_numbered_row(event) for event in numbered]]
        if op == "ping":
            await trio.lowlevel.checkpoint()
            return ["ok", request[1]]
        if op == "msg":
            data = request[2] if len(request) > 2 else None
            if not isinstance(data, bytes) or len(data) > MAX_MESSAGE_BYTES:
                raise BackplaneError(f'expected ["msg", id, data of at most {MAX_MESSAGE_BYTES}]')
            await trio.lowlevel.checkpoint()
            self._relay(data)
            return ["ok", request[1]]
        if op == "hist":
            _, request_id, hub, site_id, after = request
            if not (isinstance(hub, str) and isinstance(site_id, str) and isinstance(after, int)):
                raise BackplaneError('expected ["hist", id, hub, site, after_seq]')
            history = await self._backplane.history(hub, site_id, after)
            rows = [_numbered_row(event) for event in history.events]
            return ["ok", request_id, rows, history.first_seq, history.last_seq, history.epoch]
        raise ValueError(f"unknown operation {op!r}")

    async def _stream_events(self, stream: trio.SocketStream, reader: _FrameReader) -> None:
        outbox: list[bytes] = []
        # Bytes held for this worker: frames in the outbox plus the chunk being
        # written. A worker that stops reading (stopped, swapping, stuck) would
        # otherwise grow the parent without limit and then be skipped silently.
        queued = 0
        # Bytes are on their way that the kernel has not taken (the subscription's
        # confirmation first): a frame may be written directly only when none are.
        is_writing = True
        fd = stream.socket.fileno()
        wake = trio.lowlevel.ParkingLot()

        async with trio.open_nursery() as nursery:

            def deliver(events: Sequence[NumberedEvent]) -> None:
                nonlocal queued
                if nursery.cancel_scope.cancel_called:
                    return  # being dropped: the worker recovers all of it from history
                frame = _pack(["ev", [_numbered_row(event) for event in events]])
                if not outbox and not is_writing:
                    # Written now, before the publish is answered: the worker
                    # that published reads its events with (or before) the
                    # reply, so they join its next dispatch round.
                    try:
                        sent = os.write(fd, frame)
                    except OSError:
                        sent = 0  # full, or failing: the writer finds out which
                    if sent == len(frame):
                        return
                    frame = frame[sent:]
                queued += len(frame)
                # One frame alone never counts as behind (a batch may be larger
                # than a small bound); more waiting behind it over the bound does.
                if queued > self._max_queue_bytes and queued > len(frame):
                    # Disconnect rather than skip: the worker sees its stream end,
                    # resubscribes and its broker fetches the missing seqs from
                    # history, so its clients get every event or a Gap, never a
                    # silent hole. Closing also frees what was queued at once.
                    outbox.clear()
                    self.streams_dropped += 1
                    log.warning(
                        "worker (pid %s) fell %d bytes behind the event stream; "
                        "disconnecting it (it resubscribes and recovers from history)",
                        _peer_pid(stream),
                        queued,
                        extra={"event": "worker_fell_behind"},
                    )
                    nursery.cancel_scope.cancel()
                    return
                outbox.append(frame)
                wake.unpark()

            async def write() -> None:
                nonlocal queued, is_writing
                while True:
                    if not outbox:
                        await wake.park()
                        continue
                    data = b"".join(outbox)
                    outbox.clear()
                    is_writing = True
                    await stream.send_all(data)
                    is_writing = False
                    queued -= len(data)

            await nursery.start(self._backplane.run, deliver, lambda: None)
            await stream.send_all(_pack(["subscribed"]))
            is_writing = False
            nursery.start_soon(write)
            # The worker sends nothing more; its end of the stream ends the subscription.
            while await reader.next() is not None:
                pass
            nursery.cancel_scope.cancel()
        # Returning closes the stream (``_handle``): after a drop, the worker reads EOF.

    def _relay(self, data: bytes) -> None:
        """Queue ``data`` for every worker's message stream; drop a stream that is full."""
        frame = _pack(["msg", data])
        for listener in list(self._listeners):
            try:
                listener.channel.send_nowait(frame)
            except trio.WouldBlock:
                # One stuck worker never holds the others' messages up, nor
                # grows the parent: its stream ends, and the worker, reconnecting,
                # learns that messages may have been lost.
                self._listeners.remove(listener)
                log.warning(
                    "worker (pid %s) left %d relayed messages unread; disconnecting it",
                    listener.pid,
                    self._max_queued_messages,
                )
                listener.scope.cancel()

    async def _stream_messages(self, stream: trio.SocketStream, reader: _FrameReader) -> None:
        send, receive = trio.open_memory_channel[bytes](self._max_queued_messages)
        with send, receive, trio.CancelScope() as scope:
            listener = _Listener(send, scope, _peer_pid(stream))
            self._listeners.append(listener)
            try:
                await stream.send_all(_pack(["subscribed"]))
                async with trio.open_nursery() as nursery:

                    async def write() -> None:
                        async for frame in receive:
                            await stream.send_all(frame)

                    nursery.start_soon(write)
                    # The worker sends nothing more; its end of the stream ends this.
                    while await reader.next() is not None:
                        pass
                    nursery.cancel_scope.cancel()
            finally:
                if listener in self._listeners:
                    self._listeners.remove(listener)
        # Returning closes the stream (``_handle``): after a drop, the worker reads EOF.


@dataclass(eq=False, slots=True)
class _Listener:
    """A worker's message stream, as the parent holds it."""

    channel: trio.MemorySendChannel[bytes]
    scope: trio.CancelScope
    pid: str


def _peer_pid(stream: trio.SocketStream) -> str:
    """The worker's pid, for the log (Linux's SO_PEERCRED; "?" elsewhere)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return "?"
    try:
        raw = stream.socket.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    except OSError:
        return "?"
    return str(struct.unpack("3i", raw)[0])


class _Share:
    """One publish's part of a shared request."""

    __slots__ = ("is_withdrawn", "rows", "start")

    def __init__(self, rows: list[object]) -> None:
        self.rows = rows
        self.start = 0  # where its rows begin in the request, once sent
        self.is_withdrawn = False  # cancelled before the request went out


class _SharedPublish:
    """The publishes that share one ``pub`` request, and its outcome."""

    __slots__ = ("done", "error", "is_abandoned", "is_sent", "reply", "rows", "shares", "size")

    def __init__(self) -> None:
        self.shares: list[_Share] = []
        self.size = 0
        self.rows: list[object] = []  # what was sent
        self.done = trio.Event()
        self.is_sent = False
        self.is_abandoned = False  # its sender was cancelled before sending it
        self.reply: list[object] | None = None
        self.error: BackplaneError | None = None

    def join(self, rows: list[object], size: int) -> _Share:
        share = _Share(rows)
        self.shares.append(share)
        self.size += size
        return share

    def seal(self) -> list[object]:
        """The rows to send: every share not withdrawn, each told where it starts."""
        self.is_sent = True
        for share in self.shares:
            if not share.is_withdrawn:
                share.start = len(self.rows)
                self.rows.extend(share.rows)
        return self.rows

    def answer(self, share: _Share) -> list[NumberedEvent]:
        """The numbered events of one share, or the request's error (a fresh one for each)."""
        error = self.error
        if error is not None:
            raise type(error)(str(error)) from error
        try:
            match self.reply:
                case [_, _, list(numbered)] if len(numbered) == len(self.rows):
                    part = numbered[share.start : share.start + len(share.rows)]
                    return [_numbered(row) for row in part]
            raise BackplaneError(f"expected {len(self.rows)} rows")
        except BackplaneError as exc:
            raise PublishOutcomeUnknown(
                f"the workers' broker answered the publish with a malformed reply: {exc}"
            ) from exc


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
        # The publish request still open to publishes of this scheduling round.
        self._shared: _SharedPublish | None = None

    @property
    def is_available(self) -> bool:
        return self._available

    async def _request(self, request: list[object], *, is_write: bool = False) -> list[object]:
        """One request and its ``ok`` reply, on a connection of its own (see ``_exchange``)."""
        async with self._limiter:
            return await self._exchange(request, is_write=is_write)

    async def _exchange(self, request: list[object], *, is_write: bool) -> list[object]:
        """One request and its ``ok`` reply; the caller holds a place of ``_limiter``.

        Raises:
            BackplaneUnavailable: not sent whole, or answered with an error.
            PublishOutcomeUnknown: with ``is_write``, sent whole and the reply
                was lost (the parent may have applied it).
        """
        conn: tuple[trio.SocketStream, _FrameReader] | None = None
        is_sent = False
        try:
            with trio.fail_after(self._op_timeout):
                if self._idle:
                    conn = self._idle.pop()
                else:
                    stream = await trio.open_unix_socket(self._path)
                    conn = (stream, _FrameReader(stream))
                await conn[0].send_all(_pack(request))
                is_sent = True
                reply = await conn[1].next()
            if reply is None:
                raise BackplaneError("the workers' broker closed the connection")
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, BackplaneError) as exc:
            await self._close(conn)
            await self._drop()
            self._available = False
            if is_write and is_sent:
                raise PublishOutcomeUnknown(
                    f"lost the workers' broker's reply, the publish may have been applied: "
                    f"{exc or type(exc).__name__}"
                ) from exc
            raise BackplaneUnavailable(
                f"the workers' broker is unreachable: {exc or type(exc).__name__}"
            ) from exc
        except trio.Cancelled:
            await self._close(conn)  # a request half done leaves the stream out of step
            raise
        self._idle.append(conn)
        self._available = True
        if reply[0] != "ok":
            # The parent answers "err" before doing anything (a request it cannot parse).
            raise BackplaneUnavailable(
                f"the workers' broker refused the request: "
                f"{reply[2] if len(reply) > 2 else 'no reason given'}"
            )
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
        """Publish ``events`` in one request, shared with this round's other publishes.

        Publishes that start in the same scheduling round go to the parent as
        one request (up to ``MAX_SHARED_PUBLISH_BYTES``): one round trip, one
        broadcast, and every worker gets their events in one message, so they
        share its subscribers' frames. Each publish keeps its own answer, and
        the outcome (numbered, unavailable, unknown) is the request's.
        """
        if not events:
            await trio.lowlevel.checkpoint()
            return []
        rows: list[object] = [[e.hub, e.site_id, e.user_id, e.event_id, e.prefix] for e in events]
        size = sum(len(e.prefix) for e in events)
        while True:
            shared = self._shared
            if shared is not None and shared.size + size <= MAX_SHARED_PUBLISH_BYTES:
                share = shared.join(rows, size)
                try:
                    await shared.done.wait()
                except trio.Cancelled:
                    if not shared.is_sent:
                        share.is_withdrawn = True  # not published: as if never asked
                    raise
                if shared.is_abandoned:
                    continue  # never sent: publish again, certain that nothing was accepted
            else:
                shared = self._shared = _SharedPublish()
                share = shared.join(rows, size)
                await self._send(shared)
            return shared.answer(share)

    async def _send(self, shared: _SharedPublish) -> None:
        """Send ``shared`` once this round's publishes joined it; every one waits for it."""
        try:
            # Acquiring is a schedule point: the publishes of this round join first.
            async with self._limiter:
                if self._shared is shared:
                    self._shared = None
                self._ids += 1
                request: list[object] = ["pub", self._ids, shared.seal()]
                # Shielded (``_exchange`` has its deadline): cancelling the publish
                # that happens to send must not cut the others' request short.
                with trio.CancelScope(shield=True):
                    try:
                        shared.reply = await self._exchange(request, is_write=True)
                    except BackplaneError as exc:
                        shared.error = exc
        finally:
            if self._shared is shared:
                self._shared = None
            shared.is_abandoned = not shared.is_sent
            shared.done.set()

    async def history(self, hub: str, site_id: str, after_seq: int) -> History:
        self._ids += 1
        reply = await self._request(["hist", self._ids, hub, site_id, after_seq])
        match reply:
            case [_, _, list(rows), int() | None as first_seq, int(last_seq), str(epoch)]:
                events: list[NumberedEvent] = []
                for row in rows:
                    try:
                        events.append(_numbered(row))
                    except BackplaneError as exc:
                        log.error("skipped a malformed history row of %s/%s: %s", hub, site_id, exc)
                return History(epoch=epoch, events=events, first_seq=first_seq, last_seq=last_seq)
        raise BackplaneError(f"{hub}/{site_id}: malformed history reply from the workers' broker")

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

        def on_frame(frame: list[object]) -> None:
            if frame[0] == "ev":
                # A bad row ends the subscription (BackplaneError): the
                # reconnect makes the caller recover from history.
                rows = frame[1] if len(frame) > 1 else None
                if not isinstance(rows, list) or not rows:
                    raise BackplaneError('expected ["ev", rows]')
                deliver([_numbered(row) for row in rows])

        def on_up(is_first: bool) -> None:
            self._available = True
            if is_first:
                task_status.started()
            else:
                on_reconnect()

        def on_down() -> None:
            self._available = False

        try:
            # The parent closes a stream that fell too far behind (or is
            # stopping): it is resubscribed at once, and ``on_reconnect`` has
            # the broker fetch what was missed from history.
            await _follow(
                self._path,
                "sub",
                self._op_timeout,
                "event stream",
                on_frame=on_frame,
                on_up=on_up,
                on_down=on_down,
            )
        finally:
            self._running = False
            await self._drop()

    async def ping(self) -> None:
        """Round trip to the broker (readiness)."""
        self._ids += 1
        await self._request(["ping", self._ids])

    async def aclose(self) -> None:
        await self._drop()


class BrokerMessages:
    """A worker's end of the parent's message relay (see the module docstring).

    What one worker ``send``s, every worker listening (``run``) receives, the
    sender included. The relay keeps nothing: a worker that is not listening
    when a message passes (reconnecting, or dropped for not reading) misses
    it, and ``run`` says so with ``on_reconnect``.

    Args:
        path: the broker's socket.
        op_timeout: seconds a send, or the confirmation of a subscription, may take.
    """

    def __init__(self, path: Path | str, *, op_timeout: float = 2.0) -> None:
        self._path = str(path)
        self._op_timeout = op_timeout

    async def send(self, data: bytes) -> None:
        """Queue ``data`` for every listening worker; return once the parent has.

        Raises:
            BackplaneUnavailable: the parent could not be reached in time, or
                refused the message (over ``MAX_MESSAGE_BYTES``).
        """
        # A connection per message: they are rare (a role change), and a kept
        # one would need its own liveness care.
        try:
            with trio.fail_after(self._op_timeout):
                async with await trio.open_unix_socket(self._path) as stream:
                    await stream.send_all(_pack(["msg", 1, data]))
                    reply = await _FrameReader(stream).next()
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, BackplaneError) as exc:
            raise BackplaneUnavailable(
                f"the workers' broker is unreachable: {exc or type(exc).__name__}"
            ) from exc
        if reply is None or reply[0] != "ok":
            detail = reply[2] if reply is not None and len(reply) > 2 else "no answer"
            raise BackplaneUnavailable(f"the workers' broker refused the message: {detail}")

    async def run(
        self,
        on_message: Callable[[bytes], None],
        on_reconnect: Callable[[], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Hand every relayed message to ``on_message`` until cancelled; never raises.

        ``on_reconnect`` is called each time the stream is back after it was
        lost (messages relayed meanwhile were missed); ``task_status`` is
        started once the first subscription is confirmed.
        """
        def on_frame(frame: list[object]) -> None:
            match frame:
                case ["msg", bytes(data)]:
                    on_message(data)
                case _:
                    raise BackplaneError(f"expected a message, got {_describe(frame)}")

        def on_up(is_first: bool) -> None:
            if is_first:
                task_status.started()
            else:
                on_reconnect()

        await _follow(
            self._path,
            "msgs",
            self._op_timeout,
            "message stream",
            on_frame=on_frame,
            on_up=on_up,
            on_down=lambda: None,
        )
