"""``hubserver serve --workers 2``: real processes on one port, one event stream.

The server runs as the command line runs it; the test reads the parent's log
for the port, mints tokens with the development key the parent made, and
talks to whichever worker the kernel picks.
"""

from __future__ import annotations

import json
import os
import signal
import site
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from hubserver.app import ADMIN_SCOPE, HUB_SCOPE, PUBLISH_SCOPE
from hubserver.auth import DevKey, ensure_dev_key
from hubserver.connection import ACCESS_REVOKED_TEXT
from hubserver.permissions import Role, SqlitePermissionStore

from .helpers import (
    HubClient,
    HubClosed,
    ProcessLog,
    ResponseReader,
    bearer,
    build_request,
    http_request,
    hub_target,
    open_hub,
    open_tcp,
    publish_ok,
)
from .role_backend import role_backend

CAP = 60
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
async def run_workers(
    tmp_path: Path,
    nursery: trio.Nursery,
    *extra: str,
    new_session: bool = False,
    interpreter: str = sys.executable,
    env_extra: dict[str, str] | None = None,
) -> AsyncIterator[Workers]:
    data = tmp_path / "data"
    with SqlitePermissionStore.open(data) as store:
        store.grant("s1", "alice", Role.SITE_ADMIN)
    command = [
        interpreter,
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
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBSERVER_")}
    env["HUBSERVER_LOG_FORMAT"] = "text"  # read as text lines (a pipe gets JSON by default)
    env.update(env_extra or {})
    process = await trio.lowlevel.open_process(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        # Its own process group: a test can signal the parent and its workers at once.
        start_new_session=new_session,
    )
    log = ProcessLog()
    assert process.stderr is not None
    nursery.start_soon(log.pump, process.stderr)
    try:
        with trio.fail_after(20):
            port = int((await log.wait_for(r"workers on http://.*:(\d+)")).group(1))
            # Both workers listening: wait until two different pids answer.
            workers = Workers(process, port, ensure_dev_key(data), log.lines, log.lot)
            await workers.wait_workers(2)
        yield workers
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(20):
                await process.wait()
            if process.returncode is None:
                process.kill()
        # Whatever the test did to the parent, no worker outlives the test.
        for pid in _live_worker_pids(log.lines):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


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


# -- helpers for the tests below -------------------------------------------------------


def _is_alive(pid: int) -> bool:
    """A process that runs (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _live_worker_pids(log: list[str]) -> set[int]:
    pids = set()
    for line in log:
        if "started (pid " in line:
            pid = int(line.rsplit("pid ", 1)[1].rstrip(")"))
            try:
                is_ours = b"hubserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if is_ours and _is_alive(pid):
                pids.add(pid)
    return pids


def _owner(port: int, client: trio.SocketStream, pids: set[int]) -> int | None:
    """Which worker accepted ``client``: its server-side socket in /proc (Linux)."""
    client_port = client.socket.getsockname()[1]
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) == client_port:
            inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    return None


async def _one_per_worker(
    w: Workers, stack: AsyncExitStack, target: str, pids: set[int], token: str | None = None
) -> dict[int, HubClient]:
    """A subscriber on every worker (the kernel picks; open until each has one)."""
    by_pid: dict[int, HubClient] = {}
    for _ in range(60):
        client = await stack.enter_async_context(open_hub(w, target, token=token))  # type: ignore[arg-type]
        pid = _owner(w.port, client.ws.stream, pids)
        if pid is not None and pid not in by_pid:
            by_pid[pid] = client
            if len(by_pid) == len(pids):
                return by_pid
        else:
            await client.aclose()
    raise AssertionError(f"could not reach every worker: {by_pid.keys()} of {pids}")


class KeepAlivePublisher:
    """Publishes on one HTTP/1.1 keep-alive connection, so on one chosen worker."""

    def __init__(self, w: Workers, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = ResponseReader(stream)
        self.headers = [("Content-Type", "application/json"), bearer(w.publisher_token())]

    async def publish(self, events: list[dict[str, Any]]) -> None:
        body = json.dumps(events).encode()
        raw = build_request(
            "POST", "/v1/events/entries", headers=self.headers, body=body, close=False
        )
        await self.stream.send_all(raw)
        response = await self.reader.read_response()
        assert response.status == 202, response


async def _publisher_on(w: Workers, stack: AsyncExitStack, pid: int) -> KeepAlivePublisher:
    for _ in range(60):
        stream = await open_tcp(w.port)
        publisher = KeepAlivePublisher(w, stream)
        await publisher.publish([{"site_id": "warmup"}])  # accepted: visible in /proc now
        if _owner(w.port, stream, {pid}) == pid:
            await stack.enter_async_context(stream)
            return publisher
        await stream.aclose()
    raise AssertionError(f"no publishing connection reached worker {pid}")


# -- finding 5: a worker that falls behind ---------------------------------------------


@pytest.mark.parametrize("history_size", [100_000, 40], ids=["history-reaches", "history-short"])
async def test_worker_behind_is_disconnected_and_recovers_from_history(
    tmp_path: Path, nursery: trio.Nursery, history_size: int
) -> None:
    """A stopped worker is cut off at the bound; resumed, its subscriber misses nothing.

    While one worker is stopped (SIGSTOP), events are published through the
    other until the parent's queue for the stopped one passes
    ``--broker-max-queue-bytes``: the parent drops that queue and closes the
    stream. Resumed, the worker resubscribes and fetches the rest from
    history: its subscriber gets every seq in order, or, when history no
    longer reaches back, a Gap and then every seq history holds. The
    bystander on the other worker gets every event throughout.
    """
    target = hub_target("entries", "s1")
    extra = ["--broker-max-queue-bytes", "65536", "--history-size", str(history_size)]
    extra += ["--max-outbox-bytes", str(64 << 20)]  # the test reads in bursts
    with trio.fail_after(CAP):
        async with run_workers(tmp_path, nursery, *extra) as w, AsyncExitStack() as stack:
            await _ready(w)
            pids = _live_worker_pids(w.log)
            assert len(pids) == 2
            clients = await _one_per_worker(w, stack, target, pids)
            stopped_pid, running_pid = sorted(pids)
            victim, bystander = clients[stopped_pid], clients[running_pid]
            publisher = await _publisher_on(w, stack, running_pid)

            await publisher.publish([{"site_id": "s1"} for _ in range(3)])
            for client in (victim, bystander):
                assert [(await client.next_event())["seq"] for _ in range(3)] == [1, 2, 3]

            seen_by_bystander: list[int] = []
            bystander_lot = trio.lowlevel.ParkingLot()

            async def read_bystander() -> None:
                while True:
                    seen_by_bystander.append((await bystander.next_event())["seq"])
                    bystander_lot.unpark_all()

            async def bystander_has(seq: int) -> None:
                while not seen_by_bystander or seen_by_bystander[-1] < seq:
                    await bystander_lot.park()

            reading = await stack.enter_async_context(trio.open_nursery())
            reading.start_soon(read_bystander)
            stack.callback(reading.cancel_scope.cancel)
            batch = [{"site_id": "s1", "pad": "x" * 500} for _ in range(40)]  # ~22 KB a frame
            last_seq = 3
            os.kill(stopped_pid, signal.SIGSTOP)
            try:
                # The kernel's socket buffer takes a few hundred KB, then the
                # parent's queue grows to the 64 KiB bound.
                for _ in range(100):
                    await publisher.publish(batch)
                    last_seq += len(batch)
                    if any("behind the event stream" in line for line in w.log):
                        break
                else:
                    raise AssertionError("the parent never disconnected the stopped worker")
                # Published while that worker has no stream at all: history only.
                await publisher.publish(batch)
                last_seq += len(batch)
                # Live on the other worker while this one is stopped.
                await bystander_has(last_seq)
            finally:
                os.kill(stopped_pid, signal.SIGCONT)
            assert any(f"worker (pid {stopped_pid}) fell" in line for line in w.log), w.log[-5:]

            seqs: list[int] = []
            gaps: list[int] = []
            while not seqs or seqs[-1] < last_seq:
                message = await victim.next_message()
                assert not isinstance(message, HubClosed), message
                if message["target"] == "Gap":
                    gaps.append(message["arguments"][0])
                    continue
                assert message["target"] == "ReceiveMessage", message
                seqs.append(json.loads(message["arguments"][0])["seq"])
            if history_size >= last_seq:
                assert gaps == []
                assert seqs == list(range(4, last_seq + 1))
            else:
                # What the worker read before the cut, then a Gap, then all history holds.
                (first_available,) = gaps
                assert first_available == last_seq - history_size + 1
                before = seqs[: seqs.index(first_available)]
                assert before == list(range(4, 4 + len(before)))
                assert seqs[len(before) :] == list(range(first_available, last_seq + 1))
            assert any("broker closed the event stream; resubscribing" in line for line in w.log)

            # The recovered worker is live again; the bystander never missed a thing.
            await publisher.publish([{"site_id": "s1"}])
            assert (await victim.next_event())["seq"] == last_seq + 1
            await bystander_has(last_seq + 1)
            assert seen_by_bystander == list(range(4, last_seq + 2))


# -- finding 9: shutdown ---------------------------------------------------------------


async def _read_close_message(client: HubClient) -> dict[str, Any]:
    """Hub messages up to the Close, without answering the WebSocket close after it."""
    while True:
        message = await client.next_message()
        assert not isinstance(message, HubClosed), f"no Close before the end: {message}"
        if message["type"] == 7:
            return dict(message)


async def test_sigterm_to_every_process_drains_every_client(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """systemd's KillMode=control-group, Ctrl-C: every process is signalled, twice.

    The parent's forwarded SIGTERM reaches workers that are already draining,
    and a second round of signals arrives while one client holds a drain open
    (it reads the Close but never answers the WebSocket close). Nothing cuts a
    drain short: every client gets a reconnectable Close, every worker and the
    parent exit 0.
    """
    target = hub_target("entries", "s1")
    with trio.fail_after(CAP):
        async with (
            run_workers(tmp_path, nursery, "--drain-timeout", "3", new_session=True) as w,
            AsyncExitStack() as stack,
        ):
            await _ready(w)
            pids = _live_worker_pids(w.log)
            clients = list((await _one_per_worker(w, stack, target, pids)).values())
            clients += [await stack.enter_async_context(open_hub(w, target)) for _ in range(4)]  # type: ignore[arg-type]
            lingering = await stack.enter_async_context(open_hub(w, target))  # type: ignore[arg-type]

            os.killpg(w.process.pid, signal.SIGTERM)
            close = await _read_close_message(lingering)
            assert close.get("allowReconnect") is True, close
            # Its worker now waits for the closing handshake that never comes.
            await trio.sleep(0.3)
            os.killpg(w.process.pid, signal.SIGINT)
            os.killpg(w.process.pid, signal.SIGTERM)
            for client in clients:
                ended = await client.expect_close()
                assert ended.close is not None, "cut off without a Close"
                assert ended.close.get("allowReconnect") is True, ended.close
            assert await w.process.wait() == 0, w.log[-10:]
            # The parent's last lines may still be on their way through the pipe.
            with trio.fail_after(5):
                for pid in pids:
                    while not any(f"(pid {pid}) stopped with exit code 0" in x for x in w.log):
                        await w.lot.park()
            assert any("received SIGINT again: already draining" in line for line in w.log)


async def test_workers_exit_when_their_parent_is_killed(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """SIGKILL of the parent: every worker drains briefly and is gone within 5 s."""
    target = hub_target("entries", "s1")
    with trio.fail_after(CAP):
        async with run_workers(tmp_path, nursery) as w, AsyncExitStack() as stack:
            await _ready(w)
            pids = _live_worker_pids(w.log)
            clients = await _one_per_worker(w, stack, target, pids)
            w.process.kill()
            killed_at = trio.current_time()
            with trio.fail_after(5.0):  # a worker that outlives its parent never closes
                for client in clients.values():
                    ended = await client.expect_close()
                    assert ended.close is not None and ended.close.get("allowReconnect") is True
            while any(_is_alive(pid) for pid in pids):
                assert trio.current_time() - killed_at < 5.0, "a worker outlived its parent"
                await trio.sleep(0.05)


async def test_a_worker_that_cannot_be_restarted_is_retried_and_shutdown_still_works(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Found in review: one failed restart (the interpreter gone after a deploy,
    out of processes) stopped the parent's broker and hung the parent."""
    python = tmp_path / "python"
    python.symlink_to(sys.executable)
    # The link is outside the venv: the venv's packages and this checkout by path.
    paths = [*site.getsitepackages(), REPO_ROOT]
    env = {"PYTHONPATH": os.pathsep.join(paths)}
    with trio.fail_after(CAP):
        async with run_workers(tmp_path, nursery, interpreter=str(python), env_extra=env) as w:
            await _ready(w)
            python.unlink()  # a deploy replaced the interpreter
            victim, *_ = sorted(_live_worker_pids(w.log))
            os.kill(victim, signal.SIGKILL)
            while not any("could not be started" in line for line in w.log):
                await w.lot.park()
            await _ready(w)  # the other worker still serves, with its event stream
            (event_id,) = await publish_ok(w, "entries", {"site_id": "s1"})  # type: ignore[arg-type]
            assert event_id
            w.process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                await w.process.wait()
    assert w.process.returncode == 0, w.log[-20:]


# -- permission change notices reach every worker ---------------------------------------


async def test_a_backend_notice_to_one_worker_revokes_on_every_worker(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """``--permissions-url`` without Redis: the backend's ``POST
    /v1/permissions/changed`` reaches one worker (the kernel picks); the
    parent's broker passes it to the others, so alice's connection on every
    worker closes at once. The TTL (600 s) is far: nothing else could close
    them in time. Bob, on every worker too, is not touched."""
    target = hub_target("entries", "s1")
    async with role_backend() as backend, AsyncExitStack() as stack:
        backend.roles["s1", "alice"] = "site_admin"
        backend.roles["s1", "bob"] = "site_admin"
        with trio.fail_after(CAP):
            w = await stack.enter_async_context(
                run_workers(
                    tmp_path,
                    nursery,
                    "--permissions-url",
                    backend.url(),
                    "--permissions-ttl",
                    "600",
                )
            )
            await _ready(w)
            pids = _live_worker_pids(w.log)
            alices = await _one_per_worker(w, stack, target, pids)
            bobs = await _one_per_worker(w, stack, target, pids, token=w.token("bob"))
            asked = len(backend.requests)

            backend.roles["s1", "alice"] = None
            admin = w.token("acl-backend", (ADMIN_SCOPE,))
            response = await http_request(
                w.port,
                "POST",
                "/v1/permissions/changed",
                headers=[("Content-Type", "application/json"), bearer(admin)],
                body=b'{"site_id": "s1", "subject": "alice"}',
            )
            assert response.status == 202, response
            with trio.fail_after(2):
                for alice in alices.values():
                    closed = await alice.expect_close()
                    assert closed.close is not None
                    assert closed.close.get("error") == ACCESS_REVOKED_TEXT
            # Each worker dropped its cached answer and asked again, about alice only.
            assert sorted(backend.requests[asked:]) == [("s1", "alice")] * len(pids)
            (event_id,) = await publish_ok(w, "entries", {"site_id": "s1"})  # type: ignore[arg-type]
            for bob in bobs.values():
                assert (await bob.next_event())["id"] == event_id
