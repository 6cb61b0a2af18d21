"""Client-side helpers for the server tests: raw HTTP, a raw WebSocket hub client, publishing.

Everything here talks to a real server over 127.0.0.1. The HTTP side is hand
written (requests as bytes, responses parsed by hand) so tests can send what no
well-behaved client library would. The WebSocket side does the upgrade by hand
too, then frames with wsproto's post-handshake ``Connection`` (client role:
masked frames), so a test sees exactly which frames the server sent, with which
opcode, and the close code.

Hub messages are parsed strictly: every frame the server sends must hold whole
hub messages (SignalR spec §1.3), so a JSON frame must end with RS and a
MessagePack frame must split exactly into VarInt-prefixed messages.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio
import wsproto
import wsproto.events as ws_events
from wsproto.connection import Connection as WsConnection

from hubcore import decode_varint
from hubserver.permissions import Role

from .conftest import Harness

RS = "\x1e"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
GOOD_KEY = base64.b64encode(b"0123456789abcdef").decode()
CONNECTION_ERROR = "Connection closed with an error."
HANDSHAKE_JSON = '{"protocol":"json","version":1}' + RS
HANDSHAKE_MSGPACK = '{"protocol":"messagepack","version":1}' + RS
PING_JSON = '{"type":6}' + RS
PING_MSGPACK = b"\x02\x91\x06"


# -- raw HTTP ------------------------------------------------------------------------


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


class ResponseReader:
    """Reads HTTP/1.1 responses (fixed-length bodies) from a stream, keep-alive included."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.is_eof = False

    async def _fill(self) -> None:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""  # a reset: treat like EOF, the caller's assertion says what was missing
        if not data:
            self.is_eof = True
            raise EOFError(f"connection closed with {len(self.buffer)} bytes pending")
        self.buffer += data

    async def read_head(self) -> tuple[int, dict[str, str]]:
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[: end + 4]
        status_line, *lines = head.split("\r\n")
        version, status, *_ = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status), headers

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def read_response(self) -> HttpResponse:
        status, headers = await self.read_head()
        assert "transfer-encoding" not in headers, headers
        body = await self.read_exactly(int(headers.get("content-length", "0")))
        return HttpResponse(status, headers, body)


