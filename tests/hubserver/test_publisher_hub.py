"""The publisher hub, ``/v1/hub/publish``: ``Publish(hub, events)`` over a persistent connection.

Real servers on 127.0.0.1, real tokens, raw WebSocket clients (JSON and
MessagePack); Redis where the backpressure needs a backplane that can stall
(``CLIENT PAUSE``). Every test keeps a bystander subscriber and checks it
after the abuse: its next event is numbered next, so nothing the publisher
was refused reached anybody or consumed a seq.
"""

from __future__ import annotations

import itertools
import json
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio

from hubcore import encode_varint
from hubserver.app import HUB_SCOPE, PUBLISH_SCOPE
from hubserver.auth import DevKey
from hubserver.backplane import RedisBackplane
from hubserver.permissions import Role

from .conftest import Harness
from .helpers import (
    RS,
    HubClient,
    HubClosed,
    UpgradeRefused,
    WsMessage,
    bearer,
    bystander,
    hub_target,
    open_hub,
    open_ws,
)
from .redis_fixture import (  # noqa: F401 (fixtures, found by pytest)
    RedisServer,
    own_redis_server_fixture,
)
from .test_backplane_faults import redis_command

CAP = 10.0
PUBLISHER_PATH = "/v1/hub/publish"


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    return shared_dev_key


def new_site() -> str:
    return f"site-{uuid.uuid4().hex[:8]}"


class Publisher:
    """A publisher connection: invocations out, completions in."""

    def __init__(self, client: HubClient) -> None:
        self.client = client
        self._ids = itertools.count(1)

    async def send(self, target: str, *arguments: Any, blocking: bool = True) -> str | None:
        invocation_id = str(next(self._ids)) if blocking else None
        if self.client.is_binary:
            message = msgpack.packb([1, {}, invocation_id, target, list(arguments)])
            await self.client.ws.send_bytes(encode_varint(len(message)) + message)
        else:
            invocation: dict[str, Any] = {"type": 1, "target": target, "arguments": arguments}
            if invocation_id is not None:
                invocation["invocationId"] = invocation_id
            await self.client.ws.send_text(json.dumps(invocation) + RS)
        return invocation_id

    async def completion(self, invocation_id: str | None) -> dict[str, Any]:
        message = await self.client.next_message()
        assert not isinstance(message, HubClosed), f"closed instead of a completion: {message}"
        if isinstance(message, list):  # MessagePack: [3, headers, id, kind, value?]
            assert message[0] == 3, message
            kind = message[3]
            as_dict: dict[str, Any] = {"type": 3, "invocationId": message[2]}
            if kind == 1:
                as_dict["error"] = message[4]
            elif kind == 3:
                as_dict["result"] = message[4]
            message = as_dict
        assert message["type"] == 3 and message["invocationId"] == invocation_id, message
        return dict(message)

    async def call(self, target: str, *arguments: Any) -> dict[str, Any]:
        return await self.completion(await self.send(target, *arguments))


@asynccontextmanager
async def open_publisher(
    h: Harness, *, protocol: str = "json", token: str | None = None
) -> AsyncIterator[Publisher]:
    token = h.publisher_token() if token is None else token
    async with open_hub(h, PUBLISHER_PATH + "?", token=token, protocol=protocol) as client:
        yield Publisher(client)


@asynccontextmanager
async def subscriber(h: Harness, site: str) -> AsyncIterator[HubClient]:
    h.grant(site, "alice", Role.SITE_ADMIN)
    async with open_hub(h, hub_target("entries", site)) as client:
        yield client


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_publish_is_answered_with_ids_and_seqs_and_delivered(
    start_server: Any, protocol: str
) -> None:
    h: Harness = await start_server()
    site = new_site()
    with trio.fail_after(CAP):
        async with (
            bystander(h) as b,
            subscriber(h, site) as sub,
            open_publisher(h, protocol=protocol) as pub,
        ):
            one = await pub.call("Publish", "entries", {"site_id": site, "id": "a", "door": 1})
            assert one["result"] == {"accepted": 1, "ids": ["a"], "seqs": [1]}
            # The method name matches case-insensitively, as on ASP.NET Core.
            many = await pub.call(
                "publish", "entries", [{"site_id": site, "n": 2}, {"site_id": site, "n": 3}]
            )
            result = many["result"]
            assert result["accepted"] == 2 and result["seqs"] == [2, 3]
            events = [await sub.next_event() for _ in range(3)]
            assert [e["seq"] for e in events] == [1, 2, 3]
            assert [e["id"] for e in events] == ["a", *result["ids"]]
            assert events[0]["door"] == 1 and events[2]["n"] == 3
            await b.check()


