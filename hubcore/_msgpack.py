"""The MessagePack hub protocol (spec §3.2): VarInt length, then one array.

Writing follows ASP.NET Core: Invocation always has six elements (empty
StreamIds), Close always three (nil for no error), integers in their smallest
form, ``bytes`` as ``bin``. Reading takes fields by position, ignores extra
trailing elements and accepts the JS client's shorter forms (5-element
Invocation, ``[7, nil]`` Close).

Extension types are refused: the spec's clients send none unless configured to,
and an ``ExtType`` is not a ``Value`` the rest of the stack can carry. The one
exception is the timestamp (type -1), which the JS client uses for ``Date``
arguments: it arrives as ``msgpack.Timestamp`` and is the caller's to convert
(none of hubserver's hub methods takes one).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Final

# msgpack ships no types. The ignore keeps an embedder's own strict mypy quiet
# however it finds hubcore (installed, vendored, or on MYPYPATH); unused-ignore
# is for configurations that already ignore msgpack (this project's own). Nothing
# of msgpack's leaks: every function here declares what it takes and returns.
import msgpack  # type: ignore[import-untyped, unused-ignore]

from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import (
    Ack,
    CancelInvocation,
    Close,
    Completion,
    HubMessage,
    Invocation,
    MessageType,
    Ping,
    SequenceMessage,
    StreamInvocation,
    StreamItem,
    Value,
    checked_invocation,
)
from ._varint import encode_varint

__all__ = ["parse_msgpack_record", "write_msgpack_message"]

_unpackb = msgpack.unpackb

_INVOCATION: Final = 1  # plain ints: comparing to an IntEnum member costs 7x more
_ERROR_RESULT: Final = 1
_VOID_RESULT: Final = 2
_NON_VOID_RESULT: Final = 3

_PING: Final = b"\x02\x91\x06"
# [1, {}, nil, target, ...: the fixed head of a fire-and-forget invocation.
_INVOCATION_HEADS: dict[str, bytes] = {}
_MAX_CACHED_HEADS: Final = 1024


# packb() builds a Packer per call (~0.7 us); a reused one packs in ~0.1 us. A
# Packer is not thread-safe, so each thread that embeds hubcore gets its own.
_local = threading.local()


def _packer() -> msgpack.Packer:
    packer: msgpack.Packer | None = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    return packer


def _pack(value: object) -> bytes:
    try:
        return _packer().pack(value)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        # A failed pack may leave partial data behind: start the next one clean.
        _local.packer = None
        raise LocalProtocolError(f"value cannot be written as MessagePack: {exc}") from exc


def _invocation_head(target: str) -> bytes:
    head = _INVOCATION_HEADS.get(target)
    if head is None:
        head = b"\x96\x01\x80\xc0" + _pack(target)
        if len(_INVOCATION_HEADS) < _MAX_CACHED_HEADS:
            _INVOCATION_HEADS[target] = head
    return head


def write_msgpack_message(message: HubMessage) -> bytes:
    """Encode one hub message as a VarInt-prefixed MessagePack record.

    Raises:
        LocalProtocolError: a value MessagePack cannot carry (a set, an int
            beyond 64 bits, ...).
    """
    if (
        type(message) is Invocation
        and message.invocation_id is None
        and not message.headers
        and not message.stream_ids
    ):
        body = _invocation_head(message.target) + _pack(message.arguments) + b"\x90"
        return encode_varint(len(body)) + body
    if type(message) is Ping:
        return _PING
    body = _pack(_to_array(message))
    return encode_varint(len(body)) + body


def _headers(headers: Mapping[str, str]) -> dict[str, str]:
    return dict(headers)


def _to_array(message: HubMessage) -> list[object]:
    kind = int(message.message_type)
    match message:
        case Invocation() | StreamInvocation():
            return [
                kind,
                _headers(message.headers),
                message.invocation_id,
                message.target,
                message.arguments,
                message.stream_ids,
            ]
        case StreamItem():
            return [kind, _headers(message.headers), message.invocation_id, message.item]
        case Completion():
            head: list[object] = [kind, _headers(message.headers), message.invocation_id]
            if message.error is not None:
                return [*head, _ERROR_RESULT, message.error]
            if message.has_result:
                return [*head, _NON_VOID_RESULT, message.result]
            return [*head, _VOID_RESULT]
        case CancelInvocation():
            return [kind, _headers(message.headers), message.invocation_id]
        case Close():
            return [kind, message.error, message.allow_reconnect]
        case Ack() | SequenceMessage():
            return [kind, message.sequence_id]
        case Ping():
            return [kind]
        case _:
            raise LocalProtocolError(f"cannot write {type(message).__name__} as a hub message")


def _refuse_ext(code: int, data: bytes) -> object:
    raise RemoteProtocolError(f"MessagePack extension type {code} is not supported.")


def _kind_name(value: object) -> str:
    if value is None:
        return "nil"
    return _KIND_NAMES.get(type(value), "a value")


_KIND_NAMES: Final[dict[type, str]] = {
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    str: "a string",
    bytes: "binary",
    list: "an array",
    dict: "a map",
}


def parse_msgpack_record(payload: bytes) -> HubMessage | None:
    """Parse one MessagePack record body (without its VarInt) into a hub message.

    Returns:
        The message, or ``None`` for an unknown message type (ignored, spec §3).

    Raises:
        RemoteProtocolError: not a MessagePack array, or a missing or mistyped
            element.
    """
    try:
        arr = _unpackb(payload, raw=False, ext_hook=_refuse_ext, timestamp=0)
    except RemoteProtocolError:
        raise
    except Exception as exc:
        # msgpack raises ValueError, TypeError (unhashable keys), StackError,
        # ExtraData, FormatError, UnicodeDecodeError...; all mean bad input.
        raise RemoteProtocolError(f"Invalid MessagePack: {type(exc).__name__}") from exc
    if type(arr) is list and arr and arr[0] == _INVOCATION and 5 <= len(arr) <= 6:
        # The common shape (no headers, no stream ids), checked inline; anything
        # unusual takes the checked path for its error message.
        _, headers, invocation_id, target, arguments, *rest = arr
        if (
            type(headers) is dict
            and not headers
            and type(target) is str
            and target
            and type(arguments) is list
            and (invocation_id is None or type(invocation_id) is str)
            and (not rest or not rest[0])
            and type(arr[0]) is int
        ):
            return checked_invocation(target, tuple(arguments), invocation_id or None)
    if type(arr) is not list or not arr:
        raise RemoteProtocolError(f"Expected a non-empty MessagePack array, got {_kind_name(arr)}.")
    kind = arr[0]
    if type(kind) is not int:
        raise RemoteProtocolError(
            f"Expected the message type to be an integer, got {_kind_name(kind)}."
        )
    try:
        return _from_array(kind, arr)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(str(exc)) from exc


class _Fields:
    """Positional access with errors that name the message and the element."""

    __slots__ = ("arr", "name")

    def __init__(self, arr: list[Value], name: str) -> None:
        self.arr = arr
        self.name = name

    def get(self, index: int, what: str) -> Value:
        if index >= len(self.arr):
            raise RemoteProtocolError(f"{self.name}: missing {what} (element {index}).")
        return self.arr[index]

    def _wrong(self, what: str, expected: str, value: Value) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"{self.name}: expected {what} to be {expected}, got {_kind_name(value)}."
        )

    def string(self, index: int, what: str) -> str:
        value = self.get(index, what)
        if type(value) is not str:
            raise self._wrong(what, "a string", value)
        return value

    def integer(self, index: int, what: str) -> int:
        value = self.get(index, what)
        if type(value) is not int:
            raise self._wrong(what, "an integer", value)
        return value

    def array(self, index: int, what: str) -> list[Value]:
        value = self.get(index, what)
        if type(value) is not list:
            raise self._wrong(what, "an array", value)
        return value

    def headers(self) -> dict[str, str]:
        value = self.get(1, "headers")
        headers: dict[str, str] = {}
        if type(value) is dict:
            for key, item in value.items():
                if type(key) is not str or type(item) is not str:
                    break
                headers[key] = item
            else:
                return headers
        raise RemoteProtocolError(f"{self.name}: expected headers to be a map of strings.")

    def invocation_id(self) -> str:
        return self.string(2, "invocation id")

    def optional_invocation_id(self) -> str | None:
        value = self.get(2, "invocation id")
        if value is None or value == "":
            return None  # the .NET reader treats an empty id as none
        if type(value) is not str:
            raise self._wrong("invocation id", "a string", value)
        return value

    def stream_ids(self, index: int) -> list[str]:
        value = self.arr[index] if index < len(self.arr) else None
        if value is None:
            return []
        ids: list[str] = []
        if type(value) is list:
            for item in value:
                if type(item) is not str:
                    break
                ids.append(item)
            else:
                return ids
        raise RemoteProtocolError(f"{self.name}: expected stream ids to be an array of strings.")


def _from_array(kind: int, arr: list[Value]) -> HubMessage | None:
    if kind == _INVOCATION:
        f = _Fields(arr, "Invocation")
        return Invocation(
            headers=f.headers(),
            invocation_id=f.optional_invocation_id(),
            target=f.string(3, "target"),
            arguments=f.array(4, "arguments"),
            stream_ids=f.stream_ids(5),
        )
    if kind == MessageType.STREAM_INVOCATION:
        f = _Fields(arr, "StreamInvocation")
        return StreamInvocation(
            headers=f.headers(),
            invocation_id=f.invocation_id(),
            target=f.string(3, "target"),
            arguments=f.array(4, "arguments"),
            stream_ids=f.stream_ids(5),
        )
    if kind == MessageType.STREAM_ITEM:
        f = _Fields(arr, "StreamItem")
        return StreamItem(
            headers=f.headers(), invocation_id=f.invocation_id(), item=f.get(3, "item")
        )
    if kind == MessageType.COMPLETION:
        f = _Fields(arr, "Completion")
        headers = f.headers()
        invocation_id = f.invocation_id()
        result_kind = f.integer(3, "result kind")
        if result_kind == _ERROR_RESULT:
            return Completion.with_error(invocation_id, f.string(4, "error"), headers=headers)
        if result_kind == _VOID_RESULT:
            return Completion.void(invocation_id, headers=headers)
        if result_kind == _NON_VOID_RESULT:
            return Completion.with_result(invocation_id, f.get(4, "result"), headers=headers)
        raise RemoteProtocolError(f"Completion: invalid result kind {result_kind}.")
    if kind == MessageType.CANCEL_INVOCATION:
        f = _Fields(arr, "CancelInvocation")
        return CancelInvocation(headers=f.headers(), invocation_id=f.invocation_id())
    if kind == MessageType.PING:
        return Ping()
    if kind == MessageType.CLOSE:
        f = _Fields(arr, "Close")
        # The JS client sends [7, nil]; AllowReconnect defaults to false.
        error = arr[1] if len(arr) > 1 else None
        allow = arr[2] if len(arr) > 2 else False
        if error is not None and type(error) is not str:
            raise f._wrong("error", "a string", error)
        if type(allow) is not bool:
            raise f._wrong("allowReconnect", "a boolean", allow)
        return Close(error=error or None, allow_reconnect=allow)
    if kind == MessageType.ACK:
        return Ack(sequence_id=_Fields(arr, "Ack").integer(1, "sequence id"))
    if kind == MessageType.SEQUENCE:
        return SequenceMessage(sequence_id=_Fields(arr, "Sequence").integer(1, "sequence id"))
    return None
