"""The WebSocket layer of a hub connection (RFC 6455), and how little an idle one costs.

Raw clients over 127.0.0.1: control frames, fragmentation, close codes for
broken frames, the closing handshake and its bound. Then the session's task
structure: an idle connection is one Trio task, and a writer task exists only
while output waits for a slow socket (the memory bar of issue #4 rests on it).
"""

from __future__ import annotations

import contextlib

import pytest
import trio
import wsproto.events as ws_events

import hubserver.connection._session as session_module
from hubserver.auth import DevKey
from hubserver.permissions import Role

from .conftest import Harness
from .helpers import (
    HANDSHAKE_JSON,
    RS,
    WsClosed,
    bystander,
    hub_target,
    open_hub,
    open_ws,
    publish_ok,
)


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    return shared_dev_key


MASK = b"\x00\x00\x00\x00"  # a zero mask keeps the hand-written payloads readable


async def test_ping_is_answered_with_a_pong_of_its_payload(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        async with open_hub(h, hub_target("entries", "s1")) as client:
            ws = client.ws
            await ws.send_raw(ws.ws.send(ws_events.Ping(payload=b"are you there")))
            event = await ws.next_ws_event()
            assert event == ws_events.Pong(payload=b"are you there")
            (event_id,) = await publish_ok(h, "entries", {"site_id": "s1"})
            assert (await client.next_event())["id"] == event_id


async def test_fragmented_messages_with_a_ping_between_fragments(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    invocation = '{"type":1,"invocationId":"7","target":"Nope","arguments":[]}' + RS
    with trio.fail_after(5):
        ws = await open_ws(h.port, hub_target("entries", "s1"), headers=[_bearer(h)])
        async with contextlib.aclosing(ws):
            # The handshake split over three frames, a ping inside the message,
            # and an invocation sharing the last fragment.
            first, rest = HANDSHAKE_JSON[:5], HANDSHAKE_JSON[5:]
            wire = ws.ws.send(ws_events.TextMessage(data=first, message_finished=False))
            wire += ws.ws.send(ws_events.Ping(payload=b"p"))
            wire += ws.ws.send(ws_events.TextMessage(data=rest, message_finished=False))
            wire += ws.ws.send(ws_events.TextMessage(data=invocation, message_finished=True))
            for offset in range(0, len(wire), 7):  # and dribbled in small pieces
                await ws.send_raw(wire[offset : offset + 7])
            received = [await ws.next_ws_event() for _ in range(3)]
    texts = [event.data for event in received if isinstance(event, ws_events.TextMessage)]
    assert ws_events.Pong(payload=b"p") in received
    assert "".join(texts).split(RS) == [
        "{}",
        '{"type":3,"invocationId":"7","error":"Failed to invoke \'Nope\' due to an error '
        'on the server. HubException: Method does not exist."}',
        "",
    ]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x81\x05hello", 1002),  # not masked
        (b"\x81\x82" + MASK + b"\xff\xfe", 1007),  # text that is not UTF-8
        (b"\x81\x83" + MASK + b"\xed\xa0\x80", 1007),  # a UTF-16 surrogate in UTF-8 form
        (b"\xc1\x80" + MASK, 1002),  # RSV1 without an extension
        (b"\x83\x80" + MASK, 1002),  # reserved opcode
        (b"\x80\x80" + MASK, 1002),  # continuation with no message started
        (b"\x09\x80" + MASK, 1002),  # a fragmented ping
        (b"\x89\xfe\x00\x7e" + MASK + b"x" * 126, 1002),  # a ping over 125 bytes
        (b"\x88\x81" + MASK + b"\x03", 1002),  # a close body of one byte
        (b"\x88\x82" + MASK + b"\x03\xed", 1002),  # close code 1005 may not be sent
        (b"\x88\x84" + MASK + b"\x03\xe8\xff\xfe", 1007),  # close reason not UTF-8
    ],
    ids=[
        "unmasked",
        "bad-utf8",
        "surrogate",
        "rsv1",
        "opcode-3",
        "orphan-continuation",
        "fragmented-ping",
        "long-ping",
        "close-1-byte",
        "close-1005",
        "close-reason-not-utf8",
    ],
)
async def test_broken_frames_close_with_their_code_and_harm_no_one(
    start_server, frame: bytes, code: int
) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        async with bystander(h) as b:
            async with open_hub(h, hub_target("entries", "s1")) as client:
                await client.ws.send_raw(frame)
                end = await client.ws.receive()
                assert end == WsClosed(code), end
                assert await client.ws.stream.receive_some(100) == b""  # and TCP ends
            await b.check()
        await _all_sessions_end(h)


