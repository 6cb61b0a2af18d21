"""What each path answers: health, the publish API, and the hubs (negotiate and upgrade).

Handlers take a ``Request`` and return a ``Response``, or an ``Upgrade`` (the
hub session to run once the connection's protocol has sent the 101). Checks
return a ``Refusal`` instead of raising; each route family renders it in its
one shape: text for the hubs and the rest, JSON for ``/v1/events/...``.

The hubs are one table, ``HUBS``: the name under ``/v1/hub/``, the scope its
tokens need, and the check that turns a request into a ``HubGrant`` (what the
connection opens, and how its session starts). Everything else about a hub
(draining, negotiate, the upgrade's headers, the token, HEAD, the
per-subject limit, the negotiated id, the 101) is the same for every hub and
lives here once. A hub with another kind of session, another scope and other
query parameters is one more entry and its check function.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Final, NamedTuple, Protocol

import trio

from hubserver.app import ADMIN_SCOPE, HUB_SCOPE, PUBLISH_SCOPE, App
from hubserver.auth import AuthError, Claims, extract_token
from hubserver.backplane import BackplaneError, BackplaneUnavailable
from hubserver.connection import MAX_RESUME_SEQ, HubSession
from hubserver.logs import connection_fields, session_fields
from hubserver.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from hubserver.permissions import PermissionStoreUnavailable
from hubserver.routing import MAX_ID_CHARS, GroupKey, Hub, PublishError, parse_publish_body
from hubserver.transports import (
    SSE_HEAD,
    PollTransport,
    SseTransport,
    Transport,
    TransportKind,
    UpgradeError,
    WebSocketTransport,
    check_upgrade,
    websocket_accept,
)
from hubserver.transports.negotiate import negotiate_body

from ._notices import PERMISSIONS_CHANGED_PATH, permission_notice
from ._request import JSON, Refusal, Request, Response, refusal_response

__all__ = [
    "EVENTS_PREFIX",
    "HUBS",
    "HUB_PREFIX",
    "PUBLISHER_HUB",
    "HubGrant",
    "HubRoute",
    "Session",
    "Upgrade",
    "authenticate",
    "go_live",
    "log_opened",
    "respond",
    "respond_internal",
]

log = logging.getLogger("hubserver.http")

HUB_PREFIX: Final = "/v1/hub/"
EVENTS_PREFIX: Final = "/v1/events/"
#: Bodies of requests that take none (health, negotiate) are read and dropped up to this.
MAX_IGNORED_BODY_BYTES: Final = 64 * 1024
#: How long one connection reuses a token it verified before asking the
#: verifier again (whose shared cache keeps successes as long: a key removed
#: from the JWKS stops working within that time on keep-alive connections too).
TOKEN_MEMO_MAX_AGE: Final = 60.0


class Session(Protocol):
    """A hub connection after its upgrade: what the server runs and counts."""

    @property
    def session_id(self) -> int: ...

    @property
    def subject(self) -> str: ...

    @property
    def has_subject_count(self) -> bool:
        """It holds one of its subject's hub-connection counts (``App.hub_opened``),
        which its end releases; a reattached transport holds none (its connection does)."""
        ...

    def discard(self) -> None:
        """The 101 never went out: end a registered session that will not run."""
        ...

    async def run(self) -> None: ...


#: Makes (and registers) a hub's session on its transport (and whether it may
#: use stateful reconnect); called just before the head (101, or an event
#: stream's 200) is written, or at a first long poll.
StartSession = Callable[[Transport, bool], HubSession]
#: Makes the transport of a connection that switches: from its stream and the
#: bytes that came after the request.
MakeTransport = Callable[[trio.SocketStream, bytes], Transport]


class HubGrant(NamedTuple):
    """What a hub's check allows a request to open."""

    #: What the connection opens: a negotiated connection id is bound to it.
    stream: str
    #: For the log line of the new session (no ids a client chose beyond what it needs).
    description: str
    start: StartSession
    #: The group the connection receives (for the log's context); None for a publisher.
    key: GroupKey | None = None


class HubRoute(NamedTuple):
    """One hub: the scope its tokens need, and its own checks."""

    scope: str
    #: After the token and its scope: the hub's parameters and rights.
    authorize: Callable[[Request, Claims], Awaitable[HubGrant | Refusal]]


