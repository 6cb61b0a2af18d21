"""``hubserver serve --workers N``: N worker processes on one port, one event stream.

The parent reserves the port (and the metrics listener's, with
``--metrics-port``: any worker answers a scrape there, for the whole node),
runs the shared event stream (the in-process
broker on a unix socket, unless ``--backplane`` names Redis, which the workers
then use directly), starts the workers and restarts any that dies. Each worker
is a plain ``hubserver serve`` listening with SO_REUSEPORT, so the kernel
spreads connections over them. SIGTERM/SIGINT drain every worker, however
many processes got the signal; a worker whose parent died drains and exits
within ``PARENT_GONE_EXIT_TIMEOUT``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Final

import trio
from prometheus_client.multiprocess import mark_process_dead

from .backplane import Backplane, BrokerServer
from .config import ServerConfig
from .metrics import MULTIPROCESS_ENV
from .routing import Broker, Router
from .server import build_backplane, build_memory_backplane

__all__ = ["PARENT_GONE_EXIT_TIMEOUT", "run_workers", "watch_parent", "worker_count"]

log = logging.getLogger("hubserver.workers")

RESTART_DELAY: Final = 1.0
MAX_RESTART_DELAY: Final = 30.0
#: Seconds the parent waits for draining workers beyond their drain timeout.
STOP_MARGIN: Final = 5.0
#: Seconds a worker whose parent died has to drain before it exits.
PARENT_GONE_EXIT_TIMEOUT: Final = 3.0


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

    Shutdown: the first SIGTERM or SIGINT is forwarded once, as SIGTERM, to
    every worker (needed when only the parent is signalled, as ``kill PID``
    does); each worker drains (its clients get a reconnectable Close) and the
    parent waits for them up to ``drain_timeout`` plus a margin, then kills
    what is left. When every process is signalled at once (systemd's
    ``KillMode=control-group``, Ctrl-C in a terminal), a worker gets two
    signals: it ignores all but the first (see ``__main__``), and so does the
    parent, so a repeated signal never cuts a drain short.

    Args:
        config: the parent's configuration.
        count: how many workers.
        worker_argv: ``hubserver serve`` arguments for a worker, without
            ``--workers``, ``--port``, ``--metrics-port`` and ``--demo``.
        task_status: receives the port once the workers are started.
    """
    config.data_dir.mkdir(parents=True, exist_ok=True)
    reserved = _reserve_port(config.host, config.port)
    port = reserved.getsockname()[1]
    metrics_reserved: socket.socket | None = None
    if config.metrics_port is not None:
        try:
            metrics_reserved = _reserve_port(config.metrics_host, config.metrics_port)
        except BaseException:
            reserved.close()
            raise
    # The workers' lifeline: they inherit the read end, only this process holds
    # the write end and never writes. However the parent ends (even SIGKILL),
    # the kernel closes the write end and every worker reads EOF.
    lifeline, lifeline_writer = os.pipe()
    extra = ["--port", str(port), "--reuse-port", "--parent-fd", str(lifeline)]
    if metrics_reserved is not None:
        extra += ["--metrics-port", str(metrics_reserved.getsockname()[1])]
    broker: BrokerServer | None = None
    if config.backplane is None:
        path = config.data_dir / f"broker-{os.getpid()}.sock"
        broker = BrokerServer(
            build_memory_backplane(config),
            path,
            max_queue_bytes=config.broker_max_queue_bytes,
        )
        broker.listen()
        extra += ["--broker-socket", str(path)]
    env = {**os.environ, "HUBSERVER_WORKERS": "1", "HUBSERVER_DEMO": "0"}
    env.pop(MULTIPROCESS_ENV, None)
    metrics_dir: Path | None = None
    if config.is_metrics_on:
        # /metrics of the node from any worker: prometheus-client's multiprocess
        # mode, its files in a directory of this run (emptied: stale files of an
        # earlier run would count).
        metrics_dir = config.data_dir / f"metrics-{os.getpid()}"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        env[MULTIPROCESS_ENV] = str(metrics_dir)
    command = [sys.executable, "-m", "hubserver", "serve", *worker_argv, *extra]
    stopping = trio.Event()
    try:
        # Open before the first worker starts and kept open to the end: a signal
        # is never left to its default action (which would kill the parent and
        # orphan the workers mid-drain).
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                if broker is not None:
                    await nursery.start(broker.serve)
                processes: dict[int, trio.Process] = {}
                for index in range(count):
                    nursery.start_soon(
                        _supervise, index, command, env, lifeline, processes, stopping
                    )
                if config.demo:
                    from .demo import publish_demo_events

                    demo_broker = Broker(
                        Router(), _parent_backplane(config, broker), trio.current_time
                    )
                    nursery.start_soon(
                        publish_demo_events, demo_broker.publish, config.demo_interval
                    )
                log.info("%d workers on http://%s:%d", count, config.host, port)
                if metrics_reserved is not None:
                    # A line of its own: the one above is read for the main port.
                    log.info(
                        "metrics of the %d workers on http://%s:%d/metrics",
                        count,
                        config.metrics_host,
                        metrics_reserved.getsockname()[1],
                    )
                task_status.started(port)
                async for signum in signals:
                    log.info("received %s: draining the workers", signal.Signals(signum).name)
                    break
                stopping.set()
                nursery.start_soon(_ignore_signals, signals)
                for process in processes.values():
                    if process.returncode is None:
                        process.send_signal(signal.SIGTERM)
                with trio.move_on_after(config.drain_timeout + STOP_MARGIN):
                    for process in list(processes.values()):
                        await process.wait()
                for process in processes.values():
                    if process.returncode is None:
                        log.warning("worker %d did not stop in time; killing it", process.pid)
                        process.kill()
                nursery.cancel_scope.cancel()
    finally:
        reserved.close()
        if metrics_reserved is not None:
            metrics_reserved.close()
        os.close(lifeline)
        os.close(lifeline_writer)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


