"""Validation of publish request bodies: all-or-nothing.

A body is one event object or a non-empty array of them. Each event needs a
non-empty string ``site_id``; ``user_id`` may be absent, null or a non-empty
string; ``id``, when given, must be a non-empty string. Every other field
passes through untouched. ``seq`` is the server's: a publisher's is replaced.
The body may nest at most ``MAX_DEPTH`` levels of arrays and objects: deeper
values would exhaust the encoder's recursion later, far from here.
"""

from __future__ import annotations

from typing import Final

from hubcore import HubError, RemoteProtocolError
from hubcore._json import loads_json

__all__ = ["MAX_DEPTH", "PublishError", "check_events", "is_within_depth", "parse_publish_body"]

MAX_ID_CHARS: Final = 256
MAX_EVENTS_PER_REQUEST: Final = 10_000
#: Levels of arrays and objects a body may nest (the body itself is level 1).
MAX_DEPTH: Final = 32


class PublishError(HubError):
    """A publish request is refused; nothing of it was published.

    Attributes:
        status: the HTTP status to answer (400 or 413).
        index: the position of the offending event in the array, if any.
    """

    def __init__(self, message: str, *, status: int = 400, index: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.index = index


def _check_key(event: dict[str, object], index: int, key: str, *, required: bool) -> None:
    if key not in event or (not required and event[key] is None):
        if required:
            raise PublishError(f"event {index}: '{key}' is required", index=index)
        return
    value = event[key]
    if type(value) is not str or not value:
        raise PublishError(f"event {index}: '{key}' must be a non-empty string", index=index)
    if len(value) > MAX_ID_CHARS:
        raise PublishError(
            f"event {index}: '{key}' is longer than {MAX_ID_CHARS} characters", index=index
        )


def is_within_depth(value: object) -> bool:
    """Whether ``value`` nests at most ``MAX_DEPTH`` levels, without recursion."""
    level: list[object] = [value]
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            return False
        # Breadth first, one level per pass, keeping only the containers.
        below: list[object] = []
        for container in level:
            if type(container) is dict:
                below += [v for v in container.values() if type(v) is dict or type(v) is list]
            elif type(container) is list:
                below += [v for v in container if type(v) is dict or type(v) is list]
        level = below
    return True


def parse_publish_body(body: bytes) -> list[dict[str, object]]:
    """Parse and validate a publish body.

    Returns:
        The events, in order, as parsed dicts (the caller adds ``id`` and ``seq``).

    Raises:
        PublishError: invalid JSON, a body that is neither an object nor an
            array of objects, or an event that breaks the rules above.
    """
    try:
        parsed = loads_json(body)
    except RemoteProtocolError as exc:
        raise PublishError(f"body is not valid JSON: {exc}") from None
    # Fewer brackets than the limit cannot nest deeper than it: the common
    # single event costs two C-level counts; a batch costs one walk.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and not is_within_depth(parsed):
        raise PublishError(f"body nests deeper than {MAX_DEPTH} levels")
    return check_events(parsed)


def check_events(parsed: object, *, what: str = "body") -> list[dict[str, object]]:
    """Validate what a publisher sent: one event object or a non-empty array of them.

    The publish API's body (after its depth check) and the publisher hub's
    ``events`` argument go through the same rules.

    Raises:
        PublishError: the value or one of its events breaks the rules above.
    """
    items = parsed if type(parsed) is list else [parsed]
    if not items:
        raise PublishError(f"{what} is an empty array: nothing to publish")
    if len(items) > MAX_EVENTS_PER_REQUEST:
        raise PublishError(f"at most {MAX_EVENTS_PER_REQUEST} events per request", status=413)
    events: list[dict[str, object]] = []
    for index, item in enumerate(items):
        if type(item) is not dict:
            raise PublishError(f"event {index}: expected a JSON object", index=index)
        _check_key(item, index, "site_id", required=True)
        _check_key(item, index, "user_id", required=False)
        _check_key(item, index, "id", required=False)
        events.append(item)
    return events
