"""Keep-alive, timeouts, slow clients and graceful shutdown, with real sockets and short timers.

Real sockets rule out ``autojump_clock`` here (the kernel does not jump), so
timers are configured short (HubLimits below) and the assertions give them
generous upper bounds. Short sleeps appear only to show that something does
not happen.
"""

from __future__ import annotations

import json

import pytest
import trio

from hubcore import HubLimits
from hubserver.auth import DevKey
from hubserver.permissions import Role

from .conftest import Harness
from .helpers import (
    CONNECTION_ERROR,
    PING_JSON,
    RS,
    HubClient,
    HubClosed,
    ResponseReader,
    WsClosed,
    WsMessage,
    build_request,
    bystander,
    hub_target,
    open_hub,
    open_tcp,
    open_ws,
    publish_ok,
)


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    """The run's shared key (see conftest): this module's tests need no key of their own."""
    return shared_dev_key


FAST = HubLimits(keepalive_interval=0.5, client_timeout=1.0, handshake_timeout=1.0)


# -- keep-alive and timeouts ---------------------------------------------------------


async def test_server_pings_every_keepalive_interval(start_server) -> None:
    h = await start_server(hub_limits=HubLimits(keepalive_interval=0.5, client_timeout=5.0))
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with open_hub(h, hub_target("entries", "s1")) as client:
            connected = trio.current_time()
            arrivals = []
            for _ in range(4):
                assert await client.next_message(skip_pings=False) == {"type": 6}
                arrivals.append(trio.current_time())
    gaps = [b - a for a, b in zip([connected, *arrivals], arrivals, strict=False)]
    assert all(0.4 <= gap <= 1.6 for gap in gaps), gaps


async def test_events_postpone_the_keepalive_ping(start_server) -> None:
    h = await start_server(hub_limits=HubLimits(keepalive_interval=1.0))
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with open_hub(h, hub_target("entries", "s1")) as client:
            for _ in range(8):  # an event every 0.2 s: nothing else is needed on the wire
                await trio.sleep(0.2)
                await publish_ok(h, "entries", {"site_id": "s1"})
                message = await client.next_message(skip_pings=False)
                assert message["type"] == 1, message
            assert await client.next_message(skip_pings=False) == {"type": 6}


async def test_client_that_never_speaks_after_its_handshake_is_timed_out(start_server) -> None:
    # Issue #9 (11): the client timeout used to start only at the client's first
    # Ping, so a socket that never sent one was held forever.
    h = await start_server(hub_limits=FAST)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with bystander(h) as b, open_hub(h, hub_target("entries", "s1")) as client:
            opened = trio.current_time()
            ended = await client.expect_close()
            elapsed = trio.current_time() - opened
            await b.check()
    assert ended.close == {"type": 7, "error": CONNECTION_ERROR, "allowReconnect": True}
    assert 0.9 <= elapsed <= 3.0, elapsed


async def test_client_that_pings_once_then_goes_silent_is_timed_out(start_server) -> None:
    h = await start_server(hub_limits=FAST)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with bystander(h) as b, open_hub(h, hub_target("entries", "s1")) as client:
            await client.ws.send_text(PING_JSON)  # as the JS client does after the handshake
            pinged = trio.current_time()
            ended = await client.expect_close()
            elapsed = trio.current_time() - pinged
            await b.check()
    assert ended.close == {"type": 7, "error": CONNECTION_ERROR, "allowReconnect": True}
    assert ended.ws.code == 1000
    assert 0.9 <= elapsed <= 3.0, elapsed


async def test_client_that_keeps_pinging_stays_open(start_server) -> None:
    h = await start_server(hub_limits=FAST)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with open_hub(h, hub_target("entries", "s1")) as client:
            for _ in range(8):  # 2.4 s: more than twice the client timeout
                await client.ws.send_text(PING_JSON)
                await trio.sleep(0.3)
            (event_id,) = await publish_ok(h, "entries", {"site_id": "s1"})
            assert (await client.next_event())["id"] == event_id


async def test_client_that_never_handshakes_is_canceled(start_server) -> None:
    h = await start_server(hub_limits=FAST)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with bystander(h) as b:
            ws = await open_ws(h.port, hub_target("entries", "s1"), headers=[_bearer(h)])
            opened = trio.current_time()
            message = await ws.receive()
            elapsed = trio.current_time() - opened
            end = await ws.receive()
            await ws.aclose()
            await b.check()
    assert isinstance(message, WsMessage)
    assert message.data == '{"error":"Handshake was canceled."}' + RS
    assert isinstance(end, WsClosed) and end.code == 1000
    assert 0.9 <= elapsed <= 3.0, elapsed


async def test_partial_handshake_is_canceled_too(start_server) -> None:
    h = await start_server(hub_limits=FAST)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        ws = await open_ws(h.port, hub_target("entries", "s1"), headers=[_bearer(h)])
        await ws.send_text('{"protocol":"json",')
        message = await ws.receive()
        await ws.aclose()
    assert isinstance(message, WsMessage)
    assert json.loads(message.data.rstrip(RS)) == {"error": "Handshake was canceled."}


def _bearer(h: Harness) -> tuple[str, str]:
    return ("Authorization", f"Bearer {h.token()}")


# -- slow clients --------------------------------------------------------------------

EVENT_PAD = "x" * 16_000
MAX_OUTBOX_BYTES = 256 * 1024


async def _read_all_seqs(client: HubClient, until_seq: int, seen: list[int]) -> None:
    while not seen or seen[-1] < until_seq:
        event = await client.next_event()
        seen.append(event["seq"])


