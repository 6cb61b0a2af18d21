"""Hub connections, whatever their transport, split by the state each part owns.

``_state`` (phases and their table), ``_resume`` (what a resume sends,
sans-IO), ``_deadlines``, ``_guard`` (the connection's tasks and their
failures), ``_publish`` (the publisher hub's calls), ``_session`` (the glue,
one task). The bytes' way (reading, the output queue and its budget, the
framing) is the transport's: ``hubserver.transports``.
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
