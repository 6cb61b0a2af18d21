"""Server-Sent Events and long polling at the HTTP level: the answers of spec §6 to §7
for every wrong request, and that a connection is its own subject's only.

The official client's happy paths are in tests/e2e/test_js_transports.py.
"""

from __future__ import annotations

import json
import socket
import struct
from functools import partial
from typing import Any

import pytest
import trio

from hubcore import HubLimits
from hubserver.app import PUBLISH_SCOPE
from hubserver.connection import HubSession
from hubserver.permissions import Role
from hubserver.transports import PollTransport, Reading
from hubserver.transports import negotiate as negotiate_module
from tests.hubserver.conftest import Harness
from tests.hubserver.helpers import (
    PING_JSON,
    RS,
    HttpResponse,
    HubClient,
    HubClosed,
    ResponseReader,
    UpgradeRefused,
    bearer,
    build_request,
    bystander,
    http_request,
    hub_target,
    open_hub,
    open_tcp,
    open_ws,
    publish,
    publish_ok,
    upgrade_headers,
)

CAP = 10
_sites = iter(range(1_000_000))


def new_site() -> str:
    return f"transport-site-{next(_sites)}"


async def negotiate(h: Harness, site: str, subject: str, *, source_ip: str | None = None) -> str:
    response = await http_request(
        h.port,
        "POST",
        f"/v1/hub/entries/negotiate?site_id={site}&negotiateVersion=1",
        headers=[bearer(h.token(subject))],
        source_ip=source_ip,
    )
    assert response.status == 200, response
    body = json.loads(response.body)
    assert [t["transport"] for t in body["availableTransports"]] == [
        "WebSockets",
        "ServerSentEvents",
        "LongPolling",
    ]
    token: str = body["connectionToken"]
    return token


async def start_polling(h: Harness, site: str, subject: str) -> str:
    token = await negotiate(h, site, subject)
    first = await http_request(
        h.port,
        "GET",
        f"/v1/hub/entries?site_id={site}&id={token}",
        headers=[bearer(h.token(subject))],
    )
    assert first.status == 200 and first.body == b"", first  # the first poll answers at once
    return token


async def test_wrong_requests_get_the_spec_answers(start_server: Any) -> None:
    h: Harness = await start_server()
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    auth = [bearer(h.token("alice"))]
    base = f"/v1/hub/entries?site_id={site}"
    with trio.fail_after(CAP):
        async with bystander(h) as b:
            assert (await http_request(h.port, "POST", base, headers=auth, body=b"x")).status == 400
            unknown = f"{base}&id=nope"
            assert (await http_request(h.port, "POST", unknown, headers=auth)).status == 404
            assert (await http_request(h.port, "GET", unknown, headers=auth)).status == 404
            assert (await http_request(h.port, "DELETE", unknown, headers=auth)).status == 404
            token = await start_polling(h, site, "alice")
            target = f"{base}&id={token}"
            # An event stream or a WebSocket for a long-polling connection: no.
            sse = [*auth, ("Accept", "text/event-stream")]
            assert (await http_request(h.port, "GET", target, headers=sse)).status == 400
            ws = upgrade_headers(token=h.token("alice"))
            assert (await http_request(h.port, "GET", target, headers=ws)).status == 400
            # A second poll supersedes the first: the first answers 204.
            async with trio.open_nursery() as nursery:
                answers: list[int] = []

                async def first_poll() -> None:
                    answers.append((await http_request(h.port, "GET", target, headers=auth)).status)

                nursery.start_soon(first_poll)
                await trio.sleep(0.2)
                second = trio.CancelScope()
                nursery.start_soon(_poll_into, h, target, auth, answers, second)
                with trio.fail_after(3):
                    while not answers:  # noqa: ASYNC110 (the superseded poll answers)
                        await trio.sleep(0.02)
                assert answers == [204]
                # DELETE ends the connection: the pending poll answers 204, then 404.
                deleted = await http_request(h.port, "DELETE", target, headers=auth)
                assert deleted.status == 202
            assert answers == [204, 204]
            with trio.fail_after(3):
                while h.server.app.negotiations.find(token) is not None:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            assert (await http_request(h.port, "GET", target, headers=auth)).status == 404
            await b.check()


async def _poll_into(
    h: Harness, target: str, auth: list[tuple[str, str]], answers: list[int], _: Any
) -> None:
    answers.append((await http_request(h.port, "GET", target, headers=auth)).status)


