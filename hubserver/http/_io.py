"""Small h11 helpers: read the next event, write a whole response."""

from __future__ import annotations

import json
from collections.abc import Sequence
from http import HTTPStatus

import h11
import trio

from hubserver.transports import TransportError

__all__ = [
    "read_body",
    "receive_bytes",
    "receive_event",
    "send_continue",
    "send_json",
    "send_response",
]

RECEIVE_BYTES = 65536
SERVER_HEADER = (b"server", b"hubserver")


async def receive_event(
    stream: trio.abc.Stream, conn: h11.Connection
) -> h11.Event | type[h11.PAUSED]:
    """The next h11 event, reading from the stream as needed.

    Raises:
        h11.RemoteProtocolError: the peer sent malformed HTTP.
        TransportError: the stream broke.
    """
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event  # type: ignore[return-value]  # NEED_DATA was just excluded
        conn.receive_data(await receive_bytes(stream))


async def receive_bytes(stream: trio.abc.Stream) -> bytes:
    """The next bytes from the stream; b"" at its end.

    Raises:
        TransportError: the stream broke.
    """
    try:
        return bytes(await stream.receive_some(RECEIVE_BYTES))
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise TransportError(f"connection lost: {exc}") from exc


async def read_body(stream: trio.abc.Stream, conn: h11.Connection, max_bytes: int) -> bytes | None:
    """Read the request body; None if it is larger than ``max_bytes``."""
    parts: list[bytes] = []
    size = 0
    while True:
        event = await receive_event(stream, conn)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > max_bytes:
                return None
            parts.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(parts)
        else:
            raise TransportError(f"unexpected {type(event).__name__} in a request body")


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


async def send_continue(stream: trio.abc.Stream, conn: h11.Connection) -> None:
    """``100 Continue``: the client that asked may send its body now (RFC 9110 §10.1.1)."""
    data = conn.send(h11.InformationalResponse(status_code=100, headers=[SERVER_HEADER]))
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise TransportError(f"connection lost: {exc}") from exc


async def send_response(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    status: int,
    body: bytes,
    *,
    content_type: bytes = b"text/plain; charset=utf-8",
    headers: Sequence[tuple[bytes, bytes]] = (),
    close: bool = False,
    is_head: bool = False,
) -> None:
    """Send a complete response with a fixed-length body.

    For a HEAD request (``is_head``) the headers are those of the GET answer,
    Content-Length included, and the body is left out (RFC 9110 §9.3.2).
    """
    all_headers = [
        SERVER_HEADER,
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *headers,
    ]
    if close:
        all_headers.append((b"connection", b"close"))
    data = conn.send(h11.Response(status_code=status, headers=all_headers, reason=_reason(status)))
    data += conn.send(h11.Data(data=body)) if body and not is_head else b""
    data += conn.send(h11.EndOfMessage())
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise TransportError(f"connection lost: {exc}") from exc


async def send_json(
    stream: trio.abc.Stream,
    conn: h11.Connection,
    status: int,
    payload: object,
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
    close: bool = False,
    is_head: bool = False,
) -> None:
    body = json.dumps(payload, separators=(",", ":")).encode()
    await send_response(
        stream,
        conn,
        status,
        body,
        content_type=b"application/json",
        headers=headers,
        close=close,
        is_head=is_head,
    )
