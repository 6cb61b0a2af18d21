"""``hubserver serve --workers N``: N worker processes on one port, one event stream.

The parent reserves the port, runs the shared event stream (the in-process
broker on a unix socket, unless ``--backplane`` names Redis, which the workers
then use directly), starts the workers and restarts any that dies. Each worker
is a plain ``hubserver serve`` listening with SO_REUSEPORT, so the kernel
spreads connections over them. SIGTERM/SIGINT drain every worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Final

import trio

from .backplane import Backplane, BrokerServer, MemoryBackplane
from .config import ServerConfig
from .routing import Broker, Router
from .server import build_backplane

__all__ = ["run_workers", "worker_count"]

log = logging.getLogger("hubserver.workers")

RESTART_DELAY: Final = 1.0


def worker_count(value: str) -> int:
    """``auto`` is one worker per core; otherwise a positive integer."""
    if value == "auto":
        return max(1, os.cpu_count() or 1)
    count = int(value)
    if count < 1:
        raise ValueError("--workers must be a positive integer or 'auto'")
    return count


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) with SO_REUSEPORT: fixes the port for the workers."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


async def run_workers(
    config: ServerConfig,
    count: int,
    worker_argv: Sequence[str],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Supervise ``count`` workers until SIGTERM/SIGINT, then drain them.

    Args:
        config: the parent's configuration.
        count: how many workers.
        worker_argv: ``hubserver serve`` arguments for a worker, without
            ``--workers``, ``--port`` and ``--demo``.
        task_status: receives the port once the workers are started.
    """
    config.data_dir.mkdir(parents=True, exist_ok=True)
    reserved = _reserve_port(config.host, config.port)
    port = reserved.getsockname()[1]
    extra = ["--port", str(port), "--reuse-port"]
    broker: BrokerServer | None = None
    if config.backplane is None:
        path = config.data_dir / f"broker-{os.getpid()}.sock"
        broker = BrokerServer(
            MemoryBackplane(
                history_size=config.history_size,
                dedupe_window=config.dedupe_window,
                max_dedupe_ids=config.max_dedupe_ids,
                max_sites=config.max_history_sites,
            ),
            path,
        )
        broker.listen()
        extra += ["--broker-socket", str(path)]
    env = {**os.environ, "HUBSERVER_WORKERS": "1", "HUBSERVER_DEMO": "0"}
    command = [sys.executable, "-m", "hubserver", "serve", *worker_argv, *extra]
    stopping = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            if broker is not None:
                await nursery.start(broker.serve)
            processes: dict[int, trio.Process] = {}
            for index in range(count):
                nursery.start_soon(_supervise, index, command, env, processes, stopping)
            if config.demo:
                from .demo import publish_demo_events

                demo_broker = Broker(Router(), _parent_backplane(config, broker), trio.current_time)
                nursery.start_soon(publish_demo_events, demo_broker.publish, config.demo_interval)
            log.info("%d workers on http://%s:%d", count, config.host, port)
            task_status.started(port)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s: draining the workers", signal.Signals(signum).name)
                    break
            stopping.set()
            for process in processes.values():
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            with trio.move_on_after(config.drain_timeout + 5.0):
                for process in list(processes.values()):
                    await process.wait()
            for process in processes.values():
                if process.returncode is None:
                    log.warning("worker %d did not stop in time; killing it", process.pid)
                    process.kill()
            nursery.cancel_scope.cancel()
    finally:
        reserved.close()


def _parent_backplane(config: ServerConfig, broker: BrokerServer | None) -> Backplane:
    if broker is not None:
        return broker.backplane
    return build_backplane(config)


async def _supervise(
    index: int,
    command: list[str],
    env: dict[str, str],
    processes: dict[int, trio.Process],
    stopping: trio.Event,
) -> None:
    while not stopping.is_set():
        process = await trio.lowlevel.open_process(command, env=env, stdin=subprocess.DEVNULL)
        processes[index] = process
        log.info("worker %d started (pid %d)", index, process.pid)
        with trio.CancelScope(shield=True):
            # Shielded: the parent waits for its workers even while being cancelled.
            code = await process.wait()
        if stopping.is_set():
            return
        log.error("worker %d (pid %d) exited with %s; restarting", index, process.pid, code)
        await trio.sleep(RESTART_DELAY)
