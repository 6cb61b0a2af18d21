"""Resume (issue #5): history, ``since_seq``, the ``Resume`` hub method, ``Gap``, the hold window.

A reconnecting client says where it stopped, with ``since_seq`` on the hub URL
or by invoking ``Resume(lastSeq)``; the server replays what it missed from the
site's history, in order, then goes on live, with no duplicate and no hole at
the switch. What history no longer holds is announced with a ``Gap(first)``
invocation before the replay.

Every test runs a real server on 127.0.0.1 with real tokens, and most run twice:
on the in-process backplane and on a real redis-server (the session's, each
test on sites of its own). The helpers at the top are shared with
test_scaleout.py.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio

from hubcore import encode_varint
from hubserver.auth import DevKey
from hubserver.permissions import Role

from .conftest import Harness
from .helpers import RS, HubClient, HubClosed, hub_target, open_hub, publish, upgrade_refused
from .redis_fixture import redis_server_fixture  # noqa: F401 (a fixture, found by pytest)

CAP = 10.0  # seconds, per test
RESUME_ARGUMENT_ERROR = "Failed to invoke 'Resume' due to an error on the server."

# -- helpers (test_scaleout.py uses them too) --------------------------------------------


def new_site() -> str:
    """A site of the test's own: the session's Redis is shared by every test."""
    return f"site-{uuid.uuid4().hex[:12]}"


class Publisher:
    """Publishes through a node's HTTP API with one token (minting one per call is slow)."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.token = h.publisher_token()

    async def entries(self, events: Sequence[dict[str, Any]], hub: str = "entries") -> list[str]:
        """Publish a batch; insists on 202 and returns the ids."""
        response = await publish(self.h, hub, list(events), token=self.token)
        assert response.status == 202, response
        ids: list[str] = response.json()["ids"]
        assert len(ids) == len(events)
        return ids

    async def some(self, site: str, count: int, **fields: Any) -> list[str]:
        return await self.entries([{"site_id": site, **fields} for _ in range(count)])


Record = tuple[Any, ...]


def record_of(message: Any) -> tuple[Record, dict[str, Any] | None]:
    """A hub message as a comparable record, and the event for a ``ReceiveMessage``.

    Records: ``("event", seq)``, ``("gap", first)``, ``("done", id, error)`` (error
    None for a void Completion), ``("close", error, allow_reconnect)`` for a hub
    Close, ``("closed",)`` when the WebSocket ended, or ``("other", message)``.
    """
    if isinstance(message, HubClosed):
        return ("closed",), None
    if isinstance(message, list):  # MessagePack
        kind = message[0]
        if kind == 7:
            return ("close", message[1], bool(message[2:3] and message[2])), None
        if kind == 1:
            assert message[2] is None, f"a server invocation must not expect a reply: {message}"
            target, arguments = message[3], message[4]
        elif kind == 3:
            # [3, headers, id, resultKind (1 error, 2 void, 3 result), result?]
            assert message[3] in (1, 2), f"Resume returns nothing: {message}"
            return ("done", message[2], message[4] if message[3] == 1 else None), None
        else:
            return ("other", message), None
    else:
        kind = message["type"]
        if kind == 7:
            return ("close", message.get("error"), message.get("allowReconnect", False)), None
        if kind == 1:
            assert "invocationId" not in message, message
            target, arguments = message["target"], message["arguments"]
        elif kind == 3:
            assert "result" not in message, f"Resume returns nothing: {message}"
            return ("done", message["invocationId"], message.get("error")), None
        else:
            return ("other", message), None
    if target == "ReceiveMessage":
        (text,) = arguments
        assert isinstance(text, str), message
        event: dict[str, Any] = json.loads(text)
        return ("event", event["seq"]), event
    if target == "Gap":
        (first,) = arguments
        assert type(first) is int, message
        return ("gap", first), None
    return ("other", message), None


