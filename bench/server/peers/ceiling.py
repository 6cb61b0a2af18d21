"""The ceiling: the least a Python server can do to fan events out over WebSockets.

One thread, ``selectors`` (epoll), no framework. It accepts WebSocket
upgrades and the SignalR JSON handshake (so the load client is the same as
for the hubs), and on ``POST /v1/events/entries`` writes, for each site of
the posted events, one pre-framed WebSocket message holding the SignalR
records of that site's events (the ``ReceiveMessage`` invocation carrying the
event text, as hubserver writes it) to every socket of the site: a plain
non-blocking ``send``, and only the unsent rest is queued. No auth, no
keep-alive Pings, no limits: what is left is the practical limit.

    python -m bench.server.peers.ceiling --port 5000
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import selectors
import signal
import socket
from typing import Final
from urllib.parse import parse_qs, urlsplit

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_HANDSHAKE_OK: Final = b"\x81\x03{}\x1e"
_RECEIVE_BYTES: Final = 65536
TCP_NOTSENT_LOWAT: Final = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_string = json.JSONEncoder(ensure_ascii=False).encode

HTTP: Final = 0
HANDSHAKE: Final = 1
OPEN: Final = 2


def server_frame(payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 1 << 16:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload


def signalr_record(text: str) -> bytes:
    return b'{"type":1,"target":"ReceiveMessage","arguments":[' + _string(text).encode() + b"]}\x1e"


class Conn:
    __slots__ = ("inbox", "out", "site", "sock", "state")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.state = HTTP
        self.inbox = b""
        self.out = b""
        self.site: str | None = None


class Ceiling:
    def __init__(self, host: str, port: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.listener = socket.create_server((host, port), backlog=4096, reuse_port=False)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.sites: dict[str, dict[Conn, None]] = {}
        self.running = True
        # An experiment knob: trio sets TCP_NOTSENT_LOWAT = 16 KiB on its sockets;
        # BENCH_CEILING_NOTSENT_LOWAT=16384 makes the ceiling do the same.
        self.notsent_lowat = int(os.environ.get("BENCH_CEILING_NOTSENT_LOWAT", "0"))

    def serve(self) -> None:
        select = self.selector.select
        while self.running:
            for key, mask in select(1.0):
                conn = key.data
                if conn is None:
                    self.accept()
                    continue
                if mask & selectors.EVENT_WRITE:
                    self.flush(conn)
                if mask & selectors.EVENT_READ:
                    self.read(conn)

    def accept(self) -> None:
        for _ in range(256):
            try:
                sock, _address = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.notsent_lowat:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, self.notsent_lowat)
            conn = Conn(sock)
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def close(self, conn: Conn) -> None:
        if conn.site is not None:
            members = self.sites.get(conn.site)
            if members is not None:
                members.pop(conn, None)
            conn.site = None
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.sock.close()

    def read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(_RECEIVE_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        conn.inbox += data
        if conn.state == HTTP:
            self.on_http(conn)
        else:
            self.on_frames(conn)

    # -- HTTP: the upgrade and the publish API ------------------------------------------

    def on_http(self, conn: Conn) -> None:
        while conn.state == HTTP:
            end = conn.inbox.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = conn.inbox[:end].decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(conn.inbox) < end + 4 + length:
                return
            body = conn.inbox[end + 4 : end + 4 + length]
            conn.inbox = conn.inbox[end + 4 + length :]
            parts = urlsplit(target)
            if method == "GET" and headers.get("upgrade", "").lower() == "websocket":
                self.upgrade(conn, parts.query, headers)
            elif method == "POST" and parts.path == "/v1/events/entries":
                self.publish(conn, body)
            else:
                self.respond(conn, 404, b'{"code":"not_found"}')

    def respond(self, conn: Conn, status: int, body: bytes) -> None:
        head = b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        self.write(conn, head % (status, len(body)) + body)

    def upgrade(self, conn: Conn, query: str, headers: dict[str, str]) -> None:
        key = headers.get("sec-websocket-key", "").encode()
        accept = base64.b64encode(hashlib.sha1(key + _GUID, usedforsecurity=False).digest())
        site = parse_qs(query).get("site_id", [""])[0]
        conn.state = HANDSHAKE
        conn.site = site
        self.write(
            conn,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n",
        )
        if conn.inbox:
            self.on_frames(conn)

    def publish(self, conn: Conn, body: bytes) -> None:
        parsed = json.loads(body)
        events = parsed if isinstance(parsed, list) else [parsed]
        by_site: dict[str, list[bytes]] = {}
        for event in events:
            record = signalr_record(_compact(event))
            by_site.setdefault(str(event["site_id"]), []).append(record)
        for site, records in by_site.items():
            members = self.sites.get(site)
            if not members:
                continue
            frame = server_frame(b"".join(records))
            write = self.write
            for member in tuple(members):
                write(member, frame)
        self.respond(conn, 202, b'{"accepted":%d}' % len(events))

    # -- WebSocket: the client's frames -------------------------------------------------

    def on_frames(self, conn: Conn) -> None:
        data = conn.inbox
        pos = 0
        while len(data) - pos >= 6:
            opcode = data[pos] & 0x0F
            size = data[pos + 1] & 0x7F
            start = pos + 2
            if size == 126:
                if len(data) - pos < 8:
                    break
                size = int.from_bytes(data[start : start + 2], "big")
                start += 2
            elif size == 127:
                if len(data) - pos < 14:
                    break
                size = int.from_bytes(data[start : start + 8], "big")
                start += 8
            mask = data[start : start + 4]
            start += 4
            if start + size > len(data):
                break
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(data[start : start + size]))
            pos = start + size
            if opcode == 0x8:
                self.write(conn, b"\x88\x02" + payload[:2])
                self.close(conn)
                return
            if opcode == 0x9:
                self.write(conn, bytes((0x8A, len(payload))) + payload)
            elif conn.state == HANDSHAKE and opcode in (0x1, 0x2):
                # {"protocol":"json","version":1}\x1e: answer {} and join the site.
                conn.state = OPEN
                self.write(conn, _HANDSHAKE_OK)
                site = conn.site or ""
                self.sites.setdefault(site, {})[conn] = None
            # Hub Pings and anything else from the client: nothing to do.
        conn.inbox = data[pos:]

    # -- writing --------------------------------------------------------------------------

    def write(self, conn: Conn, data: bytes) -> None:
        if conn.out:
            conn.out += data
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close(conn)
            return
        if sent < len(data):
            conn.out = data[sent:]
            self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def flush(self, conn: Conn) -> None:
        data, conn.out = conn.out, b""
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close(conn)
            return
        if sent < len(data):
            conn.out = data[sent:]
        else:
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    server = Ceiling(args.host, args.port)

    def stop(_signum: int, _frame: object) -> None:
        server.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve()


if __name__ == "__main__":
    main()
