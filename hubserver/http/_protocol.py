"""One TCP connection's HTTP/1.1 requests: the socket, h11, and the request loop.

``HttpConnection`` owns its connection (as hypercorn's ``H11Protocol`` does):
it reads with direct non-blocking ``os.read`` calls, waiting for readiness
only when the socket has nothing (as the hub connections do), feeds h11,
hands each request to ``_routes.respond`` and writes the answer with direct
non-blocking ``os.write`` calls.

h11 parses, and only parses. Answers are written from byte templates
(``_request.response_bytes``), never through ``h11.Connection.send``, which
cost about a third of a publish's HTTP handling. So that h11's state machine
never disagrees with what was written, each request cycle gets its own
``h11.Connection`` (the next one starts with the bytes the client pipelined
behind the request), and what h11 would decide for keep-alive is decided
here: the connection goes on only after a request whose body was read to its
end and which did not ask to close (``Connection: close``, HTTP/1.0), and
then the answer says nothing; otherwise the answer carries
``connection: close`` and the connection ends.

Deadlines: one cancel scope for the connection's life, whose deadline moves.
A request has ``request_timeout`` from its first byte (a new connection's
first request from the accept), covering its head, its body and the writing
of its answer; a client that misses it gets 408 if nothing was answered yet
(503 when the server was the slow one), and the connection is closed.
Between requests a keep-alive connection may stay idle for
``http_idle_timeout``.

Logging: refusals and errors (status 400 and up, missed deadlines, bad HTTP)
are logged at INFO with the target's ``access_token`` redacted; successful
requests only with ``--access-log``. Each such line carries, for the JSON log
format (``hubserver.logs``), the fields ``method``, ``path`` (redacted and
capped as in the message), ``status``, ``bytes`` (the answer's head and body)
and ``duration_ms``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import h11
import trio

from hubserver.app import App
from hubserver.auth import redact_url
from hubserver.transports import TransportError

from ._cors import decide_cors
from ._request import (
    Refusal,
    Request,
    Response,
    TokenMemo,
    continue_bytes,
    is_json_family,
    parse_target,
    refusal_response,
    response_bytes,
)
from ._routes import Session, Upgrade, go_live, log_opened, respond

__all__ = ["HttpConnection", "Respond"]

#: What a front answers: ``_routes.respond`` on the main port,
#: ``_routes.respond_internal`` on the metrics listener.
Respond = Callable[[Request], Awaitable[Response | Upgrade]]

log = logging.getLogger("hubserver.http")

MAX_HEADER_BYTES: Final = 16 * 1024
RECEIVE_BYTES: Final = 65536
#: Logged request targets are cut here: a URL is the client's to choose.
MAX_LOGGED_TARGET_CHARS: Final = 200
#: How long a missed deadline's 408 or 503 (or a bad request's 400) may take to go out.
TIMEOUT_REPLY_TIMEOUT: Final = 0.5
#: h11 imports it into its package but leaves it out of ``__all__``.
_MIGHT_SWITCH_PROTOCOL: Final = h11.MIGHT_SWITCH_PROTOCOL  # type: ignore[attr-defined]


class _Phase(enum.Enum):
    """What the connection's deadline is for right now."""

    #: Waiting for a request's head (the first, or after the idle wait).
    HEAD = "head"
    #: Between requests: the idle timeout.
    IDLE = "idle"
    #: A request is being handled: a missed deadline gets an answer.
    HANDLING = "handling"


def _new_parser() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)


def _keeps_alive(event: h11.Request) -> bool:
    """Whether the client lets the connection go on after this request (RFC 9112 §9.3)."""
    if event.http_version < b"1.1":
        return False
    for name, value in event.headers:
        if name == b"connection" and b"close" in (t.strip() for t in value.lower().split(b",")):
            return False
    return True


def _loggable(target: bytes) -> str:
    text = redact_url(target.decode("ascii", "replace"))
    if len(text) > MAX_LOGGED_TARGET_CHARS:
        return text[:MAX_LOGGED_TARGET_CHARS] + f"... ({len(text)} chars)"
    return text