class Subscriber:
    """A hub client that keeps every record it read, and the events among them."""

    def __init__(self, client: HubClient) -> None:
        self.client = client
        self.records: list[Record] = []
        self.events: list[dict[str, Any]] = []

    @property
    def seqs(self) -> list[int]:
        return [event["seq"] for event in self.events]

    @property
    def last_seq(self) -> int:
        return self.events[-1]["seq"] if self.events else 0

    async def next(self) -> Record:
        record, event = record_of(await self.client.next_message())
        self.records.append(record)
        if event is not None:
            self.events.append(event)
        return record

    async def take(self, count: int) -> list[Record]:
        return [await self.next() for _ in range(count)]

    async def until_seq(self, seq: int) -> list[Record]:
        """Read up to the event numbered ``seq`` (which must come; the end fails the test)."""
        start = len(self.records)
        while True:
            record = await self.next()
            assert record[0] not in ("close", "closed"), (
                f"closed before seq {seq}: {self.records[start:]}"
            )
            if record[0] == "event" and record[1] >= seq:
                return self.records[start:]

    async def until_closed(self) -> list[Record]:
        start = len(self.records)
        while (await self.next())[0] != "closed":
            pass
        return self.records[start:]

    async def until_ids(self, ids: Sequence[str]) -> None:
        """Read until every event of ``ids`` arrived."""
        wanted = set(ids)
        while not wanted <= {event["id"] for event in self.events}:
            record = await self.next()
            assert record[0] not in ("close", "closed"), f"closed: {self.records[-5:]}"

    async def resume(self, *arguments: Any, invocation_id: str | None = "r1") -> None:
        """Invoke ``Resume(*arguments)`` (without an invocation id when it is None)."""
        await send_invocation(self.client, "Resume", list(arguments), invocation_id)


async def send_invocation(
    client: HubClient, target: str, arguments: list[Any], invocation_id: str | None
) -> None:
    if client.is_binary:
        await client.ws.send_bytes(invocation_bytes(target, arguments, invocation_id))
    else:
        await client.ws.send_text(invocation_text(target, arguments, invocation_id))


def invocation_text(target: str, arguments: list[Any], invocation_id: str | None) -> str:
    message: dict[str, Any] = {"type": 1, "target": target, "arguments": arguments}
    if invocation_id is not None:
        message["invocationId"] = invocation_id
    return json.dumps(message) + RS


def invocation_bytes(target: str, arguments: list[Any], invocation_id: str | None) -> bytes:
    body = msgpack.packb([1, {}, invocation_id, target, arguments, []])
    return encode_varint(len(body)) + body


def target_of(
    site: str, *, hub: str = "entries", user: str | None = None, since: Any = None
) -> str:
    target = hub_target(hub, site, user)
    return target if since is None else f"{target}&since_seq={since}"


@asynccontextmanager
async def subscribe(
    h: Harness,
    site: str,
    *,
    hub: str = "entries",
    user: str | None = None,
    since: int | None = None,
    subject: str = "alice",
    protocol: str = "json",
) -> AsyncIterator[Subscriber]:
    """A subscriber (granted Site Admin, or Site User for a user stream) after its handshake."""
    h.grant(site, subject, Role.SITE_USER if user is not None else Role.SITE_ADMIN)
    target = target_of(site, hub=hub, user=user, since=since)
    async with open_hub(h, target, token=h.token(subject), protocol=protocol) as client:
        yield Subscriber(client)


def assert_exactly(seqs: Sequence[int], first: int, last: int) -> None:
    """``seqs`` is exactly first..last in order; otherwise say what is duplicated or missing."""
    if list(seqs) == list(range(first, last + 1)):
        return
    duplicated = sorted({seq for seq in seqs if seqs.count(seq) > 1})
    missing = sorted(set(range(first, last + 1)) - set(seqs))
    extra = sorted(set(seqs) - set(range(first, last + 1)))
    out_of_order = [(a, b) for a, b in itertools.pairwise(seqs) if b <= a][:10]
    raise AssertionError(
        f"expected seqs {first}..{last}: duplicated {duplicated}, missing {missing}, "
        f"unexpected {extra}, out of order {out_of_order}"
    )


def events_of(*seqs: int) -> list[Record]:
    return [("event", seq) for seq in seqs]


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    return shared_dev_key


