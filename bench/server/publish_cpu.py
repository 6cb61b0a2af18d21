"""Server CPU per one-event publish, with its deliveries (issue #10, item 2).

    python -m bench.server.publish_cpu [--events 20000] [--connections 4]
        [--subscribers 2] [--sites 1] [--via http|hub] [--hubserver-src DIR]
        [--py-spy FILE]

Starts ``hubserver serve`` (development key, in-process backplane,
``LOAD_GENERATOR_ENV``) pinned to one core with ``taskset``, opens
``--subscribers`` WebSocket subscribers on each of ``--sites`` sites (a
process of their own), then publishes ``--events`` one-event requests, the
sites in turn, over ``--connections`` connections with one request in flight
on each: POSTs to ``/v1/events/entries`` on keep-alive connections
(``--via http``, the fanout profile's plain-socket publisher) or ``Publish``
invocations on the publisher hub (``--via hub``, ``hubserver-pubhub``'s).
``--sites 500`` is the many-sites shape: no two events in a row share a
site, so nothing coalesces into a shared frame. The client side runs on
another core. What it reports: server CPU (utime + stime from
``/proc/<pid>/stat``, the whole process tree) from the first publish until
every subscriber counted every event, divided by the events; and the exact
lost and duplicated counts, so that a fast wrong answer shows.

CPU per publish depends on the load (a busier server batches more per
wake-up), so compare runs with the same parameters on the same machine.
``--py-spy FILE`` records a raw profile of the server during the publishes
(py-spy's sampling adds some CPU: do not compare such a run's figures).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Final

from bench.profile import BenchError
from bench.server.hubpublisher import HUB_PUBLISH_PATH, HubPublisher
from bench.server.procs import REPO_ROOT, free_port, process_tree, start_server
from bench.server.publisher import EventFactory, Publisher, plan_requests
from bench.server.servers import (
    LOAD_GENERATOR_ENV,
    PUBLISH_PATH,
    SERVERS,
    add_hubserver_src_argument,
)
from bench.server.wire import (
    Dialect,
    Receiver,
    Tally,
    feed_opening,
    opening_frames,
    parse_upgrade_response,
    upgrade_request,
)

__all__ = ["main"]

FD_LIMIT: Final = 4096
OPEN_TIMEOUT: Final = 10.0
#: How long the subscribers may take after the last 202 to count the last event.
SETTLE_TIMEOUT: Final = 30.0


def _user_system_seconds(pids: list[int]) -> tuple[float, float]:
    """utime and stime of ``pids`` (fields 14 and 15 of proc(5)), in seconds."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as file:
                stat = file.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        user += int(fields[11])
        system += int(fields[12])
    ticks = os.sysconf("SC_CLK_TCK")
    return user / ticks, system / ticks


def _pin(core: int | None) -> None:
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})


def _subscribe(
    port: int, targets: list[str], expected: int, core: int | None, pipe: Connection
) -> None:
    """The subscribers' process: open, say so, count until told to stop; send the tallies."""
    _pin(core)
    selector = selectors.DefaultSelector()
    receiver = Receiver(Dialect.SIGNALR, sample_every=1_000_000)
    tallies: list[Tally] = []
    try:
        for target in targets:
            sock = socket.create_connection(("127.0.0.1", port), timeout=OPEN_TIMEOUT)
            request, _ = upgrade_request("127.0.0.1", port, target)
            sock.sendall(request)
            data = b""
            while (response := parse_upgrade_response(data)) is None:
                chunk = sock.recv(65536)
                if not chunk:
                    raise BenchError("the server closed a subscriber during its upgrade")
                data += chunk
            if response.status != 101:
                raise BenchError(f"subscriber upgrade refused: {response.status}")
            tally = Tally(expected)
            sock.sendall(opening_frames(Dialect.SIGNALR))
            rest = response.rest
            while True:
                is_open, replies, rest = feed_opening(Dialect.SIGNALR, tally, rest)
                if replies:
                    sock.sendall(replies)
                if is_open:
                    break
                rest = sock.recv(65536)
                if not rest:
                    raise BenchError("the server closed a subscriber during its handshake")
            if rest:
                receiver.feed(tally, rest, time.time_ns())
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, tally)
            tallies.append(tally)
        pipe.send("open")
        while True:
            if pipe.poll():
                if pipe.recv() == "stop":
                    break
                pipe.send([tally.distinct for tally in tallies])
            for key, _ in selector.select(0.05):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                try:
                    data = ready.recv(1 << 20)
                except BlockingIOError:
                    continue
                if not data:
                    selector.unregister(ready)
                    continue
                replies = receiver.feed(key.data, data, time.time_ns())
                if replies:
                    ready.sendall(replies)
        pipe.send(
            [{"received": t.received, "lost": t.lost, "duplicated": t.duplicated} for t in tallies]
        )
    except Exception as exc:
        pipe.send(f"error: {exc!r}")


def _wait_for(pipe: Connection, timeout: float) -> object:
    if not pipe.poll(timeout):
        raise BenchError(f"the subscribers did not answer within {timeout:g} s")
    answer: object = pipe.recv()
    if isinstance(answer, str) and answer.startswith("error"):
        raise BenchError(f"subscribers: {answer}")
    return answer


