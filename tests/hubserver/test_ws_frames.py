"""FrameReader, checked against wsproto: same bytes, same data, pings, closes and close codes.

wsproto (client role) writes the valid streams and (server role) is the oracle
for the invalid ones. The reader departs from wsproto twice, each on purpose
and tested as such below:

* A data frame out of order (a continuation with no message in progress, or a
  new message inside a fragmented one) fails at its header; wsproto waits for
  its first payload byte. Same code (1002), a few bytes sooner.
* A close with code 1014 (Bad Gateway, in the IANA registry RFC 6455 §11.7
  set up, like 1012 and 1013 which wsproto accepts) is a valid close; wsproto
  answers 1002 because its ``CloseReason`` enum stops at 1013.
"""

from __future__ import annotations

import itertools
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason

from hubserver.transports import (
    FrameReader,
    PeerClose,
    PeerPing,
    WebSocketError,
    close_frame,
    close_reply,
    pong_frame,
)

Received = bytes | PeerPing | PeerClose

KEY = bytes.fromhex("37fa213d")  # RFC 6455 §5.7's masking key
TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA
VALID_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013]
VALID_CLOSE_CODES += [3000, 3999, 4000, 4999]
INVALID_CLOSE_CODES = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
# wsproto's message for any code below 3000 missing from its enum (1014 among them).
WSPROTO_UNKNOWN_CODE = "CLOSE with unknown reserved code"
OUT_OF_ORDER = ("Unexpected continuation frame", "Expected a continuation frame")


# -- building frames ---------------------------------------------------------------------------


def mask(payload: bytes, key: bytes = KEY) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    key: bytes = KEY,
    form: int | None = None,
    length: int | None = None,
) -> bytes:
    """A client frame; ``form`` forces the 7-bit (None), 16-bit (126) or 64-bit (127) length,
    ``length`` lies about the payload's length."""
    size = len(payload) if length is None else length
    if form is None:
        form = size if size < 126 else 126 if size < 1 << 16 else 127
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode, (0x80 if masked else 0) | form])
    if form == 126:
        head += struct.pack("!H", size)
    elif form == 127:
        head += struct.pack("!Q", size)
    if not masked:
        return head + payload
    return head + key + mask(payload, key)


