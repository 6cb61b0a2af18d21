"""Roles shared by a fleet (issue #12, item 2), end to end.

- Two ``hubserver serve`` processes on one real redis-server, roles changed
  with the real ``hubserver members`` CLI: a grant through one machine's
  setting is seen by both nodes; a revoke closes the subject's connections on
  every node within 2 s, through the change notice (the version poll is set
  to 30 s, so nothing else could), and a bystander stays.
- In-process nodes for what needs a hand on Redis: a notice lost (the change
  written without one) is caught by the version check; a Redis that hangs
  keeps open connections and answers new ones 503, then recovers.
- The access-control backend as the source (a real local HTTP server): its
  change notices on ``POST /v1/permissions/changed`` close a revoked
  connection at once, relayed to every node through Redis.
- A re-check of everyone (after an outage, a lost notice, every
  ``--permissions-ttl``) against that backend answering slowly: it asks once
  per (site, subject) pair, several at once, and a revoke's notice during it
  closes its connection at once, not when everyone is through.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from hubserver.app import ADMIN_SCOPE, HUB_SCOPE, PUBLISH_SCOPE
from hubserver.auth import DevKey, ensure_dev_key
from hubserver.config import ConfigError, ServerConfig
from hubserver.connection import ACCESS_REVOKED_TEXT
from hubserver.permissions import RedisPermissionStore, Role, SqlitePermissionStore
from hubserver.permissions._url import DEFAULT_MAX_CONNECTIONS
from hubserver.server import RunningServer, serve

from .helpers import (
    HttpResponse,
    HubClient,
    ProcessLog,
    bearer,
    build_request,
    exchange,
    http_request,
    hub_target,
    open_hub,
    publish_ok,
    upgrade_headers,
    upgrade_refused,
)
from .redis_fixture import RedisServer, own_redis_server_fixture  # noqa: F401 (a fixture)
from .role_backend import RoleBackend, role_backend
from .test_permission_redis import raw

CAP = 30.0  # seconds, per test


@dataclass
class Node:
    """A server (a process, or in this process) and what the helpers need of it."""

    port: int
    key: DevKey
    config: ServerConfig | None = None
    server: RunningServer | None = None

    def token(self, subject: str = "alice", scopes: tuple[str, ...] = (HUB_SCOPE,)) -> str:
        import time

        return self.key.mint(subject, scopes, 3600.0, time.time())

    def publisher_token(self) -> str:
        return self.token("backend", (PUBLISH_SCOPE,))


async def expect_revoked(client: HubClient) -> None:
    closed = await client.expect_close()
    assert closed.close is not None, closed
    assert closed.close.get("error") == ACCESS_REVOKED_TEXT
    assert not closed.close.get("allowReconnect", False)


async def still_served(node: Node, site: str, *clients: HubClient) -> None:
    """Each of ``clients`` gets the next event published to ``site`` (through ``node``)."""
    with trio.fail_after(5):
        (event_id,) = await publish_ok(node, "entries", {"site_id": site})  # type: ignore[arg-type]
        for client in clients:
            assert (await client.next_event())["id"] == event_id


# --- two node processes, the CLI between them --------------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBSERVER_")}
    env.update(extra)
    return env


@asynccontextmanager
async def node_process(
    data_dir: Path, redis_url: str, nursery: trio.Nursery, *extra: str
) -> AsyncIterator[Node]:
    """``hubserver serve --backplane REDIS`` as its own process (roles: Redis by default)."""
    command = [sys.executable, "-m", "hubserver", "serve", "--port", "0"]
    command += ["--data-dir", str(data_dir), "--backplane", redis_url, *extra]
    process = await trio.lowlevel.open_process(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_clean_env(),
    )
    log = ProcessLog()
    assert process.stderr is not None
    nursery.start_soon(log.pump, process.stderr)
    try:
        with trio.fail_after(20):
            port = int((await log.wait_for(r"listening on http://.*:(\d+)")).group(1))
        yield Node(port, ensure_dev_key(data_dir))
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(15):
            await process.wait()
        if process.returncode is None:
            process.kill()


async def members_cli(*args: str, env: dict[str, str]) -> str:
    done = await trio.run_process(
        [sys.executable, "-m", "hubserver", "members", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr.decode()
    return str(done.stdout.decode())


async def test_two_nodes_share_roles_and_a_revoke_closes_on_every_node_within_2_s(
    own_redis_server: RedisServer, tmp_path: Path, nursery: trio.Nursery
) -> None:
    url = own_redis_server.url
    data = tmp_path / "data"  # both nodes trust the same development key
    with trio.fail_after(CAP):
        async with node_process(data, url, nursery) as a, node_process(data, url, nursery) as b:
            for node in (a, b):
                node_config = await http_request(node.port, "GET", "/readyz")
                assert node_config.status == 200
            # On node A's machine, where HUBSERVER_BACKPLANE is the nodes' setting.
            on_a = _clean_env(HUBSERVER_BACKPLANE=url)
            for subject in ("alice", "bob"):
                await members_cli(
                    "grant", "--site", "s1", "--subject", subject, "--role", "site_admin",
                    "--data-dir", str(tmp_path / "cli"), env=on_a,
                )  # fmt: skip
            refused = await upgrade_refused(
                b.port, hub_target("entries", "s1"), token=b.token("eve")
            )
            assert refused.status == 403
            async with (
                open_hub(b, hub_target("entries", "s1")) as alice_b,  # type: ignore[arg-type]
                open_hub(a, hub_target("entries", "s1")) as alice_a,  # type: ignore[arg-type]
                open_hub(a, hub_target("entries", "s1"), token=a.token("bob")) as bob,  # type: ignore[arg-type]
            ):
                # One stream across the nodes.
                await still_served(b, "s1", alice_a, alice_b, bob)
                await still_served(a, "s1", alice_a, alice_b, bob)

                # On node B's machine, naming Redis on the command line.
                await members_cli(
                    "revoke", "--site", "s1", "--subject", "alice", "--redis", url,
                    env=_clean_env(),
                )  # fmt: skip
                revoked_at = trio.current_time()
                with trio.fail_after(2):
                    await expect_revoked(alice_a)
                    await expect_revoked(alice_b)
                print(f"revoke to closed on both nodes: {trio.current_time() - revoked_at:.3f} s")
                await still_served(b, "s1", bob)  # the bystander stays
                refused = await upgrade_refused(
                    b.port, hub_target("entries", "s1"), token=b.token("alice")
                )
                assert refused.status == 403


# --- in-process nodes ------------------------------------------------------------------------


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    return shared_dev_key


StartNode = Callable[..., Any]


@pytest.fixture
async def start_node(
    nursery: trio.Nursery, tmp_path: Path, dev_key: DevKey
) -> AsyncIterator[StartNode]:
    """``await start_node(**config) -> Node``: a server whose store comes from its config."""
    running: list[RunningServer] = []

    async def start(**overrides: Any) -> Node:
        config = replace(ServerConfig(port=0, data_dir=tmp_path / "data"), **overrides)
        server: RunningServer = await nursery.start(
            lambda task_status: serve(config, verifier=dev_key.verifier(), task_status=task_status)
        )
        running.append(server)
        return Node(server.port, dev_key, config, server)

    yield start
    for server in running:
        server.request_shutdown()


async def test_only_the_notice_can_close_in_time_and_only_its_pair_is_re_checked(
    own_redis_server: RedisServer, start_node: StartNode
) -> None:
    url = own_redis_server.url
    # The version poll every 30 s: within 2 s, only the change notice can do it.
    a = await start_node(backplane=url, permission_poll_interval=30)
    b = await start_node(backplane=url, permission_poll_interval=30)
    async with RedisPermissionStore(url) as roles, trio.open_nursery() as nursery:
        await roles.grant("s1", "alice", Role.SITE_ADMIN)
        await roles.grant("s2", "bob", Role.SITE_ADMIN)
        with trio.fail_after(CAP):
            async with (
                open_hub(b, hub_target("entries", "s1")) as alice,  # type: ignore[arg-type]
                open_hub(a, hub_target("entries", "s2"), token=a.token("bob")) as bob,  # type: ignore[arg-type]
            ):
                await trio.sleep(0.3)  # every node subscribed to the notices
                assert a.server is not None and b.server is not None
                lookups = await role_lookups(url)
                nursery.start_soon(roles.grant, "s9", "carol", Role.SITE_USER)  # elsewhere
                await roles.revoke("s1", "alice")
                with trio.fail_after(2):
                    await expect_revoked(alice)
                await still_served(a, "s2", bob)
                assert b.server.app.stats.revoked_closed == 1
                assert a.server.app.stats.revoked_closed == 0
                # Alice's connection was looked up again; bob's was not (nor anyone's for carol).
                assert await role_lookups(url) == lookups + 1


async def role_lookups(url: str) -> int:
    """How many role lookups (HGET) Redis has answered."""
    stats = await raw(url, "INFO", "commandstats")
    assert isinstance(stats, bytes)
    for line in stats.decode().splitlines():
        if line.startswith("cmdstat_hget:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


@asynccontextmanager
async def two_admins_on_a_node(
    url: str, start_node: StartNode
) -> AsyncIterator[tuple[Any, HubClient, HubClient]]:
    """A node on ``url`` polling its roles every 0.2 s; alice and bob, both Site Admins of s1."""
    async with RedisPermissionStore(url) as roles:
        await roles.grant("s1", "alice", Role.SITE_ADMIN)
        await roles.grant("s1", "bob", Role.SITE_ADMIN)
    node = await start_node(backplane=url, permission_poll_interval=0.2)
    async with (
        open_hub(node, hub_target("entries", "s1")) as alice,  # type: ignore[arg-type]
        open_hub(node, hub_target("entries", "s1"), token=node.token("bob")) as bob,  # type: ignore[arg-type]
    ):
        yield node, alice, bob


async def test_a_change_whose_notice_was_lost_is_caught_by_the_version_check(
    own_redis_server: RedisServer, start_node: StartNode
) -> None:
    url = own_redis_server.url
    with trio.fail_after(CAP):
        async with two_admins_on_a_node(url, start_node) as (node, alice, bob):
            # What a revoke does, without its notice (as if lost on the way).
            await raw(url, "HDEL", "hubserver:perm:site:s1", "alice")
            await raw(url, "INCR", "hubserver:perm:version")
            changed_at = trio.current_time()
            with trio.fail_after(2):
                await expect_revoked(alice)
            # A poll sees it, the next one (0.2 s later) gives up on its notice.
            assert trio.current_time() - changed_at >= 0.2
            await still_served(node, "s1", bob)
    assert node.server is not None
    assert node.server.app.stats.revoked_closed == 1


async def test_a_hung_redis_keeps_open_connections_and_refuses_new_ones_then_recovers(
    own_redis_server: RedisServer, start_node: StartNode
) -> None:
    url = own_redis_server.url
    async with RedisPermissionStore(url) as roles:
        for subject in ("alice", "dave", "carol"):
            await roles.grant("s1", subject, Role.SITE_ADMIN)
    node = await start_node(backplane=url, permission_poll_interval=0.2)
    with trio.fail_after(CAP):
        async with (
            open_hub(node, hub_target("entries", "s1")) as alice,  # type: ignore[arg-type]
            open_hub(node, hub_target("entries", "s1"), token=node.token("carol")) as carol,  # type: ignore[arg-type]
        ):
            await trio.sleep(1.1)  # the cache's answers expire: dave needs Redis
            own_redis_server.pause()
            try:
                refused = await upgrade_refused(
                    node.port, hub_target("entries", "s1"), token=node.token("dave")
                )
                assert refused.status == 503
                assert refused.headers["retry-after"] == "1"
                assert refused.text == "permission store unavailable\n"
                assert (await http_request(node.port, "GET", "/readyz")).status == 503
                await trio.sleep(2)  # the watcher failed several times meanwhile
                with trio.move_on_after(0.2) as quiet:
                    closed = await alice.next_message()
                    raise AssertionError(f"an open connection was touched: {closed}")
                assert quiet.cancelled_caught
            finally:
                own_redis_server.resume()
            with trio.fail_after(10):
                while (await http_request(node.port, "GET", "/readyz")).status != 200:  # noqa: ASYNC110 (polled as a balancer does)
                    await trio.sleep(0.1)
            await still_served(node, "s1", alice)
            async with open_hub(node, hub_target("entries", "s1"), token=node.token("dave")):
                pass
            # And changes reach the open connections again.
            async with RedisPermissionStore(url) as roles:
                await roles.revoke("s1", "carol")
            with trio.fail_after(2):
                await expect_revoked(carol)
            await still_served(node, "s1", alice)


async def test_garbage_in_the_version_key_keeps_the_node_up_and_its_connections_open(
    own_redis_server: RedisServer, start_node: StartNode
) -> None:
    url = own_redis_server.url
    with trio.fail_after(CAP):
        async with two_admins_on_a_node(url, start_node) as (node, alice, bob):
            # More digits than int() takes: read by every poll of the watcher.
            await raw(url, "SET", "hubserver:perm:version", "9" * 5000)
            await trio.sleep(1)
            assert (await http_request(node.port, "GET", "/readyz")).status == 503
            await still_served(node, "s1", alice, bob)
            await raw(url, "SET", "hubserver:perm:version", "1")
            async with RedisPermissionStore(url) as roles:
                await roles.revoke("s1", "alice")
            with trio.fail_after(3):
                await expect_revoked(alice)
            await still_served(node, "s1", bob)
            assert (await http_request(node.port, "GET", "/readyz")).status == 200


async def test_ids_without_a_utf_8_form_are_refused_not_a_crash(
    own_redis_server: RedisServer, start_node: StartNode
) -> None:
    url = own_redis_server.url
    async with RedisPermissionStore(url) as roles:
        await roles.grant("s1", "bob", Role.SITE_ADMIN)
    node = await start_node(backplane=url)
    with trio.fail_after(CAP):
        async with open_hub(node, hub_target("entries", "s1"), token=node.token("bob")) as bob:  # type: ignore[arg-type]
            # A lone surrogate: JSON can carry one ("\ud800"), UTF-8 cannot.
            refused = await upgrade_refused(
                node.port, hub_target("entries", "s1"), token=node.token("\ud800")
            )
            assert refused.status == 403
            response = await notify(node, b'{"site_id": "\\ud800", "subject": "bob"}')
            assert response.status == 400, response
            assert response.json()["code"] == "invalid_body"
            await still_served(node, "s1", bob)
    assert node.server is not None
    assert node.server.app.stats.crashed == 0


async def test_a_node_upgraded_with_grants_in_its_file_says_they_are_not_used(
    own_redis_server: RedisServer,
    start_node: StartNode,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with SqlitePermissionStore.open(tmp_path / "data") as sqlite_store:
        sqlite_store.grant("s1", "alice", Role.SITE_ADMIN)
    node = await start_node(backplane=own_redis_server.url)
    (warning,) = [r.getMessage() for r in caplog.records if "are not used" in r.getMessage()]
    assert "the 1 grant(s) in" in warning and "--permissions sqlite" in warning
    refused = await upgrade_refused(node.port, hub_target("entries", "s1"), token=node.token())
    assert refused.status == 403  # what the warning is about
    caplog.clear()
    kept = await start_node(backplane=own_redis_server.url, permissions="sqlite")
    async with open_hub(kept, hub_target("entries", "s1")):  # type: ignore[arg-type]
        pass
    assert not [r for r in caplog.records if "are not used" in r.getMessage()]


# --- the access-control backend as the source ------------------------------------------------


async def notify(node: Node, body: bytes, token: str | None = None) -> Any:
    headers = [("Content-Type", "application/json")]
    headers.append(bearer(node.token("acl-backend", (ADMIN_SCOPE,)) if token is None else token))
    return await http_request(
        node.port, "POST", "/v1/permissions/changed", headers=headers, body=body
    )


@pytest.fixture
async def backend() -> AsyncIterator[RoleBackend]:
    async with role_backend() as running:
        yield running


async def test_backend_notices_close_a_revoked_connection_at_once(
    backend: RoleBackend, start_node: StartNode
) -> None:
    backend.roles["s1", "alice"] = "site_admin"
    backend.roles["s1", "bob"] = "site_user"
    node = await start_node(permissions_url=backend.url(), permission_poll_interval=30)
    assert node.config is not None and node.config.permission_source == "url"
    with trio.fail_after(CAP):
        async with (
            open_hub(node, hub_target("entries", "s1")) as alice,  # type: ignore[arg-type]
            open_hub(node, hub_target("entries", "s1", "bob"), token=node.token("bob")) as bob,  # type: ignore[arg-type]
        ):
            # A site user may not open the site stream: the backend's answer is the rule's input.
            refused = await upgrade_refused(
                node.port, hub_target("entries", "s1"), token=node.token("bob")
            )
            assert refused.status == 403
            asked = len(backend.requests)

            backend.roles["s1", "alice"] = None
            response = await notify(node, b'{"site_id": "s1", "subject": "alice"}')
            assert response.status == 202, response
            assert response.json() == {"notified": "all nodes"}
            with trio.fail_after(1):
                await expect_revoked(alice)
            # Only the pair named was asked again: bob's connection was not re-checked.
            assert backend.requests[asked:] == [("s1", "alice")]
            with trio.fail_after(5):
                (event_id,) = await publish_ok(
                    node,  # type: ignore[arg-type]
                    "entries",
                    {"site_id": "s1", "user_id": "bob"},
                )
                assert (await bob.next_event())["id"] == event_id


async def test_a_revoke_while_a_connection_s_role_is_being_looked_up_refuses_it(
    backend: RoleBackend, start_node: StartNode
) -> None:
    # The backend answers "site_admin", the answer is on its way, and meanwhile
    # the role is revoked and its notice handled: no connection of alice's was
    # open to re-check yet. The answer that predates the notice must not open one.
    backend.roles["s1", "alice"] = "site_admin"
    backend.roles["s1", "bob"] = "site_admin"
    node = await start_node(permissions_url=backend.url(), permission_poll_interval=30)
    with trio.fail_after(CAP):
        async with open_hub(node, hub_target("entries", "s1"), token=node.token("bob")) as bob:  # type: ignore[arg-type]
            gate = backend.gate = trio.Event()
            answers: list[HttpResponse] = []

            async def connect_alice() -> None:
                request = build_request(
                    "GET", hub_target("entries", "s1"), headers=upgrade_headers(token=node.token())
                )
                answers.append(await exchange(node.port, request))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(connect_alice)
                while ("s1", "alice") not in backend.requests:  # noqa: ASYNC110 (a real server's socket)
                    await trio.sleep(0.01)
                backend.roles["s1", "alice"] = None
                response = await notify(node, b'{"site_id": "s1", "subject": "alice"}')
                assert response.status == 202, response
                await trio.testing.wait_all_tasks_blocked(0.05)  # the notice was handled
                gate.set()
            (answer,) = answers
            assert answer.status == 403, answer
            await still_served(node, "s1", bob)


async def test_a_failing_backend_refuses_new_connections_and_keeps_open_ones(
    backend: RoleBackend, start_node: StartNode
) -> None:
    backend.roles["s1", "alice"] = "site_admin"
    backend.roles["s1", "dave"] = "site_admin"
    node = await start_node(permissions_url=backend.url(), permission_poll_interval=0.2)
    with trio.fail_after(CAP):
        async with open_hub(node, hub_target("entries", "s1")) as alice:  # type: ignore[arg-type]
            backend.misbehave = "status_500"  # never a grant, never "no role"
            refused = await upgrade_refused(
                node.port, hub_target("entries", "s1"), token=node.token("dave")
            )
            assert refused.status == 503
            # Alice's open connection is re-checked against the failing backend: kept.
            response = await notify(node, b'{"site_id": "s1", "subject": "alice"}')
            assert response.status == 202
            await trio.sleep(0.5)
            assert (await http_request(node.port, "GET", "/readyz")).status == 503
            await still_served(node, "s1", alice)
            backend.misbehave = None
            with trio.fail_after(10):
                while (await http_request(node.port, "GET", "/readyz")).status != 200:  # noqa: ASYNC110 (polled as a balancer does)
                    await trio.sleep(0.1)
            async with open_hub(node, hub_target("entries", "s1"), token=node.token("dave")):
                pass
            await still_served(node, "s1", alice)


async def test_one_subject_s_unusable_answer_does_not_stop_other_revokes(
    backend: RoleBackend, start_node: StartNode
) -> None:
    for subject in ("alice", "bob", "carol", "dave"):
        backend.roles["s1", subject] = "site_admin"
    node = await start_node(permissions_url=backend.url(), permission_poll_interval=0.2)
    with trio.fail_after(CAP):
        async with (
            open_hub(node, hub_target("entries", "s1")) as alice,  # type: ignore[arg-type]
            open_hub(node, hub_target("entries", "s1"), token=node.token("bob")) as bob,  # type: ignore[arg-type]
            open_hub(node, hub_target("entries", "s1"), token=node.token("carol")) as carol,  # type: ignore[arg-type]
        ):
            # The backend now says something of alice that is no role of ours.
            backend.roles["s1", "alice"] = "site_viewer"
            assert (await notify(node, b'{"site_id": "s1", "subject": "alice"}')).status == 202
            await trio.sleep(0.5)  # alice re-checked: unusable, so she keeps her role
            backend.roles["s1", "bob"] = None
            assert (await notify(node, b'{"site_id": "s1", "subject": "bob"}')).status == 202
            with trio.fail_after(2):
                await expect_revoked(bob)
            await still_served(node, "s1", alice, carol)
            # The backend is up: others still connect.
            async with open_hub(node, hub_target("entries", "s1"), token=node.token("dave")):  # type: ignore[arg-type]
                pass


async def test_a_permissions_url_whose_host_cannot_be_encoded_is_a_503_not_a_crash(
    start_node: StartNode,
) -> None:
    # A typo that parses as a URL: the IDNA codec refuses the empty label.
    node = await start_node(permissions_url="http://acl..internal/roles")
    refused = await upgrade_refused(node.port, hub_target("entries", "s1"), token=node.token())
    assert refused.status == 503
    assert (await http_request(node.port, "GET", "/readyz")).status == 503
    assert node.server is not None
    assert node.server.app.stats.crashed == 0


async def test_a_notice_to_one_node_reaches_every_node_through_redis(
    backend: RoleBackend, own_redis_server: RedisServer, start_node: StartNode
) -> None:
    backend.roles["s1", "alice"] = "site_admin"
    settings = {
        "permissions_url": backend.url(),
        "backplane": own_redis_server.url,
        "permission_poll_interval": 30,
    }
    a = await start_node(**settings)
    b = await start_node(**settings)
    with trio.fail_after(CAP):
        async with open_hub(b, hub_target("entries", "s1")) as alice:  # type: ignore[arg-type]
            await trio.sleep(0.3)  # both nodes subscribed to the relay
            backend.roles["s1", "alice"] = None
            response = await notify(a, b'{"site_id": "s1", "subject": "alice"}')
            assert response.status == 202, response
            with trio.fail_after(2):
                await expect_revoked(alice)


async def test_notices_work_with_a_local_store_too(start_server: Any) -> None:
    # The in-memory store of the test harness (as SQLite): no feed, same endpoint.
    h = await start_server(permission_poll_interval=30)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    node = Node(h.port, h.key)
    with trio.fail_after(CAP):
        async with open_hub(h, hub_target("entries", "s1")) as alice:
            h.store.revoke("s1", "alice")  # the poll would see it in 30 s
            response = await notify(node, b'{"site_id": "s1", "subject": "alice"}')
            assert response.status == 202
            with trio.fail_after(1):
                await expect_revoked(alice)


@pytest.mark.parametrize(
    ("method", "body", "scopes", "status", "code"),
    [
        ("GET", b"", (ADMIN_SCOPE,), 405, "method_not_allowed"),
        ("POST", b'{"site_id": "s1", "subject": "u"}', (HUB_SCOPE,), 403, None),
        ("POST", b'{"site_id": "s1", "subject": "u"}', (PUBLISH_SCOPE,), 403, None),
        ("POST", b"not json", (ADMIN_SCOPE,), 400, "invalid_body"),
        ("POST", b'["s1", "u"]', (ADMIN_SCOPE,), 400, "invalid_body"),
        ("POST", b'{"site_id": "s1"}', (ADMIN_SCOPE,), 400, "invalid_body"),
        ("POST", b'{"site_id": "", "subject": "u"}', (ADMIN_SCOPE,), 400, "invalid_body"),
        ("POST", b'{"site_id": 1, "subject": "u"}', (ADMIN_SCOPE,), 400, "invalid_body"),
        ("POST", b'{"site_id": "s1", "subject": "' + b"u" * 300 + b'"}', (ADMIN_SCOPE,), 400,
         "invalid_body"),
        ("POST", b'{"site_id": "' + b"s" * 9000 + b'"}', (ADMIN_SCOPE,), 413, "too_large"),
    ],
)  # fmt: skip
async def test_the_notice_endpoint_refuses_what_is_not_a_notice(
    start_server: Any,
    method: str,
    body: bytes,
    scopes: tuple[str, ...],
    status: int,
    code: str | None,
) -> None:
    h = await start_server()
    token = h.token("acl-backend", scopes)
    response = await http_request(
        h.port, method, "/v1/permissions/changed", headers=[bearer(token)], body=body
    )
    assert response.status == status, response
    assert response.headers["content-type"] == "application/json"
    if code is not None:
        assert response.json()["code"] == code
    response = await http_request(h.port, "POST", "/v1/permissions/changed", body=b"{}")
    assert response.status == 401


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "source"),
    [
        ({}, "sqlite"),
        ({"backplane": "redis://r:6379/0"}, "redis"),
        ({"backplane": "redis://r:6379/0", "permissions": "sqlite"}, "sqlite"),
        ({"backplane": "redis://r:6379/0", "permissions": "Redis"}, "redis"),
        ({"permissions_url": "https://acl.example/roles"}, "url"),
        ({"permissions_url": "https://acl.example/roles", "backplane": "redis://r/0"}, "url"),
        ({"permissions_url": "http://acl:8080/roles?t=1", "permissions": "url"}, "url"),
    ],
)
def test_where_roles_live_follows_the_deployment(settings: dict[str, Any], source: str) -> None:
    assert ServerConfig(**settings).permission_source == source


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"permissions": "redis"}, "give --backplane"),
        ({"permissions": "url"}, "needs --permissions-url"),
        ({"permissions": "ldap"}, "must be one of sqlite, redis, url"),
        (
            {"permissions": "sqlite", "permissions_url": "https://acl.example/roles"},
            "cannot be combined with --permissions sqlite",
        ),
        ({"permissions_url": "ftp://acl.example/roles"}, "http:// or https://"),
        ({"permissions_url": "https:///roles"}, "with a host"),
        ({"permissions_url": "https://acl.example:99999/roles"}, "not a URL"),
        ({"permissions_ttl": 0.0}, "permissions_ttl must be at least 1 second"),
        ({"permissions_ttl": float("nan")}, "permissions_ttl must be at least 1 second"),
        # A re-check of everyone every millisecond is no setting anyone means.
        ({"permissions_ttl": 0.001}, "permissions_ttl must be at least 1 second"),
        ({"permissions_ttl": 0.999}, "permissions_ttl must be at least 1 second"),
        ({"permissions_url": "https://ops:s3cret@acl.example/roles"}, "--permissions-url-token"),
        ({"permissions_url": "https://s3cret@acl.example/roles"}, "--permissions-url-token-file"),
        ({"permissions_url": "https://:s3cret@acl.example/roles"}, "--permissions-url-token-file"),
        ({"permissions_url": "https://acl.example/roles?site_id=s1"}, "site_id or subject"),
        ({"permissions_url": "https://acl.example/roles?t=1&subject="}, "site_id or subject"),
        ({"permissions_url": "https://acl.example/roles?site%5Fid=s1"}, "site_id or subject"),
    ],
)
def test_impossible_role_sources_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        ServerConfig(**settings)
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize(
    "settings",
    [
        {"permissions_url": "https://acl.example/roles", "permissions_ttl": 1.0},
        {"permissions_url": "https://acl.example/roles?tenant=7&api_key=k"},
        {"permissions_url": "https://acl.example/roles?subjects=1&site=2"},
    ],
)
def test_role_sources_near_the_limits_are_accepted(settings: dict[str, Any]) -> None:
    assert ServerConfig(**settings).permission_source == "url"


def test_the_flags_reach_the_config() -> None:
    from hubserver.__main__ import _config, _parser

    args = _parser().parse_args(
        [
            "serve", "--backplane", "redis://r:6379/0", "--permissions-url",
            "https://acl.example/roles", "--permissions-ttl", "5",
        ]
    )  # fmt: skip
    config = _config(args)
    assert config.permission_source == "url"
    assert (config.permissions_url, config.permissions_ttl) == ("https://acl.example/roles", 5.0)
    args = _parser().parse_args(["serve", "--backplane", "redis://r/0", "--permissions", "sqlite"])
    assert _config(args).permission_source == "sqlite"


async def test_the_demo_grants_its_subject_where_roles_live(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    from hubserver.__main__ import _grant_demo
    from hubserver.demo import DEMO_SITE, DEMO_SUBJECT

    await _grant_demo(ServerConfig(data_dir=tmp_path, backplane=own_redis_server.url, demo=True))
    async with RedisPermissionStore(own_redis_server.url) as roles:
        assert await roles.role_of(DEMO_SITE, DEMO_SUBJECT) is Role.SITE_ADMIN
    assert not (tmp_path / "permissions.sqlite3").exists()


# --- moving roles into Redis, a backend behind auth -------------------------------------------


async def test_a_running_node_hears_an_import_at_once(
    own_redis_server: RedisServer, tmp_path: Path, start_node: StartNode
) -> None:
    """``members import --overwrite`` sends the notice of its writes: bob, whose
    role the node's file lowers, loses his site stream at once (the poll is 30 s
    away); alice (the same role in both) and dave (not in the file) stay."""
    url = own_redis_server.url
    data = tmp_path / "node-data"
    with SqlitePermissionStore.open(data) as sqlite_store:
        sqlite_store.grant_many(
            [
                ("s1", "alice", Role.SITE_ADMIN),
                ("s1", "bob", Role.SITE_USER),
                ("s2", "erin", Role.SITE_ADMIN),
            ]
        )
    async with RedisPermissionStore(url) as fleet:
        for subject in ("alice", "bob", "dave"):
            await fleet.grant("s1", subject, Role.SITE_ADMIN)
    node: Node = await start_node(backplane=url, permission_poll_interval=30)
    target = hub_target("entries", "s1")
    with trio.fail_after(CAP):
        async with (
            open_hub(node, target) as alice,  # type: ignore[arg-type]
            open_hub(node, target, token=node.token("bob")) as bob,  # type: ignore[arg-type]
            open_hub(node, target, token=node.token("dave")) as dave,  # type: ignore[arg-type]
        ):
            await members_cli(
                "import",
                "--from-sqlite",
                str(data),
                "--redis",
                url,
                "--overwrite",
                env=_clean_env(),
            )
            with trio.fail_after(2):
                await expect_revoked(bob)
            async with open_hub(node, hub_target("entries", "s2"), token=node.token("erin")):  # type: ignore[arg-type]
                pass
            await still_served(node, "s1", alice, dave)


async def test_a_backend_behind_auth_gets_the_token_of_the_file(
    backend: RoleBackend,
    start_node: StartNode,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``--permissions-url-token-file``: every question carries the file's token.
    A node without it is refused by the backend (401): its store is
    unavailable, so new connections get 503, as with any backend failure."""
    token = "acl-" + "9f2c" * 16
    backend.required_token = token
    backend.roles["s1", "alice"] = "site_admin"
    token_file = tmp_path / "acl-token"
    token_file.write_text(token + "\n")  # as `echo TOKEN > file` writes it
    node = await start_node(permissions_url=backend.url(), permissions_url_token_file=token_file)
    bare = await start_node(permissions_url=backend.url(), permission_poll_interval=0.1)
    with trio.fail_after(CAP):
        async with open_hub(node, hub_target("entries", "s1")) as alice:  # type: ignore[arg-type]
            assert backend.authorizations == [f"Bearer {token}"]
            refused = await upgrade_refused(
                bare.port, hub_target("entries", "s1"), token=bare.token()
            )
            assert refused.status == 503
            assert backend.authorizations[1:] == [None]
            await still_served(node, "s1", alice)
            # The bare node's watcher says why its store is unavailable.
            hint = "HTTP 401 instead of 200 (check --permissions-url-token-file)"
            while hint not in caplog.text:  # noqa: ASYNC110 (a log line has no event to wait on)
                await trio.sleep(0.05)
    assert token not in caplog.text


