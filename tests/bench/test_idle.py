"""The ``idle`` profile at a tiny size: connections open, stay open, memory is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main

CONNECTIONS = 20


def test_a_tiny_idle_run_holds_every_connection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "idle.json"
    argv = [
        "idle",
        "--servers",
        "hubserver",
        "--connections",
        str(CONNECTIONS),
        "--hold",
        "1",
        "--client-procs",
        "2",
        "--quiet",
        "--json",
        str(path),
    ]

    assert main(argv) == 0

    out = capsys.readouterr().out
    assert "KB/conn" in out and "hubserver" in out
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["profile"] == "idle"
    (result,) = document["results"]
    assert result["server"] == "hubserver"
    assert (result["connected"], result["open_at_end"], result["closed_by_server"]) == (
        CONNECTIONS,
        CONNECTIONS,
        0,
    )
    rss = result["server_rss_bytes"]
    assert rss["before"] > 0 and rss["end"] > 0 and rss["peak"] >= rss["end"]
    assert result["hold_seconds"] >= 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["idle", "--connections", "0"], "--connections"),
        (["connect", "--clients", "0"], "--clients"),
        (["fanout", "--servers", "nope"], "unknown server"),
        (["soak", "--subscribers", "0"], "--subscribers"),
        (["soak", "--server", "aiosignalr"], "--server"),
        (["soak", "--sites", "5", "--subscribers", "4"], "--sites"),
        (["soak", "--sample-interval", "0"], "--sample-interval"),
    ],
)
def test_options_out_of_range_exit_2_with_the_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"python -m bench {argv[0]}: error: ") and message in error
