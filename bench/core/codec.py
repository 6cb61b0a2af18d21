"""The ``codec`` profile: hubcore's codecs against aiosignalr's, no sockets, no loop.

The message is the typical event (``bench.workload``): ``ReceiveMessage`` with
one ~320-byte JSON text, fire-and-forget, no headers, over a seeded set of
distinct events. For each protocol it times:

* encode: build the message and write one record, per event;
* parse: feed one record to a connection's reader and take the message out;
* broadcast encode (hubcore only): ``PreparedMessage(Invocation(...)).encoded(protocol)``,
  the cost of a broadcast paid once whatever the number of recipients;
* broadcast per-recipient (hubcore only): ``encoded(protocol)`` again on a
  prepared message, the cost paid once per recipient.

Before anything is timed, every event must survive hubcore -> peer,
hubcore -> hubcore and peer -> hubcore unchanged; otherwise ``CodecMismatch``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from aiosignalr.messages import InvocationMessage
from aiosignalr.protocol.base import IHubProtocol
from aiosignalr.protocol.json_protocol import JSONProtocol
from aiosignalr.protocol.messagepack_protocol import MessagePackProtocol

import hubcore
from bench.profile import BenchError, Profile
from bench.report import JsonValue, Outcome, Progress, Table
from bench.timing import Case, Contender, Samples, loop_overhead, run_interleaved
from bench.workload import TARGET, access_entries
from hubcore import Invocation

__all__ = [
    "BAR",
    "PROFILE",
    "PROTOCOLS",
    "CodecMismatch",
    "CodecRun",
    "verify_codecs",
]

PROTOCOLS: Final = ("json", "messagepack")
#: The target from the issue: the table judges every row against it.
BAR: Final = "hubcore >= 1.5x peer on every row; broadcast encode < 5 us"
MIN_RATIO: Final = 1.5
MAX_BROADCAST_ENCODE_SECONDS: Final = 5e-6

DEFAULT_EVENTS: Final = 1_000
DEFAULT_SEED: Final = 1
DEFAULT_ROUNDS: Final = 5
DEFAULT_SECONDS_PER_RUN: Final = 0.3

_PEER_PROTOCOLS: Final[Mapping[str, Callable[[], IHubProtocol]]] = {
    "json": JSONProtocol,
    "messagepack": MessagePackProtocol,
}

Operation: TypeAlias = Literal["encode", "parse", "broadcast encode", "broadcast per-recipient"]
OPERATIONS: Final[tuple[Operation, ...]] = (
    "encode",
    "parse",
    "broadcast encode",
    "broadcast per-recipient",
)
# How each operation is shown: a rate, or a time per message in a given unit.
_UNITS: Final[Mapping[Operation, tuple[str, float]]] = {
    "encode": ("msg/s", 1.0),
    "parse": ("msg/s", 1.0),
    "broadcast encode": ("us", 1e6),
    "broadcast per-recipient": ("ns", 1e9),
}


class CodecMismatch(BenchError):
    """An implementation's output does not carry the event it was given."""


# -- correctness ---------------------------------------------------------------


def _first_difference(expected: str, got: str) -> int:
    for index, (a, b) in enumerate(zip(expected, got, strict=False)):
        if a != b:
            return index
    return min(len(expected), len(got))


def _mismatch(text: str, messages: Sequence[object]) -> str | None:
    """What is wrong with ``messages`` as the parse of the event ``text``; None if nothing."""
    if len(messages) != 1:
        return f"expected 1 message, got {len(messages)}"
    message = messages[0]
    if type(message) not in (Invocation, InvocationMessage):
        return f"expected an invocation, got {type(message).__name__}"
    target = getattr(message, "target", None)
    if target != TARGET:
        return f"expected target {TARGET!r}, got {target!r}"
    if getattr(message, "invocation_id", None) is not None:
        return "expected a fire-and-forget invocation (no invocation id)"
    if getattr(message, "headers", None) or getattr(message, "stream_ids", None):
        return "expected no headers and no stream ids"
    arguments = tuple(getattr(message, "arguments", ()))
    if len(arguments) != 1 or type(arguments[0]) is not str:
        return f"expected one str argument, got {[type(a).__name__ for a in arguments]}"
    got: str = arguments[0]
    if got == text:
        return None
    at = _first_difference(text, got)
    return (
        f"the argument differs from the event text at character {at}: "
        f"expected {text[at : at + 20]!r}, got {got[at : at + 20]!r}"
    )


def _hubcore_parse_all(reader: hubcore.MessageReader, record: bytes) -> list[object]:
    reader.feed(record)
    messages: list[object] = []
    while (message := reader.next_message()) is not None:
        messages.append(message)
    return messages


