"""Issue #9, the HTTP front: deadlines, connection limits, HEAD, input limits, publish 503s.

Every test runs a real server on 127.0.0.1 (in this process, or as a real
``python -m hubserver`` process where the descriptor limit matters) and, where
the abuse could plausibly reach others, keeps a well-behaved bystander
subscriber that must get the next event, numbered next (helpers.bystander).

Abusers that must be told apart from the bystander by address connect from
127.0.0.2 (any 127/8 address is the loopback on Linux).
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest
import trio

from hubserver.auth import DevKey, ensure_dev_key
from hubserver.backplane import parse_redis_url
from hubserver.backplane.redis_client import RedisConnection
from hubserver.permissions import Role

from .conftest import Harness
from .helpers import (
    HttpResponse,
    ProcessLog,
    ResponseReader,
    UpgradeRefused,
    bearer,
    build_request,
    bystander,
    exchange,
    hub_target,
    open_hub,
    open_tcp,
    publish,
    publish_raw,
    upgrade_headers,
)
from .redis_fixture import RedisServer, own_redis_server_fixture  # noqa: F401

ABUSER_IP = "127.0.0.2"


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    """The run's shared key (see conftest): this module's tests need no key of their own."""
    return shared_dev_key


async def open_tcp_from(
    port: int, source_ip: str, *, rcvbuf: int | None = None
) -> trio.SocketStream:
    """A TCP stream to the server from ``source_ip`` (another loopback address)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.bind((source_ip, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def read_to_end(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes (a reset counts as the end)."""
    data = bytearray()
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


async def read_refusal(stream: trio.SocketStream) -> HttpResponse:
    """Send a request on ``stream`` and read the one answer (a limit's refusal)."""
    with suppress(trio.BrokenResourceError):
        await stream.send_all(build_request("GET", "/healthz"))
    return await ResponseReader(stream).read_response()


def assert_limit_answer(response: HttpResponse, status: int) -> None:
    assert response.status == status, response
    assert response.headers.get("retry-after") == "1", response.headers
    body = response.json()
    assert set(body) == {"code", "message"}, body
    assert body["message"]


# -- 1. deadlines --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("GET", "/healthz", 408),
        ("GET", "/readyz", 408),
        ("POST", "/v1/hub/entries/negotiate?site_id=s1&negotiateVersion=1", 408),
        ("POST", "/v1/events/entries", 408),
        ("GET", "/nowhere", 404),
    ],
    ids=["healthz", "readyz", "negotiate", "publish", "404"],
)
async def test_a_body_that_never_comes_ends_within_the_request_deadline(
    start_server, method: str, target: str, status: int
) -> None:
    h = await start_server(request_timeout=0.5)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    token = h.publisher_token() if target.startswith("/v1/events/") else h.token()
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
        f"Content-Type: application/json\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()
    with trio.fail_after(5):
        async with bystander(h) as b:
            stream = await open_tcp(h.port)
            async with stream:
                await stream.send_all(head + b"{")  # one byte of the 100 announced, no more
                started = trio.current_time()
                data = await read_to_end(stream)
                elapsed = trio.current_time() - started
            await b.check()
    assert data.startswith(f"HTTP/1.1 {status} ".encode()), data[:200]
    assert elapsed < 2.0, elapsed


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    start_server,
) -> None:
    h = await start_server(request_timeout=5.0, http_idle_timeout=0.5)
    with trio.fail_after(5):
        stream = await open_tcp(h.port)
        async with stream:
            reader = ResponseReader(stream)
            for _ in range(2):  # keep-alive works, and idling a bit between requests is fine
                await stream.send_all(build_request("GET", "/healthz", close=False))
                assert (await reader.read_response()).status == 200
                await trio.sleep(0.2)
            idle_since = trio.current_time()
            assert await read_to_end(stream) == b""
            idled = trio.current_time() - idle_since
    assert 0.2 <= idled < 2.0, idled


async def test_pipelined_requests_whose_answers_are_never_read_are_cut_off(start_server) -> None:
    h = await start_server(request_timeout=0.5)
    count = 20_000
    requests = build_request("GET", "/healthz", close=False) * count
    with trio.fail_after(15):
        async with bystander(h) as b:
            stream = await open_tcp(h.port, rcvbuf=4096)
            async with stream, trio.open_nursery() as nursery:

                async def flood() -> None:
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await stream.send_all(requests)

                nursery.start_soon(flood)
                await trio.sleep(2.0)  # not reading: the server's writes block
                await b.check()  # meanwhile, everyone else is served
                answers = (await read_to_end(stream)).count(b"HTTP/1.1 200 ")
                nursery.cancel_scope.cancel()
    # Before the write deadline the server kept answering once we read: all of them.
    assert answers < count, answers


# -- 2. connection limits ------------------------------------------------------------


async def test_over_the_per_ip_limit_gets_429_and_others_are_served(start_server) -> None:
    h = await start_server(max_connections_per_ip=3)
    with trio.fail_after(5):
        async with bystander(h) as b:
            hogs = [await open_tcp_from(h.port, ABUSER_IP) for _ in range(3)]
            try:
                started = trio.current_time()
                extra = await open_tcp_from(h.port, ABUSER_IP)
                async with extra:
                    response = await read_refusal(extra)
                assert trio.current_time() - started < 1.0
                assert_limit_answer(response, 429)
                # Other addresses, the bystander and its publisher, do not notice.
                await b.check()
                assert (await exchange(h.port, build_request("GET", "/healthz"))).status == 200
            finally:
                for hog in hogs:
                    await hog.aclose()
            await trio.sleep(0.1)  # the server sees the closes
            async with await open_tcp_from(h.port, ABUSER_IP) as again:
                await again.send_all(build_request("GET", "/healthz"))
                assert (await ResponseReader(again).read_response()).status == 200


async def test_over_the_global_limit_gets_503_quickly_and_no_one_is_cut(start_server) -> None:
    h = await start_server(max_connections=4)
    with trio.fail_after(5):
        async with bystander(h) as b:  # one connection
            hogs = [await open_tcp_from(h.port, ABUSER_IP) for _ in range(3)]
            try:
                started = trio.current_time()
                response = await exchange(h.port, build_request("GET", "/healthz"))
                assert trio.current_time() - started < 1.0
                assert_limit_answer(response, 503)
            finally:
                for hog in hogs:
                    await hog.aclose()
            await trio.sleep(0.1)
            await b.check()  # connected before the limit was hit, still served


async def test_over_the_per_subject_limit_an_upgrade_gets_429(start_server) -> None:
    h = await start_server(max_hub_connections_per_subject=2)
    h.grant("s1", "alice", Role.SITE_ADMIN)
    target = hub_target("entries", "s1")
    with trio.fail_after(10):
        async with bystander(h) as b, open_hub(h, target), open_hub(h, target):
            with pytest.raises(UpgradeRefused) as refused:
                async with open_hub(h, target):
                    pass
            assert_limit_answer(refused.value.response, 429)
            await b.check()  # another subject: not counted with alice
        # Closing alice's connections frees her count.
        for _ in range(20):
            if not h.server.app._hubs_by_subject.get("alice"):
                break
            await trio.sleep(0.05)
        async with open_hub(h, target), open_hub(h, target):
            pass


# -- 2b. the descriptor limit, in a real process -------------------------------------


@asynccontextmanager
async def server_process(
    tmp_path: Path, nursery: trio.Nursery, nofile: int, **env_flags: str
) -> AsyncIterator[tuple[int, list[str]]]:
    """``python -m hubserver serve`` with RLIMIT_NOFILE (soft and hard) at ``nofile``.

    Flags go through the environment (``HUBSERVER_<FLAG>``), which a server
    that does not know one ignores, so these tests also run against older code.
    """
    data = tmp_path / "data"
    ensure_dev_key(data)

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBSERVER_")}
    env |= {f"HUBSERVER_{name.upper()}": value for name, value in env_flags.items()}
    env["HUBSERVER_LOG_FORMAT"] = "text"  # read as text lines (a pipe gets JSON by default)
    command = [sys.executable, "-m", "hubserver", "serve", "--port", "0"]
    command += ["--data-dir", str(data)]
    process = await trio.lowlevel.open_process(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=limit_files,
    )
    log = ProcessLog()
    assert process.stderr is not None
    nursery.start_soon(log.pump, process.stderr)
    try:
        with trio.fail_after(20):
            port = int((await log.wait_for(r"listening on http://[\d.]+:(\d+)")).group(1))
        yield port, log.lines
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()


async def test_by_default_the_descriptor_limit_caps_connections_with_503(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    async with server_process(tmp_path, nursery, 128) as (port, log):
        with trio.fail_after(15):
            hogs = [await open_tcp(port) for _ in range(100)]  # more than 128 - 64
            try:
                started = trio.current_time()
                response = await exchange(port, build_request("GET", "/healthz"))
                assert trio.current_time() - started < 1.0
                assert_limit_answer(response, 503)
            finally:
                for hog in hogs:
                    await hog.aclose()
            await trio.sleep(0.2)
            assert (await exchange(port, build_request("GET", "/healthz"))).status == 200
    assert any("connection limits: 64 in total" in line for line in log), log[:5]


async def test_at_emfile_accepting_pauses_with_one_log_line_per_interval(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # --max-connections above the descriptor limit: the accept itself fails.
    async with server_process(tmp_path, nursery, 128, max_connections="1000") as (port, log):
        with trio.fail_after(20):
            hogs = [await open_tcp(port) for _ in range(160)]
            try:
                await trio.sleep(2.0)
            finally:
                for hog in hogs:
                    await hog.aclose()
            while True:  # accepting resumes: the pause is short
                with suppress(OSError, EOFError):
                    response = await exchange(port, build_request("GET", "/healthz"))
                    if response.status == 200:
                        break
                await trio.sleep(0.1)
    emfile_lines = [line for line in log if "EMFILE" in line]
    assert 1 <= len(emfile_lines) <= 5, emfile_lines  # ~1 a second, not ~10
    assert not any("Traceback" in line for line in log), log


# -- 3. HEAD and h11's local errors --------------------------------------------------


@pytest.mark.parametrize(
    ("target", "headers", "get_status"),
    [
        ("/healthz", [], 200),
        ("/readyz", [], 200),
        (hub_target("entries", "s1"), [], 400),  # no upgrade headers: as GET
        (hub_target("entries", "s1"), upgrade_headers(), 401),  # no token: as GET
        ("/nowhere", [], 404),
    ],
    ids=["healthz", "readyz", "hub-no-upgrade", "hub-no-token", "404"],
)
async def test_head_answers_as_get_without_a_body(
    start_server, target: str, headers: list[tuple[str, str]], get_status: int
) -> None:
    h = await start_server()
    with trio.fail_after(5):
        async with bystander(h) as b:
            stream = await open_tcp(h.port)
            async with stream:
                reader = ResponseReader(stream)
                await stream.send_all(build_request("GET", target, headers=headers, close=False))
                get = await reader.read_response()
                await stream.send_all(build_request("HEAD", target, headers=headers, close=False))
                status, head_headers = await reader.read_head()
                # The next answer starts right away: HEAD's carried no body bytes.
                await stream.send_all(build_request("GET", "/healthz"))
                after = await reader.read_response()
            await b.check()
    assert get.status == status == get_status
    assert head_headers.get("content-length") == str(len(get.body)), head_headers
    assert after.status == 200 and after.body == b"ok\n", after


async def test_head_on_a_valid_upgrade_is_405_not_an_upgrade(start_server) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    raw = build_request(
        "HEAD", hub_target("entries", "s1"), headers=[*upgrade_headers(), bearer(h.token())]
    )
    with trio.fail_after(5):
        stream = await open_tcp(h.port)
        async with stream:
            await stream.send_all(raw)
            data = await read_to_end(stream)
    assert data.startswith(b"HTTP/1.1 405 "), data


# -- 4. input limits -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("site", "user"),
    [("s" * 257, None), ("s1", "u" * 257), ("s" * 5000, None)],
    ids=["site-257", "user-257", "site-5000"],
)
async def test_long_site_or_user_ids_on_the_hub_url_are_400(
    start_server, caplog: pytest.LogCaptureFixture, site: str, user: str | None
) -> None:
    h = await start_server()
    caplog.set_level(logging.INFO)
    with trio.fail_after(5):
        async with bystander(h) as b:
            with pytest.raises(UpgradeRefused) as refused:
                async with open_hub(h, hub_target("entries", site, user)):
                    pass
            negotiate = await exchange(
                h.port,
                build_request(
                    "POST",
                    f"/v1/hub/entries/negotiate?site_id={site}"
                    + ("" if user is None else f"&user_id={user}"),
                    headers=[bearer(h.token())],
                ),
            )
            await b.check()
    assert refused.value.response.status == 400, refused.value.response
    assert negotiate.status == 400, negotiate
    # The URL is the client's to choose: the log keeps only its start.
    assert all(len(record.getMessage()) < 600 for record in caplog.records)


async def test_ids_of_256_chars_are_fine_on_the_hub_url(start_server) -> None:
    h = await start_server()
    site = "s" * 256
    h.grant(site, "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        async with open_hub(h, hub_target("entries", site)) as client:
            response = await publish(h, "entries", {"site_id": site})
            assert response.status == 202
            assert (await client.next_event())["site_id"] == site


@pytest.mark.parametrize(
    "version", ["%C2%B2", "%D9%A1", "9" * 5000], ids=["sup2", "arabic-1", "long"]
)
async def test_negotiate_version_must_be_ascii_digits(start_server, version: str) -> None:
    h = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    target = f"/v1/hub/entries/negotiate?site_id=s1&negotiateVersion={version}"
    with trio.fail_after(5):
        async with bystander(h) as b:
            response = await exchange(
                h.port, build_request("POST", target, headers=[bearer(h.token())])
            )
            await b.check()
    assert response.status == 200, response
    body = response.json()
    if version.isdigit():
        assert body["negotiateVersion"] == 1, body  # min(requested, 1)
    else:
        assert "error" in body, body


@pytest.mark.parametrize(("depth", "status"), [(32, 202), (33, 400), (1000, 400), (100_000, 400)])
async def test_publish_bodies_nested_deeper_than_32_levels_are_400(
    start_server, depth: int, status: int
) -> None:
    h = await start_server()
    # The event object is level 1; its "x" adds the rest.
    nested = "[" * (depth - 1) + "]" * (depth - 1)
    body = f'{{"site_id":"bystander-site","x":{nested}}}'.encode()
    with trio.fail_after(10):
        async with bystander(h) as b:
            response = await publish_raw(h, "entries", body)
            if status == 202:
                await b.client.next_event()  # delivered; count it
                b.last_seq += 1
            await b.check()
    assert response.status == status, response
    if status == 400:
        assert response.json()["code"] == "invalid_body"


# -- 5. publish: seqs, and backplane errors as 503 -----------------------------------


async def test_202_lists_the_seqs(start_server) -> None:
    h = await start_server()
    with trio.fail_after(5):
        async with bystander(h) as b:
            response = await publish(h, "entries", [{"site_id": b.site}, {"site_id": b.site}])
            first, second = await b.client.next_event(), await b.client.next_event()
    assert response.status == 202
    assert response.json()["seqs"] == [first["seq"], second["seq"]]
    assert response.json()["ids"] == [first["id"], second["id"]]


async def _redis(url: str, *args: str) -> object:
    async with await RedisConnection.connect(parse_redis_url(url)) as conn:
        return await conn.execute(*args)


async def test_a_redis_error_on_publish_is_a_json_503_and_serving_goes_on(
    start_server, own_redis_server: RedisServer
) -> None:
    h: Harness = await start_server(backplane=own_redis_server.url)
    with trio.fail_after(15):
        async with bystander(h) as b:
            await b.check()
            await _redis(own_redis_server.url, "CONFIG", "SET", "maxmemory-policy", "noeviction")
            await _redis(own_redis_server.url, "CONFIG", "SET", "maxmemory", "1")
            try:
                response = await publish(h, "entries", {"site_id": b.site, "id": "e-oom"})
            finally:
                await _redis(own_redis_server.url, "CONFIG", "SET", "maxmemory", "0")
            assert response.status == 503, response
            assert response.headers.get("retry-after") == "1"
            body = response.json()
            # Redis refuses a write before the script runs: nothing was accepted,
            # and the answer says so (the publisher may retry with the same ids).
            assert body["code"] == "unavailable" and body["outcome"] == "not_accepted", body
            await b.check()  # the server kept serving: nothing was lost for others
            # The retry after the outage publishes the event once.
            retried = await publish(h, "entries", {"site_id": b.site, "id": "e-oom"})
            assert retried.status == 202, retried
            assert (await b.client.next_event())["id"] == "e-oom"


async def test_an_unreachable_backplane_says_nothing_was_accepted(
    start_server, own_redis_server: RedisServer
) -> None:
    h: Harness = await start_server(backplane=own_redis_server.url)
    own_redis_server.stop()
    with trio.fail_after(15):
        response = await publish(h, "entries", {"site_id": "s1"})
        assert (await exchange(h.port, build_request("GET", "/healthz"))).status == 200
    assert response.status == 503, response
    assert response.headers.get("retry-after") == "1"
    assert response.json()["outcome"] == "not_accepted", response.json()


# -- found in review --------------------------------------------------------------------


async def test_a_bad_request_to_a_client_that_never_reads_is_not_answered_forever(
    start_server,
) -> None:
    # The 400 for malformed HTTP was written without a deadline: behind pipelined
    # answers that nearly filled the socket, it blocked its task for as long as
    # the client held the connection. Several fill levels: one of them blocks.
    h: Harness = await start_server(request_timeout=1.0)
    gate = h.server.app.connections
    assert gate is not None
    base = gate.open
    streams = []
    with trio.fail_after(20):
        async with bystander(h) as b:
            try:
                for i in range(100):
                    stream = await open_tcp(h.port, rcvbuf=2048)
                    streams.append(stream)
                    pipelined = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n" * (60 + i)
                    await stream.send_all(pipelined + b"BAD\x00garbage\r\n\r\n")
                # Every request deadline (1 s) and the answer's bound have passed:
                # no connection may still be held, though none of them read.
                await trio.sleep(4)
                assert gate.open == base + 1, (gate.open, base)  # the bystander only
                await b.check()
            finally:
                for stream in streams:
                    await stream.aclose()


async def test_a_publish_while_draining_says_nothing_was_accepted(start_server) -> None:
    h: Harness = await start_server()
    h.server.app.is_draining = True  # what the shutdown sets first
    with trio.fail_after(5):
        response = await publish(h, "entries", {"site_id": "s1", "id": "e1"})
    h.server.app.is_draining = False
    assert response.status == 503
    assert response.headers.get("retry-after") == "1"
    assert response.json()["outcome"] == "not_accepted"


async def test_a_publisher_that_expects_100_continue_gets_it_at_once(start_server) -> None:
    # curl sends "Expect: 100-continue" for bodies over 1 KiB and waits a second.
    h: Harness = await start_server()
    body = b'[{"site_id":"s1","pad":"' + b"x" * 2000 + b'"}]'
    head = (
        "POST /v1/events/entries HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {h.publisher_token()}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()
    with trio.fail_after(5):
        stream = await open_tcp(h.port)
        async with stream:
            await stream.send_all(head)
            reader = ResponseReader(stream)
            started = trio.current_time()
            status, _ = await reader.read_head()
            assert status == 100
            assert trio.current_time() - started < 0.5
            await stream.send_all(body)
            status, _ = await reader.read_head()
            assert status == 202


async def test_a_publish_under_way_when_the_drain_starts_gets_its_answer(start_server) -> None:
    # Found in review: the drain waited for hub connections only, then cut every
    # HTTP request: a publisher whose body was still coming got no answer.
    h: Harness = await start_server(drain_timeout=5.0)
    body = b'{"site_id":"s1","id":"e-drain"}'
    head = (
        "POST /v1/events/entries HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {h.publisher_token()}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with trio.fail_after(10):
        stream = await open_tcp(h.port)
        async with stream:
            await stream.send_all(head + body[:10])
            await trio.sleep(0.2)  # the request is being handled, its body half here
            h.server.request_shutdown()
            await trio.sleep(0.2)
            await stream.send_all(body[10:])
            reader = ResponseReader(stream)
            status, headers = await reader.read_head()
    assert status == 202, (status, headers)


@pytest.mark.parametrize(
    "body_headers",
    [[("Content-Length", "5")], [("Transfer-Encoding", "chunked")]],
    ids=["content-length", "chunked"],
)
async def test_an_upgrade_with_a_body_is_refused(
    start_server, body_headers: list[tuple[str, str]]
) -> None:
    # Found in review: the body's bytes reached the WebSocket frame reader.
    h: Harness = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(5):
        async with bystander(h) as b:
            raw = build_request(
                "GET",
                hub_target("entries", "s1"),
                headers=[*upgrade_headers(token=h.token()), *body_headers],
            )
            response = await exchange(port=h.port, raw=raw + b"hello")
            assert response.status == 400, response
            await b.check()
