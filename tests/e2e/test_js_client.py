"""The official SignalR JavaScript client (npm @microsoft/signalr) against the real server.

Each test starts hubserver in-process on 127.0.0.1 port 0, runs ``node client.mjs``
(the reference's JavaScript sample: skipNegotiation, WebSockets, accessTokenFactory)
and reads what the client saw as JSON lines, publishing through the HTTP API only
once the client reports ``started``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from hubcore import HubLimits
from hubserver.app import HUB_SCOPE
from hubserver.permissions import Role
from tests.hubserver.conftest import Harness
from tests.hubserver.helpers import publish as publish_http

HERE = Path(__file__).parent
CLIENT = HERE / "client.mjs"
NODE = shutil.which("node")

if NODE is None:
    pytest.skip("node is not installed (the e2e tests need Node.js)", allow_module_level=True)
if not (HERE / "node_modules" / "@microsoft" / "signalr").is_dir():
    pytest.skip(
        "tests/e2e/node_modules/@microsoft/signalr is missing: run `npm ci` in tests/e2e "
        "(./dev test does it)",
        allow_module_level=True,
    )

SITE = "site-1"

# -- the client process ---------------------------------------------------------------


class ClientExited(AssertionError):
    """The client's stdout ended (the process exited) while a test waited for an event."""


