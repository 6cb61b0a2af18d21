"""Issue #11, CORS for browsers (``--cors-origin``) and the Origin check of WebSocket upgrades.

Real server on 127.0.0.1, raw requests shaped as Chromium sends them (the
preflight, then the request with ``Origin``), answers read header by header:
what matters here is which headers are there, once, or not at all. The real
browser is in ``tests/e2e/test_browser.py``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

import pytest
import trio

from hubserver.__main__ import _config, _parser
from hubserver.app import PUBLISH_SCOPE
from hubserver.auth import DevKey
from hubserver.config import ConfigError, ServerConfig
from hubserver.http._cors import ALLOWED_HEADERS, PREFLIGHT_MAX_AGE_SECONDS
from hubserver.permissions import Role

from .conftest import Harness
from .helpers import (
    GOOD_KEY,
    ResponseReader,
    UpgradeRefused,
    bearer,
    build_request,
    bystander,
    hub_target,
    open_tcp,
    open_ws,
    publish_ok,
    upgrade_headers,
)

PAGE = "http://127.0.0.1:8123"
OTHER_PAGE = "http://127.0.0.1:8124"
NEGOTIATE = "/v1/hub/entries/negotiate?site_id=s1&negotiateVersion=1"
#: What the official JavaScript client's preflight asks for (Chromium lower-cases and sorts).
CLIENT_HEADERS = "authorization,x-requested-with,x-signalr-user-agent"


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    return shared_dev_key


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]  # in order, names lower-cased, repeats kept
    body: bytes

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def one(self, name: str) -> str:
        values = self.all(name)
        assert len(values) == 1, f"{name}: {values} in {self.headers}"
        return values[0]

    @property
    def cors(self) -> dict[str, str]:
        """The CORS answer headers (each must appear at most once)."""
        names = {key for key, _ in self.headers if key.startswith("access-control-")}
        return {name: self.one(name) for name in names}


async def send(port: int, raw: bytes) -> RawResponse:
    """One request on a new connection; the answer with every header line kept."""
    stream = await open_tcp(port)
    async with stream:
        await stream.send_all(raw)
        reader = ResponseReader(stream)
        while (end := reader.buffer.find(b"\r\n\r\n")) < 0:
            await reader._fill()
        head = bytes(reader.buffer[:end]).decode("latin-1")
        del reader.buffer[: end + 4]
        status_line, *lines = head.split("\r\n")
        headers = [
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(":") for line in lines)
        ]
        length = [int(value) for name, value in headers if name == "content-length"]
        body = await reader.read_exactly(length[0]) if length else b""
    return RawResponse(int(status_line.split(" ")[1]), headers, body)


def preflight(
    target: str, origin: str, method: str = "POST", headers: str = CLIENT_HEADERS
) -> bytes:
    return build_request(
        "OPTIONS",
        target,
        headers=[
            ("Origin", origin),
            ("Access-Control-Request-Method", method),
            ("Access-Control-Request-Headers", headers),
        ],
    )


def credentialed(origin: str) -> dict[str, str]:
    """The CORS headers of an answer a credentialed request from ``origin`` may read."""
    return {
        "access-control-allow-origin": origin,
        "access-control-allow-credentials": "true",
    }


# -- the flag ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], None, ()),
        (["--cors-origin", PAGE], None, (PAGE,)),
        (
            ["--cors-origin", f"{PAGE}, https://App.Example.com:443"],
            None,
            (PAGE, "https://app.example.com"),
        ),
        (["--cors-origin", PAGE, "--cors-origin", OTHER_PAGE], None, (PAGE, OTHER_PAGE)),
        ([], f"{PAGE},{OTHER_PAGE}", (PAGE, OTHER_PAGE)),
        (["--cors-origin", "*"], PAGE, ("*",)),  # the command line wins over the environment
        (["--cors-origin", f"{PAGE},{PAGE}"], None, (PAGE,)),
    ],
    ids=["off", "one", "comma-separated", "repeated", "env", "flag-over-env", "duplicate"],
)
def test_serve_takes_cors_origins(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: str | None, expected: tuple[str, ...]
) -> None:
    monkeypatch.delenv("HUBSERVER_CORS_ORIGIN", raising=False)
    if env is not None:
        monkeypatch.setenv("HUBSERVER_CORS_ORIGIN", env)
    assert _config(_parser().parse_args(["serve", *argv])).cors_origins == expected


@pytest.mark.parametrize(
    ("origins", "message"),
    [
        ((f"{PAGE}/",), "without the trailing '/'"),
        (("https://app.example.com/app",), "scheme://host[:port]"),
        (("null",), "scheme://host[:port]"),
        (("app.example.com",), "scheme://host[:port]"),
        (("ws://app.example.com",), "scheme://host[:port]"),
        (("https://user@app.example.com",), "scheme://host[:port]"),
        (("https://bücher.example",), "punycode"),
        (("*", PAGE), "cannot be combined"),
    ],
)
def test_origins_no_browser_sends_are_refused_at_start(
    origins: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        ServerConfig(cors_origins=origins)


# -- without --cors-origin: nothing changes ------------------------------------------


async def test_without_an_allow_list_there_is_no_cors(start_server) -> None:
    h: Harness = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        asked = await send(h.port, preflight(NEGOTIATE, PAGE))
        negotiated = await send(
            h.port,
            build_request("POST", NEGOTIATE, headers=[("Origin", PAGE), bearer(h.token())]),
        )
        # Any page may open a WebSocket: nothing to check it against.
        ws = await open_ws(
            h.port, hub_target("entries", "s1"), headers=[("Origin", PAGE), bearer(h.token())]
        )
        await ws.aclose()
    assert asked.status == 405  # negotiate takes POST, as before
    assert negotiated.status == 200
    for response in (asked, negotiated):
        assert response.cors == {}
        assert response.all("vary") == []


# -- preflights ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "method", "methods"),
    [
        (NEGOTIATE, "POST", "GET, POST, DELETE"),
        # Long polling's POST sends, polls and DELETE, SSE's sends: the hub URL with an id.
        ("/v1/hub/entries?site_id=s1&id=abc", "POST", "GET, POST, DELETE"),
        ("/v1/hub/entries?site_id=s1&id=abc", "DELETE", "GET, POST, DELETE"),
        ("/v1/hub/publish/negotiate?negotiateVersion=1", "POST", "GET, POST, DELETE"),
        # The rule is the prefix: a hub or transport added later inherits it.
        ("/v1/hub/some-future-hub/negotiate", "POST", "GET, POST, DELETE"),
        ("/v1/events/entries", "POST", "POST"),
    ],
    ids=["negotiate", "send", "delete", "publisher-negotiate", "any-hub-path", "publish"],
)
async def test_a_listed_origin_gets_its_preflight_answered(
    start_server, target: str, method: str, methods: str
) -> None:
    h: Harness = await start_server(cors_origins=(OTHER_PAGE, PAGE))
    with trio.fail_after(5):
        response = await send(
            h.port, preflight(target, PAGE, method, CLIENT_HEADERS + ",content-type")
        )
    # No token, no body, no route: a preflight never carries credentials.
    assert response.status == 204, response
    assert response.cors == {
        **credentialed(PAGE),
        "access-control-allow-methods": methods,
        "access-control-allow-headers": ALLOWED_HEADERS.decode(),
        "access-control-max-age": str(PREFLIGHT_MAX_AGE_SECONDS),
    }
    assert response.all("vary") == ["Origin"]
    # RFC 9110 §8.6: a 204 has no Content-Length.
    assert response.all("content-length") == []
    assert response.body == b""


def test_the_allowed_headers_are_what_the_official_client_sends() -> None:
    """Read from the npm package itself, so an upgrade that adds a header shows up here."""
    from pathlib import Path

    dist = Path(__file__).parents[1] / "e2e" / "node_modules" / "@microsoft" / "signalr" / "dist"
    if not dist.is_dir():
        pytest.skip("tests/e2e/node_modules is missing: run `npm ci` in tests/e2e")
    source = "\n".join(
        (dist / "esm" / name).read_text()
        for name in ("FetchHttpClient.js", "XhrHttpClient.js", "Utils.js", "HeaderNames.js")
    )
    allowed = {name.strip() for name in ALLOWED_HEADERS.decode().split(",")}
    for header in ("X-Requested-With", "X-SignalR-User-Agent", "Content-Type", "Authorization"):
        assert f'"{header}"' in source, header
        assert header.lower() in allowed


async def test_a_preflight_from_another_origin_is_refused(
    start_server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hubserver.http")
    h: Harness = await start_server(cors_origins=(PAGE,))
    with trio.fail_after(5):
        refused = [
            await send(h.port, preflight(target, origin))
            for target in (NEGOTIATE, "/v1/events/entries")
            # Not a prefix match, not another port, not "null" (sandboxed frames, file://).
            for origin in (OTHER_PAGE, PAGE + ".evil.example", "null", PAGE.upper())
        ]
    for response in refused:
        assert response.status == 403, response
        assert response.cors == {}
        body = json.loads(response.body)
        assert body["code"] == "forbidden" and "--cors-origin" in body["message"]
    assert "origin 'http://127.0.0.1:8124' is not in --cors-origin" in caplog.text


async def test_preflight_then_request_on_one_keep_alive_connection(start_server) -> None:
    """A 204 without Content-Length must leave the connection usable (browsers reuse it)."""
    h: Harness = await start_server(cors_origins=(PAGE,))
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        stream = await open_tcp(h.port)
        async with stream:
            await stream.send_all(preflight(NEGOTIATE, PAGE).replace(b"Connection: close\r\n", b""))
            reader = ResponseReader(stream)
            asked = await reader.read_response()
            await stream.send_all(
                build_request(
                    "POST", NEGOTIATE, headers=[("Origin", PAGE), bearer(h.token())], close=False
                )
            )
            negotiated = await reader.read_response()
    assert asked.status == 204 and "connection" not in asked.headers
    assert negotiated.status == 200, negotiated
    assert negotiated.json()["connectionToken"]
    assert negotiated.headers["access-control-allow-origin"] == PAGE


# -- the answers a page reads ----------------------------------------------------------


async def test_every_answer_to_a_listed_origin_names_it(start_server) -> None:
    h: Harness = await start_server(cors_origins=(PAGE, OTHER_PAGE))
    h.grant("s1", "alice", Role.SITE_ADMIN)
    good, publisher = h.token(), h.publisher_token()
    origin = ("Origin", PAGE)
    body = json.dumps({"site_id": "s1"}).encode()
    requests = {
        "negotiate": (build_request("POST", NEGOTIATE, headers=[origin, bearer(good)]), 200),
        "negotiate with the token in the query": (
            build_request("POST", f"{NEGOTIATE}&access_token={good}", headers=[origin]),
            200,
        ),
        "no token": (build_request("POST", NEGOTIATE, headers=[origin]), 401),
        "bad token": (build_request("POST", NEGOTIATE, headers=[origin, bearer("x.y.z")]), 401),
        "no rights": (
            build_request("POST", NEGOTIATE.replace("s1", "s2"), headers=[origin, bearer(good)]),
            403,
        ),
        "unknown hub": (
            build_request("POST", "/v1/hub/nope/negotiate", headers=[origin, bearer(good)]),
            404,
        ),
        "a hub GET that is no upgrade": (
            build_request("GET", hub_target("entries", "s1"), headers=[origin, bearer(good)]),
            400,
        ),
        "publish": (
            build_request(
                "POST",
                "/v1/events/entries",
                headers=[origin, bearer(publisher), ("Content-Type", "application/json")],
                body=body,
            ),
            202,
        ),
        "publish without the scope": (
            build_request("POST", "/v1/events/entries", headers=[origin, bearer(good)], body=body),
            403,
        ),
        "publish GET": (build_request("GET", "/v1/events/entries", headers=[origin]), 405),
    }
    with trio.fail_after(10):
        for name, (raw, status) in requests.items():
            response = await send(h.port, raw)
            assert response.status == status, (name, response)
            assert response.cors == credentialed(PAGE), (name, response)
            assert response.all("vary") == ["Origin"], (name, response)


async def test_answers_to_another_origin_do_not_name_it(start_server) -> None:
    """A foreign page's request that needed no preflight is answered, unreadably for it."""
    h: Harness = await start_server(cors_origins=(PAGE,))
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        foreign = await send(
            h.port,
            build_request(
                "POST",
                f"{NEGOTIATE}&access_token={h.token()}",
                headers=[("Origin", OTHER_PAGE)],
            ),
        )
        # A server, or Node's client: no Origin, no CORS; the answer still varies by Origin.
        server = await send(h.port, build_request("POST", NEGOTIATE, headers=[bearer(h.token())]))
        health = await send(h.port, build_request("GET", "/healthz", headers=[("Origin", PAGE)]))
    assert foreign.status == 200 and server.status == 200
    for response in (foreign, server):
        assert response.cors == {}
        assert response.all("vary") == ["Origin"]
    # Health checks are no CORS route.
    assert health.status == 200 and health.cors == {} and health.all("vary") == []