def close_body(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


# -- running both parsers ----------------------------------------------------------------------


@dataclass
class Outcome:
    data: bytes  # all data, joined
    events: list[Received]  # in order, consecutive data merged
    code: int | None = None  # the close code of the error, None when none
    message: str = ""


def merged(events: Iterable[Received]) -> list[Received]:
    out: list[Received] = []
    for event in events:
        if isinstance(event, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += event
        elif not (isinstance(event, bytes) and not event):
            out.append(event)
    return out


def chunks(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def ours(data: bytes, cuts: Iterable[int] = ()) -> tuple[Outcome, FrameReader]:
    reader = FrameReader()
    got: list[Received] = []
    closed = False
    for chunk in chunks(data, cuts):
        try:
            events = reader.receive_data(chunk)
        except WebSocketError as exc:
            outcome = Outcome(b"".join(e for e in got if isinstance(e, bytes)), merged(got))
            outcome.code, outcome.message = exc.code, str(exc)
            return outcome, reader
        assert all(e for e in events if isinstance(e, bytes)), "returned b''"
        assert not (closed and events), "events after the close"
        assert sum(isinstance(e, PeerClose) for e in events) <= 1
        if events and isinstance(events[-1], PeerClose):
            closed = True
        got += events
    return Outcome(b"".join(e for e in got if isinstance(e, bytes)), merged(got)), reader


def wsproto_server(data: bytes) -> Outcome:
    """What wsproto's server makes of ``data``, in the reader's terms."""
    conn = Connection(ConnectionType.SERVER)
    conn.receive_data(data)
    got: list[Received] = []
    for event in conn.events():
        if isinstance(event, TextMessage):
            got.append(event.data.encode())
        elif isinstance(event, BytesMessage):
            got.append(bytes(event.data))
        elif isinstance(event, Ping):
            got.append(PeerPing(bytes(event.payload)))
        elif isinstance(event, CloseConnection):
            if conn.state is ConnectionState.OPEN:  # a ParseFailed, not the peer's close
                outcome = Outcome(b"".join(e for e in got if isinstance(e, bytes)), merged(got))
                outcome.code, outcome.message = int(event.code), event.reason or ""
                return outcome
            code = None if event.code == 1005 else int(event.code)
            got.append(PeerClose(code, event.reason or ""))
        else:
            assert isinstance(event, Pong)
    return Outcome(b"".join(e for e in got if isinstance(e, bytes)), merged(got))


def wsproto_client(data: bytes) -> list[Event]:
    conn = Connection(ConnectionType.CLIENT)
    conn.receive_data(data)
    return list(conn.events())


def error_code(data: bytes, cuts: Iterable[int] = ()) -> int | None:
    return ours(data, cuts)[0].code


# -- valid streams -----------------------------------------------------------------------------

texts = st.text(max_size=12) | st.text(min_size=40, max_size=200)
blobs = st.binary(max_size=12) | st.binary(min_size=120, max_size=400)


@st.composite
def client_streams(draw: st.DrawFn) -> tuple[bytes, list[Received]]:
    """A client's bytes (written by wsproto) and the events the reader must return."""
    client = Connection(ConnectionType.CLIENT)
    wire = bytearray()
    expected: list[Received] = []

    def ping() -> None:
        payload = draw(st.binary(max_size=125))
        wire.extend(client.send(Ping(payload)))
        expected.append(PeerPing(payload))

    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["text", "binary", "ping", "pong"]))
        if kind == "ping":
            ping()
        elif kind == "pong":
            wire.extend(client.send(Pong(draw(st.binary(max_size=125)))))
        else:
            parts: Sequence[str | bytes]
            parts = draw(st.lists(texts if kind == "text" else blobs, min_size=1, max_size=4))
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                if isinstance(part, str):
                    wire.extend(client.send(TextMessage(data=part, message_finished=last)))
                    expected.append(part.encode())
                else:
                    wire.extend(client.send(BytesMessage(data=part, message_finished=last)))
                    expected.append(part)
                if not last and draw(st.booleans()):
                    ping()
    if draw(st.booleans()):
        code = draw(st.sampled_from([*VALID_CLOSE_CODES, 1014, None]))
        reason = draw(st.text(max_size=30)) if code is not None else ""
        wire.extend(
            client.send(CloseConnection(code=code or CloseReason.NO_STATUS_RCVD, reason=reason))
        )
        expected.append(PeerClose(code, reason))
        wire.extend(draw(st.binary(max_size=20)))  # ignored: nothing follows a close
    return bytes(wire), merged(expected)


@given(client_streams(), st.lists(st.integers(0, 2000), max_size=12))
def test_client_streams_come_out_whole(
    stream: tuple[bytes, list[Received]], cuts: list[int]
) -> None:
    wire, expected = stream
    outcome, reader = ours(wire, cuts)
    assert outcome.code is None, outcome.message
    assert outcome.events == expected
    if expected and isinstance(expected[-1], PeerClose):
        assert reader.receive_data(b"more") == []


@given(client_streams())
def test_client_streams_byte_by_byte(stream: tuple[bytes, list[Received]]) -> None:
    wire, expected = stream
    outcome, _ = ours(wire, range(len(wire)))
    assert outcome.code is None, outcome.message
    assert outcome.events == expected


@given(client_streams())
def test_wsproto_server_agrees_on_client_streams(stream: tuple[bytes, list[Received]]) -> None:
    """The oracle is sound: wsproto's server reads the same events (1014 aside)."""
    wire, expected = stream
    theirs = wsproto_server(wire)
    if theirs.message == WSPROTO_UNKNOWN_CODE:
        last = expected[-1]
        assert isinstance(last, PeerClose)
        assert last.code == 1014
        return
    assert theirs.code is None
    assert theirs.data == b"".join(e for e in expected if isinstance(e, bytes))
    assert [e for e in theirs.events if not isinstance(e, bytes)] == [
        e for e in expected if not isinstance(e, bytes)
    ]


# -- RFC 6455 §5.7 and other hand-written frames ----------------------------------------------


def test_rfc_masked_hello() -> None:
    assert FrameReader().receive_data(bytes.fromhex("818537fa213d7f9f4d5158")) == [b"Hello"]


def test_rfc_fragmented_hello() -> None:
    # §5.7's "Hel" + "lo", masked here as a client must.
    wire = frame(TEXT, b"Hel", fin=False) + frame(CONTINUATION, b"lo")
    assert FrameReader().receive_data(wire) == [b"Hello"]
    reader = FrameReader()
    assert reader.receive_data(wire[:9]) == [b"Hel"]
    assert reader.opcode == TEXT
    assert reader.receive_data(wire[9:]) == [b"lo"]
    assert reader.opcode is None


def test_rfc_ping_and_pong() -> None:
    # §5.7's masked "Hello" pong is ignored; the same frame as a ping is reported.
    pong = bytes.fromhex("8a8537fa213d7f9f4d5158")
    assert FrameReader().receive_data(pong) == []
    assert FrameReader().receive_data(b"\x89" + pong[1:]) == [PeerPing(b"Hello")]


def test_rfc_256_bytes_in_16_bit_length() -> None:
    payload = bytes(range(256))
    wire = frame(BINARY, payload)
    assert wire[:4] == b"\x82\xfe\x01\x00"
    assert FrameReader().receive_data(wire) == [payload]


def test_rfc_64_kib_in_64_bit_length_streamed() -> None:
    payload = bytes(range(256)) * 256
    wire = frame(BINARY, payload)
    assert wire[:10] == b"\x82\xff\x00\x00\x00\x00\x00\x01\x00\x00"
    reader = FrameReader()
    pieces = [reader.receive_data(wire[i : i + 4093]) for i in range(0, len(wire), 4093)]
    # Streamed: every chunk's payload comes out at once, unmasked.
    assert all(len(p) == 1 for p in pieces[1:])
    assert merged(e for p in pieces for e in p) == [payload]


def test_empty_frames_and_messages() -> None:
    wire = (
        frame(TEXT, b"")
        + frame(BINARY, b"", fin=False)
        + frame(CONTINUATION, b"")
        + frame(PING)
        + frame(TEXT, b"a", fin=False)
        + frame(CONTINUATION, b"", fin=False)
        + frame(CONTINUATION, b"b")
    )
    assert FrameReader().receive_data(wire) == [PeerPing(b""), b"ab"]


def test_data_is_joined_between_control_frames() -> None:
    wire = frame(TEXT, b"a") + frame(BINARY, b"b") + frame(PONG, b"x") + frame(TEXT, b"c")
    wire += frame(PING, b"p") + frame(TEXT, b"d")
    assert FrameReader().receive_data(wire) == [b"abc", PeerPing(b"p"), b"d"]


def test_control_frames_between_fragments() -> None:
    wire = (
        frame(TEXT, b"he", fin=False)
        + frame(PING, b"1")
        + frame(CONTINUATION, b"ll", fin=False)
        + frame(PONG, b"2")
        + frame(CONTINUATION, b"o")
        + frame(CLOSE, close_body(1000, b"done"))
    )
    expected = [b"he", PeerPing(b"1"), b"llo", PeerClose(1000, "done")]
    assert FrameReader().receive_data(wire) == expected
    assert ours(wire, range(len(wire)))[0].events == expected


def test_close_mid_message_ends_it() -> None:
    wire = frame(TEXT, b"he\xc3", fin=False) + frame(CLOSE) + frame(TEXT, b"\xff")
    reader = FrameReader()
    assert reader.receive_data(wire) == [b"he\xc3", PeerClose(None, "")]
    assert reader.receive_data(frame(TEXT, b"\xff")) == []
    assert reader.receive_data(b"\xff" * 20) == []


def test_any_mask_and_offset() -> None:
    # Pieces up to 1 KiB and beyond (unmasked two ways), starting at any mask offset.
    payload = bytes(range(256)) * 12
    for key in (b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x02\x03\x04"):
        wire = frame(BINARY, payload, key=key)
        for step in (1, 2, 3, 5, 7, 100, 1023, 1025, 2001, 4000):
            out, _ = ours(wire, range(0, len(wire), step))
            assert out.events == [payload]


# -- violations: our code == wsproto's code ----------------------------------------------------

BAD_FRAMES = [
    pytest.param(frame(TEXT, b"hi", masked=False), 1002, id="unmasked"),
    pytest.param(frame(PING, b"", masked=False), 1002, id="unmasked-ping"),
    *(
        pytest.param(frame(TEXT, b"hi", rsv=bit), 1002, id=f"rsv{4 - bit.bit_length()}")
        for bit in (4, 2, 1)
    ),
    pytest.param(frame(PING, b"", rsv=4), 1002, id="rsv1-ping"),
    *(
        pytest.param(frame(op, b"hi"), 1002, id=f"opcode-{op:#x}")
        for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)
    ),
    pytest.param(frame(PING, b"x", fin=False), 1002, id="ping-no-fin"),
    pytest.param(frame(CLOSE, b"", fin=False), 1002, id="close-no-fin"),
    pytest.param(frame(PONG, b"", fin=False), 1002, id="pong-no-fin"),
    pytest.param(frame(PING, b"x" * 126), 1002, id="ping-126"),
    pytest.param(frame(PONG, b"x" * 200, form=127, length=70000), 1002, id="pong-127"),
    pytest.param(frame(CLOSE, b"\x03\xe8" + b"x" * 124), 1002, id="close-126"),
    pytest.param(frame(CONTINUATION, b"x"), 1002, id="continuation-first"),
    pytest.param(frame(CONTINUATION, b""), 1002, id="continuation-first-empty"),
    pytest.param(
        frame(TEXT, b"a") + frame(CONTINUATION, b"b"), 1002, id="continuation-after-message"
    ),
    pytest.param(frame(TEXT, b"a", fin=False) + frame(TEXT, b"b"), 1002, id="text-in-text"),
    pytest.param(frame(TEXT, b"a", fin=False) + frame(BINARY, b"b"), 1002, id="binary-in-text"),
    pytest.param(frame(BINARY, b"a", fin=False) + frame(TEXT, b"b"), 1002, id="text-in-binary"),
    pytest.param(frame(BINARY, b"", form=127, length=1 << 63) + b"x", 1002, id="64-bit-length-msb"),
    pytest.param(frame(BINARY, b"x" * 5, form=126), 1002, id="non-minimal-16"),
    pytest.param(frame(BINARY, b"x" * 125, form=126), 1002, id="non-minimal-16-125"),
    pytest.param(frame(BINARY, b"x" * 200, form=127), 1002, id="non-minimal-64"),
    pytest.param(frame(BINARY, b"x" * 65535, form=127), 1002, id="non-minimal-64-65535"),
    pytest.param(frame(CLOSE, b"\x03"), 1002, id="close-1-byte"),
    *(
        pytest.param(frame(CLOSE, close_body(code)), 1002, id=f"close-code-{code}")
        for code in INVALID_CLOSE_CODES
    ),
    pytest.param(frame(CLOSE, close_body(1000, b"\xff")), 1007, id="close-reason-not-utf8"),
    pytest.param(
        frame(CLOSE, close_body(1000, b"\xed\xa0\x80")), 1007, id="close-reason-surrogate"
    ),
    pytest.param(frame(CLOSE, close_body(1000, b"ok\xc3")), 1007, id="close-reason-truncated"),
    pytest.param(frame(TEXT, b"\xff"), 1007, id="text-ff"),
    pytest.param(frame(TEXT, b"abc\xc3"), 1007, id="text-truncated"),
    pytest.param(frame(TEXT, b"\xed\xa0\x80"), 1007, id="text-surrogate"),
    pytest.param(frame(TEXT, b"\xc0\xaf"), 1007, id="text-overlong"),
    pytest.param(frame(TEXT, b"\xf4\x90\x80\x80"), 1007, id="text-above-u10ffff"),
    pytest.param(frame(TEXT, b"ok\xe2\x82", fin=False) + frame(CONTINUATION, b"A"), 1007),
    pytest.param(
        frame(TEXT, b"ok\xe2", fin=False) + frame(CONTINUATION, b""), 1007, id="text-empty-final"
    ),
    pytest.param(
        frame(TEXT, b"\xe2\x82", fin=False) + frame(PING) + frame(CONTINUATION, b"\xac\xff"),
        1007,
        id="text-invalid-after-ping",
    ),
    # Errors after good frames: the bad frame, not the stream, is judged.
    pytest.param(frame(TEXT, b"fine") + frame(PING, b"p") + frame(TEXT, b"\xff"), 1007),
    pytest.param(frame(BINARY, b"\xff") + frame(TEXT, b"x", masked=False), 1002),
]


@pytest.mark.parametrize(("wire", "code"), BAD_FRAMES)
def test_violation_codes_match_wsproto(wire: bytes, code: int) -> None:
    assert wsproto_server(wire).code == code
    assert error_code(wire) == code
    assert error_code(wire, range(len(wire))) == code


@pytest.mark.parametrize("code", VALID_CLOSE_CODES)
def test_valid_close_codes_match_wsproto(code: int) -> None:
    wire = frame(CLOSE, close_body(code, "bye é".encode()))
    assert wsproto_server(wire).events == [PeerClose(code, "bye é")]
    assert FrameReader().receive_data(wire) == [PeerClose(code, "bye é")]


def test_close_1014_departs_from_wsproto() -> None:
    # 1014 "Bad Gateway" is in the IANA close code registry (RFC 6455 §11.7), as are 1012
    # and 1013 which wsproto accepts; it refuses 1014 only because its enum ends at 1013.
    wire = frame(CLOSE, close_body(1014, b"upstream"))
    assert (wsproto_server(wire).code, wsproto_server(wire).message) == (1002, WSPROTO_UNKNOWN_CODE)
    assert FrameReader().receive_data(wire) == [PeerClose(1014, "upstream")]


def test_out_of_order_data_frame_fails_at_its_header() -> None:
    # wsproto needs one payload byte to say so; the header suffices.
    wire = frame(TEXT, b"a", fin=False) + frame(TEXT, b"b")
    header = wire[: len(wire) - 1]
    assert wsproto_server(header).code is None
    assert wsproto_server(wire).code == 1002
    outcome, _ = ours(header)
    assert (outcome.code, outcome.events) == (1002, [])
    assert outcome.message in OUT_OF_ORDER


def test_dead_after_an_error() -> None:
    reader = FrameReader()
    with pytest.raises(WebSocketError) as first:
        reader.receive_data(frame(TEXT, b"ok") + frame(TEXT, b"\xff"))
    assert first.value.code == 1007
    for data in (b"", frame(TEXT, b"fine")):
        with pytest.raises(WebSocketError) as again:
            reader.receive_data(data)
        assert again.value.code == 1007
        assert again.value is not first.value


def test_nothing_after_a_close() -> None:
    reader = FrameReader()
    wire = frame(TEXT, b"x") + frame(CLOSE, close_body(1001)) + frame(TEXT, b"\xff")
    assert reader.receive_data(wire) == [b"x", PeerClose(1001, "")]
    assert reader.receive_data(frame(CONTINUATION, b"bad", masked=False)) == []


def test_is_a_transport_error() -> None:
    from hubserver.transports import TransportError

    assert issubclass(WebSocketError, TransportError)


# -- fuzz: our reader and wsproto agree --------------------------------------------------------


@st.composite
def client_frames(draw: st.DrawFn) -> bytes:
    """One frame, usually valid, each field sometimes wrong."""
    opcode = draw(
        st.sampled_from([TEXT, BINARY, CONTINUATION, PING, PONG, CLOSE]) | st.integers(0, 15)
    )
    if opcode == CLOSE:
        code = st.sampled_from([*VALID_CLOSE_CODES, *INVALID_CLOSE_CODES, 1014])
        reason = st.text(max_size=10).map(str.encode) | st.binary(max_size=6)
        payload = draw(st.just(b"") | st.builds(close_body, code, reason) | st.binary(max_size=3))
    else:
        payload = draw(
            st.text(max_size=20).map(str.encode)
            | st.binary(max_size=20)
            | st.sampled_from([b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"\xed\xa0\x80", b"\xf0"])
            | st.binary(min_size=126, max_size=300)
        )
    wrong = draw(st.sampled_from(["none"] * 8 + ["rsv", "unmasked", "form", "length"]))
    return frame(
        opcode,
        payload,
        fin=draw(st.booleans()) if opcode < 8 else draw(st.sampled_from([True] * 5 + [False])),
        rsv=draw(st.integers(1, 7)) if wrong == "rsv" else 0,
        masked=wrong != "unmasked",
        key=draw(st.binary(min_size=4, max_size=4)),
        form=draw(st.sampled_from([126, 127])) if wrong == "form" else None,
        length=draw(st.integers(0, (1 << 64) - 1)) if wrong == "length" else None,
    )


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(b"".join(draw(st.lists(client_frames(), min_size=1, max_size=6))))
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.integers(0, len(data) - 1))
        data[where] ^= 1 << draw(st.integers(0, 7))
    return bytes(data[: draw(st.integers(0, len(data))) if draw(st.booleans()) else len(data)])


