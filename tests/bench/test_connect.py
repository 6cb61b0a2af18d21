"""The ``connect`` profile at a tiny size: every opening is counted and timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main

CLIENTS = 20


def test_a_tiny_connect_run_opens_every_client(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "connect.json"
    argv = [
        "connect",
        "--servers",
        "hubserver,ceiling",
        "--clients",
        str(CLIENTS),
        "--concurrency",
        "8",
        "--quiet",
        "--json",
        str(path),
    ]

    assert main(argv) == 0

    out = capsys.readouterr().out
    assert "conn/s" in out and "hubserver" in out and "ceiling" in out
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["profile"] == "connect"
    assert document["parameters"]["clients"] == CLIENTS
    assert [r["server"] for r in document["results"]] == ["hubserver", "ceiling"]
    for result in document["results"]:
        assert (result["ok"], result["failed"]) == (CLIENTS, 0)
        assert len(result["connect_ms"]["samples"]) == CLIENTS
        assert result["connect_ms"]["p50"] <= result["connect_ms"]["p99"]
        assert result["connections_per_second"] > 0
