"""Change notices between the workers of one node, through the parent's broker.

In this process: a real ``BrokerServer`` on a unix socket, real
``BrokerMessages`` ends and URL stores (two "workers") against a real local
HTTP backend. Real worker processes are in ``test_workers.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from hubserver.backplane import BackplaneUnavailable, BrokerMessages, BrokerServer, MemoryBackplane
from hubserver.backplane._unix import MAX_MESSAGE_BYTES, _FrameReader, _pack
from hubserver.permissions import (
    PermissionChange,
    PermissionStoreUnavailable,
    Role,
    UrlPermissionStore,
    WorkerNoticeChannel,
)

from .role_backend import RoleBackend, role_backend

CAP = 10.0
ME = "subject-1"


class Heard:
    """What one listener received, and a wake-up per message."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.reconnects = 0
        self.lot = trio.lowlevel.ParkingLot()

    def on_message(self, data: bytes) -> None:
        self.messages.append(data)
        self.lot.unpark_all()

    def on_reconnect(self) -> None:
        self.reconnects += 1
        self.lot.unpark_all()

    async def wait_for(self, count: int) -> None:
        while len(self.messages) < count:
            await self.lot.park()


async def listen(nursery: trio.Nursery, path: Path) -> Heard:
    heard = Heard()
    await nursery.start(BrokerMessages(path).run, heard.on_message, heard.on_reconnect)
    return heard


@pytest.fixture
async def broker(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Path]:
    path = tmp_path / "broker.sock"
    server = BrokerServer(MemoryBackplane(), path, max_queued_messages=4)
    await nursery.start(server.serve)
    yield path


async def test_a_message_reaches_every_listening_worker_in_order(
    broker: Path, nursery: trio.Nursery
) -> None:
    with trio.fail_after(CAP):
        first, second = await listen(nursery, broker), await listen(nursery, broker)
        sender = BrokerMessages(broker)
        for index in range(3):
            await sender.send(b"note %d" % index)
        for heard in (first, second):
            await heard.wait_for(3)
            assert heard.messages == [b"note 0", b"note 1", b"note 2"]
            assert heard.reconnects == 0


async def test_a_worker_that_stops_reading_is_dropped_and_the_others_are_not_held_up(
    broker: Path, nursery: trio.Nursery
) -> None:
    """The parent queues at most ``max_queued_messages`` (4 here) for a worker;
    past that it closes that worker's stream instead of growing or waiting."""
    with trio.fail_after(CAP):
        bystander = await listen(nursery, broker)
        async with await trio.open_unix_socket(str(broker)) as stuck:
            await stuck.send_all(_pack(["msgs"]))
            assert await _FrameReader(stuck).next() == ["subscribed"]
            sender = BrokerMessages(broker)
            # Big messages fill the kernel's socket buffer after a few; then the queue.
            big = b"x" * (MAX_MESSAGE_BYTES - 64)
            count = 64
            for _ in range(count):
                await sender.send(big)
            await bystander.wait_for(count)
            # The stuck worker reads what was written before it was dropped, then EOF.
            received = 0
            while chunk := await stuck.receive_some(1 << 20):
                received += len(chunk)
            assert 0 < received < count * len(big)
        assert bystander.reconnects == 0


async def test_a_listener_that_lost_its_stream_says_so_when_back(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    path = tmp_path / "broker.sock"
    with trio.fail_after(CAP):
        async with trio.open_nursery() as parent:
            await parent.start(BrokerServer(MemoryBackplane(), path).serve)
            heard = await listen(nursery, path)
            parent.cancel_scope.cancel()  # the parent's broker goes away
        with pytest.raises(BackplaneUnavailable, match="unreachable"):
            await BrokerMessages(path).send(b"lost")
        await nursery.start(BrokerServer(MemoryBackplane(), path).serve)
        while heard.reconnects == 0:
            await heard.lot.park()
        await BrokerMessages(path).send(b"after")
        await heard.wait_for(1)
        assert heard.messages == [b"after"]


async def test_a_message_over_the_limit_is_refused(broker: Path) -> None:
    with trio.fail_after(CAP), pytest.raises(BackplaneUnavailable, match="refused"):
        await BrokerMessages(broker).send(b"x" * (MAX_MESSAGE_BYTES + 1))


# -- two URL stores (two workers) on one broker --------------------------------------------


@pytest.fixture
async def backend() -> AsyncIterator[RoleBackend]:
    async with role_backend() as running:
        yield running


async def test_a_notice_to_one_worker_drops_the_answer_of_every_worker(
    backend: RoleBackend, broker: Path, nursery: trio.Nursery
) -> None:
    workers = [
        UrlPermissionStore(backend.url(), relay=WorkerNoticeChannel(broker)) for _ in range(2)
    ]
    channels = [trio.open_memory_channel[PermissionChange](10) for _ in workers]
    try:
        with trio.fail_after(CAP):
            for store, (send, _) in zip(workers, channels, strict=True):
                nursery.start_soon(store.watch_changes, send.send_nowait)
            await trio.testing.wait_all_tasks_blocked()  # both listening
            backend.roles["s1", ME] = "site_admin"
            for store in workers:
                assert await store.role_of("s1", ME) is Role.SITE_ADMIN
            del backend.roles["s1", ME]

            await workers[0].announce("s1", ME)  # the backend's request reached worker 0
            expected = PermissionChange(pairs=frozenset({("s1", ME)}), version=1)
            for _, heard in channels:
                assert await heard.receive() == expected
            for store in workers:
                assert await store.role_of("s1", ME) is None  # asked again
            await trio.testing.wait_all_tasks_blocked()
            for _, heard in channels:
                with pytest.raises(trio.WouldBlock):  # once each
                    heard.receive_nowait()
    finally:
        for store in workers:
            await store.aclose()


async def test_a_parent_that_cannot_be_reached_leaves_the_notice_on_this_worker(
    backend: RoleBackend, tmp_path: Path
) -> None:
    store = UrlPermissionStore(backend.url(), relay=WorkerNoticeChannel(tmp_path / "gone.sock"))
    heard: list[PermissionChange] = []
    try:
        with trio.fail_after(CAP):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.watch_changes, heard.append)
                backend.roles["s1", ME] = "site_admin"
                assert await store.role_of("s1", ME) is Role.SITE_ADMIN
                del backend.roles["s1", ME]
                with pytest.raises(PermissionStoreUnavailable, match="other workers"):
                    await store.announce("s1", ME)
                assert heard == [PermissionChange(pairs=frozenset({("s1", ME)}), version=1)]
                assert await store.role_of("s1", ME) is None
                nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_a_parent_away_for_a_while_is_one_warning_not_one_per_retry(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "broker.sock"
    with trio.fail_after(CAP):
        async with trio.open_nursery() as parent:
            await parent.start(BrokerServer(MemoryBackplane(), path).serve)
            heard = await listen(nursery, path)
            parent.cancel_scope.cancel()
        caplog.clear()
        await trio.sleep(3)  # retries back off to 2 s: several in this time
        await nursery.start(BrokerServer(MemoryBackplane(), path).serve)
        while heard.reconnects == 0:
            await heard.lot.park()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("message stream lost" in w for w in warnings) == 1, warnings
    assert sum("message stream back" in w for w in warnings) == 1, warnings