# --- a re-check of everyone against a slow backend ------------------------------------------

#: Pairs with an open connection each: enough that a re-check one lookup at a
#: time (PAIRS x ANSWER_DELAY = 3 s) misses the 2 s a revoke is promised.
PAIRS = 100
#: Seconds the backend takes for each answer while the re-check runs.
ANSWER_DELAY = 0.03


async def open_many(stack: AsyncExitStack, node: Node, subjects: list[str]) -> list[HubClient]:
    return [
        await stack.enter_async_context(
            open_hub(node, hub_target("entries", "s1"), token=node.token(subject))  # type: ignore[arg-type]
        )
        for subject in subjects
    ]


async def start_re_check_of_everyone(redis: RedisServer, backend: RoleBackend) -> int:
    """Cut the node's subscriptions, as a network blip does: the notices sent meanwhile
    may be lost, so the node drops every answer it cached and re-checks everyone once it
    is subscribed again. Waits for that re-check's first question to the backend, and
    returns where its questions start in ``backend.requests``."""
    asked = len(backend.requests)
    await raw(redis.url, "CLIENT", "KILL", "TYPE", "pubsub")
    while len(backend.requests) == asked:  # noqa: ASYNC110 (a real server's socket)
        await trio.sleep(0.005)
    return asked


async def test_a_revoke_during_a_re_check_of_everyone_closes_at_once(
    backend: RoleBackend, own_redis_server: RedisServer, start_node: StartNode
) -> None:
    subjects = [f"u{i}" for i in range(PAIRS)]
    for subject in [*subjects, "alice"]:
        backend.roles["s1", subject] = "site_admin"
    node = await start_node(
        permissions_url=backend.url(), backplane=own_redis_server.url, permission_poll_interval=30
    )
    with trio.fail_after(CAP):
        async with AsyncExitStack() as stack:
            bystanders = await open_many(stack, node, subjects)
            # Opened last: the re-check of everyone reaches her last.
            (alice,) = await open_many(stack, node, ["alice"])
            backend.delay = ANSWER_DELAY
            asked = await start_re_check_of_everyone(own_redis_server, backend)
            started_at = trio.current_time()
            backend.roles["s1", "alice"] = None
            noticed_at = trio.current_time()
            assert (await notify(node, b'{"site_id": "s1", "subject": "alice"}')).status == 202
            with trio.fail_after(2):
                await expect_revoked(alice)
            took = trio.current_time() - noticed_at
            swept = len(backend.requests) - asked
            # Closed while the re-check of everyone was still under way, not after it.
            assert swept < PAIRS, swept
            while {s for _, s in backend.requests[asked:]} < {*subjects, "alice"}:  # noqa: ASYNC110
                await trio.sleep(0.005)
            sweep_took = trio.current_time() - started_at
            print(
                f"\n{PAIRS + 1} pairs, {ANSWER_DELAY:g} s per answer: revoked {took:.3f} s after "
                f"its notice, with {swept} pairs asked; every pair asked in {sweep_took:.3f} s, "
                f"{backend.max_in_flight} at once"
            )
            # Several questions at once: as many as the URL store sends (8).
            assert backend.max_in_flight == DEFAULT_MAX_CONNECTIONS
            backend.delay = 0
            await still_served(node, "s1", *bystanders)
    assert node.server is not None
    assert node.server.app.stats.revoked_closed == 1


