"""Fixtures for server tests: a real hubserver on 127.0.0.1, real keys, real tokens."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio

from hubserver.app import HUB_SCOPE, PUBLISH_SCOPE
from hubserver.auth import DevKey, ensure_dev_key
from hubserver.config import ServerConfig
from hubserver.permissions import InMemoryPermissionStore, Role
from hubserver.server import RunningServer, serve


@dataclass
class Harness:
    """A running server plus what a test needs to talk to it."""

    server: RunningServer
    key: DevKey
    store: InMemoryPermissionStore
    config: ServerConfig

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def base(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def token(
        self,
        subject: str = "alice",
        scopes: tuple[str, ...] = (HUB_SCOPE,),
        ttl: float = 3600.0,
        **kwargs: Any,
    ) -> str:
        return self.key.mint(subject, scopes, ttl, time.time(), **kwargs)

    def publisher_token(self) -> str:
        return self.token("backend", (PUBLISH_SCOPE,))

    def grant(self, site: str, subject: str, role: Role) -> None:
        self.store.grant(site, subject, role)


StartServer = Callable[..., Any]


@pytest.fixture
def dev_key(tmp_path: Path) -> DevKey:
    return ensure_dev_key(tmp_path / "data")


@pytest.fixture
async def start_server(
    nursery: trio.Nursery, tmp_path: Path, dev_key: DevKey
) -> AsyncIterator[Callable[..., Any]]:
    """``await start_server(**config_overrides) -> Harness``; stopped at test end."""
    running: list[RunningServer] = []

    async def start(**overrides: Any) -> Harness:
        config = replace(
            ServerConfig(port=0, data_dir=tmp_path / "data", permission_poll_interval=0.2),
            **overrides,
        )
        store = InMemoryPermissionStore()
        server: RunningServer = await nursery.start(
            lambda task_status: serve(
                config, store=store, verifier=dev_key.verifier(), task_status=task_status
            )
        )
        running.append(server)
        return Harness(server=server, key=dev_key, store=store, config=config)

    yield start
    for server in running:
        server.request_shutdown()


@asynccontextmanager
async def shutdown_after(server: RunningServer) -> AsyncIterator[None]:
    try:
        yield
    finally:
        server.request_shutdown()


@pytest.fixture(scope="session")
def shared_dev_key(tmp_path_factory: pytest.TempPathFactory) -> DevKey:
    """One development key for the whole run: RSA key generation costs ~0.1 s a test.

    A test module opts in by overriding ``dev_key`` with it (the test_server_* files do).
    """
    return ensure_dev_key(tmp_path_factory.mktemp("shared-dev-key"))


@pytest.fixture(autouse=True)
def _no_handler_crash(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A connection handler that dies with an exception is a bug, whatever the test saw.

    The per-connection boundary (``server._handle``) logs and swallows any
    exception so one connection cannot take the server down; without this
    check such a bug would only show up as a log line.
    """
    yield
    crashes = [
        record
        for record in caplog.get_records("call")
        if record.name.startswith("hubserver")
        and "connection handler failed" in record.getMessage()
    ]
    assert not crashes, f"a connection handler crashed: {crashes[0].exc_text or crashes[0]}"
