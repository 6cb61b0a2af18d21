"""Issue #12, item 4: structured logs (``--log-format json``) and the access log's fields.

One JSON object per line: time (RFC 3339, UTC), level, logger, event, message,
and the context fields of the log call (session id, subject, hub, site,
transport, reason; method, path, status, bytes and duration for the access
log). Nothing is logged per delivery or per successful publish at the default
level.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from hubserver.auth import DevKey
from hubserver.logs import JsonFormatter, configure_logging, resolve_log_format
from hubserver.permissions import Role

from .conftest import Harness
from .helpers import (
    ProcessLog,
    build_request,
    exchange,
    http_request,
    hub_target,
    open_hub,
    publish,
    publish_ok,
)
from .test_publisher_hub import open_publisher

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    return shared_dev_key


def as_json(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """Every captured record as the JSON format writes it (one line each)."""
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert all("\n" not in line for line in lines)
    return [json.loads(line) for line in lines]


def test_a_record_is_one_json_line_with_time_level_logger_event_and_context() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("hubserver.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(
            "session %d: closing slow client (%s)",
            7,
            "too\nslow",
            extra={
                "event": "session_closing",
                "session_id": 7,
                "reason": "slow_consumer",
                "path": Path("/x"),
            },
        )
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("handler failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert list(first)[:6] == ["time", "level", "logger", "event", "message", "pid"]
    assert RFC3339_UTC.match(first["time"]), first["time"]
    assert first["level"] == "warning"
    assert first["logger"] == "hubserver.test-json"
    assert first["message"] == "session 7: closing slow client (too\nslow)"
    assert (first["session_id"], first["reason"], first["path"]) == (7, "slow_consumer", "/x")
    assert first["pid"] == os.getpid()
    assert "exception" not in first
    assert second["level"] == "error" and "event" not in second
    assert second["exception"].startswith("Traceback (most recent call last)")
    assert second["exception"].endswith("RuntimeError: boom")


def test_auto_is_text_on_a_terminal_and_json_otherwise(tmp_path: Path) -> None:
    leader, follower = os.openpty()
    try:
        with open(follower, "w", closefd=False) as terminal:
            assert resolve_log_format("auto", terminal) == "text"
            assert resolve_log_format("json", terminal) == "json"
    finally:
        os.close(leader)
        os.close(follower)
    with (tmp_path / "log").open("w") as file:
        assert resolve_log_format("auto", file) == "json"
        assert resolve_log_format("text", file) == "text"


def test_configure_logging_writes_the_chosen_format() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []
    try:
        stream = io.StringIO()
        assert configure_logging("warning", "auto", stream) == "json"
        logging.getLogger("hubserver.x").info("not at warning")
        logging.getLogger("hubserver.x").warning("at %s", "warning")
        (line,) = stream.getvalue().splitlines()
        assert json.loads(line)["message"] == "at warning"
    finally:
        root.handlers, root.level = saved[0], saved[1]


# -- the context fields at the server's log calls ----------------------------------------


async def test_hub_connection_lines_carry_session_subject_hub_site_transport_and_reason(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    h: Harness = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with open_hub(h, hub_target("entries", "s1", "u9")) as client:
            await client.ws.send_text("garbage\x1e")  # a protocol error closes it
            await client.expect_close()
        async with open_publisher(h):
            pass
    records = as_json(caplog)
    (opened,) = [r for r in records if r.get("event") == "session_opened" and r["hub"] == "entries"]
    assert opened["message"].startswith(f"session {opened['session_id']}: entries hub")
    assert opened["subject"] == "alice"
    assert (opened["site"], opened["user_id"]) == ("s1", "u9")
    assert opened["transport"] == "WebSockets"
    assert opened["logger"] == "hubserver.http"
    (closing,) = [r for r in records if r.get("reason") == "protocol_error"]
    assert closing["event"] == "session_closing"
    assert closing["session_id"] == opened["session_id"]
    assert (closing["subject"], closing["hub"], closing["site"]) == ("alice", "entries", "s1")
    (publisher,) = [
        r
        for r in records
        if r.get("event") == "session_opened" and r is not opened and r["hub"] == "publish"
    ]
    assert publisher["subject"] == "backend" and "site" not in publisher


async def test_the_access_log_has_method_redacted_path_status_bytes_and_duration(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hubserver.http")
    h: Harness = await start_server(access_log=True)
    token = h.token()
    long_target = f"/healthz?access_token={token}&pad={'x' * 500}"
    with trio.fail_after(5):
        response = await exchange(h.port, build_request("GET", long_target))
    assert response.status == 200
    (line,) = [r for r in as_json(caplog) if r.get("event") == "http_request"]
    assert line["method"] == "GET"
    assert line["path"].startswith("/healthz?access_token=***&pad=xxx")
    assert len(line["path"]) < 250, "the path is capped"
    assert token.rsplit(".", 1)[1] not in json.dumps(line)
    assert line["status"] == 200
    assert line["bytes"] > 0 and isinstance(line["bytes"], int)
    assert line["duration_ms"] >= 0


async def test_nothing_is_logged_per_delivery_or_per_successful_publish(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """At the default level (info, no access log): a publish over HTTP or the publisher
    hub, and its delivery, log nothing; a refused publish is logged (so the check can fail)."""
    caplog.set_level(logging.INFO)
    h: Harness = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with open_hub(h, hub_target("entries", "s1")) as client, open_publisher(h) as pub:
            caplog.clear()
            for i in range(20):
                await publish_ok(h, "entries", [{"site_id": "s1", "n": i}, {"site_id": "s1"}])
                reply = await pub.call("Publish", "entries", {"site_id": "s1", "m": i})
                assert "result" in reply, reply
            for _ in range(60):
                await client.next_event()
            assert [r.getMessage() for r in caplog.records] == []
            assert (await publish(h, "entries", {"no": "site"})).status == 400
    events = [r.__dict__.get("event") for r in caplog.records]
    assert events == ["publish_refused", "http_request"]  # the refusal, then its 400


# -- as a process: JSON by default when stderr is not a terminal -------------------------


async def test_serve_logs_json_lines_to_a_pipe_by_default(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBSERVER_")}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "hubserver", "serve", "--port", "0", "--data-dir", str(tmp_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    log = ProcessLog()
    assert process.stderr is not None
    nursery.start_soon(log.pump, process.stderr)
    try:
        with trio.fail_after(20):
            port = int((await log.wait_for(r'"event":"listening".*"port":(\d+)')).group(1))
            # Past the startup (signals are handled from just after the announcement).
            await log.wait_for("DEVELOPMENT MODE")
            assert (await http_request(port, "GET", "/readyz")).status == 200
            process.send_signal(signal.SIGTERM)
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0, log.lines
    lines = [json.loads(line) for line in log.lines if line]
    (listening,) = [line for line in lines if line.get("event") == "listening"]
    assert listening["message"] == f"listening on http://127.0.0.1:{listening['port']}"
    assert listening["host"] == "127.0.0.1" and listening["level"] == "info"
    assert any(line.get("event") == "draining" for line in lines)
    (development,) = [line for line in lines if line.get("event") == "development_mode"]
    assert development["level"] == "warning" and "DEVELOPMENT MODE" in development["message"]
    assert any(line.get("event") == "signal" for line in lines)


def test_the_readme_names_every_log_event() -> None:
    """Operators alert on ``event``: every name the code logs is documented."""
    repo = Path(__file__).resolve().parents[2]
    source = "\n".join(path.read_text() for path in (repo / "hubserver").rglob("*.py"))
    events: set[str] = set()
    for pattern in (
        r'"event": "(\w+)"',
        r'session_fields\(\s*\w+,\s*"(\w+)"',
        r'event="(\w+)"(?: if [^\n]* else "(\w+)")?',
    ):
        for match in re.finditer(pattern, source):
            events.update(group for group in match.groups() if group)
    assert {"session_opened", "transport_attached", "http_request", "listening"} <= events
    readme = (repo / "README.md").read_text().split("### Logs", 1)[1].split("\n## ", 1)[0]
    assert sorted(event for event in events if f"`{event}`" not in readme) == []