async def test_a_retry_with_the_same_ids_is_answered_with_the_original_seqs(
    start_server: Any,
) -> None:
    h: Harness = await start_server()
    site = new_site()
    with trio.fail_after(CAP):
        async with subscriber(h, site) as sub, open_publisher(h) as pub:
            first = await pub.call("Publish", "entries", [{"site_id": site, "id": "x"}])
            again = await pub.call(
                "Publish", "entries", [{"site_id": site, "id": "x"}, {"site_id": site, "id": "y"}]
            )
            assert first["result"]["seqs"] == [1]
            assert again["result"] == {"accepted": 2, "ids": ["x", "y"], "seqs": [1, 2]}
            assert [(await sub.next_event())["id"] for _ in range(2)] == ["x", "y"]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (("entries", [{"site_id": "s"}, {"door": 1}]), "event 1: 'site_id' is required"),
        (("entries", [{"site_id": "s"}, 7]), "event 1: expected a JSON object"),
        (("entries", []), "events is an empty array"),
        (("doors", {"site_id": "s"}), "hub must be 'entries' or 'incidents'"),
        (("entries",), "Publish takes 2 arguments (hub, events), got 1"),
        (("entries", {"site_id": "s", "user_id": ""}), "'user_id' must be a non-empty string"),
        (("entries", {"site_id": "s", "deep": json.loads("[" * 40 + "]" * 40)}), "deeper"),
    ],
)
async def test_a_refused_call_gets_an_error_naming_the_bad_item_and_publishes_nothing(
    start_server: Any, arguments: tuple[Any, ...], expected: str
) -> None:
    h: Harness = await start_server()
    with trio.fail_after(CAP):
        async with bystander(h) as b, open_publisher(h) as pub:
            # A refused call in the bystander's site must take no seq of it.
            arguments = json.loads(json.dumps(arguments).replace('"s"', json.dumps(b.site)))
            reply = await pub.call("Publish", *arguments)
            assert "result" not in reply
            assert expected in reply["error"], reply
            await b.check()
            # The connection stays: the next call works.
            ok = await pub.call("Publish", "incidents", {"site_id": new_site()})
            assert ok["result"]["accepted"] == 1
            assert h.server.app.stats.publish_failed == 1


async def test_fire_and_forget_calls_are_published_and_their_errors_counted(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h: Harness = await start_server()
    site = new_site()
    with trio.fail_after(CAP):
        async with bystander(h) as b, subscriber(h, site) as sub, open_publisher(h) as pub:
            await pub.send("Publish", "entries", {"site_id": site, "id": "f1"}, blocking=False)
            await pub.send("Publish", "entries", {"no_site": 1}, blocking=False)
            await pub.send("Publish", "entries", {"site_id": site, "id": "f2"}, blocking=False)
            # Calls run in order: once this one is answered, the three before it ran.
            reply = await pub.call("Publish", "entries", {"site_id": site, "id": "f3"})
            assert reply["result"]["seqs"] == [3]
            assert [(await sub.next_event())["id"] for _ in range(3)] == ["f1", "f2", "f3"]
            assert h.server.app.stats.publish_failed == 1
            assert "a fire-and-forget Publish failed" in caplog.text
            assert "'site_id' is required" in caplog.text
            await b.check()


async def test_only_publish_is_a_method_of_the_publisher_hub(start_server: Any) -> None:
    h: Harness = await start_server()
    with trio.fail_after(CAP):
        async with bystander(h) as b, open_publisher(h) as pub:
            reply = await pub.call("Resume", 0)
            assert reply["error"].endswith("HubException: Method does not exist."), reply
            await b.check()


async def test_the_publisher_hub_needs_the_publish_scope(start_server: Any) -> None:
    h: Harness = await start_server()
    with trio.fail_after(CAP):
        for token, status in [
            (h.token("alice", (HUB_SCOPE,)), 403),
            ("not-a-token", 401),
        ]:
            with pytest.raises(UpgradeRefused) as refused:
                await open_ws(h.port, PUBLISHER_PATH, headers=[bearer(token)])
            assert refused.value.response.status == status
        with pytest.raises(UpgradeRefused) as refused:
            await open_ws(h.port, PUBLISHER_PATH)
        assert refused.value.response.status == 401
        # A publisher token is no subscriber's: it opens no site stream.
        h.grant("site-p", "backend", Role.SITE_ADMIN)
        with pytest.raises(UpgradeRefused) as refused:
            await open_ws(
                h.port, hub_target("entries", "site-p"), headers=[bearer(h.publisher_token())]
            )
        assert refused.value.response.status == 403
        async with open_publisher(h, token=h.token("both", (HUB_SCOPE, PUBLISH_SCOPE))) as pub:
            assert (await pub.call("Publish", "entries", {"site_id": "x"}))["result"]


async def test_a_publisher_stops_being_read_while_the_backplane_stalls(
    start_server: Any, own_redis_server: RedisServer
) -> None:
    """Backpressure: no unbounded queue. While Redis answers nothing, the server reads
    nothing more from the publisher (its sends block); then every call is answered,
    in order, and every event delivered once."""
    h: Harness = await start_server(backplane=own_redis_server.url)
    site = new_site()
    batch = [{"site_id": site, "pad": "x" * 2500} for _ in range(10)]  # ~25 KB a call
    calls = 400  # ~10 MB: more than the socket buffers of both sides hold
    total = calls * len(batch)
    with trio.fail_after(6 * CAP):
        async with bystander(h) as b, subscriber(h, site) as sub, open_publisher(h) as pub:
            sock = pub.client.ws.stream.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            assert (await pub.call("Publish", "entries", batch[:1]))["result"]["seqs"] == [1]
            assert (await sub.next_event())["seq"] == 1
            await redis_command(own_redis_server.url, "CLIENT", "PAUSE", 1500, "WRITE")
            sent = 0
            answered: list[int] = []
            delivered: list[int] = []

            async def send_calls() -> None:
                nonlocal sent
                for _ in range(calls):
                    await pub.send("Publish", "entries", batch)
                    sent += 1

            async def read_completions() -> None:
                for invocation in range(2, calls + 2):
                    answered.extend((await pub.completion(str(invocation)))["result"]["seqs"])

            async def read_events() -> None:
                while len(delivered) < total:
                    delivered.append((await sub.next_event())["seq"])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_calls)
                nursery.start_soon(read_completions)
                nursery.start_soon(read_events)
                await trio.sleep(1.0)
                # Stalled: the server took at most a read's worth beyond the call
                # waiting on Redis; the rest is stuck in the client.
                assert sent < calls // 2, f"{sent} of {calls} calls went out during the stall"
                assert not answered
            assert answered == list(range(2, 2 + total))
            assert delivered == list(range(2, 2 + total))
            await b.check()


