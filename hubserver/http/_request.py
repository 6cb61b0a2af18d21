"""The values the front's handlers take and return: a request, a response, a refusal.

A handler gets a ``Request`` (method, target, path, query, headers, and its
body through the connection that read it) and returns a ``Response`` (status,
body, content type, extra headers) or an upgrade (see ``_routes``). A check
that says no returns a ``Refusal``, which the route family renders: text for
hub routes and anything else, JSON ``{"code", "message"}`` for the publish API.

Responses are written from byte templates: a status line and the fixed
headers per (status, content type), made once at import, then
``content-length``, the extra headers and the body.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol
from urllib.parse import parse_qsl, urlsplit

from hubserver.auth import Claims

if TYPE_CHECKING:
    from hubserver.app import App

__all__ = [
    "JSON",
    "TEXT",
    "Refusal",
    "Request",
    "RequestIO",
    "Response",
    "TokenMemo",
    "continue_bytes",
    "is_json_family",
    "parse_target",
    "refusal_response",
    "response_bytes",
    "text_response",
]

TEXT: Final = b"text/plain; charset=utf-8"
JSON: Final = b"application/json"
EVENTS_PREFIX: Final = "/v1/events/"
_EVENTS_TARGET: Final = EVENTS_PREFIX.encode()
_PERMISSIONS_TARGET: Final = b"/v1/permissions/"
_SERVER: Final = b"server: hubserver\r\n"


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _template(status: int, content_type: bytes) -> bytes:
    return (
        b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))
        + _SERVER
        + b"content-type: "
        + content_type
        + b"\r\ncache-control: no-store\r\ncontent-length: "
    )


#: Every response's first bytes, up to its content-length value.
_TEMPLATES: Final = {
    (status.value, content_type): _template(status.value, content_type)
    for status in HTTPStatus
    if status.value >= 200
    for content_type in (TEXT, JSON)
}
_CLOSE: Final = b"\r\nconnection: close"
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n" + _SERVER + b"\r\n"
_NO_CONTENT: Final = b"HTTP/1.1 204 No Content\r\n" + _SERVER

#: Extra headers by status, whatever the route (RFC 9110 §11.6.1, §10.2.3;
#: RFC 6455 §4.2.2 names the versions we understand).
_STATUS_HEADERS: Final[Mapping[int, tuple[tuple[bytes, bytes], ...]]] = {
    401: ((b"www-authenticate", b'Bearer error="invalid_token"'),),
    426: ((b"sec-websocket-version", b"13"),),
    429: ((b"retry-after", b"1"),),
    503: ((b"retry-after", b"1"),),
}


class Response(NamedTuple):
    """A whole response with a fixed-length body.

    ``close`` ends the connection after it (the protocol adds
    ``connection: close`` and closes on its own too when the request asked
    for it or left its body unread).
    """

    status: int
    body: bytes
    content_type: bytes = TEXT
    headers: Sequence[tuple[bytes, bytes]] = ()
    close: bool = False


def response_bytes(response: Response, *, is_head: bool, close: bool) -> bytes:
    """The bytes of ``response``; for HEAD, GET's headers without the body (RFC 9110 §9.3.2)."""
    status, body, content_type, headers, _ = response
    if status == 204:
        return _no_content_bytes(headers, close=close)
    template = _TEMPLATES.get((status, content_type))
    if template is None:
        template = _template(status, content_type)
    if not headers and not close and not is_head:
        return b"%b%d\r\n\r\n%b" % (template, len(body), body)  # a 202: one allocation
    data = template + str(len(body)).encode()
    for name, value in headers:
        data += b"\r\n" + name + b": " + value
    if close:
        data += _CLOSE
    data += b"\r\n\r\n"
    return data if is_head else data + body


def _no_content_bytes(headers: Sequence[tuple[bytes, bytes]], *, close: bool) -> bytes:
    # RFC 9110 §8.6: a 204 has no Content-Length (nor a type: it has no content).
    data = _NO_CONTENT
    for name, value in headers:
        data += name + b": " + value + b"\r\n"
    if close:
        data += b"connection: close\r\n"
    return data + b"\r\n"


def continue_bytes() -> bytes:
    """``100 Continue``: the client that asked may send its body now (RFC 9110 §10.1.1)."""
    return _CONTINUE


def text_response(status: int, text: str, *, close: bool = False) -> Response:
    return Response(status, (text + "\n").encode(), TEXT, _STATUS_HEADERS.get(status, ()), close)


