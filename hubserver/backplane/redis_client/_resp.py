"""A small Redis client over Trio: RESP2 commands, replies and Pub/Sub.

Two layers. The codec is sans-IO: ``encode_command`` turns arguments into the
bytes of a RESP array of bulk strings, and ``ReplyParser`` (a ``hiredis.Reader``
underneath) turns received bytes into replies. ``RedisConnection`` drives that
codec over one ``trio.SocketStream``; it has no timeouts of its own, callers put
``trio.fail_after`` around what they await (STYLE: timeouts at the call site).

Replies follow RESP2 as hiredis decodes them: bulk and simple strings are
``bytes``, integers ``int``, arrays ``list``, nil ``None``. An error reply is
raised as ``RedisReplyError`` by ``execute``; inside an array (EXEC, a script
returning a table with errors) it stays in place as a ``RedisReplyError``
object.

Failures of the connection itself (refused, reset, closed by the peer) raise
``BackplaneUnavailable``; a connection whose command was interrupted between
sending and reading the reply (cancelled, timed out) cannot tell which reply
belongs to whom any more, so it marks itself unusable (``is_usable``).
"""

from __future__ import annotations

import enum
import logging
import select
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias
from urllib.parse import unquote, urlsplit

import hiredis
import trio

from .._contract import BackplaneError, BackplaneUnavailable

__all__ = [
    "DEFAULT_MAX_REPLY_BYTES",
    "Arg",
    "NeedData",
    "RedisAddress",
    "RedisConnection",
    "RedisReplyError",
    "Reply",
    "ReplyParser",
    "RespProtocolError",
    "encode_command",
    "parse_redis_url",
]

log = logging.getLogger(__name__)

#: Largest reply (in bytes on the wire) a connection buffers before giving up.
DEFAULT_MAX_REPLY_BYTES: Final = 64 * 1024 * 1024
#: How much one ``receive_some`` asks for.
RECEIVE_CHUNK_BYTES: Final = 64 * 1024
DEFAULT_REDIS_PORT: Final = 6379


class RedisReplyError(BackplaneError):
    """Redis answered a command with an error reply (``-ERR ...``, ``-NOSCRIPT ...``).

    Attributes:
        code: the first word of the message, e.g. ``"NOSCRIPT"`` or ``"WRONGTYPE"``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = message.split(" ", 1)[0]


class NeedData(enum.Enum):
    """``ReplyParser.next_reply`` found no complete reply yet."""

    NEED_DATA = enum.auto()


Arg: TypeAlias = str | bytes | int
Reply: TypeAlias = "bytes | int | list[Reply] | RedisReplyError | None"


# -- the sans-IO codec -----------------------------------------------------------------


def encode_command(args: Sequence[Arg]) -> bytes:
    """Encode one command as a RESP array of bulk strings.

    Args:
        args: the command name and its arguments; ``str`` is sent as UTF-8,
            ``int`` in decimal. ``bool`` is rejected rather than sent as 0/1.

    Returns:
        New bytes, owned by the caller.

    Raises:
        TypeError: an argument has another type.
    """
    if not args:
        raise TypeError("a Redis command needs at least its name, got no arguments")
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        else:
            raise TypeError(f"Redis arguments are str, bytes or int, got {type(arg).__name__}")
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


class RespProtocolError(BackplaneError):
    """The bytes received are not RESP; the connection cannot be used any more."""

    def __init__(self, message: str) -> None:
        super().__init__(f"Redis sent malformed RESP: {message}")


class ReplyParser:
    """Received bytes in, RESP2 replies out (sans-IO, over ``hiredis.Reader``).

    Args:
        max_reply_bytes: bytes that may be buffered towards one incomplete
            reply; above it ``receive_data`` raises (counted from the last
            complete reply, so it may undercount by one received chunk).
    """

    def __init__(self, *, max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES) -> None:
        if max_reply_bytes < 1:
            raise ValueError(f"max_reply_bytes must be positive, got {max_reply_bytes}")
        self._reader = hiredis.Reader(
            protocolError=RespProtocolError,
            replyError=RedisReplyError,
            notEnoughData=NeedData.NEED_DATA,
        )
        self._max_reply_bytes = max_reply_bytes
        self._pending_bytes = 0

    def receive_data(self, data: bytes) -> None:
        """Buffer ``data`` (copied; the caller keeps ownership).

        Raises:
            BackplaneError: the incomplete reply grew beyond ``max_reply_bytes``.
        """
        self._reader.feed(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > self._max_reply_bytes:
            raise BackplaneError(
                f"Redis reply exceeds {self._max_reply_bytes} bytes and is still incomplete"
            )

    def next_reply(self) -> Reply | NeedData:
        """The next complete reply, or ``NeedData.NEED_DATA``.

        An error reply is returned as a ``RedisReplyError`` object, not raised.

        Raises:
            RespProtocolError: the bytes are not RESP (the stream is unusable after).
        """
        reply: Reply | NeedData = self._reader.gets()
        if reply is not NeedData.NEED_DATA:
            self._pending_bytes = 0
        return reply


# -- addresses -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisAddress:
    """Where a Redis server is and how to log in (from ``parse_redis_url``)."""

    host: str
    port: int = DEFAULT_REDIS_PORT
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        # Never shows the password: addresses end up in log lines and errors.
        return f"{self.host}:{self.port}/{self.db}"

    def channel(self, name: str) -> str:
        """The Pub/Sub channel ``name`` of this address's database.

        Keys live in one database, but Pub/Sub channels belong to the whole
        server ("Pub/Sub has no relation to the key space", Redis' Pub/Sub
        documentation): two fleets on one Redis that differ only by database
        would hear each other's messages. Database N > 0 gets ``name:dbN``;
        database 0 keeps ``name``, the channel of every version before, so a
        fleet there can still be upgraded node by node.
        """
        return name if self.db == 0 else f"{name}:db{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """Parse ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``.

    Raises:
        BackplaneError: not such a URL (the message never repeats the URL,
            which may hold a password).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BackplaneError(
            "expected redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], got an unparsable URL"
        ) from exc
    if parts.scheme != "redis":
        raise BackplaneError(
            f"expected a redis:// URL, got scheme {parts.scheme!r} (rediss:// is not supported)"
        )
    if not parts.hostname:
        raise BackplaneError("expected redis://HOST[:PORT][/DB], got no host")
    if parts.query or parts.fragment:
        raise BackplaneError("expected redis://HOST[:PORT][/DB], got a query or fragment")
    path = parts.path.strip("/")
    if not path:
        db = 0
    elif path.isdigit():
        db = int(path)
    else:
        raise BackplaneError(f"expected a database number after the host, got {path!r}")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if username is not None and password is None:
        raise BackplaneError("expected redis://USER:PASSWORD@HOST, got a user without password")
    return RedisAddress(
        host=parts.hostname,
        port=DEFAULT_REDIS_PORT if port is None else port,
        db=db,
        username=username,
        password=password,
    )