async def test_a_call_as_large_as_a_publish_body_is_taken(start_server: Any) -> None:
    """Larger than SignalR's 32 KiB default: a publisher's batch is as large as a
    POST body may be (``max_publish_bytes``)."""
    h: Harness = await start_server(max_publish_bytes=300_000)
    site = new_site()
    batch = [{"site_id": site, "pad": "x" * 1000} for _ in range(250)]
    with trio.fail_after(CAP):
        async with subscriber(h, site) as sub, open_publisher(h) as pub:
            reply = await pub.call("Publish", "entries", batch)
            assert reply["result"]["accepted"] == 250
            assert (await sub.next_event())["seq"] == 1


async def test_a_drain_answers_the_call_in_progress_before_it_closes(
    start_server: Any, own_redis_server: RedisServer
) -> None:
    """A publisher cut off before its answer could not know what was accepted."""
    h: Harness = await start_server(backplane=own_redis_server.url)
    site = new_site()
    with trio.fail_after(CAP):
        async with open_publisher(h) as pub:
            await pub.call("Publish", "entries", {"site_id": site})
            await redis_command(own_redis_server.url, "CLIENT", "PAUSE", 800, "WRITE")
            invocation_id = await pub.send("Publish", "entries", {"site_id": site, "id": "d"})
            await trio.sleep(0.3)  # the call waits on Redis
            h.server.request_shutdown()
            reply = await pub.completion(invocation_id)
            assert reply["result"] == {"accepted": 1, "ids": ["d"], "seqs": [2]}
            closed = await pub.client.expect_close()
            assert closed.close is not None and closed.close.get("allowReconnect") is True
            # Accepted means stored: a subscriber resumes it after the restart.
            async with RedisBackplane(own_redis_server.url) as stored:
                history = await stored.history("entries", site, 1)
            assert [(e.event_id, e.seq) for e in history.events] == [("d", 2)]


async def test_a_call_the_backplane_cannot_answer_in_time_has_an_unknown_outcome(
    start_server: Any, own_redis_server: RedisServer
) -> None:
    """Past Redis's deadline (op_timeout, 2 s) the call may have been applied: the
    publisher is told so, the connection goes on, and the retry is answered."""
    h: Harness = await start_server(backplane=own_redis_server.url)
    site = new_site()
    with trio.fail_after(CAP):
        async with bystander(h) as b, open_publisher(h) as pub:
            await pub.call("Publish", "entries", {"site_id": site})
            await redis_command(own_redis_server.url, "CLIENT", "PAUSE", 2500, "WRITE")
            unknown = await pub.call("Publish", "entries", {"site_id": site, "id": "u"})
            assert "may or may not have been accepted" in unknown["error"], unknown
            await trio.sleep(0.8)  # Redis takes writes again
            # The call did reach Redis: its retry is answered with its seq.
            retry = await pub.call("Publish", "entries", {"site_id": site, "id": "u"})
            assert retry["result"]["seqs"] == [2]
            async with RedisBackplane(own_redis_server.url) as stored:
                history = await stored.history("entries", site, 0)
            assert [e.seq for e in history.events] == [1, 2]
            await b.check()


