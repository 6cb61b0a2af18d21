"""Issue #9: one hub connection can end itself, never another client or the server.

Findings 1 (Resume with huge numbers took the process down), 2 (a client that
stops reading grew server memory through replays and pongs), 14 (a connection
was registered for role changes only after its 101 went out), and the guard
every connection's tasks run under. Each test runs a real server on
127.0.0.1, and a bystander subscriber must get every event throughout.
"""

from __future__ import annotations

import os
import socket
import struct
from contextlib import suppress
from typing import Any

import pytest
import trio
import trio.lowlevel

import hubserver.connection._session as session_module
from hubserver.auth import DevKey
from hubserver.connection import ACCESS_REVOKED_TEXT
from hubserver.connection._guard import TaskGuard
from hubserver.http._protocol import HttpConnection
from hubserver.permissions import Role

from .conftest import Harness
from .helpers import (
    RS,
    HubClient,
    WsClosed,
    bearer,
    bystander,
    hub_target,
    open_hub,
    open_ws,
    publish_ok,
    upgrade_refused,
)
from .test_resume import RESUME_ARGUMENT_ERROR, Publisher, events_of, new_site, subscribe

CAP = 20.0


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    return shared_dev_key


# -- finding 1: Resume's argument -------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "since"),
    [
        ("json", 10_000_000_000_000_000_000),
        ("json", 2**64),
        ("json", 2**53 + 1),
        ("json", -(2**63) - 1),
        ("messagepack", 2**64 - 1),
        ("messagepack", 2**63),
        ("messagepack", -(2**63)),
    ],
)
async def test_resume_with_a_huge_number_is_an_error_not_a_crash(
    start_server: Any, protocol: str, since: int
) -> None:
    h: Harness = await start_server()
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        async with bystander(h) as b:
            await pub.some(site, 3)
            async with subscribe(h, site, protocol=protocol) as sub:
                await sub.resume(since, invocation_id="huge")
                assert await sub.take(1) == [("done", "huge", RESUME_ARGUMENT_ERROR)]
                await sub.resume(since, invocation_id=None)  # no answer, no harm
                # The connection stays, and the largest allowed seq is fine.
                await sub.resume(2**53, invocation_id="max")
                records = await sub.take(5)
                assert records[-1] == ("done", "max", None), records
                await sub.resume(1, invocation_id="good")
                assert await sub.take(3) == [*events_of(2, 3), ("done", "good", None)]
            await b.check()
    assert h.server.app.stats.crashed == 0


# -- finding 2: every queued byte counts -------------------------------------------------


async def _watch_queued(h: Harness, session_id: int, peak: list[int]) -> None:
    """Keep the connection's largest queued byte count in ``peak[0]``: the budget's proof."""
    while True:
        session = h.server.app.stats.by_id.get(session_id)
        if session is not None:
            peak[0] = max(peak[0], session._out.queued_bytes)
        await trio.sleep(0.005)


async def _until_ended(h: Harness, session_id: int) -> None:
    while session_id in h.server.app.stats.by_id:  # noqa: ASYNC110 (no event to wait on)
        await trio.sleep(0.05)


async def test_a_client_that_resumes_without_reading_is_bounded_then_closed(
    start_server: Any,
) -> None:
    budget = 64 * 1024
    h: Harness = await start_server(max_outbox_bytes=budget, slow_client_timeout=0.5)
    site, pub = new_site(), Publisher(h)
    peak = [0]
    with trio.fail_after(CAP):
        async with bystander(h) as b:
            for _ in range(4):  # history: 200 events of ~1 KB, a replay of ~200 KB
                await pub.some(site, 50, pad="x" * 800)
            h.grant(site, "reader", Role.SITE_ADMIN)
            target = hub_target("entries", site)
            async with open_hub(h, target, token=h.token("reader"), rcvbuf=4096) as client:
                session_id = max(h.server.app.stats.by_id)  # the newest: ours

                async def flood() -> None:
                    # 1,500 Resume(0), never reading: the server must stop reading us.
                    record = ('{"type":1,"target":"Resume","arguments":[0]}' + RS) * 50
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        for _ in range(30):
                            await client.ws.send_text(record)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_watch_queued, h, session_id, peak)
                    nursery.start_soon(flood)
                    await _until_ended(h, session_id)  # fail_after: never closed
                    nursery.cancel_scope.cancel()
            await b.check()
    assert h.server.app.stats.slow_closed == 1
    # One replay (~200 KB) may go over the budget; then nothing more is answered.
    assert peak[0] <= budget + 256 * 1024, peak


