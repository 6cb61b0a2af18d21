"""A real HTTP server on 127.0.0.1 standing in for the access-control backend.

``GET /roles?site_id=S&subject=U`` answers ``{"role": ...}`` from ``roles``,
over keep-alive HTTP/1.1 (h11). ``misbehave`` makes it answer what a broken
backend would: another status, a redirect, garbage, an oversized body, a
stall, or a closed connection. It counts connections and records requests
(and, while answers are delayed, how many it answered at once).
With ``required_token`` it answers 401 to a request without
``Authorization: Bearer`` that token, as a backend behind auth does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

__all__ = ["Misbehaviour", "RoleBackend", "role_backend"]

Misbehaviour = Literal[
    "status_500",
    "redirect",
    "not_json",
    "json_list",
    "no_role_key",
    "unknown_role",
    "role_not_string",
    "too_large",
    "stall",
    "close",
    "deep_json",
    "answer_twice",
]


class RoleBackend:
    def __init__(self) -> None:
        self.roles: dict[tuple[str, str], str | None] = {}
        self.requests: list[tuple[str, str]] = []
        self.connections = 0
        self.misbehave: Misbehaviour | None = None
        #: Seconds each answer waits before it is sent.
        self.delay = 0.0
        #: Requests being answered now, and the most there were at once.
        self.in_flight = 0
        self.max_in_flight = 0
        #: The next request's answer is made at once, then held until this is set
        #: (an answer on its way while the roles change); later ones are not held.
        self.gate: trio.Event | None = None
        self.port = 0
        #: The query parameters the URL had before site_id and subject.
        self.extra_query: dict[str, str] = {}
        #: Requests without ``Authorization: Bearer <this>`` get 401 (None: no check).
        self.required_token: str | None = None
        #: The Authorization header of each request (None: there was none).
        self.authorizations: list[str | None] = []
        # Connections waiting for their next request (what a keep-alive timeout closes).
        self._idle: set[trio.SocketStream] = set()

    def url(self, query: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/roles" + (f"?{query}" if query else "")

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(our_role=h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    if conn.their_state is h11.IDLE:
                        self._idle.add(stream)
                    try:
                        data = await stream.receive_some(16384)
                    finally:
                        self._idle.discard(stream)
                    conn.receive_data(data)
                    if not data and conn.their_state is h11.IDLE:
                        return
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    return
                if isinstance(event, h11.Request):
                    target = event.target.decode()
                    authorization = next(
                        (v.decode() for k, v in event.headers if k == b"authorization"), None
                    )
                elif isinstance(event, h11.EndOfMessage):
                    if not await self._answer(stream, conn, target, authorization):
                        return
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def close_idle(self) -> int:
        """Close the connections waiting for a request, as a keep-alive timeout does."""
        idle, self._idle = self._idle, set()
        for stream in idle:
            await trio.aclose_forcefully(stream)
        return len(idle)

    async def _answer(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        target: str,
        authorization: str | None,
    ) -> bool:
        query = dict(parse_qsl(urlsplit(target).query))
        pair = (query.pop("site_id", ""), query.pop("subject", ""))
        self.extra_query = query
        self.requests.append(pair)
        self.authorizations.append(authorization)
        if self.delay:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await trio.sleep(self.delay)
            finally:
                self.in_flight -= 1
        status, body = 200, json.dumps({"role": self.roles.get(pair)}).encode()
        if self.gate is not None:
            gate, self.gate = self.gate, None
            await gate.wait()
        headers = [("Content-Type", "application/json")]
        if self.required_token is not None and authorization != f"Bearer {self.required_token}":
            # What the answer would be is not the unauthenticated caller's to see.
            status, body = 401, b'{"error": "unauthorized"}'
            headers.append(("WWW-Authenticate", 'Bearer realm="roles"'))
        match self.misbehave:
            case None:
                pass
            case "status_500":
                status, body = 500, b'{"role": "site_admin"}'
            case "redirect":
                status, body = 302, b'{"role": "site_admin"}'
                headers.append(("Location", "/elsewhere"))
            case "not_json":
                body = b"<html>site_admin</html>"
            case "json_list":
                body = b'["site_admin"]'
            case "no_role_key":
                body = b'{"rights": "site_admin"}'
            case "unknown_role":
                body = b'{"role": "Site Admin"}'
            case "role_not_string":
                body = b'{"role": 1}'
            case "too_large":
                body = b'{"role": "site_admin", "pad": "' + b"x" * 100_000 + b'"}'
            case "deep_json":
                body = b"[" * 5000 + b"]" * 5000
            case "stall":
                await trio.sleep_forever()
            case "close":
                return False
        headers.append(("Content-Length", str(len(body))))
        is_twice = self.misbehave == "answer_twice"
        data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        if is_twice:
            # Its answer, and in the same breath a second one nobody asked for.
            extra = b'{"role": "site_admin"}'
            data += b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            data += b"Content-Length: %d\r\n\r\n%s" % (len(extra), extra)
        await stream.send_all(data)
        return True


@asynccontextmanager
async def role_backend() -> AsyncIterator[RoleBackend]:
    """A running `RoleBackend` on a free port; stopped at the end of the block."""
    backend = RoleBackend()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, backend.handle, 0, host="127.0.0.1")
        )
        backend.port = listeners[0].socket.getsockname()[1]
        yield backend
        nursery.cancel_scope.cancel()