async def test_a_missed_deadline_is_readable_by_the_page(start_server) -> None:
    """The 408 written when a body never comes carries the CORS headers too."""
    h: Harness = await start_server(cors_origins=(PAGE,), request_timeout=0.5)
    raw = build_request(
        "POST",
        "/v1/events/entries",
        headers=[("Origin", PAGE), bearer(h.publisher_token()), ("Content-Length", "10")],
    ).replace(b"Content-Length: 0\r\n", b"")
    with trio.fail_after(5):
        response = await send(h.port, raw)
    assert response.status == 408, response
    assert response.cors == credentialed(PAGE)


async def test_any_origin_is_allowed_without_credentials(start_server) -> None:
    h: Harness = await start_server(cors_origins=("*",))
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        asked = await send(h.port, preflight(NEGOTIATE, PAGE))
        negotiated = await send(
            h.port, build_request("POST", NEGOTIATE, headers=[("Origin", PAGE), bearer(h.token())])
        )
        refused = await send(h.port, build_request("POST", NEGOTIATE, headers=[("Origin", PAGE)]))
        ws = await open_ws(
            h.port, hub_target("entries", "s1"), headers=[("Origin", PAGE), bearer(h.token())]
        )
        await ws.aclose()
    assert asked.status == 204
    # Fetch §3.2.5: '*' is never valid with credentials, so none are offered.
    assert asked.cors == {
        "access-control-allow-origin": "*",
        "access-control-allow-methods": "GET, POST, DELETE",
        "access-control-allow-headers": ALLOWED_HEADERS.decode(),
        "access-control-max-age": str(PREFLIGHT_MAX_AGE_SECONDS),
    }
    assert negotiated.status == 200 and refused.status == 401
    for response in (asked, negotiated, refused):
        assert response.one("access-control-allow-origin") == "*"
        assert response.all("access-control-allow-credentials") == []
        assert response.all("vary") == []  # the same answer for every origin


