"""Bad input gets a clear answer and harms no one else.

Each test connects a well-behaved bystander subscriber first (helpers.bystander),
sends something broken, checks the answer, then proves the bystander still gets
the next event, numbered next (so a refused publish consumed no numbers and
delivered nothing).
"""

from __future__ import annotations

import json

import msgpack
import pytest
import trio

from hubcore import HubLimits
from hubserver.auth import DevKey
from hubserver.permissions import Role

from .helpers import (
    CONNECTION_ERROR,
    HANDSHAKE_JSON,
    RS,
    HubClient,
    ResponseReader,
    WsClosed,
    bearer,
    build_request,
    bystander,
    exchange,
    hub_target,
    open_hub,
    open_tcp,
    publish,
    publish_ok,
    publish_raw,
    upgrade_headers,
)


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    """The run's shared key (see conftest): this module's tests need no key of their own."""
    return shared_dev_key


# -- the upgrade request -------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"hello there\r\n\r\n", 400),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400),  # TLS-ish bytes
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n", 431),
        (b"GET /v1/hub/entries?site_id=s1 HTTP/1.1\r\n" + b"X: y\r\n" * 50_000 + b"\r\n", 431),
        (b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
            431,
        ),
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # no Host
    ],
    ids=["words", "tls", "huge-header", "many-headers", "huge-target", "20k-header", "no-host"],
)
async def test_not_http_or_oversized_heads_get_an_error(
    start_server, raw: bytes, status: int
) -> None:
    h = await start_server()
    with trio.fail_after(5):
        async with bystander(h) as b:
            response = await exchange(h.port, raw)
            await b.check()
    assert response.status == status, response
    assert response.body  # a clear text, not an empty answer


async def test_silent_or_endless_garbage_is_dropped_after_request_timeout(start_server) -> None:
    h = await start_server(request_timeout=0.5)
    with trio.fail_after(5):
        async with bystander(h) as b:
            stream = await open_tcp(h.port)
            async with stream:
                await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and no more
                started = trio.current_time()
                assert await stream.receive_some(100) == b""  # closed, nothing to say
                assert trio.current_time() - started >= 0.4
            await b.check()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (upgrade_headers(key="c2hvcnQ="), 400),  # 5 bytes, not 16
        (upgrade_headers(key="not base64!!!!!!!!!!!!!=="), 400),
        (upgrade_headers(key=""), 400),
        ([h for h in upgrade_headers() if h[0] != "Sec-WebSocket-Key"], 400),
        ([h for h in upgrade_headers() if h[0] != "Upgrade"], 400),
        (
            [
                ("Connection", "keep-alive") if name == "Connection" else (name, value)
                for name, value in upgrade_headers()
            ],
            400,
        ),
        (upgrade_headers(version="8"), 426),
        ([h for h in upgrade_headers() if h[0] != "Sec-WebSocket-Version"], 426),
    ],
    ids=[
        "short-key",
        "non-base64-key",
        "empty-key",
        "no-key",
        "no-upgrade",
        "no-connection-upgrade",
        "version-8",
        "no-version",
    ],
)
async def test_bad_websocket_upgrades(
    start_server, headers: list[tuple[str, str]], status: int
) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    raw = build_request("GET", hub_target("entries", "s1"), headers=[*headers, bearer(h.token())])
    with trio.fail_after(5):
        async with bystander(h) as b:
            response = await exchange(h.port, raw)
            await b.check()
    assert response.status == status, response
    assert response.body
    if status == 426:
        # RFC 6455 §4.2.2: the answer MUST name the versions the server understands.
        assert response.headers.get("sec-websocket-version") == "13", response.headers


async def test_post_to_a_hub_without_a_connection_id_is_400(start_server) -> None:
    """POSTs send a negotiated connection's data (SSE, long polling): spec §7.2's answer."""
    h = await start_server()
    with trio.fail_after(5):
        response = await exchange(
            h.port, build_request("POST", hub_target("entries", "s1"), body=b"x")
        )
    assert response.status == 400 and b"Connection ID required" in response.body


