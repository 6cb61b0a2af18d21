"""CORS for browsers (``--cors-origin``): preflights, answers' headers, Origin on upgrades.

A page served from another origin than the server (``https://app.example``
calling ``https://events.example``) may read an answer only when the answer
names its origin (Fetch standard §3.2), and must ask first ("preflight",
``OPTIONS`` with ``Access-Control-Request-Method``) before any request that is
not "simple": the SignalR JavaScript client's negotiate and its POSTs carry
``Authorization``, ``X-Requested-With`` and ``X-SignalR-User-Agent``, so every
one is preflighted. This module decides, from the allow-list and the request's
head alone, what the front adds to an answer or answers itself. It follows
ASP.NET Core's CORS middleware (``src/Middleware/CORS``: ``CorsService``,
``CorsMiddleware``), one policy for every route below:

- a request without ``Origin`` is no CORS request: servers, Node's SignalR
  client and curl get today's answers, byte for byte;
- CORS applies to the hub routes (``/v1/hub/...``: negotiate, the hubs
  themselves, whatever method a transport uses on them: the rule is by path
  prefix) and the publish API (``/v1/events/...``); health checks stay out;
- a preflight from a listed origin is answered here, before any route, token
  or body: 204 with the methods of the route family, the request headers the
  official client sends, ``Access-Control-Max-Age`` and
  ``Access-Control-Allow-Credentials: true`` (the JavaScript client's
  ``withCredentials`` defaults to true, and a credentialed request fails
  unless the answer names the origin and allows credentials). A preflight from
  another origin gets 403 with a JSON error and no CORS header (where ASP.NET
  Core answers 204 without CORS headers: the browser refuses both alike, and
  ours says why to whoever reads the network log);
- any other answer to a listed origin, refusals included (401, 403, 404, 429,
  503), carries ``Access-Control-Allow-Origin`` (and the credentials header):
  the page can read why it was refused instead of a bare "CORS error";
- WebSockets are not subject to CORS: a browser opens one to any origin and
  sends ``Origin`` (RFC 6455 §10.2: "servers that are not intended to process
  input from any web page but only for certain sites SHOULD verify the
  |Origin| field"). With an allow-list, an upgrade whose ``Origin`` is not on
  it is refused with 403 before its token is looked at; an upgrade without
  ``Origin`` comes from no browser and goes on;
- ``*`` (alone) allows any origin without credentials: answers say
  ``Access-Control-Allow-Origin: *``, which browsers accept only for requests
  without credentials (``withCredentials: false`` in the JavaScript client).

Under a list of origins, ``Vary: Origin`` goes on every answer of a CORS
route, with an Origin or without (the answer depends on it), so that no cache
hands one origin's answer to another; answers are ``no-store`` anyway. Under
``*`` the answer is the same for every origin, and has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NamedTuple

from hubserver.config import ANY_ORIGIN

from ._request import Refusal, Response, refusal_response

__all__ = [
    "ALLOWED_HEADERS",
    "PREFLIGHT_MAX_AGE_SECONDS",
    "CorsDecision",
    "decide_cors",
]

Headers = tuple[tuple[bytes, bytes], ...]

#: The request headers the official JavaScript client sends (``@microsoft/signalr``:
#: ``AccessTokenHttpClient``: Authorization; ``FetchHttpClient``/``XhrHttpClient``:
#: X-Requested-With, and Content-Type with a body (text/plain, or
#: application/octet-stream for MessagePack); ``Utils.getUserAgentHeader``:
#: X-SignalR-User-Agent in browsers). Content-Type also covers the publish API's
#: application/json. A preflight is answered with this list whatever it asks:
#: the browser refuses a request that needs more.
ALLOWED_HEADERS: Final = b"authorization, content-type, x-requested-with, x-signalr-user-agent"
#: How long a browser may reuse a preflight's answer (Chromium caps it at
#: 7200 s, Firefox at 86400 s). Long is safe: removing an origin from the list
#: takes effect at once anyway, since actual answers then no longer name it.
PREFLIGHT_MAX_AGE_SECONDS: Final = 7200
_HUB_TARGET: Final = b"/v1/hub/"
_EVENTS_TARGET: Final = b"/v1/events/"
#: The hubs' methods: GET (WebSockets, SSE, long polls), POST (negotiate, the
#: SSE and long-polling sends), DELETE (ending a long-polling connection).
_HUB_METHODS: Final = b"GET, POST, DELETE"
_EVENTS_METHODS: Final = b"POST"
_MAX_AGE: Final = str(PREFLIGHT_MAX_AGE_SECONDS).encode()
_VARY: Final = (b"vary", b"Origin")
_CREDENTIALS: Final = (b"access-control-allow-credentials", b"true")
_ANY: Final = (b"access-control-allow-origin", ANY_ORIGIN.encode())


class CorsDecision(NamedTuple):
    """What CORS makes of one request.

    Attributes:
        headers: added to whatever answers the request (empty: none).
        response: the answer itself, given here (a preflight's 204, or a
            403 for a foreign origin); None: the routes answer.
        refused_origin: the Origin that was refused (for the log), or None.
    """

    headers: Headers
    response: Response | None = None
    refused_origin: str | None = None


#: Nothing to add and nothing to answer: a request CORS does not concern.
NO_CORS: Final = CorsDecision(())
_FOREIGN_PREFLIGHT: Final = refusal_response(
    Refusal(403, "forbidden", "this origin is not allowed to call this server (--cors-origin)"),
    is_json=True,
)
_FOREIGN_UPGRADE: Final = refusal_response(
    Refusal(403, "forbidden", "forbidden: this origin is not allowed (--cors-origin)"),
    is_json=False,
)


def decide_cors(
    origins: tuple[str, ...], method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]]
) -> CorsDecision:
    """Decide what CORS adds to, or answers for, one request.

    Args:
        origins: the normalized allow-list (``ServerConfig.cors_origins``); empty:
            CORS is off and nothing is ever added.
        method, target: as the client sent them.
        headers: h11's (names lower-cased).

    Returns:
        ``NO_CORS`` for a request CORS does not concern; else the headers for
        the routes' answer, or the answer itself.
    """
    if not origins:
        return NO_CORS
    if target.startswith(_HUB_TARGET):
        methods = _HUB_METHODS
    elif target.startswith(_EVENTS_TARGET):
        methods = _EVENTS_METHODS
    else:
        return NO_CORS
    origin: bytes | None = None
    is_preflight = False
    is_upgrade = False
    for name, value in headers:
        if name == b"origin":
            # Two different origins: neither is trusted.
            origin = b"" if origin is not None and origin != value else value
        elif name == b"access-control-request-method":
            is_preflight = method == b"OPTIONS"
        elif name == b"upgrade":
            is_upgrade = b"websocket" in value.lower()
    is_any = origins[0] == ANY_ORIGIN
    if origin is None:
        # No browser sent this (or a same-origin GET): the answer still depends on the
        # Origin of other requests, which caches must know.
        return NO_CORS if is_any else CorsDecision((_VARY,))
    text = origin.decode("latin-1")
    if is_any:
        allowed: Headers = (_ANY,)
    elif text in origins:
        allowed = ((b"access-control-allow-origin", origin), _CREDENTIALS, _VARY)
    elif is_preflight:
        return CorsDecision((), _FOREIGN_PREFLIGHT, text)
    elif is_upgrade and target.startswith(_HUB_TARGET):
        return CorsDecision((), _FOREIGN_UPGRADE, text)
    else:
        # A foreign page's request that needed no preflight: answered as any other,
        # without the header that would let that page read the answer.
        return CorsDecision((_VARY,))
    if not is_preflight:
        return CorsDecision(allowed)
    preflight = Response(
        204,
        b"",
        headers=(
            *allowed,
            (b"access-control-allow-methods", methods),
            (b"access-control-allow-headers", ALLOWED_HEADERS),
            (b"access-control-max-age", _MAX_AGE),
        ),
    )
    return CorsDecision((), preflight)