class Refusal(NamedTuple):
    """A check's "no": the status, and what each route family says.

    Attributes:
        status: the HTTP status.
        code: the JSON family's machine-readable code.
        message: the JSON family's message (and the text family's, unless ``text``).
        text: the text family's body, when it differs from ``message``.
        extra: more JSON members (``outcome``, ``index``).
        is_limit: a limit (429): JSON with its code on every route, as the accept
            loop's refusals, since clients and operators handle limits by code.
        close: end the connection after the answer.
    """

    status: int
    code: str
    message: str
    text: str | None = None
    extra: Mapping[str, object] | None = None
    is_limit: bool = False
    close: bool = False


def refusal_response(refusal: Refusal, *, is_json: bool) -> Response:
    """Render ``refusal`` in its route family's shape."""
    status = refusal.status
    headers = _STATUS_HEADERS.get(status, ())
    if is_json or refusal.is_limit:
        payload: dict[str, object] = {"code": refusal.code, "message": refusal.message}
        if refusal.extra:
            payload.update(refusal.extra)
        body = json.dumps(payload, separators=(",", ":")).encode()
        return Response(status, body, JSON, headers, refusal.close)
    text = refusal.message if refusal.text is None else refusal.text
    return Response(status, (text + "\n").encode(), TEXT, headers, refusal.close)


def is_json_family(target: bytes) -> bool:
    """Whether refusals to ``target`` are JSON (the publish API, change notices) or text."""
    return target.startswith((_EVENTS_TARGET, _PERMISSIONS_TARGET))


_EMPTY_QUERY: Final[Mapping[str, str]] = MappingProxyType({})


def parse_target(target: bytes) -> tuple[str, Mapping[str, str]] | Refusal:
    """The path and the query parameters (names lower-cased) of a request target."""
    # The common publish target ("/v1/events/entries") has nothing to split.
    if target[:1] == b"/" and b"?" not in target and b"#" not in target:
        try:
            return target.decode("ascii"), _EMPTY_QUERY
        except UnicodeDecodeError:
            return Refusal(400, "bad_request", "malformed request target")
    try:
        text = target.decode("ascii")
        parts = urlsplit(text)
        pairs = parse_qsl(parts.query, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        return Refusal(400, "bad_request", "malformed request target")
    query: dict[str, str] = {}
    for name, value in pairs:
        name = name.lower()  # ASP.NET Core matches query names case-insensitively
        if name in query and name != "access_token":
            return Refusal(400, "bad_request", f"query parameter '{name}' given more than once")
        query[name] = value
    return parts.path, query


class TokenMemo:
    """The last token one connection presented, verified, and the scope it was checked for.

    A publisher sends the same token with every request on its keep-alive
    connection: the verifier (and its shared cache) is asked again only for
    another token, another scope, or after ``max_age``; the token's ``exp``
    (plus the leeway) is checked against the clock on every use.
    """

    __slots__ = ("claims", "scope", "token", "verified_at")

    def __init__(self) -> None:
        self.token: str | None = None
        self.scope: str | None = None
        self.claims: Claims | None = None
        self.verified_at = 0.0


class RequestIO(Protocol):
    """What a request reaches of the connection it came on."""

    @property
    def app(self) -> App: ...

    @property
    def tokens(self) -> TokenMemo: ...

    @property
    def peer_ip(self) -> str:
        """The client's address, as the connection limits count this connection."""
        ...

    async def read_body(self, max_bytes: int) -> bytes | None:
        """The whole body; None when it is larger than ``max_bytes``."""
        ...

    async def discard_body(self, max_bytes: int) -> bool:
        """Read and drop the body; False when it is larger than ``max_bytes``."""
        ...

    def extend_deadline(self, seconds: float) -> None:
        """This request may take ``seconds`` more than the request deadline (a long poll)."""
        ...


class Request:
    """One HTTP request, as a handler sees it.

    Attributes:
        method, target: as sent (bytes).
        path, query: the target split; query names lower-cased.
        headers: h11's (names lower-cased).
        is_committed: set by a handler once the request's effect may have
            happened (a publish handed to the backplane): an answer to a
            missed deadline then says the outcome is unknown.
        io: the body, and the connection's shared parts.
        cors_headers: the CORS headers every answer to this request carries
            (``_cors``). The front adds them to a returned ``Response``; a
            handler that writes its own head (a stream) must write them too.
        events: a publish's event count once its body parsed (0 before), for /metrics.
    """

    __slots__ = (
        "cors_headers",
        "events",
        "headers",
        "io",
        "is_committed",
        "method",
        "path",
        "query",
        "target",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        path: str,
        query: Mapping[str, str],
        headers: Sequence[tuple[bytes, bytes]],
        io: RequestIO,
        cors_headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        self.method = method
        self.target = target
        self.path = path
        self.query = query
        self.headers = headers
        self.io = io
        self.is_committed = False
        self.cors_headers = cors_headers
        self.events = 0

    @property
    def is_head(self) -> bool:
        return self.method == b"HEAD"
