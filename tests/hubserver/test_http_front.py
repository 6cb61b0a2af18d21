"""Issue #10, the HTTP front as a connection object: logging, the per-connection token
memo, keep-alive decided without h11's send side.

Real server on 127.0.0.1, real tokens, raw sockets; a bystander subscriber
where a request could plausibly harm others.
"""

from __future__ import annotations

import base64
import json
import logging
import time

import pytest
import trio

from hubserver.__main__ import _config, _parser
from hubserver.app import HUB_SCOPE, PUBLISH_SCOPE
from hubserver.auth import DevKey
from hubserver.permissions import Role

from .conftest import Harness
from .helpers import (
    ResponseReader,
    bearer,
    build_request,
    bystander,
    exchange,
    hub_target,
    open_hub,
    open_tcp,
    publish,
)


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    return shared_dev_key


def publish_request(token: str, body: object, *, close: bool = False) -> bytes:
    return build_request(
        "POST",
        "/v1/events/entries",
        headers=[("Content-Type", "application/json"), bearer(token)],
        body=json.dumps(body).encode(),
        close=close,
    )


def http_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hubserver.http"]


# -- logging -----------------------------------------------------------------------


async def test_by_default_only_refusals_are_logged(
    start_server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hubserver.http")
    h: Harness = await start_server()
    with trio.fail_after(5):
        assert (await publish(h, "entries", {"site_id": "s1"})).status == 202
        assert (await exchange(h.port, build_request("GET", "/healthz"))).status == 200
        refused = await publish(h, "entries", {"site_id": "s1"}, token=h.token())
    assert refused.status == 403
    lines = http_lines(caplog)
    assert len(lines) == 1, lines
    assert lines[0].startswith("POST /v1/events/entries -> 403 ("), lines


async def test_the_access_log_logs_every_request_without_its_token(
    start_server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hubserver.http")
    h: Harness = await start_server(access_log=True)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    token = h.token()
    with trio.fail_after(5):
        assert (await publish(h, "entries", {"site_id": "s1"})).status == 202
        healthz = build_request("GET", f"/healthz?access_token={token}")
        assert (await exchange(h.port, healthz)).status == 200
        async with open_hub(h, hub_target("entries", "s1"), token=token, in_query=True):
            pass
    lines = http_lines(caplog)
    assert any(line.startswith("POST /v1/events/entries -> 202 (") for line in lines), lines
    assert any(line.startswith("GET /healthz?access_token=*** -> 200 (") for line in lines)
    assert any(line.startswith("GET /v1/hub/entries?") and " -> 101 (" in line for line in lines)
    assert not any(token.rsplit(".", 1)[1] in line for line in lines)


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], None, False),
        (["--access-log"], None, True),
        ([], "1", True),
    ],
    ids=["default", "flag", "env"],
)
def test_serve_takes_an_access_log_flag(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: str | None, expected: bool
) -> None:
    monkeypatch.delenv("HUBSERVER_ACCESS_LOG", raising=False)
    if env is not None:
        monkeypatch.setenv("HUBSERVER_ACCESS_LOG", env)
    assert _config(_parser().parse_args(["serve", *argv])).access_log is expected


# -- the token memo of a keep-alive connection ------------------------------------


async def test_a_token_that_expires_on_a_keep_alive_connection_gets_401_on_the_next_publish(
    start_server,
) -> None:
    h: Harness = await start_server()
    leeway = h.config.token_leeway
    # Valid for about one more second: exp is in the past, within the leeway.
    token = h.token("backend", (PUBLISH_SCOPE,), ttl=-(leeway - 1.0))
    with trio.fail_after(10):
        async with bystander(h) as b:
            stream = await open_tcp(h.port)
            async with stream:
                reader = ResponseReader(stream)
                await stream.send_all(publish_request(token, {"site_id": b.site}))
                first = await reader.read_response()
                assert first.status == 202, first
                await b.client.next_event()
                b.last_seq += 1
                await trio.sleep(max(0.0, json_exp(token) + leeway - time.time()) + 0.3)
                await stream.send_all(publish_request(token, {"site_id": b.site}))
                second = await reader.read_response()
            await b.check()  # the refused publish delivered nothing, numbered nothing
    assert second.status == 401, second
    assert second.json()["code"] == "unauthorized"
    assert second.headers.get("www-authenticate", "").startswith("Bearer")