def run(args: argparse.Namespace) -> dict[str, object]:
    source = REPO_ROOT if args.hubserver_src is None else Path(args.hubserver_src).resolve()
    work_dir = Path(tempfile.mkdtemp(prefix="publish-cpu-"))
    server = None
    subscribers = None
    spy = None
    try:
        data_dir = work_dir / "data"
        credentials = SERVERS["hubserver"].prepare(data_dir, args.sites, source)
        port = free_port()
        command = SERVERS["hubserver"].command(port, data_dir)
        if args.server_core is not None and shutil.which("taskset"):
            command = ["taskset", "-c", str(args.server_core), *command]
        server = start_server(
            "hubserver",
            command,
            port=port,
            log_path=work_dir / "server.log",
            fd_limit=FD_LIMIT,
            env=LOAD_GENERATOR_ENV,
            cwd=source,
        )
        _pin(args.client_core)
        targets = [
            f"/v1/hub/entries?site_id=site-{site:05d}&access_token={credentials.hub_token}"
            for site in range(args.sites)
            for _ in range(args.subscribers)
        ]
        events_per_site = -(-args.events // args.sites)
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        subscribers = context.Process(
            target=_subscribe,
            args=(port, targets, events_per_site, args.client_core, theirs),
            daemon=True,
        )
        subscribers.start()
        if _wait_for(ours, 30.0) != "open":
            raise BenchError("the subscribers did not open")
        publisher: HubPublisher | Publisher
        if args.via == "hub":
            publisher = HubPublisher(
                "127.0.0.1",
                port,
                HUB_PUBLISH_PATH,
                credentials.publish_token or "",
                connections=args.connections,
            )
        else:
            publisher = Publisher(
                "127.0.0.1",
                port,
                PUBLISH_PATH,
                credentials.publish_token or "",
                connections=args.connections,
            )
        factory = EventFactory(args.sites)
        requests = plan_requests(args.sites, 1, events_per_site, 1)
        events = events_per_site * args.sites
        # Warm-up is not wanted: the first requests verify the token once per
        # connection, as a real publisher's would; over 20,000 that is noise.
        pids = process_tree(server.pid)
        if args.py_spy:
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            if not Path(py_spy).exists():
                raise BenchError("--py-spy needs py-spy (pip install py-spy)")
            spy = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "-r",
                    "500",
                    "-f",
                    "raw",
                    "-o",
                    str(args.py_spy),
                    "--pid",
                    str(server.pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        user_before, system_before = _user_system_seconds(pids)
        started = time.monotonic()
        result = publisher.run(requests, factory)
        published = time.monotonic()
        deadline = published + SETTLE_TIMEOUT
        while True:
            ours.send("count")
            counted = _wait_for(ours, SETTLE_TIMEOUT)
            assert isinstance(counted, list)
            if all(count >= events_per_site for count in counted):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"not every event arrived: {counted} of {result.events_accepted}")
            time.sleep(0.01)
        delivered = time.monotonic()
        user_after, system_after = _user_system_seconds(pids)
        ours.send("stop")
        tallies = _wait_for(ours, SETTLE_TIMEOUT)
        assert isinstance(tallies, list)
        publisher.close()
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its file
            spy.wait(timeout=60)
        user = user_after - user_before
        system = system_after - system_before
        cpu = user + system
        return {
            "hubserver_source": str(source),
            "events": args.events,
            "connections": args.connections,
            "subscribers": args.subscribers,
            "sites": args.sites,
            "via": args.via,
            "server_core": args.server_core,
            "client_core": args.client_core,
            "python": platform.python_version(),
            "accepted": result.events_accepted,
            "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
            "errors": dict(result.errors),
            "received": sum(t["received"] for t in tallies),
            "lost": sum(t["lost"] for t in tallies),
            "duplicated": sum(t["duplicated"] for t in tallies),
            "publish_seconds": round(published - started, 3),
            "until_delivered_seconds": round(delivered - started, 3),
            "publishes_per_second": round(events / (published - started)),
            "server_cpu_seconds": round(cpu, 3),
            "server_user_seconds": round(user, 3),
            "server_system_seconds": round(system, 3),
            "server_cpu_us_per_publish": round(cpu / events * 1e6, 1),
            "server_cpu_us_per_delivery": round(cpu / (events * args.subscribers) * 1e6, 1),
        }
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        if subscribers is not None and subscribers.is_alive():
            subscribers.kill()
        if server is not None:
            server.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.server.publish_cpu",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--events", type=int, default=20_000, help="one-event publishes")
    parser.add_argument("--connections", type=int, default=4, help="publish connections")
    parser.add_argument("--subscribers", type=int, default=2, help="subscribers of each site")
    parser.add_argument("--sites", type=int, default=1, help="sites, published to in turn")
    parser.add_argument(
        "--via", choices=("http", "hub"), default="http", help="POSTs or the publisher hub"
    )
    parser.add_argument("--server-core", type=int, default=0, help="taskset core of the server")
    parser.add_argument("--client-core", type=int, default=1, help="core of the clients")
    parser.add_argument("--py-spy", type=Path, metavar="FILE", help="record a raw py-spy profile")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the result here")
    add_hubserver_src_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        outcome = run(args)
    except BenchError as exc:
        print(f"publish_cpu: {exc}", file=sys.stderr)
        return 1
    for name, value in outcome.items():
        print(f"{name:28} {value}")
    if args.json is not None:
        args.json.write_text(json.dumps(outcome, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
