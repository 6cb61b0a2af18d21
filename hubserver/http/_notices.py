"""``POST /v1/permissions/changed``: the access-control backend says a role changed.

The body is ``{"site_id": S, "subject": U}``. The answer comes once the
notice is on its way to every node (202), or, when the store could not reach
the other nodes, once it was applied on this node only (503: the backend
should retry). Each node drops what it cached of the pair and re-checks the
pair's open connections at once. The token and its ``event_streaming.admin``
scope are checked by ``_routes`` before this runs.
"""

from __future__ import annotations

import json
from typing import Final

from hubserver.permissions import MAX_ID_CHARS, is_id

from ._request import JSON, Refusal, Request, Response, refusal_response

__all__ = ["MAX_NOTICE_BYTES", "PERMISSIONS_CHANGED_PATH", "permission_notice"]

PERMISSIONS_CHANGED_PATH: Final = "/v1/permissions/changed"
#: Two ids of MAX_ID_CHARS, each character JSON-escaped (\uXXXX), and the rest.
MAX_NOTICE_BYTES: Final = 2 * 6 * MAX_ID_CHARS + 1024
_ACCEPTED: Final = Response(202, b'{"notified":"all nodes"}', JSON)
_THIS_NODE_ONLY: Final = Refusal(
    503,
    "unavailable",
    "the change was applied on this node only: the other nodes could not be told; retry",
    extra={"outcome": "this_node_only"},
)


async def permission_notice(request: Request) -> Response:
    """Read the notice and pass it on (see the module docstring)."""
    body = await request.io.read_body(MAX_NOTICE_BYTES)
    if body is None:
        return _refuse(413, "too_large", f"the body is larger than {MAX_NOTICE_BYTES} bytes")
    try:
        notice = json.loads(body)
    except (ValueError, RecursionError):
        return _refuse(400, "invalid_body", "the body is not JSON")
    if not isinstance(notice, dict):
        return _refuse(400, "invalid_body", 'expected {"site_id": ..., "subject": ...}')
    site_id, subject = notice.get("site_id"), notice.get("subject")
    for name, value in (("site_id", site_id), ("subject", subject)):
        if not is_id(value):
            return _refuse(
                400,
                "invalid_body",
                f"'{name}' must be a non-empty string of at most {MAX_ID_CHARS} characters"
                " (UTF-8 text)",
            )
    assert isinstance(site_id, str) and isinstance(subject, str)
    if not await request.io.app.permissions_changed(site_id, subject):
        return refusal_response(_THIS_NODE_ONLY, is_json=True)
    return _ACCEPTED


def _refuse(status: int, code: str, message: str) -> Response:
    return refusal_response(Refusal(status, code, message), is_json=True)
