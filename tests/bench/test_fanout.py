"""The ``fanout`` profile at a tiny size, and its counting logic on synthetic streams.

Timings are never asserted: how fast this machine is says nothing about the code.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.server.fanout import BAR, SCALE_OUT_BAR, RowResult, judge
from bench.server.procs import listening_sockets
from bench.server.publisher import EventFactory, plan_requests
from bench.server.servers import redis_server_binary
from bench.server.wire import (
    OP_PING,
    OP_TEXT,
    Dialect,
    Receiver,
    Tally,
    feed_opening,
)

CONNECTIONS = 20
SITES = 2
EVENTS_PER_SITE = 15  # 30 events in all
ROW_KEYS = {
    "server",
    "connections",
    "connected",
    "connect_errors",
    "sites",
    "mode",
    "batch",
    "events_per_site",
    "subscribers_per_site",
    "spread",
    "publish",
    "publish_connections",
    "requests",
    "events",
    "publish_failed",
    "publish_errors",
    "http_statuses",
    "expected_deliveries",
    "deliveries",
    "lost",
    "duplicated",
    "foreign",
    "misrouted",
    "problem_site_count",
    "problem_sites",
    "frames",
    "reads",
    "deliveries_per_frame",
    "deliveries_per_read",
    "closed_by_server",
    "close_reasons",
    "seconds",
    "publish_seconds",
    "events_per_second",
    "deliveries_per_second",
    "deliveries_per_second_per_node",
    "deliveries_per_server_cpu_second",
    "latency_ms",
    "layout",
    "nodes",
    "server_cpu_seconds",
    "server_cpu_percent",
    "server_cpu_us_per_event",
    "server_cpu_us_per_delivery",
    "server_cpu_seconds_by_process",
    "server_connections_by_process",
    "backplane_cpu_seconds",
    "backplane_cpu_percent",
    "client_cpu_seconds",
    "client_cpu_percent",
    "publisher_cpu_seconds",
    "publisher_cpu_percent",
    "others_cpu_seconds",
    "others_cpu_percent",
    "measured_wall_seconds",
    "server_rss_bytes",
    "server_rss_per_connection_bytes",
    "server_exit",
    "py_spy_profile",
}


# -- synthetic streams -------------------------------------------------------------


def _server_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 1 << 16:
        return bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big") + payload


def _record(n: int, t: int = 1_000) -> bytes:
    """The SignalR record hubserver writes for the bench's event ``n``."""
    text = EventFactory(1).event(0, n, t).decode()
    argument = json.dumps(text, ensure_ascii=False).encode()
    return b'{"type":1,"target":"ReceiveMessage","arguments":[' + argument + b"]}\x1e"


def _feed_in_pieces(receiver: Receiver, tally: Tally, stream: bytes, piece: int) -> bytes:
    replies = b""
    for start in range(0, len(stream), piece):
        replies += receiver.feed(tally, stream[start : start + piece], now_ns=5_000)
    return replies