@pytest.fixture(params=["memory", "redis"])
def backplane(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Config overrides for the backplane under test: in-process, or the session's Redis."""
    if request.param == "memory":
        return {}
    redis = request.getfixturevalue("redis_server")
    return {"backplane": redis.url}


# -- since_seq -----------------------------------------------------------------------


@pytest.mark.parametrize(("since", "replayed"), [(0, [1, 2, 3, 4, 5]), (2, [3, 4, 5]), (5, [])])
async def test_since_seq_replays_what_was_missed_then_goes_live(
    start_server: Any, backplane: dict[str, Any], since: int, replayed: list[int]
) -> None:
    h: Harness = await start_server(**backplane)
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        ids = await pub.some(site, 5)
        await pub.some(new_site(), 2)  # another site's seqs are its own
        async with subscribe(h, site, since=since) as sub:
            assert await sub.take(len(replayed)) == events_of(*replayed)
            live_ids = await pub.some(site, 2)
            assert await sub.take(2) == events_of(6, 7)
    assert [e["id"] for e in sub.events] == [*ids[since:], *live_ids]


async def test_since_seq_is_per_hub(start_server: Any, backplane: dict[str, Any]) -> None:
    h: Harness = await start_server(**backplane)
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        await pub.some(site, 3)
        await pub.entries([{"site_id": site, "n": n} for n in range(2)], hub="incidents")
        async with subscribe(h, site, hub="incidents", since=1) as sub:
            assert await sub.take(1) == events_of(2)
            await pub.some(site, 1)  # an entry: not for the incidents stream
            await pub.entries([{"site_id": site, "n": 2}], hub="incidents")
            assert await sub.take(1) == events_of(3)
    assert [e["n"] for e in sub.events] == [1, 2]


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "", "%201", "1e3", "9" * 19])
async def test_since_seq_must_be_a_non_negative_integer(start_server: Any, value: str) -> None:
    h: Harness = await start_server()
    h.grant("s1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(CAP):
        response = await upgrade_refused(
            h.port, f"{hub_target('entries', 's1')}&since_seq={value}", token=h.token()
        )
    assert response.status == 400
    assert response.text == "'since_seq' must be an integer from 0 to 9007199254740992\n"
    assert h.server.app.stats.opened == 0


# -- the Resume hub method ------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_resume_replays_then_completes_then_goes_live(
    start_server: Any, backplane: dict[str, Any], protocol: str
) -> None:
    h: Harness = await start_server(**backplane)
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        ids = await pub.some(site, 5)
        async with subscribe(h, site, protocol=protocol) as sub:
            await sub.resume(2, invocation_id="r1")
            # The void Completion comes after the replayed events.
            assert await sub.take(4) == [*events_of(3, 4, 5), ("done", "r1", None)]
            await pub.some(site, 1)
            assert await sub.take(1) == events_of(6)
    assert [e["id"] for e in sub.events[:3]] == ids[2:]


async def test_resume_without_invocation_id_gets_no_reply(
    start_server: Any, backplane: dict[str, Any]
) -> None:
    h: Harness = await start_server(**backplane)
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        await pub.some(site, 5)
        async with subscribe(h, site) as sub:
            await sub.resume(3, invocation_id=None)
            assert await sub.take(2) == events_of(4, 5)
            await pub.some(site, 1)
            # Nothing (no Completion) between the replay and the live event.
            assert await sub.take(1) == events_of(6)


@pytest.mark.parametrize(
    "arguments",
    [["3"], [-1], [], [1, 2], [None], [True], [1.5], [[3]], [{"seq": 3}]],
    ids=["string", "negative", "none", "two", "null", "bool", "float", "array", "object"],
)
async def test_resume_with_a_bad_argument_is_an_error(
    start_server: Any, arguments: list[Any]
) -> None:
    h: Harness = await start_server()
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        await pub.some(site, 3)
        async with subscribe(h, site) as sub:
            await sub.resume(*arguments, invocation_id="bad")
            assert await sub.take(1) == [("done", "bad", RESUME_ARGUMENT_ERROR)]
            # The same without an invocation id: no answer at all.
            await sub.resume(*arguments, invocation_id=None)
            # The connection is fine, and a good Resume still works.
            await sub.resume(1, invocation_id="good")
            assert await sub.take(3) == [*events_of(2, 3), ("done", "good", None)]
            await pub.some(site, 1)
            assert await sub.take(1) == events_of(4)


