"""Issue #11, tokens where browsers put them, and nowhere in the logs.

The official JavaScript client sends ``Authorization: Bearer`` wherever it
can set a header (negotiate, and the POSTs, polls and DELETE of SSE and long
polling) and the ``access_token`` query parameter where a browser API cannot
(``WebSocket``, ``EventSource``). Every hub endpoint takes either, as does the
publish API; neither may ever reach a log line (text or JSON, with its context
fields), an exception or an answer.

Endpoint tables below name each (method, target) a token opens; a transport
that adds endpoints adds rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import pytest
import trio

from hubserver.auth import DevKey
from hubserver.logs import JsonFormatter
from hubserver.permissions import Role

from .conftest import Harness
from .helpers import (
    HubClient,
    UpgradeRefused,
    WsClosed,
    bearer,
    build_request,
    bystander,
    exchange,
    hub_target,
    open_ws,
    publish_ok,
)

PAGE = "http://127.0.0.1:8123"


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    return shared_dev_key


def place(target: str, token: str, where: str) -> tuple[str, list[tuple[str, str]]]:
    """The target and headers that carry ``token`` ``where`` ("header" or "query")."""
    if where == "header":
        return target, [bearer(token)]
    separator = "&" if "?" in target else "?"
    return f"{target}{separator}access_token={token}", []


async def negotiate(h: Harness, target: str, token: str, where: str) -> dict[str, str]:
    target, headers = place(target, token, where)
    response = await exchange(h.port, build_request("POST", target, headers=headers))
    assert response.status == 200, response
    body: dict[str, str] = response.json()
    return body


async def subscriber_streams(h: Harness, hub_path: str, token: str, where: str) -> None:
    """Upgrade (after negotiate, when asked) and receive one published event."""
    target, headers = place(hub_path, token, where)
    ws = await open_ws(h.port, target, headers=headers)
    client = HubClient(ws, "json")
    try:
        assert await client.handshake() == {}
        (event_id,) = await publish_ok(h, "entries", {"site_id": "s1"})
        assert (await client.next_event())["id"] == event_id
    finally:
        await ws.aclose()


async def publisher_opens(h: Harness, hub_path: str, token: str, where: str) -> None:
    target, headers = place(hub_path, token, where)
    ws = await open_ws(h.port, target, headers=headers)
    try:
        assert await HubClient(ws, "json").handshake() == {}
    finally:
        await ws.aclose()


Open = Callable[[Harness, str, str, str], Awaitable[None]]
HUBS: dict[str, tuple[str, bool, Open]] = {
    # name: (the hub's URL, a subscriber's?, what proves the connection works)
    "entries": (hub_target("entries", "s1"), True, subscriber_streams),
    "publish": ("/v1/hub/publish", False, publisher_opens),
}


@pytest.mark.parametrize("hub", list(HUBS))
@pytest.mark.parametrize("negotiates", [False, True], ids=["skip-negotiation", "negotiate"])
@pytest.mark.parametrize("where", ["header", "query"])
async def test_every_hub_endpoint_takes_the_token_in_the_header_or_the_query(
    start_server, hub: str, negotiates: bool, where: str
) -> None:
    h: Harness = await start_server(cors_origins=(PAGE,))
    h.grant("s1", "alice", Role.SITE_ADMIN)
    url, is_subscriber, opens = HUBS[hub]
    token = h.token() if is_subscriber else h.publisher_token()
    with trio.fail_after(5):
        if negotiates:
            path, _, query = url.partition("?")
            negotiated = await negotiate(
                h, f"{path}/negotiate?negotiateVersion=1&{query}".rstrip("&"), token, where
            )
            url = f"{url}{'&' if '?' in url else '?'}id={negotiated['connectionToken']}"
        await opens(h, url, token, where)


@pytest.mark.parametrize("where", ["header", "query"])
async def test_the_publish_api_takes_the_token_in_the_header_or_the_query(
    start_server, where: str
) -> None:
    h: Harness = await start_server()
    target, headers = place("/v1/events/entries", h.publisher_token(), where)
    body = json.dumps({"site_id": "s1"}).encode()
    with trio.fail_after(5):
        response = await exchange(h.port, build_request("POST", target, headers=headers, body=body))
    assert response.status == 202, response


# -- never logged --------------------------------------------------------------------


async def test_no_token_reaches_a_log_line_an_exception_or_an_answer(
    start_server, caplog: pytest.LogCaptureFixture
) -> None:
    """Everything logged, at DEBUG with the access log on and CORS on, over every endpoint.

    Tokens travel in the query and in the header, are accepted and refused for
    each reason, on preflights, negotiate, upgrades (a foreign origin's
    included), publishes, and a request that misses its deadline.
    """
    caplog.set_level(logging.DEBUG)
    h: Harness = await start_server(
        cors_origins=(PAGE,), access_log=True, request_timeout=0.5, token_leeway=0
    )
    h.grant("s1", "alice", Role.SITE_ADMIN)
    good = h.token()
    tokens = {
        "good": good,
        "no scope": h.token(scopes=()),
        "expired": h.token(ttl=-300),
        "no rights": h.token("mallory"),
        "publisher": h.publisher_token(),
        "forged": good.rsplit(".", 1)[0] + ".c2lnbmF0dXJlLWZvcmdlZC1ieS1tYWxsb3J5",
    }
    answers: list[bytes] = []

    async def ask(
        method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""
    ) -> None:
        response = await exchange(
            h.port, build_request(method, target, headers=[("Origin", PAGE), *headers], body=body)
        )
        answers.append(response.body + json.dumps(response.headers).encode())

    site = hub_target("entries", "s1")
    negotiate_url = "/v1/hub/entries/negotiate?site_id=s1&negotiateVersion=1"
    with trio.fail_after(20):
        async with bystander(h) as b:
            for token in tokens.values():
                for where in ("header", "query"):
                    for method, url in (
                        ("OPTIONS", negotiate_url),
                        ("POST", negotiate_url),
                        ("POST", "/v1/hub/nope/negotiate"),
                        ("GET", site),  # not an upgrade: 400 after the token
                        ("POST", "/v1/events/entries"),
                        ("GET", f"/healthz?x=1&ACCESS_TOKEN={token}&y=2"),
                    ):
                        target, headers = place(url, token, where)
                        if method == "OPTIONS":
                            headers.append(("Access-Control-Request-Method", "POST"))
                        await ask(method, target, headers, b'{"site_id":"s1"}')
                    target, headers = place(site, token, where)
                    for origin in (PAGE, "http://elsewhere.example"):
                        try:
                            ws = await open_ws(
                                h.port, target, headers=[("Origin", origin), *headers]
                            )
                        except UpgradeRefused as refused:
                            answers.append(refused.response.body)
                            continue
                        # Open: then break the protocol, so the session logs its end.
                        await ws.send_text("garbage\x1e")
                        while not isinstance(await ws.receive(), WsClosed):
                            pass
                        await ws.aclose()
                # A publish whose body never comes: 408 at the deadline, logged.
                target, headers = place("/v1/events/entries", token, "query")
                raw = build_request(
                    "POST", target, headers=[*headers, ("Content-Length", "10")]
                ).replace(b"Content-Length: 0\r\n", b"")
                answers.append((await exchange(h.port, raw)).body)
            await b.check()
    assert caplog.records, "nothing was logged: the test would prove nothing"
    # Both formats: the text lines, and the JSON lines with every context field.
    as_json = [JsonFormatter().format(record) for record in caplog.records]
    logged = [
        caplog.text,
        *(record.getMessage() for record in caplog.records),
        *(record.exc_text or "" for record in caplog.records),
        *as_json,
    ]
    assert any(" -> 101 (" in line for line in logged), "no upgrade was logged"
    assert any("access_token=***" in line for line in logged), "no redacted URL was logged"
    paths = [json.loads(line).get("path", "") for line in as_json]
    assert any("access_token=***" in path for path in paths), "no redacted path field"
    for name, token in tokens.items():
        signature = token.rsplit(".", 1)[1]
        for text in logged:
            assert signature not in text, f"the {name} token was logged: {text[:300]}"
        for answer in answers:
            assert signature.encode() not in answer, f"the {name} token was answered"