def test_a_missing_and_a_repeated_sequence_are_one_lost_and_one_duplicated() -> None:
    # 1 2 2 4 5: 3 never came, 2 came twice; several records share a frame, as hubserver sends.
    stream = _server_frame(_record(1) + _record(2)) + _server_frame(_record(2))
    stream += _server_frame(_record(4) + _record(5) + b'{"type":6}\x1e')
    for piece in (len(stream), 1, 7, 300):
        tally = Tally(expected=5)
        receiver = Receiver(Dialect.SIGNALR)
        _feed_in_pieces(receiver, tally, stream, piece)
        assert (tally.received, tally.lost, tally.duplicated, tally.foreign) == (5, 1, 1, 0)
        assert tally.buffer == b""
        # Three data frames, whatever the reads: the server's batching, not the client's.
        assert receiver.frames == 3
        assert receiver.reads == -(-len(stream) // piece)


def test_large_chunks_count_the_same_as_small_ones() -> None:
    # Same answers for one big chunk as for small ones, whatever the framing
    # (a 16-bit frame length whose low byte is 0x1E, pings, frames of one or many records).
    sequences = [n for n in range(1, 201) if n != 77] + [5, 9, 500, 0]
    stream = b""
    for index in range(0, len(sequences), 7):
        records = b"".join(_record(n, t=10**18 + n) for n in sequences[index : index + 7])
        stream += _server_frame(records if index % 2 else records + b'{"type":6}\x1e')
        stream += _server_frame(_record(1)[:0] + b"\x1e" * (0x11E - 1) + b"\x1e")  # 0x01 0x1E
        stream += _server_frame(b"ping", OP_PING)
    assert len(stream) > 32_768
    counts = []
    for piece in (len(stream), 8195, 1000):
        receiver = Receiver(Dialect.SIGNALR, sample_every=3)
        tally = Tally(expected=200)
        _feed_in_pieces(receiver, tally, stream, piece)
        counts.append((tally.received, tally.lost, tally.duplicated, tally.foreign))
        assert len(receiver.latencies_ns) == (len(sequences) + 2) // 3
        assert all(5_000 - 10**18 - 600 < value < 5_000 - 10**18 for value in receiver.latencies_ns)
    assert counts == [(len(sequences), 1, 2, 2)] * 3


def test_an_exact_stream_counts_clean_and_a_foreign_sequence_is_not_a_duplicate() -> None:
    tally = Tally(expected=3)
    receiver = Receiver(Dialect.SIGNALR)
    stream = b"".join(_server_frame(_record(n)) for n in (3, 1, 2))
    receiver.feed(tally, stream, now_ns=5_000)
    assert (tally.received, tally.lost, tally.duplicated, tally.foreign) == (3, 0, 0, 0)

    receiver.feed(tally, _server_frame(_record(9) + _record(0)), now_ns=5_000)
    assert (tally.received, tally.lost, tally.duplicated, tally.foreign) == (5, 0, 0, 2)


def test_latency_is_sampled_one_event_in_n_across_chunks() -> None:
    receiver = Receiver(Dialect.SIGNALR, sample_every=10)
    tally = Tally(expected=25)
    for n in range(1, 26):  # one frame per event, fed one by one
        receiver.feed(tally, _server_frame(_record(n, t=1_000 + n)), now_ns=10_000)
    assert list(receiver.latencies_ns) == [10_000 - 1_001, 10_000 - 1_011, 10_000 - 1_021]


def test_pings_are_answered_and_a_close_is_noticed() -> None:
    receiver = Receiver(Dialect.SIGNALR)
    tally = Tally(expected=1)
    replies = receiver.feed(tally, _server_frame(b"hi", OP_PING), now_ns=0)
    assert replies[:2] == bytes((0x8A, 0x80 | 2))  # a pong, masked as a client's must be
    assert bytes(b ^ replies[2 + i % 4] for i, b in enumerate(replies[6:])) == b"hi"

    engineio = Receiver(Dialect.ENGINEIO)
    replies = engineio.feed(Tally(expected=1), _server_frame(b"2"), now_ns=0)
    assert replies[0] == 0x81 and replies[1] == 0x81  # a masked one-byte text frame: "3"

    receiver.feed(tally, _server_frame(b"\x03\xe8bye", 0x8), now_ns=0)
    assert tally.is_closed_by_server and tally.close_reason == b"bye"


def test_the_handshake_answer_may_share_a_frame_with_events() -> None:
    tally = Tally(expected=2)
    is_open, _replies, rest = feed_opening(
        Dialect.SIGNALR, tally, _server_frame(b"{}\x1e" + _record(1)) + _server_frame(_record(2))
    )
    assert is_open
    Receiver(Dialect.SIGNALR).feed(tally, rest, now_ns=0)
    assert (tally.received, tally.lost, tally.duplicated) == (2, 0, 0)


def test_requests_keep_per_site_order_and_cover_every_sequence() -> None:
    requests = plan_requests(sites=3, first_n=4, events_per_site=5, batch=4)
    events = [event for request in requests for event in request]
    assert len(events) == 15 and all(len(r) <= 4 for r in requests)
    for site in range(3):
        assert [n for s, n in events if s == site] == [4, 5, 6, 7, 8]
    body = EventFactory(3).body(requests[0], t=42)
    parsed = json.loads(body)
    assert [(e["n"], e["t"], e["site_id"]) for e in parsed][:2] == [
        (4, 42, "site-00000"),
        (4, 42, "site-00001"),
    ]
    assert all(isinstance(e["user_id"], str) and isinstance(e["id"], str) for e in parsed)


def test_the_bar_is_judged_from_rows_it_can_compare() -> None:
    def row(server: str, rate: float, p99: float, lost: int = 0) -> RowResult:
        result = RowResult(server, 1000, 1, "burst", 1, 10)
        result.connected, result.deliveries, result.seconds = 1000, int(rate), 1.0
        result.latencies_ms, result.lost = [p99], lost
        result.cpu_server = 1.0
        return result

    checks, passed = judge([row("hubserver", 900, 10), row("ceiling", 1000, 4)])
    verdicts = {check[0]: (check[2], check[4]) for check in checks}
    assert verdicts["deliveries/s hubserver / ceiling"] == ("0.90x", "PASS")
    assert verdicts["p99 latency hubserver / ceiling"] == ("2.50x", "FAIL")
    assert verdicts["hubserver lost + duplicated"] == ("0", "PASS")
    assert passed is False

    checks, passed = judge([row("hubserver", 900, 1, lost=3), row("socketio", 10, 1)])
    verdicts = {check[0]: (check[2], check[4]) for check in checks}
    assert verdicts["deliveries/s hubserver / socketio"] == ("90.00x", "PASS")
    assert verdicts["hubserver lost + duplicated"] == ("3", "FAIL")
    assert passed is False


def test_the_scale_out_bar_compares_each_layout_with_the_single_process() -> None:
    def row(server: str, rate: float, cpu: float, nodes: int = 1, dup: int = 0) -> RowResult:
        result = RowResult(server, 1000, 1, "burst", 1, 10, nodes=nodes)
        result.connected, result.deliveries, result.seconds = 1000, 1000, 1000 / rate
        result.latencies_ms, result.cpu_server, result.duplicated = [1.0], cpu, dup
        return result

    hub = row("hubserver", 1000, 1.0)
    checks, passed = judge(
        [hub, row("hubserver-w2", 900, 1.2), row("hubserver-redis2", 1500, 2.0, 2)]
    )
    verdicts = {check[0]: (check[2], check[4]) for check in checks}
    assert verdicts["server CPU per delivery, hubserver-w2 / hubserver"] == ("1.20x", "PASS")
    # 1500/s over two nodes is 750/s per node against 1000/s: 0.75x.
    assert verdicts["deliveries/s per node, hubserver-redis2 / hubserver"] == ("0.75x", "PASS")
    assert verdicts["hubserver-w2 lost + duplicated"] == ("0", "PASS")
    assert verdicts["hubserver-redis2 lost + duplicated"] == ("0", "PASS")
    assert passed is True

    checks, passed = judge(
        [hub, row("hubserver-w2", 900, 1.3), row("hubserver-redis2", 1300, 2, 2, 1)]
    )
    verdicts = {check[0]: (check[2], check[4]) for check in checks}
    assert verdicts["server CPU per delivery, hubserver-w2 / hubserver"] == ("1.30x", "FAIL")
    assert verdicts["deliveries/s per node, hubserver-redis2 / hubserver"] == ("0.65x", "FAIL")
    assert verdicts["hubserver-redis2 lost + duplicated"] == ("1", "FAIL")
    assert passed is False

    # Without the single process there is nothing to compare with, but counts are still judged.
    checks, passed = judge([row("hubserver-w2", 900, 1.3)])
    assert [check[0] for check in checks] == ["hubserver-w2 lost + duplicated"]
    assert passed is True


def test_the_metrics_bar_compares_hubserver_with_its_metrics_off() -> None:
    def row(server: str, rate: float, mode: str = "burst", lost: int = 0) -> RowResult:
        result = RowResult(server, 1000, 1, mode, 1, 10)
        result.connected, result.deliveries, result.seconds = 1000, 1000, 1000 / rate
        result.latencies_ms, result.cpu_server, result.lost = [1.0], 1.0, lost
        return result

    checks, passed = judge([row("hubserver", 980), row("hubserver-nometrics", 1000)])
    verdicts = {check[0]: (check[2], check[4]) for check in checks}
    assert verdicts["deliveries/s hubserver / hubserver-nometrics"] == ("0.98x", "PASS")
    assert verdicts["(info) server CPU per delivery, hubserver / hubserver-nometrics"][1] == "info"
    assert verdicts["hubserver-nometrics lost + duplicated"] == ("0", "PASS")
    assert passed is True

    checks, passed = judge([row("hubserver", 960), row("hubserver-nometrics", 1000, lost=1)])
    verdicts = {check[0]: (check[2], check[4]) for check in checks}
    assert verdicts["deliveries/s hubserver / hubserver-nometrics"] == ("0.96x", "FAIL")
    assert verdicts["hubserver-nometrics lost + duplicated"] == ("1", "FAIL")
    assert passed is False

    # Outside burst rows the ratio is shown, not judged.
    checks, passed = judge(
        [row("hubserver", 500, "batch"), row("hubserver-nometrics", 1000, "batch")]
    )
    verdicts = {check[0]: (check[2], check[4]) for check in checks}
    assert verdicts["(info) deliveries/s hubserver / hubserver-nometrics"] == ("0.50x", "info")
    assert passed is True


def test_only_listening_sockets_count_not_a_bound_one() -> None:
    with socket.socket() as bound, socket.socket() as listening:
        bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        assert listening_sockets(port) == 0
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listening.bind(("127.0.0.1", port))
        listening.listen()
        assert listening_sockets(port) == 1


# -- the real thing, tiny ------------------------------------------------------------


def test_a_tiny_run_counts_exactly_and_writes_json_and_a_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    json_path, plot_path = tmp_path / "fanout.json", tmp_path / "fanout.png"
    argv = [
        "fanout",
        "--servers",
        "hubserver,ceiling",
        "--connections",
        str(CONNECTIONS),
        "--sites",
        str(SITES),
        "--mode",
        "burst,batch",
        "--batch",
        "4",
        "--events-per-site",
        str(EVENTS_PER_SITE),
        "--warmup-events",
        "2",
        "--quiet-timeout",
        "5",
        "--row-timeout",
        "30",
        "--quiet",
        "--json",
        str(json_path),
        "--plot",
        str(plot_path),
    ]

    assert main(argv) == 0

    out = capsys.readouterr().out
    assert f"bar: {BAR}" in out and "bar checks:" in out
    assert "hubserver lost + duplicated" in out
    document = json.loads(json_path.read_text(encoding="utf-8"))
    assert document["profile"] == "fanout"
    assert document["parameters"]["connections"] == [CONNECTIONS]
    assert {"cores", "python", "versions"} <= set(document["environment"])
    assert isinstance(document["checks"], list) and document["checks"]
    results = document["results"]
    assert [(r["server"], r["mode"]) for r in results] == [
        ("hubserver", "burst"),
        ("ceiling", "burst"),
        ("hubserver", "batch"),
        ("ceiling", "batch"),
    ]
    for result in results:
        assert set(result) == ROW_KEYS
        assert result["connected"] == CONNECTIONS
        # Each subscriber gets every event of its site: summed over sites.
        per_site_subscribers = CONNECTIONS // SITES
        assert result["deliveries"] == EVENTS_PER_SITE * per_site_subscribers * SITES
        assert result["expected_deliveries"] == result["deliveries"]
        assert (result["lost"], result["duplicated"], result["foreign"]) == (0, 0, 0)
        assert result["publish_failed"] == 0
        assert result["requests"] == (
            EVENTS_PER_SITE * SITES
            if result["mode"] == "burst"
            else EVENTS_PER_SITE * SITES // 4 + (1 if EVENTS_PER_SITE * SITES % 4 else 0)
        )
        assert result["latency_ms"]["samples"] > 0
        assert result["frames"] > 0 and result["reads"] > 0
        assert result["latency_ms"]["p50"] <= result["latency_ms"]["max"]
        assert result["server_rss_bytes"]["connected"] > 0
        assert result["server_cpu_seconds"] >= 0
        assert len(result["client_cpu_seconds"]) == 2
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "server",
    [
        "hubserver-w2",
        pytest.param(
            "hubserver-redis2",
            marks=pytest.mark.skipif(
                redis_server_binary() is None, reason="redis-server is not installed"
            ),
        ),
    ],
)
def test_a_tiny_scale_out_run_counts_exactly(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    json_path = tmp_path / "fanout.json"
    argv = [
        "fanout",
        "--servers",
        server,
        "--connections",
        str(CONNECTIONS),
        "--sites",
        str(SITES),
        "--mode",
        "burst",
        "--events-per-site",
        str(EVENTS_PER_SITE),
        "--warmup-events",
        "2",
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
    assert f"bar: {BAR}; {SCALE_OUT_BAR}" in out
    assert f"{server} lost + duplicated" in out and "deliv/s/node" in out
    (result,) = json.loads(json_path.read_text(encoding="utf-8"))["results"]
    assert set(result) == ROW_KEYS
    assert result["server"] == server and result["connected"] == CONNECTIONS
    assert result["expected_deliveries"] == EVENTS_PER_SITE * CONNECTIONS
    assert result["deliveries"] == result["expected_deliveries"]
    assert (result["lost"], result["duplicated"], result["foreign"]) == (0, 0, 0)
    assert result["publish_failed"] == 0 and result["closed_by_server"] == 0
    assert result["server_exit"] is None
    connections = result["server_connections_by_process"]
    assert sum(connections.values()) == CONNECTIONS
    if server == "hubserver-w2":
        # The parent (with the broker) and both workers are in the server's CPU.
        assert result["layout"] == "2 workers" and result["nodes"] == 1
        assert set(result["server_cpu_seconds_by_process"]) == {"parent", "worker 1", "worker 2"}
        assert set(connections) == {"worker 1", "worker 2"}
        assert result["backplane_cpu_seconds"] == 0
    else:
        # Half of every site's subscribers are on node 2, which only Redis feeds.
        assert result["layout"] == "2 nodes + redis" and result["nodes"] == 2
        assert set(result["server_cpu_seconds_by_process"]) == {"node 1", "node 2", "redis-server"}
        assert connections == {"node 1": CONNECTIONS // 2, "node 2": CONNECTIONS // 2}
        assert result["deliveries_per_second_per_node"] == pytest.approx(
            result["deliveries_per_second"] / 2
        )
        assert result["backplane_cpu_seconds"] >= 0
    assert result["server_cpu_seconds"] == pytest.approx(
        sum(
            seconds
            for role, seconds in result["server_cpu_seconds_by_process"].items()
            if role != "redis-server"
        ),
        abs=0.05,
    )
