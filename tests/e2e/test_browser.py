"""A real browser: headless Chromium runs the official browser bundle of @microsoft/signalr.

``browser.mjs`` launches the system's Chromium once for this module (through
playwright-core, which downloads nothing) and serves ``browser_page.html`` and
the ``dist/browser`` bundles from its own 127.0.0.1 port: another origin than
the hub server's, so every request the page makes is cross-origin, as a
dashboard on ``https://app.example`` calling ``https://events.example``. The
page builds a ``HubConnection`` with ``accessTokenFactory`` (negotiate with
``Authorization: Bearer``, preflighted; then the WebSocket with
``access_token`` in its URL, as browsers must) and reports what happens through
a function the driver exposes.

Without Chromium these tests are skipped with the reason, unless ``CI=true``:
there they fail, since ``.ci/run`` installs Debian's ``chromium``.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import trio

from hubserver.permissions import Role
from tests.hubserver.conftest import Harness
from tests.hubserver.helpers import hub_target, open_hub
from tests.hubserver.helpers import publish as publish_http

HERE = Path(__file__).parent
DRIVER = HERE / "browser.mjs"
NODE = shutil.which("node")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium")
IS_CI = os.environ.get("CI", "").lower() == "true"
#: Launching Chromium takes about a second; a slow CI machine gets more.
LAUNCH_TIMEOUT = 60.0
SITE = "site-1"


def _cannot_run(reason: str) -> None:
    """Skip with ``reason``; under CI, fail: the CI installs what these tests need."""
    if IS_CI:
        pytest.fail(f"{reason} (CI=true: the browser tests must run there)", pytrace=False)
    pytest.skip(reason)


# -- the driver: one Chromium for the module -----------------------------------------


class BrowserDriver:
    """The ``node browser.mjs`` process: commands to its stdin, JSON lines from its stdout."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        #: Bytes read past the last whole line (kept from one test to the next).
        self.pending = b""
        self.ids = count(1)
        ready = self._read_line_blocking(LAUNCH_TIMEOUT)
        assert ready.get("event") == "ready", f"{ready}\n{self.log()}"
        self.origin: str = ready["origin"]
        self.version: str = ready["version"]

    def _read_line_blocking(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self.pending:
            readable, _, _ = select.select([fd], [], [], timeout)
            chunk = os.read(fd, 65536) if readable else b""
            if not chunk:
                raise AssertionError(f"the browser driver did not start:\n{self.log()}")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def command(self, **fields: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(fields).encode() + b"\n")
        self.process.stdin.flush()

    def log(self) -> str:
        try:
            return "browser driver stderr:\n" + self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def stop(self) -> None:
        with suppress(OSError):
            self.command(cmd="quit")
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture(scope="module")
def driver() -> Iterator[BrowserDriver]:
    if CHROMIUM is None:
        _cannot_run("chromium is not installed (Debian: apt-get install chromium)")
    if NODE is None:
        _cannot_run("node is not installed (the browser tests drive Chromium from Node.js)")
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        _cannot_run("tests/e2e/node_modules is missing: run `npm ci` in tests/e2e")
    assert NODE is not None and CHROMIUM is not None
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "browser.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [NODE, str(DRIVER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                cwd=HERE,
                env={**os.environ, "CHROMIUM": CHROMIUM, "NODE_NO_WARNINGS": "1"},
            )
        try:
            browser = BrowserDriver(process, log_path)
        except BaseException:
            process.kill()
            process.wait()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    pipe.close()
            raise
        try:
            yield browser
        finally:
            browser.stop()


# -- per test: pages, and the lines they report ---------------------------------------


@dataclass
class Page:
    id: int
    events: list[dict[str, Any]] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    is_closed: bool = False

    def log(self) -> str:
        return f"page {self.id} console:\n" + "\n".join(self.console[-60:])


