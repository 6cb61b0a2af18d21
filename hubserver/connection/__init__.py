"""Hub connections: one per upgraded WebSocket, split by the state each part owns.

``_state`` (phases and their table), ``_outbound`` (queued bytes, the budget,
the writer), ``_resume`` (what a resume sends, sans-IO), ``_guard`` (the
connection's tasks and their failures), ``_session`` (the glue, one task).
"""

from __future__ import annotations

from ._context import ReplayFn, SessionContext, SessionStats
from ._resume import MAX_RESUME_SEQ
from ._session import ACCESS_REVOKED_TEXT, HubSession

__all__ = [
    "ACCESS_REVOKED_TEXT",
    "MAX_RESUME_SEQ",
    "HubSession",
    "ReplayFn",
    "SessionContext",
    "SessionStats",
]
