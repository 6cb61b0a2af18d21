"""The verified-token cache and the site-role cache: faster, never wrong for long."""

from __future__ import annotations

import time

import pytest
import trio

from hubserver.auth import CachingVerifier, Claims, DevKey, InvalidToken
from hubserver.permissions import (
    CachedPermissionStore,
    InMemoryPermissionStore,
    PermissionStoreUnavailable,
    Role,
)


class CountingVerifier:
    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.calls = 0

    async def verify(self, token: str, now: float) -> Claims:
        self.calls += 1
        return await self.inner.verify(token, now)  # type: ignore[attr-defined,no-any-return]


async def test_token_cache_reuses_success_not_failure(
    dev_key: DevKey, autojump_clock: object
) -> None:
    counting = CountingVerifier(dev_key.verifier(leeway=0))
    cache = CachingVerifier(counting, max_age=60)
    now = time.time()
    token = dev_key.mint("alice", ["s"], 3600, now)
    first = await cache.verify(token, now)
    assert await cache.verify(token, now) == first
    assert counting.calls == 1
    for _ in range(2):
        with pytest.raises(InvalidToken):
            await cache.verify("not-a-token", now)
    assert counting.calls == 3  # failures are never remembered
    await trio.sleep(61)  # past max_age: verified again
    await cache.verify(token, now)
    assert counting.calls == 4


async def test_token_cache_never_outlives_exp(dev_key: DevKey) -> None:
    counting = CountingVerifier(dev_key.verifier(leeway=0))
    cache = CachingVerifier(counting)
    now = time.time()
    token = dev_key.mint("alice", ["s"], 10, now)
    await cache.verify(token, now)
    with pytest.raises(InvalidToken):
        await cache.verify(token, now + 11)  # cached, but expired: asked again, refused
    assert counting.calls == 2


async def test_token_cache_is_bounded(dev_key: DevKey) -> None:
    counting = CountingVerifier(dev_key.verifier())
    cache = CachingVerifier(counting, max_entries=2)
    now = time.time()
    tokens = [dev_key.mint(f"u{i}", ["s"], 3600, now) for i in range(3)]
    for token in tokens:
        await cache.verify(token, now)
    await cache.verify(tokens[0], now)  # evicted as the oldest: verified again
    assert counting.calls == 4


async def test_role_cache_follows_version_and_age(autojump_clock: object) -> None:
    inner = InMemoryPermissionStore()
    cache = CachedPermissionStore(inner, max_age=1.0)
    await cache.version()
    assert await cache.role_of("s1", "alice") is None
    inner.grant("s1", "alice", Role.SITE_ADMIN)
    assert await cache.role_of("s1", "alice") is None  # cached for up to max_age...
    await cache.version()  # ...unless the grants changed and someone looked
    assert await cache.role_of("s1", "alice") is Role.SITE_ADMIN
    inner.revoke("s1", "alice")
    await trio.sleep(1.01)
    assert await cache.role_of("s1", "alice") is None


async def test_role_cache_stays_bounded_under_distinct_lookups(autojump_clock: object) -> None:
    # Issue #9 (10): every distinct (site, subject) a client names is an entry.
    inner = InMemoryPermissionStore()
    inner.grant("s1", "alice", Role.SITE_ADMIN)
    cache = CachedPermissionStore(inner, max_age=1.0, max_entries=100)
    largest = 0
    for round_ in range(20):
        for i in range(60):
            await cache.role_of(f"site-{round_}-{i}", "mallory")
            largest = max(largest, len(cache._roles))
        await trio.sleep(0.3)  # some answers expire between rounds
    assert largest <= 100
    # Answers still come from the store, and a fresh one is still cached.
    assert await cache.role_of("s1", "alice") is Role.SITE_ADMIN
    inner.revoke("s1", "alice")
    assert await cache.role_of("s1", "alice") is Role.SITE_ADMIN  # within max_age


class SlowStore(InMemoryPermissionStore):
    """The store as seen across a network: each answer is read, then travels 1 s."""

    async def role_of(self, site_id: str, subject: str) -> Role | None:
        role = await super().role_of(site_id, subject)
        await trio.sleep(1.0)
        return role


async def test_role_cache_looks_up_again_when_its_pair_changed_mid_lookup(
    autojump_clock: object,
) -> None:
    inner = SlowStore()
    inner.grant("s1", "alice", Role.SITE_ADMIN)
    inner.grant("s1", "bob", Role.SITE_ADMIN)
    cache = CachedPermissionStore(inner)
    answers: dict[str, Role | None] = {}

    async def look_up(subject: str) -> None:
        answers[subject] = await cache.role_of("s1", subject)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(look_up, "alice")
        nursery.start_soon(look_up, "bob")
        await trio.sleep(0.5)  # both answers are on their way
        inner.revoke("s1", "alice")
        cache.forget(frozenset({("s1", "alice")}))  # what a change notice does
    # Alice's answer predated the revoke; bob's pair was not named.
    assert answers == {"alice": None, "bob": Role.SITE_ADMIN}
    assert trio.current_time() == pytest.approx(2.0)


async def test_role_cache_lookups_survive_a_stream_of_unrelated_changes(
    autojump_clock: object,
) -> None:
    # A new version alone names no pair: the re-check it leads to does (forget).
    inner = SlowStore()
    inner.grant("s1", "alice", Role.SITE_ADMIN)
    cache = CachedPermissionStore(inner)

    async def keep_changing_others() -> None:
        for index in range(100):
            await trio.sleep(0.1)
            inner.grant(f"elsewhere-{index}", "carol", Role.SITE_USER)
            await cache.version()
            cache.forget(frozenset({(f"elsewhere-{index}", "carol")}))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_changing_others)
        assert await cache.role_of("s1", "alice") is Role.SITE_ADMIN
        assert trio.current_time() < 1.5  # looked up once


async def test_role_cache_gives_up_when_a_pair_keeps_changing(autojump_clock: object) -> None:
    inner = SlowStore()
    cache = CachedPermissionStore(inner)

    async def keep_changing() -> None:
        while True:
            await trio.sleep(0.5)
            cache.forget(None)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_changing)
        with pytest.raises(PermissionStoreUnavailable, match="kept changing"):
            await cache.role_of("s1", "alice")
        nursery.cancel_scope.cancel()
