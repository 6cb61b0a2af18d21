"""Log output: text for people, one JSON object per line for collectors.

``--log-format text`` writes what it always wrote (``time LEVEL logger:
message``). ``--log-format json`` writes each record as one line::

    {"time":"2025-01-02T03:04:05.678Z","level":"info","logger":"hubserver.http",
     "event":"session_opened","message":"session 7: entries hub, site stream, subject alice",
     "pid":4242,"session_id":7,"subject":"alice","hub":"entries","site":"s1",
     "transport":"WebSockets"}

``time`` is RFC 3339 in UTC; ``event`` (where the call names one) is a
stable name to alert on, unlike the message's wording. Context fields come
from the ``extra=`` of the log call: ``session_fields`` and
``connection_fields`` build them for a hub connection, and the access log adds
``method``, ``path``, ``status``, ``bytes`` and ``duration_ms``. An exception
is the ``exception`` field (its traceback), never a second line.

``auto`` (the default) picks text when stderr is a terminal and JSON
otherwise (a container runtime, journald, a file), so a person at a terminal
and a log collector each get theirs without a flag.

What goes into a field obeys the rules of the message: no token, no payload;
request targets pass ``redact_url`` first.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import TYPE_CHECKING, Final, Protocol, TextIO

if TYPE_CHECKING:
    from .routing import GroupKey
    from .transports import TransportKind

__all__ = [
    "MAX_FIELD_CHARS",
    "TEXT_FORMAT",
    "JsonFormatter",
    "LoggedSession",
    "configure_logging",
    "connection_fields",
    "resolve_log_format",
    "session_fields",
]

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Ids a client chose (a subject, a site) are cut here in the context fields.
MAX_FIELD_CHARS: Final = 256
#: The hub name of a publisher's connection (it joins no group).
PUBLISHER_HUB: Final = "publish"
#: What every LogRecord has: anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES: Final = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))
) | {"message", "asctime"}
#: The fields every line starts with; ``extra=`` never overwrites them.
_BASE_FIELDS: Final = ("time", "level", "logger", "event", "message", "pid")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in values are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        event = record.__dict__.get("event")
        if event is not None:
            fields["event"] = event
        fields["message"] = record.getMessage()
        fields["pid"] = record.process
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in _BASE_FIELDS:
                fields[key] = value
        if record.exc_info and not record.exc_text:
            # Cached on the record, as logging.Formatter does, for other handlers.
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            fields["exception"] = record.exc_text
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        # default=str: a Path or an enum in a field is written, never a logging error.
        return json.dumps(fields, default=str, separators=(",", ":"))


def _rfc3339(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def resolve_log_format(log_format: str, stream: TextIO) -> str:
    """``text`` or ``json``: ``auto`` is text on a terminal, JSON otherwise."""
    if log_format != "auto":
        return log_format
    try:
        is_terminal = stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        is_terminal = False
    return "text" if is_terminal else "json"


def configure_logging(level: str, log_format: str, stream: TextIO | None = None) -> str:
    """Send the process's log records to ``stream`` (stderr) at ``level`` in ``log_format``.

    Args:
        level: debug, info, warning, error or critical.
        log_format: text, json or auto.
        stream: where lines go; stderr by default.

    Returns:
        The format chosen (``text`` or ``json``).
    """
    stream = sys.stderr if stream is None else stream
    chosen = resolve_log_format(log_format, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if chosen == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    return chosen


# -- context fields --------------------------------------------------------------------


class LoggedSession(Protocol):
    """What the context fields of a hub connection's log lines come from."""

    @property
    def session_id(self) -> int: ...

    @property
    def subject(self) -> str: ...

    @property
    def key(self) -> GroupKey | None: ...

    @property
    def kind(self) -> TransportKind: ...


def connection_fields(
    session_id: int,
    subject: str,
    key: GroupKey | None,
    transport: TransportKind | None,
    *,
    event: str,
    reason: str | None = None,
) -> dict[str, object]:
    """The ``extra=`` of a hub connection's log line.

    Args:
        session_id: the connection's id (``session N`` in the message).
        subject: the token's subject.
        key: the stream it receives; None for a publisher's connection.
        transport: WebSockets, ServerSentEvents or LongPolling, if known.
        event: the line's stable name.
        reason: why the connection ends, for the lines that end one.
    """
    fields: dict[str, object] = {
        "event": event,
        "session_id": session_id,
        "subject": subject[:MAX_FIELD_CHARS],
    }
    if key is None:
        fields["hub"] = PUBLISHER_HUB
    else:
        fields["hub"] = key.hub.value
        fields["site"] = key.site_id[:MAX_FIELD_CHARS]
        if key.user_id is not None:
            fields["user_id"] = key.user_id[:MAX_FIELD_CHARS]
    if transport is not None:
        fields["transport"] = transport.value
    if reason is not None:
        fields["reason"] = reason
    return fields


def session_fields(
    session: LoggedSession, event: str, *, reason: str | None = None
) -> dict[str, object]:
    """``connection_fields`` of a running hub connection."""
    return connection_fields(
        session.session_id, session.subject, session.key, session.kind, event=event, reason=reason
    )