async def test_values_json_cannot_carry_are_refused_and_the_rest_written_exactly(
    start_server: Any,
) -> None:
    """MessagePack can carry NaN, which no JSON subscriber can be sent: refused, as
    the publish API refuses it. Integers past 64 bits, nulls and non-ASCII text
    go out exactly as the publisher sent them."""
    h: Harness = await start_server()
    site = new_site()
    with trio.fail_after(CAP):
        async with (
            bystander(h) as b,
            subscriber(h, site) as sub,
            open_publisher(h, protocol="messagepack") as pub,
        ):
            for bad in (float("nan"), float("inf")):
                reply = await pub.call("Publish", "entries", {"site_id": b.site, "v": bad})
                assert "event 0: cannot be encoded" in reply["error"], reply
                # Beside a true null, deep down: orjson writes both as null.
                nested = {"site_id": b.site, "none": None, "a": [1.5, {"b": [0.5, bad]}]}
                reply = await pub.call("Publish", "entries", nested)
                assert "event 0: cannot be encoded" in reply["error"], reply
            await b.check()
            event = {"site_id": site, "big": 2**64 - 1, "none": None, "name": "Zoë ✓"}
            assert (await pub.call("Publish", "entries", event))["result"]["accepted"] == 1
            received = await sub.next_event()
            assert {k: received[k] for k in event} == event
    async with open_publisher(h) as pub, subscriber(h, site) as sub:
        event = {"site_id": site, "huge": 2**70, "f": 0.1}
        assert (await pub.call("Publish", "entries", event))["result"]["seqs"] == [2]
        received = await sub.next_event()
        assert received["huge"] == 2**70 and received["f"] == 0.1


async def test_the_answers_to_calls_sent_together_come_back_together(start_server: Any) -> None:
    """A publisher that pipelines its calls gets their answers in one frame (one
    write), in order."""
    h: Harness = await start_server()
    site = new_site()
    with trio.fail_after(CAP):
        async with open_publisher(h) as pub:
            records = [
                {
                    "type": 1,
                    "invocationId": str(i),
                    "target": "Publish",
                    "arguments": ["entries", e],
                }
                for i, e in enumerate([{"site_id": site}] * 5, start=1)
            ]
            await pub.client.ws.send_text("".join(json.dumps(r) + RS for r in records))
            message = await pub.client.ws.receive()
            assert isinstance(message, WsMessage) and isinstance(message.data, str)
            answers = [json.loads(r) for r in message.data.split(RS) if r]
            answers = [a for a in answers if a["type"] == 3]
            assert [(a["invocationId"], a["result"]["seqs"]) for a in answers] == [
                (str(i), [i]) for i in range(1, 6)
            ]


async def test_a_drain_refuses_the_calls_not_yet_started_instead_of_publishing_them(
    start_server: Any, own_redis_server: RedisServer
) -> None:
    """A drain waits for the call under way only: the calls that came with it in the
    same read are answered "not accepted" at once. Published one by one while Redis
    hangs, each would take Redis's op_timeout (2 s), and the drain all of them."""
    h: Harness = await start_server(backplane=own_redis_server.url, drain_timeout=20.0)
    site = new_site()
    with trio.fail_after(3 * CAP):
        async with open_publisher(h) as pub:
            assert (await pub.call("Publish", "entries", {"site_id": site}))["result"]
            await redis_command(own_redis_server.url, "CLIENT", "PAUSE", 9000, "WRITE")
            ids = [str(n) for n in range(100, 105)]
            # Five calls in one frame: one read brings them all.
            await pub.client.ws.send_text(
                "".join(
                    json.dumps(
                        {
                            "type": 1,
                            "invocationId": i,
                            "target": "Publish",
                            "arguments": ["entries", {"site_id": site, "id": f"e{i}"}],
                        }
                    )
                    + RS
                    for i in ids
                )
            )
            await trio.sleep(0.3)  # the first waits on Redis
            h.server.request_shutdown()
            started = trio.current_time()
            first = await pub.completion(ids[0])
            assert "may or may not have been accepted" in first["error"], first
            for invocation_id in ids[1:]:
                refused = await pub.completion(invocation_id)
                assert "nothing was accepted" in refused["error"], refused
            closed = await pub.client.expect_close()
            elapsed = trio.current_time() - started
            assert closed.close is not None and closed.close.get("allowReconnect") is True
            assert elapsed < 3.5, elapsed  # one op_timeout, not five