@pytest.mark.parametrize(
    ("target", "statuses"),
    [
        ("/v1/hub/entries?site_id=%ZZ", (400, 403)),  # a literal '%ZZ' is at most a site id
        ("/v1/hub/entries?site_id=%FF", (400,)),  # percent-decodes to invalid UTF-8
        ("/v1/hub/entries?site_id=s1&site_id=s2", (400,)),
        ("/v1/hub/entries?site_id=s1&SITE_ID=s1", (400,)),
        ("/v1/hub/entries?site_id=s1&user_id=a&user_id=b", (400,)),
        ("/v1/hub/entries?site_id=s1\xff\xfe", (400,)),  # raw non-UTF-8 bytes in the target
        ("/v1/hub/entr\xe9es?site_id=s1", (400, 404)),
    ],
    ids=["pct-ZZ", "pct-FF", "dup-site", "dup-site-case", "dup-user", "raw-bytes", "raw-path"],
)
async def test_bad_query_strings(start_server, target: str, statuses: tuple[int, ...]) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    raw = build_request("GET", target, headers=[*upgrade_headers(), bearer(h.token())])
    with trio.fail_after(5):
        async with bystander(h) as b:
            response = await exchange(h.port, raw)
            await b.check()
    assert response.status in statuses, response
    assert response.body


# -- after the upgrade: the hub protocol ---------------------------------------------


async def _expect_error_close(client: HubClient) -> None:
    ended = await client.expect_close()
    assert ended.close == {"type": 7, "error": CONNECTION_ERROR, "allowReconnect": True}, ended
    assert ended.ws.code == 1000


@pytest.mark.parametrize(
    "garbage",
    [
        "not json" + RS,
        '{"type":"1"}' + RS,
        "[1,2,3]" + RS,
        '{"type":1,"target":5,"arguments":[]}' + RS,
        '{"type":1,"target":"x","arguments":{}}' + RS,
        '{"type":3,"invocationId":"1","result":1,"error":"x"}' + RS,
        RS,
        '{"type":6}' + RS + "{" + RS,
    ],
    ids=[
        "words",
        "type-str",
        "array",
        "target-int",
        "args-obj",
        "result-and-error",
        "empty",
        "2nd",
    ],
)
async def test_garbage_after_handshake_closes_with_error(start_server, garbage: str) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        async with bystander(h) as b:
            async with open_hub(h, hub_target("entries", "s1")) as client:
                await client.ws.send_text(garbage)
                await _expect_error_close(client)
            await b.check()
    assert h.server.app.stats.protocol_errors >= 1


@pytest.mark.parametrize(
    "garbage",
    [b"\x03\xc1\xc1\xc1", b"\x02\x92\x01", b"\x01\x07", b"\xff\xff\xff\xff\xff\x01"],
    ids=["never-used-byte", "short-invocation", "not-an-array", "varint-too-long"],
)
async def test_garbage_after_messagepack_handshake_closes_with_error(
    start_server, garbage: bytes
) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        async with bystander(h) as b:
            async with open_hub(h, hub_target("entries", "s1"), protocol="messagepack") as client:
                await client.ws.send_bytes(garbage)
                await _expect_error_close(client)
            await b.check()


@pytest.mark.parametrize("has_rs", [True, False], ids=["whole", "unterminated"])
async def test_oversized_hub_message_closes_with_error(start_server, has_rs: bool) -> None:
    h = await start_server(hub_limits=HubLimits(max_message_bytes=4096))
    h.grant("s1", "alice", Role.SITE_ADMIN)
    big = '{"type":1,"target":"x","arguments":["' + "a" * 5000 + '"]}' + (RS if has_rs else "")
    with trio.fail_after(5):
        async with bystander(h) as b:
            async with open_hub(h, hub_target("entries", "s1")) as client:
                # Below the limit is fine (fire-and-forget: no reply)...
                await client.ws.send_text(
                    '{"type":1,"target":"x","arguments":["' + "a" * 3000 + '"]}' + RS
                )
                # ...above it, even spread over several frames, is not.
                for start in range(0, len(big), 1000):
                    await client.ws.send_text(big[start : start + 1000])
                await _expect_error_close(client)
            await b.check()