def assert_agree(data: bytes, cuts: Iterable[int]) -> None:
    """Same verdict and close code as wsproto's server; ``ours`` lets anything but
    WebSocketError escape, so raising anything else fails the test."""
    theirs = wsproto_server(data)
    mine, reader = ours(data, cuts)
    if mine.code is not None and theirs.code is None:
        # Ours fails a data frame out of order at its header, wsproto at its first byte.
        assert mine.message in OUT_OF_ORDER
        assert wsproto_server(data + b"\x00").code == mine.code
        return
    if theirs.message == WSPROTO_UNKNOWN_CODE and mine.message.startswith("Close reason"):
        # Code 1014 passed our check and failed wsproto's; the reason failed ours.
        assert mine.code == 1007
        return
    if theirs.message == WSPROTO_UNKNOWN_CODE and mine.code is None:
        # 1014 is a valid close code (see test_close_1014_departs_from_wsproto).
        last = mine.events[-1]
        assert isinstance(last, PeerClose)
        assert last.code == 1014
        return
    assert mine.code == theirs.code, (mine.message, theirs.message)
    if mine.code is not None:
        return
    # wsproto keeps a split code point back until the rest arrives; we return bytes.
    split = len(mine.data) - len(theirs.data)
    assert mine.data.startswith(theirs.data)
    assert split == 0 or (0 < split <= 3 and reader.opcode == TEXT)
    assert [e for e in mine.events if not isinstance(e, bytes)] == [
        e for e in theirs.events if not isinstance(e, bytes)
    ]