async def test_client_close_is_echoed_and_the_server_ends_tcp(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        async with open_hub(h, hub_target("entries", "s1")) as client:
            await client.ws.send_raw(client.ws.ws.send(ws_events.CloseConnection(4001, "bye")))
            event = await client.ws.next_ws_event()
            assert isinstance(event, ws_events.CloseConnection) and event.code == 4001
            assert await client.ws.stream.receive_some(100) == b""
        await _all_sessions_end(h)


async def test_close_without_a_code_is_answered_without_one(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        async with open_hub(h, hub_target("entries", "s1")) as client:
            await client.ws.send_raw(b"\x88\x80" + MASK)
            reply = await client.ws.stream.receive_some(100)
            assert reply == b"\x88\x00"  # an empty close frame, unmasked
            assert await client.ws.stream.receive_some(100) == b""


async def test_server_close_waits_for_the_closing_handshake_then_gives_up(
    start_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "CLOSE_TIMEOUT", 0.5)
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        async with open_hub(h, hub_target("entries", "s1")) as client:
            await client.ws.send_text('{"type":7}' + RS)  # the client's hub Close
            # The server answers with its Close and a close frame, then waits for
            # our close frame, which never comes: it drops the connection.
            data = b""
            while chunk := await client.ws.stream.receive_some(1000):
                data += chunk
    assert data == b'\x81\x0b{"type":7}\x1e' + b"\x88\x02\x03\xe8"
    await _all_sessions_end(h)


# -- what a connection costs: tasks --------------------------------------------------


def _connection_tasks(h: Harness) -> int:
    """Tasks of the server's connection nursery: one per connection, the timer task, writers."""
    sessions = h.server.app.sessions
    assert sessions is not None
    return len(sessions.tasks.child_tasks)


async def _settle(h: Harness, expected: int) -> None:
    """Wait until there are ``expected`` such tasks (handlers of publishes end)."""
    with trio.fail_after(3):
        while _connection_tasks(h) != expected:  # noqa: ASYNC110  (no event says a task ended)
            await trio.sleep(0.01)


async def _all_sessions_end(h: Harness) -> None:
    stats = h.server.app.stats
    if stats.open:
        stats.drained = trio.Event()  # set by the last session to end
        with trio.fail_after(3):
            await stats.drained.wait()


async def test_an_idle_connection_is_one_task_and_a_writer_lives_only_while_needed(
    start_server,
) -> None:
    h = await start_server(resume_window=0)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    h.grant("s2", "alice", Role.SITE_ADMIN)
    with trio.fail_after(20):
        base = 2  # the timer task of every session, the event-loop lag probe
        await _settle(h, base)
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(open_hub(h, hub_target("entries", "s1")))
                for _ in range(10)
            ]
            # A slow reader of another site: a small receive buffer it does not read for now.
            slow = await stack.enter_async_context(
                open_hub(h, hub_target("entries", "s2"), rcvbuf=4096)
            )
            await publish_ok(h, "entries", {"site_id": "s1"})  # written straight to the sockets
            for client in clients:
                assert (await client.next_event())["seq"] == 1
            await _settle(h, base + 11)  # eleven connections, eleven tasks
            # Far more than the slow socket takes: its session starts a writer.
            pad = "x" * 8000
            await publish_ok(h, "entries", [{"site_id": "s2", "pad": pad} for _ in range(40)])
            await _settle(h, base + 12)
            seqs = [(await slow.next_event())["seq"] for _ in range(40)]
            assert seqs == list(range(1, 41))
            await _settle(h, base + 11)  # the writer ended with its queue
    await _all_sessions_end(h)


def _bearer(h: Harness) -> tuple[str, str]:
    return ("Authorization", f"Bearer {h.token()}")
