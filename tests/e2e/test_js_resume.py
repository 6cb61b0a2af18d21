"""Resume with the official JavaScript client (issue #5), across two nodes on one Redis.

The client is the reference's sample with ``withAutomaticReconnect()`` and, in
``onreconnected``, ``connection.invoke("Resume", lastSeq)`` where ``lastSeq`` is
the ``seq`` of the last event it received (``resume: true`` in client.mjs). Its
node A is shut down gracefully (a Close that allows reconnect); events go on
through node B; a new node comes up on A's port, and the client, reconnecting
by itself to the same URL, gets what it missed in order, then live events.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from hubserver.permissions import Role
from tests.hubserver.conftest import Harness
from tests.hubserver.redis_fixture import (  # noqa: F401 (a fixture, found by pytest)
    RedisServer,
    redis_server_fixture,
)

from .test_js_client import JsClient, js_client, publish

# Retry every 200 ms (the default waits 2 s before its second try).
RECONNECT_DELAYS = [0] + [200] * 40


def _url(h: Harness, site: str) -> str:
    return f"http://{h.base}/v1/hub/entries?site_id={site}"


async def _seqs(client: JsClient, count: int) -> list[int]:
    return [event["seq"] for event in await client.messages(count)]


async def _publish(h: Harness, site: str, count: int) -> list[str]:
    answer = await publish(h, "entries", [{"site_id": site, "n": n} for n in range(count)])
    ids: list[str] = answer["ids"]
    return ids


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_js_client_resumes_on_a_new_node_with_no_loss(
    start_server: Any, tmp_path: Path, redis_server: RedisServer, protocol: str
) -> None:
    site = f"site-{uuid.uuid4().hex[:12]}"
    a: Harness = await start_server(backplane=redis_server.url)
    b: Harness = await start_server(backplane=redis_server.url)
    for h in (a, b):
        h.grant(site, "alice", Role.SITE_ADMIN)
    with trio.fail_after(20):
        async with js_client(
            tmp_path,
            url=_url(a, site),
            token=a.token("alice"),
            protocol=protocol,
            reconnect=True,
            reconnectDelays=RECONNECT_DELAYS,
            resume=True,
        ) as client:
            await client.wait_for("started")
            ids = await _publish(b, site, 3)
            before = await client.messages(3)
            assert [e["seq"] for e in before] == [1, 2, 3]

            a.server.request_shutdown()
            assert await client.wait_for("reconnecting") == {"event": "reconnecting", "error": None}
            ids += await _publish(b, site, 4)  # missed: seqs 4..7
            # A new node where A was: the client comes back to the same URL by itself.
            a2: Harness = await start_server(backplane=redis_server.url, port=a.port)
            a2.grant(site, "alice", Role.SITE_ADMIN)
            await client.wait_for("reconnected")
            replayed = await client.messages(4)
            assert await client.wait_for("resumed") == {"event": "resumed", "lastSeq": 3}
            ids += await _publish(b, site, 1)  # live, through the other node
            live = await client.messages(1)
            got = before + replayed + live
            assert [e["seq"] for e in got] == [1, 2, 3, 4, 5, 6, 7, 8]
            assert [e["id"] for e in got] == ids
            # Nothing more: a last event published on the new node comes next, as seq 9.
            await _publish(a2, site, 1)
            assert await _seqs(client, 1) == [9]
    assert f"Using HubProtocol '{protocol}'" in client.log()
    assert a2.server.app.stats.opened == 1


async def test_js_client_is_told_of_a_gap_when_it_missed_more_than_history(
    start_server: Any, tmp_path: Path, redis_server: RedisServer
) -> None:
    site = f"site-{uuid.uuid4().hex[:12]}"
    a: Harness = await start_server(backplane=redis_server.url, history_size=5)
    b: Harness = await start_server(backplane=redis_server.url, history_size=5)
    for h in (a, b):
        h.grant(site, "alice", Role.SITE_ADMIN)
    with trio.fail_after(20):
        async with js_client(
            tmp_path,
            url=_url(a, site),
            token=a.token("alice"),
            reconnect=True,
            reconnectDelays=RECONNECT_DELAYS,
            resume=True,
        ) as client:
            await client.wait_for("started")
            await _publish(b, site, 2)
            assert await _seqs(client, 2) == [1, 2]
            a.server.request_shutdown()
            await client.wait_for("reconnecting")
            await _publish(b, site, 9)  # seqs 3..11: history keeps 7..11
            a2: Harness = await start_server(
                backplane=redis_server.url, history_size=5, port=a.port
            )
            a2.grant(site, "alice", Role.SITE_ADMIN)
            await client.wait_for("reconnected")
            assert await client.wait_for("gap") == {"event": "gap", "first": 7}
            assert await _seqs(client, 5) == [7, 8, 9, 10, 11]
            assert await client.wait_for("resumed") == {"event": "resumed", "lastSeq": 2}
            await _publish(b, site, 1)
            assert await _seqs(client, 1) == [12]
