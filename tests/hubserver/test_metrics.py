"""``GET /metrics``: scraped during real runs and parsed with prometheus-client's own parser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from hubserver.metrics import SYNC_INTERVAL
from hubserver.permissions import Role

from .conftest import Harness
from .helpers import (
    bearer,
    bystander,
    http_request,
    hub_target,
    open_hub,
    publish_ok,
    upgrade_refused,
)
from .test_workers import CAP, _ready, run_workers

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
