"""python-socketio (ASGI, under uvicorn) with hubserver's publish route, for the bench.

- ``/socket.io/?EIO=4&transport=websocket&site_id=S``: Engine.IO v4 over a
  WebSocket; on connect the client enters room ``S``.
- ``POST /v1/events/entries``: one event or an array; each is emitted to the
  room of its ``site_id`` as event ``ReceiveMessage`` with the event as
  compact JSON text.

No auth. ``python -m bench.server.peers.socketio_peer --port 5000``
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import socketio
import uvicorn

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def build_app() -> Any:
    sio = socketio.AsyncServer(async_mode="asgi", logger=False, engineio_logger=False)

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        site = parse_qs(environ.get("QUERY_STRING", "")).get("site_id", [""])[0]
        await sio.enter_room(sid, site)

    async def publish(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] != "POST" or scope["path"] != "/v1/events/entries":
            await _respond(send, 404, b'{"code":"not_found"}')
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        parsed = json.loads(b"".join(chunks))
        events = parsed if isinstance(parsed, list) else [parsed]
        for event in events:
            await sio.emit("ReceiveMessage", _compact(event), room=str(event["site_id"]))
        await _respond(send, 202, b'{"accepted":%d}' % len(events))

    return socketio.ASGIApp(sio, other_asgi_app=publish)


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    uvicorn.run(
        build_app(),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