async def _ignore_signals(signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        # Not forwarded again: the workers got one already and are draining.
        log.info("received %s again: already draining", signal.Signals(signum).name)


async def watch_parent(fd: int, on_gone: Callable[[], None]) -> None:
    """In a worker: call ``on_gone`` once the parent's lifeline pipe ends.

    The parent never writes to the pipe; EOF means it exited, however it
    exited. (Linux's ``PR_SET_PDEATHSIG`` is not used: it fires when the
    *thread* that spawned the child ends, and trio spawns from a worker thread
    that its thread cache retires when idle.)

    Args:
        fd: the inherited read end; this call owns and closes it.
        on_gone: called once, at EOF.
    """
    async with trio.lowlevel.FdStream(fd) as pipe:
        while await pipe.receive_some(1024):
            pass
    on_gone()


def _parent_backplane(config: ServerConfig, broker: BrokerServer | None) -> Backplane:
    if broker is not None:
        return broker.backplane
    return build_backplane(config)


async def _supervise(
    index: int,
    command: list[str],
    env: dict[str, str],
    lifeline: int,
    processes: dict[int, trio.Process],
    stopping: trio.Event,
) -> None:
    delay = RESTART_DELAY
    while not stopping.is_set():
        try:
            process = await trio.lowlevel.open_process(
                command, env=env, stdin=subprocess.DEVNULL, pass_fds=(lifeline,)
            )
        except OSError as exc:
            # Out of processes or memory, the interpreter replaced by a deploy:
            # the other workers and the event stream carry on; try again later.
            log.error("worker %d could not be started: %s; retrying in %g s", index, exc, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, MAX_RESTART_DELAY)
            continue
        delay = RESTART_DELAY
        processes[index] = process
        log.info("worker %d started (pid %d)", index, process.pid)
        if stopping.is_set():
            # Started while the others were told to stop: this one missed it.
            process.send_signal(signal.SIGTERM)
        with trio.CancelScope(shield=True):
            # Shielded: the parent waits for its workers even while being cancelled.
            code = await process.wait()
        if MULTIPROCESS_ENV in env:
            # Its live gauges (open connections, queued bytes) no longer count.
            mark_process_dead(process.pid, env[MULTIPROCESS_ENV])  # type: ignore[no-untyped-call]
        if stopping.is_set():
            log.info("worker %d (pid %d) stopped with exit code %s", index, process.pid, code)
            return
        log.error("worker %d (pid %d) exited with %s; restarting", index, process.pid, code)
        await trio.sleep(RESTART_DELAY)
