"""Authentication and authorization over real sockets: upgrade, publish API, live expiry, revoke.

Tokens are RS256 JWTs signed by the harness's development key, except where a
test forges a bad one on purpose.
"""

from __future__ import annotations

import logging
import time

import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from hubserver.app import HUB_SCOPE, PUBLISH_SCOPE
from hubserver.auth import DevKey
from hubserver.permissions import Role

from .helpers import (
    WsClosed,
    build_request,
    bystander,
    exchange,
    hub_target,
    open_hub,
    open_ws,
    publish,
    publish_ok,
    upgrade_refused,
)


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    """The run's shared key (see conftest): this module's tests need no key of their own."""
    return shared_dev_key


def _foreign_token(subject: str = "alice") -> str:
    """Well formed, right claims, signed by a key the server does not know."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    claims = {
        "sub": subject,
        "scope": HUB_SCOPE,
        "iss": "hubserver-dev",
        "aud": "hubserver",
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "nope"})


# -- upgrade: 401 / 403 / 400 --------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["missing", "garbage", "expired", "foreign-key", "basic-scheme", "empty-bearer"]
)
async def test_upgrade_without_a_valid_token_is_401(start_server, case: str) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    headers: list[tuple[str, str]] = []
    match case:
        case "garbage":
            headers = [("Authorization", "Bearer not.a.jwt")]
        case "expired":  # beyond any leeway
            headers = [("Authorization", f"Bearer {h.token(ttl=-300)}")]
        case "foreign-key":
            headers = [("Authorization", f"Bearer {_foreign_token()}")]
        case "basic-scheme":
            headers = [("Authorization", "Basic YWxpY2U6c2VjcmV0")]
        case "empty-bearer":
            headers = [("Authorization", "Bearer ")]
    with trio.fail_after(5):
        async with bystander(h) as b:
            response = await upgrade_refused(h.port, hub_target("entries", "s1"), headers=headers)
            await b.check()
    assert response.status == 401, response
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.headers["content-type"].startswith("text/plain")
    assert response.body


async def test_token_in_query_works_and_a_bad_one_is_401(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        async with open_hub(h, hub_target("entries", "s1"), in_query=True) as client:
            (event_id,) = await publish_ok(h, "entries", {"site_id": "s1"})
            assert (await client.next_event())["id"] == event_id
        expired = await upgrade_refused(
            h.port, hub_target("entries", "s1") + f"&access_token={h.token(ttl=-300)}"
        )
        garbage = await upgrade_refused(h.port, hub_target("entries", "s1") + "&access_token=x")
    assert expired.status == garbage.status == 401


async def test_authorization_header_wins_over_query(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    target = hub_target("entries", "s1") + f"&access_token={h.token()}"
    with trio.fail_after(5):
        response = await upgrade_refused(
            h.port, target, headers=[("Authorization", "Bearer garbage")]
        )
    assert response.status == 401


@pytest.mark.parametrize(
    "scopes",
    [(), (PUBLISH_SCOPE,), ("user_api.read",), ("user_api.full_access.extra",)],
    ids=["none", "publish-only", "other", "prefix-lookalike"],
)
async def test_upgrade_without_the_hub_scope_is_403(start_server, scopes: tuple[str, ...]) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        response = await upgrade_refused(
            h.port, hub_target("entries", "s1"), token=h.token(scopes=scopes)
        )
    assert response.status == 403, response


@pytest.mark.parametrize(
    "target",
    [
        "/v1/hub/entries",
        "/v1/hub/entries?site_id=",
        "/v1/hub/incidents?user_id=alice",
        "/v1/hub/entries?site_id=s1&user_id=",
    ],
)
async def test_missing_or_empty_ids_are_400(start_server, target: str) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        response = await upgrade_refused(h.port, target, token=h.token())
    assert response.status == 400, response
    assert b"_id" in response.body


# Who may open which stream. "own" is the user stream named after the subject.
ROLE_CASES = [
    (Role.SITE_ADMIN, None, True),
    (Role.SITE_ADMIN, "own", True),
    (Role.SITE_ADMIN, "bob", True),
    (Role.SITE_SUPER_USER, None, True),
    (Role.SITE_SUPER_USER, "own", True),
    (Role.SITE_SUPER_USER, "bob", True),
    (Role.SITE_USER, None, False),
    (Role.SITE_USER, "own", True),
    (Role.SITE_USER, "bob", False),
    (None, None, False),
    (None, "own", False),
]


@pytest.mark.parametrize("hub", ["entries", "incidents"])
@pytest.mark.parametrize(("role", "user", "allowed"), ROLE_CASES)
async def test_site_roles(
    start_server, hub: str, role: Role | None, user: str | None, allowed: bool
) -> None:
    h = await start_server()
    if role is not None:
        h.grant("s1", "alice", role)
    h.grant("s2", "alice", Role.SITE_ADMIN)  # rights elsewhere change nothing
    user_id = "alice" if user == "own" else user
    target = hub_target(hub, "s1", user_id)
    with trio.fail_after(5):
        if allowed:
            async with open_hub(h, target) as client:
                event = {"site_id": "s1", "user_id": user_id}
                (event_id,) = await publish_ok(h, hub, event)
                assert (await client.next_event())["id"] == event_id
            return
        refused = await upgrade_refused(h.port, target, token=h.token())
        unknown_site = await upgrade_refused(
            h.port, hub_target(hub, "no-such-site", user_id), token=h.token()
        )
    assert refused.status == 403
    # No enumeration: an unknown site looks exactly like a site without rights.
    assert (refused.status, refused.headers, refused.body) == (
        unknown_site.status,
        unknown_site.headers,
        unknown_site.body,
    )


async def test_site_user_subject_match_is_exact(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_USER)
    with trio.fail_after(5):
        for other in ("Alice", "alice ", "alic", "alice2"):
            response = await upgrade_refused(
                h.port, hub_target("entries", "s1", other.replace(" ", "%20")), token=h.token()
            )
            assert response.status == 403, other


async def test_refused_upgrade_leaves_no_session_behind(start_server) -> None:
    h = await start_server()
    with trio.fail_after(5):
        await upgrade_refused(h.port, hub_target("entries", "s1"), token=h.token())
    assert h.server.app.stats.opened == 0
    assert h.server.app.router.subscriber_count == 0


# -- publish API ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing", "garbage", "expired", "foreign-key"])
async def test_publish_without_a_valid_token_is_401(start_server, case: str) -> None:
    h = await start_server()
    body = b'{"site_id":"bystander-site"}'
    headers = [("Content-Type", "application/json")]
    match case:
        case "garbage":
            headers.append(("Authorization", "Bearer x.y.z"))
        case "expired":
            expired = h.token("backend", (PUBLISH_SCOPE,), ttl=-300)
            headers.append(("Authorization", f"Bearer {expired}"))
        case "foreign-key":
            headers.append(("Authorization", f"Bearer {_foreign_token('backend')}"))
    with trio.fail_after(5):
        async with bystander(h) as b:
            response = await exchange(
                h.port, build_request("POST", "/v1/events/entries", headers=headers, body=body)
            )
            await b.check()  # seq 1: the refused event was not published
    assert response.status == 401
    assert response.json()["code"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_publish_without_the_publish_scope_is_403(start_server) -> None:
    h = await start_server()
    with trio.fail_after(5):
        async with bystander(h) as b:
            response = await publish(
                h, "entries", {"site_id": b.site}, token=h.token("backend", (HUB_SCOPE,))
            )
            await b.check()
    assert response.status == 403
    assert response.json()["code"] == "forbidden"


async def test_publish_token_in_query(start_server) -> None:
    h = await start_server()
    body = b'{"site_id":"s1"}'
    target = f"/v1/events/entries?access_token={h.publisher_token()}"
    with trio.fail_after(5):
        response = await exchange(h.port, build_request("POST", target, body=body))
    assert response.status == 202


# -- a live connection does not outlive its token ------------------------------------


async def test_connection_is_closed_when_its_token_expires(start_server) -> None:
    h = await start_server(token_leeway=0)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    token = h.token(ttl=2)
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    with trio.fail_after(10):
        async with bystander(h) as b, open_hub(h, hub_target("entries", "s1"), token=token) as c:
            (event_id,) = await publish_ok(h, "entries", {"site_id": "s1"})
            assert (await c.next_event())["id"] == event_id
            ended = await c.expect_close()
            closed_at = time.time()
            await b.check()  # other connections are untouched
    assert ended.close is not None and ended.close["allowReconnect"] is True
    assert ended.ws.code == 1000
    assert exp - 0.2 <= closed_at <= exp + 2, (exp, closed_at)
    assert h.server.app.stats.expired_closed == 1


async def test_revoke_closes_open_connections_without_reconnect(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    h.grant("s2", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with (
            bystander(h) as b,
            open_hub(h, hub_target("entries", "s1")) as site,
            open_hub(h, hub_target("incidents", "s1", "bob")) as user,
            open_hub(h, hub_target("entries", "s2")) as other_site,
        ):
            assert h.store.revoke("s1", "alice")
            started = trio.current_time()
            ended = [await site.expect_close(), await user.expect_close()]
            assert trio.current_time() - started < 3
            # The grant on s2 still holds.
            (event_id,) = await publish_ok(h, "entries", {"site_id": "s2"})
            assert (await other_site.next_event())["id"] == event_id
            await b.check()
    for closed in ended:
        assert closed.close is not None
        assert closed.close.get("allowReconnect", False) is False, closed
        assert closed.ws.code == 1000
    assert h.server.app.stats.revoked_closed == 2


async def test_downgrade_to_site_user_keeps_only_the_own_stream(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with (
            open_hub(h, hub_target("entries", "s1")) as site,
            open_hub(h, hub_target("entries", "s1", "alice")) as own,
        ):
            h.grant("s1", "alice", Role.SITE_USER)
            ended = await site.expect_close()
            (event_id,) = await publish_ok(h, "entries", {"site_id": "s1", "user_id": "alice"})
            assert (await own.next_event())["id"] == event_id
    assert ended.close is not None and not ended.close.get("allowReconnect", False)


async def test_revoked_subject_cannot_reconnect(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    h.store.revoke("s1", "alice")
    with trio.fail_after(5):
        response = await upgrade_refused(h.port, hub_target("entries", "s1"), token=h.token())
    assert response.status == 403


# -- tokens never reach the logs -----------------------------------------------------


async def test_tokens_never_appear_in_logs(start_server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    h = await start_server(token_leeway=0)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    good = h.token()
    no_scope = h.token(scopes=())
    expired = h.token(ttl=-300)
    short = h.token(ttl=1)
    publisher = h.publisher_token()
    tokens = [good, no_scope, expired, short, publisher]
    site = hub_target("entries", "s1")
    with trio.fail_after(10):
        # Accepted in the query and in the header; refused for each reason.
        async with open_hub(h, site, token=good, in_query=True) as client:
            await publish_ok(h, "entries", {"site_id": "s1"})
            await client.next_event()
        async with open_hub(h, site, token=short) as client:
            await client.expect_close()  # expires while open
        for token in (no_scope, expired):
            await upgrade_refused(h.port, f"{site}&access_token={token}")
            await upgrade_refused(h.port, site, token=token)
        await upgrade_refused(h.port, f"/v1/hub/entries?site_id=nope&access_token={good}")
        await upgrade_refused(h.port, f"/v1/hub/entries?site_id=s1&site_id=s2&access_token={good}")
        await upgrade_refused(h.port, f"/v1/hub/entries?site_id=%FF&access_token={good}")
        await upgrade_refused(h.port, f"/v1/hub/nope?site_id=s1&ACCESS_TOKEN={good}")
        await upgrade_refused(h.port, f"/v1/hub/entries?site_id=nope&access%5Ftoken={good}")
        await exchange(h.port, build_request("GET", f"/healthz?access_token={good}"))
        await publish(h, "entries", {"site_id": "s1"}, token=publisher)
        await publish(h, "entries", [{"site_id": ""}], token=publisher)
        await publish(h, "entries", {"site_id": "s1"}, token=expired)
        await exchange(
            h.port,
            build_request("POST", f"/v1/events/entries?access_token={publisher}", body=b"[]"),
        )
        # A hub connection whose upgrade carried the token in the query, then misbehaves.
        ws = await open_ws(h.port, f"{site}&access_token={good}")
        await ws.send_text("garbage\x1e")
        while not isinstance(await ws.receive(), WsClosed):
            pass
        await ws.aclose()
    assert caplog.records, "nothing was logged: the test would prove nothing"
    for token in tokens:
        signature = token.rsplit(".", 1)[1]
        assert token not in caplog.text
        assert signature not in caplog.text
        for record in caplog.records:
            assert signature not in record.getMessage()


@pytest.mark.parametrize(
    "raw",
    [
        # A client that forgot to percent-encode a space: the request line is illegal.
        "GET /v1/hub/entries?site_id=my site&access_token={token} HTTP/1.1\r\nHost: x\r\n\r\n",
        # A malformed header line carrying the token.
        "GET /v1/hub/entries?site_id=s1 HTTP/1.1\r\nHost: x\r\n"
        "Authorization : Bearer {token}\r\n\r\n",
    ],
    ids=["illegal-request-line", "illegal-header-line"],
)
async def test_tokens_in_malformed_requests_never_appear_in_logs(
    start_server, caplog: pytest.LogCaptureFixture, raw: str
) -> None:
    caplog.set_level(logging.DEBUG)
    h = await start_server()
    token = h.token()
    with trio.fail_after(5):
        response = await exchange(h.port, raw.format(token=token).encode())
    assert response.status == 400
    assert caplog.records
    assert token.rsplit(".", 1)[1] not in caplog.text
    assert token.rsplit(".", 1)[1].encode() not in response.body