async def test_a_connection_is_its_subjects_only(start_server: Any) -> None:
    """Another subject with the token gets 404 for POST, poll and DELETE: nothing of it."""
    h: Harness = await start_server()
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    h.grant(site, "mallory", Role.SITE_ADMIN)
    with trio.fail_after(CAP):
        token = await start_polling(h, site, "alice")
        target = f"/v1/hub/entries?site_id={site}&id={token}"
        theirs = [bearer(h.token("mallory"))]
        handshake = b'{"protocol":"json","version":1}\x1e'
        for method in ("POST", "GET", "DELETE"):
            answer = await http_request(h.port, method, target, headers=theirs, body=handshake)
            assert answer.status == 404, (method, answer)
        # No token at all: 401.
        assert (await http_request(h.port, "POST", target, body=handshake)).status == 401
        # Alice's connection is intact: her handshake is answered on her poll.
        mine = [bearer(h.token("alice"))]
        assert (
            await http_request(h.port, "POST", target, headers=mine, body=handshake)
        ).status == 200
        poll = await http_request(h.port, "GET", target, headers=mine)
        assert poll.status == 200 and poll.body == b"{}\x1e", poll


async def test_post_to_a_websocket_connection_is_405(start_server: Any) -> None:
    h: Harness = await start_server()
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    with trio.fail_after(CAP):
        token = await negotiate(h, site, "alice")
        target = f"/v1/hub/entries?site_id={site}&id={token}"
        stream = await open_tcp(h.port)
        head = f"GET {target} HTTP/1.1\r\nHost: x\r\n" + "".join(
            f"{n}: {v}\r\n" for n, v in upgrade_headers(token=h.token("alice"))
        )
        await stream.send_all(head.encode() + b"\r\n")
        assert b" 101 " in await stream.receive_some(4096)
        auth = [bearer(h.token("alice"))]
        assert (await http_request(h.port, "POST", target, headers=auth, body=b"x")).status == 405
        again = upgrade_headers(token=h.token("alice"))
        assert (await http_request(h.port, "GET", target, headers=again)).status == 409
        await stream.aclose()


async def test_an_event_stream_is_framed_as_server_sent_events(start_server: Any) -> None:
    h: Harness = await start_server()
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    with trio.fail_after(CAP):
        token = await negotiate(h, site, "alice")
        target = f"/v1/hub/entries?site_id={site}&id={token}"
        stream = await open_tcp(h.port)
        await stream.send_all(
            f"GET {target} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
            f"Authorization: Bearer {h.token('alice')}\r\n\r\n".encode()
        )
        received = b""
        while b"\r\n\r\n:\r\n" not in received:
            received += await stream.receive_some(4096)
        assert received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"content-type: text/event-stream" in received
        mine = [bearer(h.token("alice"))]
        handshake = b'{"protocol":"messagepack","version":1}\x1e'
        assert (
            await http_request(h.port, "POST", target, headers=mine, body=handshake)
        ).status == 200
        received = b""
        while not received.endswith(b"\r\n\r\n"):
            received += await stream.receive_some(4096)
        # MessagePack cannot travel on SSE: ASP.NET Core's handshake error, as an event.
        assert received.startswith(b'data: {"error":"Cannot use the \'messagepack\' protocol')
        assert received.endswith(b"\x1e\r\n\r\n")
        await stream.aclose()


async def test_a_worker_of_workers_offers_websockets_only(start_server: Any) -> None:
    """With --workers any worker may get a connection's next request: SSE and long
    polling (and a stateful reconnect's new WebSocket) would not find their connection."""
    h: Harness = await start_server(reuse_port=True)
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    with trio.fail_after(CAP):
        response = await http_request(
            h.port,
            "POST",
            f"/v1/hub/entries/negotiate?site_id={site}&negotiateVersion=1&useStatefulReconnect=true",
            headers=[bearer(h.token("alice"))],
        )
    body = json.loads(response.body)
    assert "useStatefulReconnect" not in body
    assert body["availableTransports"] == [
        {"transport": "WebSockets", "transferFormats": ["Text", "Binary"]}
    ]


async def test_stateful_reconnect_is_granted_only_when_asked(start_server: Any) -> None:
    h: Harness = await start_server()
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    base = f"/v1/hub/entries/negotiate?site_id={site}&negotiateVersion=1"
    with trio.fail_after(CAP):
        for query, granted in (("", False), ("&useStatefulReconnect=true", True)):
            response = await http_request(
                h.port, "POST", base + query, headers=[bearer(h.token("alice"))]
            )
            body = json.loads(response.body)
            assert body.get("useStatefulReconnect", False) is granted, body
            if granted:  # ASP.NET Core's key order: it comes first
                assert response.body.startswith(b'{"useStatefulReconnect":true,')


# -- what every transport has: revocation, token expiry, the output budget -------------

HANDSHAKE = b'{"protocol":"json","version":1}\x1e'