async def test_oversized_messagepack_message_closes_with_error(start_server) -> None:
    h = await start_server(hub_limits=HubLimits(max_message_bytes=4096))
    h.grant("s1", "alice", Role.SITE_ADMIN)
    body = msgpack.packb([1, {}, None, "x", ["a" * 5000]])
    prefix = bytes([0x80 | (len(body) & 0x7F), len(body) >> 7])
    with trio.fail_after(5):
        async with bystander(h) as b:
            async with open_hub(h, hub_target("entries", "s1"), protocol="messagepack") as client:
                await client.ws.send_bytes(prefix + body[:100])  # the prefix alone says too big
                await _expect_error_close(client)
            await b.check()


@pytest.mark.parametrize(
    ("request_text", "error"),
    [
        ('{"protocol":"foo","version":1}' + RS, "The protocol 'foo' is not supported."),
        (
            '{"protocol":"json","version":99}' + RS,
            "The server does not support version 99 of the 'json' protocol.",
        ),
        ("{nope" + RS, "An unexpected error occurred during connection handshake."),
        ('{"version":1}' + RS, "An unexpected error occurred during connection handshake."),
        ('{"type":6}' + RS, "An unexpected error occurred during connection handshake."),
    ],
    ids=["unknown-protocol", "version-99", "bad-json", "no-protocol", "hub-message"],
)
async def test_handshake_errors(start_server, request_text: str, error: str) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        async with bystander(h) as b:
            async with open_hub(h, hub_target("entries", "s1"), handshake=False) as client:
                response = await client.handshake(request=request_text)
                end = await client.ws.receive()
            assert h.server.app.router.subscriber_count == 1  # only the bystander joined
            await b.check()
    assert response == {"error": error}
    assert isinstance(end, WsClosed) and end.code == 1000, end


async def test_oversized_handshake_is_canceled(start_server) -> None:
    h = await start_server(hub_limits=HubLimits(max_message_bytes=1024))
    h.grant("s1", "alice", Role.SITE_ADMIN)
    request_text = '{"protocol":"json","version":1,"pad":"' + "x" * 2000 + '"}' + RS
    with trio.fail_after(5):
        async with bystander(h) as b:
            async with open_hub(h, hub_target("entries", "s1"), handshake=False) as client:
                response = await client.handshake(request=request_text)
            await b.check()
    assert response == {"error": "Handshake was canceled."}