async def test_resume_is_matched_case_insensitively_like_a_hub_method(start_server: Any) -> None:
    h: Harness = await start_server()
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        await pub.some(site, 2)
        async with subscribe(h, site) as sub:
            await send_invocation(sub.client, "resume", [1], "r1")
            assert await sub.take(2) == [*events_of(2), ("done", "r1", None)]


async def test_a_second_resume_while_one_runs_is_refused(start_server: Any) -> None:
    h: Harness = await start_server()
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        await pub.some(site, 3)
        async with subscribe(h, site) as sub:
            # Both in one frame: the second arrives while the first fetches history.
            await sub.client.ws.send_text(
                invocation_text("Resume", [0], "r1") + invocation_text("Resume", [0], "r2")
            )
            assert await sub.take(5) == [
                ("done", "r2", "A resume is already in progress."),
                *events_of(1, 2, 3),
                ("done", "r1", None),
            ]
            await pub.some(site, 1)
            assert await sub.take(1) == events_of(4)  # replayed once only


async def test_resume_on_a_connection_opened_with_since_seq_is_refused_while_it_runs(
    start_server: Any,
) -> None:
    h: Harness = await start_server()
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        await pub.some(site, 3)
        h.grant(site, "alice", Role.SITE_ADMIN)
        async with open_hub(h, target_of(site, since=1), handshake=False) as client:
            # The handshake and the Resume in one frame: the since_seq resume is running.
            await client.ws.send_text(
                '{"protocol":"json","version":1}' + RS + invocation_text("Resume", [0], "r1")
            )
            assert await client.read_handshake_response() == {}
            sub = Subscriber(client)
            assert await sub.take(3) == [
                ("done", "r1", "A resume is already in progress."),
                *events_of(2, 3),
            ]


# -- Gap: history keeps the last history_size events -----------------------------------

# 12 events published with history_size=5: seqs 8..12 are kept.
GAP_CASES = {
    "older than history": (2, [("gap", 8), *events_of(8, 9, 10, 11, 12)]),
    "from the start": (0, [("gap", 8), *events_of(8, 9, 10, 11, 12)]),
    "just before history": (7, events_of(8, 9, 10, 11, 12)),
    "inside history": (10, events_of(11, 12)),
    "up to date": (12, []),
    "beyond the last seq": (50, [("gap", 8), *events_of(8, 9, 10, 11, 12)]),
}


@pytest.mark.parametrize("case", list(GAP_CASES))
@pytest.mark.parametrize("how", ["since_seq", "Resume"])
async def test_history_keeps_history_size_events_and_says_gap(
    start_server: Any, backplane: dict[str, Any], how: str, case: str
) -> None:
    h: Harness = await start_server(history_size=5, **backplane)
    site, pub = new_site(), Publisher(h)
    since, expected = GAP_CASES[case]
    with trio.fail_after(CAP):
        await pub.some(site, 7)
        await pub.some(site, 5)
        if how == "since_seq":
            async with subscribe(h, site, since=since) as sub:
                assert await sub.take(len(expected)) == expected
                await pub.some(site, 1)
                assert await sub.take(1) == events_of(13)
        else:
            async with subscribe(h, site) as sub:
                await sub.resume(since)
                assert await sub.take(len(expected) + 1) == [*expected, ("done", "r1", None)]
                await pub.some(site, 1)
                assert await sub.take(1) == events_of(13)


@pytest.mark.parametrize("how", ["since_seq", "Resume"])
async def test_since_beyond_the_last_seq_gets_a_gap_and_all_of_history(
    start_server: Any, backplane: dict[str, Any], how: str
) -> None:
    """The client saw seq 50 of a stream at 3: the history it knew was lost; all is new."""
    h: Harness = await start_server(**backplane)
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        await pub.some(site, 3)
        async with subscribe(h, site, since=50 if how == "since_seq" else None) as sub:
            expected = [("gap", 1), *events_of(1, 2, 3)]
            if how == "Resume":
                await sub.resume(50)
                expected.append(("done", "r1", None))
            assert await sub.take(len(expected)) == expected
            await pub.some(site, 1)
            assert await sub.take(1) == events_of(4)


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_gap_on_a_stream_that_never_had_events(
    start_server: Any, backplane: dict[str, Any], protocol: str
) -> None:
    """The client saw seq 3 of a stream that has none (its history was lost)."""
    h: Harness = await start_server(**backplane)
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        async with subscribe(h, site, since=3, protocol=protocol) as sub:
            assert await sub.take(1) == [("gap", 1)]
            await pub.some(site, 1)
            assert await sub.take(1) == events_of(1)