class HttpConnection:
    """The HTTP/1.1 side of one accepted TCP connection, until it closes or upgrades.

    Args:
        stream: the accepted connection; this object owns it (closes it,
            unless it hands it to a hub session).
        app: the server's shared parts.
        peer_ip: the client's address, as the connection limits count it.
        respond: what answers each request (the main port's routes by default).
        cors_origins: the ``--cors-origin`` list this front applies (none on
            the metrics listener, which serves no browser).
    """

    __slots__ = (
        "_app",
        "_cors_headers",
        "_cors_origins",
        "_deadline",
        "_fd",
        "_is_answered",
        "_parser",
        "_peer_ip",
        "_phase",
        "_received",
        "_request",
        "_respond",
        "_sock",
        "_stream",
        "_tokens",
    )

    def __init__(
        self,
        stream: trio.SocketStream,
        app: App,
        peer_ip: str,
        *,
        respond: Respond = respond,
        cors_origins: tuple[str, ...] | None = None,
    ) -> None:
        self._stream = stream
        self._peer_ip = peer_ip
        self._sock = stream.socket
        self._fd = stream.socket.fileno()
        self._app = app
        self._respond = respond
        self._cors_origins = app.config.cors_origins if cors_origins is None else cors_origins
        self._parser = _new_parser()
        self._tokens = TokenMemo()
        self._phase = _Phase.HEAD
        # Bytes fed to this cycle's parser: a head can be too large only past this.
        self._received = 0
        # This cycle's answer has begun: a missed deadline can only close.
        self._is_answered = False
        # This cycle's request, once it is one (for the answer to a missed deadline).
        self._request: Request | None = None
        self._deadline: trio.CancelScope | None = None
        # What CORS adds to this cycle's answer, whichever answers it.
        self._cors_headers: Sequence[tuple[bytes, bytes]] = ()

    # -- RequestIO: what a request reaches of its connection ----------------------------

    @property
    def app(self) -> App:
        return self._app

    @property
    def tokens(self) -> TokenMemo:
        return self._tokens

    @property
    def peer_ip(self) -> str:
        return self._peer_ip

    async def read_body(self, max_bytes: int) -> bytes | None:
        parser = self._parser
        if parser.their_state is not h11.SEND_BODY:
            return b""
        if parser.they_are_waiting_for_100_continue:
            # curl asks before sending a body over 1 KiB, and waits a second for it.
            await self._write(continue_bytes())
        parts: list[bytes] = []
        size = 0
        while True:
            event = parser.next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > max_bytes:
                    return None
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return parts[0] if len(parts) == 1 else b"".join(parts)
            elif event is h11.NEED_DATA:
                await self._feed()
            else:
                raise TransportError(f"unexpected {type(event).__name__} in a request body")

    async def discard_body(self, max_bytes: int) -> bool:
        return await self.read_body(max_bytes) is not None

    def extend_deadline(self, seconds: float) -> None:
        if self._deadline is not None:
            wanted = trio.current_time() + seconds + self._app.config.request_timeout
            self._deadline.deadline = max(self._deadline.deadline, wanted)

    # -- the request loop -------------------------------------------------------------

    async def run(self) -> Session | None:
        """Serve requests until the connection closes or upgrades.

        Returns:
            The hub session to run after an upgrade (the caller runs it once
            this object is gone, since it would otherwise live as long as the
            hub connection), or None when the connection is over (and closed).
        """
        session = None
        try:
            session = await self._serve()
        finally:
            if session is None:
                self._sock.close()
        return session

    async def _serve(self) -> Session | None:
        try:
            return await self._serve_requests()
        except h11.RemoteProtocolError as exc:
            # h11 quotes the offending line ("illegal request line: b'GET ...'"), which
            # may carry an access_token or an Authorization header: keep only the verdict.
            reason = str(exc).partition(":")[0]
            peer = self._peer()
            log.info(
                "bad HTTP from %s: %s",
                peer,
                reason,
                extra={"event": "bad_http", "peer": peer, "reason": reason},
            )
            if not self._is_answered:
                self._is_answered = True
                response = Response(exc.error_status_hint, f"bad request: {reason}\n".encode())
                # Bounded like every other answer: a client that stopped reading
                # (pipelined answers fill its socket) must not hold this task.
                with trio.move_on_after(TIMEOUT_REPLY_TIMEOUT), contextlib.suppress(TransportError):
                    await self._write(response_bytes(response, is_head=False, close=True))
        except h11.LocalProtocolError as exc:
            # h11 refused what we asked of it (a state this front did not foresee):
            # that connection ends, quietly; nobody else is affected.
            log.debug("closing the connection from %s: %s", self._peer(), exc)
        except TransportError as exc:
            log.debug("connection from %s lost: %s", self._peer(), exc)
        return None

    async def _serve_requests(self) -> Session | None:
        app = self._app
        config = app.config
        request_timeout = config.request_timeout
        started = trio.current_time()
        event: h11.Request | None = None
        is_in_flight = False
        deadline = self._deadline = trio.CancelScope(deadline=started + request_timeout)
        try:
            with deadline:
                while True:
                    self._phase = _Phase.HEAD
                    head = await self._next_event()
                    if not isinstance(head, h11.Request):
                        return None  # the client closed (or sent nothing that makes a request)
                    event = head
                    self._phase = _Phase.HANDLING
                    app.requests_in_flight += 1
                    is_in_flight = True
                    outcome = await self._handle(event, started)
                    is_in_flight = False
                    app.request_done()
                    if not isinstance(outcome, bool):
                        return outcome
                    if not outcome:
                        return None
                    if self._next_cycle():
                        # The next request was pipelined behind this one: no wait,
                        # so let others run (its deadline runs from now).
                        self._phase = _Phase.HEAD
                        started = trio.current_time()
                        deadline.deadline = started + request_timeout
                        await trio.lowlevel.checkpoint()
                    else:
                        # A keep-alive client sends its next request once it read
                        # our answer: idle until its first byte.
                        self._phase = _Phase.IDLE
                        deadline.deadline = trio.current_time() + config.http_idle_timeout
                        await trio.lowlevel.wait_readable(self._sock)
                        started = trio.current_time()
                        deadline.deadline = started + request_timeout
            if deadline.cancelled_caught and self._phase is _Phase.HANDLING:
                assert event is not None
                status, sent = await self._answer_missed_deadline(event)
                self._log(event, status or "cut off at the request deadline", started, sent)
            return None  # slowloris, idle, or the deadline answered: nothing more to say
        finally:
            if is_in_flight:
                app.request_done()

    async def _next_event(self) -> object:
        parser = self._parser
        while True:
            event = parser.next_event()
            if event is not h11.NEED_DATA:
                return event
            await self._feed()

    def _next_cycle(self) -> bool:
        """A new parser for the next request, fed what followed this one; whether it had any."""
        data, is_closed = self._parser.trailing_data
        parser = self._parser = _new_parser()
        self._received = len(data)
        self._is_answered = False
        self._request = None
        self._cors_headers = ()
        if data:
            parser.receive_data(data)
        if is_closed:
            parser.receive_data(b"")
        return bool(data) or is_closed

    async def _handle(self, event: h11.Request, started: float) -> Session | bool:
        """Answer one request: the session after an upgrade, else whether to go on."""
        target = event.target
        cors = decide_cors(self._cors_origins, event.method, target, event.headers)
        self._cors_headers = cors.headers
        # h11 bounds only a head still incomplete; one that arrived whole in a
        # single read is measured here.
        if self._received > MAX_HEADER_BYTES and (
            len(target) + sum(len(n) + len(v) + 4 for n, v in event.headers) > MAX_HEADER_BYTES
        ):
            result: Response | Upgrade = refusal_response(
                Refusal(431, "too_large", "request header fields too large"),
                is_json=is_json_family(target),
            )
        elif cors.response is not None:
            # A preflight, or a foreign origin's WebSocket: no route, token or body involved.
            result = cors.response
            if cors.refused_origin is not None:
                origin = ascii(cors.refused_origin[:MAX_LOGGED_TARGET_CHARS])
                log.info(
                    "origin %s is not in --cors-origin",
                    origin,
                    extra={"event": "origin_refused", "origin": origin},
                )
        else:
            parsed = parse_target(target)
            if isinstance(parsed, Refusal):
                result = refusal_response(parsed, is_json=is_json_family(target))
            else:
                request = Request(
                    event.method, target, parsed[0], parsed[1], event.headers, self, cors.headers
                )
                self._request = request
                result = await self._respond(request)
        if isinstance(result, Upgrade):
            return await self._upgrade(result, event, started)
        if cors.headers:
            result = result._replace(headers=(*result.headers, *cors.headers))
        is_going_on = not result.close and self._is_request_done(event)
        self._is_answered = True
        data = response_bytes(result, is_head=event.method == b"HEAD", close=not is_going_on)
        await self._write(data)
        if result.status >= 400 or self._app.config.access_log:
            self._log(event, result.status, started, len(data))
        return is_going_on

    def _is_request_done(self, event: h11.Request) -> bool:
        """Whether the request was read to its end and lets the connection go on."""
        parser = self._parser
        state = parser.their_state
        if state is h11.SEND_BODY:
            # A request without a body can keep its connection: h11 yields its end
            # without reading. One whose body we leave unread cannot.
            if type(parser.next_event()) is not h11.EndOfMessage:
                return False
            state = parser.their_state
        if state is h11.DONE:
            return True
        # A refused upgrade: h11 waits for our decision; the client's headers decide.
        return state is _MIGHT_SWITCH_PROTOCOL and _keeps_alive(event)

    async def _upgrade(self, upgrade: Upgrade, event: h11.Request, started: float) -> Session:
        """Start the session and send its head (a 101, or an event stream's 200; the
        route counted the subject, unless a live connection takes the transport over)."""
        grant = upgrade.grant
        try:
            # What the client sent after its request (nothing more is read before the head).
            transport = upgrade.transport(self._stream, bytes(self._parser.trailing_data[0]))
            if upgrade.attach is not None:
                session: Session = upgrade.attach(transport)
            else:
                hub_session = grant.start(transport, upgrade.is_stateful)
                if upgrade.token is not None:
                    go_live(self._app, upgrade.token, hub_session, grant.stream)
                session = hub_session
            head = upgrade.head
            if self._cors_headers and not head.startswith(b"HTTP/1.1 101"):
                # An event stream read by a browser from another origin.
                end = head.index(b"\r\n\r\n") + 2
                extra = b"".join([n + b": " + v + b"\r\n" for n, v in self._cors_headers])
                head = head[:end] + extra + head[end:]
            try:
                self._is_answered = True
                await self._write(head)
            except BaseException:
                session.discard()
                raise
        except BaseException:
            if upgrade.attach is None:
                self._app.hub_closed(upgrade.subject)  # no session will end to release it
            raise
        log_opened(
            session.session_id,
            grant,
            upgrade.subject,
            transport.kind,
            event="session_opened" if upgrade.attach is None else "transport_attached",
        )
        if self._app.config.access_log:
            self._log(event, int(upgrade.head[9:12]), started, len(head))
        return session

    async def _answer_missed_deadline(self, event: h11.Request) -> tuple[int, int]:
        """408 (the client was slow) or 503 (we were), if nothing was answered yet; 0 if not;
        and the answer's size in bytes.

        The connection is closed after this either way: a response cut short
        cannot be resumed, and a client that missed a deadline gets no more time.
        """
        if self._is_answered:
            return 0, 0  # an answer is (partly) out already: the close tells the rest
        if self._parser.their_state is h11.SEND_BODY:
            refusal = Refusal(408, "timeout", "the request did not arrive in time", close=True)
        else:
            # A publish that reached the backplane may have been applied.
            is_committed = self._request is not None and self._request.is_committed
            refusal = Refusal(
                503,
                "unavailable",
                "the server could not answer in time; retry",
                extra={"outcome": "unknown"} if is_committed else None,
                close=True,
            )
        response = refusal_response(refusal, is_json=is_json_family(event.target))
        if self._cors_headers:
            response = response._replace(headers=(*response.headers, *self._cors_headers))
        data = response_bytes(response, is_head=event.method == b"HEAD", close=True)
        self._is_answered = True
        with trio.move_on_after(TIMEOUT_REPLY_TIMEOUT), contextlib.suppress(TransportError):
            await self._write(data)
        return refusal.status, len(data)

    # -- the socket ---------------------------------------------------------------------

    async def _feed(self) -> None:
        """Read what the socket has (waiting only when it has nothing) into the parser."""
        while True:
            try:
                data = os.read(self._fd, RECEIVE_BYTES)
                break
            except BlockingIOError:
                pass
            except OSError as exc:
                raise TransportError(f"connection lost: {exc}") from exc
            await trio.lowlevel.wait_readable(self._sock)
        self._received += len(data)
        self._parser.receive_data(data)  # b"" at the end: h11 makes it ConnectionClosed

    async def _write(self, data: bytes) -> None:
        """Write all of ``data``: at once when the socket takes it, else as it drains.

        Callers that begin a final answer set ``_is_answered`` first.
        """
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise TransportError(f"connection lost: {exc}") from exc
        if sent == len(data):
            return
        view = memoryview(data)
        while sent < len(data):
            await trio.lowlevel.wait_writable(self._sock)
            try:
                sent += os.write(self._fd, view[sent:])
            except BlockingIOError:
                continue
            except OSError as exc:
                raise TransportError(f"connection lost: {exc}") from exc

    # -- logging ------------------------------------------------------------------------

    def _log(self, event: h11.Request, status: int | str, started: float, sent: int) -> None:
        """The access log's line (``sent``: the answer's bytes, head and body)."""
        method = event.method.decode("ascii", "replace")
        target = _loggable(event.target)
        duration_ms = (trio.current_time() - started) * 1000
        fields: dict[str, object] = {
            "event": "http_request",
            "method": method,
            "path": target,
            "status": status if isinstance(status, int) else None,
            "bytes": sent,
            "duration_ms": round(duration_ms, 1),
        }
        if not isinstance(status, int):
            fields["reason"] = "request_deadline"
        log.info("%s %s -> %s (%.1f ms)", method, target, status, duration_ms, extra=fields)

    def _peer(self) -> str:
        try:
            host, port = self._sock.getpeername()[:2]
        except OSError:
            return "?"
        return f"{host}:{port}"