async def test_unknown_message_types_are_ignored(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        async with open_hub(h, hub_target("entries", "s1")) as client:
            await client.ws.send_text('{"type":99,"whatever":[1]}' + RS + '{"type":6}' + RS)
            (event_id,) = await publish_ok(h, "entries", {"site_id": "s1"})
            assert (await client.next_event())["id"] == event_id


async def test_handshake_and_messages_may_be_split_and_joined_freely(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    data = (
        HANDSHAKE_JSON
        + '{"type":6}'
        + RS
        + '{"type":1,"invocationId":"1","target":"Nope","arguments":[]}'
        + RS
    )
    with trio.fail_after(5):
        async with open_hub(h, hub_target("entries", "s1"), handshake=False) as client:
            for start in range(0, len(data), 7):
                await client.ws.send_bytes(data[start : start + 7].encode())
            assert await client.read_handshake_response() == {}
            reply = await client.next_message()
    assert reply["type"] == 3 and reply["invocationId"] == "1"


async def test_invalid_websocket_frames_end_only_that_connection(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        async with bystander(h) as b:
            async with open_hub(h, hub_target("entries", "s1")) as client:
                # An unmasked text frame: clients must mask (RFC 6455 §5.1).
                await client.ws.send_raw(b"\x81\x05hello")
                while not isinstance(await client.ws.receive(), WsClosed):
                    pass
            async with open_hub(h, hub_target("entries", "s1")) as client:
                # A text frame that is not UTF-8.
                await client.ws.send_raw(b"\x81\x82\x00\x00\x00\x00\xff\xfe")
                while not isinstance(await client.ws.receive(), WsClosed):
                    pass
            await b.check()


# -- the publish API -----------------------------------------------------------------

SITE = "bystander-site"  # a valid first item would reach the bystander if published


@pytest.mark.parametrize(
    ("body", "index"),
    [
        (b"{", None),
        (b'{"site_id":"' + SITE.encode() + b'","x":NaN}', None),
        (b'[{"site_id":"' + SITE.encode() + b'"},{"site_id":"s","x":Infinity}]', None),
        (b'{"site_id":"s","x":1e400}', None),
        (b'{"site_id":"s"} trailing', None),
        (b'{"site_id":"\xff"}', None),
        (b"", None),
        (b"[]", None),
        (b'"just a string"', 0),
        (b"null", 0),
        (b"[[]]", 0),
        (b'[{"site_id":"' + SITE.encode() + b'"}, 5]', 1),
        (b'[{"site_id":"' + SITE.encode() + b'"}, {}]', 1),
        (b'[{"site_id":"' + SITE.encode() + b'"}, {"site_id":""}]', 1),
        (b'[{"site_id":"' + SITE.encode() + b'"}, {"site_id":5}]', 1),
        (b'[{"site_id":"' + SITE.encode() + b'"}, {"site_id":null}]', 1),
        (b'[{"site_id":"' + SITE.encode() + b'"}, {"site_id":"s","user_id":""}]', 1),
        (b'[{"site_id":"' + SITE.encode() + b'"}, {"site_id":"s","user_id":7}]', 1),
        (b'[{"site_id":"' + SITE.encode() + b'"}, {"site_id":"s","id":5}]', 1),
        (b'[{"site_id":"' + SITE.encode() + b'"}, {"site_id":"s","id":""}]', 1),
        (b'[{"site_id":"' + SITE.encode() + b'"},{"site_id":"s"},{"site_id":["s"]}]', 2),
    ],
    ids=[
        "truncated",
        "nan",
        "infinity",
        "overflow",
        "trailing",
        "not-utf8",
        "empty-body",
        "empty-array",
        "string",
        "null",
        "nested-array",
        "number-item",
        "no-site",
        "empty-site",
        "int-site",
        "null-site",
        "empty-user",
        "int-user",
        "int-id",
        "empty-id",
        "list-site",
    ],
)
async def test_bad_publish_bodies_are_400_and_publish_nothing(
    start_server, body: bytes, index: int | None
) -> None:
    h = await start_server()
    with trio.fail_after(5):
        async with bystander(h, SITE) as b:
            await b.check()
            response = await publish_raw(h, "entries", body)
            await b.check()
    assert response.status == 400, response
    error = response.json()
    assert error["message"]
    if index is None:
        assert "index" not in error, error
    else:
        assert error["index"] == index, error


async def test_publish_body_size_limit(start_server) -> None:
    h = await start_server(max_publish_bytes=1000)
    pad = '{"site_id":"' + SITE + '","pad":"'
    exact = (pad + "x" * (1000 - len(pad) - 2) + '"}').encode()
    assert len(exact) == 1000
    over = exact[:-2] + b'x"}'
    with trio.fail_after(5):
        async with bystander(h, SITE) as b:
            assert (await publish_raw(h, "entries", exact)).status == 202
            b.last_seq += 1
            assert (await b.client.next_event())["seq"] == b.last_seq
            too_big = await publish_raw(h, "entries", over)
            await b.check()
    assert too_big.status == 413
    assert too_big.json()["code"]


async def test_publish_size_limit_is_checked_before_reading_the_body(start_server) -> None:
    # Content-Length says too much: the answer comes without the body being sent.
    h = await start_server()
    head = build_request(
        "POST",
        "/v1/events/entries",
        headers=[bearer(h.publisher_token()), ("Content-Length", str((1 << 20) + 1))],
    ).replace(b"Content-Length: 0\r\n", b"")
    with trio.fail_after(5):
        stream = await open_tcp(h.port)
        async with stream:
            await stream.send_all(head)
            response = await ResponseReader(stream).read_response()
    assert response.status == 413


async def test_publish_default_limit_is_one_mebibyte(start_server) -> None:
    h = await start_server()
    pad = '{"site_id":"' + SITE + '","pad":"'
    exact = (pad + "x" * ((1 << 20) - len(pad) - 2) + '"}').encode()
    with trio.fail_after(10):
        assert (await publish_raw(h, "entries", exact)).status == 202
        stream = await open_tcp(h.port)
        async with stream:
            head = build_request(
                "POST",
                "/v1/events/entries",
                headers=[bearer(h.publisher_token()), ("Content-Length", str(len(exact) + 1))],
            ).replace(b"Content-Length: 0\r\n", b"")
            await stream.send_all(head)
            assert (await ResponseReader(stream).read_response()).status == 413


async def test_chunked_publish_over_the_limit_is_413(start_server) -> None:
    h = await start_server(max_publish_bytes=100)
    chunk = b'{"site_id":"' + SITE.encode() + b'","pad":"' + b"x" * 100 + b'"}'
    raw = (
        b"POST /v1/events/entries HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        + f"Authorization: Bearer {h.publisher_token()}\r\n\r\n".encode()
        + f"{len(chunk):x}\r\n".encode()
        + chunk
        + b"\r\n0\r\n\r\n"
    )
    with trio.fail_after(5):
        async with bystander(h, SITE) as b:
            response = await exchange(h.port, raw)
            await b.check()
    assert response.status == 413


async def test_publish_with_get_is_405_and_unknown_hub_404(start_server) -> None:
    h = await start_server()
    with trio.fail_after(5):
        get = await exchange(
            h.port,
            build_request("GET", "/v1/events/entries", headers=[bearer(h.publisher_token())]),
        )
        unknown = await publish(h, "alarms", {"site_id": "s"})
    assert get.status == 405
    assert unknown.status == 404


async def test_lone_surrogate_in_an_event_is_refused_before_any_delivery(start_server) -> None:
    # "\ud800" is a valid JSON escape but no valid UTF-8: it cannot go out to a
    # MessagePack client. The request must fail as a whole, before delivery.
    h = await start_server()
    h.grant(SITE, "carol", Role.SITE_ADMIN)
    with trio.fail_after(5):
        async with (
            open_hub(
                h, hub_target("entries", SITE), token=h.token("carol"), protocol="messagepack"
            ) as first,
            bystander(h, SITE) as b,
        ):
            body = (
                b'[{"site_id":"' + SITE.encode() + b'","n":1},'
                b'{"site_id":"' + SITE.encode() + b'","note":"\\ud800"},'
                b'{"site_id":"' + SITE.encode() + b'","n":3}]'
            )
            response = await publish_raw(h, "entries", body)
            assert response.status == 400, response
            assert response.json().get("index") == 1
            await b.check()  # seq 1: nothing of the refused batch went out
            assert (await first.next_event())["seq"] == 1


async def test_a_refused_publish_keeps_the_connection_usable(start_server) -> None:
    # A 400 on a keep-alive connection answers with a JSON body; the next request works.
    h = await start_server()
    headers = [bearer(h.publisher_token()), ("Content-Type", "application/json")]
    with trio.fail_after(5):
        stream = await open_tcp(h.port)
        async with stream:
            reader = ResponseReader(stream)
            await stream.send_all(
                build_request(
                    "POST", "/v1/events/entries", headers=headers, body=b"[]", close=False
                )
            )
            first = await reader.read_response()
            body = json.dumps({"site_id": "s"}).encode()
            await stream.send_all(
                build_request("POST", "/v1/events/entries", headers=headers, body=body, close=False)
            )
            second = await reader.read_response()
    assert (first.status, second.status) == (400, 202)
