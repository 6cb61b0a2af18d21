"""A pysignalr subscriber, run in its own process by test_server_pysignalr.py.

Usage: ``python pysignalr_listen.py URL TOKEN COUNT [--skip-negotiation]``

Prints one JSON line per step on stdout: ``{"open": true}`` once the hub
handshake is done, ``{"message": <the ReceiveMessage argument>}`` per event,
and ``{"error": "<type>: <text>"}`` if the client fails. Exits 0 after COUNT
messages, 1 on failure.

pysignalr (asyncio) has no public switch to skip negotiation; with
``--skip-negotiation`` this script sets its transport's ``_skip_negotiation``
(the constructor argument ``SignalRClient`` does not pass through).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from pysignalr.client import SignalRClient


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


async def listen(url: str, token: str, count: int, *, skip_negotiation: bool) -> int:
    client = SignalRClient(url, headers={"Authorization": f"Bearer {token}"}, retry_count=1)
    if skip_negotiation:
        client._transport._skip_negotiation = True
    received: list[str] = []
    done = asyncio.Event()

    async def on_open() -> None:
        emit({"open": True})

    async def on_message(arguments: list[Any]) -> None:
        (text,) = arguments
        received.append(text)
        emit({"message": text})
        if len(received) >= count:
            done.set()

    client.on_open(on_open)
    client.on("ReceiveMessage", on_message)
    runner = asyncio.create_task(client.run())
    waiter = asyncio.create_task(done.wait())
    await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if done.is_set():
        runner.cancel()
        return 0
    waiter.cancel()
    exc = runner.exception() if not runner.cancelled() else None
    emit({"error": f"{type(exc).__name__}: {exc}"})
    return 1


def main() -> None:
    url, token, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    skip = "--skip-negotiation" in sys.argv[4:]
    sys.exit(asyncio.run(listen(url, token, count, skip_negotiation=skip)))


if __name__ == "__main__":
    main()
