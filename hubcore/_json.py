"""The JSON hub protocol (spec §3.1): one UTF-8 JSON object per record, then RS.

Writing follows ASP.NET Core's key order (type, headers, invocationId, target,
arguments, streamIds / item / error|result) in compact form with non-ASCII
escaped, as System.Text.Json's default encoder does; escaping also keeps lone
surrogates writable and 0x1E out of the text. The one exception is the
broadcast shape (an invocation with a single string argument), whose string is
written as UTF-8 by orjson for speed; JSON readers cannot tell the difference.
Reading accepts any key order, skips unknown keys and ignores unknown message
types.

Inbound records are parsed with orjson, about three times faster than the
stdlib; a record that may hold an integer beyond 64 bits goes to the stdlib
instead, because orjson turns those into floats: a run of 20 or more digits
(2**64 - 1 has 20), or a minus sign before 19 (-2**63 has 19). So does any
record orjson refuses (lone surrogate escapes), so both parsers accept exactly
what the stdlib accepts. (A nanosecond timestamp has 19 digits: it stays on
the fast path.)
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from typing import Final, cast

import orjson

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

__all__ = ["parse_json_record", "write_json_message"]

RS: Final = b"\x1e"
_INVOCATION: Final = 1  # plain ints: comparing to an IntEnum member costs 7x more
# Digits become "0" so that a fast ``find`` spots a long run: a regex is ~5x slower.
_DIGITS_TO_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGIT_RUN: Final = b"0" * 20
_LONG_NEGATIVE_RUN: Final = b"-" + b"0" * 19


def _bytes_as_base64(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_dumps: Final[Callable[[object], str]] = json.JSONEncoder(
    ensure_ascii=True, separators=(",", ":"), allow_nan=False, default=_bytes_as_base64
).encode
_quote: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii

# The fixed head of a fire-and-forget invocation, per target: broadcasts reuse it.
_INVOCATION_HEADS: dict[str, bytes] = {}
_MAX_CACHED_HEADS: Final = 1024

_PING: Final = b'{"type":6}' + RS


def _encode_value(value: object) -> str:
    try:
        return _dumps(value)
    except (TypeError, ValueError, RecursionError, OverflowError) as exc:
        raise LocalProtocolError(f"value cannot be written as JSON: {exc}") from exc


_PLAIN_LEAVES: Final = frozenset({str, int, bool, type(None)})


def _is_plain(value: object) -> bool:
    """Whether ``value`` holds only dicts with str keys, lists, tuples, strs, ints,
    bools and None: what orjson writes byte for byte as ``_dumps`` does, once
    its output is checked to be printable ASCII (floats are formatted
    differently, other types refused or written differently: the stdlib decides)."""
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            for key, member in cast(dict[object, object], item).items():
                if type(key) is not str:
                    return False
                stack.append(member)
        elif kind is list or kind is tuple:
            stack.extend(cast(list[object], item))
        elif kind not in _PLAIN_LEAVES:
            return False
    return True


def _encode_bytes(value: object) -> bytes:
    """``_encode_value`` as ASCII bytes; orjson (~5x faster) writes the plain values."""
    if _is_plain(value):
        try:
            data = orjson.dumps(value)
        except orjson.JSONEncodeError:  # past 64 bits, a lone surrogate, too deep
            data = None
        # The stdlib escapes everything outside space..tilde; orjson writes UTF-8 and DEL.
        if data is not None and data.isascii() and b"\x7f" not in data:
            return data
    return _encode_value(value).encode("ascii")


def _invocation_head(target: str) -> bytes:
    head = _INVOCATION_HEADS.get(target)
    if head is None:
        head = b'{"type":1,"target":' + _quote(target).encode("ascii") + b',"arguments":'
        if len(_INVOCATION_HEADS) < _MAX_CACHED_HEADS:
            _INVOCATION_HEADS[target] = head
    return head


def _arguments(arguments: Seq[Value]) -> bytes:
    if len(arguments) == 1 and type(arguments[0]) is str:
        # The broadcast case: one string (an event as JSON text). orjson quotes
        # it ~5x faster than the stdlib, as UTF-8; it refuses lone surrogates,
        # which the stdlib writes escaped.
        try:
            return b"[" + orjson.dumps(arguments[0]) + b"]"
        except orjson.JSONEncodeError:
            return ("[" + _quote(arguments[0]) + "]").encode("ascii")
    return _encode_bytes(list(arguments))


def write_json_message(message: HubMessage) -> bytes:
    """Encode one hub message as a JSON record, RS included.

    Raises:
        LocalProtocolError: a value cannot be written as JSON (NaN, a set, ...).
    """
    if (
        type(message) is Invocation
        and message.invocation_id is None
        and not message.headers
        and not message.stream_ids
    ):
        head = _invocation_head(message.target)
        return head + _arguments(message.arguments) + b"}" + RS
    if type(message) is Ping:
        return _PING
    return _encode_bytes(_to_object(message)) + RS


def _with_common(
    out: dict[str, object], headers: Mapping[str, str], invocation_id: str | None
) -> None:
    if headers:
        out["headers"] = dict(headers)
    if invocation_id:
        out["invocationId"] = invocation_id


def _to_object(message: HubMessage) -> dict[str, object]:
    out: dict[str, object] = {"type": int(message.message_type)}
    match message:
        case Invocation() | StreamInvocation():
            _with_common(out, message.headers, message.invocation_id)
            out["target"] = message.target
            out["arguments"] = list(message.arguments)
            if message.stream_ids:
                out["streamIds"] = list(message.stream_ids)
        case StreamItem():
            _with_common(out, message.headers, message.invocation_id)
            out["item"] = message.item
        case Completion():
            _with_common(out, message.headers, message.invocation_id)
            if message.error is not None:
                out["error"] = message.error
            elif message.has_result:
                out["result"] = message.result
        case CancelInvocation():
            _with_common(out, message.headers, message.invocation_id)
        case Close():
            if message.error is not None:
                out["error"] = message.error
            if message.allow_reconnect:
                out["allowReconnect"] = True
        case Ack() | SequenceMessage():
            out["sequenceId"] = message.sequence_id
        case Ping():
            pass
        case _:
            raise LocalProtocolError(f"cannot write {type(message).__name__} as a hub message")
    return out


def loads_json(payload: bytes) -> object:
    """Parse one JSON document; only ``RemoteProtocolError`` escapes."""
    try:
        zeroed = payload.translate(_DIGITS_TO_ZERO)
        if zeroed.find(_LONG_DIGIT_RUN) < 0 and zeroed.find(_LONG_NEGATIVE_RUN) < 0:
            try:
                return orjson.loads(payload)
            except orjson.JSONDecodeError:
                pass  # the stdlib decides, so both paths accept the same documents
        # Strict UTF-8 (spec §1.1): json.loads(bytes) would also take UTF-16/32, a
        # BOM and UTF-8-encoded surrogates, which orjson and ASP.NET Core refuse.
        return json.loads(
            payload.decode("utf-8"),
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError and UnicodeDecodeError are ValueErrors.
        raise RemoteProtocolError(f"Invalid JSON: {_short(exc)}") from exc


def _reject_constant(name: str) -> object:
    # NaN and Infinity are not JSON (RFC 8259), and the official clients refuse them.
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    # "1e400" overflows to infinity, which no JSON writer (ours included) can send back.
    value = float(text)
    if math.isinf(value):
        raise ValueError("number is infinity when parsed as double")
    return value


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."


def parse_json_record(payload: bytes) -> HubMessage | None:
    """Parse one JSON record (without its RS) into a hub message.

    Returns:
        The message, or ``None`` for an unknown message type (ignored, spec §3).

    Raises:
        RemoteProtocolError: invalid JSON, or a missing or mistyped field.
    """
    obj = loads_json(payload)
    if type(obj) is not dict:
        raise RemoteProtocolError(f"Expected a JSON object, got {_json_kind(obj)}.")
    obj = cast("dict[str, Value]", obj)
    kind = obj.get("type")
    if type(kind) is not int:
        if "type" not in obj:
            raise RemoteProtocolError("Missing required property 'type'.")
        raise RemoteProtocolError(f"Expected 'type' to be an integer, got {_json_kind(kind)}.")
    try:
        return _from_object(kind, obj)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(str(exc)) from exc


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _wrong(key: str, expected: str, value: object) -> RemoteProtocolError:
    return RemoteProtocolError(f"Expected '{key}' to be {expected}, got {_json_kind(value)}.")


def _present(obj: dict[str, Value], key: str) -> Value:
    if key not in obj:
        raise RemoteProtocolError(f"Missing required property '{key}'.")
    return obj[key]


def _string(obj: dict[str, Value], key: str) -> str:
    value = _present(obj, key)
    if type(value) is not str:
        raise _wrong(key, "a string", value)
    return value


def _integer(obj: dict[str, Value], key: str) -> int:
    value = _present(obj, key)
    if type(value) is not int:
        raise _wrong(key, "an integer", value)
    return value


def _array(obj: dict[str, Value], key: str) -> list[Value]:
    value = _present(obj, key)
    if type(value) is not list:
        raise _wrong(key, "an array", value)
    return value


def _optional_string(obj: dict[str, Value], key: str) -> str | None:
    value = obj.get(key)
    if value is None or type(value) is str:
        return value
    raise _wrong(key, "a string", value)


def _headers(obj: dict[str, Value]) -> dict[str, str]:
    value = obj.get("headers")
    headers: dict[str, str] = {}
    if value is None:
        return headers
    if type(value) is dict:
        for key, item in value.items():
            if type(item) is not str:
                break
            headers[key] = item
        else:
            return headers
    raise RemoteProtocolError("Expected 'headers' to be an object of strings.")


def _stream_ids(obj: dict[str, Value]) -> list[str]:
    value = obj.get("streamIds")
    ids: list[str] = []
    if value is None:
        return ids
    if type(value) is list:
        for item in value:
            if type(item) is not str:
                break
            ids.append(item)
        else:
            return ids
    raise RemoteProtocolError("Expected 'streamIds' to be an array of strings.")


def _from_object(kind: int, obj: dict[str, Value]) -> HubMessage | None:
    if kind == _INVOCATION:
        # The common shape (no headers, no stream ids) skips the field helpers;
        # anything unusual takes the checked path below for its error message.
        target = obj.get("target")
        arguments = obj.get("arguments")
        invocation_id = obj.get("invocationId")
        if (
            type(target) is str
            and target
            and type(arguments) is list
            and (invocation_id is None or type(invocation_id) is str)
            and "headers" not in obj
            and "streamIds" not in obj
        ):
            return checked_invocation(target, tuple(arguments), invocation_id or None)
    return _from_object_checked(kind, obj)


def _from_object_checked(kind: int, obj: dict[str, Value]) -> HubMessage | None:
    if kind == _INVOCATION:
        return Invocation(
            target=_string(obj, "target"),
            arguments=_array(obj, "arguments"),
            # The .NET reader treats an empty id like none: fire-and-forget.
            invocation_id=_optional_string(obj, "invocationId") or None,
            headers=_headers(obj),
            stream_ids=_stream_ids(obj),
        )
    if kind == MessageType.STREAM_ITEM:
        return StreamItem(
            invocation_id=_string(obj, "invocationId"),
            item=_present(obj, "item"),
            headers=_headers(obj),
        )
    if kind == MessageType.COMPLETION:
        error = _optional_string(obj, "error")
        has_result = "result" in obj
        if error is not None and has_result:
            raise RemoteProtocolError("The 'error' and 'result' properties are mutually exclusive.")
        return Completion(
            invocation_id=_string(obj, "invocationId"),
            error=error,
            result=obj.get("result"),
            has_result=has_result,
            headers=_headers(obj),
        )
    if kind == MessageType.STREAM_INVOCATION:
        return StreamInvocation(
            invocation_id=_string(obj, "invocationId"),
            target=_string(obj, "target"),
            arguments=_array(obj, "arguments"),
            headers=_headers(obj),
            stream_ids=_stream_ids(obj),
        )
    if kind == MessageType.CANCEL_INVOCATION:
        return CancelInvocation(invocation_id=_string(obj, "invocationId"), headers=_headers(obj))
    if kind == MessageType.PING:
        return Ping()
    if kind == MessageType.CLOSE:
        allow = obj.get("allowReconnect", False)
        if type(allow) is not bool:
            raise _wrong("allowReconnect", "a boolean", allow)
        return Close(error=_optional_string(obj, "error") or None, allow_reconnect=allow)
    if kind == MessageType.ACK:
        return Ack(sequence_id=_integer(obj, "sequenceId"))
    if kind == MessageType.SEQUENCE:
        return SequenceMessage(sequence_id=_integer(obj, "sequenceId"))
    return None
