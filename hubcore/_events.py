"""Events: the nine hub messages of the SignalR hub protocol and the handshake.

Every event is a frozen, slotted, keyword-only dataclass on one ``Event`` base,
named as HubProtocol.md names the message. They validate their fields in
``__post_init__`` and reject wrong types (``LocalProtocolError``) instead of
coercing them; the parsers build them through the same checks, so a message
from the wire is exactly as valid as one the caller builds.

``headers`` is kept as a read-only mapping and ``arguments`` / ``stream_ids``
as tuples. Argument values are whatever the hub protocol carries (``Value``);
they are passed through, not copied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType
from typing import ClassVar, Final, TypeAlias

from ._errors import LocalProtocolError

__all__ = [
    "Ack",
    "CancelInvocation",
    "Close",
    "Completion",
    "Event",
    "HandshakeRequest",
    "HandshakeResponse",
    "HubMessage",
    "Invocation",
    "MessageType",
    "Ping",
    "SequenceMessage",
    "StreamInvocation",
    "StreamItem",
    "Value",
]

#: A value a hub protocol can carry. ``bytes`` only travels as MessagePack
#: ``bin``; over JSON it is written as base64 text, as System.Text.Json does.
Value: TypeAlias = (
    "bool | int | float | str | bytes | list[Value] | tuple[Value, ...] | dict[str, Value] | None"
)
Headers: TypeAlias = Mapping[str, str]

_NO_HEADERS: Final[Mapping[str, str]] = MappingProxyType({})
#: Sequence ids are .NET longs on the wire.
_MAX_SEQUENCE_ID: Final = (1 << 63) - 1


class MessageType(IntEnum):
    """The ``type`` field of a hub message (HubProtocol.md "Message Types")."""

    INVOCATION = 1
    STREAM_ITEM = 2
    COMPLETION = 3
    STREAM_INVOCATION = 4
    CANCEL_INVOCATION = 5
    PING = 6
    CLOSE = 7
    ACK = 8
    SEQUENCE = 9


#: Types 1-5 count toward stateful-reconnect sequence ids (spec §8).
TRACKABLE_TYPES: Final = frozenset(
    {
        MessageType.INVOCATION,
        MessageType.STREAM_ITEM,
        MessageType.COMPLETION,
        MessageType.STREAM_INVOCATION,
        MessageType.CANCEL_INVOCATION,
    }
)


def _no_headers() -> Mapping[str, str]:
    return _NO_HEADERS


def _fail(cls: type, what: str, value: object) -> LocalProtocolError:
    return LocalProtocolError(f"{cls.__name__}: {what}, got {type(value).__name__}")


def _check_id(cls: type, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if type(value) is not str or not value:
        raise _fail(cls, "invocation_id must be a non-empty str", value)


def _check_target(cls: type, value: object) -> None:
    if type(value) is not str or not value:
        raise _fail(cls, "target must be a non-empty str", value)


def _freeze_headers(cls: type, headers: object) -> Mapping[str, str]:
    if headers is _NO_HEADERS or (type(headers) is dict and not headers):
        return _NO_HEADERS
    if not isinstance(headers, Mapping):
        raise _fail(cls, "headers must be a mapping of str to str", headers)
    if not headers:
        return _NO_HEADERS
    for key, value in headers.items():
        if type(key) is not str or type(value) is not str:
            raise LocalProtocolError(f"{cls.__name__}: headers must map str to str")
    return MappingProxyType(dict(headers))


def _freeze_values(cls: type, name: str, values: object) -> tuple[Value, ...]:
    if type(values) is tuple:
        return values
    if not isinstance(values, list | tuple):
        raise _fail(cls, f"{name} must be a list or tuple", values)
    return tuple(values)


def _freeze_stream_ids(cls: type, values: object) -> tuple[str, ...]:
    if values == () or (type(values) is list and not values):
        return ()
    if not isinstance(values, list | tuple):
        raise _fail(cls, "stream_ids must be a list or tuple of str", values)
    for value in values:
        if type(value) is not str or not value:
            raise LocalProtocolError(f"{cls.__name__}: stream_ids must be non-empty strs")
    return tuple(values)


def _check_sequence_id(cls: type, value: object) -> None:
    if type(value) is not int or not 0 <= value <= _MAX_SEQUENCE_ID:
        raise _fail(cls, "sequence_id must be an int from 0 to 2**63-1", value)


class Event:
    """Base of everything a ``HubConnection`` emits or is asked to send."""

    __slots__ = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeRequest(Event):
    """The client's first record: ``{"protocol":"json","version":1}`` (spec §2)."""

    protocol: str
    version: int

    def __post_init__(self) -> None:
        if type(self.protocol) is not str or not self.protocol:
            raise _fail(HandshakeRequest, "protocol must be a non-empty str", self.protocol)
        if type(self.version) is not int:
            raise _fail(HandshakeRequest, "version must be an int", self.version)


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeResponse(Event):
    """The server's answer: ``{}`` on success, ``{"error": ...}`` on failure (spec §2)."""

    error: str | None = None

    def __post_init__(self) -> None:
        if self.error is not None and (type(self.error) is not str or not self.error):
            raise _fail(HandshakeResponse, "error must be None or a non-empty str", self.error)