def build_request(
    method: str,
    target: str,
    *,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    close: bool = True,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def open_tcp(
    port: int, *, rcvbuf: int | None = None, source_ip: str | None = None
) -> trio.SocketStream:
    """A TCP stream to the server; ``rcvbuf`` shrinks our receive buffer before connecting;
    ``source_ip``: from another loopback address (any of 127/8 on Linux)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        if source_ip is not None:
            await sock.bind((source_ip, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def exchange(port: int, raw: bytes, *, source_ip: str | None = None) -> HttpResponse:
    """Send raw request bytes on a new connection and read one response.

    Sending and reading overlap, as a browser does: a server may answer an
    oversized request before reading all of it, and then stop reading.
    """

    async def send() -> None:
        with suppress(trio.BrokenResourceError):
            await stream.send_all(raw)

    stream = await open_tcp(port, source_ip=source_ip)
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(send)
        response = await ResponseReader(stream).read_response()
        nursery.cancel_scope.cancel()
    return response


async def http_request(
    port: int,
    method: str,
    target: str,
    *,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    source_ip: str | None = None,
) -> HttpResponse:
    raw = build_request(method, target, headers=headers, body=body)
    return await exchange(port, raw, source_ip=source_ip)


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


def upgrade_headers(
    *, key: str = GOOD_KEY, version: str = "13", token: str | None = None
) -> list[tuple[str, str]]:
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", version),
    ]
    if token is not None:
        headers.append(bearer(token))
    return headers


async def upgrade_refused(
    port: int, target: str, *, token: str | None = None, headers: Sequence[tuple[str, str]] = ()
) -> HttpResponse:
    """Send a WebSocket upgrade that the server must refuse; return its answer."""
    raw = build_request("GET", target, headers=[*upgrade_headers(token=token), *headers])
    response = await exchange(port, raw)
    assert response.status != 101, "the upgrade was accepted"
    return response


# -- publishing ----------------------------------------------------------------------


async def publish_raw(
    h: Harness, hub: str, body: bytes, *, token: str | None = None, close: bool = True
) -> HttpResponse:
    token = h.publisher_token() if token is None else token
    headers = [("Content-Type", "application/json"), bearer(token)]
    raw = build_request("POST", f"/v1/events/{hub}", headers=headers, body=body, close=close)
    return await exchange(h.port, raw)


async def publish(h: Harness, hub: str, body: object, *, token: str | None = None) -> HttpResponse:
    return await publish_raw(h, hub, json.dumps(body).encode(), token=token)


async def publish_ok(h: Harness, hub: str, body: object) -> list[str]:
    """Publish and insist on 202; returns the event ids."""
    response = await publish(h, hub, body)
    assert response.status == 202, response
    result = response.json()
    count = len(body) if isinstance(body, list) else 1
    assert result["accepted"] == count
    assert len(result["ids"]) == count
    return list(result["ids"])


# -- WebSocket -----------------------------------------------------------------------


@dataclass
class WsClosed:
    """The end of a WebSocket: the close frame's code, or None when the TCP stream just ended."""

    code: int | None
    reason: str = ""


@dataclass
class WsMessage:
    data: str | bytes

    @property
    def is_text(self) -> bool:
        return isinstance(self.data, str)


class WsClient:
    """A raw WebSocket client over a TCP stream whose upgrade was done by hand."""

    def __init__(self, stream: trio.SocketStream, trailing: bytes) -> None:
        self.stream = stream
        self.ws = WsConnection(wsproto.ConnectionType.CLIENT, trailing_data=trailing)
        self._pending: deque[ws_events.Event] = deque(self.ws.events())
        self._parts: list[str | bytes] = []
        self.closed: WsClosed | None = None

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(ws_events.TextMessage(data=text)))

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(self.ws.send(ws_events.BytesMessage(data=data)))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_ws_event(self) -> ws_events.Event | None:
        """The next WebSocket event as wsproto parsed it (None: the TCP stream ended)."""
        while not self._pending:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                return None
            self.ws.receive_data(data)
            self._pending.extend(self.ws.events())
        return self._pending.popleft()

    async def receive(self) -> WsMessage | WsClosed:
        """The next whole data message, or how the WebSocket ended."""
        if self.closed is not None:
            return self.closed
        while True:
            event = await self.next_ws_event()
            if event is None:
                self.closed = WsClosed(None)
                return self.closed
            if isinstance(event, ws_events.Message):
                self._parts.append(event.data)
                if event.message_finished:
                    parts, self._parts = self._parts, []
                    if isinstance(parts[0], str):
                        return WsMessage("".join(str(part) for part in parts))
                    return WsMessage(b"".join(bytes(part) for part in parts))
            elif isinstance(event, ws_events.Ping):
                await self.stream.send_all(self.ws.send(event.response()))
            elif isinstance(event, ws_events.CloseConnection):
                self.closed = WsClosed(event.code, event.reason or "")
                with trio.move_on_after(1):
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self.stream.send_all(self.ws.send(event.response()))
                return self.closed

    async def aclose(self) -> None:
        await self.stream.aclose()


class UpgradeRefused(Exception):
    def __init__(self, response: HttpResponse) -> None:
        super().__init__(f"upgrade refused: {response.status} {response.body!r}")
        self.response = response


async def open_ws(
    port: int,
    target: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    rcvbuf: int | None = None,
) -> WsClient:
    """Do the WebSocket upgrade by hand; raises UpgradeRefused for any answer but 101."""
    stream = await open_tcp(port, rcvbuf=rcvbuf)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        raw = build_request("GET", target, headers=[*upgrade_headers(key=key), *headers])
        await stream.send_all(raw.replace(b"Connection: close\r\n", b""))
        reader = ResponseReader(stream)
        status, response_headers = await reader.read_head()
        if status != 101:
            body = await reader.read_exactly(int(response_headers.get("content-length", "0")))
            raise UpgradeRefused(HttpResponse(status, response_headers, body))
        expected = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
        assert response_headers["sec-websocket-accept"] == expected
        assert response_headers["upgrade"].lower() == "websocket"
        return WsClient(stream, bytes(reader.buffer))
    except BaseException:
        await stream.aclose()
        raise


# -- hub protocol on top -------------------------------------------------------------


