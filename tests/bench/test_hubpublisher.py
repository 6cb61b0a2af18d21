"""The bench's publisher-hub client (issue #10, item 3): wire vectors, then a tiny real row.

The records below are the ones the publisher hub's protocol states: the
handshake, a ``Publish`` invocation, its Completion (a result or an error),
the server's Ping and a Close. The tiny rows run ``hubserver-pubhub`` end to
end: hubserver, its publisher hub, the real load client, exact counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.server.hubpublisher import HUB_PUBLISH_PATH, HubClosed, HubReader, publish_invocation
from bench.server.publisher import EventFactory
from bench.server.wire import OP_CLOSE, OP_PING, OP_TEXT, OpeningError, client_frame

EVENT = b'{"site_id":"s1","user_id":"u1","event_type":"opening","result":"granted"}'
HANDSHAKE_OK = b"{}\x1e"
COMPLETION = b'{"type":3,"invocationId":"7","result":{"accepted":1,"ids":["a"],"seqs":[42]}}\x1e'
ERROR = b'{"type":3,"invocationId":"8","error":"event 0: site_id is missing"}\x1e'
PING = b'{"type":6}\x1e'


def _server_frame(payload: bytes, opcode: int = OP_TEXT, *, is_final: bool = True) -> bytes:
    size = len(payload)
    first = (0x80 if is_final else 0) | opcode
    if size < 126:
        return bytes((first, size)) + payload
    return bytes((first, 126)) + size.to_bytes(2, "big") + payload


def _unmask(frame: bytes) -> tuple[int, bytes]:
    """A client frame's opcode and payload; it must be final and masked (RFC 6455 §5.3)."""
    assert frame[0] & 0x80 and frame[1] & 0x80
    size, pos = frame[1] & 0x7F, 2
    if size == 126:
        size, pos = int.from_bytes(frame[2:4], "big"), 4
    mask, payload = frame[pos : pos + 4], frame[pos + 4 :]
    assert len(payload) == size
    return frame[0] & 0x0F, bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


def test_the_publish_invocation_is_the_protocols_record() -> None:
    assert publish_invocation(7, "entries", b"[" + EVENT + b"]") == (
        b'{"type":1,"invocationId":"7","target":"Publish","arguments":["entries",['
        + EVENT
        + b"]]}\x1e"
    )
    # One event goes as an object, and the record is JSON whatever the event.
    batch = EventFactory(2).body([(0, 1), (1, 1)], t=5)
    for events in (EVENT, batch):
        record = json.loads(publish_invocation(12, "incidents", events)[:-1])
        assert record == {
            "type": 1,
            "invocationId": "12",
            "target": "Publish",
            "arguments": ["incidents", json.loads(events)],
        }


def test_the_invocation_goes_out_in_one_masked_text_frame() -> None:
    record = publish_invocation(7, "entries", EventFactory(1).body([(0, 1)] * 3, t=1))
    assert len(record) > 126  # the 16-bit length form
    opcode, payload = _unmask(client_frame(OP_TEXT, record))
    assert (opcode, payload) == (OP_TEXT, record)


@pytest.mark.parametrize("piece", [1, 2, 5, 17, 1000])
def test_records_are_read_whatever_the_pieces_and_frames(piece: int) -> None:
    # The handshake answer and a Ping share a frame; a Completion spans two frames.
    stream = _server_frame(HANDSHAKE_OK + PING)
    stream += _server_frame(COMPLETION[:30], is_final=False)
    stream += _server_frame(COMPLETION[30:], opcode=0)
    stream += _server_frame(ERROR)
    reader = HubReader()
    records: list[dict[str, object]] = []
    for start in range(0, len(stream), piece):
        records += reader.feed(stream[start : start + piece])
    assert records == [
        {},
        {"type": 6},
        {"type": 3, "invocationId": "7", "result": {"accepted": 1, "ids": ["a"], "seqs": [42]}},
        {"type": 3, "invocationId": "8", "error": "event 0: site_id is missing"},
    ]
    assert reader.replies == b""


def test_a_websocket_ping_is_answered_with_a_masked_pong() -> None:
    reader = HubReader()
    assert reader.feed(_server_frame(b"hi", OP_PING) + _server_frame(PING)) == [{"type": 6}]
    assert _unmask(reader.replies) == (0xA, b"hi")


def test_a_close_record_or_frame_ends_the_connection() -> None:
    with pytest.raises(HubClosed, match="hub Close: Server is shutting down"):
        HubReader().feed(_server_frame(b'{"type":7,"error":"Server is shutting down"}\x1e'))
    reader = HubReader()
    with pytest.raises(HubClosed, match="WebSocket close 03e9 going away"):
        reader.feed(_server_frame(b"\x03\xe9going away", OP_CLOSE))
    assert _unmask(reader.replies) == (OP_CLOSE, b"\x03\xe9")


@pytest.mark.parametrize(
    "frame",
    [
        _server_frame(b"not json\x1e"),
        _server_frame(b"[1,2]\x1e"),
        bytes((0x81, 0x80 | 3)) + b"\0\0\0\0{}\x1e",  # a masked server frame
    ],
)
def test_a_broken_server_is_a_protocol_error(frame: bytes) -> None:
    with pytest.raises(OpeningError):
        HubReader().feed(frame)


# -- the real thing, tiny: hubserver with its publisher hub ---------------------------------


@pytest.mark.parametrize(("mode", "publish_connections"), [("burst", 1), ("batch", 4)])
def test_a_tiny_pubhub_row_counts_exactly(
    mode: str, publish_connections: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sites, per_site, deliveries, batch = 5, 2, 2000, 7
    json_path = tmp_path / "pubhub.json"
    argv = [
        "fanout",
        "--servers",
        "hubserver-pubhub",
        "--sites",
        str(sites),
        "--subscribers-per-site",
        str(per_site),
        "--deliveries",
        str(deliveries),
        "--mode",
        mode,
        "--batch",
        str(batch),
        "--publish-connections",
        str(publish_connections),
        "--quiet-timeout",
        "5",
        "--row-timeout",
        "60",
        "--quiet",
        "--json",
        str(json_path),
    ]

    assert main(argv) == 0

    out = capsys.readouterr().out
    assert "hubserver-pubhub lost + duplicated" in out and HUB_PUBLISH_PATH in out
    (result,) = json.loads(json_path.read_text(encoding="utf-8"))["results"]
    events = deliveries // (sites * per_site) * sites  # 200 per site
    assert result["publish"] == "hub" and result["publish_connections"] == publish_connections
    assert result["connected"] == sites * per_site and result["closed_by_server"] == 0
    assert result["publish_failed"] == 0 and result["publish_errors"] == {}
    assert result["events"] == events
    assert result["requests"] == (events if mode == "burst" else -(-events // batch))
    assert result["deliveries"] == result["expected_deliveries"] == deliveries
    assert [result[key] for key in ("lost", "duplicated", "misrouted", "foreign")] == [0] * 4
    assert result["server_exit"] is None
