"""The ``codec`` profile at a tiny size: it runs, reports every row, and catches broken codecs.

Timings are never asserted: how fast this machine is says nothing about the code.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from aiosignalr.protocol.json_protocol import JSONProtocol
from aiosignalr.protocol.messagepack_protocol import MessagePackProtocol

import hubcore
from bench.__main__ import main
from bench.core.codec import BAR, OPERATIONS, PROTOCOLS, CodecMismatch, CodecRun, verify_codecs
from bench.report import JsonValue, Progress
from bench.workload import access_entries

TINY = CodecRun(events=5, seed=7, rounds=1, seconds_per_run=0.0)
TINY_ARGS = ["--events", "4", "--rounds", "1", "--seconds-per-run", "0", "--quiet"]
ROW_KEYS = {
    "name",
    "operation",
    "protocol",
    "unit",
    "hubcore",
    "peer",
    "ratio",
    "round_ratios",
    "spread",
    "bar",
    "passed",
}
HAS_PEER = {"encode", "parse"}


def _corrupt(record: bytes) -> bytes:
    # Same length and still well-formed in both protocols: only the text changes.
    assert b"site_id" in record
    return record.replace(b"site_id", b"site_ID")


def test_events_are_seeded_distinct_and_typical() -> None:
    texts = access_entries(50, seed=3)
    assert texts == access_entries(50, seed=3)
    assert texts != access_entries(50, seed=4)
    assert len(set(texts)) == len(texts)
    for text in texts:
        entry = json.loads(text)
        assert {"id", "site_id", "seq", "lock_id", "user_first_name", "occurred_at"} <= set(entry)
        assert json.dumps(entry, ensure_ascii=False, separators=(",", ":")) == text
        assert any(ord(char) > 127 for char in entry["user_first_name"] + entry["user_last_name"])
        assert 250 <= len(text.encode()) <= 400


def _assert_positive(side: JsonValue, *, rounds: int) -> None:
    assert isinstance(side, dict)
    median, best, samples = side["median"], side["best"], side["samples"]
    assert isinstance(median, float) and median > 0
    assert isinstance(best, float) and best > 0
    assert isinstance(samples, list) and len(samples) == rounds
    assert all(isinstance(value, float) and value > 0 for value in samples)


def test_every_row_is_measured() -> None:
    outcome = TINY.execute(Progress(None))

    rows = {(result["operation"], result["protocol"]) for result in outcome.results}
    assert rows == {(operation, name) for operation in OPERATIONS for name in PROTOCOLS}
    assert len(outcome.table.rows) == len(rows)
    for result in outcome.results:
        assert set(result) == ROW_KEYS
        _assert_positive(result["hubcore"], rounds=TINY.rounds)
        if result["operation"] in HAS_PEER:
            _assert_positive(result["peer"], rounds=TINY.rounds)
            ratio = result["ratio"]
            assert isinstance(ratio, float) and ratio > 0
            assert isinstance(result["passed"], bool)
        else:
            assert result["peer"] is None
            assert result["ratio"] is None
    assert outcome.bar == BAR
    assert isinstance(outcome.passed, bool)


def test_command_line_prints_the_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "codec.json"

    assert main(["codec", *TINY_ARGS, "--json", str(path)]) == 0

    out = capsys.readouterr().out
    assert "bar: hubcore >= 1.5x peer on every row; broadcast encode < 5 us" in out
    assert "cores" in out and "aiosignalr 0.1.1" in out
    for operation in OPERATIONS:
        assert operation in out
    document = json.loads(path.read_text(encoding="utf-8"))
    assert set(document) == {
        "profile",
        "started_at",
        "parameters",
        "environment",
        "workload",
        "bar",
        "passed",
        "results",
        "notes",
    }
    assert document["profile"] == "codec"
    assert document["bar"] == BAR
    assert document["parameters"]["events"] == 4
    assert document["parameters"]["rounds"] == 1
    assert {"cores", "python", "platform", "versions"} <= set(document["environment"])
    assert set(document["environment"]["versions"]) == {
        "hubcore/hubserver",
        "msgpack",
        "orjson",
        "aiosignalr",
    }
    assert len(document["results"]) == len(OPERATIONS) * len(PROTOCOLS)
    for result in document["results"]:
        assert set(result) == ROW_KEYS
        _assert_positive(result["hubcore"], rounds=1)


def _break_hubcore_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    write = hubcore.HubProtocol.write_message

    def broken(self: hubcore.HubProtocol, message: hubcore.HubMessage) -> bytes:
        return _corrupt(write(self, message))

    monkeypatch.setattr(hubcore.HubProtocol, "write_message", broken)


def _break_hubcore_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    next_message = hubcore.MessageReader.next_message

    def broken(self: hubcore.MessageReader) -> hubcore.HubMessage | None:
        message = next_message(self)
        if isinstance(message, hubcore.Invocation):
            (text,) = message.arguments
            assert isinstance(text, str)
            return dataclasses.replace(message, arguments=(text.replace("site_id", "site_ID"),))
        return message

    monkeypatch.setattr(hubcore.MessageReader, "next_message", broken)


def _break_peer_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    for cls in (JSONProtocol, MessagePackProtocol):
        write = cls.write_message

        def broken(self: object, message: object, write: Callable[..., bytes] = write) -> bytes:
            return _corrupt(write(self, message))

        monkeypatch.setattr(cls, "write_message", broken)


def _break_broadcast(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = hubcore.PreparedMessage.encoded

    def broken(self: hubcore.PreparedMessage, protocol: hubcore.HubProtocol) -> bytes:
        return _corrupt(encoded(self, protocol))

    monkeypatch.setattr(hubcore.PreparedMessage, "encoded", broken)


BREAKAGES: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "hubcore writer": _break_hubcore_writer,
    "hubcore reader": _break_hubcore_reader,
    "peer writer": _break_peer_writer,
    "hubcore broadcast": _break_broadcast,
}


@pytest.mark.parametrize("name", PROTOCOLS)
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_codec_is_caught(
    monkeypatch: pytest.MonkeyPatch, breakage: str, name: str
) -> None:
    texts = access_entries(3, seed=1)
    verify_codecs(texts, name)  # intact first, so the breakage is what fails below

    BREAKAGES[breakage](monkeypatch)

    with pytest.raises(CodecMismatch, match=name):
        verify_codecs(texts, name)


def test_the_profile_refuses_to_time_a_broken_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    _break_hubcore_reader(monkeypatch)

    with pytest.raises(CodecMismatch, match="hubcore -> hubcore"):
        TINY.execute(Progress(None))


def test_the_command_line_fails_on_a_broken_codec(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _break_peer_writer(monkeypatch)

    assert main(["codec", *TINY_ARGS]) == 2

    err = capsys.readouterr().err
    assert "error" in err and "peer -> hubcore" in err


def test_progress_off_a_terminal_writes_milestones_only() -> None:
    stream = io.StringIO()
    progress = Progress(stream)

    progress.update("codec: round 1/5", is_milestone=True)
    progress.update("codec: round 1/5: json encode (peer)")
    progress.clear()

    assert stream.getvalue() == "codec: round 1/5\n"