class Upgrade(NamedTuple):
    """Switch this connection to a hub session: a WebSocket (the head is its 101)
    or an event stream (the head is its 200); the protocol writes the head.

    The subject was counted with ``App.hub_opened`` (unless ``attach``: a
    transport of a connection that holds the count); whoever fails to start
    the session releases it with ``App.hub_closed``.
    """

    head: bytes
    transport: MakeTransport
    subject: str
    grant: HubGrant
    #: The negotiated token the connection will be live under, if any.
    token: str | None = None
    #: The negotiation granted stateful reconnect.
    is_stateful: bool = False
    #: Instead of a new session: a live one takes this transport over (spec §8).
    attach: Callable[[Transport], Session] | None = None


# -- the token -------------------------------------------------------------------------


_MISSING_TOKEN: Final = Refusal(401, "unauthorized", "missing access token")
_SWITCHING: Final = (
    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
    b"sec-websocket-accept: %s\r\nserver: hubserver\r\n\r\n"
)


async def authenticate(request: Request, scope: str) -> Claims | Refusal:
    """The claims of the request's token, which must carry ``scope``; or why not.

    The connection remembers the last token it verified for a scope
    (``TokenMemo``): the same token again skips the verifier, but never its
    expiry: ``exp`` plus the configured leeway is checked on every request.
    """
    token = extract_token(request.headers, request.query)
    if token is None:
        return _MISSING_TOKEN
    io = request.io
    app = io.app
    memo = io.tokens
    now = time.time()
    claims = memo.claims
    if (
        claims is not None
        and token == memo.token
        and scope == memo.scope
        and trio.current_time() - memo.verified_at < TOKEN_MEMO_MAX_AGE
        and (claims.expires_at is None or now < claims.expires_at + app.config.token_leeway)
    ):
        return claims
    memo.claims = None
    try:
        claims = await app.verifier.verify(token, now)
    except AuthError as exc:
        if exc.status == 401:
            return Refusal(401, "unauthorized", str(exc), text=f"unauthorized: {exc}")
        return Refusal(exc.status, "error", str(exc))
    if not claims.has_scope(scope):
        message = f"the token lacks the '{scope}' scope"
        return Refusal(403, "forbidden", message, text=f"forbidden: {message}")
    memo.token, memo.scope, memo.claims = token, scope, claims
    memo.verified_at = trio.current_time()
    return claims


# -- dispatch --------------------------------------------------------------------------


_NOT_FOUND: Final = Refusal(404, "not_found", "not found")
_METHOD_NOT_ALLOWED: Final = Refusal(405, "method_not_allowed", "method not allowed")
_USE_POST: Final = Refusal(405, "method_not_allowed", "use POST")
_BODY_TOO_LARGE: Final = Refusal(413, "too_large", "request body too large")


def _text(refusal: Refusal) -> Response:
    return refusal_response(refusal, is_json=False)


def _json(refusal: Refusal) -> Response:
    return refusal_response(refusal, is_json=True)


async def respond(request: Request) -> Response | Upgrade:
    """Answer one request (its body, if any, is read by the handler that wants it)."""
    path = request.path
    if path.startswith(EVENTS_PREFIX):
        hub = _EVENT_HUBS.get(path[len(EVENTS_PREFIX) :].rstrip("/"))
        if hub is None:
            return _json(_NOT_FOUND)
        app = request.io.app
        metrics = app.metrics
        if metrics is None:  # --metrics off: not even the clock is read for it
            response = await _publish(request, hub)
        else:
            started = trio.current_time()
            response = await _publish(request, hub)
            metrics.observe_http_publish(trio.current_time() - started)
        if response.status != 202:
            app.stats.count(app.stats.rejected, hub.value, "http", request.events or 1)
        return response
    if path.startswith(HUB_PREFIX):
        name = path[len(HUB_PREFIX) :].rstrip("/")
        answer = await _hub(request, name)
        if isinstance(answer, Response) and answer.status >= 400:
            metrics = request.io.app.metrics
            if metrics is not None:
                metrics.refused(name.removesuffix("/negotiate"), answer.status)
        return answer
    if path == PERMISSIONS_CHANGED_PATH:
        return await _permissions_changed(request)
    if path == "/metrics":
        app = request.io.app
        if app.metrics is not None and app.config.metrics_port is None:
            return await _metrics(request)
        return _text(_NOT_FOUND)  # off, or on the metrics listener only
    if path in _HEALTH:
        return await _health(request)
    return _text(_NOT_FOUND)