class HubMessage(Event):
    """Base of the nine hub messages; ``message_type`` is the wire ``type``."""

    __slots__ = ()
    message_type: ClassVar[MessageType]


@dataclass(frozen=True, slots=True, kw_only=True)
class Invocation(HubMessage):
    """Type 1: call ``target`` with ``arguments``.

    Without ``invocation_id`` it is fire-and-forget and must not be answered.
    """

    message_type: ClassVar[MessageType] = MessageType.INVOCATION
    target: str
    arguments: Seq[Value] = ()
    invocation_id: str | None = None
    headers: Headers = field(default_factory=_no_headers)
    stream_ids: Seq[str] = ()

    def __post_init__(self) -> None:
        # The common case (a tuple of arguments, no headers, no stream ids) is
        # checked with identity tests only: broadcasts build one per event.
        _check_target(Invocation, self.target)
        if self.invocation_id is not None:
            _check_id(Invocation, self.invocation_id)
        if type(self.arguments) is not tuple:
            object.__setattr__(
                self, "arguments", _freeze_values(Invocation, "arguments", self.arguments)
            )
        if self.headers is not _NO_HEADERS:
            object.__setattr__(self, "headers", _freeze_headers(Invocation, self.headers))
        if self.stream_ids != ():
            object.__setattr__(self, "stream_ids", _freeze_stream_ids(Invocation, self.stream_ids))


def _slot_setter(cls: type, name: str) -> Callable[[object, object], None]:
    setter: Callable[[object, object], None] = cls.__dict__[name].__set__
    return setter


_new = object.__new__
_set_target = _slot_setter(Invocation, "target")
_set_arguments = _slot_setter(Invocation, "arguments")
_set_invocation_id = _slot_setter(Invocation, "invocation_id")
_set_headers = _slot_setter(Invocation, "headers")
_set_stream_ids = _slot_setter(Invocation, "stream_ids")


def checked_invocation(
    target: str, arguments: tuple[Value, ...], invocation_id: str | None
) -> Invocation:
    """An Invocation without headers or stream ids, from fields the caller checked.

    For the parsers' fast path only: it skips the dataclass ``__init__`` (a
    frozen dataclass sets each field through ``object.__setattr__``), which was
    the largest cost of parsing a message. The caller guarantees a non-empty
    str ``target``, a tuple ``arguments`` and a non-empty str or None id.
    """
    invocation: Invocation = _new(Invocation)
    _set_target(invocation, target)
    _set_arguments(invocation, arguments)
    _set_invocation_id(invocation, invocation_id)
    _set_headers(invocation, _NO_HEADERS)
    _set_stream_ids(invocation, ())
    return invocation


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamItem(HubMessage):
    """Type 2: one item of a stream; ``item`` may be ``None`` (JSON ``null``)."""

    message_type: ClassVar[MessageType] = MessageType.STREAM_ITEM
    invocation_id: str
    item: Value = None
    headers: Headers = field(default_factory=_no_headers)

    def __post_init__(self) -> None:
        _check_id(StreamItem, self.invocation_id)
        object.__setattr__(self, "headers", _freeze_headers(StreamItem, self.headers))