@given(mutated(), st.lists(st.integers(0, 1000), max_size=8))
@example(frame(BINARY, b"", form=127, length=(1 << 63) + 5) + b"x", [])
@example(frame(TEXT, b"a", fin=False) + frame(CONTINUATION, b"\xff"), [3])
@example(frame(CLOSE, close_body(1014)), [])
@example(frame(CLOSE, close_body(1014, b"\x80")), [])
@example(frame(TEXT, b"a", fin=False) + frame(TEXT, b"b")[:-1], [])
def test_fuzz_agrees_with_wsproto(data: bytes, cuts: list[int]) -> None:
    assert_agree(data, cuts)


@given(st.binary(max_size=64), st.lists(st.integers(0, 64), max_size=4))
def test_random_bytes_agree_with_wsproto(data: bytes, cuts: list[int]) -> None:
    assert_agree(data, cuts)


# -- UTF-8 across boundaries -------------------------------------------------------------------


def test_utf8_split_across_chunks_and_fragments() -> None:
    text = "é€😀 ok".encode()
    wire = frame(TEXT, text)
    assert ours(wire, range(len(wire)))[0].events == [text]
    # Fragments cut inside code points, with a ping between two halves of one.
    wire = (
        frame(TEXT, text[:1], fin=False)
        + frame(CONTINUATION, text[1:4], fin=False)
        + frame(PING, b"!")
        + frame(CONTINUATION, text[4:7], fin=False)
        + frame(CONTINUATION, text[7:])
    )
    assert FrameReader().receive_data(wire) == [text[:4], PeerPing(b"!"), text[4:]]
    assert ours(wire, range(len(wire)))[0].events == [text[:4], PeerPing(b"!"), text[4:]]


