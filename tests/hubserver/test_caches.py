"""The verified-token cache and the site-role cache: faster, never wrong for long."""

from __future__ import annotations

import time

import pytest
import trio

from hubserver.auth import CachingVerifier, Claims, DevKey, InvalidToken
from hubserver.permissions import CachedPermissionStore, InMemoryPermissionStore, Role


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
