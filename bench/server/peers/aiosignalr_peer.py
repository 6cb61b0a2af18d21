"""aiosignalr's SignalR server with hubserver's two routes, for the bench.

- ``GET /v1/hub/entries?site_id=S``: the hub (WebSockets, skipNegotiation);
  on connect the client joins group ``S``.
- ``POST /v1/events/entries``: one event or an array; each is broadcast to
  the group of its ``site_id`` as ``ReceiveMessage(text)`` with ``text`` the
  event as compact JSON (aiosignalr encodes a broadcast once per protocol).

aiosignalr's standalone frontend (aiohttp) serves both; no auth.

    python -m bench.server.peers.aiosignalr_peer --port 5000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

from aiohttp import web
from aiosignalr.server import Hub, SignalRServer

HUB_PATH = "/v1/hub/entries"
_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def build_server() -> SignalRServer:
    server: SignalRServer

    class EntriesHub(Hub):
        async def on_connected(self) -> None:
            site = self.context.query_string.get("site_id", "")
            # aiosignalr registers the connection with its lifetime manager
            # only after this hook returns, and add_to_group refuses unknown
            # connections: register it first (idempotent), then join.
            await server.lifetime.on_connected(self.context.connection_id)
            await self.groups.add(site)

    server = SignalRServer(EntriesHub, logger=logging.getLogger("aiosignalr.peer"))
    return server


def build_app(server: SignalRServer) -> web.Application:
    app: web.Application = server.create_application(path=HUB_PATH)

    async def publish(request: web.Request) -> web.Response:
        parsed = json.loads(await request.read())
        events = parsed if isinstance(parsed, list) else [parsed]
        for event in events:
            await server.lifetime.send_group(
                str(event["site_id"]), "ReceiveMessage", (_compact(event),)
            )
        return web.json_response({"accepted": len(events)}, status=202)

    app.router.add_post("/v1/events/entries", publish)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    server = build_server()
    web.run_app(
        build_app(server),
        host=args.host,
        port=args.port,
        backlog=4096,
        print=None,
        access_log=None,
        handle_signals=True,
    )


if __name__ == "__main__":
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    main()
