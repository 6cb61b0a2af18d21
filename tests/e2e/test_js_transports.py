"""Every transport the official JavaScript client speaks: Server-Sent Events and long
polling beside WebSockets (issue #11), negotiated, with the same stream and rules.

The client (npm @microsoft/signalr, in Node) negotiates, is offered WebSockets,
ServerSentEvents and LongPolling, and uses the one it was told to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from hubserver.permissions import Role
from tests.e2e.test_js_client import SITE, entry, hub_url, js_client, publish
from tests.hubserver.conftest import Harness

TRANSPORTS = ["negotiated-websockets", "sse", "longpolling"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_each_transport_receives_the_stream_in_order(
    start_server: Any, tmp_path: Path, transport: str
) -> None:
    h: Harness = await start_server()
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    with trio.fail_after(20):
        async with js_client(
            tmp_path, url=hub_url(h), token=h.token("alice"), transport=transport, expect=4
        ) as client:
            await client.wait_for("started")
            sent = [entry(n) for n in range(3)]
            answer = await publish(h, "entries", sent)
            await publish(h, "entries", entry(3))
            got = await client.messages(4)
            assert [event["seq"] for event in got] == [1, 2, 3, 4]
            assert [event["id"] for event in got[:3]] == answer["ids"]
            assert [e["event"] for e in await client.rest()] == ["stopping", "closed", "stopped"]
            assert client.process.returncode == 0
    name = {"negotiated-websockets": "WebSockets", "sse": "ServerSentEvents"}.get(
        transport, "LongPolling"
    )
    assert f"'{name}'" in client.log(), client.log()
    with trio.fail_after(5):
        while h.server.app.stats.open:  # noqa: ASYNC110 (the server ends it on its own)
            await trio.sleep(0.02)
    assert not h.server.app.negotiations.live_count


async def test_long_polling_carries_messagepack(start_server: Any, tmp_path: Path) -> None:
    h: Harness = await start_server()
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    with trio.fail_after(20):
        async with js_client(
            tmp_path,
            url=hub_url(h),
            token=h.token("alice"),
            transport="longpolling",
            protocol="messagepack",
            expect=2,
        ) as client:
            await client.wait_for("started")
            await publish(h, "entries", [entry(1), entry(2)])
            got = await client.messages(2)
            assert [event["lock_id"] for event in got] == ["lock-1", "lock-2"]


async def test_messagepack_over_sse_is_refused_by_the_client_with_our_transports(
    start_server: Any, tmp_path: Path
) -> None:
    """The client skips SSE for MessagePack (its transferFormats are Text only)."""
    h: Harness = await start_server()
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    with trio.fail_after(20):
        async with js_client(
            tmp_path,
            url=hub_url(h),
            token=h.token("alice"),
            transport="sse",
            protocol="messagepack",
        ) as client:
            failed = await client.wait_for("start_failed")
            assert "ServerSentEvents" in failed["error"], failed


@pytest.mark.parametrize("transport", ["sse", "longpolling"])
async def test_a_drain_closes_sse_and_long_polling_clients_with_a_reconnectable_close(
    start_server: Any, tmp_path: Path, transport: str
) -> None:
    h: Harness = await start_server()
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    with trio.fail_after(20):
        async with js_client(
            tmp_path, url=hub_url(h), token=h.token("alice"), transport=transport
        ) as client:
            await client.wait_for("started")
            await publish(h, "entries", entry(1))
            await client.messages(1)
            h.server.request_shutdown()
            closed = await client.wait_for("closed")
            assert "Close message received from server." in client.log()
            assert closed["error"] is None, closed  # a graceful close (no error), as ASP.NET Core
