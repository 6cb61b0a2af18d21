"""Events on their way to subscribers: numbered, prepared once, grouped into deliveries."""

from __future__ import annotations

import itertools
import json
import math
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import orjson

from hubcore import HubProtocol, Invocation, PreparedBatch, PreparedMessage
from hubserver.backplane import NumberedEvent, PendingEvent

from ._events import PublishError
from ._groups import Hub

__all__ = [
    "MAX_SEQ",
    "Delivery",
    "StreamEvent",
    "Wire",
    "gap_message",
    "malformation",
    "to_pending",
    "to_stream_event",
]

#: The client method every event is delivered to (the reference's samples).
TARGET: Final = "ReceiveMessage"
#: Sent before a replay that cannot start where the client asked (history was trimmed).
GAP_TARGET: Final = "Gap"
#: The largest seq a subscriber can be given: JSON clients (JavaScript) read
#: numbers as doubles, exact up to 2^53.
MAX_SEQ: Final = 2**53


def _ids() -> Iterator[str]:
    """Ids for events published without one: unique across processes and restarts.

    A random 64-bit prefix per process and a counter: ``uuid4()`` reads the
    system's random source once per event, which a busy publish path feels.
    """
    prefix = secrets.token_hex(8)
    for n in itertools.count(1):
        yield f"{prefix}{n:x}"


_new_id = _ids().__next__


def _reset_ids() -> None:
    global _new_id
    _new_id = _ids().__next__  # a forked child must not repeat its parent's ids


os.register_at_fork(after_in_child=_reset_ids)
_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_HUBS: Final = {hub.value: hub for hub in Hub}


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEvent:
    """One numbered event, with its ``ReceiveMessage`` invocation prepared once.

    ``text`` is the event as compact JSON (with ``id`` and ``seq``).
    """

    hub: Hub
    site_id: str
    user_id: str | None
    event_id: str
    seq: int
    text: str
    message: PreparedMessage


def _is_finite(value: dict[str, object] | list[object]) -> bool:
    """Whether no float in ``value`` (already depth-checked) is NaN or infinite."""
    stack: list[dict[str, object] | list[object]] = [value]
    while stack:
        container = stack.pop()
        for item in container.values() if type(container) is dict else container:
            kind = type(item)
            if kind is float:
                if not math.isfinite(item):  # type: ignore[arg-type]  # kind is float
                    return False
            elif kind is dict or kind is list:
                stack.append(item)  # type: ignore[arg-type]  # kind is dict or list
    return True


def _encode(event: dict[str, object]) -> str:
    """The event as compact JSON, UTF-8 safe; TypeError or ValueError when it cannot be.

    orjson writes it ~5x faster than the stdlib. The stdlib decides whenever
    orjson's answer could differ from a refusal: orjson writes NaN and
    infinities as ``null`` (which the stdlib refuses, as the publish API
    does), so an output with ``null`` in it is kept only when the event has
    no such float (real events often carry nulls: the check is a walk, about
    a tenth of the stdlib's encoding); and orjson refuses what the stdlib may
    write (integers past 64 bits, non-string keys) or must refuse (lone
    surrogates).
    """
    try:
        data = orjson.dumps(event)
    except (TypeError, orjson.JSONEncodeError):
        data = None
    if data is not None and (b"null" not in data or _is_finite(event)):
        return data.decode()
    text = _compact(event)
    if not text.isascii():
        text.encode("utf-8")  # a lone surrogate cannot go out
    return text