class Browser:
    """The module's Chromium, as one test sees it: its pages and what they report."""

    def __init__(self, driver: BrowserDriver, stdout: trio.lowlevel.FdStream) -> None:
        self.driver = driver
        self.origin = driver.origin
        self._stdout = stdout
        self._pages: dict[int, Page] = {}
        #: Per page, the events not yet taken by ``next_event``.
        self._unread: dict[int, list[dict[str, Any]]] = {}

    async def _pump(self) -> None:
        """Read one line of the driver and file it under its page."""
        while b"\n" not in self.driver.pending:
            chunk = await self._stdout.receive_some(65536)
            if not chunk:
                raise AssertionError(f"the browser driver exited\n{self.driver.log()}")
            self.driver.pending += chunk
        line, _, self.driver.pending = self.driver.pending.partition(b"\n")
        event: dict[str, Any] = json.loads(line)
        page = self._pages.get(event.get("page", -1))
        if event["event"] == "error":
            raise AssertionError(f"the browser driver failed: {event}\n{self.driver.log()}")
        if page is None:
            return  # a page of an earlier test, closing
        if event["event"] == "console":
            page.console.append(f"[{event['type']}] {event['text']}")
            return
        page.events.append(event)
        self._unread[page.id].append(event)

    async def next_event(self, page: Page) -> dict[str, Any]:
        unread = self._unread[page.id]
        while not unread:
            await self._pump()
        return unread.pop(0)

    async def wait_for(self, page: Page, *names: str) -> dict[str, Any]:
        """The page's next event, which must be named one of ``names``."""
        event = await self.next_event(page)
        assert event["event"] in names, f"expected {names}, got {event}\n{page.log()}"
        return event

    async def open(self, **config: Any) -> Page:
        """A new page (in its own browser context) that starts a client with ``config``."""
        page = Page(next(self.driver.ids))
        self._pages[page.id] = page
        self._unread[page.id] = []
        self.driver.command(cmd="open", page=page.id, config=config)
        await self.wait_for(page, "opened")
        return page

    async def close(self, page: Page) -> None:
        if page.is_closed:
            return
        page.is_closed = True
        self.driver.command(cmd="close", page=page.id)
        while True:
            event = await self.next_event(page)
            if event["event"] == "page_closed":
                return

    async def messages(self, page: Page, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            event = await self.wait_for(page, "message")
            assert isinstance(event["data"], str), event
            out.append(json.loads(event["data"]))
        return out

    async def quiet_for(self, page: Page, seconds: float) -> None:
        """Nothing but console lines from ``page`` for ``seconds``."""
        with trio.move_on_after(seconds):
            event = await self.next_event(page)
            raise AssertionError(f"page {page.id} reported {event}\n{page.log()}")


@pytest.fixture
async def browser(driver: BrowserDriver) -> AsyncIterator[Browser]:
    assert driver.process.stdout is not None
    stdout = trio.lowlevel.FdStream(os.dup(driver.process.stdout.fileno()))
    b = Browser(driver, stdout)
    try:
        yield b
    except BaseException:
        for page in b._pages.values():
            print(page.log())
        raise
    finally:
        with trio.move_on_after(10, shield=True):
            for page in b._pages.values():
                await b.close(page)
        await stdout.aclose()


def hub_url(h: Harness, hub: str = "entries") -> str:
    return f"http://{h.base}/v1/hub/{hub}?site_id={SITE}"


def entry(n: int) -> dict[str, object]:
    return {"site_id": SITE, "lock_id": f"lock-{n}", "event_type": "opening", "details": {"n": n}}


async def publish(h: Harness, events: list[dict[str, object]]) -> list[str]:
    response = await publish_http(h, "entries", events)
    assert response.status == 202, response
    ids: list[str] = response.json()["ids"]
    return ids


# -- the tests ------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_a_listed_origin_receives_events_in_the_browser(
    start_server: Any, browser: Browser, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    h: Harness = await start_server(cors_origins=(browser.origin,), access_log=True)
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    token = h.token("alice")
    with trio.fail_after(20):
        page = await browser.open(url=hub_url(h), token=token, protocol=protocol)
        await browser.wait_for(page, "started")
        sent = [entry(n) for n in range(3)]
        ids = await publish(h, sent)
        got = await browser.messages(page, 3)
        assert got == [
            {**event, "id": event_id, "seq": seq}
            for seq, (event, event_id) in enumerate(zip(sent, ids, strict=True), 1)
        ]
        console = page.log()
        # It negotiated (preflight, then POST with the bearer token), then chose WebSockets.
        assert "Selecting transport 'WebSockets'" in console, console
        assert f"Using HubProtocol '{protocol}'" in console, console
        await browser.close(page)
    # The preflight, negotiate (bearer header) and the upgrade (access_token) were logged...
    lines = [r.getMessage() for r in caplog.records if r.name == "hubserver.http"]
    assert any(line.startswith("OPTIONS /v1/hub/entries/negotiate?") for line in lines), lines
    assert any(" -> 101 (" in line and "access_token=***" in line for line in lines), lines
    # ... without the token.
    assert token.rsplit(".", 1)[1] not in caplog.text


@pytest.mark.parametrize("allowed", [(), ("http://127.0.0.1:1",)], ids=["no-list", "other"])
async def test_an_origin_not_listed_cannot_connect(
    start_server: Any, browser: Browser, allowed: tuple[str, ...]
) -> None:
    h: Harness = await start_server(cors_origins=allowed)
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    h.grant(SITE, "bystander", Role.SITE_ADMIN)
    with trio.fail_after(20):
        async with open_hub(h, hub_target("entries", SITE), token=h.token("bystander")) as other:
            page = await browser.open(url=hub_url(h), token=h.token("alice"))
            failed = await browser.wait_for(page, "start_failed")
            assert "Failed to complete negotiation" in failed["error"], failed
            assert "blocked by CORS policy" in page.log(), page.log()
            (event_id,) = await publish(h, [entry(1)])
            # Others are served; the page gets nothing.
            assert (await other.next_event())["id"] == event_id
            await browser.quiet_for(page, 0.5)
    assert [e["event"] for e in page.events] == ["opened", "start_failed"]


async def test_a_websocket_from_an_origin_not_listed_is_refused(
    start_server: Any, browser: Browser
) -> None:
    """skipNegotiation: no CORS request at all; the server's Origin check refuses the upgrade."""
    h: Harness = await start_server(cors_origins=("http://127.0.0.1:1",))
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    with trio.fail_after(20):
        page = await browser.open(url=hub_url(h), token=h.token("alice"), skipNegotiation=True)
        await browser.wait_for(page, "start_failed")
        assert "Unexpected response code: 403" in page.log(), page.log()
        await publish(h, [entry(1)])
        await browser.quiet_for(page, 0.5)


async def test_any_origin_works_without_credentials(start_server: Any, browser: Browser) -> None:
    h: Harness = await start_server(cors_origins=("*",))
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    with trio.fail_after(20):
        page = await browser.open(url=hub_url(h), token=h.token("alice"), withCredentials=False)
        await browser.wait_for(page, "started")
        # The client's default, withCredentials: true, is refused by the browser under '*'.
        credentialed = await browser.open(url=hub_url(h), token=h.token("alice"))
        await browser.wait_for(credentialed, "start_failed")
        assert "must not be the wildcard '*'" in credentialed.log(), credentialed.log()
        (event_id,) = await publish(h, [entry(1)])
        [got] = await browser.messages(page, 1)
        assert got["id"] == event_id
        await browser.quiet_for(credentialed, 0.2)


@pytest.mark.parametrize("transport", ["ServerSentEvents", "LongPolling"])
async def test_sse_and_long_polling_work_across_origins_in_the_browser(
    start_server: Any, browser: Browser, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The browser's EventSource and XHR polls from another origin: CORS on the
    event stream's head, the polls, the POSTs and the DELETE; the token never logged."""
    caplog.set_level(logging.DEBUG)
    h: Harness = await start_server(cors_origins=(browser.origin,), access_log=True)
    h.grant(SITE, "alice", Role.SITE_ADMIN)
    token = h.token("alice")
    with trio.fail_after(20):
        page = await browser.open(url=hub_url(h), token=token, transport=transport)
        await browser.wait_for(page, "started")
        sent = [entry(n) for n in range(3)]
        ids = await publish(h, sent)
        got = await browser.messages(page, 3)
        assert [event["id"] for event in got] == ids
        assert [event["seq"] for event in got] == [1, 2, 3]
        assert f"Selecting transport '{transport}'" in page.log(), page.log()
        await browser.close(page)
    assert token.rsplit(".", 1)[1] not in caplog.text