@dataclass
class HubClosed:
    """The hub connection ended: the Close message (if any) and how the WebSocket ended."""

    close: dict[str, Any] | None
    ws: WsClosed


@dataclass
class HubClient:
    """One subscriber: a WebSocket plus the hub protocol (JSON or MessagePack)."""

    ws: WsClient
    protocol: str = "json"
    _records: deque[Any] = field(default_factory=deque)
    opcodes: list[str] = field(default_factory=list)  # "text"/"binary" per frame received

    @property
    def is_binary(self) -> bool:
        return self.protocol == "messagepack"

    async def handshake(self, *, request: str | None = None, as_binary: bool = False) -> Any:
        """Send the handshake and return the parsed response (``{}`` on success)."""
        if request is None:
            request = HANDSHAKE_MSGPACK if self.is_binary else HANDSHAKE_JSON
        if as_binary:
            await self.ws.send_bytes(request.encode())
        else:
            await self.ws.send_text(request)
        return await self.read_handshake_response()

    async def read_handshake_response(self) -> Any:
        """Read the handshake response; hub messages in the same frame are kept."""
        message = await self.ws.receive()
        assert isinstance(message, WsMessage), f"no handshake response: {message}"
        self.opcodes.append("text" if message.is_text else "binary")
        data = message.data.encode() if isinstance(message.data, str) else message.data
        response, sep, rest = data.partition(RS.encode())
        assert sep, f"handshake response without RS: {data!r}"
        if rest:
            self._parse(rest, is_text=message.is_text)
        return json.loads(response)

    def _parse(self, data: str | bytes, *, is_text: bool) -> None:
        if self.is_binary:
            raw = data.encode() if isinstance(data, str) else data
            offset = 0
            while offset < len(raw):
                decoded = decode_varint(raw, offset)
                assert decoded is not None, f"incomplete VarInt in a frame: {raw!r}"
                length, offset = decoded
                assert offset + length <= len(raw), "a frame ends inside a MessagePack message"
                self._records.append(msgpack.unpackb(raw[offset : offset + length], raw=False))
                offset += length
        else:
            text = data if isinstance(data, str) else data.decode("utf-8")
            assert text.endswith(RS), f"a frame ends inside a JSON message: {text[-80:]!r}"
            for record in text[:-1].split(RS):
                self._records.append(json.loads(record))

    async def next_message(self, *, skip_pings: bool = True) -> Any:
        """The next hub message (dict for JSON, list for MessagePack), or HubClosed."""
        while True:
            while self._records:
                record = self._records.popleft()
                if skip_pings and _message_type(record) == 6:
                    continue
                return record
            message = await self.ws.receive()
            if isinstance(message, WsClosed):
                return HubClosed(None, message)
            self.opcodes.append("text" if message.is_text else "binary")
            self._parse(message.data, is_text=message.is_text)

    async def next_event(self) -> dict[str, Any]:
        """The next ``ReceiveMessage`` event, parsed from its one string argument."""
        message = await self.next_message()
        assert not isinstance(message, HubClosed), f"closed instead of an event: {message}"
        if self.is_binary:
            assert message[0] == 1 and message[3] == "ReceiveMessage", message
            (text,) = message[4]
        else:
            assert message["type"] == 1 and message["target"] == "ReceiveMessage", message
            assert "invocationId" not in message, message
            (text,) = message["arguments"]
        assert isinstance(text, str)
        event: dict[str, Any] = json.loads(text)
        return event

    async def expect_close(self) -> HubClosed:
        """Read up to the end: the last hub message must be a Close, then the WebSocket ends."""
        close = None
        while True:
            message = await self.next_message()
            if isinstance(message, HubClosed):
                return HubClosed(close, message.ws)
            if _message_type(message) == 7:
                assert close is None, "two Close messages"
                close = _close_as_dict(message)
            else:
                assert close is None, f"{message} after the Close"

    async def aclose(self) -> None:
        await self.ws.aclose()


def _message_type(record: Any) -> int:
    return int(record[0] if isinstance(record, list) else record["type"])


def _close_as_dict(record: Any) -> dict[str, Any]:
    if isinstance(record, dict):
        return record
    # MessagePack: [7, error, allowReconnect]
    result: dict[str, Any] = {"type": 7}
    if record[1] is not None:
        result["error"] = record[1]
    if len(record) > 2 and record[2]:
        result["allowReconnect"] = True
    return result