async def test_default_history_keeps_1000_events(
    start_server: Any, backplane: dict[str, Any]
) -> None:
    h: Harness = await start_server(**backplane)
    assert h.config.history_size == 1000
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        await pub.some(site, 1005)
        async with subscribe(h, site, since=0) as sub:
            assert await sub.take(1) == [("gap", 6)]
            await sub.until_seq(1005)
            await pub.some(site, 1)
            assert await sub.take(1) == events_of(1006)
    assert sub.seqs == list(range(6, 1007))


# -- site-user streams ------------------------------------------------------------------

USER_EVENTS = ["u1", "u2", None, "u1", "u2", "u1"]  # seqs 1..6: u1 has 1, 4, 6


@pytest.mark.parametrize("how", ["since_seq", "Resume"])
async def test_user_stream_replays_only_that_users_events(
    start_server: Any, backplane: dict[str, Any], how: str
) -> None:
    h: Harness = await start_server(**backplane)
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        await pub.entries([{"site_id": site, "user_id": u} for u in USER_EVENTS])
        since = 1 if how == "since_seq" else None
        async with subscribe(h, site, user="u1", subject="u1", since=since) as sub:
            if how == "since_seq":
                assert await sub.take(2) == events_of(4, 6)
            else:
                await sub.resume(1)
                assert await sub.take(3) == [*events_of(4, 6), ("done", "r1", None)]
            await pub.entries([{"site_id": site, "user_id": u} for u in ("u2", None, "u1")])
            assert await sub.take(1) == events_of(9)
    assert {e["user_id"] for e in sub.events} == {"u1"}


async def test_user_stream_gets_a_gap_when_the_site_history_was_trimmed(
    start_server: Any, backplane: dict[str, Any]
) -> None:
    h: Harness = await start_server(history_size=3, **backplane)
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        # u1's events 1 and 4 left history (seqs 5..7 are kept); 6 is still there.
        users = ["u1", "u2", "u2", "u1", "u2", "u1", None]
        await pub.entries([{"site_id": site, "user_id": u} for u in users])
        async with subscribe(h, site, user="u1", subject="u1", since=0) as sub:
            assert await sub.take(2) == [("gap", 5), *events_of(6)]
            await pub.entries([{"site_id": site, "user_id": "u1"}])
            assert await sub.take(1) == events_of(8)


# -- resuming while events are published ------------------------------------------------


class Stream:
    """Publishes ``total`` single events to one site, one request each, from ``tasks`` tasks."""

    def __init__(self, pub: Publisher, site: str, total: int, tasks: int = 1) -> None:
        self.pub = pub
        self.site = site
        self.total = total
        self.tasks = tasks
        self.published = 0
        self._claimed = 0
        self._waiters: dict[int, trio.Event] = {}

    async def run(self, upto: int | None = None) -> None:
        upto = self.total if upto is None else upto
        async with trio.open_nursery() as nursery:
            for _ in range(self.tasks):
                nursery.start_soon(self._publish_until, upto)

    async def _publish_until(self, upto: int) -> None:
        while self._claimed < upto:
            self._claimed += 1
            await self.pub.some(self.site, 1, n=self._claimed)
            self.published += 1
            for count in [count for count in self._waiters if count <= self.published]:
                self._waiters.pop(count).set()

    async def reached(self, count: int) -> None:
        if self.published < count:
            await self._waiters.setdefault(count, trio.Event()).wait()


