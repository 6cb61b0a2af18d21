"""Processes the bench starts: a server under test and a pool of load clients.

CPU and memory come from ``/proc``: a process tree's CPU is utime + stime of
every live process in it (a server's workers and threads included: the tree is
found by walking the ``ppid`` of every ``/proc/*/stat``), its memory the sum of
their ``VmRSS``. A server under test is a ``ServerGroup``: one node for most,
several nodes for a scale-out layout, plus helpers such as a redis-server whose
CPU is counted apart. Everything started here is stopped by its own pid
(process group) when the run ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Final

from bench.profile import BenchError
from bench.server.loadclient import ClientOptions, raise_fd_limit, run_client

__all__ = [
    "ClientPool",
    "ServerGroup",
    "ServerProcess",
    "cpu_seconds",
    "free_port",
    "free_ports",
    "listening_sockets",
    "machine_busy_seconds",
    "rss_bytes",
    "self_cpu_seconds",
    "start_server",
]

_TICKS: Final = os.sysconf("SC_CLK_TCK")
_READY_TIMEOUT: Final = 30.0
REPO_ROOT: Final = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held together while choosing)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


_LISTEN: Final = b"0A"
_ESTABLISHED: Final = b"01"


def _tcp_sockets() -> Iterator[tuple[int, bytes, bytes]]:
    """(local port, state, inode) of every TCP socket, from ``/proc/net/tcp*``."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, "rb") as file:
                lines = file.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is ADDRESS:PORT in hex; field 3 the state; field 9 the inode.
            if len(fields) > 9:
                yield int(fields[1].rsplit(b":", 1)[1], 16), fields[3], fields[9]


def listening_sockets(port: int) -> int:
    """How many sockets listen on TCP ``port`` (IPv4 and IPv6).

    With SO_REUSEPORT every worker has a listening socket of its own; a socket
    that is only bound (as ``hubserver --workers`` reserves the port) is not counted.
    """
    return sum(1 for local, state, _ in _tcp_sockets() if state == _LISTEN and local == port)


def _established_inodes(ports: set[int]) -> set[str]:
    """Socket inodes of the established TCP connections whose local port is in ``ports``."""
    return {
        inode.decode()
        for local, state, inode in _tcp_sockets()
        if state == _ESTABLISHED and local in ports
    }


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as file:
                stat = file.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    children = _children()
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def _cpu_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(b")") + 2 :].split()
    # Fields 14 and 15 of proc(5) (utime, stime), counted after the comm field.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes so far."""
    return sum(_cpu_of(pid) for pid in pids)


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (``/proc/stat``: not idle, not iowait)."""
    with open("/proc/stat", "rb") as file:
        fields = [int(value) for value in file.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _TICKS


def self_cpu_seconds() -> float:
    """This process's CPU seconds (the publisher runs here)."""
    return _cpu_of(os.getpid())


