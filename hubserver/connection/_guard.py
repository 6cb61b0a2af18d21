"""The guard every task of a connection runs under.

A connection's helper tasks (a writer while output waits, a resume's history
fetch) live in the server's connection nursery, not in a nursery of their
own: an idle connection must stay one task and a few KiB. So the nursery
cannot be what contains their failures. The guard is: each task runs in a
cancel scope the guard owns, a failure (any ``Exception``) ends that
connection only (logged once, with its id, and counted), and ending the
connection cancels whatever of its tasks still runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVarTuple, Unpack

import trio

__all__ = ["TaskGuard"]

log = logging.getLogger("hubserver.connection")

Ts = TypeVarTuple("Ts")


def _late_crash(exc: BaseException) -> None:
    log.error("a connection's task failed after the connection ended", exc_info=exc)


class TaskGuard:
    """Starts a connection's tasks, contains their failures, cancels them at its end.

    Args:
        nursery: where the tasks run (it outlives every connection).
        on_crash: called once, with the exception, when a task of this
            connection fails; it ends the connection.
    """

    __slots__ = ("_is_closed", "_nursery", "_on_crash", "_scopes")

    def __init__(self, nursery: trio.Nursery, on_crash: Callable[[BaseException], None]) -> None:
        self._nursery = nursery
        self._on_crash = on_crash
        # Only while a task runs: most connections never start one.
        self._scopes: set[trio.CancelScope] | None = None
        self._is_closed = False

    def start_soon(self, fn: Callable[[Unpack[Ts]], Awaitable[object]], *args: *Ts) -> None:
        """Run ``fn(*args)`` under the guard (nothing happens once the guard is closed)."""
        if not self._is_closed:
            self._nursery.start_soon(self._run, fn, args)

    async def _run(self, fn: Callable[..., Awaitable[object]], args: tuple[object, ...]) -> None:
        if self._is_closed:
            return
        scope = trio.CancelScope()
        if self._scopes is None:
            self._scopes = set()
        self._scopes.add(scope)
        try:
            with scope:
                await self.run(fn, *args)
        finally:
            if self._scopes is not None:
                self._scopes.discard(scope)
                if not self._scopes:
                    self._scopes = None

    async def run(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Await ``fn(*args)`` in the caller's task; a failure goes to ``on_crash``."""
        try:
            await fn(*args)
        except Exception as exc:
            self._on_crash(exc)

    def close(self) -> None:
        """Cancel the tasks still running; start no more."""
        self._is_closed = True
        self._on_crash = _late_crash  # no reference cycle through the owner's bound method
        scopes, self._scopes = self._scopes, None
        for scope in scopes or ():
            scope.cancel()
