"""Streams end to end: what subscribers receive, numbering, ordering, publish results, health.

Every test runs a real server on 127.0.0.1 and talks to it over real sockets
(helpers.py); events go in through the publish API and come out as
``ReceiveMessage`` invocations.
"""

from __future__ import annotations

import json

import msgpack
import pytest
import trio

from hubserver.auth import DevKey
from hubserver.permissions import Role

from .conftest import Harness
from .helpers import (
    RS,
    HttpResponse,
    ResponseReader,
    UpgradeRefused,
    build_request,
    bystander,
    http_request,
    hub_target,
    open_hub,
    open_tcp,
    publish,
    publish_ok,
    publish_raw,
)


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    """The run's shared key (see conftest): this module's tests need no key of their own."""
    return shared_dev_key


async def test_site_stream_gets_every_entry_of_its_site_only(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with open_hub(h, hub_target("entries", "s1")) as client:
            ids = await publish_ok(
                h,
                "entries",
                [
                    {"site_id": "s1", "lock_id": "L1"},
                    {"site_id": "s2", "lock_id": "other site"},
                    {"site_id": "s1", "user_id": "u1", "lock_id": "L2"},
                ],
            )
            await publish_ok(h, "incidents", {"site_id": "s1", "incident_type": "tamper"})
            await publish_ok(h, "entries", {"site_id": "s1", "lock_id": "L3"})
            events = [await client.next_event() for _ in range(3)]
    assert [e["lock_id"] for e in events] == ["L1", "L2", "L3"]
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert events[0]["id"] == ids[0] and events[1]["id"] == ids[2]


async def test_event_is_compact_json_with_fields_untouched(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    entry = {
        "site_id": "s1",
        "user_id": None,
        "lock_name": "Front door \u00e9\u4e2d\U0001f512",
        "offline": False,
        "big": 123456789012345678901234567890,
        "ratio": 0.1,
        "nested": {"a": [1, 2, {"b": None}], "empty": {}},
        "seq": 999,  # the publisher's seq is replaced by the server's
    }
    with trio.fail_after(10):
        async with open_hub(h, hub_target("entries", "s1")) as client:
            response = await publish(h, "entries", entry)
            message = await client.next_message()
    assert response.status == 202
    (event_id,) = response.json()["ids"]
    assert message == {
        "type": 1,
        "target": "ReceiveMessage",
        "arguments": [message["arguments"][0]],
    }
    (text,) = message["arguments"]
    expected = {**entry, "id": event_id, "seq": 1}
    assert json.loads(text) == expected
    # Compact, with the non-ASCII characters as they were (no \u escapes needed).
    assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
    assert "\u4e2d" in text


async def test_publisher_id_is_kept_and_returned(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with open_hub(h, hub_target("entries", "s1")) as client:
            ids = await publish_ok(
                h, "entries", [{"site_id": "s1", "id": "mine-1"}, {"site_id": "s1"}]
            )
            first, second = await client.next_event(), await client.next_event()
    assert ids[0] == "mine-1" and first["id"] == "mine-1"
    assert second["id"] == ids[1] and ids[1] and ids[1] != "mine-1"


async def test_user_stream_gets_only_that_users_events(start_server) -> None:
    h = await start_server()
    h.grant("s1", "u1", Role.SITE_USER)
    with trio.fail_after(10):
        async with open_hub(h, hub_target("entries", "s1", "u1"), token=h.token("u1")) as client:
            await publish_ok(
                h,
                "entries",
                [
                    {"site_id": "s1", "user_id": "u1", "n": 1},
                    {"site_id": "s1", "user_id": "u2", "n": 2},
                    {"site_id": "s1", "n": 3},
                    {"site_id": "s1", "user_id": None, "n": 4},
                    {"site_id": "s2", "user_id": "u1", "n": 5},
                    {"site_id": "s1", "user_id": "u1", "n": 6},
                ],
            )
            await publish_ok(h, "incidents", {"site_id": "s1", "user_id": "u1", "n": 7})
            await publish_ok(h, "entries", {"site_id": "s1", "user_id": "u1", "n": 8})
            events = [await client.next_event() for _ in range(3)]
    assert [(e["n"], e["seq"]) for e in events] == [(1, 1), (6, 5), (8, 6)]


async def test_incidents_hub_is_separate_and_numbered_separately(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_SUPER_USER)
    with trio.fail_after(10):
        async with (
            open_hub(h, hub_target("incidents", "s1")) as incidents,
            open_hub(h, hub_target("incidents", "s1", "u1")) as user_incidents,
            open_hub(h, hub_target("entries", "s1")) as entries,
        ):
            await publish_ok(h, "entries", [{"site_id": "s1"}, {"site_id": "s1"}])
            await publish_ok(h, "incidents", {"site_id": "s1", "state": "raised"})
            await publish_ok(h, "incidents", {"site_id": "s2", "state": "raised"})
            await publish_ok(h, "incidents", {"site_id": "s1", "user_id": "u1", "state": "cleared"})
            got_entries = [await entries.next_event() for _ in range(2)]
            got_incidents = [await incidents.next_event() for _ in range(2)]
            got_user = await user_incidents.next_event()
            # The entries stream saw no incident: its next event is the next entry.
            await publish_ok(h, "entries", {"site_id": "s1", "last": True})
            assert (await entries.next_event())["seq"] == 3
    assert [e["seq"] for e in got_entries] == [1, 2]
    assert [(e["seq"], e["state"]) for e in got_incidents] == [(1, "raised"), (2, "cleared")]
    assert got_user["seq"] == 2 and got_user["user_id"] == "u1"


async def test_seq_is_per_site_and_survives_no_subscriber(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        await publish_ok(h, "entries", [{"site_id": "s1"}, {"site_id": "s2"}, {"site_id": "s1"}])
        async with open_hub(h, hub_target("entries", "s1")) as client:
            await publish_ok(h, "entries", [{"site_id": "s2"}, {"site_id": "s1"}])
            event = await client.next_event()
    assert event["seq"] == 3  # s1 had 1 and 2 before anyone listened


async def test_batch_of_500_arrives_in_order_and_user_stream_sees_its_subset(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    batch = [
        {"site_id": "s1", "n": n, **({"user_id": "u1"} if n % 3 == 0 else {})} for n in range(500)
    ]
    with trio.fail_after(20):
        async with (
            open_hub(h, hub_target("entries", "s1")) as site,
            open_hub(h, hub_target("entries", "s1", "u1")) as user,
        ):
            ids = await publish_ok(h, "entries", batch)
            site_events = [await site.next_event() for _ in range(500)]
            user_events = [await user.next_event() for _ in range(len(batch[::3]))]
            # Nothing else is queued for the user stream: the next thing is a new event.
            await publish_ok(h, "entries", {"site_id": "s1", "user_id": "u1", "n": "after"})
            assert (await user.next_event())["n"] == "after"
    assert [e["seq"] for e in site_events] == list(range(1, 501))
    assert [e["n"] for e in site_events] == list(range(500))
    assert [e["id"] for e in site_events] == ids
    assert len(set(ids)) == 500
    expected_user = [e for e in site_events if e["n"] % 3 == 0]
    assert user_events == expected_user


async def test_publish_order_across_requests_is_delivery_order(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with open_hub(h, hub_target("entries", "s1")) as client:
            for n in range(20):
                await publish_ok(h, "entries", {"site_id": "s1", "n": n})
            events = [await client.next_event() for _ in range(20)]
    assert [(e["n"], e["seq"]) for e in events] == [(n, n + 1) for n in range(20)]


async def test_many_subscribers_of_one_site_all_receive(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with (
            open_hub(h, hub_target("entries", "s1")) as a,
            open_hub(h, hub_target("entries", "s1"), in_query=True) as b,
            open_hub(h, hub_target("entries", "s1"), protocol="messagepack") as c,
        ):
            (event_id,) = await publish_ok(h, "entries", {"site_id": "s1"})
            for client in (a, b, c):
                assert (await client.next_event())["id"] == event_id


# -- MessagePack ---------------------------------------------------------------------


@pytest.mark.parametrize("as_binary", [False, True], ids=["handshake-in-text", "in-binary"])
async def test_messagepack_events_arrive_in_binary_frames(start_server, as_binary: bool) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with open_hub(
            h, hub_target("entries", "s1"), protocol="messagepack", handshake=False
        ) as client:
            assert await client.handshake(as_binary=as_binary) == {}
            assert client.opcodes == ["binary"]  # spec §2: frame type set before the response
            await client.ws.send_bytes(b"\x02\x91\x06")  # a client Ping is fine
            (event_id,) = await publish_ok(h, "entries", {"site_id": "s1", "lock_id": "L"})
            message = await client.ws.receive()
    assert not message.is_text  # type: ignore[union-attr]
    data = message.data  # type: ignore[union-attr]
    assert isinstance(data, bytes)
    # VarInt length prefix, then [1, {}, None, "ReceiveMessage", [text], []].
    length = data[0]
    assert length < 0x80 and len(data) == 1 + length
    decoded = msgpack.unpackb(data[1:], raw=False)
    assert decoded[:4] == [1, {}, None, "ReceiveMessage"] and decoded[5:] == [[]]
    (text,) = decoded[4]
    assert json.loads(text) == {"site_id": "s1", "lock_id": "L", "id": event_id, "seq": 1}


async def test_messagepack_large_event_uses_multibyte_varint(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with open_hub(h, hub_target("entries", "s1"), protocol="messagepack") as client:
            await publish_ok(h, "entries", {"site_id": "s1", "pad": "x" * 20000})
            event = await client.next_event()
    assert event["pad"] == "x" * 20000 and event["seq"] == 1


# -- hub methods ---------------------------------------------------------------------

METHOD_MISSING = (
    "Failed to invoke '{}' due to an error on the server. HubException: Method does not exist."
)


async def test_unknown_method_with_id_gets_error_completion_and_stays_open(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with open_hub(h, hub_target("entries", "s1")) as client:
            # JS client key order (type last); no reply at all without an invocationId.
            await client.ws.send_text(
                '{"target":"SendMessage","arguments":["x"],"type":1}'
                + RS
                + '{"target":"Nope","arguments":[1,2],"invocationId":"7","type":1}'
                + RS
            )
            reply = await client.next_message()
            await client.ws.send_text(
                '{"type":4,"invocationId":"8","target":"Counter","arguments":[]}' + RS
            )
            stream_reply = await client.next_message()
            (event_id,) = await publish_ok(h, "entries", {"site_id": "s1"})
            assert (await client.next_event())["id"] == event_id
    assert reply == {"type": 3, "invocationId": "7", "error": METHOD_MISSING.format("Nope")}
    assert stream_reply == {
        "type": 3,
        "invocationId": "8",
        "error": METHOD_MISSING.format("Counter"),
    }


async def test_unknown_method_over_messagepack(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    fire_and_forget = msgpack.packb([1, {}, None, "Nope", []])
    with_id = msgpack.packb([1, {}, "1", "Nope", [42]])
    with trio.fail_after(10):
        async with open_hub(h, hub_target("entries", "s1"), protocol="messagepack") as client:
            await client.ws.send_bytes(
                bytes([len(fire_and_forget)]) + fire_and_forget + bytes([len(with_id)]) + with_id
            )
            reply = await client.next_message()
    assert reply == [3, {}, "1", 1, METHOD_MISSING.format("Nope")]


async def test_client_close_is_answered_and_connection_ends(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with open_hub(h, hub_target("entries", "s1")) as client:
            await client.ws.send_text('{"type":7}' + RS)
            ended = await client.expect_close()
    assert ended.close == {"type": 7}
    assert ended.ws.code == 1000


# -- health --------------------------------------------------------------------------


async def test_health_and_readiness(start_server) -> None:
    h = await start_server()
    with trio.fail_after(5):
        health = await http_request(h.port, "GET", "/healthz")
        ready = await http_request(h.port, "GET", "/readyz")
        missing = await http_request(h.port, "GET", "/nope")
    assert (health.status, ready.status, missing.status) == (200, 200, 404)


async def test_keep_alive_http_connection_serves_several_requests(start_server) -> None:
    h = await start_server()
    with trio.fail_after(5):
        stream = await open_tcp(h.port)
        async with stream:
            reader = ResponseReader(stream)
            for target in ("/healthz", "/readyz", "/healthz"):
                await stream.send_all(build_request("GET", target, close=False))
                assert (await reader.read_response()).status == 200


async def _negotiate(h: Harness, query: str, token: str | None = None) -> HttpResponse:
    return await http_request(
        h.port,
        "POST",
        f"/v1/hub/entries/negotiate?{query}",
        headers=[("Authorization", f"Bearer {token or h.token()}")],
    )


async def test_negotiate_offers_every_transport_and_its_token_opens_the_stream_once(
    start_server,
) -> None:
    # What clients without skipNegotiation (.NET/Java defaults, pysignalr) do first.
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        response = await _negotiate(h, "site_id=s1&negotiateVersion=1")
        assert response.status == 200
        body = response.json()
        assert body["negotiateVersion"] == 1
        assert body["availableTransports"] == [
            {"transport": "WebSockets", "transferFormats": ["Text", "Binary"]},
            {"transport": "ServerSentEvents", "transferFormats": ["Text"]},
            {"transport": "LongPolling", "transferFormats": ["Text", "Binary"]},
        ]
        assert "useStatefulReconnect" not in body
        token = body["connectionToken"]
        assert len(token) == 22 and token != body["connectionId"]
        target = f"{hub_target('entries', 's1')}&id={token}"
        async with open_hub(h, target) as client:
            await publish_ok(h, "entries", {"site_id": "s1"})
            assert (await client.next_event())["seq"] == 1
        # A connection token opens one WebSocket only.
        with pytest.raises(UpgradeRefused) as refused:
            async with open_hub(h, target):
                pass
        assert refused.value.response.status == 404


async def test_negotiate_tokens_are_bound_to_stream_and_subject(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    h.grant("s2", "alice", Role.SITE_ADMIN)
    h.grant("s1", "bob", Role.SITE_ADMIN)
    with trio.fail_after(10):
        token = (await _negotiate(h, "site_id=s1&negotiateVersion=1")).json()["connectionToken"]
        for target, subject in [
            (f"{hub_target('entries', 's2')}&id={token}", "alice"),  # another site
            (f"{hub_target('entries', 's1')}&id={token}", "bob"),  # another subject
            (f"{hub_target('entries', 's1')}&id=made-up", "alice"),  # unknown
        ]:
            with pytest.raises(UpgradeRefused) as refused:
                async with open_hub(h, target, token=h.token(subject)):
                    pass
            assert refused.value.response.status == 404


async def test_negotiate_checks_auth_and_version(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        assert (await _negotiate(h, "site_id=s1", token="nope")).status == 401
        assert (await _negotiate(h, "site_id=s1", token=h.token("mallory"))).status == 403
        version0 = (await _negotiate(h, "site_id=s1")).json()
        assert version0["negotiateVersion"] == 0 and "connectionToken" not in version0
        bad = (await _negotiate(h, "site_id=s1&negotiateVersion=x")).json()
        assert bad == {"error": "The client requested a non-integer protocol version."}
        get = await http_request(h.port, "GET", "/v1/hub/entries/negotiate?site_id=s1")
        assert get.status == 405


async def test_publish_then_subscriber_leaves_then_publish_still_works(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with bystander(h) as b:
            async with open_hub(h, hub_target("entries", "s1")) as gone:
                await publish_ok(h, "entries", {"site_id": "s1"})
                assert (await gone.next_event())["seq"] == 1
            # The stream was dropped without a close frame; publishing goes on.
            await publish_ok(h, "entries", {"site_id": "s1"})
            await b.check()


async def test_surrogate_pairs_and_non_ascii_reach_both_protocols(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    body = b'{"site_id":"s1","note":"\\ud83d\\udd12 caf\xc3\xa9"}'  # escaped pair, raw UTF-8
    with trio.fail_after(10):
        async with (
            open_hub(h, hub_target("entries", "s1")) as text_client,
            open_hub(h, hub_target("entries", "s1"), protocol="messagepack") as binary_client,
        ):
            response = await publish_raw(h, "entries", body)
            assert response.status == 202, response
            for client in (text_client, binary_client):
                assert (await client.next_event())["note"] == "\U0001f512 caf\u00e9"
