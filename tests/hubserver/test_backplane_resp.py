"""The RESP client under the Redis backplane: the sans-IO codec, URLs, one connection.

The codec is checked without I/O (hypothesis: any split of a reply stream gives
the same replies; commands round-trip), the connection against a real
redis-server started for the session.
"""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from hubserver.backplane import (
    BackplaneError,
    BackplaneUnavailable,
    RedisAddress,
    RedisConnection,
    RedisReplyError,
    parse_redis_url,
)
from hubserver.backplane.redis_client import NeedData, Reply, ReplyParser, encode_command

from .redis_fixture import RedisServer, redis_server_fixture  # noqa: F401 (fixture)

CAP = 10.0  # seconds, per test

# -- the codec -------------------------------------------------------------------------


@dataclass(frozen=True)
class Err:
    message: str


@dataclass(frozen=True)
class Simple:
    text: str


Model = bytes | int | None | Err | Simple | list["Model"]


def wire(reply: Model) -> bytes:
    """RESP2 bytes for a model reply, written independently of the code under test."""
    match reply:
        case bytes():
            return b"$%d\r\n%s\r\n" % (len(reply), reply)
        case bool():
            raise AssertionError("no booleans in RESP2")
        case int():
            return b":%d\r\n" % reply
        case None:
            return b"$-1\r\n"
        case Err(message):
            return b"-%s\r\n" % message.encode()
        case Simple(text):
            return b"+%s\r\n" % text.encode()
        case list():
            return b"*%d\r\n" % len(reply) + b"".join(wire(item) for item in reply)


def expected(reply: Model) -> object:
    match reply:
        case Simple(text):
            return text.encode()
        case list():
            return [expected(item) for item in reply]
        case _:
            return reply


def seen(reply: Reply) -> object:
    match reply:
        case RedisReplyError():
            return Err(str(reply))
        case list():
            return [seen(item) for item in reply]
        case _:
            return reply


line_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
leaves = st.one_of(
    st.binary(max_size=40),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.none(),
    line_text.map(lambda text: Err("ERR " + text)),
    line_text.map(Simple),
)
models = st.recursive(leaves, lambda children: st.lists(children, max_size=4), max_leaves=12)


def parse_all(parser: ReplyParser) -> list[object]:
    replies = []
    while (reply := parser.next_reply()) is not NeedData.NEED_DATA:
        replies.append(seen(reply))
    return replies


@given(st.lists(models, min_size=1, max_size=5), st.data())
def test_any_split_of_a_reply_stream_gives_the_same_replies(
    replies: list[Model], data: st.DataObject
) -> None:
    stream = b"".join(wire(reply) for reply in replies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    parser = ReplyParser()
    got: list[object] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        parser.receive_data(stream[start:end])
        got += parse_all(parser)
    assert got == [expected(reply) for reply in replies]
    assert parser.next_reply() is NeedData.NEED_DATA


@given(st.lists(st.one_of(st.binary(), st.text(), st.integers()), min_size=1, max_size=6))
def test_commands_are_arrays_of_bulk_strings(args: list[str | bytes | int]) -> None:
    parser = ReplyParser()
    parser.receive_data(encode_command(args))
    as_bytes = [
        arg
        if isinstance(arg, bytes)
        else str(arg).encode()
        if isinstance(arg, int)
        else arg.encode()
        for arg in args
    ]
    assert parse_all(parser) == [as_bytes]


def test_encode_command_bytes() -> None:
    assert (
        encode_command(("SET", b"k\r\n", 42)) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n42\r\n"
    )
    for bad in ((), ("SET", True), ("SET", 1.5), ("SET", None)):
        with pytest.raises(TypeError):
            encode_command(bad)  # type: ignore[arg-type]  # wrong types on purpose


def test_parser_rejects_oversized_and_malformed_replies() -> None:
    parser = ReplyParser(max_reply_bytes=100)
    parser.receive_data(b"$1000\r\n")
    with pytest.raises(BackplaneError, match="exceeds 100 bytes"):
        parser.receive_data(b"x" * 200)

    parser = ReplyParser()
    parser.receive_data(b"?what\r\n")
    with pytest.raises(BackplaneError, match="malformed RESP"):
        parser.next_reply()


# -- URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://localhost", RedisAddress(host="localhost")),
        ("redis://10.0.0.5:6380/3", RedisAddress(host="10.0.0.5", port=6380, db=3)),
        ("redis://h:1/", RedisAddress(host="h", port=1)),
        ("redis://:pa%40ss@h/2", RedisAddress(host="h", db=2, password="pa@ss")),
        ("redis://bob:pw@h:7000", RedisAddress(host="h", port=7000, username="bob", password="pw")),
        ("redis://[::1]:6379/0", RedisAddress(host="::1")),
    ],
)
def test_parse_redis_url(url: str, address: RedisAddress) -> None:
    assert parse_redis_url(url) == address


@pytest.mark.parametrize(
    "url",
    [
        "rediss://:secret@h",
        "http://h",
        "redis://:secret@",
        "redis://:secret@h/db0",
        "redis://:secret@h:99999",
        "redis://:secret@h/0?timeout=1",
        "redis://bob@h",
    ],
)
def test_parse_redis_url_rejects(url: str) -> None:
    with pytest.raises(BackplaneError) as caught:
        parse_redis_url(url)
    assert "secret" not in str(caught.value)