async def respond_internal(request: Request) -> Response | Upgrade:
    """Answer one request on the metrics listener (``--metrics-port``).

    ``/metrics``, and the probes (so that they can use the internal port
    too); every other path is 404, whatever its method or token: nothing of
    the service is reachable here.
    """
    path = request.path
    if path == "/metrics":
        return await _metrics(request)
    if path in _HEALTH:
        return await _health(request)
    return _text(_NOT_FOUND)


_HEALTH: Final = frozenset({"/healthz", "/readyz"})


async def _metrics(request: Request) -> Response:
    metrics = request.io.app.metrics
    assert metrics is not None  # the routes check it
    if request.method not in (b"GET", b"HEAD"):
        return _text(_METHOD_NOT_ALLOWED)
    if not await request.io.discard_body(MAX_IGNORED_BODY_BYTES):
        return _text(Refusal(413, "too_large", "request body too large"))
    return Response(200, metrics.exposition(request.io.app), METRICS_CONTENT_TYPE)


async def _health(request: Request) -> Response:
    if request.path == "/healthz":
        return await _simple(request, 200, "ok")
    app = request.io.app
    ready = app.is_ready and not app.is_draining and app.broker.backplane.is_available
    ready = ready and app.store.is_available
    return await _simple(request, 200 if ready else 503, "ready" if ready else "not ready")


async def _simple(request: Request, status: int, text: str) -> Response:
    if request.method not in (b"GET", b"HEAD"):
        return _text(_METHOD_NOT_ALLOWED)
    if not await request.io.discard_body(MAX_IGNORED_BODY_BYTES):
        return _text(_BODY_TOO_LARGE)
    return Response(status, (text + "\n").encode())


# -- the publish API -------------------------------------------------------------------


_EVENT_HUBS: Final = {hub.value: hub for hub in Hub}
_DRAINING: Final = Refusal(
    503,
    "unavailable",
    "server is shutting down; nothing was accepted, retry with the same ids",
    extra={"outcome": "not_accepted"},
)
_BACKPLANE_UNAVAILABLE: Final = Refusal(
    503,
    "unavailable",
    "the event backplane is unavailable; nothing was accepted, retry later",
    extra={"outcome": "not_accepted"},
)
_BACKPLANE_FAILED: Final = Refusal(
    503,
    "unavailable",
    "the event backplane failed; the events may or may not have been accepted: "
    "retry later with the same ids",
    extra={"outcome": "unknown"},
)
#: json.dumps's own string encoder (ensure_ascii), without its per-call setup.
_encode_string: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii


async def _publish(request: Request, hub: Hub) -> Response:
    if request.method != b"POST":
        return _json(_USE_POST)
    claims = await authenticate(request, PUBLISH_SCOPE)
    if isinstance(claims, Refusal):
        return _json(claims)
    app = request.io.app
    if app.is_draining:
        return _json(_DRAINING)
    limit = app.config.max_publish_bytes
    too_large = Refusal(413, "too_large", f"the body is larger than {limit} bytes")
    for name, value in request.headers:
        if name == b"content-length" and int(value) > limit:
            return _json(too_large)
    # The request deadline bounds this read (408 from the protocol).
    body = await request.io.read_body(limit)
    if body is None:
        return _json(too_large)
    try:
        events = parse_publish_body(body)
        request.events = len(events)
        request.is_committed = True  # a publish that reached the backplane may have been applied
        published = await app.broker.publish(hub, events)
    except BackplaneUnavailable as exc:
        log.warning(
            "publish refused, backplane unavailable: %s",
            exc,
            extra={"event": "publish_refused", "hub": hub.value, "reason": "backplane_unavailable"},
        )
        return _json(_BACKPLANE_UNAVAILABLE)
    except BackplaneError as exc:
        # Redis refused or failed mid-way (OOM, READONLY, NOPERM, a malformed
        # reply...): the events may or may not be stored. Retrying with the same
        # ids is safe (the publish API is idempotent on id).
        log.warning(
            "publish failed, outcome unknown: %s",
            exc,
            extra={"event": "publish_failed", "hub": hub.value, "reason": "backplane_error"},
        )
        return _json(_BACKPLANE_FAILED)
    except PublishError as exc:
        log.info(
            "publish refused: %s",
            exc,
            extra={"event": "publish_refused", "hub": hub.value, "reason": "invalid"},
        )
        code = "invalid_event" if exc.index is not None else "invalid_body"
        extra = None if exc.index is None else {"index": exc.index}
        return _json(Refusal(exc.status, code, str(exc), extra=extra))
    # {"accepted":n,"ids":[...],"seqs":[...]}, as json.dumps would write it.
    ids = ",".join([_encode_string(event.event_id) for event in published])
    seqs = ",".join([str(event.seq) for event in published])
    text = f'{{"accepted":{len(published)},"ids":[{ids}],"seqs":[{seqs}]}}'
    app.stats.count(app.stats.published, hub.value, "http", len(published))
    return Response(202, text.encode(), JSON)