def json_exp(token: str) -> float:
    """The ``exp`` of a token (read without verifying: the test minted it)."""
    payload = token.split(".")[1]
    return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])


async def test_a_token_checked_for_one_scope_is_checked_again_for_another(start_server) -> None:
    # The memo keeps a token with the scope it was checked for: a hub token that
    # negotiated on this connection must still be refused by the publish API.
    h: Harness = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    token = h.token("alice", (HUB_SCOPE,))
    negotiate = build_request(
        "POST",
        "/v1/hub/entries/negotiate?site_id=s1&negotiateVersion=1",
        headers=[bearer(token)],
        close=False,
    )
    with trio.fail_after(5):
        async with bystander(h) as b:
            stream = await open_tcp(h.port)
            async with stream:
                reader = ResponseReader(stream)
                await stream.send_all(negotiate)
                assert (await reader.read_response()).status == 200
                await stream.send_all(publish_request(token, {"site_id": b.site}))
                refused = await reader.read_response()
            await b.check()
    assert refused.status == 403, refused
    assert refused.json()["code"] == "forbidden"


# -- keep-alive, decided by the front --------------------------------------------------


async def test_pipelined_publishes_are_answered_in_order_on_one_connection(start_server) -> None:
    h: Harness = await start_server()
    token = h.publisher_token()
    with trio.fail_after(5):
        async with bystander(h) as b:
            stream = await open_tcp(h.port)
            async with stream:
                requests = [
                    publish_request(token, {"site_id": b.site, "id": f"p{i}"}) for i in range(3)
                ]
                await stream.send_all(b"".join(requests))
                reader = ResponseReader(stream)
                answers = [await reader.read_response() for _ in range(3)]
                events = [await b.client.next_event() for _ in range(3)]
                b.last_seq += 3
            await b.check()
    assert [a.status for a in answers] == [202, 202, 202], answers
    assert [a.json()["ids"] for a in answers] == [["p0"], ["p1"], ["p2"]]
    assert [e["id"] for e in events] == ["p0", "p1", "p2"]
    assert all("connection" not in a.headers for a in answers), answers


async def test_an_http_1_0_request_is_answered_and_the_connection_closed(start_server) -> None:
    h: Harness = await start_server()
    with trio.fail_after(5):
        stream = await open_tcp(h.port)
        async with stream:
            await stream.send_all(b"GET /healthz HTTP/1.0\r\n\r\n")
            reader = ResponseReader(stream)
            response = await reader.read_response()
            with pytest.raises(EOFError):
                await reader.read_head()
    assert response.status == 200 and response.body == b"ok\n"
    assert response.headers.get("connection") == "close"


async def test_a_request_asking_to_close_gets_connection_close(start_server) -> None:
    h: Harness = await start_server()
    with trio.fail_after(5):
        response = await exchange(h.port, build_request("GET", "/healthz", close=True))
    assert response.status == 200
    assert response.headers.get("connection") == "close"


async def test_a_refusal_that_leaves_the_body_unread_closes_the_connection(start_server) -> None:
    h: Harness = await start_server()
    with trio.fail_after(5):
        stream = await open_tcp(h.port)
        async with stream:
            # No token: refused before the body is read.
            await stream.send_all(
                build_request("POST", "/v1/events/entries", body=b"{}", close=False)
            )
            reader = ResponseReader(stream)
            response = await reader.read_response()
            with pytest.raises(EOFError):
                await reader.read_head()
    assert response.status == 401
    assert response.headers.get("connection") == "close"
    assert response.json()["code"] == "unauthorized"


@pytest.mark.parametrize(
    ("target", "status"),
    [("/v1/events/alarms", 404), ("/v1/events/entries", 405)],
    ids=["unknown-hub", "get"],
)
async def test_every_refusal_of_the_publish_api_is_json(
    start_server, target: str, status: int
) -> None:
    h: Harness = await start_server()
    with trio.fail_after(5):
        response = await exchange(h.port, build_request("GET", target))
    assert response.status == status
    assert set(response.json()) == {"code", "message"}
