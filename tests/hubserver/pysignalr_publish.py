"""A pysignalr publisher, run in its own process by test_server_pysignalr.py.

Usage: ``python pysignalr_publish.py URL TOKEN CALLS_JSON``

CALLS_JSON is a list of ``[hub, events]``: each is invoked as
``Publish(hub, events)`` (with an invocation id), one at a time, in order.
Prints ``{"open": true}`` once connected, then one JSON line per call:
``{"result": ...}`` or ``{"error": "..."}``. Exits 0 once every call is
answered, 1 if the client fails.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from pysignalr.client import SignalRClient
from pysignalr.messages import CompletionMessage


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


async def publish(url: str, token: str, calls: list[list[Any]]) -> int:
    client = SignalRClient(url, headers={"Authorization": f"Bearer {token}"}, retry_count=1)
    opened = asyncio.Event()
    answered: asyncio.Queue[CompletionMessage] = asyncio.Queue()

    async def on_open() -> None:
        opened.set()

    seen: set[str] = set()

    async def on_completion(message: Any) -> None:
        if message.invocation_id not in seen:  # an error reaches both callbacks
            seen.add(message.invocation_id)
            await answered.put(message)

    client.on_open(on_open)
    # pysignalr hands an error Completion to the error callback (and then the call's own).
    client.on_error(on_completion)
    runner = asyncio.create_task(client.run())
    waiter = asyncio.create_task(opened.wait())
    await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if not opened.is_set():
        exc = runner.exception() if not runner.cancelled() else None
        emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    emit({"open": True})
    for hub, events in calls:
        await client.send("Publish", [hub, events], on_invocation=on_completion)
        message = await asyncio.wait_for(answered.get(), 10)
        if message.error is not None:
            emit({"error": message.error})
        else:
            emit({"result": message.result})
    runner.cancel()
    return 0


def main() -> None:
    url, token, calls = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    sys.exit(asyncio.run(publish(url, token, calls)))


if __name__ == "__main__":
    main()
