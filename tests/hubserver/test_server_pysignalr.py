"""A real third-party client: pysignalr (PyPI, asyncio), in its own process.

pysignalr_listen.py connects, prints each ``ReceiveMessage`` argument as a JSON
line, and exits after N messages; the test publishes and checks what arrived.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from hubserver.auth import DevKey
from hubserver.permissions import Role

from .conftest import Harness
from .helpers import hub_target, open_hub, publish_ok


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    """The run's shared key (see conftest): this module's tests need no key of their own."""
    return shared_dev_key


SCRIPT = Path(__file__).with_name("pysignalr_listen.py")


class Lines:
    """JSON lines from a child's stdout."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError(f"the client exited; pending output {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        record: dict[str, Any] = json.loads(line)
        return record


async def _run_client(
    h: Harness, url: str, count: int, *, skip_negotiation: bool
) -> tuple[list[dict[str, Any]], list[str]]:
    """Start the client, publish ``count`` events once it is open, collect its output.

    Returns:
        The client's JSON lines after ``{"open": true}`` (or its first line, if
        it never opened), and the ids of the published events.
    """
    args = [sys.executable, str(SCRIPT), url, h.token(), str(count)]
    if skip_negotiation:
        args.append("--skip-negotiation")
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(trio.run_process, args, stdout=subprocess.PIPE, check=False)
        )
        lines = Lines(process.stdout)
        first = await lines.next()
        if first != {"open": True}:
            return [first], []
        ids = []
        for n in range(count):
            event = {"site_id": "s1", "n": n, **({"user_id": "u1"} if n % 2 else {})}
            ids += await publish_ok(h, "entries", event)
        records = [await lines.next() for _ in range(count)]
    assert process.returncode == 0
    return records, ids


@pytest.mark.parametrize("in_query", [False, True], ids=["header", "query"])
async def test_pysignalr_receives_events(start_server, in_query: bool) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    url = f"ws://{h.base}/v1/hub/entries?site_id=s1"
    if in_query:  # the header is still sent too; the query must not get in the way
        url += f"&access_token={h.token()}"
    with trio.fail_after(30):
        records, ids = await _run_client(h, url, 4, skip_negotiation=True)
    assert all("message" in record for record in records), records
    events = [json.loads(record["message"]) for record in records]
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert [e["id"] for e in events] == ids
    assert [e["n"] for e in events] == [0, 1, 2, 3]


# pysignalr 1.3.3 cannot skip negotiation (SignalRClient never passes
# skip_negotiation to its transport): its first request is
# 'POST /v1/hub/entries/negotiate?site_id=s1', then the WebSocket with &id=.
async def test_pysignalr_with_its_defaults(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(30):
        records, _ = await _run_client(
            h, f"ws://{h.base}/v1/hub/entries?site_id=s1", 1, skip_negotiation=False
        )
    assert "message" in records[0], records


PUBLISH_SCRIPT = Path(__file__).with_name("pysignalr_publish.py")


async def test_pysignalr_publishes_on_the_publisher_hub(start_server) -> None:
    """pysignalr with its defaults (negotiate, then the WebSocket) as a publisher."""
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    calls = [
        ["entries", [{"site_id": "s1", "id": "p-1"}, {"site_id": "s1", "id": "p-2"}]],
        ["entries", [{"id": "no-site"}]],
        ["entries", {"site_id": "s1", "id": "p-3"}],
    ]
    args = [
        sys.executable,
        str(PUBLISH_SCRIPT),
        f"ws://{h.base}/v1/hub/publish",
        h.publisher_token(),
        json.dumps(calls),
    ]
    async with open_hub(h, hub_target("entries", "s1")) as sub:
        with trio.fail_after(30):
            result = await trio.run_process(args, capture_stdout=True, check=False)
            lines = [json.loads(line) for line in result.stdout.splitlines()]
            assert lines[0] == {"open": True}, lines
            assert lines[1] == {"result": {"accepted": 2, "ids": ["p-1", "p-2"], "seqs": [1, 2]}}
            assert "event 0: 'site_id' is required" in lines[2]["error"], lines
            assert lines[3] == {"result": {"accepted": 1, "ids": ["p-3"], "seqs": [3]}}
            assert result.returncode == 0
            assert [(await sub.next_event())["id"] for _ in range(3)] == ["p-1", "p-2", "p-3"]
