"""What one publish's HTTP/1.1 request/response cycle costs in h11, by way of answering.

    python -m bench.core.h11_cycle [--cycles 20000] [--rounds 5]

No sockets, no loop: a typical one-event publish request (a ~860-character
RS256 bearer token, four headers, a ~300-byte body) goes through h11 and a
202 comes back, in the ways a server can keep h11's state machine right:

* ``h11 send``: parse, then ``conn.send`` a new ``Response``, the body and
  ``EndOfMessage``, then ``start_next_cycle`` (what the front did before
  issue #10);
* ``h11 send, cached Response``: the same with one ``Response`` made once;
* ``fresh parser``: parse with a new ``h11.Connection`` per request and write
  the answer from a byte template, outside h11 (what the front does now:
  each parser sees exactly one request, so its state never disagrees with
  what was written);
* ``parse only``: the head, the body and its end, nothing else (the floor).

Prints the median CPU microseconds per cycle (``time.process_time``) of
``--rounds`` rounds. A hot loop: in a busy server the same code costs about
twice as much (caches, branch predictors); compare the rows, not the
absolute figures with the server's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time
from collections.abc import Callable
from typing import Final

import h11

__all__ = ["main"]

_BODY: Final = (
    b'{"n":1,"t":1700000000000000000,"id":"site-00000-1","site_id":"site-00000",'
    b'"user_id":"user-17","event_type":"access_granted","door_id":"door-3",'
    b'"lock_id":"lock-3","credential":"card","direction":"in",'
    b'"time":"2026-01-01T08:00:00.000Z","location":"North entrance, level 1"}'
)
_TOKEN: Final = b"eyJhbGciOiJSUzI1NiIsImtpZCI6ImRldiJ9." + b"x" * 480 + b"." + b"y" * 342
_REQUEST: Final = (
    b"POST /v1/events/entries HTTP/1.1\r\nHost: 127.0.0.1:5000\r\nAuthorization: Bearer "
    + _TOKEN
    + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(_BODY)
    + _BODY
)
_ANSWER: Final = b'{"accepted":1,"ids":["site-00000-1"],"seqs":[1]}'
_HEADERS: Final = [
    (b"server", b"hubserver"),
    (b"content-type", b"application/json"),
    (b"content-length", b"%d" % len(_ANSWER)),
    (b"cache-control", b"no-store"),
]
_TEMPLATE: Final = (
    b"HTTP/1.1 202 Accepted\r\nserver: hubserver\r\ncontent-type: application/json\r\n"
    b"cache-control: no-store\r\ncontent-length: "
)


def _parser() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)


def _parse(conn: h11.Connection) -> None:
    conn.receive_data(_REQUEST)
    if type(conn.next_event()) is not h11.Request:
        raise AssertionError("no request")
    if type(conn.next_event()) is not h11.Data:
        raise AssertionError("no body")
    if type(conn.next_event()) is not h11.EndOfMessage:
        raise AssertionError("no end")


def _h11_send(conn: h11.Connection) -> bytes:
    _parse(conn)
    response = h11.Response(status_code=202, headers=_HEADERS, reason=b"Accepted")
    data = conn.send(response) + conn.send(h11.Data(data=_ANSWER)) + conn.send(h11.EndOfMessage())
    conn.start_next_cycle()
    return data


_CACHED: Final = h11.Response(status_code=202, headers=_HEADERS, reason=b"Accepted")
_END: Final = h11.EndOfMessage()


def _h11_send_cached(conn: h11.Connection) -> bytes:
    _parse(conn)
    data = conn.send(_CACHED) + conn.send(h11.Data(data=_ANSWER)) + conn.send(_END)
    conn.start_next_cycle()
    return data


def _fresh_parser(_: h11.Connection) -> bytes:
    conn = _parser()
    _parse(conn)
    return b"%b%d\r\n\r\n%b" % (_TEMPLATE, len(_ANSWER), _ANSWER)


def _parse_only(_: h11.Connection) -> bytes:
    _parse(_parser())
    return b""


WAYS: Final[dict[str, Callable[[h11.Connection], bytes]]] = {
    "h11 send": _h11_send,
    "h11 send, cached Response": _h11_send_cached,
    "fresh parser, byte template": _fresh_parser,
    "parse only": _parse_only,
}


def measure(way: Callable[[h11.Connection], bytes], cycles: int, rounds: int) -> float:
    """Median CPU microseconds per cycle over ``rounds``."""
    results = []
    for _ in range(rounds):
        conn = _parser()
        way(conn)  # warm, and the connection's first cycle
        started = time.process_time()
        for _ in range(cycles):
            way(conn)
        results.append((time.process_time() - started) / cycles * 1e6)
    return statistics.median(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.core.h11_cycle", description=__doc__)
    parser.add_argument("--cycles", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    h11_version = importlib.metadata.version("h11")
    print(f"h11 {h11_version}, python {sys.version.split()[0]}, request {len(_REQUEST)} B")
    for name, way in WAYS.items():
        print(f"{name:30} {measure(way, args.cycles, args.rounds):6.1f} us per cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