@pytest.mark.parametrize("how", ["since_seq", "Resume"])
async def test_resume_during_a_publish_stream_has_no_duplicate_and_no_hole(
    start_server: Any, backplane: dict[str, Any], how: str
) -> None:
    """Clients join at several points of a running stream; each sees since+1..end exactly."""
    h: Harness = await start_server(**backplane)
    site = new_site()
    stream = Stream(Publisher(h), site, total=160)
    h.grant(site, "alice", Role.SITE_ADMIN)
    seen: dict[int, list[Record]] = {}

    async def client(at: int, behind: int) -> None:
        await stream.reached(at)
        since = stream.published - behind
        url_since = since if how == "since_seq" else None
        async with subscribe(h, site, since=url_since) as sub:
            if how == "Resume":
                await sub.resume(since)
            records = await sub.until_seq(stream.total)
        expected_done = [("done", "r1", None)] if how == "Resume" else []
        assert sorted(r for r in records if r[0] != "event") == expected_done, records
        assert_exactly(sub.seqs, since + 1, stream.total)
        seen[at] = records

    with trio.fail_after(CAP * 2):
        await stream.run(upto=20)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.run)
            for at, behind in [(20, 20), (40, 5), (60, 0), (80, 30), (100, 1), (120, 12)]:
                nursery.start_soon(client, at, behind)
    assert len(seen) == 6


async def test_many_resumes_during_a_publish_stream(
    start_server: Any, backplane: dict[str, Any]
) -> None:
    """Sixty clients resume while four tasks publish, half by since_seq, half by Resume.

    With Redis the history reply can overtake the Pub/Sub message of an event; this
    is the test that caught the replayed event then coming again live.
    """
    h: Harness = await start_server(**backplane)
    site = new_site()
    stream = Stream(Publisher(h), site, total=300, tasks=4)
    h.grant(site, "alice", Role.SITE_ADMIN)
    done = 0

    async def client(index: int) -> None:
        nonlocal done
        await stream.reached(4 * index + 1)
        since = max(0, stream.published - index % 7)
        by_url = index % 2 == 0
        async with subscribe(h, site, since=since if by_url else None) as sub:
            if not by_url:
                await sub.resume(since, invocation_id=f"r{index}")
            await sub.until_seq(stream.total)
        assert_exactly(sub.seqs, since + 1, stream.total)
        done += 1

    with trio.fail_after(CAP * 2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.run)
            for index in range(60):
                nursery.start_soon(client, index)
    assert done == 60


async def test_late_resume_after_live_events_still_has_no_duplicate_and_no_hole(
    start_server: Any, backplane: dict[str, Any]
) -> None:
    """Without a hold window live events may come first; the replay fills in behind them."""
    h: Harness = await start_server(resume_window=0, **backplane)
    site = new_site()
    stream = Stream(Publisher(h), site, total=120)
    h.grant(site, "alice", Role.SITE_ADMIN)
    with trio.fail_after(CAP * 2):
        await stream.run(upto=30)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.run)
            await stream.reached(50)
            async with subscribe(h, site) as sub:
                await sub.until_seq(stream.published + 3)  # live events flow
                await sub.resume(10)
                records = await sub.until_seq(stream.total)
    assert records.count(("done", "r1", None)) == 1
    seqs = sub.seqs
    first_live = seqs[0]
    assert first_live > 50
    # Live from first_live on, then the replay of 11..first_live-1 (what came before the
    # first live event, and only that), then live again: each seq exactly once.
    replay_at = seqs.index(11)
    live_before = seqs[:replay_at]
    assert live_before == list(range(first_live, first_live + len(live_before)))
    replayed = seqs[replay_at : replay_at + first_live - 11]
    assert replayed == list(range(11, first_live))
    assert seqs[replay_at + len(replayed) :] == list(
        range(first_live + len(live_before), stream.total + 1)
    )


# -- the hold window ---------------------------------------------------------------------


async def test_without_resume_live_events_wait_at_most_the_window(start_server: Any) -> None:
    h: Harness = await start_server(resume_window=1.0)
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        async with subscribe(h, site) as sub:
            connected = trio.current_time()
            await pub.some(site, 3)
            assert await sub.take(3) == events_of(1, 2, 3)
            waited = trio.current_time() - connected
            assert 0.9 <= waited <= 2.0, waited
            # After the window nothing waits.
            published = trio.current_time()
            await pub.some(site, 1)
            assert await sub.take(1) == events_of(4)
            assert trio.current_time() - published < 0.5