async def test_a_ping_flood_without_reading_is_bounded_then_closed(start_server: Any) -> None:
    budget = 64 * 1024
    h: Harness = await start_server(max_outbox_bytes=budget, slow_client_timeout=0.5)
    masked_ping = bytes([0x89, 0x80 | 125]) + b"\0\0\0\0" + b"p" * 125
    sent, peak = [0], [0]
    with trio.fail_after(CAP):
        async with bystander(h) as b:
            site = new_site()
            h.grant(site, "pinger", Role.SITE_ADMIN)
            target = hub_target("entries", site)
            async with open_hub(h, target, token=h.token("pinger"), rcvbuf=4096) as client:
                session_id = max(h.server.app.stats.by_id)

                async def flood() -> None:
                    chunk = masked_ping * 500
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        while sent[0] < 150 * 1024 * 1024:
                            await client.ws.send_raw(chunk)
                            sent[0] += len(chunk)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_watch_queued, h, session_id, peak)
                    nursery.start_soon(flood)
                    await _until_ended(h, session_id)
                    nursery.cancel_scope.cancel()
            await b.check()
    assert h.server.app.stats.slow_closed == 1
    # The server stopped reading: far less than the 150 MiB was ever taken in.
    assert sent[0] < 16 * 1024 * 1024, sent
    # One read's worth of pongs (64 KiB of pings) may go over the budget.
    assert peak[0] <= budget + 80 * 1024, peak


# -- finding 14: registered before the 101 -----------------------------------------------


