"""Routes of the one HTTP/1.1 port.

- ``GET /healthz``: alive. ``GET /readyz``: ready to serve (not while starting
  or draining).
- ``GET /v1/hub/entries|incidents?site_id=S[&user_id=U]``: WebSocket upgrade to
  a hub (skipNegotiation, as the reference's clients connect).
- ``POST /v1/events/entries|incidents``: the publish API.

Refusals before an upgrade are plain HTTP with a short ``text/plain`` body
(spec §13: operators read them in logs and devtools); the publish API answers
JSON. Every request is logged with ``access_token`` redacted (its target cut
at ``MAX_LOGGED_TARGET_CHARS``).

Deadlines: each request has one, ``request_timeout`` from its first byte,
covering its head, its body and the writing of its answer; a client that
misses it gets 408 if nothing was answered yet (503 when the server was the
slow one), and the connection is closed. Between requests a keep-alive
connection may stay idle for ``http_idle_timeout``. HEAD is answered as GET,
without the body.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

from hubserver.app import HUB_SCOPE, PUBLISH_SCOPE, App
from hubserver.auth import AuthError, Claims, InvalidToken, extract_token, redact_url
from hubserver.backplane import BackplaneError, BackplaneUnavailable
from hubserver.connection import MAX_RESUME_SEQ, HubSession
from hubserver.permissions import PermissionStoreUnavailable
from hubserver.routing import GroupKey, Hub, PublishError, parse_publish_body
from hubserver.routing._events import MAX_ID_CHARS
from hubserver.transports import TransportError, UpgradeError, check_upgrade, websocket_accept
from hubserver.transports.negotiate import negotiate_body

from ._io import (
    SERVER_HEADER,
    read_body,
    receive_bytes,
    receive_event,
    send_continue,
    send_json,
    send_response,
)

__all__ = ["handle_connection"]

log = logging.getLogger("hubserver.http")

MAX_HEADER_BYTES: Final = 16 * 1024
HUB_PREFIX: Final = "/v1/hub/"
#: ``/v1/hub/publish``: the publisher hub (``Publish(hub, events)``).
PUBLISHER_HUB: Final = "publish"
EVENTS_PREFIX: Final = "/v1/events/"
_HUBS: Final = {hub.value: hub for hub in Hub}
_WWW_AUTHENTICATE: Final = (b"www-authenticate", b'Bearer error="invalid_token"')
_RETRY_AFTER: Final = (b"retry-after", b"1")
#: Logged request targets are cut here: a URL is the client's to choose.
MAX_LOGGED_TARGET_CHARS: Final = 200
#: How long a missed deadline's 408 or 503 may take to go out before the close.
TIMEOUT_REPLY_TIMEOUT: Final = 0.5


class _Refusal(Exception):
    """Answer the request with ``status`` and ``text`` (internal control of this module).

    With ``code``, the answer is JSON ``{"code", "message"}`` instead of text
    (limits, which clients and operators handle by code), with ``Retry-After``.
    """

    def __init__(self, status: int, text: str, *, code: str | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.code = code


@dataclass(slots=True)
class _Progress:
    """How far a request got, for the answer to a missed deadline."""

    is_publishing: bool = False


def _parse_target(target: bytes) -> tuple[str, dict[str, str]]:
    try:
        text = target.decode("ascii")
        parts = urlsplit(text)
        pairs = parse_qsl(parts.query, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Refusal(400, "malformed request target") from exc
    query: dict[str, str] = {}
    for name, value in pairs:
        name = name.lower()  # ASP.NET Core matches query names case-insensitively
        if name in query and name != "access_token":
            raise _Refusal(400, f"query parameter '{name}' given more than once")
        query[name] = value
    return parts.path, query


async def handle_connection(stream: trio.SocketStream, app: App) -> HubSession | None:
    """Serve one TCP connection's HTTP requests until it closes or upgrades.

    Returns:
        The hub session to run (``HubSession.run``) after an upgrade; the
        caller runs it once this function's frame and h11's state are gone,
        since they would otherwise live as long as the hub connection.
        None when the connection is over (and closed).
    """
    session = None
    try:
        session = await _serve_requests(stream, app)
    finally:
        if session is None:
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await stream.aclose()
    return session


async def _serve_requests(stream: trio.SocketStream, app: App) -> HubSession | None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    config = app.config
    try:
        is_first = True
        while True:
            # A new connection's first request is timed from the accept; a later
            # one from its first byte, after at most http_idle_timeout of quiet.
            if not is_first and not conn.trailing_data[0]:
                with trio.move_on_after(config.http_idle_timeout) as idling:
                    data = await receive_bytes(stream)
                if idling.cancelled_caught:
                    return None
                conn.receive_data(data)
            is_first = False
            deadline = trio.current_time() + config.request_timeout
            with trio.move_on_at(deadline) as waiting:
                event = await receive_event(stream, conn)
            if waiting.cancelled_caught:
                return None  # no complete request head in time (slowloris): nothing to say
            app.requests_in_flight += 1
            try:
                outcome = await _handle_event(stream, conn, app, event, deadline)
            finally:
                app.request_done()
            if isinstance(outcome, HubSession):
                return outcome
            if outcome:
                return None
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return None
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return None
    except h11.RemoteProtocolError as exc:
        # h11 quotes the offending line ("illegal request line: b'GET ...'"), which
        # may carry an access_token or an Authorization header: keep only the verdict.
        reason = str(exc).partition(":")[0]
        log.info("bad HTTP from %s: %s", _peer(stream), reason)
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status = exc.error_status_hint
            text = f"bad request: {reason}\n".encode()
            # Bounded like every other answer: a client that stopped reading
            # (pipelined answers fill its socket) must not hold this task.
            with (
                trio.move_on_after(TIMEOUT_REPLY_TIMEOUT),
                contextlib.suppress(TransportError, h11.LocalProtocolError),
            ):
                await send_response(stream, conn, status, text, close=True)
    except h11.LocalProtocolError as exc:
        # Our side of h11 refused what we asked of it (a state this front did not
        # foresee): that connection ends, quietly; nobody else is affected.
        log.debug("closing the connection from %s: %s", _peer(stream), exc)
    except TransportError as exc:
        log.debug("connection from %s lost: %s", _peer(stream), exc)
    return None


def _loggable(target: bytes) -> str:
    text = redact_url(target.decode("ascii", "replace"))
    if len(text) > MAX_LOGGED_TARGET_CHARS:
        return text[:MAX_LOGGED_TARGET_CHARS] + f"... ({len(text)} chars)"
    return text


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


async def _handle_event(
    stream: trio.SocketStream, conn: h11.Connection, app: App, event: object, deadline: float
) -> HubSession | bool:
    """Handle one request by ``deadline``; the session to run after an upgrade, True when closed."""
    if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
        return True
    if not isinstance(event, h11.Request):
        return True
    started = trio.current_time()
    progress = _Progress()
    status = 0
    session: HubSession | None = None
    with trio.move_on_at(deadline) as handling:
        status, session = await _dispatch(stream, conn, app, event, progress)
    if handling.cancelled_caught:
        status = await _answer_missed_deadline(stream, conn, event, progress)
    log.info(
        "%s %s -> %s (%.1f ms)",
        event.method.decode("ascii", "replace"),
        _loggable(event.target),
        status or "cut off at the request deadline",
        (trio.current_time() - started) * 1000,
    )
    if handling.cancelled_caught:
        return True
    if isinstance(session, HubSession):
        return session
    return conn.our_state is h11.MUST_CLOSE


async def _answer_missed_deadline(
    stream: trio.SocketStream, conn: h11.Connection, event: h11.Request, progress: _Progress
) -> int:
    """408 (the client was slow) or 503 (we were), if nothing was answered yet; 0 if not.

    The connection is closed after this either way: a response cut short
    cannot be resumed, and a client that missed a deadline gets no more time.
    """
    if conn.our_state is not h11.SEND_RESPONSE:
        return 0  # an answer is (partly) out already: the close tells the rest
    is_json = event.target.startswith(EVENTS_PREFIX.encode())
    if conn.their_state is not h11.DONE:
        status, code, text = 408, "timeout", "the request did not arrive in time"
        extra: dict[str, object] = {}
        headers: list[tuple[bytes, bytes]] = []
    else:
        status, code, text = 503, "unavailable", "the server could not answer in time; retry"
        # A publish that reached the backplane may have been applied.
        extra = {"outcome": "unknown"} if progress.is_publishing else {}
        headers = [_RETRY_AFTER]
    with trio.move_on_after(TIMEOUT_REPLY_TIMEOUT):
        with contextlib.suppress(TransportError, h11.LocalProtocolError):
            if is_json:
                payload = {"code": code, "message": text, **extra}
                await send_json(stream, conn, status, payload, headers=headers, close=True)
            else:
                await send_response(
                    stream,
                    conn,
                    status,
                    (text + "\n").encode(),
                    headers=headers,
                    close=True,
                    is_head=event.method == b"HEAD",
                )
    return status


async def _dispatch(
    stream: trio.SocketStream,
    conn: h11.Connection,
    app: App,
    event: h11.Request,
    progress: _Progress,
) -> tuple[int, HubSession | None]:
    """Answer one request: its status, and the hub session after an upgrade."""
    session: HubSession | None = None
    try:
        # h11 bounds only a head still incomplete; one that arrived whole in a
        # single read is measured here.
        head_bytes = len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
        if head_bytes > MAX_HEADER_BYTES:
            raise _Refusal(431, "request header fields too large")
        path, query = _parse_target(event.target)
        if path.startswith(HUB_PREFIX):
            result = await _hub(stream, conn, app, event, path, query)
            if isinstance(result, HubSession):
                session, status = result, 101
            else:
                status = result
        elif path.startswith(EVENTS_PREFIX):
            status = await _publish(stream, conn, app, event, path, query, progress)
        elif path == "/healthz":
            status = await _simple(stream, conn, event, 200, "ok")
        elif path == "/readyz":
            ready = app.is_ready and not app.is_draining and app.broker.backplane.is_available
            ready = ready and app.store.is_available
            status = await _simple(
                stream, conn, event, 200 if ready else 503, "ready" if ready else "not ready"
            )
        else:
            raise _Refusal(404, "not found")
    except _Refusal as refusal:
        status = refusal.status
        headers = [_WWW_AUTHENTICATE] if status == 401 else []
        if status == 426:  # RFC 6455 §4.2.2: name the versions we understand
            headers.append((b"sec-websocket-version", b"13"))
        if status == 503 and refusal.code is None:  # refusals with a code add it below
            headers.append(_RETRY_AFTER)
        # A request without a body can keep its connection: h11 yields its end
        # without reading. One whose body we leave unread cannot.
        is_done = conn.their_state is h11.DONE or (
            conn.their_state is h11.SEND_BODY and type(conn.next_event()) is h11.EndOfMessage
        )
        close = event.method not in (b"GET", b"HEAD") or not is_done
        is_head = event.method == b"HEAD"
        if refusal.code is not None:
            headers.append(_RETRY_AFTER)
            payload = {"code": refusal.code, "message": refusal.text}
            await send_json(
                stream, conn, status, payload, headers=headers, close=close, is_head=is_head
            )
        else:
            await send_response(
                stream,
                conn,
                status,
                (refusal.text + "\n").encode(),
                headers=headers,
                close=close,
                is_head=is_head,
            )
    return status, session


async def _simple(
    stream: trio.SocketStream, conn: h11.Connection, event: h11.Request, status: int, text: str
) -> int:
    if event.method not in (b"GET", b"HEAD"):
        raise _Refusal(405, "method not allowed")
    await _discard_body(stream, conn)
    await send_response(
        stream, conn, status, (text + "\n").encode(), is_head=event.method == b"HEAD"
    )
    return status


async def _discard_body(stream: trio.SocketStream, conn: h11.Connection) -> None:
    if conn.their_state is h11.SEND_BODY and await read_body(stream, conn, 64 * 1024) is None:
        raise _Refusal(413, "request body too large")


async def _authenticate(app: App, event: h11.Request, query: Mapping[str, str]) -> Claims:
    token = extract_token(event.headers, query)
    if token is None:
        raise _Refusal(401, "missing access token")
    try:
        return await app.verifier.verify(token, time.time())
    except AuthError as exc:
        raise _Refusal(
            exc.status, f"unauthorized: {exc}" if isinstance(exc, InvalidToken) else str(exc)
        ) from None


def _hub_of(path: str, prefix: str) -> Hub:
    hub = _HUBS.get(path[len(prefix) :].rstrip("/"))
    if hub is None:
        raise _Refusal(404, "not found")
    return hub


async def _authorize(
    app: App, event: h11.Request, query: Mapping[str, str], hub: Hub
) -> tuple[GroupKey, Claims]:
    """Token, scope, site_id and site role, in the order the reference checks them."""
    claims = await _authenticate(app, event, query)
    if not claims.has_scope(HUB_SCOPE):
        raise _Refusal(403, f"forbidden: the token lacks the '{HUB_SCOPE}' scope")
    site_id = query.get("site_id", "")
    if not site_id:
        raise _Refusal(400, "the 'site_id' query parameter is required")
    user_id = query.get("user_id")
    if user_id is not None and not user_id:
        raise _Refusal(400, "the 'user_id' query parameter must not be empty")
    # As on the publish API; checked before the role lookup, whose cache keeps every pair.
    if len(site_id) > MAX_ID_CHARS or (user_id is not None and len(user_id) > MAX_ID_CHARS):
        raise _Refusal(400, f"'site_id' and 'user_id' are at most {MAX_ID_CHARS} characters")
    group = GroupKey(hub, site_id, user_id)
    try:
        is_allowed = await app.may_open(group, claims.subject)
    except PermissionStoreUnavailable:
        raise _Refusal(503, "permission store unavailable") from None  # the watcher logs it
    if not is_allowed:
        # The same answer for an unknown site and a site without rights: no enumeration.
        raise _Refusal(403, "forbidden: no access to this stream")
    return group, claims


def _since_seq(query: Mapping[str, str]) -> int | None:
    """The ``since_seq`` resume point: the last seq the client received."""
    value = query.get("since_seq")
    if value is None:
        return None
    # The length check first: int() of a long digit string costs quadratic time.
    if not (value.isascii() and value.isdigit() and len(value) <= 16) or (
        int(value) > MAX_RESUME_SEQ
    ):
        raise _Refusal(400, f"'since_seq' must be an integer from 0 to {MAX_RESUME_SEQ}")
    return int(value)


def _stream_name(group: GroupKey) -> str:
    return f"{group.hub.value}\x00{group.site_id}\x00{group.user_id or ''}"


async def _authorize_publisher(app: App, event: h11.Request, query: Mapping[str, str]) -> Claims:
    claims = await _authenticate(app, event, query)
    if not claims.has_scope(PUBLISH_SCOPE):
        raise _Refusal(403, f"forbidden: the token lacks the '{PUBLISH_SCOPE}' scope")
    return claims


async def _negotiate(
    stream: trio.SocketStream,
    conn: h11.Connection,
    app: App,
    event: h11.Request,
    hub: Hub | None,
    query: dict[str, str],
) -> int:
    """Negotiate for a hub, or for the publisher hub (``hub`` None)."""
    if event.method != b"POST":
        raise _Refusal(405, "negotiate takes POST")
    if hub is None:
        claims = await _authorize_publisher(app, event, query)
        stream_name = PUBLISHER_HUB
    else:
        group, claims = await _authorize(app, event, query, hub)
        stream_name = _stream_name(group)
    await _discard_body(stream, conn)
    # Spec §6: missing negotiateVersion is 0; we answer min(requested, 1).
    requested = query.get("negotiateversion", "0")
    # ASCII digits only: str.isdigit() also takes '²' and other digits int() refuses.
    if not requested.isascii() or not requested.isdigit():
        body: object = {"error": "The client requested a non-integer protocol version."}
        await send_json(stream, conn, 200, body)
        return 200
    # min(int(requested), 1) without int(): a long run of digits is no error either.
    version = 0 if not requested.strip("0") else 1
    connection_id, token = app.negotiations.create(stream_name, claims.subject, trio.current_time())
    if version == 0:
        connection_id = token  # version 0 clients send the connectionId as `id`
    await send_response(
        stream,
        conn,
        200,
        negotiate_body(connection_id, token, version),
        content_type=b"application/json",
    )
    return 200


async def _hub(
    stream: trio.SocketStream,
    conn: h11.Connection,
    app: App,
    event: h11.Request,
    path: str,
    query: dict[str, str],
) -> HubSession | int:
    """Upgrade to a hub session (returned, not yet running), or answer negotiate."""
    name = path[len(HUB_PREFIX) :].rstrip("/")
    is_negotiate = name.endswith("/negotiate")
    name = name.removesuffix("/negotiate")
    hub = _HUBS.get(name)
    if hub is None and name != PUBLISHER_HUB:
        raise _Refusal(404, "not found")
    if app.is_draining:
        raise _Refusal(503, "server is shutting down")
    if is_negotiate:
        return await _negotiate(stream, conn, app, event, hub, query)
    # HEAD gets GET's checks and answers; only the upgrade itself needs GET.
    is_head = event.method == b"HEAD"
    try:
        key = check_upgrade(b"GET" if is_head else event.method, event.headers)
    except UpgradeError as exc:
        raise _Refusal(exc.status, str(exc)) from None
    for header, value in event.headers:
        # A body would be read as the WebSocket's first frames (RFC 6455 §4.1:
        # the opening handshake is a GET without one).
        if (header == b"content-length" and value != b"0") or header == b"transfer-encoding":
            raise _Refusal(400, "a WebSocket upgrade request has no body")
    group: GroupKey | None = None
    if hub is None:
        claims = await _authorize_publisher(app, event, query)
        stream_name, since_seq = PUBLISHER_HUB, None
    else:
        group, claims = await _authorize(app, event, query, hub)
        stream_name, since_seq = _stream_name(group), _since_seq(query)
    if is_head:
        raise _Refusal(405, "WebSocket upgrades use GET")
    # Before the negotiation's id is claimed: a refused client can retry with it.
    if not app.hub_opened(claims.subject):
        raise _Refusal(
            429,
            "too many open hub connections for this subject; retry later",
            code="too_many_connections",
        )
    try:
        connection_token = query.get("id")
        if connection_token is not None and not app.negotiations.claim(
            connection_token, stream_name, claims.subject, trio.current_time()
        ):
            raise _Refusal(404, "No Connection with that ID")
        return await _upgrade(stream, conn, app, key, group, claims, since_seq)
    except BaseException:
        app.hub_closed(claims.subject)  # no session will end to release it
        raise


async def _upgrade(
    stream: trio.SocketStream,
    conn: h11.Connection,
    app: App,
    key: bytes,
    group: GroupKey | None,
    claims: Claims,
    since_seq: int | None,
) -> HubSession:
    """Send the 101 and make the session (the caller counted it with ``hub_opened``).

    ``group`` None: a publisher's connection.
    """
    # What the client sent after its request (nothing more is read before the 101).
    trailing, _ = conn.trailing_data
    session = HubSession(
        stream=stream,
        received=bytes(trailing),
        ctx=app.session_context(),
        key=group,
        subject=claims.subject,
        # The token stays valid for the verifier's leeway past exp; so does the connection.
        token_expires_at=(
            None if claims.expires_at is None else claims.expires_at + app.config.token_leeway
        ),
        session_id=app.next_id(),
        since_seq=since_seq,
    )
    # Registered before the 101 goes out: a revoke or a drain during the write
    # reaches this connection (it acts once its task runs).
    session.register()
    response = h11.InformationalResponse(
        status_code=101,
        headers=[
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", websocket_accept(key)),
            SERVER_HEADER,
        ],
    )
    try:
        await stream.send_all(conn.send(response))
    except BaseException as exc:
        session.discard()
        if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
            raise TransportError(f"connection lost: {exc}") from exc
        raise
    log.info(
        "session %d: %s, subject %s",
        session.session_id,
        "publisher hub"
        if group is None
        else f"{group.hub.value} hub, site stream{'' if group.user_id is None else ' of one user'}",
        claims.subject[:64],
    )
    return session


async def _publish(
    stream: trio.SocketStream,
    conn: h11.Connection,
    app: App,
    event: h11.Request,
    path: str,
    query: dict[str, str],
    progress: _Progress,
) -> int:
    hub = _hub_of(path, EVENTS_PREFIX)
    if event.method != b"POST":
        raise _Refusal(405, "use POST")

    async def fail(
        status: int,
        code: str,
        message: str,
        *,
        headers_extra: Sequence[tuple[bytes, bytes]] = (),
        extra: Mapping[str, object] | None = None,
    ) -> int:
        headers = [_WWW_AUTHENTICATE] if status == 401 else []
        headers.extend(headers_extra)
        await send_json(
            stream,
            conn,
            status,
            {"code": code, "message": message, **(extra or {})},
            headers=headers,
            close=conn.their_state is not h11.DONE,
        )
        return status

    token = extract_token(event.headers, query)
    if token is None:
        return await fail(401, "unauthorized", "missing access token")
    try:
        claims = await app.verifier.verify(token, time.time())
    except AuthError as exc:
        return await fail(exc.status, "unauthorized" if exc.status == 401 else "error", str(exc))
    if not claims.has_scope(PUBLISH_SCOPE):
        return await fail(403, "forbidden", f"the token lacks the '{PUBLISH_SCOPE}' scope")
    if app.is_draining:
        return await fail(
            503,
            "unavailable",
            "server is shutting down; nothing was accepted, retry with the same ids",
            headers_extra=[_RETRY_AFTER],
            extra={"outcome": "not_accepted"},
        )
    limit = app.config.max_publish_bytes
    for name, value in event.headers:
        if name == b"content-length" and int(value) > limit:
            return await fail(413, "too_large", f"the body is larger than {limit} bytes")
    if conn.they_are_waiting_for_100_continue:
        # curl asks before sending a body over 1 KiB, and waits a second for it.
        await send_continue(stream, conn)
    # The request deadline bounds this read (408 from _answer_missed_deadline).
    body = await read_body(stream, conn, limit)
    if body is None:
        return await fail(413, "too_large", f"the body is larger than {limit} bytes")
    try:
        events = parse_publish_body(body)
        progress.is_publishing = True
        published = await app.broker.publish(hub, events)
    except BackplaneUnavailable as exc:
        log.warning("publish refused, backplane unavailable: %s", exc)
        return await fail(
            503,
            "unavailable",
            "the event backplane is unavailable; nothing was accepted, retry later",
            headers_extra=[_RETRY_AFTER],
            extra={"outcome": "not_accepted"},
        )
    except BackplaneError as exc:
        # Redis refused or failed mid-way (OOM, READONLY, NOPERM, a malformed
        # reply...): the events may or may not be stored. Retrying with the same
        # ids is safe (the publish API is idempotent on id).
        log.warning("publish failed, outcome unknown: %s", exc)
        return await fail(
            503,
            "unavailable",
            "the event backplane failed; the events may or may not have been accepted: "
            "retry later with the same ids",
            headers_extra=[_RETRY_AFTER],
            extra={"outcome": "unknown"},
        )
    except PublishError as exc:
        extra: dict[str, object] = {} if exc.index is None else {"index": exc.index}
        log.info("publish refused: %s", exc)
        return await fail(
            exc.status,
            "invalid_event" if exc.index is not None else "invalid_body",
            str(exc),
            extra=extra,
        )
    await send_json(
        stream,
        conn,
        202,
        {
            "accepted": len(published),
            "ids": [e.event_id for e in published],
            "seqs": [e.seq for e in published],
        },
    )
    return 202