async def test_resume_window_zero_holds_nothing(start_server: Any) -> None:
    h: Harness = await start_server(resume_window=0)
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        async with subscribe(h, site) as sub:
            connected = trio.current_time()
            await pub.some(site, 1)
            assert await sub.take(1) == events_of(1)
            assert trio.current_time() - connected < 0.3


async def test_since_seq_never_waits_for_the_window(start_server: Any) -> None:
    h: Harness = await start_server(resume_window=5.0)
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        await pub.some(site, 2)
        async with subscribe(h, site, since=1) as sub:
            connected = trio.current_time()
            assert await sub.take(1) == events_of(2)
            await pub.some(site, 1)
            assert await sub.take(1) == events_of(3)
            assert trio.current_time() - connected < 1.0


async def test_resume_within_the_window_releases_held_events_after_the_replay(
    start_server: Any, backplane: dict[str, Any]
) -> None:
    h: Harness = await start_server(resume_window=5.0, **backplane)
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        await pub.some(site, 3)
        async with subscribe(h, site) as sub:
            await pub.some(site, 2)  # live, held until the Resume
            with trio.move_on_after(0.2):
                await sub.next()
            assert sub.records == []
            started = trio.current_time()
            await sub.resume(1)
            # 4 and 5 are in history too: replayed once, and their held copies dropped.
            assert await sub.take(5) == [*events_of(2, 3, 4, 5), ("done", "r1", None)]
            assert trio.current_time() - started < 1.0  # released by the Resume, not the window
            await pub.some(site, 1)
            assert await sub.take(1) == events_of(6)


async def test_resume_after_the_window_replays_only_what_came_before_live(
    start_server: Any,
) -> None:
    h: Harness = await start_server(resume_window=0.3)
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        await pub.some(site, 3)
        async with subscribe(h, site) as sub:
            await pub.some(site, 1)
            assert await sub.take(1) == events_of(4)  # after the window, without Resume
            await sub.resume(1)
            # 2 and 3 were missed; 4 came live already and is not sent again.
            assert await sub.take(3) == [*events_of(2, 3), ("done", "r1", None)]
            await pub.some(site, 1)
            assert await sub.take(1) == events_of(5)


async def test_history_bytes_bound_trims_the_least_recent_site_and_says_gap(
    start_server: Any,
) -> None:
    """A publisher of big events cannot hold memory past --max-history-bytes.

    Site A's history is trimmed (oldest first) to make room for site B's: a client
    resuming A from the start is told of the gap, and B's subscriber, the
    bystander, replays all of B.
    """
    h: Harness = await start_server(max_history_bytes=12 * 2700)
    site_a, site_b, pub = new_site(), new_site(), Publisher(h)
    with trio.fail_after(CAP):
        await pub.some(site_a, 10, note="x" * 2000)
        await pub.some(site_b, 10, note="x" * 2000)
        async with subscribe(h, site_b, since=0) as bystander:
            assert await bystander.take(10) == events_of(*range(1, 11))
        async with subscribe(h, site_a, since=0) as sub:
            [(kind, first)] = await sub.take(1)
            assert kind == "gap" and 1 < first <= 10
            assert await sub.take(11 - first) == events_of(*range(first, 11))
            await pub.some(site_a, 1)
            assert await sub.take(1) == events_of(11)


async def test_resume_called_in_a_loop_is_refused_past_its_rate(start_server: Any) -> None:
    """Each Resume replays up to history_size events for a few bytes: a loop is refused.

    The connection stays open and live (only the call is refused), and a
    bystander on the same site is not touched.
    """
    h: Harness = await start_server()
    site, pub = new_site(), Publisher(h)
    with trio.fail_after(CAP):
        await pub.some(site, 2)
        async with subscribe(h, site) as sub, subscribe(h, site, since=2) as bystander:
            for n in range(5):
                await sub.resume(0, invocation_id=f"r{n}")
                assert await sub.take(3) == [*events_of(1, 2), ("done", f"r{n}", None)]
            await sub.resume(0, invocation_id="r5")
            [(kind, call, error)] = await sub.take(1)
            assert (kind, call) == ("done", "r5") and "too often" in error
            await pub.some(site, 1)
            assert await sub.take(1) == events_of(3)
            assert await bystander.take(1) == events_of(3)
