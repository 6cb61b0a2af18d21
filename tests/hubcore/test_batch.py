"""PreparedBatch: several broadcast messages joined once per protocol, accounted per message."""

from __future__ import annotations

import pytest

from hubcore import (
    Close,
    HandshakeResponse,
    HubConnection,
    HubLimits,
    Invocation,
    LocalProtocolError,
    PreparedBatch,
    PreparedMessage,
    ReplayBufferFull,
    get_protocol,
)


def _open(protocol: str, *, version: int = 1, limits: HubLimits | None = None) -> HubConnection:
    conn = HubConnection(now=0.0, allow_stateful_reconnect=True, limits=limits)
    conn.receive_data(f'{{"protocol":"{protocol}","version":{version}}}\x1e'.encode(), 0.0)
    assert conn.next_event() is not None
    conn.send(HandshakeResponse(), 0.0)
    return conn


def _events(n: int) -> list[PreparedMessage]:
    return [
        PreparedMessage(Invocation(target="ReceiveMessage", arguments=[f"event {i}"]))
        for i in range(n)
    ]


@pytest.mark.parametrize("name", ["json", "messagepack"])
def test_batch_bytes_are_the_records_in_order_and_shared(name: str) -> None:
    protocol = get_protocol(name)
    messages = _events(3)
    batch = PreparedBatch(messages)
    expected = b"".join(protocol.write_message(m.message) for m in messages)
    first, second = _open(name), _open(name)
    data = first.send(batch, 1.0)
    assert data == expected
    assert second.send(batch, 1.0) is data
    assert protocol.parse_messages(data) == [m.message for m in messages]


def test_batch_counts_as_sending_for_keepalive() -> None:
    conn = _open("json")
    conn.send(PreparedBatch(_events(2)), 10.0)
    assert conn.next_deadline() == 10.0 + 15.0


def test_stateful_batch_tracks_each_message_and_is_all_or_nothing() -> None:
    protocol = get_protocol("json")
    messages = _events(3)
    record_size = len(protocol.write_message(messages[0].message))
    limits = HubLimits(max_replay_buffer_bytes=record_size * 4)
    conn = _open("json", version=2, limits=limits)
    assert conn.is_stateful
    conn.send(PreparedBatch(messages), 1.0)
    assert conn.replay_buffer_bytes == record_size * 3
    with pytest.raises(ReplayBufferFull):
        conn.send(PreparedBatch(_events(2)), 1.0)
    assert conn.replay_buffer_bytes == record_size * 3  # nothing of the refused batch kept
    replay = conn.resume(2.0)
    assert replay.startswith(b'{"type":9,"sequenceId":1}\x1e')
    assert replay.endswith(b"".join(protocol.write_message(m.message) for m in messages))


def test_batch_misuse_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        PreparedBatch([])
    with pytest.raises(LocalProtocolError):
        PreparedBatch([Invocation(target="x")])  # type: ignore[list-item]
    conn = _open("json")
    with pytest.raises(LocalProtocolError):
        conn.send(PreparedBatch([PreparedMessage(Close())]), 1.0)
    fresh = HubConnection(now=0.0)
    with pytest.raises(LocalProtocolError):
        fresh.send(PreparedBatch(_events(1)), 0.0)