class _Sse:
    """An event stream over a raw socket: its data lines, as records."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._data = b""

    async def next_record(self) -> bytes:
        """The next event's data (b"" once the stream ended); comment lines skipped."""
        while True:
            while b"\r\n\r\n" not in self._data:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    return b""
                self._data += chunk
            event, _, self._data = self._data.partition(b"\r\n\r\n")
            lines = [line for line in event.split(b"\r\n") if not line.startswith(b":")]
            if lines:
                return b"\n".join(line.removeprefix(b"data: ") for line in lines)


async def _open(h: Harness, site: str, transport: str, token: str) -> tuple[str, _Sse | None]:
    """A connection on ``transport`` with its handshake done: its target and stream."""
    target = f"/v1/hub/entries?site_id={site}&id=" + await negotiate(h, site, "alice")
    auth = [bearer(token)]
    sse = None
    if transport == "sse":
        stream = await open_tcp(h.port)
        await stream.send_all(
            f"GET {target} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        sse = _Sse(stream)
        head = await sse.next_record()
        assert head.startswith(b"HTTP/1.1 200"), head
    else:
        assert (await http_request(h.port, "GET", target, headers=auth)).status == 200
    assert (await http_request(h.port, "POST", target, headers=auth, body=HANDSHAKE)).status == 200
    assert await _next(h, target, sse, token) == b"{}\x1e"
    return target, sse


async def _next(h: Harness, target: str, sse: _Sse | None, token: str) -> bytes:
    if sse is not None:
        return await sse.next_record()
    poll = await http_request(h.port, "GET", target, headers=[bearer(token)])
    return poll.body if poll.status == 200 else b"204"


async def _wait_for_close(h: Harness, target: str, sse: _Sse | None, token: str) -> bytes:
    while b'"type":7' not in (record := await _next(h, target, sse, token)):
        assert record not in (b"", b"204"), "ended without a Close"
    return record


@pytest.mark.parametrize("transport", ["sse", "longpolling"])
async def test_a_revoke_closes_sse_and_long_polling_connections(
    start_server: Any, transport: str
) -> None:
    h: Harness = await start_server()
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    token = h.token("alice")
    with trio.fail_after(CAP):
        async with bystander(h) as b:
            target, sse = await _open(h, site, transport, token)
            h.store.revoke(site, "alice")
            close = await _wait_for_close(h, target, sse, token)
            assert b"revoked" in close
            await b.check()
            if sse is not None:
                await sse.stream.aclose()


@pytest.mark.parametrize("transport", ["sse", "longpolling"])
async def test_token_expiry_closes_sse_and_long_polling_connections(
    start_server: Any, transport: str
) -> None:
    h: Harness = await start_server(token_leeway=0.0)
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    token = h.token("alice", ttl=1.5)
    with trio.fail_after(CAP):
        target, sse = await _open(h, site, transport, token)
        # Reconnectable, without error text (ASP.NET Core's close on expiry).
        close = await _wait_for_close(h, target, sse, h.token("alice"))
        assert json.loads(close.rstrip(b"\x1e")) == {"type": 7, "allowReconnect": True}
        if sse is not None:
            await sse.stream.aclose()


async def test_a_long_polling_client_over_its_budget_is_closed_as_slow(
    start_server: Any,
) -> None:
    """It polls once and then not for a while: what waits for it passes the budget."""
    h: Harness = await start_server(max_outbox_bytes=4096, slow_client_timeout=0.3, resume_window=0)
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    token = h.token("alice")
    with trio.fail_after(CAP):
        async with bystander(h) as b:
            target, _ = await _open(h, site, "longpolling", token)
            publisher = [bearer(h.publisher_token())]
            for n in range(20):
                event = json.dumps({"site_id": site, "n": n, "pad": "x" * 500}).encode()
                sent = await http_request(
                    h.port, "POST", "/v1/events/entries", headers=publisher, body=event
                )
                assert sent.status == 202
            while not h.server.app.stats.slow_closed:  # noqa: ASYNC110 (a counter)
                await trio.sleep(0.02)
            # What it gets now is the slow Close (what waited beyond it was dropped).
            close = await _wait_for_close(h, target, None, token)
            assert b"did not keep up" in close
            await b.check()


# -- stateful reconnect when the socket fails under a write ----------------------------


async def _stateful(
    h: Harness, site: str, subject: str, *, rcvbuf: int | None = None, token: str | None = None
) -> tuple[str, HubClient]:
    """A negotiated stateful WebSocket (handshake version 2): its target and client."""
    auth = [bearer(h.token(subject) if token is None else token)]
    response = await http_request(
        h.port,
        "POST",
        f"/v1/hub/entries/negotiate?site_id={site}&negotiateVersion=1&useStatefulReconnect=true",
        headers=auth,
    )
    assert json.loads(response.body)["useStatefulReconnect"] is True, response
    target = f"/v1/hub/entries?site_id={site}&id=" + json.loads(response.body)["connectionToken"]
    ws = await open_ws(h.port, target, headers=auth, rcvbuf=rcvbuf)
    client = HubClient(ws)
    assert await client.handshake(request='{"protocol":"json","version":2}' + RS) == {}
    return target, client


def _reset(stream: trio.SocketStream) -> None:
    """Drop the connection as a failed network does: an RST, no close frame."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def _paused_then_reset(h: Harness, site: str, subject: str) -> tuple[str, HubSession]:
    """A stateful subscriber that stopped reading (the server stopped reading it too:
    its output is over the budget) and whose socket then failed under a write."""
    target, client = await _stateful(h, site, subject, rcvbuf=4096)
    [session] = [s for s in h.server.app.stats.by_id.values() if s.subject == subject]
    assert isinstance(session, HubSession)
    while session._in.state is not Reading.PAUSED:
        await publish_ok(h, "entries", {"site_id": site, "pad": "x" * 2000})
    # It still pings (as the official clients do): the server reads that, then waits
    # for its output to drain before it reads any more.
    await client.ws.send_text(PING_JSON)
    await trio.sleep(0.2)
    _reset(client.ws.stream)
    # The writer meets the reset; the connection waits for its client's next socket.
    while session.transport._sock.fileno() != -1:  # type: ignore[attr-defined]  # noqa: ASYNC110
        await trio.sleep(0.01)
    return target, session


async def test_a_stateful_connection_whose_socket_failed_writes_to_no_other_socket(
    start_server: Any,
) -> None:
    """Its descriptor, closed, is the next one an accept gets: nothing of the dropped
    client's stream may reach whoever holds it now."""
    h: Harness = await start_server(
        max_outbox_bytes=16 * 1024,
        slow_client_timeout=5.0,
        resume_window=0,
        hub_limits=HubLimits(max_replay_buffer_bytes=1 << 20),
    )
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    with trio.fail_after(CAP):
        async with bystander(h) as b:
            # Made first (this process is also the server): the server's accepts then
            # take the lowest free descriptors, alice's among them once it is closed.
            newcomers = [trio.socket.socket() for _ in range(30)]
            await _paused_then_reset(h, site, "alice")
            for sock in newcomers:
                await sock.connect(("127.0.0.1", h.port))
            await trio.sleep(0.2)  # all accepted
            await publish_ok(h, "entries", {"site_id": site, "secret": "for alice only"})
            await trio.sleep(0.3)
            for sock in newcomers:
                with trio.move_on_after(0.01):
                    leaked = await sock.recv(65536)
                    assert leaked == b"", f"another client's bytes: {leaked[:80]!r}"
                sock.close()
            await b.check()


async def test_a_stateful_client_dropped_while_unread_is_read_again_once_back(
    start_server: Any,
) -> None:
    """Its connection stopped reading the old socket (over the budget); the new one is
    read: the client's Sequence, its calls, its Acks."""
    h: Harness = await start_server(
        max_outbox_bytes=16 * 1024,
        slow_client_timeout=5.0,
        resume_window=0,
        hub_limits=HubLimits(max_replay_buffer_bytes=1 << 20),
    )
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    with trio.fail_after(CAP):
        async with bystander(h) as b:
            target, session = await _paused_then_reset(h, site, "alice")
            # Its reconnect (spec §8): the same id, no handshake; its Sequence, then a call.
            client = HubClient(await open_ws(h.port, target, headers=[bearer(h.token("alice"))]))
            await client.ws.send_text('{"type":9,"sequenceId":1}' + RS)
            await client.ws.send_text(
                '{"type":1,"invocationId":"7","target":"Nope","arguments":[]}' + RS
            )
            with trio.fail_after(3):  # never answered: the new socket was never read
                while (message := await client.next_message()).get("invocationId") != "7":
                    assert message["type"] in (1, 9), message  # the Sequence, the replay
            assert message["type"] == 3 and "does not exist" in message["error"], message
            assert session.session_id in h.server.app.stats.by_id  # the same connection
            await client.aclose()
            await b.check()


async def test_a_resume_past_the_stateful_replay_buffer_closes_as_slow(
    start_server: Any,
) -> None:
    """The replay does not fit in what the client has not acknowledged: it is closed as a
    slow client (and reconnects), not counted as a server bug."""
    h: Harness = await start_server(resume_window=0)
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    with trio.fail_after(CAP):
        async with bystander(h) as b:
            events = [{"site_id": site, "pad": "x" * 1000} for _ in range(50)]
            for _ in range(3):  # ~150 KB of history, over the 100 KB replay buffer
                assert (await publish(h, "entries", events)).status == 202
            _, client = await _stateful(h, site, "alice")
            await publish_ok(h, "entries", {"site_id": site, "live": 1})
            assert (await client.next_event())["live"] == 1  # tracked, never acknowledged
            await client.ws.send_text(
                '{"type":1,"invocationId":"1","target":"Resume","arguments":[0]}' + RS
            )
            closed = await client.expect_close()
            assert closed.close is not None, closed
            assert "did not keep up" in closed.close["error"], closed
            assert h.server.app.stats.crashed == 0
            await client.aclose()
            await b.check()


async def test_a_stateful_publisher_that_never_acknowledges_is_closed_as_slow(
    start_server: Any,
) -> None:
    """Its Completions fill the replay buffer: closed as a slow client, not a server bug."""
    h: Harness = await start_server(hub_limits=HubLimits(max_replay_buffer_bytes=1000))
    site = new_site()
    publisher = [bearer(h.publisher_token())]
    with trio.fail_after(CAP):
        async with bystander(h) as b:
            response = await http_request(
                h.port,
                "POST",
                "/v1/hub/publish/negotiate?negotiateVersion=1&useStatefulReconnect=true",
                headers=publisher,
            )
            token = json.loads(response.body)["connectionToken"]
            client = HubClient(
                await open_ws(h.port, f"/v1/hub/publish?id={token}", headers=publisher)
            )
            assert await client.handshake(request='{"protocol":"json","version":2}' + RS) == {}
            call = {"type": 1, "target": "Publish", "arguments": ["entries", [{"site_id": site}]]}
            calls = [json.dumps({**call, "invocationId": str(n)}) + RS for n in range(30)]
            await client.ws.send_text("".join(calls))  # one read: their answers leave together
            closed = await client.expect_close()
            assert closed.close is not None, closed
            assert "did not keep up" in closed.close["error"], closed
            assert h.server.app.stats.crashed == 0
            await client.aclose()
            await b.check()


async def test_a_head_request_takes_nothing_from_a_long_polling_connection(
    start_server: Any,
) -> None:
    """HEAD answers without a body: as a poll it would take what is queued and drop it."""
    h: Harness = await start_server(resume_window=0)
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    token = h.token("alice")
    auth = [bearer(token)]
    with trio.fail_after(CAP):
        target, _ = await _open(h, site, "longpolling", token)
        await publish_ok(h, "entries", {"site_id": site, "n": 1})
        assert await _head(h, target, auth) == 405
        poll = await http_request(h.port, "GET", target, headers=auth)
        assert poll.status == 200 and b'\\"n\\":1' in poll.body, poll
        # Nor does a HEAD start a connection with a negotiated id.
        fresh = f"/v1/hub/entries?site_id={site}&id=" + await negotiate(h, site, "alice")
        assert await _head(h, fresh, auth) == 405
        assert h.server.app.negotiations.find(fresh.rpartition("=")[2]) is None


async def _head(h: Harness, target: str, headers: list[tuple[str, str]]) -> int:
    """The status of a HEAD request (its answer has no body, whatever its length says)."""
    async with await open_tcp(h.port) as stream:
        await stream.send_all(build_request("HEAD", target, headers=headers))
        status, _ = await ResponseReader(stream).read_head()
    return status


async def test_a_connection_is_reached_only_through_its_own_hub(start_server: Any) -> None:
    """A connection's id works on its hub's URL only: another hub's URL checks another
    scope, and a token without the publish scope must not drive a publisher connection."""
    h: Harness = await start_server()
    site = new_site()
    h.grant(site, "svc", Role.SITE_ADMIN)
    may_publish = [bearer(h.token("svc", (PUBLISH_SCOPE,)))]
    may_listen = [bearer(h.token("svc"))]  # the same subject, without the publish scope
    with trio.fail_after(CAP):
        async with bystander(h) as b:
            response = await http_request(
                h.port, "POST", "/v1/hub/publish/negotiate?negotiateVersion=1", headers=may_publish
            )
            token = json.loads(response.body)["connectionToken"]
            mine = f"/v1/hub/publish?id={token}"
            assert (await http_request(h.port, "GET", mine, headers=may_publish)).status == 200
            posted = await http_request(h.port, "POST", mine, headers=may_publish, body=HANDSHAKE)
            assert posted.status == 200
            assert (await http_request(h.port, "GET", mine, headers=may_publish)).body == b"{}\x1e"
            # The same id on the entries hub's URL, with a token that may only listen.
            other = f"/v1/hub/entries?site_id={site}&id={token}"
            call = {"type": 1, "target": "Publish", "arguments": ["entries", [{"site_id": b.site}]]}
            body = json.dumps({**call, "invocationId": "1"}).encode() + b"\x1e"
            for method in ("POST", "GET", "DELETE"):
                answer = await http_request(h.port, method, other, headers=may_listen, body=body)
                assert answer.status == 404, (method, answer)
            await b.check()  # nothing was published to it meanwhile


async def test_a_negotiated_websocket_opens_on_whichever_worker_it_reaches(
    start_server: Any,
) -> None:
    """Two workers on one port (SO_REUSEPORT, as ``--workers`` runs them): the
    negotiate and the WebSocket are two TCP connections, which the kernel spreads
    over both. Negotiate offers WebSockets only there, so the WebSocket must open
    wherever it lands, as it does without negotiating."""
    first: Harness = await start_server(reuse_port=True)
    second: Harness = await start_server(reuse_port=True, port=first.port)
    site = new_site()
    for h in (first, second):
        h.grant(site, "alice", Role.SITE_ADMIN)
    auth = [bearer(first.token("alice"))]
    statuses = []
    with trio.fail_after(CAP):
        for _ in range(16):
            response = await http_request(
                first.port,
                "POST",
                f"/v1/hub/entries/negotiate?site_id={site}&negotiateVersion=1",
                headers=auth,
            )
            token = json.loads(response.body)["connectionToken"]
            target = f"/v1/hub/entries?site_id={site}&id={token}"
            try:
                client = HubClient(await open_ws(first.port, target, headers=auth))
            except UpgradeRefused as exc:
                statuses.append(exc.response.status)
                continue
            assert await client.handshake() == {}
            statuses.append(101)
            await client.aclose()
    assert statuses == [101] * 16


async def test_one_subjects_negotiations_do_not_push_out_anothers(
    start_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pending negotiations are bounded; a subject negotiating without connecting (any
    valid token, thousands a second on one keep-alive connection) must not make
    everyone else's negotiated connections 404."""
    monkeypatch.setattr(negotiate_module, "MAX_PENDING", 40)
    monkeypatch.setattr(negotiate_module, "MAX_PENDING_PER_SUBJECT", 10)
    h: Harness = await start_server()
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    h.grant(site, "mallory", Role.SITE_ADMIN)
    with trio.fail_after(CAP):
        token = await negotiate(h, site, "alice")
        for _ in range(60):
            await negotiate(h, site, "mallory")
        first = await http_request(
            h.port,
            "GET",
            f"/v1/hub/entries?site_id={site}&id={token}",
            headers=[bearer(h.token("alice"))],
        )
        assert first.status == 200, first  # alice's long polling starts


# -- a stateful reconnect is the same connection: one count, the new token ---------------


async def _dropped(h: Harness, client: HubClient, subject: str) -> HubSession:
    """Reset a stateful client's socket; its connection, once it waits for the next one."""
    [session] = [s for s in h.server.app.stats.by_id.values() if s.subject == subject]
    _reset(client.ws.stream)
    while not session._is_detached:  # noqa: ASYNC110 (the server notices the reset)
        await trio.sleep(0.01)
    return session


async def _reconnect(h: Harness, target: str, token: str) -> HubClient:
    """The client's next WebSocket for the same connection (spec §8): Sequence for Sequence."""
    client = HubClient(await open_ws(h.port, target, headers=[bearer(token)]))
    await client.ws.send_text('{"type":9,"sequenceId":1}' + RS)
    assert (await client.next_message())["type"] == 9
    return client


async def test_a_stateful_reconnect_counts_once_toward_its_subjects_limit(
    start_server: Any,
) -> None:
    """The new WebSocket joins the connection it left, which holds its subject's count:
    at a limit of one, counting it again refused the reconnect (429), losing the
    connection, and a subject near its limit could not come back."""
    h: Harness = await start_server(max_hub_connections_per_subject=1)
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    counts = h.server.app._hubs_by_subject
    with trio.fail_after(CAP):
        async with bystander(h) as b:
            target, client = await _stateful(h, site, "alice")
            session = await _dropped(h, client, "alice")
            back = await _reconnect(h, target, h.token("alice"))
            try:
                assert counts["alice"] == 1
                await publish_ok(h, "entries", {"site_id": site, "n": 1})
                assert (await back.next_event())["n"] == 1
                await back.ws.send_text('{"type":7}' + RS)  # the client ends the connection
                assert isinstance(await back.expect_close(), HubClosed)
            finally:
                await back.aclose()
            while session.session_id in h.server.app.stats.by_id:  # noqa: ASYNC110
                await trio.sleep(0.01)
            await trio.sleep(0.05)  # the transport's task ends after its connection's
            assert "alice" not in counts  # released once: neither held nor negative
            async with open_hub(h, hub_target("entries", site), token=h.token("alice")):
                pass
            await b.check()


async def test_a_stateful_reconnect_takes_its_new_tokens_expiry(start_server: Any) -> None:
    """A client that came back with a refreshed token is not closed at the old one's
    expiry: the new socket's token (the same subject's) is the connection's now."""
    h: Harness = await start_server(token_leeway=0.0)
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    with trio.fail_after(CAP):
        target, client = await _stateful(h, site, "alice", token=h.token("alice", ttl=1.5))
        await _dropped(h, client, "alice")
        back = await _reconnect(h, target, h.token("alice"))
        try:
            await trio.sleep(2.0)  # past the first token's expiry
            await publish_ok(h, "entries", {"site_id": site, "n": 1})
            assert (await back.next_event())["n"] == 1
        finally:
            await back.aclose()


# -- a live connection is its own client's business ------------------------------------


async def test_a_live_connection_is_unknown_to_anyone_else(start_server: Any) -> None:
    """Without a token, or with another subject's, a request for a live connection's id
    gets what it would for an unknown id, whatever it asks: nothing says the id is live,
    nor which transport it uses (spec §7.4's 409 and 400 are for its own client); nor
    during a drain (which refused an unknown id at once, and a live one's not)."""
    h: Harness = await start_server()
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    h.grant(site, "mallory", Role.SITE_ADMIN)
    alice = h.token("alice")
    base = f"/v1/hub/entries?site_id={site}&id="
    with trio.fail_after(CAP):
        async with bystander(h) as b:
            polled, _ = await _open(h, site, "longpolling", alice)
            streamed, sse = await _open(h, site, "sse", alice)
            assert sse is not None
            upgraded = base + await negotiate(h, site, "alice")
            ws = HubClient(await open_ws(h.port, upgraded, headers=[bearer(alice)]))
            async with sse.stream, ws.ws.stream:
                targets = [polled, streamed, upgraded]
                unknown = await _probe_as_others(h, base, targets)
                assert unknown == [401] * 5 + [404] * 5
                h.server.app.is_draining = True  # what a shutdown sets first
                try:
                    unknown = await _probe_as_others(h, base, targets)
                finally:
                    h.server.app.is_draining = False
                # Without a token: 401; another subject: no new connection, no such id.
                assert unknown == [401] * 5 + [503] * 3 + [404] * 2
                # Alice's connections noticed nothing.
                assert await ws.handshake() == {}
                await publish_ok(h, "entries", {"site_id": site, "n": 1})
                assert b'\\"n\\":1' in await _next(h, polled, None, alice)
                assert b'\\"n\\":1' in await _next(h, streamed, sse, alice)
                assert (await ws.next_event())["n"] == 1
            await b.check()


async def _probe_as_others(h: Harness, base: str, targets: list[str]) -> list[int]:
    """Every kind of request for these live ids, without a token and as mallory: each
    answered as for an unknown id, whose statuses this returns."""
    statuses = []
    for credentials in ([], [bearer(h.token("mallory"))]):
        asks: list[tuple[str, list[tuple[str, str]], bytes]] = [
            ("GET", [*credentials, ("Accept", "text/event-stream")], b""),
            ("GET", credentials, b""),  # a poll
            ("GET", [*upgrade_headers(), *credentials], b""),
            ("POST", credentials, HANDSHAKE),
            ("DELETE", credentials, b""),
        ]
        for method, headers, body in asks:
            unknown = await http_request(
                h.port, method, base + "unknown", headers=headers, body=body
            )
            statuses.append(unknown.status)
            for target in targets:
                answer = await http_request(h.port, method, target, headers=headers, body=body)
                assert (answer.status, answer.body) == (unknown.status, unknown.body), (
                    method,
                    headers,
                    answer,
                )
    return statuses


# -- long polling against the connection limits ----------------------------------------

#: Abusers come from another loopback address than the bystander (any of 127/8 on Linux).
ABUSER_IP = "127.0.0.2"


def _open_from(h: Harness, ip: str) -> int:
    """The connections the server counts for ``ip`` (sockets and long-polling sessions)."""
    gate = h.server.app.connections
    assert gate is not None
    return gate._by_ip.get(ip, 0)


async def _settled(count: Any, expected: int) -> None:
    """Until ``count()`` is ``expected`` (the server notices closes in its own time)."""
    with trio.move_on_after(3):
        while count() != expected:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert count() == expected


async def _first_poll_from(
    h: Harness, site: str, subject: str, ip: str
) -> tuple[str, HttpResponse]:
    """Negotiate and send the first poll, each on a TCP connection of its own from ``ip``."""
    target = f"/v1/hub/entries?site_id={site}&id=" + await negotiate(
        h, site, subject, source_ip=ip
    )
    auth = [bearer(h.token(subject))]
    return target, await http_request(h.port, "GET", target, headers=auth, source_ip=ip)


def _assert_limit_answer(response: HttpResponse, status: int, code: str) -> None:
    assert response.status == status, response
    assert response.headers.get("retry-after") == "1", response.headers
    assert response.json()["code"] == code, response


async def test_long_polling_sessions_count_toward_the_per_address_limit(
    start_server: Any,
) -> None:
    """A long-polling session holds no socket between polls, yet it is a connection the
    server keeps: with as many subjects as it likes (the per-subject limit bounds no
    one), an address gets no more of them than its limit."""
    h: Harness = await start_server(max_connections_per_ip=3)
    site = new_site()
    subjects = ["m0", "m1", "m2"]
    for subject in subjects:
        h.grant(site, subject, Role.SITE_ADMIN)
    count = partial(_open_from, h, ABUSER_IP)
    with trio.fail_after(CAP):
        async with bystander(h) as b:
            targets = []
            for subject in subjects[:2]:
                target, first = await _first_poll_from(h, site, subject, ABUSER_IP)
                assert first.status == 200, first
                targets.append(target)
                await _settled(count, len(targets))  # the session, not its first poll's socket
            # The third first poll's own socket makes three: its session would be a fourth.
            refused_target, refused = await _first_poll_from(h, site, "m2", ABUSER_IP)
            _assert_limit_answer(refused, 429, "too_many_connections")
            await _settled(count, 2)
            # Word for word what a socket over the limit is told.
            async with await open_tcp(h.port, source_ip=ABUSER_IP):
                await _settled(count, 3)
                over = await http_request(h.port, "GET", "/healthz", source_ip=ABUSER_IP)
            assert (over.status, over.body) == (refused.status, refused.body)
            await b.check()
            # A session that ends frees its place; the refused client retries with its id.
            first_auth = [bearer(h.token("m0"))]
            ended = await http_request(
                h.port, "DELETE", targets[0], headers=first_auth, source_ip=ABUSER_IP
            )
            assert ended.status == 202
            await _settled(count, 1)
            auth = [bearer(h.token("m2"))]
            again = await http_request(
                h.port, "GET", refused_target, headers=auth, source_ip=ABUSER_IP
            )
            assert again.status == 200, again


async def test_long_polling_sessions_count_toward_the_connection_limit(
    start_server: Any,
) -> None:
    h: Harness = await start_server(max_connections=5)
    site = new_site()
    subjects = [f"m{n}" for n in range(4)]
    for subject in subjects:
        h.grant(site, subject, Role.SITE_ADMIN)
    gate = h.server.app.connections
    assert gate is not None
    with trio.fail_after(CAP):
        async with bystander(h) as b:  # one connection
            for n, subject in enumerate(subjects[:3], start=1):
                _, first = await _first_poll_from(h, site, subject, ABUSER_IP)
                assert first.status == 200, first
                await _settled(lambda: gate.open, 1 + n)
            # The fourth first poll is the fifth connection: its session would be a sixth.
            _, refused = await _first_poll_from(h, site, subjects[3], ABUSER_IP)
            _assert_limit_answer(refused, 503, "unavailable")
            await _settled(lambda: gate.open, 4)
            await b.check()  # its publish is the fifth


async def test_a_waiting_poll_and_its_session_count_once(start_server: Any) -> None:
    """While a poll waits, its socket is what its session holds: the two count as one (a
    long-polling client is one connection, as a WebSocket client is, plus the one its
    POSTs use, as an event stream's). Counted twice, this client's POST would be refused
    at a limit of two per address."""
    h: Harness = await start_server(max_connections_per_ip=2)
    site = new_site()
    h.grant(site, "alice", Role.SITE_ADMIN)
    auth = [bearer(h.token("alice"))]
    count = partial(_open_from, h, ABUSER_IP)
    with trio.fail_after(CAP):
        target, first = await _first_poll_from(h, site, "alice", ABUSER_IP)
        assert first.status == 200, first
        await _settled(count, 1)
        session = h.server.app.negotiations.find(target.rpartition("=")[2])
        assert isinstance(session, HubSession)
        transport = session.transport
        assert isinstance(transport, PollTransport)
        polls: list[HttpResponse] = []

        async def poll() -> None:
            polls.append(
                await http_request(h.port, "GET", target, headers=auth, source_ip=ABUSER_IP)
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            while transport._poll_scope is None:  # noqa: ASYNC110 (the poll waits)
                await trio.sleep(0.01)
            assert count() == 1
            posted = await http_request(
                h.port, "POST", target, headers=auth, body=HANDSHAKE, source_ip=ABUSER_IP
            )
            assert posted.status == 200, posted
        assert polls[0].status == 200 and polls[0].body == b"{}\x1e", polls
        await _settled(count, 1)
        ended = await http_request(h.port, "DELETE", target, headers=auth, source_ip=ABUSER_IP)
        assert ended.status == 202
        await _settled(count, 0)
