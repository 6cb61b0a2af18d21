"""The HTTP/1.1 front (h11): health, publish API, and the WebSocket upgrade to hubs."""

from __future__ import annotations

from .front import handle_connection, handle_internal_connection

__all__ = ["handle_connection", "handle_internal_connection"]
