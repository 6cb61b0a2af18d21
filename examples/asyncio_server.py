"""A SignalR hub server on asyncio and websockets, embedding hubcore (README: Embedding hubcore).

python examples/asyncio_server.py --host 127.0.0.1 --port 5000 serves ws://HOST:PORT/hub to
clients that skip negotiation (JSON or MessagePack): Echo(x) answers x, every client gets
ReceiveMessage(text) every 0.5 s, and SIGTERM or Ctrl-C sends each a reconnectable Close.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from http import HTTPStatus
from time import monotonic as now  # asyncio's loop.time(), whose deadlines timeout_at takes

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed as WebSocketClosed
from websockets.http11 import Request, Response

import hubcore


class Client:
    """One hub connection: its WebSocket and hubcore's protocol state."""

    def __init__(self, ws: ServerConnection, limits: hubcore.HubLimits) -> None:
        self.ws = ws
        self.hub = hubcore.HubConnection(hubcore.Role.SERVER, now=now(), limits=limits)

    async def write(self, data: bytes) -> None:
        # JSON goes in text frames, MessagePack in binary ones, handshake errors in text.
        if data:
            await self.ws.send(data, text=self.hub.transfer_format is hubcore.TransferFormat.TEXT)


class HubServer:
    def __init__(self, limits: hubcore.HubLimits) -> None:
        self.limits = limits
        self.clients: set[Client] = set()

    async def handle(self, ws: ServerConnection) -> None:
        """One task per connection: it alone reads, answers and runs the timers."""
        client = Client(ws, self.limits)
        self.clients.add(client)
        try:
            with contextlib.suppress(WebSocketClosed):  # the client went away: nothing to say
                await self.serve(client)
        finally:
            self.clients.discard(client)

    async def serve(self, client: Client) -> None:
        hub = client.hub
        while True:
            try:
                async with asyncio.timeout_at(hub.next_deadline()):
                    data = await client.ws.recv()  # str for a text frame, bytes for binary
            except TimeoutError:
                await client.write(hub.handle_timer(now()))  # a Ping, or a timeout's last words
                if hub.timeout_kind is not None:
                    print(f"closing: {hub.timeout_kind.value} timeout", flush=True)
                    return
                continue
            hub.receive_data(data, now())
            try:
                while (event := hub.next_event()) is not None:
                    if not await self.on_event(client, event):
                        return
            except hubcore.RemoteProtocolError as exc:
                # A handshake error during the handshake, a Close after it.
                await client.write(hub.send(exc.reply, now()))
                return

    async def on_event(self, client: Client, event: hubcore.Event) -> bool:
        """Answer one event; False ends the connection."""
        hub = client.hub
        match event:
            case hubcore.HandshakeRequest():
                await client.write(hub.send(hubcore.HandshakeResponse(), now()))
            case hubcore.Invocation(target="Echo", arguments=[value], invocation_id=str(call)):
                await client.write(hub.send(hubcore.Completion.with_result(call, value), now()))
            case hubcore.Invocation(invocation_id=str(call)) | hubcore.StreamInvocation(
                invocation_id=call
            ):
                error = f"Unknown method '{event.target}' or wrong arguments."
                await client.write(hub.send(hubcore.Completion.with_error(call, error), now()))
            case hubcore.Close():
                await client.write(hub.send(hubcore.Close(), now()))  # a courtesy, as ASP.NET Core
                return False
            case hubcore.TransportClosed():
                return False
        return True  # Ping, a fire-and-forget Invocation, and the rest need no answer

    async def tick(self) -> None:
        """Broadcast: encoded once per protocol, one payload per group of connections."""
        count = 0
        while True:
            await asyncio.sleep(0.5)
            count += 1
            invocation = hubcore.Invocation(target="ReceiveMessage", arguments=[f"tick {count}"])
            message = hubcore.PreparedMessage(invocation)
            groups: dict[hubcore.HubProtocol, list[Client]] = {}
            for client in self.clients:
                protocol = client.hub.protocol
                if protocol is not None and client.hub.is_open:  # not in the handshake or closing
                    groups.setdefault(protocol, []).append(client)
            for protocol, members in groups.items():
                text = protocol.transfer_format is hubcore.TransferFormat.TEXT
                broadcast([c.ws for c in members], message.encoded(protocol), text=text)
                for client in members:
                    client.hub.note_sent(now())  # the keep-alive clock; not for stateful ones

    async def goodbye(self) -> None:
        """Shutting down: every open client gets a Close that allows reconnecting."""
        for client in list(self.clients):
            if client.hub.is_open:
                await client.write(client.hub.send(hubcore.Close(allow_reconnect=True), now()))
            await client.ws.close()


def only_the_hub(connection: ServerConnection, request: Request) -> Response | None:
    found = request.path.split("?")[0] == "/hub"
    return None if found else connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")


async def main(host: str, port: int, keepalive: float) -> None:
    # ASP.NET Core's 15 s keep-alive, 30 s client and 15 s handshake timeouts, scaled.
    server = HubServer(hubcore.HubLimits(keepalive_interval=keepalive, client_timeout=2 * keepalive,
                                         handshake_timeout=keepalive))  # fmt: skip
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    # The hub protocol has its own keep-alive: WebSocket pings would only add traffic.
    async with serve(
        server.handle, host, port, process_request=only_the_hub, ping_interval=None
    ) as listener:
        bound = next(iter(listener.sockets)).getsockname()[1]
        print(f"listening on ws://{host}:{bound}/hub", flush=True)
        ticker = asyncio.create_task(server.tick())
        await stop.wait()
        ticker.cancel()
        await server.goodbye()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000, help="0: any free port (printed)")
    parser.add_argument("--keepalive", type=float, default=15.0, help="Ping interval, s")
    asyncio.run(main(**vars(parser.parse_args())))