# -- WebSocket upgrades: browsers do not apply CORS to them, the server checks Origin ----


async def test_a_websocket_from_another_origin_is_refused(
    start_server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hubserver.http")
    h: Harness = await start_server(cors_origins=(PAGE,))
    h.grant("s1", "alice", Role.SITE_ADMIN)
    target = hub_target("entries", "s1")
    with trio.fail_after(10):
        async with bystander(h) as b:
            refusals = []
            for origin in (OTHER_PAGE, "null"):
                for headers in ([bearer(h.token())], []):  # before the token is looked at
                    with pytest.raises(UpgradeRefused) as refused:
                        await open_ws(h.port, target, headers=[("Origin", origin), *headers])
                    refusals.append(refused.value.response)
            with pytest.raises(UpgradeRefused) as publisher:
                await open_ws(
                    h.port,
                    "/v1/hub/publish",
                    headers=[("Origin", OTHER_PAGE), bearer(h.token("backend", (PUBLISH_SCOPE,)))],
                )
            refusals.append(publisher.value.response)
            # Two Origin headers that disagree: neither is trusted.
            twice = await send(
                h.port,
                build_request(
                    "GET",
                    target,
                    headers=[
                        *upgrade_headers(key=GOOD_KEY, token=h.token()),
                        ("Origin", OTHER_PAGE),
                        ("Origin", PAGE),
                    ],
                ),
            )
            # The listed origin's page and a non-browser client (no Origin) get their stream.
            for headers in ([("Origin", PAGE)], []):
                ws = await open_ws(h.port, target, headers=[*headers, bearer(h.token())])
                await ws.aclose()
            await b.check()
    for response in refusals:
        assert response.status == 403, response
        assert "access-control-allow-origin" not in response.headers
        assert response.text == "forbidden: this origin is not allowed (--cors-origin)\n"
    assert twice.status == 403
    assert "origin 'null' is not in --cors-origin" in caplog.text


async def test_a_listed_page_receives_events_over_its_websocket(start_server) -> None:
    h: Harness = await start_server(cors_origins=(PAGE,))
    h.grant("s1", "alice", Role.SITE_ADMIN)
    from .helpers import HubClient

    with trio.fail_after(5):
        ws = await open_ws(
            h.port,
            hub_target("entries", "s1") + f"&access_token={h.token()}",
            headers=[("Origin", PAGE)],
        )
        client = HubClient(ws, "json")
        try:
            assert await client.handshake() == {}
            (event_id,) = await publish_ok(h, "entries", {"site_id": "s1"})
            assert (await client.next_event())["id"] == event_id
        finally:
            await ws.aclose()
