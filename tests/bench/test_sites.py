"""The ``fanout`` profile's many-sites shape (issue #10): exact counts per site, at tiny sizes.

The counting is the load client's own (``bench.server.wire`` in real load-client
processes on real sockets); what it counts is crafted by publishing to the
ceiling peer, which delivers whatever it is given: a repeated event, a missing
one, and one whose id says another site. Timings are never asserted.
"""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.report import Progress
from bench.server.fanout import SITES_BAR, FanoutRun, RowResult, judge
from bench.server.harness import open_stage
from bench.server.publisher import EventFactory, Publisher, plan_requests
from bench.server.servers import PUBLISH_PATH, SERVERS
from bench.server.wire import OP_TEXT, Dialect, Receiver, Tally

SITES = 3
SUBSCRIBERS_PER_SITE = 2
EVENTS_PER_SITE = 4


def _server_frame(payload: bytes) -> bytes:
    size = len(payload)
    head = bytes((0x80 | OP_TEXT, size)) if size < 126 else bytes((0x81, 126)) + size.to_bytes(2)
    return head + payload


def _record(site: int, n: int, sites: int = SITES) -> bytes:
    """The SignalR record a server writes for the bench's event ``n`` of ``site``."""
    text = EventFactory(sites).event(site, n, 1_000).decode()
    argument = json.dumps(text, ensure_ascii=False).encode()
    return b'{"type":1,"target":"ReceiveMessage","arguments":[' + argument + b"]}\x1e"


# -- the counting code on crafted streams ------------------------------------------------


def test_another_sites_event_is_misrouted_not_a_duplicate_nor_a_delivery_of_ours() -> None:
    receiver = Receiver(Dialect.SIGNALR)
    tally = Tally(expected=3, site=1)
    # Site 1's 1 and 3, site 0's 2 (same n as our missing one) and site 2's 1 (same n as ours).
    stream = _server_frame(_record(1, 1) + _record(0, 2)) + _server_frame(_record(2, 1))
    stream += _server_frame(_record(1, 3))
    for start in range(0, len(stream), 50):  # pieces: frames and records cut anywhere
        receiver.feed(tally, stream[start : start + 50], now_ns=5_000)
    assert (tally.received, tally.misrouted, tally.lost, tally.duplicated) == (4, 2, 1, 0)
    assert tally.foreign == 0

    # A tally that does not know its site counts every event as its own (chaos, older tools).
    blind = Tally(expected=3)
    Receiver(Dialect.SIGNALR).feed(blind, stream, now_ns=5_000)
    assert (blind.received, blind.misrouted, blind.lost, blind.duplicated) == (4, 0, 0, 1)


def test_site_numbers_wider_than_five_digits_are_told_apart() -> None:
    # site-00001 and site-100001 share a suffix; the id's "-" after the digits separates them.
    sites = 100_002
    stream = _server_frame(_record(1, 1, sites) + _record(100_001, 2, sites))
    tally = Tally(expected=2, site=1)
    Receiver(Dialect.SIGNALR).feed(tally, stream, now_ns=0)
    assert (tally.received, tally.misrouted, tally.lost) == (2, 1, 1)


def test_random_spread_is_seeded_and_keeps_each_sites_order() -> None:
    first = plan_requests(5, 3, 6, 4, spread="random", seed=7)
    assert first == plan_requests(5, 3, 6, 4, spread="random", seed=7)
    assert first != plan_requests(5, 3, 6, 4, spread="random", seed=8)
    events = [event for request in first for event in request]
    round_robin = [event for request in plan_requests(5, 3, 6, 4) for event in request]
    assert events != round_robin and sorted(events) == sorted(round_robin)
    for site in range(5):
        assert [n for s, n in events if s == site] == list(range(3, 9))
    with pytest.raises(ValueError, match="unknown spread"):
        plan_requests(5, 1, 1, 1, spread="sorted")


def test_rows_are_sized_by_connections_or_by_subscribers_per_site() -> None:
    assert FanoutRun(connections=(1000,), sites=(1, 50)).shapes() == [(1000, 1), (1000, 50)]
    run = FanoutRun(sites=(500, 1), subscribers_per_site=2, servers=("hubserver",))
    assert run.shapes() == [(1000, 500), (2, 1)]
    assert run.parameters["connections"] == [1000, 2]
    with pytest.raises(ValueError, match="subscribers-per-site"):
        FanoutRun(subscribers_per_site=0)


def test_the_sites_bar_judges_the_many_sites_rows_only() -> None:
    def row(server: str, rate: float, connections: int = 1000, sites: int = 500) -> RowResult:
        result = RowResult(server, connections, sites, "burst", 1, 10)
        result.connected, result.deliveries, result.seconds = connections, int(rate), 1.0
        result.events, result.cpu_server, result.latencies_ms = int(rate) // 2, 1.0, [1.0]
        return result

    rows = [
        row("hubserver", 30_000),
        row("hubserver-pubhub", 70_000),
        row("aiosignalr", 30_000),
        row("ceiling", 80_000),
    ]
    rows[1].misrouted = 1
    checks, passed = judge(rows)
    verdicts = {check[0]: (check[2], check[4]) for check in checks if check[1].startswith("1000")}
    assert verdicts["deliveries/s hubserver / aiosignalr"] == ("1.00x", "PASS")
    assert verdicts["deliveries/s hubserver-pubhub / ceiling"] == ("0.88x", "PASS")
    assert verdicts["deliveries/s hubserver-pubhub / aiosignalr"] == ("2.33x", "PASS")
    # A misrouted delivery is a counting failure like a lost one.
    assert verdicts["hubserver-pubhub lost + duplicated"] == ("1", "FAIL")
    assert passed is False
    # The one-site bar (>= 0.9x ceiling) does not apply to 2 subscribers per site.
    assert "deliveries/s hubserver / ceiling" not in verdicts

    one_site = [row("hubserver", 90_000, sites=1), row("ceiling", 100_000, sites=1)]
    checks, _passed = judge(one_site)
    assert {check[0] for check in checks if check[4] != "info"} == {
        "deliveries/s hubserver / ceiling",
        "p99 latency hubserver / ceiling",
        "hubserver lost + duplicated",
    }


