"""``GET /metrics``: scraped during real runs and parsed with prometheus-client's own parser."""

from __future__ import annotations

import re
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from hubserver.http._accept import METRICS_MAX_CONNECTIONS
from hubserver.metrics import SYNC_INTERVAL
from hubserver.permissions import Role

from .conftest import Harness
from .helpers import (
    ResponseReader,
    bearer,
    build_request,
    bystander,
    exchange,
    http_request,
    hub_target,
    open_hub,
    open_tcp,
    publish_ok,
    upgrade_refused,
)
from .test_publisher_hub import open_publisher
from .test_workers import CAP, Workers, _ready, run_workers

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(port: int) -> Samples:
    response = await http_request(port, "GET", "/metrics")
    assert response.status == 200, response
    assert response.headers.get("content-type", "").startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_the_counters_move_as_the_server_works(start_server: Any) -> None:
    h: Harness = await start_server(resume_window=0)
    h.grant("m1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(20):
        before = await scrape(h.port)
        assert value(before, "hubserver_deliveries_total") == 0
        assert value(before, "hubserver_backplane_up") == 1
        assert value(before, "process_resident_memory_bytes") > 0  # the default collector
        async with bystander(h) as b, open_hub(h, hub_target("entries", "m1")) as client:
            await upgrade_refused(h.port, hub_target("entries", "m1"), token=h.token("mallory"))
            for _ in range(3):
                await publish_ok(h, "entries", {"site_id": "m1"})
            for _ in range(3):
                await client.next_event()
            during = await scrape(h.port)
            open_ = "hubserver_connections_open"
            assert value(during, open_, hub="entries", protocol="json", transport="WebSockets") == 2
            assert value(during, "hubserver_connections_opened_total", hub="entries") == 2
            assert (
                value(
                    during, "hubserver_connections_refused_total", hub="entries", reason="forbidden"
                )
                == 1
            )
            assert value(during, "hubserver_events_published_total", hub="entries", api="http") == 3
            assert value(during, "hubserver_deliveries_total") == 3
            assert value(during, "hubserver_publish_latency_seconds_count", api="http") == 3
            assert value(during, "hubserver_delivery_lag_seconds_count") >= 1
            await b.check()
        bad = await http_request(
            h.port,
            "POST",
            "/v1/events/entries",
            headers=[bearer(h.publisher_token())],
            body=b'[{"site_id":"m1"},{"nope":1}]',
        )
        assert bad.status == 400
        with trio.fail_after(5):
            while h.server.app.stats.open:  # noqa: ASYNC110 (the clients' ends reach the server)
                await trio.sleep(0.02)
        after = await scrape(h.port)
        assert value(after, "hubserver_connections_closed_total", reason="client") == 2
        # A body refused before its events could be counted (invalid) counts once.
        assert value(after, "hubserver_events_rejected_total", hub="entries", api="http") == 1
        assert value(after, open_, hub="entries", protocol="json", transport="WebSockets") == 0
        # Counters only grow: what the first scrape counted stays.
        assert value(after, "hubserver_deliveries_total") >= 3
        assert value(after, "hubserver_event_loop_lag_seconds_count") >= 0


async def test_one_scrape_sums_every_worker(tmp_path: Path, nursery: trio.Nursery) -> None:
    """--workers 2: publishes land on both workers (each on a new TCP connection, which
    the kernel gives to either: all 20 on one has odds of 2 in a million); whichever
    worker a scrape reaches answers for the node, within a sync interval."""
    with trio.fail_after(CAP):
        async with run_workers(tmp_path, nursery) as w:
            await _ready(w)
            for _ in range(20):
                await publish_ok(w, "entries", {"site_id": "s1"})  # type: ignore[arg-type]
            totals = []
            with trio.fail_after(5 * SYNC_INTERVAL):
                while len(totals) < 4 or set(totals[-4:]) != {20.0}:
                    samples = await scrape(w.port)
                    name = "hubserver_events_published_total"
                    totals.append(value(samples, name, hub="entries", api="http"))
                    await trio.sleep(0.05)
            assert max(totals) == 20.0  # never more than what was published
            live = await scrape(w.port)
            assert value(live, "hubserver_process_resident_memory_bytes") > 0


# -- --metrics-port: a listener of its own ----------------------------------------------


async def scrape_until(port: int, name: str, expected: float, **labels: str) -> Samples:
    """Scrape until ``name`` reaches ``expected`` (a publish is counted when answered)."""
    with trio.fail_after(5):
        while True:
            samples = await scrape(port)
            if value(samples, name, **labels) >= expected:
                return samples
            await trio.sleep(0.02)


async def test_a_metrics_port_serves_the_metrics_and_the_probes_and_nothing_else(
    start_server: Any,
) -> None:
    """Scraped on its own port while a publisher (on the publisher hub) and HTTP publishes
    run; the main port then answers /metrics 404, and the metrics port nothing of the
    service: not the publish API, not a hub (even with a good token), not a CORS preflight."""
    page = "http://page.example"
    h: Harness = await start_server(resume_window=0, metrics_port=0, cors_origins=(page,))
    metrics_port = h.server.metrics_port
    assert metrics_port is not None and metrics_port != h.port
    h.grant("m1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(20):
        async with (
            bystander(h) as b,
            open_hub(h, hub_target("entries", "m1")) as client,
            open_publisher(h) as publisher,
        ):
            published = trio.Event()

            async def publish_over_the_hub() -> None:
                for n in range(10):
                    answer = await publisher.call("Publish", "entries", {"site_id": "m1", "n": n})
                    assert answer["result"]["accepted"] == 1, answer
                published.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish_over_the_hub)
                seen = []
                while not published.is_set():  # scrapes interleaved with the publishes
                    samples = await scrape(metrics_port)
                    seen.append(
                        value(samples, "hubserver_events_published_total", hub="entries", api="hub")
                    )
                assert seen == sorted(seen), "a counter went down"
            for _ in range(2):
                await publish_ok(h, "entries", {"site_id": "m1"})
            events = [await client.next_event() for _ in range(12)]
            assert [e["seq"] for e in events] == list(range(1, 13))
            during = await scrape_until(
                metrics_port, "hubserver_events_published_total", 2, hub="entries", api="http"
            )
            assert value(during, "hubserver_events_published_total", hub="entries", api="hub") == 10
            assert value(during, "hubserver_publish_latency_seconds_count", api="hub") == 10
            assert value(during, "hubserver_publish_latency_seconds_count", api="http") == 2
            assert value(during, "hubserver_deliveries_total") == 12
            open_ = "hubserver_connections_open"
            assert value(during, open_, hub="entries", protocol="json", transport="WebSockets") == 2
            assert value(during, open_, hub="publish", protocol="json", transport="WebSockets") == 1

            assert (await http_request(h.port, "GET", "/metrics")).status == 404
            assert (await http_request(metrics_port, "GET", "/healthz")).text == "ok\n"
            assert (await http_request(metrics_port, "GET", "/readyz")).text == "ready\n"
            async with await open_tcp(metrics_port) as stream:
                await stream.send_all(build_request("HEAD", "/metrics"))
                status, headers = await ResponseReader(stream).read_head()
                assert status == 200 and int(headers["content-length"]) > 0
            assert (await http_request(metrics_port, "POST", "/metrics")).status == 405
            refused = await http_request(
                metrics_port,
                "POST",
                "/v1/events/entries",
                headers=[bearer(h.publisher_token()), ("Content-Type", "application/json")],
                body=b'{"site_id":"m1"}',
            )
            assert refused.status == 404
            upgrade = await upgrade_refused(
                metrics_port, hub_target("entries", "m1"), token=h.token("alice")
            )
            assert upgrade.status == 404
            preflight = await http_request(
                metrics_port,
                "OPTIONS",
                "/v1/events/entries",
                headers=[("Origin", page), ("Access-Control-Request-Method", "POST")],
            )
            assert preflight.status == 404
            assert "access-control-allow-origin" not in preflight.headers
            for path in ("/", "/v1/hub/entries/negotiate", "/v1/permissions/changed", "/metricsx"):
                assert (await http_request(metrics_port, "GET", path)).status == 404, path
            after = await scrape(metrics_port)
            # Nothing the metrics port refused was published or counted as a hub refusal.
            assert value(after, "hubserver_events_published_total", hub="entries", api="http") == 2
            assert value(after, "hubserver_deliveries_total") == 12
            refused_total = "hubserver_connections_refused_total"
            refusals = [key for key, n in after.items() if key[0] == refused_total and n]
            assert refusals == [], refusals
            await b.check()


async def test_the_metrics_port_has_the_fronts_limits(start_server: Any) -> None:
    """The main port's h11 front: a head too large gets 431, a request that does not
    arrive in time is cut at the request deadline, and connections are capped (503
    above ``METRICS_MAX_CONNECTIONS``), apart from the main port's, which keeps serving."""
    h: Harness = await start_server(metrics_port=0, request_timeout=0.5)
    metrics_port = h.server.metrics_port
    assert metrics_port is not None
    with trio.fail_after(10):
        big = build_request("GET", "/metrics", headers=[("X-Big", "a" * 20_000)])
        assert (await exchange(metrics_port, big)).status == 431
        async with AsyncExitStack() as stack:
            idle = []
            for _ in range(METRICS_MAX_CONNECTIONS):
                stream = await open_tcp(metrics_port)
                await stack.enter_async_context(stream)
                idle.append(stream)
            await idle[-1].send_all(b"GET /metr")  # half a head
            over = await http_request(metrics_port, "GET", "/metrics")
            assert over.status == 503 and over.json()["code"] == "unavailable", over
            # The main port is not counted against the metrics listener's cap.
            assert (await http_request(h.port, "GET", "/healthz")).status == 200
            for stream in idle:  # each cut at its request deadline, unanswered
                assert await stream.receive_some(1024) == b""
        await scrape(metrics_port)


# -- --metrics off -----------------------------------------------------------------------


def task_names() -> set[str]:
    names = set()
    tasks = [trio.lowlevel.current_root_task()]
    while tasks:
        task = tasks.pop()
        names.add(task.name)
        for nursery in task.child_nurseries:
            tasks.extend(nursery.child_tasks)
    return names


@pytest.mark.parametrize("metrics", ["on", "off"])
async def test_metrics_off_serves_no_metrics_and_observes_nothing(
    start_server: Any, metrics: str
) -> None:
    """Off: /metrics is 404, no lag probe runs, the publish and delivery paths have no
    observer; publishing (HTTP and the publisher hub) and delivery work as before, and
    the plain counters the server keeps for itself still count. On: all of it is there
    (so each assertion below can fail)."""
    h: Harness = await start_server(resume_window=0, metrics=metrics)
    is_on = metrics == "on"
    app = h.server.app
    assert (app.metrics is not None) is is_on
    assert (app.broker.lag_observer is not None) is is_on
    assert (app.session_context().publish_latency is not None) is is_on
    assert any(name.endswith("._watch_loop_lag") for name in task_names()) is is_on
    h.grant("m1", "alice", Role.SITE_ADMIN)
    with trio.fail_after(10):
        async with open_hub(h, hub_target("entries", "m1")) as client, open_publisher(h) as pub:
            await publish_ok(h, "entries", {"site_id": "m1"})
            answer = await pub.call("Publish", "entries", {"site_id": "m1"})
            assert answer["result"]["seqs"] == [2], answer
            assert [(await client.next_event())["seq"] for _ in range(2)] == [1, 2]
            assert app.broker.deliveries == 2
            assert app.stats.published[("entries", "http")] == 1
        response = await http_request(h.port, "GET", "/metrics")
        assert response.status == (200 if is_on else 404)


async def logged_port(w: Workers, pattern: str) -> int:
    """The port in the parent's first log line that matches ``pattern``."""
    while True:
        for line in w.log:
            if found := re.search(pattern, line):
                return int(found.group(1))
        await w.lot.park()


async def test_workers_answer_on_the_metrics_port_for_the_whole_node(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """``metrics_port = 0`` in the config file, ``--workers 2``: the parent reserves a
    port (SO_REUSEPORT, as the main one) and hands it to both workers; every scrape
    there, on a new connection each (either worker), answers for the node; the main
    port answers /metrics 404 on either worker."""
    config = tmp_path / "hubserver.toml"
    config.write_text("metrics_port = 0\n")
    with trio.fail_after(CAP):
        async with run_workers(tmp_path, nursery, "--config", str(config)) as w:
            metrics_port = await logged_port(w, r"metrics of the 2 workers on http://.*:(\d+)/")
            await _ready(w)
            for _ in range(20):
                await publish_ok(w, "entries", {"site_id": "s1"})  # type: ignore[arg-type]
            totals = []
            with trio.fail_after(5 * SYNC_INTERVAL):
                while len(totals) < 8 or set(totals[-8:]) != {20.0}:
                    samples = await scrape(metrics_port)
                    name = "hubserver_events_published_total"
                    totals.append(value(samples, name, hub="entries", api="http"))
                    await trio.sleep(0.05)
            assert max(totals) == 20.0
            for _ in range(4):
                assert (await http_request(w.port, "GET", "/metrics")).status == 404
