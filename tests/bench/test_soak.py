"""The ``soak`` profile: a tiny run against the real server, and its pure parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.server.chaos import SeqBook, scan_records
from bench.server.soak import MIB, SoakRun, count_crashes, rss_slope

SUBSCRIBERS = 6


def test_a_tiny_soak_loses_nothing_and_crashes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "soak.json"
    log = tmp_path / "server.log"
    argv = [
        "soak",
        "--minutes",
        "0.1",
        "--subscribers",
        str(SUBSCRIBERS),
        "--sites",
        "2",
        "--rate",
        "20",
        "--churn-rate",
        "3",
        # Short lives, so identities come back (and resume) within the 6 s run:
        # with the default 5 s only a few did, and on a busy machine none.
        "--churn-max-life",
        "0.6",
        "--garbage-rate",
        "4",
        "--slow-readers",
        "2",
        "--prefill",
        "20",
        "--answer-timeout",
        "5",
        "--client-procs",
        "1",
        "--server-arg=--max-outbox-bytes=65536",
        "--server-arg=--slow-client-timeout=1",
        "--server-log",
        str(log),
        "--quiet",
        "--json",
        str(path),
    ]

    assert main(argv) == 0

    out = capsys.readouterr().out
    assert "RSS MiB" in out and "bar checks:" in out and "verdict: " in out
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["profile"] == "soak"
    (result,) = document["results"]
    assert result["server_exit"] is None
    assert result["connected"] == SUBSCRIBERS and result["closed_by_server"] == 0
    assert result["publish_failed"] == 0 and result["published_events"] == 20 * 6
    assert result["deliveries"] == result["expected_deliveries"] == 20 * 6 * SUBSCRIBERS / 2
    assert (result["lost"], result["duplicated"], result["foreign"]) == (0, 0, 0)
    assert result["handler_crashes"] == 0 and result["first_crash"] is None
    assert result["latency_ms"]["samples"] > 0
    samples = result["rss_samples"]
    assert len(samples) >= 3 and all(sample["rss_bytes"] > 0 for sample in samples)
    churn = result["churn"]
    assert churn["opened"] > 0 and churn["events"] > 0
    assert (churn["lost"], churn["duplicated"]) == (0, 0)
    assert sum(churn["resumes"].values()) > 0  # identities came back from their last seq
    assert result["slow_readers"]["opened"] >= 2
    garbage = result["garbage"]
    assert garbage["connections"] > 0 and set(garbage["outcomes"]) >= {"random bytes"}
    checks = {check["check"]: check["verdict"] for check in document["checks"]}
    assert checks["lost (subscribers + churn)"] == "PASS"
    assert checks["handler crashes"] == "PASS"
    assert checks["RSS slope"] == "n/a"  # six seconds are too few to judge a slope
    assert log.read_text(encoding="utf-8")  # the server's log was kept


def test_the_slope_is_least_squares_over_the_samples_after_the_warm_up() -> None:
    # 2 MiB per minute after 60 s; the warm-up's jump must not count.
    samples = [(0.0, 10 * MIB), (30.0, 90 * MIB)]
    samples += [(60.0 + 15 * i, 100 * MIB + i * MIB // 2) for i in range(9)]

    assert rss_slope(samples, after=60.0) == pytest.approx(2.0)
    assert rss_slope(samples, after=0.0) is not None and rss_slope(samples, after=0.0) > 2.0
    assert rss_slope(samples[:4], after=60.0) is None  # two samples after the warm-up
    assert rss_slope([(0.0, MIB), (5.0, MIB), (10.0, MIB)], after=0.0) is None  # 10 s only


def test_the_default_warm_up_outlasts_the_filling_of_history_and_dedupe_window() -> None:
    # 1000 prefilled events per site over 20 sites at 200/s turn over in 100 s.
    assert SoakRun().warmup_seconds == pytest.approx(120.0)
    assert SoakRun(minutes=30).warmup_seconds == pytest.approx(360.0)  # a fifth of the run
    assert SoakRun(prefill=0, minutes=2).warmup_seconds == pytest.approx(72.0)  # dedupe window
    assert SoakRun(warmup=5).warmup_seconds == 5


def test_a_crash_record_with_its_traceback_counts_once() -> None:
    log = "\n".join(
        [
            "2025-01-01 10:00:00,000 WARNING hubserver: DEVELOPMENT MODE",
            "2025-01-01 10:00:01,000 ERROR hubserver.session: session 7: connection handler failed",
            "Traceback (most recent call last):",
            '  File "x.py", line 1, in f',
            "ValueError: boom",
            "2025-01-01 10:00:02,000 WARNING hubserver.session: session 8: closing slow client",
            "2025-01-01 10:00:03,000 ERROR hubserver: timer failed",
            "Traceback (most recent call last):",
            "KeyError: 1",
        ]
    )

    counted = count_crashes(log)

    assert counted.crashes == 2
    assert "session 7: connection handler failed" in counted.first
    assert "ValueError: boom" in counted.first
    assert count_crashes("2025-01-01 10:00:00,000 WARNING hubserver: fine\n").crashes == 0
    # A traceback printed without a log record (an uncaught exception) still counts.
    assert count_crashes("Traceback (most recent call last):\nSystemExit: 1\n").crashes == 1


def test_the_seq_book_finds_a_hole_and_a_duplicate() -> None:
    book = SeqBook()
    for seq in (5, 6, 8, 8, 9):
        book.add(seq)

    assert (book.first, book.last, book.received) == (5, 9, 5)
    assert book.lost == 1  # 7
    assert book.duplicated == 1  # the second 8

    book.add(7)  # late, but not lost
    book.add(4)  # before where the reader's stream began: a repeat from the past
    assert (book.lost, book.duplicated) == (0, 2)


def test_a_gap_forgives_what_left_the_history_and_nothing_else() -> None:
    book = SeqBook()
    book.add(10)
    book.gap(15)  # 11..14 are gone: not lost
    book.add(15)
    book.add(17)  # 16 is a hole
    book.gap(3)  # a Gap behind the last seq changes nothing

    assert (book.forgiven, book.lost, book.duplicated) == (4, 1, 0)
    empty = SeqBook()
    empty.gap(100)
    assert (empty.lost, empty.forgiven) == (0, 0)


def test_scan_records_reads_events_gaps_completions_and_close() -> None:
    event = (
        b'{"type":1,"target":"ReceiveMessage","arguments":'
        b'["{\\"n\\":1,\\"t\\":2,\\"site_id\\":\\"site-00000\\",\\"seq\\":41}"]}\x1e'
    )
    payload = (
        b'{"type":1,"target":"Gap","arguments":[40]}\x1e'
        + event
        + b'{"type":3,"invocationId":"r"}\x1e'
        + b'{"type":3,"invocationId":"b","error":"Failed to invoke"}\x1e'
        + b'{"type":6}\x1e'
        + b'{"type":7,"error":"bye","allowReconnect":true}\x1e'
    )

    scanned = scan_records(payload)

    assert scanned.items == [("gap", 40), ("seq", 41)]
    assert scanned.completion_count == 2
    assert scanned.completion_errors == ["Failed to invoke"]
    assert scanned.close_error == "bye"
    assert scan_records(b"not json\x1e[]\x1e").items == []