async def _permissions_changed(request: Request) -> Response:
    """The access-control backend's change notice (``_notices``), once its token passed."""
    if request.method != b"POST":
        return _json(_USE_POST)
    claims = await authenticate(request, ADMIN_SCOPE)
    if isinstance(claims, Refusal):
        return _json(claims)
    return await permission_notice(request)


# -- the hubs --------------------------------------------------------------------------


async def _hub(request: Request, name: str) -> Response | Upgrade:
    """Negotiate, or upgrade to a hub session (returned, not yet running)."""
    is_negotiate = name.endswith("/negotiate")
    route = HUBS.get(name.removesuffix("/negotiate"))
    if route is None:
        return _text(_NOT_FOUND)
    token = request.query.get("id")
    # A drain refuses new connections; a live one's polls and POSTs go on until
    # its Close reached the client (a long-polling client hears of it by polling).
    # A request with an id is refused where it would start one, once its token
    # was read: before, whether its id is live must not show.
    if request.io.app.is_draining and (is_negotiate or token is None):
        return _text(_SHUTTING_DOWN)
    if is_negotiate:
        return await _negotiate(request, route)
    method = request.method
    if method == b"POST" or method == b"DELETE":
        return await _from_client(request, route, token)
    if token is not None and not _asks_upgrade(request):
        if _accepts(request, b"text/event-stream"):
            return await _event_stream(request, route, token)
        return await _poll(request, route, token)
    return await _upgrade(request, route)


def _asks_upgrade(request: Request) -> bool:
    return any(name == b"upgrade" for name, _ in request.headers)


def _accepts(request: Request, media_type: bytes) -> bool:
    return any(name == b"accept" and media_type in value.lower() for name, value in request.headers)


_SHUTTING_DOWN: Final = Refusal(503, "unavailable", "server is shutting down")
_SUBJECT_LIMIT: Final = Refusal(
    429,
    "too_many_connections",
    "too many open hub connections for this subject; retry later",
    is_limit=True,
)
_NEEDS_ID: Final = Refusal(400, "bad_request", "Connection ID required")
_NO_CONNECTION: Final = Refusal(404, "not_found", "No Connection with that ID")
_NO_POST_ON_WEBSOCKETS: Final = Refusal(
    405, "method_not_allowed", "POST requests are not allowed for WebSocket connections."
)
_NO_DELETE: Final = Refusal(
    400, "bad_request", "Cannot terminate this connection using the DELETE endpoint."
)
_OTHER_TRANSPORT: Final = Refusal(400, "bad_request", "Cannot change transports mid-connection")
_TRANSPORT_TAKEN: Final = Refusal(
    409, "conflict", "Another transport is already attached to this connection"
)
#: Spec §7.3: a poll's answer is never cached.
_POLL_HEADERS: Final = (
    (b"pragma", b"no-cache"),
    (b"expires", b"Thu, 01 Jan 1970 00:00:00 GMT"),
)
_OCTETS: Final = b"application/octet-stream"


def _own(app: App, token: str, subject: str, route: HubRoute) -> HubSession | None:
    """The live connection ``token`` names, if it is ``subject``'s on this hub; else None.

    Anyone else's connection is as unknown as none: a request learns nothing of
    it, not even its transport (so the token is checked before this). Another
    hub's too: the token was checked for this hub's scope, not that one's (a
    listener's token must not drive its subject's publisher connection).
    """
    negotiations = app.negotiations
    live = negotiations.find(token)
    if not isinstance(live, HubSession) or live.subject != subject:
        return None
    stream = negotiations.stream_of(token) or ""
    return live if HUBS.get(stream.partition("\x00")[0]) is route else None


async def _live(
    request: Request, route: HubRoute, token: str | None
) -> HubSession | Refusal:
    """The live connection ``token`` names, for a request of its own subject."""
    if token is None:
        return _NEEDS_ID
    claims = await authenticate(request, route.scope)
    if isinstance(claims, Refusal):
        return claims
    live = _own(request.io.app, token, claims.subject, route)
    return _NO_CONNECTION if live is None else live


