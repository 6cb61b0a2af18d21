"""``hubserver serve --workers 2``: real processes on one port, one event stream.

The server runs as the command line runs it; the test reads the parent's log
for the port, mints tokens with the development key the parent made, and
talks to whichever worker the kernel picks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from hubserver.app import HUB_SCOPE, PUBLISH_SCOPE
from hubserver.auth import DevKey, ensure_dev_key
from hubserver.permissions import Role, SqlitePermissionStore

from .helpers import hub_target, open_hub, publish_ok

CAP = 60


@dataclass
class Workers:
    """Enough of the Harness interface for the shared helpers."""

    process: trio.Process
    port: int
    key: DevKey
    log: list[str]
    lot: trio.lowlevel.ParkingLot

    async def wait_workers(self, count: int) -> None:
        """Until the parent has logged ``count`` worker starts."""
        while len(self.worker_pids()) < count:
            await self.lot.park()

    def token(self, subject: str = "alice", scopes: tuple[str, ...] = (HUB_SCOPE,)) -> str:
        return self.key.mint(subject, scopes, 3600, time.time())

    def publisher_token(self) -> str:
        return self.token("backend", (PUBLISH_SCOPE,))

    def worker_pids(self) -> set[int]:
        pids = set()
        for line in self.log:
            if "started (pid " in line:
                pids.add(int(line.rsplit("pid ", 1)[1].rstrip(")")))
        return pids


@asynccontextmanager
async def run_workers(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Workers]:
    data = tmp_path / "data"
    with SqlitePermissionStore.open(data) as store:
        store.grant("s1", "alice", Role.SITE_ADMIN)
    command = [
        sys.executable,
        "-m",
        "hubserver",
        "serve",
        "--workers",
        "2",
        "--port",
        "0",
        "--data-dir",
        str(data),
        "--resume-window",
        "0",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBSERVER_")}
    process = await trio.lowlevel.open_process(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    log: list[str] = []
    lot = trio.lowlevel.ParkingLot()  # woken at every new log line
    port_found = trio.Event()
    port = 0

    async def read_log() -> None:
        nonlocal port
        assert process.stderr is not None
        buffer = b""
        async for chunk in process.stderr:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                log.append(text)
                lot.unpark_all()
                if "workers on http://" in text:
                    port = int(text.rsplit(":", 1)[1])
                    port_found.set()

    nursery.start_soon(read_log)
    try:
        with trio.fail_after(20):
            await port_found.wait()
            # Both workers listening: wait until two different pids answer.
            workers = Workers(process, port, ensure_dev_key(data), log, lot)
            await workers.wait_workers(2)
        yield workers
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(20):
                await process.wait()
            if process.returncode is None:
                process.kill()


async def _ready(w: Workers) -> None:
    """Until a hub connection works (the workers bind right after they start)."""
    while True:
        try:
            async with open_hub(w, hub_target("entries", "s1")):  # type: ignore[arg-type]
                return
        except OSError:
            await trio.sleep(0.1)


async def test_workers_share_one_stream_and_restart(tmp_path: Path, nursery: trio.Nursery) -> None:
    with trio.fail_after(CAP):
        async with run_workers(tmp_path, nursery) as w:
            await _ready(w)
            async with (
                open_hub(w, hub_target("entries", "s1")) as a,  # type: ignore[arg-type]
                open_hub(w, hub_target("entries", "s1")) as b,  # type: ignore[arg-type]
                open_hub(w, hub_target("entries", "s1")) as c,  # type: ignore[arg-type]
            ):
                for _ in range(3):
                    await publish_ok(w, "entries", {"site_id": "s1"})  # type: ignore[arg-type]
                for client in (a, b, c):
                    assert [(await client.next_event())["seq"] for _ in range(3)] == [1, 2, 3]

            # A worker dies: the parent starts another; the stream goes on.
            before = w.worker_pids()
            os.kill(max(before), signal.SIGKILL)
            await w.wait_workers(3)
            assert any("exited with -9; restarting" in line for line in w.log)
            await _ready(w)
            target = f"{hub_target('entries', 's1')}&since_seq=2"
            async with open_hub(w, target) as late:  # type: ignore[arg-type]
                await publish_ok(w, "entries", {"site_id": "s1"})  # type: ignore[arg-type]
                assert [(await late.next_event())["seq"] for _ in range(2)] == [3, 4]

        # SIGTERM drained everything and the parent exited cleanly.
        assert w.process.returncode == 0, w.log[-10:]