# -- the real load client, fed crafted deliveries by the ceiling peer ----------------------


def test_the_load_client_counts_per_site_a_lost_a_duplicated_and_a_misrouted_event() -> None:
    factory = EventFactory(SITES)
    requests: list[list[tuple[int, int]]] = []
    requests += [[(0, n)] for n in (1, 2, 3, 4)]  # site 0: exact
    requests += [[(1, n)] for n in (1, 2, 2, 4)]  # site 1: 3 lost, 2 twice
    requests += [[(2, n)] for n in (1, 2, 3, 4)]  # site 2: exact, then one of site 0's
    connections = SITES * SUBSCRIBERS_PER_SITE
    with open_stage(
        SERVERS["ceiling"],
        sites=SITES,
        connections=connections,
        client_procs=2,
        expected=EVENTS_PER_SITE,
        label="sites",
        progress=Progress(None),
    ) as stage:
        connected = stage.connect(
            connections, rate=0, concurrency=connections, timeout=30.0, progress=Progress(None)
        )
        assert connected.ok == connections
        publisher = Publisher("127.0.0.1", stage.server.port, PUBLISH_PATH, None, connections=1)
        try:
            published = publisher.run(requests, factory)
        finally:
            publisher.close()
        assert published.ok == len(requests)
        # Site 0's event 3 as the ceiling routes it (by site_id) to site 2's subscribers.
        body = factory.event(0, 3, time.time_ns()).replace(b'"site-00000"', b'"site-00002"')
        assert b'"id":"site-00000-3"' in body and b'"site_id":"site-00002"' in body
        poster = http.client.HTTPConnection("127.0.0.1", stage.server.port, timeout=10)
        try:
            poster.request("POST", PUBLISH_PATH, body, {"content-type": "application/json"})
            assert poster.getresponse().status == 202
        finally:
            poster.close()
        delivered = (len(requests) + 1) * SUBSCRIBERS_PER_SITE
        stage.wait_received(
            delivered,
            key="received",
            quiet_timeout=5.0,
            deadline=time.monotonic() + 30,
            progress=Progress(None),
            what="deliveries",
        )
        counts = stage.report()

    assert counts.received == delivered
    # Per subscriber: site 1 loses 3 and gets 2 twice; site 2 gets one event of site 0.
    assert (counts.lost, counts.duplicated, counts.misrouted, counts.foreign) == (2, 2, 2, 0)
    assert counts.problem_sites == {1: (2, 2, 0, 0), 2: (0, 0, 2, 0)}


def test_a_tiny_sites_run_with_every_peer_routes_by_site_and_reports_per_event_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    json_path = tmp_path / "sites.json"
    argv = [
        "fanout",
        "--servers",
        "hubserver,aiosignalr,socketio,ceiling",
        "--sites",
        str(SITES),
        "--subscribers-per-site",
        str(SUBSCRIBERS_PER_SITE),
        "--mode",
        "burst",
        "--publish-connections",
        "1",
        "--spread",
        "random",
        "--events-per-site",
        "10",
        "--warmup-events",
        "1",
        "--quiet-timeout",
        "5",
        "--row-timeout",
        "30",
        "--quiet",
        "--json",
        str(json_path),
    ]

    assert main(argv) == 0

    out = capsys.readouterr().out
    assert SITES_BAR in out and "events/s" in out and "µs/event" in out and "µs/deliv" in out
    assert "seeded random order over the sites (seed 1" in out
    document = json.loads(json_path.read_text(encoding="utf-8"))
    assert document["parameters"]["subscribers per site"] == SUBSCRIBERS_PER_SITE
    results = document["results"]
    assert [r["server"] for r in results] == ["hubserver", "aiosignalr", "socketio", "ceiling"]
    for result in results:
        # Every peer routes by site: each subscriber has exactly its own site's events.
        assert result["connected"] == SITES * SUBSCRIBERS_PER_SITE
        assert result["deliveries"] == 10 * SITES * SUBSCRIBERS_PER_SITE
        assert (result["lost"], result["duplicated"], result["misrouted"]) == (0, 0, 0)
        assert result["problem_sites"] == {} and result["problem_site_count"] == 0
        assert result["requests"] == result["events"] == 10 * SITES  # one event per publish
        assert result["publish_connections"] == 1 and result["publish"] == "http"
        assert result["events_per_second"] == pytest.approx(result["deliveries_per_second"] / 2)
        assert result["server_cpu_us_per_event"] == pytest.approx(
            2 * result["server_cpu_us_per_delivery"]
        )