def to_pending(hub: Hub, event: dict[str, object], index: int) -> PendingEvent:
    """Give a validated event its ``id`` and encode it up to ``"seq":``.

    Raises:
        PublishError: the event cannot be encoded (a lone surrogate cannot go
            out as UTF-8), naming it by ``index``.
    """
    if event.get("id") is None:
        event["id"] = _new_id()
    event.pop("seq", None)  # the server numbers events; a publisher's seq is replaced
    try:
        text = _encode(event)
    except (TypeError, ValueError) as exc:
        raise PublishError(
            f"event {index}: cannot be encoded ({type(exc).__name__})", index=index
        ) from exc
    user_id = event.get("user_id")
    return PendingEvent(
        hub=hub.value,
        site_id=str(event["site_id"]),
        user_id=user_id if type(user_id) is str else None,
        event_id=str(event["id"]),
        # site_id is always there, so the object is never empty: a comma is right.
        prefix=text[:-1] + ',"seq":',
    )


def malformation(event: NumberedEvent) -> str | None:
    """Why ``event`` (from a backplane) cannot be delivered, or None when it can.

    The backplane's data is trusted but not assumed: whatever else wrote to
    it (a bug, an operator, another version) must not crash a node.
    """
    if event.hub not in _HUBS:
        return f"unknown hub {event.hub[:32]!r}"
    if type(event.seq) is not int or not 0 < event.seq <= MAX_SEQ:
        return f"seq {event.seq!r:.32} is not in 1..2^53"
    if not (type(event.site_id) is str and event.site_id and type(event.text) is str):
        return "site_id or text is not a non-empty string"
    if event.user_id is not None and type(event.user_id) is not str:
        return "user_id is not a string"
    return None


def to_stream_event(event: NumberedEvent) -> StreamEvent:
    """Prepare a numbered event for delivery (one encoding per protocol, later).

    ``event`` must pass ``malformation`` (an unknown hub raises ``KeyError``).
    """
    return StreamEvent(
        hub=_HUBS[event.hub],
        site_id=event.site_id,
        user_id=event.user_id,
        event_id=event.event_id,
        seq=event.seq,
        text=event.text,
        message=PreparedMessage(Invocation(target=TARGET, arguments=(event.text,))),
    )


def gap_message(first_available_seq: int) -> PreparedMessage:
    """``Gap(first)``: events before ``first`` left history; a resume cannot fill them."""
    return PreparedMessage(Invocation(target=GAP_TARGET, arguments=(first_available_seq,)))


class Wire(Protocol):
    """How a transport carries hub bytes: a hub protocol, and the framing around it.

    Transports own their wires (``hubserver.transports``): a WebSocket frame
    of the protocol's type, a Server-Sent Event, or the bytes as they are. A
    wire is a long-lived object (one per transport and protocol), so it can
    key a cache.
    """

    @property
    def protocol(self) -> HubProtocol: ...

    def frame(self, payload: bytes) -> bytes:
        """``payload`` (whole hub messages) as this transport writes it."""
        ...


class Delivery:
    """What one group receives at once: one event, or a run of them from one publish.

    ``payload`` is encoded once per hub protocol, and ``framed`` wraps it once
    per wire: server frames are unmasked, so every recipient on the same wire
    gets the very same bytes.
    """

    __slots__ = ("_frames", "events", "first_seq", "payload")

    def __init__(self, events: Sequence[StreamEvent]) -> None:
        self.events = tuple(events)
        self.first_seq = self.events[0].seq
        self.payload: PreparedMessage | PreparedBatch = (
            self.events[0].message
            if len(self.events) == 1
            else PreparedBatch([event.message for event in self.events])
        )
        self._frames: dict[Wire, bytes] = {}

    @property
    def count(self) -> int:
        return len(self.events)

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq

    def after(self, seq: int) -> Delivery | None:
        """The part of this delivery with seq above ``seq`` (None if nothing is left)."""
        if self.events[0].seq > seq:
            return self
        rest = [event for event in self.events if event.seq > seq]
        return Delivery(rest) if rest else None

    def framed(self, wire: Wire) -> bytes:
        """This delivery as ``wire`` writes it: the same bytes for every recipient on it."""
        frame = self._frames.get(wire)
        if frame is None:
            frame = self._frames[wire] = wire.frame(self.payload.encoded(wire.protocol))
        return frame