@dataclass(frozen=True, slots=True, kw_only=True)
class Completion(HubMessage):
    """Type 3: the end of an invocation, in one of three kinds kept apart.

    * error: ``error`` is set (``has_result`` must be False);
    * void: neither ``error`` nor ``has_result`` (JSON: no ``result`` key);
    * value: ``has_result`` is True and ``result`` is the value, possibly None.

    Use the ``void``, ``with_result`` and ``with_error`` constructors.
    """

    message_type: ClassVar[MessageType] = MessageType.COMPLETION
    invocation_id: str
    error: str | None = None
    result: Value = None
    has_result: bool = False
    headers: Headers = field(default_factory=_no_headers)

    def __post_init__(self) -> None:
        _check_id(Completion, self.invocation_id)
        if self.error is not None and type(self.error) is not str:
            raise _fail(Completion, "error must be None or a str", self.error)
        if type(self.has_result) is not bool:
            raise _fail(Completion, "has_result must be a bool", self.has_result)
        if self.error is not None and self.has_result:
            raise LocalProtocolError("Completion: a completion has an error or a result, not both")
        if not self.has_result and self.result is not None:
            raise LocalProtocolError("Completion: result given without has_result=True")
        object.__setattr__(self, "headers", _freeze_headers(Completion, self.headers))

    @classmethod
    def void(cls, invocation_id: str, *, headers: Headers = _NO_HEADERS) -> Completion:
        """A completion of a method that returns nothing."""
        return cls(invocation_id=invocation_id, headers=headers)

    @classmethod
    def with_result(
        cls, invocation_id: str, result: Value, *, headers: Headers = _NO_HEADERS
    ) -> Completion:
        """A completion carrying ``result`` (which may be None)."""
        return cls(invocation_id=invocation_id, result=result, has_result=True, headers=headers)

    @classmethod
    def with_error(
        cls, invocation_id: str, error: str, *, headers: Headers = _NO_HEADERS
    ) -> Completion:
        """A completion that reports ``error``."""
        return cls(invocation_id=invocation_id, error=error, headers=headers)


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamInvocation(HubMessage):
    """Type 4: call a streaming method; the answer is StreamItems then a Completion."""

    message_type: ClassVar[MessageType] = MessageType.STREAM_INVOCATION
    invocation_id: str
    target: str
    arguments: Seq[Value] = ()
    headers: Headers = field(default_factory=_no_headers)
    stream_ids: Seq[str] = ()

    def __post_init__(self) -> None:
        _check_id(StreamInvocation, self.invocation_id)
        _check_target(StreamInvocation, self.target)
        object.__setattr__(
            self, "arguments", _freeze_values(StreamInvocation, "arguments", self.arguments)
        )
        object.__setattr__(self, "headers", _freeze_headers(StreamInvocation, self.headers))
        object.__setattr__(
            self, "stream_ids", _freeze_stream_ids(StreamInvocation, self.stream_ids)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelInvocation(HubMessage):
    """Type 5: stop the stream started by ``invocation_id``."""

    message_type: ClassVar[MessageType] = MessageType.CANCEL_INVOCATION
    invocation_id: str
    headers: Headers = field(default_factory=_no_headers)

    def __post_init__(self) -> None:
        _check_id(CancelInvocation, self.invocation_id)
        object.__setattr__(self, "headers", _freeze_headers(CancelInvocation, self.headers))


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping(HubMessage):
    """Type 6: keep-alive; needs no reply."""

    message_type: ClassVar[MessageType] = MessageType.PING


@dataclass(frozen=True, slots=True, kw_only=True)
class Close(HubMessage):
    """Type 7: the sender is closing the connection.

    ``allow_reconnect`` tells the JS and .NET clients whether automatic
    reconnect may follow (spec §5). An empty error is not allowed: the wire
    forms cannot tell it from no error.
    """

    message_type: ClassVar[MessageType] = MessageType.CLOSE
    error: str | None = None
    allow_reconnect: bool = False

    def __post_init__(self) -> None:
        if self.error is not None and (type(self.error) is not str or not self.error):
            raise _fail(Close, "error must be None or a non-empty str", self.error)
        if type(self.allow_reconnect) is not bool:
            raise _fail(Close, "allow_reconnect must be a bool", self.allow_reconnect)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(HubMessage):
    """Type 8 (protocol v2): every trackable message up to ``sequence_id`` arrived."""

    message_type: ClassVar[MessageType] = MessageType.ACK
    sequence_id: int

    def __post_init__(self) -> None:
        _check_sequence_id(Ack, self.sequence_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class SequenceMessage(HubMessage):
    """Type 9 (protocol v2, the spec's Sequence): the next trackable message has ``sequence_id``.

    Named as ASP.NET Core names it (``SequenceMessage``), so that it does not shadow
    ``typing.Sequence`` or ``collections.abc.Sequence``; ``hubcore.Sequence`` is a
    deprecated alias.
    """

    message_type: ClassVar[MessageType] = MessageType.SEQUENCE
    sequence_id: int

    def __post_init__(self) -> None:
        _check_sequence_id(SequenceMessage, self.sequence_id)
