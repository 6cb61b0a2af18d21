"""The shortest path through the server: upgrade, handshake, publish, receive."""

from __future__ import annotations

import json

import trio
from trio_websocket import open_websocket_url

from hubserver.permissions import Role

from .conftest import Harness
from .helpers import publish


async def _publish(h: Harness, hub: str, body: object) -> tuple[int, dict[str, object]]:
    response = await publish(h, hub, body)
    return response.status, response.json()


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