# -- the connection --------------------------------------------------------------------


class RedisConnection(trio.abc.AsyncResource):
    """One RESP2 connection over Trio: commands, or (after ``subscribe``) pushed messages.

    Open with ``await RedisConnection.connect(address)``; close with ``aclose``
    or ``async with``. Commands from several tasks are serialized (one reply
    per request, in order). Nothing here times out: wrap calls in
    ``trio.fail_after``.
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        address: RedisAddress,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
    ) -> None:
        self._stream = stream
        self._address = address
        self._parser = ReplyParser(max_reply_bytes=max_reply_bytes)
        self._lock = trio.StrictFIFOLock()
        self._is_broken = False
        self._is_closed = False
        self._is_subscribed = False
        # A command was sent whole and its reply not read yet: if the wait ends
        # here, Redis may or may not have run it.
        self._is_awaiting_reply = False

    @classmethod
    async def connect(
        cls, address: RedisAddress, *, max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    ) -> RedisConnection:
        """Open a connection, then ``AUTH`` and ``SELECT`` as the address asks.

        Raises:
            BackplaneUnavailable: refused, unreachable, or Redis rejected the login
                or the database number.
        """
        try:
            stream = await trio.open_tcp_stream(address.host, address.port)
        except OSError as exc:
            raise BackplaneUnavailable(
                f"cannot connect to Redis at {address}: {exc.strerror or exc}"
            ) from exc
        conn = cls(stream, address=address, max_reply_bytes=max_reply_bytes)
        try:
            if address.username is not None and address.password is not None:
                await conn.execute("AUTH", address.username, address.password)
            elif address.password is not None:
                await conn.execute("AUTH", address.password)
            if address.db:
                await conn.execute("SELECT", address.db)
        except RedisReplyError as exc:
            await conn.aclose()
            raise BackplaneUnavailable(
                f"Redis at {address} refused the connection setup: {exc}"
            ) from exc
        except BaseException:
            await conn.aclose()
            raise
        return conn

    @property
    def address(self) -> RedisAddress:
        return self._address

    @property
    def is_usable(self) -> bool:
        """False once closed, broken, or left mid-command by a cancellation."""
        return not (self._is_broken or self._is_closed)

    @property
    def is_subscribed(self) -> bool:
        return self._is_subscribed

    @property
    def is_awaiting_reply(self) -> bool:
        """True from the moment a command was sent whole until its reply is read.

        A command interrupted while this is False never reached Redis in full
        (Redis runs nothing of a partial command); while True, it may have run.
        """
        return self._is_awaiting_reply

    def is_stale(self) -> bool:
        """True when an idle command connection has input waiting: Redis closed it.

        Redis sends nothing unasked to a connection that is not subscribed, so
        anything readable between commands is the peer's close (or an error it
        sent before closing). Checking before reuse turns "the connection died
        while idle" into a failure before sending, where it is certain that
        nothing ran, instead of a lost reply.
        """
        if not self.is_usable:
            return True
        poller = select.poll()
        poller.register(self._stream.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    async def aclose(self) -> None:
        """Close the socket (always succeeds, even when cancelled)."""
        self._is_closed = True
        with trio.CancelScope(shield=True):
            await self._stream.aclose()

    async def execute(self, *args: Arg) -> Reply:
        """Send one command and return its reply.

        Raises:
            RedisReplyError: Redis answered with an error.
            BackplaneUnavailable: the connection failed or was already unusable.
            BackplaneError: malformed or oversized reply, or the connection is
                in subscriber mode.
        """
        command = encode_command(args)
        if self._is_subscribed:
            raise BackplaneError(f"execute({args[0]!r}) on a connection in subscriber mode")
        async with self._lock:
            self._check_usable()
            # Until the reply is read, an interruption leaves an unread reply behind.
            self._is_broken = True
            await self._send(command)
            self._is_awaiting_reply = True
            reply = await self._read_reply()
            self._is_awaiting_reply = False
            self._is_broken = False
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    async def subscribe(self, channel: str | bytes) -> None:
        """``SUBSCRIBE channel`` and wait for the confirmation.

        From then on the connection only delivers pushes (``next_message``,
        ``next_push``) and accepts ``send_ping``. One channel per connection.

        Raises:
            BackplaneUnavailable: the connection failed.
            BackplaneError: already subscribed, or an unexpected reply.
        """
        if self._is_subscribed:
            raise BackplaneError("subscribe() on a connection that is already subscribed")
        async with self._lock:
            self._check_usable()
            self._is_broken = True
            await self._send(encode_command(("SUBSCRIBE", channel)))
            reply = await self._read_reply()
            if isinstance(reply, RedisReplyError):
                self._is_broken = False
                raise reply
            if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
                raise BackplaneError(f"expected a subscribe confirmation, got {_describe(reply)}")
            self._is_subscribed = True
            self._is_broken = False

    async def next_push(self) -> list[Reply]:
        """The next array Redis pushes in subscriber mode (``message``, ``pong``, ...).

        Safe to cancel: nothing received is lost.

        Raises:
            BackplaneUnavailable: the connection failed.
            BackplaneError: not subscribed, or Redis pushed something that is
                not an array.
        """
        if not self._is_subscribed:
            raise BackplaneError("next_push() on a connection that is not subscribed")
        self._check_usable()
        reply = await self._read_reply()
        if isinstance(reply, RedisReplyError):
            raise reply
        if not isinstance(reply, list) or not reply:
            self._is_broken = True
            raise BackplaneError(
                f"expected a push array in subscriber mode, got {_describe(reply)}"
            )
        return reply

    async def next_message(self) -> tuple[bytes, bytes]:
        """The next published ``(channel, data)``, skipping other pushes."""
        while True:
            push = await self.next_push()
            if push[0] == b"message" and len(push) == 3:
                channel, data = push[1], push[2]
                if isinstance(channel, bytes) and isinstance(data, bytes):
                    return channel, data

    async def send_ping(self) -> None:
        """Send ``PING`` in subscriber mode; its ``pong`` arrives through ``next_push``."""
        if not self._is_subscribed:
            raise BackplaneError("send_ping() is for subscriber mode; use execute('PING')")
        self._check_usable()
        await self._send(encode_command(("PING",)))

    # -- internals ---------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._is_closed:
            raise BackplaneUnavailable(f"connection to Redis at {self._address} is closed")
        if self._is_broken:
            raise BackplaneUnavailable(f"connection to Redis at {self._address} is broken")

    async def _send(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._is_broken = True
            raise BackplaneUnavailable(f"lost the connection to Redis at {self._address}") from exc

    async def _read_reply(self) -> Reply:
        while True:
            try:
                reply = self._parser.next_reply()
            except BackplaneError:
                self._is_broken = True
                raise
            if reply is not NeedData.NEED_DATA:
                return reply
            try:
                data = await self._stream.receive_some(RECEIVE_CHUNK_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._is_broken = True
                raise BackplaneUnavailable(
                    f"lost the connection to Redis at {self._address}"
                ) from exc
            if not data:
                self._is_broken = True
                raise BackplaneUnavailable(f"Redis at {self._address} closed the connection")
            try:
                self._parser.receive_data(data)
            except BackplaneError:
                self._is_broken = True
                raise


def _describe(reply: Reply) -> str:
    """A short description of an unexpected reply, without its payload."""
    if isinstance(reply, list):
        head = reply[0] if reply and isinstance(reply[0], bytes) else None
        return f"an array of {len(reply)}" + (f" starting {head[:20]!r}" if head else "")
    if isinstance(reply, bytes):
        return f"a string of {len(reply)} bytes"
    return type(reply).__name__
