"""The official JavaScript client as a publisher on ``/v1/hub/publish``, as the README shows.

``connection.invoke("Publish", "entries", [...])`` resolves with
``{accepted, ids, seqs}``; a refused call rejects with the server's error;
``connection.send(...)`` is fire-and-forget. An official JS subscriber
(client.mjs) receives what was published.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from hubserver.permissions import Role
from tests.e2e.test_js_client import HERE, SITE, entry, hub_url, js_client
from tests.hubserver.conftest import Harness

PUBLISHER = HERE / "publisher.mjs"


@pytest.mark.parametrize(
    ("protocol", "negotiate"), [("json", False), ("messagepack", False), ("json", True)]
)
async def test_the_js_client_publishes_and_a_js_subscriber_receives(
    start_server: Any, tmp_path: Path, protocol: str, negotiate: bool
) -> None:
    h: Harness = await start_server()
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    calls = [
        {"hub": "entries", "events": [entry(1, id="e-1"), entry(2, id="e-2")]},
        {"hub": "entries", "events": [entry(3), {"lock_id": "no site"}]},
        {"hub": "entries", "events": entry(4, id="e-4"), "send": True},
        {"hub": "entries", "events": entry(5, id="e-5")},
    ]
    with trio.fail_after(30):
        async with js_client(tmp_path, url=hub_url(h), token=h.token(), expect=4) as sub:
            await sub.wait_for("started")
            async with js_client(
                tmp_path,
                script=PUBLISHER,
                url=f"http://{h.base}/v1/hub/publish",
                token=h.publisher_token(),
                protocol=protocol,
                negotiate=negotiate,
                calls=calls,
            ) as pub:
                assert await pub.wait_for("started")
                first = await pub.wait_for("result")
                assert first["value"] == {"accepted": 2, "ids": ["e-1", "e-2"], "seqs": [1, 2]}
                refused = await pub.wait_for("error")
                assert "event 1: 'site_id' is required" in refused["error"], refused
                await pub.wait_for("sent")
                last = await pub.wait_for("result")
                # Calls run in order: the fire-and-forget one before it took seq 3.
                assert last["value"] == {"accepted": 1, "ids": ["e-5"], "seqs": [4]}
                await pub.wait_for("stopped")
            events = await sub.messages(4)
    assert [(e["id"], e["seq"]) for e in events] == [("e-1", 1), ("e-2", 2), ("e-4", 3), ("e-5", 4)]
    assert json.dumps(events[0]).count("lock-1") == 1
