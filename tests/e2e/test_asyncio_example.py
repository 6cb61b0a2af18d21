"""examples/asyncio_server.py, run as a process, against the official JS client and a raw client.

The example is what the README's "Embedding hubcore" points embedders to (issue #13), so
it is held to what it claims: the official client works over JSON and MessagePack (echo,
broadcasts, a reconnectable Close on SIGTERM), and a raw WebSocket client sees the right
frame types, the handshake error reply, the Close for garbage, keep-alive Pings, and both
timeouts.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from .test_js_client import js_client

EXAMPLE = Path(__file__).parents[2] / "examples" / "asyncio_server.py"
PING = '{"type":6}\x1e'
CLOSE_ERROR = '{"type":7,"error":"Connection closed with an error.","allowReconnect":true}\x1e'
CLOSE_ERROR_MSGPACK = bytes.fromhex(
    "259307d920436f6e6e656374696f6e20636c6f736564207769746820616e206572726f722ec3"
)


@contextmanager
def example_server(*args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Run the example on a free port; it is killed at the end if still running."""
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--host", "127.0.0.1", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        found = re.fullmatch(r"listening on ws://127\.0\.0\.1:(\d+)/hub", line.strip())
        assert found, f"{line!r}\n{process.stderr.read() if process.stderr else ''}"
        yield process, int(found.group(1))
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def stop(process: subprocess.Popen[str]) -> str:
    """SIGTERM, as a service manager would; the example must exit cleanly. Returns its output."""
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    assert "Traceback" not in err, err
    return out


def frames_until_closed(ws: ClientConnection) -> list[str | bytes]:
    frames: list[str | bytes] = []
    with pytest.raises(ConnectionClosedOK):
        while True:
            frames.append(ws.recv(timeout=5))
    return frames


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_the_official_client(tmp_path: Path, protocol: str) -> None:
    value = {"text": "é😀", "numbers": [1, 2.5, None, True]}
    with example_server() as (server, port), trio.fail_after(20):
        async with js_client(
            tmp_path,
            url=f"http://127.0.0.1:{port}/hub",
            protocol=protocol,
            invoke=["Echo", value],
            reconnect=True,
            stopOnReconnecting=True,
        ) as client:
            await client.wait_for("started")
            seen: list[dict[str, Any]] = []
            while sum(e["event"] == "message" for e in seen) < 2 or len(seen) < 3:
                seen.append(await client.wait_for("invoked", "message"))
            [invoked] = [e for e in seen if e["event"] == "invoked"]
            assert invoked["result"] == value
            ticks = [int(e["data"].removeprefix("tick ")) for e in seen if e["event"] == "message"]
            assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks)

            await trio.to_thread.run_sync(stop, server)
            event = await client.wait_for("message", "reconnecting")
            while event["event"] == "message":
                event = await client.wait_for("message", "reconnecting")
            # A Close with allowReconnect and no error: the client would come back.
            assert event == {"event": "reconnecting", "error": None}
            assert "Close message received from server." in client.log()
            # stop() from onreconnecting ends the reconnect loop, with no onclose.
            assert [e["event"] for e in await client.rest()] == ["stopping", "stopped"]
            assert f"Using HubProtocol '{protocol}'" in client.log()


def test_a_raw_client_sees_frame_types_errors_pings_and_timeouts() -> None:
    # Keep-alive 0.4 s: client timeout 0.8 s, handshake timeout 0.4 s.
    with example_server("--keepalive", "0.4") as (server, port):
        url = f"ws://127.0.0.1:{port}/hub"
        with connect(url) as ws:
            ws.send('{"protocol":"xml","version":1}\x1e')
            # The handshake error, in a text frame (a str here), then a clean close.
            error = "The protocol 'xml' is not supported."
            assert frames_until_closed(ws) == ['{"error":"' + error + '"}\x1e']

        with connect(url) as ws:
            ws.send('{"protocol":"messagepack","version":1}\x1e')  # as the JS client: text
            assert ws.recv(timeout=5) == b"{}\x1e"  # binary from the handshake response on
            ws.send(b"\x01\xc1")  # a record that is no MessagePack array
            frames = frames_until_closed(ws)
            assert frames[-1] == CLOSE_ERROR_MSGPACK
            assert all(isinstance(frame, bytes) for frame in frames)

        with connect(url) as ws:
            call = '{"type":1,"target":"Nope","invocationId":"1","arguments":[]}\x1e'
            ws.send('{"protocol":"json","version":1}\x1e' + call)
            assert ws.recv(timeout=5) == "{}\x1e"
            started = time.monotonic()
            frames = frames_until_closed(ws)  # and then say nothing: the client timeout
            elapsed = time.monotonic() - started
            [answer] = [json.loads(str(f)[:-1]) for f in frames if str(f).startswith('{"type":3')]
            assert answer["invocationId"] == "1"
            assert "Nope" in answer["error"]
            assert PING in frames  # between the 0.5 s broadcasts, the 0.4 s keep-alive
            assert frames[-1] == CLOSE_ERROR
            assert 0.6 < elapsed < 5

        with connect(url) as ws:  # says nothing at all: the handshake timeout
            assert frames_until_closed(ws) == ['{"error":"Handshake was canceled."}\x1e']

        with pytest.raises(InvalidStatus, match="404"):
            connect(f"ws://127.0.0.1:{port}/elsewhere")

        out = stop(server)
    assert "closing: peer timeout" in out and "closing: handshake timeout" in out