def _transport_taken(live: HubSession, kind: TransportKind) -> Refusal:
    """Spec §7.4's answer to a request for ``kind`` on a live connection (its subject's)."""
    return _TRANSPORT_TAKEN if live.kind is kind else _OTHER_TRANSPORT


async def _from_client(request: Request, route: HubRoute, token: str | None) -> Response:
    """POST: the client's data for its SSE or long-polling connection; DELETE: its end."""
    session = await _live(request, route, token)
    if isinstance(session, Refusal):
        return _text(session)
    if request.method == b"DELETE":
        transport = session.transport
        if not isinstance(transport, PollTransport):
            return _text(_NO_DELETE)
        transport.delete()
        return Response(202, b"")
    if session.kind is TransportKind.WEBSOCKETS:
        return _text(_NO_POST_ON_WEBSOCKETS)
    app = request.io.app
    # A POST carries whole hub messages: at most one message's limit (the
    # publisher hub's is a publish body's), with room for a few small ones.
    limits = app.session_context().publisher_limits if session.key is None else None
    max_bytes = (limits or app.session_context().limits).max_message_bytes + 4096
    body = await request.io.read_body(max_bytes)
    if body is None:
        return _text(_BODY_TOO_LARGE)
    if not await session.post(bytes(body)):
        return _text(_NO_CONNECTION)  # it ended meanwhile
    return Response(200, b"")


def _admit_session(app: App, ip: str) -> Refusal | None:
    """Count a session that holds no socket (long polling) as a connection from ``ip``.

    Over a limit it is refused as a socket over it is (503 or 429, the same
    JSON), and counted as refused.
    """
    gate = app.connections
    over = None if gate is None else gate.admit(ip)
    if over is None:
        return None
    assert gate is not None
    gate.note_refusal(trio.current_time())
    return Refusal(over.status, over.code, over.message, is_limit=True)


def _release_session(app: App, ip: str) -> None:
    """A session counted by ``_admit_session`` ended (or never started)."""
    if app.connections is not None:
        app.connections.release(ip)


async def _start(
    request: Request, route: HubRoute, token: str, claims: Claims, *, holds_socket: bool
) -> HubGrant | Refusal:
    """The first request of an SSE or long-polling connection: it claims its token.

    ``holds_socket``: the request's TCP connection becomes the connection's
    output (an event stream), already counted against the connection limits.
    A long-polling connection holds none between polls: it is counted itself,
    under this request's address, until it ends (``_run_detached``).
    """
    app = request.io.app
    if app.is_draining:
        return _SHUTTING_DOWN
    grant = await route.authorize(request, claims)
    if isinstance(grant, Refusal):
        return grant
    # Before the id is claimed: a refused client can retry with it.
    if not app.hub_opened(claims.subject):
        return _SUBJECT_LIMIT
    ip = request.io.peer_ip
    if not holds_socket and (over := _admit_session(app, ip)) is not None:
        app.hub_closed(claims.subject)
        return over
    if app.negotiations.claim(token, grant.stream, claims.subject, trio.current_time()) is None:
        # No session will end to release what was counted for it.
        app.hub_closed(claims.subject)
        if not holds_socket:
            _release_session(app, ip)
        return _NO_CONNECTION
    return grant


async def _event_stream(request: Request, route: HubRoute, token: str) -> Response | Upgrade:
    """GET with ``Accept: text/event-stream``: this connection becomes the event stream."""
    if request.is_head:
        return _text(Refusal(405, "method_not_allowed", "an event stream is opened with GET"))
    claims = await authenticate(request, route.scope)
    if isinstance(claims, Refusal):
        return _text(claims)
    live = _own(request.io.app, token, claims.subject, route)
    if live is not None:
        return _text(_transport_taken(live, TransportKind.SERVER_SENT_EVENTS))
    grant = await _start(request, route, token, claims, holds_socket=True)
    if isinstance(grant, Refusal):
        return _text(grant)
    return Upgrade(SSE_HEAD, _sse_transport, claims.subject, grant, token)


def _sse_transport(stream: trio.SocketStream, received: bytes) -> Transport:
    return SseTransport(stream)