async def test_slow_client_is_closed_and_others_keep_everything(start_server) -> None:
    h = await start_server(max_outbox_bytes=MAX_OUTBOX_BYTES)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    stats = h.server.app.stats
    batch = [{"site_id": "s1", "pad": EVENT_PAD} for _ in range(4)]  # ~64 KB a request
    with trio.fail_after(30):
        async with (
            open_hub(h, hub_target("entries", "s1"), rcvbuf=1 << 20) as normal,
            # The slow client: a tiny receive buffer, and after the handshake it never reads.
            open_hub(h, hub_target("entries", "s1"), rcvbuf=4096) as slow,
        ):
            seen: list[int] = []
            published = 0
            # Publish until the server gives up on the slow client: its kernel
            # buffers fill first, then its outbox; the loop is bounded by 64 MB.
            # The normal client reads everything of each request before the next
            # one: it keeps up by construction, whatever the scheduling.
            while stats.slow_closed == 0:
                await publish_ok(h, "entries", batch)
                published += len(batch)
                await _read_all_seqs(normal, published, seen)
                assert published * len(EVENT_PAD) < 64 << 20, "slow client never closed"
            # A few more, to show that the normal client still gets them all.
            for _ in range(3):
                await publish_ok(h, "entries", batch)
                published += len(batch)
                await _read_all_seqs(normal, published, seen)
            assert seen == list(range(1, published + 1))
            assert stats.slow_closed == 1
            # The slow client now reads: what reached its socket, then a Close
            # that allows reconnect, then the end of the WebSocket.
            slow_seqs = []
            while True:
                message = await slow.next_message()
                if isinstance(message, HubClosed):
                    pytest.fail("the slow client got no Close message")
                if message["type"] == 7:
                    close = message
                    break
                slow_seqs.append(json.loads(message["arguments"][0])["seq"])
            end = await slow.ws.receive()
    assert close["allowReconnect"] is True and close["error"], close
    assert isinstance(end, WsClosed) and end.code == 1000
    assert slow_seqs == list(range(1, len(slow_seqs) + 1))  # a prefix, in order
    assert len(slow_seqs) < published


async def test_normal_client_is_not_closed_by_a_burst_it_can_absorb(start_server) -> None:
    # The outbox bound is about clients that stop reading, not about bursts.
    h = await start_server(max_outbox_bytes=MAX_OUTBOX_BYTES)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    batch = [{"site_id": "s1", "pad": EVENT_PAD} for _ in range(4)]
    with trio.fail_after(20):
        async with open_hub(h, hub_target("entries", "s1")) as client:
            seen: list[int] = []
            for _ in range(50):
                await publish_ok(h, "entries", batch)
                await _read_all_seqs(client, len(seen) + len(batch), seen)
    assert seen == list(range(1, 201))
    assert h.server.app.stats.slow_closed == 0


# -- graceful shutdown ---------------------------------------------------------------


async def test_graceful_shutdown(start_server) -> None:
    h = await start_server(drain_timeout=30)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(15):
        # A keep-alive HTTP connection made before the shutdown, to ask /readyz during it.
        probe = await open_tcp(h.port)
        probe_reader = ResponseReader(probe)
        await probe.send_all(build_request("GET", "/readyz", close=False))
        assert (await probe_reader.read_response()).status == 200
        async with (
            open_hub(h, hub_target("entries", "s1")) as polite,
            open_hub(h, hub_target("incidents", "s1"), protocol="messagepack") as binary,
            open_hub(h, hub_target("entries", "s1", "u1")) as stubborn,
        ):
            h.server.request_shutdown()
            # Everyone is told to come back later, then the WebSocket closes.
            for client in (polite, binary):
                ended = await client.expect_close()
                assert ended.close == {"type": 7, "allowReconnect": True}, ended
                assert ended.ws.code == 1000
            # The stubborn client reads its Close but keeps the TCP socket open
            # (it does not answer the close frame), so the drain goes on...
            message = await stubborn.next_message()
            assert message == {"type": 7, "allowReconnect": True}
            assert h.server.app.stats.open >= 1
            # ...and meanwhile the server says it is not ready, and refuses new work.
            await probe.send_all(build_request("GET", "/readyz", close=False))
            readyz = await probe_reader.read_response()
            await probe.send_all(build_request("GET", "/healthz", close=False))
            healthz = await probe_reader.read_response()
            response_after = await _try_publish_on(probe, probe_reader, h)
            await probe.aclose()
    assert readyz.status == 503
    assert healthz.status == 200
    assert response_after == 503


async def _try_publish_on(probe: trio.SocketStream, reader: ResponseReader, h: Harness) -> int:
    body = json.dumps({"site_id": "s1"}).encode()
    headers = [("Authorization", f"Bearer {h.publisher_token()}")]
    await probe.send_all(build_request("POST", "/v1/events/entries", headers=headers, body=body))
    return int((await reader.read_response()).status)


async def test_shutdown_drains_quickly_when_clients_close(start_server) -> None:
    h = await start_server(drain_timeout=30)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with open_hub(h, hub_target("entries", "s1")) as client:
            h.server.request_shutdown()
            started = trio.current_time()
            ended = await client.expect_close()  # answers the close frame
            assert ended.close == {"type": 7, "allowReconnect": True}
        drained = h.server.app.stats.drained
        assert drained is not None
        await drained.wait()
    assert trio.current_time() - started < 2
