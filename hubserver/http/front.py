"""The one HTTP/1.1 port's entry point: a connection object per accepted TCP connection.

- ``GET /healthz``: alive. ``GET /readyz``: ready to serve (not while starting
  or draining).
- ``GET /v1/hub/entries|incidents?site_id=S[&user_id=U]``: WebSocket upgrade to
  a hub (skipNegotiation, as the reference's clients connect), and
  ``POST .../negotiate`` for clients that negotiate.
- ``GET /v1/hub/publish``: the publisher hub (``Publish(hub, events)``).
- ``POST /v1/events/entries|incidents``: the publish API.
- ``GET /metrics``: Prometheus metrics, unless ``--metrics off`` or
  ``--metrics-port`` moved them to the metrics listener, whose connections
  (``handle_internal_connection``) get the same front (head size limit,
  request deadlines, its own connection cap) with ``/metrics``, ``/healthz``
  and ``/readyz`` only.

Refusals before an upgrade are plain HTTP with a short ``text/plain`` body
(spec §13: operators read them in logs and devtools); the publish API answers
JSON ``{"code", "message"}``. Where each part lives:

- ``_protocol.HttpConnection``: the socket, h11, the request loop, deadlines,
  writing answers, logging;
- ``_routes``: what each path answers, ``authenticate``, and the hub table;
- ``_cors``: what ``--cors-origin`` adds to answers (or answers: preflights,
  and WebSocket upgrades from origins not listed), decided before the routes;
- ``_request``: the request, response and refusal values, and the byte
  templates answers are written from.
"""

from __future__ import annotations

import trio

from hubserver.app import App

from ._protocol import HttpConnection
from ._routes import Session, respond_internal

__all__ = ["handle_connection", "handle_internal_connection"]


async def handle_connection(stream: trio.SocketStream, app: App, peer_ip: str) -> Session | None:
    """Serve one TCP connection's HTTP requests until it closes or upgrades.

    ``peer_ip`` is the address the connection limits count it under.

    Returns:
        The hub session to run (``Session.run``) after an upgrade; the caller
        runs it once the connection object is gone, since it would otherwise
        live as long as the hub connection. None when the connection is over
        (and closed).
    """
    return await HttpConnection(stream, app, peer_ip).run()


async def handle_internal_connection(stream: trio.SocketStream, app: App, peer_ip: str) -> None:
    """Serve one TCP connection of the metrics listener (``--metrics-port``) until it closes.

    No CORS (no browser page calls it) and no upgrade: every path but
    ``/metrics``, ``/healthz`` and ``/readyz`` is 404.
    """
    session = await HttpConnection(
        stream, app, peer_ip, respond=respond_internal, cors_origins=()
    ).run()
    assert session is None  # respond_internal never upgrades