def rss_bytes(pids: Sequence[int]) -> int:
    """Resident memory of these processes (sum of ``VmRSS``)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as file:
                for line in file:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


@dataclass(slots=True)
class ServerProcess:
    """A server under test, started by ``start_server``."""

    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tree(self) -> list[int]:
        return process_tree(self.popen.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.tree())

    def rss_bytes(self) -> int:
        return rss_bytes(self.tree())

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM its process group, then SIGKILL what is left after a few seconds."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


@dataclass(slots=True)
class ServerGroup:
    """A server under test: its nodes (each a process tree) and their helpers.

    Most servers are one node. ``hubserver --workers 2`` is one node whose
    tree holds the parent and its workers; two hubserver nodes sharing a Redis
    backplane are two nodes plus the redis-server as a helper. The server's
    CPU and memory are its nodes' trees; a helper's CPU is read apart. The
    first node is where the publisher posts.
    """

    name: str
    nodes: list[ServerProcess] = field(default_factory=list)
    helpers: list[ServerProcess] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.nodes[0].port

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def pid(self) -> int:
        return self.nodes[0].pid

    def tree(self) -> list[int]:
        return [pid for node in self.nodes for pid in node.tree()]

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.tree())

    def helper_cpu_seconds(self) -> float:
        return cpu_seconds([pid for helper in self.helpers for pid in helper.tree()])

    def roles(self) -> dict[int, str]:
        """Every process of the nodes and helpers: pid -> role.

        Roles: ``main`` for a lone process, ``node N``, ``parent`` and
        ``worker N`` (children in pid order), ``node N worker M``, and a
        helper's name (``redis-server``).
        """
        out: dict[int, str] = {}
        for index, node in enumerate(self.nodes):
            prefix = f"node {index + 1}" if len(self.nodes) > 1 else ""
            pids = node.tree()
            children = sorted(pids[1:])
            out[node.pid] = f"{prefix} parent".strip() if children else (prefix or "main")
            for number, pid in enumerate(children, 1):
                out[pid] = f"{prefix} worker {number}".strip()
        for helper in self.helpers:
            for pid in helper.tree():
                out[pid] = helper.name
        return out

    def cpu_by_process(self) -> dict[int, tuple[str, float]]:
        """Every process of the nodes and helpers: pid -> (role, CPU seconds so far)."""
        return {pid: (role, _cpu_of(pid)) for pid, role in self.roles().items()}

    def connections_by_process(self) -> dict[str, int]:
        """Established TCP connections on the nodes' ports, by the role of the process
        holding them (how SO_REUSEPORT spread them over the workers)."""
        inodes = _established_inodes(set(self.ports))
        out: dict[str, int] = {}
        for pid, role in self.roles().items():
            if role == "parent" or any(role == helper.name for helper in self.helpers):
                continue
            count = 0
            try:
                for entry in os.scandir(f"/proc/{pid}/fd"):
                    try:
                        link = os.readlink(entry.path)
                    except OSError:
                        continue
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        count += 1
            except OSError:
                continue
            out[role] = count
        return out

    def rss_bytes(self) -> int:
        return rss_bytes(self.tree())

    def is_alive(self) -> bool:
        return all(part.is_alive() for part in (*self.nodes, *self.helpers))

    def exit_status(self) -> str:
        """Which part exited and how, with its log's tail (empty while all run)."""
        for part in (*self.nodes, *self.helpers):
            if not part.is_alive():
                return f"{part.name} exited with {part.popen.returncode}: {part.log_tail(5)}"
        return ""

    def log_tail(self, lines: int = 15) -> str:
        parts = [*self.nodes, *self.helpers]
        if len(parts) == 1:
            return parts[0].log_tail(lines)
        tails = []
        for part in parts:
            tail = part.log_tail(lines)
            if tail:
                tails.append(f"[{part.name}]\n{tail}")
        return "\n".join(tails)

    def stop(self) -> None:
        """Stop the nodes (last first), then the helpers."""
        for part in (*reversed(self.nodes), *reversed(self.helpers)):
            with contextlib.suppress(Exception):
                part.stop()


def _preexec(fd_limit: int) -> Callable[[], None]:
    def preexec() -> None:
        raise_fd_limit(fd_limit)

    return preexec


