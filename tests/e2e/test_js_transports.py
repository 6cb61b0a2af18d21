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
from tests.hubserver.helpers import bystander

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


# -- stateful reconnect (spec §8) -------------------------------------------------------


async def _drop_transport(h: Harness) -> int:
    """Close the one hub connection's socket as a failed network would (no close frame)."""
    [session] = [s for s in h.server.app.stats.by_id.values() if s.subject == "alice"]
    session.transport.close()
    return session.session_id


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_stateful_reconnect_brings_every_event_once_across_a_dropped_socket(
    start_server: Any, tmp_path: Path, protocol: str
) -> None:
    h: Harness = await start_server()
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    with trio.fail_after(20):
        async with (
            bystander(h) as b,
            js_client(
                tmp_path,
                url=hub_url(h),
                token=h.token("alice"),
                transport="negotiated-websockets",
                statefulReconnect=True,
                protocol=protocol,
                expect=5,
            ) as client,
        ):
            await client.wait_for("started")
            await publish(h, "entries", entry(1))
            [first] = await client.messages(1)
            session_id = await _drop_transport(h)
            # Published while the client is away: kept for it, sent once it is back.
            await publish(h, "entries", [entry(2), entry(3)])
            await publish(h, "entries", entry(4))
            got = await client.messages(3)
            # The same connection all along: no new session, no onreconnecting.
            assert session_id in h.server.app.stats.by_id
            assert h.server.app.stats.opened == 2  # this one and the bystander
            await publish(h, "entries", entry(5))
            got += await client.messages(1)
            assert [first["seq"], *(event["seq"] for event in got)] == [1, 2, 3, 4, 5]
            assert [e["event"] for e in await client.rest()] == ["stopping", "closed", "stopped"]
            assert not any(e["event"] == "reconnecting" for e in client.events)
            await b.check()


async def test_a_stateful_connection_not_reconnected_in_its_window_ends(
    start_server: Any, tmp_path: Path
) -> None:
    h: Harness = await start_server(stateful_reconnect_window=0.3)
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    with trio.fail_after(20):
        async with js_client(
            tmp_path,
            url=hub_url(h),
            token=h.token("alice"),
            transport="negotiated-websockets",
            statefulReconnect=True,
        ) as client:
            await client.wait_for("started")
            [session] = h.server.app.stats.by_id.values()
            token = next(iter(h.server.app.negotiations._live))
            # The client reconnects at once; keep its new WebSockets out.
            h.server.app.negotiations.forget(token)
            session.transport.close()
            with trio.fail_after(5):
                while h.server.app.stats.open:  # noqa: ASYNC110 (the window ends it)
                    await trio.sleep(0.02)
            await client.wait_for("closed")