def hub_target(hub: str, site: str, user: str | None = None) -> str:
    target = f"/v1/hub/{hub}?site_id={site}"
    return target if user is None else f"{target}&user_id={user}"


@asynccontextmanager
async def open_hub(
    h: Harness,
    target: str,
    *,
    token: str | None = None,
    protocol: str = "json",
    in_query: bool = False,
    rcvbuf: int | None = None,
    handshake: bool = True,
) -> AsyncIterator[HubClient]:
    """Upgrade, handshake, and close the TCP stream at exit (so the server never waits)."""
    token = h.token() if token is None else token
    headers: list[tuple[str, str]] = []
    if in_query:
        target = f"{target}&access_token={token}"
    else:
        headers.append(bearer(token))
    ws = await open_ws(h.port, target, headers=headers, rcvbuf=rcvbuf)
    client = HubClient(ws, protocol)
    try:
        if handshake:
            assert await client.handshake() == {}
        yield client
    finally:
        await ws.aclose()


# -- the bystander: proof that bad input harmed no one else --------------------------


@dataclass
class Bystander:
    """A well-behaved subscriber, connected before the abuse, checked after it."""

    h: Harness
    client: HubClient
    site: str
    last_seq: int = 0

    async def check(self) -> None:
        """Publish one event to the bystander's site; it must arrive, numbered next.

        The seq check also proves that a refused publish consumed no numbers and
        delivered nothing to this site.
        """
        with trio.fail_after(5):
            (event_id,) = await publish_ok(self.h, "entries", {"site_id": self.site, "probe": 1})
            event = await self.client.next_event()
        assert event["id"] == event_id
        assert event["seq"] == self.last_seq + 1, f"expected seq {self.last_seq + 1}: {event}"
        self.last_seq = event["seq"]


@asynccontextmanager
async def bystander(h: Harness, site: str = "bystander-site") -> AsyncIterator[Bystander]:
    h.grant(site, "bystander", Role.SITE_ADMIN)
    async with (
        open_hub(h, hub_target("entries", site), token=h.token("bystander")) as client,
        trio.open_nursery() as nursery,
    ):
        # Well-behaved means pinging, as the official clients do: the client
        # timeout runs from the handshake, and some tests shorten it to 1 s.
        nursery.start_soon(_keep_pinging, client, h.config.hub_limits.client_timeout / 4)
        b = Bystander(h, client, site)
        yield b
        nursery.cancel_scope.cancel()


async def _keep_pinging(client: HubClient, interval: float) -> None:
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        while True:
            await client.ws.send_text(PING_JSON)
            await trio.sleep(interval)


# -- raw WebSocket frames: what no well-behaved library would send ---------------------


def ws_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = b"\x00\x00\x00\x00",
    length: int | None = None,
) -> bytes:
    """One client frame (RFC 6455 §5.2) built by hand, rules optional.

    ``mask=None`` sends it unmasked (a client must mask); ``length`` overrides
    the announced payload length (a lie, up to 2**64 - 1); ``rsv`` sets the
    three reserved bits (0..7). The payload is masked with ``mask``.
    """
    announced = len(payload) if length is None else length
    head = bytearray([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)])
    mask_bit = 0 if mask is None else 0x80
    if announced < 126:
        head.append(mask_bit | announced)
    elif announced < 1 << 16:
        head.append(mask_bit | 126)
        head += announced.to_bytes(2, "big")
    else:
        head.append(mask_bit | 127)
        head += announced.to_bytes(8, "big")
    if mask is None:
        return bytes(head) + payload
    size = len(payload)
    key = (mask * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")
    return bytes(head) + mask + masked


# -- a server process's log ------------------------------------------------------------


class ProcessLog:
    """A server process's stderr, kept line by line as it comes (``pump`` runs in a task)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.lot = trio.lowlevel.ParkingLot()  # woken at every new line

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                self.lines.append(line.decode(errors="replace"))
            self.lot.unpark_all()

    async def wait_for(self, pattern: str) -> re.Match[str]:
        """The first line matching ``pattern`` (waiting for it if it has not come)."""
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if match := re.search(pattern, line):
                    return match
            seen = len(self.lines)
            await self.lot.park()