async def _poll(request: Request, route: HubRoute, token: str) -> Response:
    """A long poll: the first one starts the connection and answers at once (spec §7.3)."""
    if request.is_head:
        # Its answer has no body: a poll would take what is queued and drop it.
        return _text(Refusal(405, "method_not_allowed", "a long poll is a GET"))
    claims = await authenticate(request, route.scope)
    if isinstance(claims, Refusal):
        return _text(claims)
    app = request.io.app
    live = _own(app, token, claims.subject, route)
    if live is None:
        return await _first_poll(request, route, token, claims)
    transport = live.transport
    if not isinstance(transport, PollTransport):
        return _text(_transport_taken(live, TransportKind.LONG_POLLING))
    request.io.extend_deadline(transport.poll_timeout)
    gate, ip = app.connections, request.io.peer_ip
    # While it waits, this poll's TCP connection is its session's one count.
    if gate is not None:
        gate.lend(ip)
    try:
        data = await transport.poll()
    finally:
        if gate is not None:
            gate.reclaim(ip)
    if data is None:
        return Response(204, b"", _OCTETS, _POLL_HEADERS)
    return Response(200, data, _OCTETS, _POLL_HEADERS)


async def _first_poll(request: Request, route: HubRoute, token: str, claims: Claims) -> Response:
    grant = await _start(request, route, token, claims, holds_socket=False)
    if isinstance(grant, Refusal):
        return _text(grant)
    app = request.io.app
    ip = request.io.peer_ip
    try:
        session = grant.start(PollTransport(), False)
    except BaseException:
        app.hub_closed(claims.subject)
        _release_session(app, ip)
        raise
    go_live(app, token, session, grant.stream)
    log_opened(session.session_id, grant, claims.subject, TransportKind.LONG_POLLING)
    app.session_context().tasks.start_soon(_run_detached, app, session, ip)
    return Response(200, b"", _OCTETS, _POLL_HEADERS)


def log_opened(
    session_id: int,
    grant: HubGrant,
    subject: str,
    kind: TransportKind,
    *,
    event: str = "session_opened",
) -> None:
    """The line that says a connection opened (``event``: or took a new transport)."""
    how = ", long polling" if kind is TransportKind.LONG_POLLING else ""
    log.info(
        "session %d: %s, subject %s%s",
        session_id,
        grant.description,
        subject[:64],
        how,
        extra=connection_fields(session_id, subject, grant.key, kind, event=event),
    )


def go_live(app: App, token: str, session: HubSession, stream: str) -> None:
    """``token`` names ``session`` (of ``stream``) until it ends."""
    app.negotiations.attach(token, session, stream)
    session.on_end = partial(app.negotiations.forget, token)


async def _run_detached(app: App, session: HubSession, ip: str) -> None:
    """A long-polling session runs in the server's connection nursery (no request holds it)."""
    try:
        await session.run()
    except Exception:
        app.stats.crashed += 1
        log.exception(
            "connection handler failed (session %d)",
            session.session_id,
            extra=session_fields(session, "session_failed", reason="error"),
        )
    finally:
        # What _start counted for it.
        app.hub_closed(session.subject)
        _release_session(app, ip)


async def _authorize(request: Request, route: HubRoute) -> tuple[Claims, HubGrant] | Refusal:
    """Token, scope, then the hub's own checks, in the order the reference checks them."""
    claims = await authenticate(request, route.scope)
    if isinstance(claims, Refusal):
        return claims
    grant = await route.authorize(request, claims)
    if isinstance(grant, Refusal):
        return grant
    return claims, grant


async def _negotiate(request: Request, route: HubRoute) -> Response:
    if request.method != b"POST":
        return _text(Refusal(405, "method_not_allowed", "negotiate takes POST"))
    authorized = await _authorize(request, route)
    if isinstance(authorized, Refusal):
        return _text(authorized)
    claims, grant = authorized
    if not await request.io.discard_body(MAX_IGNORED_BODY_BYTES):
        return _text(_BODY_TOO_LARGE)
    # Spec §6: missing negotiateVersion is 0; we answer min(requested, 1).
    requested = request.query.get("negotiateversion", "0")
    # ASCII digits only: str.isdigit() also takes '²' and other digits int() refuses.
    if not requested.isascii() or not requested.isdigit():
        body = {"error": "The client requested a non-integer protocol version."}
        return Response(200, json.dumps(body, separators=(",", ":")).encode(), JSON)
    # min(int(requested), 1) without int(): a long run of digits is no error either.
    version = 0 if not requested.strip("0") else 1
    app = request.io.app
    # Spec §8: only when the client asks (one that did not fails on it), and
    # only WebSockets use it (a client on another transport ignores it).
    # With --workers, each new TCP connection goes to any worker: a POST, a poll
    # or a reconnecting WebSocket would seldom find its connection. One socket
    # both ways (WebSockets) is what works there.
    websockets_only = app.config.reuse_port
    is_stateful = (
        request.query.get("usestatefulreconnect", "").lower() == "true"
        and app.session_context().stateful_reconnect_window > 0
        and not websockets_only
    )
    connection_id, token = app.negotiations.create(
        grant.stream, claims.subject, trio.current_time(), is_stateful=is_stateful
    )
    if version == 0:
        connection_id = token  # version 0 clients send the connectionId as `id`
    answer = negotiate_body(
        connection_id, token, version, is_stateful=is_stateful, websockets_only=websockets_only
    )
    return Response(200, answer, JSON)


