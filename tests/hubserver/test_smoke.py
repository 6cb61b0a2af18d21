"""The shortest path through the server: upgrade, handshake, publish, receive."""

from __future__ import annotations

import json

import trio
from trio_websocket import open_websocket_url

from hubserver.permissions import Role

from .conftest import Harness


async def _publish(h: Harness, hub: str, body: object) -> tuple[int, dict[str, object]]:
    stream = await trio.open_tcp_stream("127.0.0.1", h.port)
    data = json.dumps(body).encode()
    request = (
        f"POST /v1/events/{hub} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {h.publisher_token()}\r\ncontent-length: {len(data)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + data
    await stream.send_all(request)
    response = b""
    while chunk := await stream.receive_some(65536):
        response += chunk
    await stream.aclose()
    head, _, payload = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


async def test_publish_reaches_site_subscriber(start_server) -> None:  # type: ignore[no-untyped-def]
    h: Harness = await start_server()
    h.grant("site-1", "alice", Role.SITE_ADMIN)
    url = f"ws://{h.base}/v1/hub/entries?site_id=site-1&access_token={h.token()}"
    with trio.fail_after(10):
        async with open_websocket_url(url) as ws:
            await ws.send_message('{"protocol":"json","version":1}\x1e')
            assert await ws.get_message() == "{}\x1e"
            status, body = await _publish(h, "entries", {"site_id": "site-1", "lock_id": "L"})
            assert status == 202
            assert body["accepted"] == 1
            message = await ws.get_message()
            record = json.loads(message.rstrip("\x1e"))
            assert record["type"] == 1 and record["target"] == "ReceiveMessage"
            event = json.loads(record["arguments"][0])
            assert event == {"site_id": "site-1", "lock_id": "L", "id": body["ids"][0], "seq": 1}