async def test_a_revoke_while_the_101_is_written_reaches_the_connection(
    start_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow network at the I/O boundary (the front's one write method): the
    # 101's write takes as long as the test wants. The old code registered the
    # connection with the permission watcher only after that write, so a revoke
    # during it was never applied.
    writing, release = trio.Event(), trio.Event()
    write = HttpConnection._write

    async def slow_101(self: HttpConnection, data: bytes) -> None:
        if data[:12] == b"HTTP/1.1 101":
            writing.set()
            await release.wait()
        await write(self, data)

    h: Harness = await start_server(permission_poll_interval=0.05)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(CAP):
        async with bystander(h) as b:
            monkeypatch.setattr(HttpConnection, "_write", slow_101)
            async with trio.open_nursery() as nursery:
                opened: list[Any] = []

                async def upgrade() -> None:
                    opened.append(
                        await open_ws(
                            h.port, hub_target("entries", "s1"), headers=[bearer(h.token())]
                        )
                    )

                nursery.start_soon(upgrade)
                await writing.wait()
                h.store.revoke("s1", "alice")
                await trio.sleep(0.3)  # several watcher rounds while the 101 is written
                release.set()
            monkeypatch.undo()
            (ws,) = opened
            client = HubClient(ws)
            # Answered, then told why, and never joined: no event reaches it.
            assert await client.handshake() == {}
            await publish_ok(h, "entries", {"site_id": "s1"})
            ended = await client.expect_close()
            await ws.aclose()
            await b.check()
    assert ended.close == {"type": 7, "error": ACCESS_REVOKED_TEXT}, ended
    assert h.server.app.stats.revoked_closed == 1


async def test_a_connection_revoked_before_its_handshake_is_told_after_it(
    start_server: Any,
) -> None:
    h: Harness = await start_server(permission_poll_interval=0.05)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(CAP):
        async with bystander(h) as b:
            async with open_hub(h, hub_target("entries", "s1"), handshake=False) as client:
                h.store.revoke("s1", "alice")
                await trio.sleep(0.3)  # several watcher rounds, before any hub handshake
                assert await client.handshake() == {}
                ended = await client.expect_close()
            await b.check()
    assert ended.close == {"type": 7, "error": ACCESS_REVOKED_TEXT}, ended
    assert ended.ws.code == 1000


async def test_a_connection_closed_before_a_handshake_that_never_comes_ends(
    start_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "CLOSE_TIMEOUT", 0.3)
    h: Harness = await start_server(permission_poll_interval=0.05)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(CAP):
        async with open_hub(h, hub_target("entries", "s1"), handshake=False) as client:
            h.store.revoke("s1", "alice")
            started = trio.current_time()
            assert await client.ws.receive() == WsClosed(1000)
            # The watcher's round, the goodbye deadline, and the closing handshake.
            assert trio.current_time() - started < 2.0


# -- the guard ---------------------------------------------------------------------------


async def test_a_failing_task_ends_its_connection_only() -> None:
    crashes: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        guard = TaskGuard(nursery, crashes.append)
        other = TaskGuard(nursery, crashes.append)
        survived = trio.Event()

        async def fail() -> None:
            await trio.lowlevel.checkpoint()
            raise ValueError("a bug of ours")

        async def live_on() -> None:
            await trio.sleep(0.05)
            survived.set()

        guard.start_soon(fail)
        other.start_soon(live_on)
        await survived.wait()
    assert [type(exc) for exc in crashes] == [ValueError]


async def test_closing_a_guard_cancels_its_tasks_and_starts_no_more() -> None:
    ended: list[str] = []
    async with trio.open_nursery() as nursery:
        guard = TaskGuard(nursery, lambda exc: ended.append("crash"))

        async def wait() -> None:
            try:
                await trio.sleep_forever()
            finally:
                ended.append("cancelled")

        guard.start_soon(wait)
        await trio.sleep(0.01)
        guard.close()
        guard.start_soon(wait)  # too late: never runs
    assert ended == ["cancelled"]


# -- found in review ---------------------------------------------------------------------


async def test_the_fast_path_is_off_whenever_output_waits(start_server: Any) -> None:
    # A client that pings and reads slowly: while a pong waits for the writer,
    # an event's direct write would overtake (or tear) it. The old fast-path flag
    # stayed on while the writer ran. Small socket buffers make the pongs wait.
    h: Harness = await start_server(resume_window=0, max_outbox_bytes=1 << 24)
    masked_ping = bytes([0x89, 0x80 | 125]) + b"\0\0\0\0" + b"p" * 125
    site, pub = new_site(), Publisher(h)
    h.grant(site, "pinger", Role.SITE_ADMIN)
    with trio.fail_after(CAP):
        target = hub_target("entries", site)
        async with open_hub(h, target, token=h.token("pinger"), rcvbuf=4096) as client:
            session = h.server.app.stats.by_id[max(h.server.app.stats.by_id)]
            sock = socket.socket(fileno=os.dup(session._fd))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sock.close()
            await pub.some(site, 1)
            assert (await client.next_event())["seq"] == 1
            await trio.sleep(0.05)
            assert session._direct  # the fast path is on: nothing waits
            waited = 0
            for i in range(2000):
                await client.ws.send_raw(masked_ping)
                await trio.lowlevel.checkpoint()
                out = session._out
                waited += not out.is_idle
                assert not (session._direct and not out.is_idle), f"ping {i}"
            assert waited, "no pong ever waited: the test proved nothing"
            await pub.some(site, 1)
            assert (await client.next_event())["seq"] == 2  # and the stream is intact


async def test_a_client_that_resets_right_after_its_handshake_is_no_crash(
    start_server: Any,
) -> None:
    # The handshake answer's write fails (RST): the connection ends, quietly.
    h: Harness = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(CAP):
        async with bystander(h) as b:
            for _ in range(20):
                ws = await open_ws(h.port, hub_target("entries", "s1"), headers=[bearer(h.token())])
                await ws.send_text('{"protocol":"json","version":1}' + RS)
                ws.stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                await ws.aclose()
            await trio.sleep(0.2)
            await b.check()
    assert h.server.app.stats.crashed == 0


async def test_a_replay_over_the_budget_does_not_close_a_reader_at_the_next_event(
    start_server: Any,
) -> None:
    h: Harness = await start_server(max_outbox_bytes=64 * 1024, slow_client_timeout=5.0)
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        for _ in range(4):  # a replay of ~200 KB: three times the budget
            await pub.some(site, 50, pad="x" * 800)
        async with subscribe(h, site) as sub:
            await sub.resume(0, invocation_id="r")
            await pub.some(site, 1)  # live, while the replay waits for the reader
            records = await sub.take(202)
    assert records == [*events_of(*range(1, 201)), ("done", "r", None), *events_of(201)]
    assert h.server.app.stats.slow_closed == 0


@pytest.mark.parametrize(
    ("since", "status"),
    [("9007199254740992", 101), ("9007199254740993", 400), ("99999999999999999", 400)],
)
async def test_since_seq_is_bounded_like_resume(start_server: Any, since: str, status: int) -> None:
    h: Harness = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(CAP):
        target = hub_target("entries", "s1") + f"&since_seq={since}"
        if status == 101:
            async with open_hub(h, target) as client:
                assert (await client.next_message())["target"] == "Gap"
        else:
            refused = await upgrade_refused(h.port, target, token=h.token())
            assert refused.status == status