def test_invalid_utf8_in_binary_is_fine() -> None:
    payload = b"\xff\xed\xa0\x80\xc3"
    assert FrameReader().receive_data(frame(BINARY, payload)) == [payload]


@given(
    st.binary(max_size=40) | st.text(max_size=20).map(str.encode),
    st.lists(st.integers(0, 40), max_size=4),
    st.lists(st.integers(0, 80), max_size=6),
)
def test_text_is_checked_whatever_the_boundaries(
    payload: bytes, fragment_cuts: list[int], chunk_cuts: list[int]
) -> None:
    """A text message is accepted iff its bytes are UTF-8, however fragmented and chunked."""
    parts = chunks(payload, fragment_cuts)
    wire = b"".join(
        frame(TEXT if i == 0 else CONTINUATION, part, fin=i == len(parts) - 1)
        for i, part in enumerate(parts)
    )
    try:
        payload.decode()
    except UnicodeDecodeError:
        valid = False
    else:
        valid = True
    outcome, _ = ours(wire, chunk_cuts)
    assert outcome.code == (None if valid else 1007)
    if valid:
        assert outcome.data == payload
    assert wsproto_server(wire).code == outcome.code


# -- idle state --------------------------------------------------------------------------------


def test_idle_reader_holds_no_buffers() -> None:
    reader = FrameReader()
    for data in (frame(TEXT, "é".encode() * 300), frame(BINARY, b"x" * 70000) + frame(PING)):
        assert ours(data, range(0, len(data), 1000))[0].code is None
        reader.receive_data(data)
        values = [getattr(reader, name) for name in FrameReader.__slots__]
        # Shared constants only: None, b"", 0 and the booleans.
        assert all(v is None or isinstance(v, bool) or v in (b"", 0) for v in values), values
    assert not hasattr(reader, "__dict__")
    assert sys.getsizeof(reader) <= 128