async def _upgrade(request: Request, route: HubRoute) -> Response | Upgrade:
    # HEAD gets GET's checks and answers; only the upgrade itself needs GET.
    is_head = request.is_head
    try:
        key = check_upgrade(b"GET" if is_head else request.method, request.headers)
    except UpgradeError as exc:
        return _text(Refusal(exc.status, "bad_request", str(exc)))
    for header, value in request.headers:
        # A body would be read as the WebSocket's first frames (RFC 6455 §4.1:
        # the opening handshake is a GET without one).
        if (header == b"content-length" and value != b"0") or header == b"transfer-encoding":
            return _text(Refusal(400, "bad_request", "a WebSocket upgrade request has no body"))
    authorized = await _authorize(request, route)
    if isinstance(authorized, Refusal):
        return _text(authorized)
    claims, grant = authorized
    if is_head:
        return _text(Refusal(405, "method_not_allowed", "WebSocket upgrades use GET"))
    app = request.io.app
    head = _SWITCHING % websocket_accept(key)
    connection_token = request.query.get("id")
    negotiations = app.negotiations
    live = None if connection_token is None else _own(app, connection_token, claims.subject, route)
    if live is not None and connection_token is not None:
        if live.accepts_reattach and negotiations.stream_of(connection_token) == grant.stream:
            # Stateful reconnect: the client's new WebSocket takes the connection over.
            # It is that connection, whose count of its subject's hub connections
            # it shares; its token (the same subject's, maybe a refreshed one) rules
            # from now on.
            attach = partial(_reattach, live, _token_expires_at(app, claims))
            return Upgrade(head, WebSocketTransport, claims.subject, grant, attach=attach)
        return _text(_transport_taken(live, TransportKind.WEBSOCKETS))
    if app.is_draining:
        return _text(_SHUTTING_DOWN)  # an id (without one, _hub refused it)
    # Before the negotiation's id is claimed: a refused client can retry with it.
    if not app.hub_opened(claims.subject):
        return _text(_SUBJECT_LIMIT)
    if connection_token is None:
        return Upgrade(head, WebSocketTransport, claims.subject, grant)
    now = trio.current_time()
    claimed = negotiations.claim(connection_token, grant.stream, claims.subject, now)
    if claimed is None:
        if app.config.reuse_port:
            # --workers: the negotiate may have reached another worker. The id binds
            # nothing here (no other transport, no stateful reconnect): the request
            # is authorized on its own, as one that skipped negotiation.
            return Upgrade(head, WebSocketTransport, claims.subject, grant)
        app.hub_closed(claims.subject)  # no session will end to release it
        return _text(_NO_CONNECTION)
    return Upgrade(
        head,
        WebSocketTransport,
        claims.subject,
        grant,
        connection_token,
        is_stateful=claimed.is_stateful,
    )


class _Attachment:
    """A reconnecting client's new WebSocket, as its request's task runs it.

    The connection takes it over once its 101 went out (what it sends first,
    its Sequence and replay, must follow the 101); the connection's own task
    reads it, and this one waits until it is gone. It is no connection of its
    own: the subject's count is the connection's.
    """

    has_subject_count: Final = False

    def __init__(
        self, session: HubSession, token_expires_at: float | None, transport: Transport
    ) -> None:
        self._session = session
        self._token_expires_at = token_expires_at
        self._transport = transport

    @property
    def session_id(self) -> int:
        return self._session.session_id

    @property
    def subject(self) -> str:
        return self._session.subject

    def discard(self) -> None:
        self._transport.close()  # its 101 never went out: the connection never saw it

    async def run(self) -> None:
        gone = self._session.attach(self._transport, token_expires_at=self._token_expires_at)
        if gone is None:
            self._transport.close()  # the connection ended meanwhile: the client starts over
            return
        await gone.wait()