class JsClient:
    """One ``node client.mjs`` process, read line by line."""

    def __init__(self, process: trio.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.events: list[dict[str, Any]] = []
        self._buffer = b""

    async def next_event(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                raise ClientExited(
                    f"client exited ({self.process.returncode}) after {self.events}\n{self.log()}"
                )
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        event: dict[str, Any] = json.loads(line)
        self.events.append(event)
        return event

    async def wait_for(self, *names: str) -> dict[str, Any]:
        """The next event named one of ``names``; any other event fails the test."""
        event = await self.next_event()
        assert event["event"] in names, f"expected {names}, got {event}; all: {self.events}"
        return event

    async def rest(self) -> list[dict[str, Any]]:
        """Every event until the client exits."""
        start = len(self.events)
        while True:
            try:
                await self.next_event()
            except ClientExited:
                break
        await self.process.wait()
        return self.events[start:]

    async def messages(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` events, each a message, parsed (``data`` must be a string)."""
        out = []
        for _ in range(count):
            event = await self.wait_for("message")
            assert isinstance(event["data"], str), event
            out.append(json.loads(event["data"]))
        return out

    def log(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "client stderr:\n" + text[-8000:]


@asynccontextmanager
async def js_client(
    tmp_path: Path, *, script: Path = CLIENT, **config: Any
) -> AsyncIterator[JsClient]:
    """Run ``node client.mjs <config>`` (or ``script``); the process is killed at the end."""
    config.setdefault("timeoutMs", 20_000)
    log_path = tmp_path / f"client-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            [NODE, str(script), json.dumps(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            cwd=HERE,
            env={**os.environ, "NODE_NO_WARNINGS": "1"},
        )
    client = JsClient(process, log_path)
    try:
        yield client
    except BaseException:
        print(client.log())  # shown by pytest with the failure
        raise
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


def hub_url(h: Harness, hub: str = "entries", **query: str) -> str:
    params = "&".join(f"{name}={value}" for name, value in {"site_id": SITE, **query}.items())
    return f"http://{h.base}/v1/hub/{hub}?{params}"


async def publish(h: Harness, hub: str, body: object) -> dict[str, Any]:
    """POST to the publish API; asserts 202 and returns the answer."""
    response = await publish_http(h, hub, body)
    assert response.status == 202, response
    answer: dict[str, Any] = response.json()
    return answer


def entry(n: int, **fields: object) -> dict[str, object]:
    return {"site_id": SITE, "lock_id": f"lock-{n}", "event_type": "opening", **fields}


# -- happy paths ----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_site_stream_receives_published_entries(
    start_server: Any, tmp_path: Path, protocol: str
) -> None:
    h: Harness = await start_server()
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    with trio.fail_after(15):
        async with js_client(
            tmp_path, url=hub_url(h), token=h.token("alice"), protocol=protocol, expect=3
        ) as client:
            await client.wait_for("started")
            sent = [entry(n, user_id=None, offline=False, details={"n": n}) for n in range(3)]
            answer = await publish(h, "entries", sent)
            got = await client.messages(3)
            assert got == [
                {**event, "id": event_id, "seq": seq}
                for seq, (event, event_id) in enumerate(zip(sent, answer["ids"], strict=True), 1)
            ]
            assert [e["event"] for e in await client.rest()] == ["stopping", "closed", "stopped"]
            assert client.events[-2] == {"event": "closed", "error": None}
            assert client.process.returncode == 0
            assert f"Using HubProtocol '{protocol}'" in client.log()


async def test_token_in_query_like_a_browser(start_server: Any, tmp_path: Path) -> None:
    h: Harness = await start_server()
    h.grant(SITE, "alice", Role.SITE_SUPER_USER)
    with trio.fail_after(15):
        async with js_client(
            tmp_path, url=hub_url(h), token=h.token("alice"), tokenIn="query", expect=1
        ) as client:
            await client.wait_for("started")
            await publish(h, "entries", entry(1))
            [got] = await client.messages(1)
            assert got["lock_id"] == "lock-1" and got["seq"] == 1
            await client.wait_for("stopping")


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_incidents_hub_gets_incidents_only(
    start_server: Any, tmp_path: Path, protocol: str
) -> None:
    h: Harness = await start_server()
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    incident = {"site_id": SITE, "incident_type": "tamper", "severity": "critical"}
    with trio.fail_after(15):
        async with js_client(
            tmp_path,
            url=hub_url(h, "incidents"),
            token=h.token("alice"),
            protocol=protocol,
            expect=2,
        ) as client:
            await client.wait_for("started")
            await publish(h, "incidents", {**incident, "state": "raised"})
            await publish(h, "entries", entry(1))  # another hub: must not arrive
            await publish(h, "incidents", {**incident, "state": "cleared"})
            got = await client.messages(2)
            assert [(e["state"], e["seq"]) for e in got] == [("raised", 1), ("cleared", 2)]
            assert all(e["incident_type"] == "tamper" for e in got)
            await client.wait_for("stopping")


async def test_site_user_gets_only_own_events(start_server: Any, tmp_path: Path) -> None:
    h: Harness = await start_server()
    h.grant(SITE, "bob", Role.SITE_USER)
    with trio.fail_after(15):
        async with js_client(
            tmp_path, url=hub_url(h, user_id="bob"), token=h.token("bob"), expect=2
        ) as client:
            await client.wait_for("started")
            await publish(
                h,
                "entries",
                [
                    entry(1, user_id="bob"),
                    entry(2, user_id="carol"),
                    entry(3),
                    entry(4, user_id=None),
                    {**entry(5, user_id="bob"), "site_id": "site-2"},
                    entry(6, user_id="bob"),
                ],
            )
            got = await client.messages(2)
            assert [(e["lock_id"], e["user_id"], e["seq"]) for e in got] == [
                ("lock-1", "bob", 1),
                ("lock-6", "bob", 5),
            ]
            await client.wait_for("stopping")


async def test_500_events_in_one_batch_arrive_in_order(start_server: Any, tmp_path: Path) -> None:
    h: Harness = await start_server()
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    with trio.fail_after(20):
        async with js_client(
            tmp_path, url=hub_url(h), token=h.token("alice"), expect=500, logLevel="Information"
        ) as client:
            await client.wait_for("started")
            answer = await publish(h, "entries", [entry(n) for n in range(500)])
            got = await client.messages(500)
            assert [e["seq"] for e in got] == list(range(1, 501))
            assert [e["lock_id"] for e in got] == [f"lock-{n}" for n in range(500)]
            assert [e["id"] for e in got] == answer["ids"]
            await client.wait_for("stopping")


# -- refusals -------------------------------------------------------------------------


REFUSALS: dict[str, dict[str, Any]] = {
    "no token": dict(status=401, token=None),
    "bad signature": dict(status=401, token="BAD"),
    "expired token": dict(status=401, token=("alice", (HUB_SCOPE,), -3600.0)),
    "missing scope": dict(status=403, token=("alice", ("openid",), 3600.0)),
    "no role on site": dict(status=403, token=("mallory", (HUB_SCOPE,), 3600.0)),
    "site user on the site stream": dict(status=403, token=("bob", (HUB_SCOPE,), 3600.0)),
    "site user on another user's stream": dict(
        status=403, token=("bob", (HUB_SCOPE,), 3600.0), query={"user_id": "carol"}
    ),
    "no site_id": dict(status=400, token=("alice", (HUB_SCOPE,), 3600.0), query={"site_id": ""}),
    "unknown hub": dict(status=404, token=("alice", (HUB_SCOPE,), 3600.0), hub="alarms"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refused_upgrade_rejects_start(
    start_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    caplog.set_level(logging.INFO, logger="hubserver.http")
    h: Harness = await start_server()
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    h.grant(SITE, "bob", Role.SITE_USER)
    spec = REFUSALS[case]
    token = spec["token"]
    if isinstance(token, tuple):
        token = h.token(*token)
    if token == "BAD":
        token = h.token("alice")[:-8] + "AAAAAAAA"
    url = hub_url(h, spec.get("hub", "entries"), **spec.get("query", {}))
    with trio.fail_after(15):
        async with js_client(tmp_path, url=url, token=token) as client:
            failed = await client.wait_for("start_failed")
            # Node's client does not surface the HTTP status (SIGNALR.md §13)...
            assert failed["error"], failed
            await client.process.wait()
            assert client.process.returncode == 2
    assert h.server.app.stats.opened == 0
    # ... so the status is read from the server's request log.
    answers = [r.getMessage() for r in caplog.records if r.name == "hubserver.http"]
    assert len(answers) == 1 and answers[0].startswith("GET /v1/hub/"), answers
    assert f" -> {spec['status']} (" in answers[0], answers


# -- closing ------------------------------------------------------------------------


async def test_shutdown_lets_the_client_reconnect(start_server: Any, tmp_path: Path) -> None:
    h: Harness = await start_server(drain_timeout=5.0)
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    with trio.fail_after(15):
        async with js_client(
            tmp_path,
            url=hub_url(h),
            token=h.token("alice"),
            reconnect=True,
            stopOnReconnecting=True,
        ) as client:
            await client.wait_for("started")
            await publish(h, "entries", entry(1))
            await client.messages(1)
            h.server.request_shutdown()
            # Close with allowReconnect and no error (SIGNALR.md §5): the client reconnects
            # instead of closing for good, and has no error to report.
            reconnecting = await client.wait_for("reconnecting")
            assert reconnecting == {"event": "reconnecting", "error": None}
            # A hub Close, not just a WebSocket close (which would also reconnect).
            assert "Close message received from server." in client.log()
            # stop() from onreconnecting ends the reconnect loop; this client version
            # then fires no onclose.
            rest = await client.rest()
            assert [e["event"] for e in rest] == ["stopping", "stopped"]
    drained = h.server.app.stats.drained  # the server's drain waits on it
    assert drained is not None
    with trio.fail_after(5):
        await drained.wait()
    assert h.server.app.stats.open == 0


async def test_shutdown_without_automatic_reconnect_closes_without_error(
    start_server: Any, tmp_path: Path
) -> None:
    h: Harness = await start_server(drain_timeout=5.0)
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    with trio.fail_after(15):
        async with js_client(tmp_path, url=hub_url(h), token=h.token("alice")) as client:
            await client.wait_for("started")
            h.server.request_shutdown()
            closed = await client.wait_for("closed")
            assert closed == {"event": "closed", "error": None}
            await client.process.wait()
            assert client.process.returncode == 0


async def test_expired_token_closes_with_reconnect(start_server: Any, tmp_path: Path) -> None:
    h: Harness = await start_server(token_leeway=0.0)
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    issued = time.time()
    short = h.token("alice", ttl=3.0)
    expires_at = int(issued + 3.0)
    with trio.fail_after(15):
        async with js_client(
            tmp_path,
            url=hub_url(h),
            # The app's token factory hands out a fresh token for the reconnect.
            tokens=[short, h.token("alice")],
            reconnect=True,
            expect=1,
        ) as client:
            await client.wait_for("started")
            reconnecting = await client.wait_for("reconnecting")
            # Not before the token's exp, and soon after it.
            assert expires_at - 0.3 <= time.time() <= expires_at + 2.0
            # The server explains why in the Close (ASP.NET Core sends no text: see below).
            assert reconnecting["error"] in (
                None,
                "Server returned an error on close: The access token expired.",
            ), reconnecting
            assert "Close message received from server." in client.log()
            await client.wait_for("reconnected")
            await publish(h, "entries", entry(1))
            [got] = await client.messages(1)
            assert got["seq"] == 1
            await client.wait_for("stopping")
    assert h.server.app.stats.expired_closed == 1
    assert h.server.app.stats.opened == 2


async def test_expired_token_close_is_like_aspnetcore(start_server: Any, tmp_path: Path) -> None:
    h: Harness = await start_server(token_leeway=0.0)
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with js_client(
            tmp_path,
            url=hub_url(h),
            token=h.token("alice", ttl=2.0),
            reconnect=True,
            stopOnReconnecting=True,
        ) as client:
            await client.wait_for("started")
            reconnecting = await client.wait_for("reconnecting")
            assert reconnecting == {"event": "reconnecting", "error": None}


# -- keep-alive ---------------------------------------------------------------------


async def test_server_pings_keep_an_idle_connection_up(start_server: Any, tmp_path: Path) -> None:
    h: Harness = await start_server(hub_limits=HubLimits(keepalive_interval=1.0))
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    with trio.fail_after(15):
        async with js_client(
            tmp_path,
            url=hub_url(h),
            token=h.token("alice"),
            serverTimeoutMs=3000,
            stopAfterMs=5000,
        ) as client:
            started = trio.current_time()
            await client.wait_for("started")
            rest = await client.rest()
            assert trio.current_time() - started >= 5.0
            assert rest == [
                {"event": "stopping"},
                {"event": "closed", "error": None},
                {"event": "stopped"},
            ]
    assert h.server.app.stats.opened == 1


async def test_without_server_pings_the_client_times_out(start_server: Any, tmp_path: Path) -> None:
    """The control for the test above: a silent server loses the client at its timeout."""
    h: Harness = await start_server()  # keep-alive every 15 s, over the client's 3 s
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    with trio.fail_after(15):
        async with js_client(
            tmp_path, url=hub_url(h), token=h.token("alice"), serverTimeoutMs=3000
        ) as client:
            await client.wait_for("started")
            closed = await client.wait_for("closed")
            assert "Server timeout elapsed" in closed["error"], closed