# -- what the server sends ---------------------------------------------------------------------


def test_pong_frame() -> None:
    assert pong_frame(b"") == b"\x8a\x00"
    assert pong_frame(b"Hello") == b"\x8a\x05Hello"
    assert wsproto_client(pong_frame(b"x" * 125)) == [Pong(payload=b"x" * 125)]
    with pytest.raises(ValueError):
        pong_frame(b"x" * 126)


def test_close_frame() -> None:
    assert close_frame(1000) == b"\x88\x02\x03\xe8"
    assert close_frame(None) == b"\x88\x00"
    assert wsproto_client(close_frame(1002, "bad frame")) == [
        CloseConnection(code=1002, reason="bad frame")
    ]
    assert wsproto_client(close_frame(None)) == [CloseConnection(code=1005, reason="")]
    assert wsproto_client(close_frame(4000)) == [CloseConnection(code=4000, reason="")]
    # Cut to 123 bytes, at a code point boundary.
    assert wsproto_client(close_frame(1011, "€" * 50)) == [
        CloseConnection(code=1011, reason="€" * 41)
    ]
    assert wsproto_client(close_frame(1011, "a" + "€" * 50)) == [
        CloseConnection(code=1011, reason="a" + "€" * 40)
    ]
    for code in (1005, 1006, 1015, 999, 5000):
        with pytest.raises(ValueError):
            close_frame(code)
    with pytest.raises(ValueError):
        close_frame(None, "no code")


def test_close_reply_echoes_the_code_only() -> None:
    assert close_reply(PeerClose(1001, "going")) == close_frame(1001)
    assert wsproto_client(close_reply(PeerClose(3000, "x"))) == [
        CloseConnection(code=3000, reason="")
    ]
    assert close_reply(PeerClose(None, "")) == b"\x88\x00"
    assert wsproto_client(close_reply(PeerClose(None, ""))) == [
        CloseConnection(code=1005, reason="")
    ]


@given(st.sampled_from([*VALID_CLOSE_CODES, 1014]), st.text(max_size=60))
def test_close_frames_round_trip_through_the_reader(code: int, reason: str) -> None:
    # The server's frames are unmasked; masked, the reader takes them back.
    sent = close_frame(code, reason)
    body = sent[2:]
    close = FrameReader().receive_data(frame(CLOSE, body))
    assert close == [PeerClose(code, body[2:].decode())]
    assert reason.encode().startswith(body[2:])
