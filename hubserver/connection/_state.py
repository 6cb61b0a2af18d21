"""A hub connection's life, as a small table (the model is ``hubcore/_state.py``).

Theory of operation. A connection is born when its upgrade is accepted and
registered, in UPGRADING: before its 101 goes out, so that a role change or
a drain during that write reaches it (and, since only the 101's writer may
write then, is acted on once the connection's task runs). It is in HANDSHAKE
until hubcore accepts the hub handshake. OPEN is the only phase in which it
is in its group and receives events. CLOSING means we have said goodbye: our
close frame is queued behind what waits, and the connection has
``CLOSE_TIMEOUT`` to get it out and hear the peer's. CLOSED means the socket
is closed: nothing more is read or written, and every wait of the
connection's tasks has been woken.

Reading has its own small state, kept by the transport's inbound side
(``hubserver.transports.Reading``): the peer can stop talking while we still
write, and the server stops reading a client whose output is over its budget.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["Move", "Phase", "next_phase"]


class Phase(enum.Enum):
    #: Registered; its 101 is being written (nothing else may write yet).
    UPGRADING = "upgrading"
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Move(enum.Enum):
    #: The 101 went out: the connection's task runs.
    UPGRADED = "upgraded"
    HANDSHAKE_OK = "handshake ok"
    #: Say goodbye: leave the group, queue the close frame.
    FINISH = "finish"
    #: End now: close the socket.
    ABORT = "abort"


_TRANSITIONS: Final[dict[tuple[Phase, Move], Phase]] = {
    (Phase.UPGRADING, Move.UPGRADED): Phase.HANDSHAKE,
    (Phase.UPGRADING, Move.ABORT): Phase.CLOSED,
    (Phase.HANDSHAKE, Move.HANDSHAKE_OK): Phase.OPEN,
    (Phase.HANDSHAKE, Move.FINISH): Phase.CLOSING,
    (Phase.OPEN, Move.FINISH): Phase.CLOSING,
    (Phase.HANDSHAKE, Move.ABORT): Phase.CLOSED,
    (Phase.OPEN, Move.ABORT): Phase.CLOSED,
    (Phase.CLOSING, Move.ABORT): Phase.CLOSED,
}


def next_phase(phase: Phase, move: Move) -> Phase:
    """The phase after ``move``.

    Raises:
        RuntimeError: ``move`` is not allowed in ``phase`` (a bug of ours,
            never the peer's doing: callers check the phase first).
    """
    try:
        return _TRANSITIONS[phase, move]
    except KeyError:
        raise RuntimeError(f"cannot {move.value} a connection that is {phase.value}") from None