def start_server(
    name: str,
    command: Sequence[str],
    *,
    port: int,
    log_path: Path,
    fd_limit: int,
    env: dict[str, str] | None = None,
    cwd: Path = REPO_ROOT,
) -> ServerProcess:
    """Start ``command`` in its own process group and wait until ``port`` accepts.

    Raises:
        BenchError: it exited or did not listen within 30 s (with its log's tail).
    """
    log = log_path.open("wb")
    try:
        popen = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            preexec_fn=_preexec(fd_limit),  # the bench starts no threads
        )
    finally:
        log.close()
    server = ServerProcess(name, popen, port, log_path)
    deadline = time.monotonic() + _READY_TIMEOUT
    while True:
        if not server.is_alive():
            raise BenchError(
                f"{name} exited with status {popen.returncode} before listening:\n"
                + server.log_tail()
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return server
        if time.monotonic() > deadline:
            server.stop()
            raise BenchError(f"{name} did not listen on port {port} within {_READY_TIMEOUT:g} s")
        time.sleep(0.05)


@dataclass(slots=True)
class ClientPool:
    """Load-client processes and their command pipes."""

    processes: list[multiprocessing.process.BaseProcess] = field(default_factory=list)
    pipes: list[Connection] = field(default_factory=list)
    #: Answers that arrived while another kind was awaited, per process.
    _early: list[dict[str, dict[str, Any]]] = field(default_factory=list)

    @classmethod
    def start(cls, count: int, options: ClientOptions) -> ClientPool:
        context = multiprocessing.get_context("spawn")
        pool = cls()
        try:
            for _ in range(count):
                parent, child = context.Pipe()
                process = context.Process(target=run_client, args=(child, options), daemon=True)
                process.start()
                child.close()
                pool.processes.append(process)
                pool.pipes.append(parent)
                pool._early.append({})
        except BaseException:
            pool.stop()
            raise
        return pool

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def cpu_each(self) -> list[float]:
        return [cpu_seconds([pid]) for pid in self.pids]

    def send(self, index: int, message: tuple[Any, ...]) -> None:
        self.pipes[index].send(message)

    def broadcast(self, message: tuple[Any, ...]) -> None:
        for pipe in self.pipes:
            pipe.send(message)

    def collect(self, kind: str, timeout: float) -> list[dict[str, Any]]:
        """One ``kind`` answer from every process, in process order.

        Raises:
            BenchError: a process died or did not answer in time.
        """
        answers: dict[int, dict[str, Any]] = {}
        for index, early in enumerate(self._early):
            if kind in early:
                answers[index] = early.pop(kind)
        deadline = time.monotonic() + timeout
        while len(answers) < len(self.pipes):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"load clients did not answer {kind!r} within {timeout:g} s")
            waiting = [p for i, p in enumerate(self.pipes) if i not in answers]
            ready = wait(waiting, timeout=min(remaining, 0.5))
            for index, pipe in enumerate(self.pipes):
                if pipe not in ready:
                    continue
                try:
                    answer = pipe.recv()
                except (EOFError, OSError):
                    raise BenchError(f"load client {index} died") from None
                if answer[0] == kind:
                    answers[index] = answer[1]
                else:
                    self._early[index][answer[0]] = answer[1]
            for index, process in enumerate(self.processes):
                if index not in answers and not process.is_alive():
                    raise BenchError(f"load client {index} exited ({process.exitcode})")
        return [answers[i] for i in range(len(self.pipes))]

    def poll(self, kind: str) -> list[dict[str, Any]] | None:
        """Every process's ``kind`` answer if all have arrived by now, else None (no wait)."""
        for index, pipe in enumerate(self.pipes):
            while kind not in self._early[index] and pipe.poll():
                try:
                    answer = pipe.recv()
                except (EOFError, OSError):
                    raise BenchError(f"load client {index} died") from None
                self._early[index][answer[0]] = answer[1]
        if all(kind in early for early in self._early):
            return [early.pop(kind) for early in self._early]
        for index, process in enumerate(self.processes):
            if not process.is_alive():
                raise BenchError(f"load client {index} exited ({process.exitcode})")
        return None

    def ask(self, kind: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Send ``(kind,)`` to every process and collect the answers of the same kind."""
        answer = {"progress": "progress", "measure": "measuring", "report": "report"}[kind]
        self.broadcast((kind,))
        return self.collect(answer, timeout)

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError, BrokenPipeError, ValueError):
                pipe.send(("close",))
        deadline = time.monotonic() + 5
        for process in self.processes:
            process.join(timeout=max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=2)
        for pipe in self.pipes:
            pipe.close()


@contextlib.contextmanager
def running(*stoppables: Any) -> Iterator[None]:
    """Stop every object (``.stop()``) on the way out, in reverse order."""
    try:
        yield
    finally:
        for item in reversed(stoppables):
            if item is not None:
                with contextlib.suppress(Exception):
                    item.stop()


def python() -> str:
    """The interpreter the servers run with (the bench's own, i.e. the venv's)."""
    return sys.executable
