"""How a change notice received by one node (or worker) reaches the others.

The URL store's notices (``POST /v1/permissions/changed``) arrive wherever
the balancer, or the kernel under ``--workers``, sends the backend's request.
A `NoticeRelay` carries them to every process that caches answers:

- `NoticeChannel` (``_notices``): a Redis channel, for a fleet with ``--backplane``.
- `WorkerNoticeChannel`: the ``--workers`` parent's broker, for the workers of
  one node without Redis. The parent keeps nothing: a worker that was not
  listening (its stream lost, or dropped for not reading) re-checks every open
  connection when it listens again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from hubserver.backplane import BackplaneError, BrokerMessages

from ._notices import _decoded
from ._store import PermissionChange, PermissionStoreUnavailable

__all__ = ["NoticeRelay", "WorkerNoticeChannel"]


class NoticeRelay(Protocol):
    """Sends notices to every process that shares a store's answers, and hears theirs."""

    async def publish(self, data: bytes) -> None:
        """Send one notice (``encode_notice``) to every process, this one included.

        Raises:
            PermissionStoreUnavailable: it could not be sent.
        """
        ...

    async def run(self, on_notice: Callable[[PermissionChange], None]) -> None:
        """Hand every notice to ``on_notice`` until cancelled; never raises for the relay.

        A notice that may have been missed is reported as ``pairs=None``.
        """
        ...

    async def aclose(self) -> None:
        """Release what the relay holds."""
        ...


class WorkerNoticeChannel:
    """A `NoticeRelay` between the workers of one node, through the parent's broker.

    Args:
        socket_path: the ``--workers`` parent's broker socket.
        op_timeout: seconds a notice may take to reach the parent.
    """

    def __init__(self, socket_path: Path, *, op_timeout: float = 2.0) -> None:
        self._messages = BrokerMessages(socket_path, op_timeout=op_timeout)

    async def publish(self, data: bytes) -> None:
        """See `NoticeRelay.publish`."""
        try:
            await self._messages.send(data)
        except BackplaneError as exc:
            raise PermissionStoreUnavailable(
                f"could not pass a change notice to the other workers: {exc}"
            ) from exc

    async def run(self, on_notice: Callable[[PermissionChange], None]) -> None:
        """See `NoticeRelay.run`."""
        await self._messages.run(
            lambda data: on_notice(_decoded(data)),
            # Notices relayed while this worker was not listening are lost.
            lambda: on_notice(PermissionChange(pairs=None)),
        )

    async def aclose(self) -> None:
        """Nothing to release: each notice uses a connection of its own."""
