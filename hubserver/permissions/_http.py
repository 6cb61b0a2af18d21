"""GET requests to one origin over a few keep-alive HTTP/1.1 connections (h11).

The URL store asks the access-control backend once per (site, subject) per
cache lifetime; a new TCP (and TLS) connection per question would cost more
than the question. At most ``max_connections`` requests run at once, each on
a connection of its own, kept for the next one when both sides allow it.

Nothing here times out: the caller puts ``fail_after`` around ``get`` (which
covers the wait for a free connection, connecting, and the whole response).
A connection left mid-response (cancelled, failed), or that sent more than
its answer, is closed, never reused.
A kept connection the server closed while it was idle fails before any byte
of the answer arrived; the request is then retried once on a new one (GET
is safe to repeat).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from typing import Final
from urllib.parse import urlencode, urlsplit

import h11
import trio

__all__ = ["HttpGetError", "HttpGetter", "ResponseTooLarge", "redact_origin"]

_RECEIVE_CHUNK_BYTES: Final = 16 * 1024


class HttpGetError(Exception):
    """A request failed: connection refused or lost, or not HTTP/1.1."""


class ResponseTooLarge(HttpGetError):
    """The response body is longer than allowed."""


def redact_origin(url: str) -> str:
    """``scheme://host[:port]/path`` of ``url``: no credentials, no query (safe to log)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class _Connection:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(our_role=h11.CLIENT)
        #: Some byte of the current exchange's answer arrived (so the server was there).
        self.is_anything_received = False

    async def get(
        self,
        target: str,
        host: str,
        max_body_bytes: int,
        headers: Sequence[tuple[str, str]] = (),
    ) -> tuple[int, bytes, bool]:
        """One exchange: (status, body, whether the connection may be reused)."""
        conn = self.h11
        self.is_anything_received = False
        request = h11.Request(
            method="GET",
            target=target,
            headers=[
                ("Host", host),
                ("Accept", "application/json"),
                ("User-Agent", "hubserver"),
                *headers,
            ],
        )
        data = conn.send(request)
        end = conn.send(h11.EndOfMessage())
        assert data is not None and end is not None  # None only for ConnectionClosed
        await self.stream.send_all(data + end)
        status = 0
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await self.stream.receive_some(_RECEIVE_CHUNK_BYTES)
                self.is_anything_received = self.is_anything_received or bool(chunk)
                conn.receive_data(bytes(chunk))
            elif isinstance(event, h11.Response):
                status = event.status_code
                for name, value in event.headers:
                    if name == b"content-length" and int(value) > max_body_bytes:
                        raise ResponseTooLarge(f"the response is over {max_body_bytes} bytes")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body_bytes:
                    raise ResponseTooLarge(f"the response is over {max_body_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpGetError("the server closed the connection before answering")
            # Anything else (an informational response) needs no action.
        # Bytes past the end of the answer are nothing we asked for: h11 would
        # hand them to the next request on this connection as its answer (one
        # pair's role taken for another's), so the connection is not kept.
        is_reusable = (
            conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
            and not conn.trailing_data[0]
        )
        if is_reusable:
            conn.start_next_cycle()
        return status, bytes(body), is_reusable


class HttpGetter:
    """GETs under one URL (see the module docstring).

    Args:
        url: ``http(s)://host[:port]/path[?query]``; requests add their own
            query parameters to it.
        max_connections: requests at once, and connections kept.
        max_body_bytes: the longest response body accepted.
        ssl_context: for https; ``ssl.create_default_context()`` by default.
        headers: sent with every request (an ``Authorization``); never in an error.
    """

    def __init__(
        self,
        url: str,
        *,
        max_connections: int,
        max_body_bytes: int,
        ssl_context: ssl.SSLContext | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        parts = urlsplit(url)
        self._headers = tuple(headers)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL with a host")
        self._is_https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._is_https else 80)
        self._host_header = parts.netloc.rpartition("@")[2]
        self._path = parts.path or "/"
        self._query = parts.query
        self._ssl_context = ssl_context
        self._max_body_bytes = max_body_bytes
        self._limiter = trio.CapacityLimiter(max_connections)
        self._idle: list[_Connection] = []

    async def get(self, params: Mapping[str, str]) -> tuple[int, bytes]:
        """GET the URL with ``params`` added to its query; return the status and the body.

        Raises:
            HttpGetError: the connection failed, the answer is not HTTP/1.1, or
                its body is over ``max_body_bytes`` (`ResponseTooLarge`).
        """
        query = urlencode(params)
        target = f"{self._path}?{self._query}&{query}" if self._query else f"{self._path}?{query}"
        async with self._limiter:
            while True:
                conn = self._idle.pop() if self._idle else None
                is_reused = conn is not None
                if conn is None:
                    conn = await self._connect()
                is_kept = False
                try:
                    status, body, is_kept = await conn.get(
                        target, self._host_header, self._max_body_bytes, self._headers
                    )
                    return status, body
                except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
                    if is_reused and not conn.is_anything_received:
                        continue  # closed by the server while idle: once more, on a new one
                    raise HttpGetError(f"{type(exc).__name__}: {exc}") from exc
                except HttpGetError:
                    if is_reused and not conn.is_anything_received:
                        continue
                    raise
                finally:
                    if is_kept:
                        self._idle.append(conn)
                    else:
                        await trio.aclose_forcefully(conn.stream)

    async def aclose(self) -> None:
        """Close the kept connections."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)

    async def _connect(self) -> _Connection:
        try:
            if self._is_https:
                context = self._ssl_context or ssl.create_default_context()
                stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                    self._host, self._port, ssl_context=context, https_compatible=True
                )
            else:
                stream = await trio.open_tcp_stream(self._host, self._port)
        except OSError as exc:
            raise HttpGetError(f"cannot connect: {exc.strerror or exc}") from exc
        except UnicodeError as exc:
            # A host name without an IDNA form ("acl..internal", a label over
            # 63 characters) parses as a URL and fails only here, every time.
            raise HttpGetError(f"cannot connect: the host name is not valid ({exc})") from exc
        return _Connection(stream)