async def test_a_re_check_of_everyone_asks_once_per_pair(
    backend: RoleBackend,
    own_redis_server: RedisServer,
    start_node: StartNode,
    caplog: pytest.LogCaptureFixture,
) -> None:
    subjects = [f"u{i}" for i in range(10)]
    for subject in [*subjects, "carol", "dave"]:
        backend.roles["s1", subject] = "site_admin"
    node = await start_node(
        permissions_url=backend.url(), backplane=own_redis_server.url, permission_poll_interval=30
    )
    with trio.fail_after(CAP):
        async with AsyncExitStack() as stack:
            # Carol and dave each watch the site from several screens.
            others = await open_many(stack, node, [*subjects, "dave", "dave", "dave"])
            carols = await open_many(stack, node, ["carol"] * 4)
            # A role the backend has and we do not: carol's answer is unusable, so
            # never cached; her connections keep their role.
            backend.roles["s1", "carol"] = "site_viewer"
            backend.delay = ANSWER_DELAY
            caplog.clear()
            asked = await start_re_check_of_everyone(own_redis_server, backend)
            # The re-check is through once the watcher reports carol's failed lookup.
            while not any("unavailable" in r.getMessage() for r in caplog.records):  # noqa: ASYNC110
                await trio.sleep(0.01)
            assert caplog.records[-1].levelno == logging.WARNING
            asks = Counter(subject for _, subject in backend.requests[asked:])
            assert asks == Counter([*subjects, "carol", "dave"]), asks
            backend.delay = 0
            await still_served(node, "s1", *others, *carols)
    assert node.server is not None
    assert node.server.app.stats.revoked_closed == 0
