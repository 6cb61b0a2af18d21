"""The URL permission store beyond the shared contract, against a real local HTTP backend.

Garbage is never a grant, every question has a deadline and a size limit,
answers are cached for the TTL in a bounded cache, questions share requests
and connections, a failing backend is not hammered, and notices (local or
relayed through a real redis-server) drop cached answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from hubserver.permissions import (
    PermissionChange,
    PermissionStoreUnavailable,
    Role,
    UrlPermissionStore,
)

from .redis_fixture import RedisServer, redis_server_fixture  # noqa: F401 (a fixture)
from .role_backend import Misbehaviour, RoleBackend, role_backend

ME = "subject-1"


@pytest.fixture
async def backend() -> AsyncIterator[RoleBackend]:
    async with role_backend() as running:
        yield running


@pytest.fixture
async def store(backend: RoleBackend) -> AsyncIterator[UrlPermissionStore]:
    url_store = UrlPermissionStore(backend.url(), ttl=60, request_timeout=0.5)
    try:
        yield url_store
    finally:
        await url_store.aclose()


#: The backend failing: the store is unavailable until it answers again.
BACKEND_FAILURES = ["status_500", "redirect", "too_large", "stall", "close"]
#: A 200 whose body is no answer of ours: that question fails, the backend is up.
UNUSABLE_ANSWERS = [
    "not_json",
    "json_list",
    "no_role_key",
    "unknown_role",
    "role_not_string",
    "deep_json",
]


@pytest.mark.parametrize("misbehaviour", BACKEND_FAILURES + UNUSABLE_ANSWERS)
async def test_garbage_is_unavailable_never_a_grant(
    backend: RoleBackend, store: UrlPermissionStore, misbehaviour: Misbehaviour
) -> None:
    backend.roles["s1", ME] = "site_admin"  # what a broken answer might be taken for
    backend.misbehave = misbehaviour
    started = trio.current_time()
    with pytest.raises(PermissionStoreUnavailable, match="the permissions URL http://127"):
        await store.role_of("s1", ME)
    assert trio.current_time() - started < 1.5  # the 0.5 s deadline, at worst
    assert store.is_available == (misbehaviour in UNUSABLE_ANSWERS)
    backend.misbehave = None
    # The watcher's probe (version) asks again and ends the outage.
    assert await store.version() == 0
    assert store.is_available
    assert await store.role_of("s1", ME) is Role.SITE_ADMIN


@pytest.mark.parametrize("misbehaviour", UNUSABLE_ANSWERS)
async def test_one_unusable_answer_fails_its_question_only(
    backend: RoleBackend, store: UrlPermissionStore, misbehaviour: Misbehaviour
) -> None:
    backend.roles["s1", "other"] = "site_user"
    backend.misbehave = misbehaviour
    with pytest.raises(PermissionStoreUnavailable):
        await store.role_of("s1", ME)
    backend.misbehave = None
    # Not "a backend that is down": the next question is asked, not failed at once.
    assert await store.role_of("s1", "other") is Role.SITE_USER
    assert await store.version() == 0


@pytest.mark.parametrize("host", ["acl..internal", "a" * 64 + ".internal"])
async def test_a_host_name_without_an_idna_form_is_unavailable(host: str) -> None:
    store = UrlPermissionStore(f"http://{host}/roles", request_timeout=0.5)
    try:
        with pytest.raises(PermissionStoreUnavailable, match="cannot connect"):
            await store.role_of("s1", ME)
        assert not store.is_available
    finally:
        await store.aclose()


async def test_the_question_and_its_query(backend: RoleBackend) -> None:
    store = UrlPermissionStore(backend.url("tenant=acme&x=1"))
    try:
        backend.roles["site 1/ä", "u&v=w"] = "site_user"
        assert await store.role_of("site 1/ä", "u&v=w") is Role.SITE_USER
        assert backend.requests == [("site 1/ä", "u&v=w")]
        assert backend.extra_query == {"tenant": "acme", "x": "1"}
        assert await store.role_of("s2", ME) is None  # {"role": null}
    finally:
        await store.aclose()


async def test_answers_are_cached_for_the_ttl_none_included(backend: RoleBackend) -> None:
    store = UrlPermissionStore(backend.url(), ttl=0.5)
    try:
        backend.roles["s1", ME] = "site_admin"
        for _ in range(3):
            assert await store.role_of("s1", ME) is Role.SITE_ADMIN
            assert await store.role_of("s2", ME) is None
        assert len(backend.requests) == 2
        backend.roles["s1", ME] = "site_user"
        await trio.sleep(0.6)
        assert await store.role_of("s1", ME) is Role.SITE_USER
        assert len(backend.requests) == 3
    finally:
        await store.aclose()


async def test_the_cache_is_bounded_oldest_first(backend: RoleBackend) -> None:
    store = UrlPermissionStore(backend.url(), max_entries=3)
    try:
        for index in range(4):
            await store.role_of(f"s{index}", ME)
        assert len(backend.requests) == 4
        for index in (1, 2, 3):  # still cached
            await store.role_of(f"s{index}", ME)
        assert len(backend.requests) == 4
        await store.role_of("s0", ME)  # the oldest went
        assert backend.requests[-1] == ("s0", ME)
        assert len(backend.requests) == 5
    finally:
        await store.aclose()


async def test_concurrent_questions_share_one_request(
    backend: RoleBackend, store: UrlPermissionStore
) -> None:
    backend.roles["s1", ME] = "site_super_user"
    backend.delay = 0.2
    answers: list[Role | None] = []

    async def ask() -> None:
        answers.append(await store.role_of("s1", ME))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(ask)
    assert answers == [Role.SITE_SUPER_USER] * 20
    assert backend.requests == [("s1", ME)]


async def test_a_cancelled_asker_does_not_fail_the_others(
    backend: RoleBackend, store: UrlPermissionStore
) -> None:
    backend.roles["s1", ME] = "site_admin"
    backend.delay = 0.2
    answers: list[Role | None] = []

    async def ask() -> None:
        answers.append(await store.role_of("s1", ME))

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(0.05):
            await store.role_of("s1", ME)  # the first asker, cut short
        nursery.start_soon(ask)
        nursery.start_soon(ask)
    assert answers == [Role.SITE_ADMIN] * 2
    assert store.is_available


async def test_connections_are_kept_alive_and_bounded(
    backend: RoleBackend, store: UrlPermissionStore
) -> None:
    for index in range(10):
        await store.role_of(f"s{index}", ME)
    assert backend.connections == 1
    backend.delay = 0.05

    async def ask(index: int) -> None:
        await store.role_of(f"t{index}", ME)

    async with trio.open_nursery() as nursery:
        for index in range(30):
            nursery.start_soon(ask, index)
    assert len(backend.requests) == 40
    assert backend.connections <= 8  # DEFAULT_MAX_CONNECTIONS


async def test_a_connection_the_backend_closed_while_idle_is_replaced(
    backend: RoleBackend, store: UrlPermissionStore
) -> None:
    await store.role_of("s1", ME)
    await trio.testing.wait_all_tasks_blocked()  # the backend waits for the next request
    # As a keep-alive timeout does: the connection the store keeps is closed.
    assert await backend.close_idle() == 1
    await trio.testing.wait_all_tasks_blocked()
    backend.roles["s2", ME] = "site_user"
    assert await store.role_of("s2", ME) is Role.SITE_USER  # retried on a new connection
    assert backend.connections == 2
    assert store.is_available
    # Closed with the question pending: that is a failure (the answer may never come).
    backend.misbehave = "close"
    with pytest.raises(PermissionStoreUnavailable):
        await store.role_of("s3", ME)


async def test_an_answer_nobody_asked_for_is_never_taken_for_the_next_question(
    backend: RoleBackend, store: UrlPermissionStore
) -> None:
    backend.roles["s1", ME] = "site_user"
    backend.misbehave = "answer_twice"  # then {"role": "site_admin"}, unasked
    assert await store.role_of("s1", ME) is Role.SITE_USER
    backend.misbehave = None
    # Mallory has no role: the leftover answer on that connection is not hers.
    assert await store.role_of("s1", "mallory") is None
    assert await store.role_of("s2", "mallory") is None
    assert backend.connections == 2  # the connection that said too much was dropped


async def test_a_failing_backend_is_not_hammered(
    backend: RoleBackend, store: UrlPermissionStore
) -> None:
    backend.misbehave = "status_500"
    with pytest.raises(PermissionStoreUnavailable, match="HTTP 500"):
        await store.role_of("s1", ME)
    for index in range(50):  # a reconnect storm meanwhile
        with pytest.raises(PermissionStoreUnavailable, match="failed less than 1 s ago"):
            await store.role_of(f"s{index}", "storm")
    assert len(backend.requests) == 1
    backend.misbehave = None
    await store.version()
    assert await store.role_of("s1", "storm") is None
    assert len(backend.requests) == 3


async def test_a_notice_drops_the_cached_answer_and_is_reported(
    backend: RoleBackend, store: UrlPermissionStore, nursery: trio.Nursery
) -> None:
    heard: list[PermissionChange] = []
    nursery.start_soon(store.watch_changes, heard.append)
    await trio.lowlevel.checkpoint()
    backend.roles["s1", ME] = "site_admin"
    assert await store.role_of("s1", ME) is Role.SITE_ADMIN
    del backend.roles["s1", ME]
    assert await store.role_of("s1", ME) is Role.SITE_ADMIN  # cached
    await store.announce("s1", ME)
    assert heard == [PermissionChange(pairs=frozenset({("s1", ME)}), version=1)]
    assert await store.role_of("s1", ME) is None


async def test_a_notice_during_a_question_keeps_its_answer_out_of_the_cache(
    backend: RoleBackend, store: UrlPermissionStore
) -> None:
    backend.roles["s1", ME] = "site_admin"
    backend.delay = 0.2
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.role_of, "s1", ME)
        await trio.sleep(0.1)  # asked, not answered
        del backend.roles["s1", ME]
        await store.announce("s1", ME)
        # Not joined to the question asked before the notice: one of its own.
        assert await store.role_of("s1", ME) is None
    backend.delay = 0
    assert await store.role_of("s1", ME) is None
    assert len(backend.requests) == 2


async def test_every_open_connection_is_re_checked_every_ttl(backend: RoleBackend) -> None:
    store = UrlPermissionStore(backend.url(), ttl=0.2)
    heard: list[PermissionChange] = []
    try:
        with trio.move_on_after(0.5):
            await store.watch_changes(heard.append)
    finally:
        await store.aclose()
    assert heard == [PermissionChange(pairs=None)] * 2


async def test_notices_are_relayed_to_every_node_through_redis(
    backend: RoleBackend, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    node_a = UrlPermissionStore(backend.url(), relay=redis_server.url, key_prefix="relay-test")
    node_b = UrlPermissionStore(backend.url(), relay=redis_server.url, key_prefix="relay-test")
    send_a, heard_a = trio.open_memory_channel[PermissionChange](10)
    send_b, heard_b = trio.open_memory_channel[PermissionChange](10)
    try:
        nursery.start_soon(node_a.watch_changes, send_a.send_nowait)
        nursery.start_soon(node_b.watch_changes, send_b.send_nowait)
        await trio.sleep(0.2)  # subscribed
        backend.roles["s1", ME] = "site_admin"
        assert await node_a.role_of("s1", ME) is Role.SITE_ADMIN
        assert await node_b.role_of("s1", ME) is Role.SITE_ADMIN
        del backend.roles["s1", ME]

        await node_a.announce("s1", ME)  # the backend told one node
        expected = PermissionChange(pairs=frozenset({("s1", ME)}), version=1)
        with trio.fail_after(5):
            assert await heard_b.receive() == expected
            assert await heard_a.receive() == expected  # the announcer hears it back
        await trio.sleep(0.2)
        with pytest.raises(trio.WouldBlock):  # once each
            heard_a.receive_nowait()
        assert await node_a.role_of("s1", ME) is None
        assert await node_b.role_of("s1", ME) is None
    finally:
        await node_a.aclose()
        await node_b.aclose()


async def test_relays_to_two_databases_of_one_redis_carry_only_their_own_notices(
    backend: RoleBackend, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    base = f"redis://127.0.0.1:{redis_server.port}"
    one, two = (
        UrlPermissionStore(backend.url(), relay=f"{base}/{db}", key_prefix="relay-db-test")
        for db in (1, 2)
    )
    heard: dict[UrlPermissionStore, list[PermissionChange]] = {one: [], two: []}
    try:
        for store, changes in heard.items():
            nursery.start_soon(store.watch_changes, changes.append)
        await trio.sleep(0.2)  # subscribed
        await one.announce("s1", ME)
        await two.announce("s2", ME)
        await trio.sleep(0.2)  # delivered
        # Each hears its own notice once, and nothing of the other database.
        assert [change.pairs for change in heard[one]] == [{("s1", ME)}]
        assert [change.pairs for change in heard[two]] == [{("s2", ME)}]
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_relay_that_fails_still_applies_the_notice_here(backend: RoleBackend) -> None:
    store = UrlPermissionStore(backend.url(), relay="redis://127.0.0.1:9/0")
    heard: list[PermissionChange] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.watch_changes, heard.append)
            backend.roles["s1", ME] = "site_admin"
            assert await store.role_of("s1", ME) is Role.SITE_ADMIN
            del backend.roles["s1", ME]
            with pytest.raises(PermissionStoreUnavailable, match="change notice"):
                await store.announce("s1", ME)
            assert heard == [PermissionChange(pairs=frozenset({("s1", ME)}), version=1)]
            assert await store.role_of("s1", ME) is None
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_the_token_goes_with_every_question_and_a_refusal_is_unavailable(
    backend: RoleBackend, caplog: pytest.LogCaptureFixture
) -> None:
    token = "tok-4f9a.b_c~d+e/f="  # RFC 6750 b64token characters
    backend.required_token = token
    backend.roles["s1", ME] = "site_admin"
    with_token = UrlPermissionStore(backend.url(), token=token)
    without = UrlPermissionStore(backend.url())
    wrong = UrlPermissionStore(backend.url(), token="tok-old")
    try:
        assert await with_token.role_of("s1", ME) is Role.SITE_ADMIN
        assert await with_token.role_of("s2", ME) is None  # a kept connection, again
        assert backend.authorizations == [f"Bearer {token}"] * 2
        for store in (without, wrong):
            # Refused is unavailable (503 for new connections), never "no role".
            with pytest.raises(PermissionStoreUnavailable) as refused:
                await store.role_of("s1", ME)
            assert "HTTP 401 instead of 200 (check --permissions-url-token-file)" in str(
                refused.value
            )
            assert not store.is_available
        assert backend.authorizations[2:] == [None, "Bearer tok-old"]
    finally:
        for store in (with_token, without, wrong):
            await store.aclose()
    assert token not in caplog.text


@pytest.mark.parametrize(
    ("url", "kwargs"),
    [
        ("ftp://example.com/roles", {}),
        ("http:///roles", {}),
        ("http://example.com/roles", {"ttl": 0}),
        ("http://example.com/roles", {"ttl": float("inf")}),
        ("http://example.com/roles", {"max_entries": 0}),
        ("http://example.com/roles", {"relay": "http://not-redis"}),
    ],
)
def test_bad_settings_are_refused(url: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        UrlPermissionStore(url, **kwargs)  # type: ignore[arg-type]