def test_address_never_shows_the_password() -> None:
    address = parse_redis_url("redis://:secret@h:1/2")
    assert "secret" not in repr(address)
    assert str(address) == "h:1/2"


# -- one connection, against a real redis-server ---------------------------------------


async def connect(server: RedisServer, **kwargs: int) -> RedisConnection:
    return await RedisConnection.connect(parse_redis_url(server.url), **kwargs)


def key() -> str:
    return f"test-resp-{uuid.uuid4().hex}"


async def test_execute_replies(redis_server: RedisServer) -> None:
    name = key()
    with trio.fail_after(CAP):
        async with await connect(redis_server) as conn:
            assert await conn.execute("PING") == b"PONG"
            assert await conn.execute("GET", name) is None
            assert await conn.execute("SET", name, "é") == b"OK"
            assert await conn.execute("GET", name.encode()) == "é".encode()
            assert await conn.execute("DEL", name) == 1
            assert await conn.execute("RPUSH", name, 1, b"\x00\xff", "") == 3
            assert await conn.execute("LRANGE", name, 0, -1) == [b"1", b"\x00\xff", b""]
            with pytest.raises(RedisReplyError) as caught:
                await conn.execute("INCR", name)
            assert caught.value.code == "WRONGTYPE"
            assert conn.is_usable  # an error reply is still a reply
            with pytest.raises(RedisReplyError, match="unknown command"):
                await conn.execute("NO-SUCH-COMMAND")
            big = bytes(range(256)) * 4096  # 1 MiB, many receive_some calls
            assert await conn.execute("SET", name + "big", big) == b"OK"
            assert await conn.execute("GET", name + "big") == big
            await conn.execute("DEL", name, name + "big")


async def test_commands_from_several_tasks_are_serialized(redis_server: RedisServer) -> None:
    name = key()
    with trio.fail_after(CAP):
        async with await connect(redis_server) as conn:
            results: list[Reply] = []

            async def incr() -> None:
                results.append(await conn.execute("INCR", name))

            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(incr)
            assert sorted(r for r in results if isinstance(r, int)) == list(range(1, 51))
            await conn.execute("DEL", name)


async def test_interrupted_command_leaves_the_connection_unusable(
    redis_server: RedisServer,
) -> None:
    with trio.fail_after(CAP):
        async with await connect(redis_server) as conn:
            with trio.move_on_after(0.05) as scope:
                await conn.execute("BLPOP", key(), 5)
            assert scope.cancelled_caught
            assert not conn.is_usable
            with pytest.raises(BackplaneUnavailable, match="broken"):
                await conn.execute("PING")


async def test_oversized_reply_breaks_the_connection(redis_server: RedisServer) -> None:
    name = key()
    with trio.fail_after(CAP):
        async with await connect(redis_server) as writer:
            await writer.execute("SET", name, b"x" * 10_000)
            async with await connect(redis_server, max_reply_bytes=1000) as reader:
                with pytest.raises(BackplaneError, match="exceeds 1000 bytes"):
                    await reader.execute("GET", name)
                assert not reader.is_usable
            await writer.execute("DEL", name)


async def test_connection_closed_by_redis(redis_server: RedisServer) -> None:
    with trio.fail_after(CAP):
        async with await connect(redis_server) as conn:
            assert await conn.execute("QUIT") == b"OK"
            with pytest.raises(BackplaneUnavailable, match=r"closed the connection|lost"):
                await conn.execute("PING")
            assert not conn.is_usable


async def test_connect_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        with trio.fail_after(CAP), pytest.raises(BackplaneUnavailable, match="cannot connect"):
            await RedisConnection.connect(RedisAddress(host="127.0.0.1", port=port))


async def test_select_database(redis_server: RedisServer) -> None:
    name = key()
    with trio.fail_after(CAP):
        base = redis_server.url.rsplit("/", 1)[0]
        async with (
            await RedisConnection.connect(parse_redis_url(base + "/3")) as db3,
            await RedisConnection.connect(parse_redis_url(base + "/0")) as db0,
        ):
            await db3.execute("SET", name, "in 3")
            assert await db0.execute("GET", name) is None
            assert await db3.execute("GET", name) == b"in 3"
            await db3.execute("DEL", name)
        with pytest.raises(BackplaneUnavailable, match="refused the connection setup"):
            await RedisConnection.connect(parse_redis_url(base + "/99999"))


async def test_subscriber_mode(redis_server: RedisServer) -> None:
    channel = key()
    with trio.fail_after(CAP):
        async with await connect(redis_server) as subscriber, await connect(redis_server) as pub:
            with pytest.raises(BackplaneError, match="not subscribed"):
                await subscriber.next_message()
            await subscriber.subscribe(channel)
            assert subscriber.is_subscribed
            with pytest.raises(BackplaneError, match="subscriber mode"):
                await subscriber.execute("GET", "x")
            with pytest.raises(BackplaneError, match="already subscribed"):
                await subscriber.subscribe("other")
            assert await pub.execute("PUBLISH", channel, b"\x00one") == 1
            assert await pub.execute("PUBLISH", channel, "two") == 1
            assert await subscriber.next_message() == (channel.encode(), b"\x00one")
            await subscriber.send_ping()  # its pong is skipped by next_message
            assert await pub.execute("PUBLISH", channel, "three") == 1
            assert await subscriber.next_message() == (channel.encode(), b"two")
            assert await subscriber.next_message() == (channel.encode(), b"three")
            await subscriber.send_ping()
            assert await subscriber.next_push() == [b"pong", b""]