def verify_codecs(texts: Sequence[str], protocol_name: str) -> None:
    """Check that every event crosses both implementations unchanged.

    For each text: hubcore's record parses to the same text in the peer and in
    hubcore (the parse rows' input), the peer's record parses to it in hubcore,
    and the broadcast path writes the same bytes as ``write_message``.

    Raises:
        CodecMismatch: the first event that does not survive, and where.
    """
    hub = hubcore.get_protocol(protocol_name)
    peer = _PEER_PROTOCOLS[protocol_name]()
    hub_parse = functools.partial(_hubcore_parse_all, hub.reader())
    peer_parser = peer.create_parser()
    for index, text in enumerate(texts):
        hub_record = hub.write_message(Invocation(target=TARGET, arguments=(text,)))
        peer_record = peer.write_message(InvocationMessage(target=TARGET, arguments=(text,)))
        prepared = hubcore.PreparedMessage(Invocation(target=TARGET, arguments=(text,)))
        broadcast = prepared.encoded(hub)
        if broadcast != hub_record:
            raise CodecMismatch(
                f"{protocol_name}: event {index}: PreparedMessage(...).encoded() wrote other "
                "bytes than write_message()"
            )
        paths: tuple[tuple[str, bytes, Callable[[bytes], Sequence[object]]], ...] = (
            ("hubcore -> peer", hub_record, peer_parser.feed),
            ("hubcore -> hubcore", hub_record, hub_parse),
            ("peer -> hubcore", peer_record, hub_parse),
        )
        for path, record, parse in paths:
            try:
                messages = parse(record)
            except Exception as exc:  # whatever a broken codec raises, the run is void
                raise CodecMismatch(
                    f"{protocol_name}: {path}: event {index} does not parse: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            problem = _mismatch(text, messages)
            if problem is not None:
                raise CodecMismatch(f"{protocol_name}: {path}: event {index}: {problem}")


# -- workloads -----------------------------------------------------------------
# Both implementations get the same loop shape: methods bound once outside the
# loop, the message built inside it.


def _hubcore_encode(protocol: hubcore.HubProtocol, texts: Sequence[str]) -> Callable[[], None]:
    write, target = protocol.write_message, TARGET

    def run_pass() -> None:
        for text in texts:
            write(Invocation(target=target, arguments=(text,)))

    return run_pass


def _peer_encode(protocol: IHubProtocol, texts: Sequence[str]) -> Callable[[], None]:
    write, target = protocol.write_message, TARGET

    def run_pass() -> None:
        for text in texts:
            write(InvocationMessage(target=target, arguments=(text,)))

    return run_pass


def _hubcore_parse(protocol: hubcore.HubProtocol, records: Sequence[bytes]) -> Callable[[], None]:
    reader = protocol.reader()
    feed, next_message = reader.feed, reader.next_message

    def run_pass() -> None:
        for record in records:
            feed(record)
            next_message()

    return run_pass


def _peer_parse(protocol: IHubProtocol, records: Sequence[bytes]) -> Callable[[], None]:
    feed = protocol.create_parser().feed

    def run_pass() -> None:
        for record in records:
            feed(record)

    return run_pass


def _broadcast_encode(protocol: hubcore.HubProtocol, texts: Sequence[str]) -> Callable[[], None]:
    prepare, target = hubcore.PreparedMessage, TARGET

    def run_pass() -> None:
        for text in texts:
            prepare(Invocation(target=target, arguments=(text,))).encoded(protocol)

    return run_pass


def _broadcast_per_recipient(
    protocol: hubcore.HubProtocol, texts: Sequence[str]
) -> Callable[[], None]:
    prepared = [
        hubcore.PreparedMessage(Invocation(target=TARGET, arguments=(text,))) for text in texts
    ]
    for message in prepared:
        message.encoded(protocol)

    def run_pass() -> None:
        for message in prepared:
            message.encoded(protocol)

    return run_pass


def _case_name(protocol_name: str, operation: Operation) -> str:
    return f"{protocol_name} {operation}"


def _cases(protocol_name: str, texts: Sequence[str]) -> list[Case]:
    hub = hubcore.get_protocol(protocol_name)
    peer = _PEER_PROTOCOLS[protocol_name]()
    # Both parsers read the same bytes: hubcore's records, in ASP.NET Core's layout.
    records = [hub.write_message(Invocation(target=TARGET, arguments=(text,))) for text in texts]
    n = len(texts)

    def case(operation: Operation, *contenders: tuple[str, Callable[[], None]]) -> Case:
        return Case(
            _case_name(protocol_name, operation),
            tuple(Contender(label, run_pass, n) for label, run_pass in contenders),
        )

    return [
        case(
            "encode",
            ("hubcore", _hubcore_encode(hub, texts)),
            ("peer", _peer_encode(peer, texts)),
        ),
        case(
            "parse",
            ("hubcore", _hubcore_parse(hub, records)),
            ("peer", _peer_parse(peer, records)),
        ),
        case("broadcast encode", ("hubcore", _broadcast_encode(hub, texts))),
        case("broadcast per-recipient", ("hubcore", _broadcast_per_recipient(hub, texts))),
    ]


# -- results -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Row:
    protocol: str
    operation: Operation
    hubcore: Samples
    peer: Samples | None

    @property
    def unit(self) -> str:
        return _UNITS[self.operation][0]

    def values(self, samples: Samples) -> list[float]:
        """The samples in this row's unit."""
        unit, scale = _UNITS[self.operation]
        if unit == "msg/s":
            return [1.0 / seconds for seconds in samples.seconds_per_op]
        return [seconds * scale for seconds in samples.seconds_per_op]

    def median(self, samples: Samples) -> float:
        return statistics.median(self.values(samples))

    @property
    def ratio(self) -> float | None:
        """hubcore / peer, as a speed (higher is better for hubcore)."""
        if self.peer is None:
            return None
        return self.median(self.hubcore) / self.median(self.peer)

    @property
    def round_ratios(self) -> list[JsonValue] | None:
        """hubcore / peer within each round: the two ran back to back, so noise mostly cancels."""
        if self.peer is None:
            return None
        pairs = zip(self.values(self.hubcore), self.values(self.peer), strict=True)
        return [hub / peer for hub, peer in pairs]

    @property
    def spread(self) -> float:
        return max(s.spread for s in (self.hubcore, self.peer) if s is not None)

    @property
    def bar(self) -> str | None:
        if self.peer is not None:
            return f">= {MIN_RATIO}x"
        if self.operation == "broadcast encode":
            return f"< {MAX_BROADCAST_ENCODE_SECONDS * 1e6:g} us"
        return None

    @property
    def passed(self) -> bool | None:
        ratio = self.ratio
        if ratio is not None:
            return ratio >= MIN_RATIO
        if self.operation == "broadcast encode":
            return self.hubcore.median < MAX_BROADCAST_ENCODE_SECONDS
        return None

    def format(self, samples: Samples | None) -> str:
        if samples is None:
            return "-"
        value = self.median(samples)
        if self.unit == "msg/s":
            return f"{value:,.0f} msg/s"
        if self.unit == "us":
            return f"{value:.2f} us"
        return f"{value:.0f} ns"

    def cells(self) -> tuple[str, ...]:
        ratio = self.ratio
        passed = self.passed
        return (
            self.operation,
            self.protocol,
            self.format(self.hubcore),
            self.format(self.peer),
            "-" if ratio is None else f"{ratio:.2f}x",
            f"{self.spread:.0%}",
            self.bar or "-",
            "" if passed is None else ("PASS" if passed else "FAIL"),
        )

    def to_json(self) -> dict[str, JsonValue]:
        def side(samples: Samples | None) -> JsonValue:
            if samples is None:
                return None
            values = self.values(samples)
            best = max(values) if self.unit == "msg/s" else min(values)
            return {"median": self.median(samples), "best": best, "samples": list(values)}

        return {
            "name": _case_name(self.protocol, self.operation),
            "operation": self.operation,
            "protocol": self.protocol,
            "unit": self.unit,
            "hubcore": side(self.hubcore),
            "peer": side(self.peer),
            "ratio": self.ratio,
            "round_ratios": self.round_ratios,
            "spread": self.spread,
            "bar": self.bar,
            "passed": self.passed,
        }


_COLUMNS: Final = (
    "row",
    "protocol",
    "hubcore",
    "peer",
    "hubcore/peer",
    "spread",
    "bar",
    "verdict",
)


def _size_summary(sizes: Sequence[int]) -> str:
    return f"{min(sizes)}/{statistics.median(sizes):g}/{max(sizes)} B"


def _workload(texts: Sequence[str]) -> dict[str, JsonValue]:
    workload: dict[str, JsonValue] = {
        "message": f"Invocation {TARGET}(text), fire-and-forget, no headers",
        "text (min/median/max)": _size_summary([len(t.encode()) for t in texts]),
    }
    for name in PROTOCOLS:
        hub, peer = hubcore.get_protocol(name), _PEER_PROTOCOLS[name]()
        hub_sizes = [
            len(hub.write_message(Invocation(target=TARGET, arguments=(t,)))) for t in texts
        ]
        peer_records = [
            peer.write_message(InvocationMessage(target=TARGET, arguments=(t,))) for t in texts
        ]
        workload[f"{name} record, hubcore"] = _size_summary(hub_sizes)
        workload[f"{name} record, peer"] = _size_summary([len(r) for r in peer_records])
    return workload


@dataclass(frozen=True, slots=True, kw_only=True)
class CodecRun:
    """One configured run of the ``codec`` profile."""

    events: int = DEFAULT_EVENTS
    seed: int = DEFAULT_SEED
    rounds: int = DEFAULT_ROUNDS
    seconds_per_run: float = DEFAULT_SECONDS_PER_RUN

    def __post_init__(self) -> None:
        if self.events < 1 or self.rounds < 1 or self.seconds_per_run < 0:
            raise ValueError("events and rounds must be >= 1 and seconds_per_run >= 0")

    @property
    def parameters(self) -> dict[str, JsonValue]:
        return {
            "events": self.events,
            "seed": self.seed,
            "rounds": self.rounds,
            "seconds_per_run": self.seconds_per_run,
            "protocols": list(PROTOCOLS),
            "peer": "aiosignalr (JSONProtocol, MessagePackProtocol)",
        }

    def execute(self, progress: Progress) -> Outcome:
        """Verify both codecs on every event, then time all rows interleaved.

        Raises:
            CodecMismatch: an event did not survive a round trip.
        """
        progress.update(
            f"codec: generating {self.events} events (seed {self.seed})", is_milestone=True
        )
        texts = access_entries(self.events, self.seed)
        for name in PROTOCOLS:
            progress.update(f"codec: verifying {name} on {self.events} events", is_milestone=True)
            verify_codecs(texts, name)
        cases = [case for name in PROTOCOLS for case in _cases(name, texts)]
        samples = run_interleaved(
            cases,
            rounds=self.rounds,
            seconds_per_run=self.seconds_per_run,
            progress=progress,
            prefix="codec",
        )
        progress.update("codec: measuring the timing loop itself")
        overhead = loop_overhead(texts, max(self.seconds_per_run / 4, 0.0))
        progress.clear()

        rows = [
            _Row(
                protocol=name,
                operation=operation,
                hubcore=samples[_case_name(name, operation), "hubcore"],
                peer=samples.get((_case_name(name, operation), "peer")),
            )
            for operation in OPERATIONS
            for name in PROTOCOLS
        ]
        judged = [row.passed for row in rows if row.passed is not None]
        notes = (
            f"each value is the median of {self.rounds} rounds; a round runs every row "
            f"(hubcore, then peer) for >= {self.seconds_per_run:g} s with the garbage "
            "collector off; spread = (max - min) / median over rounds, worse side",
            "encode builds the message in the loop: hubcore Invocation, peer InvocationMessage",
            "parse: both read hubcore's records (the same bytes); hubcore MessageReader.feed() "
            "+ next_message(), peer one connection-bound protocol's feed()",
            "broadcast rows are hubcore only: aiosignalr has no encode-once API",
            f"every row includes its for-loop, about {overhead * 1e9:.0f} ns per message",
            "--json adds every sample, the best run and the per-round hubcore/peer ratios",
            f"verified first: all {self.events} events survive hubcore -> peer, "
            "hubcore -> hubcore and peer -> hubcore in both protocols",
        )
        return Outcome(
            workload=_workload(texts),
            table=Table(
                _COLUMNS, tuple(row.cells() for row in rows), right_aligned=frozenset({2, 3, 4, 5})
            ),
            results=[row.to_json() for row in rows],
            notes=notes,
            bar=BAR,
            passed=all(judged),
        )


# -- command line --------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--events",
        type=_positive_int,
        default=DEFAULT_EVENTS,
        help="distinct events per pass (default %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="event seed (default %(default)s)"
    )
    parser.add_argument(
        "--rounds",
        type=_positive_int,
        default=DEFAULT_ROUNDS,
        help="interleaved rounds; each value is their median (default %(default)s)",
    )
    parser.add_argument(
        "--seconds-per-run",
        type=_non_negative_float,
        default=DEFAULT_SECONDS_PER_RUN,
        metavar="SECONDS",
        help="minimum time of one timed run (default %(default)s)",
    )


def _prepare(args: argparse.Namespace) -> CodecRun:
    return CodecRun(
        events=args.events,
        seed=args.seed,
        rounds=args.rounds,
        seconds_per_run=args.seconds_per_run,
    )


PROFILE: Final = Profile(
    name="codec",
    summary="encode/parse throughput of ReceiveMessage(event), hubcore vs aiosignalr",
    add_arguments=_add_arguments,
    prepare=_prepare,
)