def _reattach(session: HubSession, token_expires_at: float | None, transport: Transport) -> Session:
    return _Attachment(session, token_expires_at, transport)


def _token_expires_at(app: App, claims: Claims) -> float | None:
    """When a connection opened with this token ends (unix seconds), if ever.

    The token stays valid for the verifier's leeway past exp; so does the connection.
    """
    if claims.expires_at is None:
        return None
    return claims.expires_at + app.config.token_leeway


# -- the subscriber hubs: a site's stream, or one user's at a site -----------------------


def _since_seq(query: Mapping[str, str]) -> int | Refusal | None:
    """The ``since_seq`` resume point: the last seq the client received."""
    value = query.get("since_seq")
    if value is None:
        return None
    # The length check first: int() of a long digit string costs quadratic time.
    if not (value.isascii() and value.isdigit() and len(value) <= 16) or (
        int(value) > MAX_RESUME_SEQ
    ):
        return Refusal(
            400, "bad_request", f"'since_seq' must be an integer from 0 to {MAX_RESUME_SEQ}"
        )
    return int(value)


async def _site_stream(hub: Hub, request: Request, claims: Claims) -> HubGrant | Refusal:
    """site_id, user_id, the site role, since_seq: a subscriber of one stream."""
    query = request.query
    site_id = query.get("site_id", "")
    if not site_id:
        return Refusal(400, "bad_request", "the 'site_id' query parameter is required")
    user_id = query.get("user_id")
    if user_id is not None and not user_id:
        return Refusal(400, "bad_request", "the 'user_id' query parameter must not be empty")
    # As on the publish API; checked before the role lookup, whose cache keeps every pair.
    if len(site_id) > MAX_ID_CHARS or (user_id is not None and len(user_id) > MAX_ID_CHARS):
        return Refusal(
            400, "bad_request", f"'site_id' and 'user_id' are at most {MAX_ID_CHARS} characters"
        )
    group = GroupKey(hub, site_id, user_id)
    app = request.io.app
    try:
        is_allowed = await app.may_open(group, claims.subject)
    except PermissionStoreUnavailable:
        return Refusal(503, "unavailable", "permission store unavailable")  # the watcher logs it
    if not is_allowed:
        # The same answer for an unknown site and a site without rights: no enumeration.
        return Refusal(403, "forbidden", "forbidden: no access to this stream")
    since_seq = _since_seq(query)
    if isinstance(since_seq, Refusal):
        return since_seq

    start = _session_starter(app, claims, group, since_seq)

    stream_name = f"{hub.value}\x00{site_id}\x00{user_id or ''}"
    scope = "site stream" if user_id is None else "site stream of one user"
    return HubGrant(stream_name, f"{hub.value} hub, {scope}", start, group)


def _session_starter(
    app: App, claims: Claims, key: GroupKey | None, since_seq: int | None
) -> StartSession:
    """What makes the connection's session once its head is about to go out.

    ``key`` None: a publisher's connection.
    """

    def start(transport: Transport, is_stateful: bool) -> HubSession:
        session = HubSession(
            transport=transport,
            allow_stateful=is_stateful,
            ctx=app.session_context(),
            key=key,
            subject=claims.subject,
            token_expires_at=_token_expires_at(app, claims),
            session_id=app.next_id(),
            since_seq=since_seq,
        )
        # Registered before the 101 goes out: a revoke or a drain during the
        # write reaches this connection (it acts once its task runs).
        session.register()
        return session

    return start


# -- the publisher hub: Publish(hub, events) over a persistent connection ---------------


#: ``/v1/hub/publish``, and the stream a negotiated publisher connection is bound to.
PUBLISHER_HUB: Final = "publish"


async def _publisher(request: Request, claims: Claims) -> HubGrant:
    """A publisher's connection: the scope was all it needed; it joins no group."""
    start = _session_starter(request.io.app, claims, None, None)
    return HubGrant(PUBLISHER_HUB, "publisher hub", start)


#: The hubs under ``/v1/hub/``: name -> the scope its tokens need and its own checks.
HUBS: Final[Mapping[str, HubRoute]] = {
    Hub.ENTRIES.value: HubRoute(HUB_SCOPE, partial(_site_stream, Hub.ENTRIES)),
    Hub.INCIDENTS.value: HubRoute(HUB_SCOPE, partial(_site_stream, Hub.INCIDENTS)),
    PUBLISHER_HUB: HubRoute(PUBLISH_SCOPE, _publisher),
}
