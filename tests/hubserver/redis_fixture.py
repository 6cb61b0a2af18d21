"""A real redis-server per test session (or per test), on a free port of 127.0.0.1.

Tests never touch a Redis they did not start: ``RedisServer`` runs
``redis-server`` as a subprocess on a port picked free, without persistence,
in a temporary directory, and kills it at teardown. ``stop()`` and ``start()``
take it down and bring it back on the same port (the data is gone: nothing is
saved), for the tests of losing Redis; ``pause()`` and ``resume()`` freeze it
and let it go on (a Redis that hangs, its data intact).

Fixtures (import the ``*_fixture`` functions into a test module to use them):

- ``redis_server``: one server for the session; tests isolate themselves with
  their own key prefix and channel.
- ``own_redis_server``: a server for one test, for tests that stop it or
  change its configuration.

Both skip the test, with the reason, when redis-server is not installed.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import hiredis
import pytest

__all__ = [
    "RedisServer",
    "own_redis_server_fixture",
    "redis_server_fixture",
    "require_redis_server",
    "start_redis_server",
]

REDIS_SERVER = shutil.which("redis-server")
SKIP_REASON = "redis-server is not installed (CI installs it: apt-get install redis-server)"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.01


def require_redis_server() -> str:
    """The redis-server path, or skip the calling test."""
    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    return REDIS_SERVER


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int, timeout: float) -> bool:
    """True when something on the port answers PING with a RESP reply (even -NOAUTH)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reader = hiredis.Reader()
            while (reply := reader.gets()) is False:
                data = sock.recv(1024)
                if not data:
                    return False
                reader.feed(data)
            return reply is not None
    except OSError:
        return False


class RedisServer:
    """One redis-server subprocess on 127.0.0.1.

    Args:
        directory: its working directory (and log file).
        extra_args: more command-line options, e.g. ``("--requirepass", "s3cret")``.
    """

    def __init__(self, directory: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.executable = require_redis_server()
        self.directory = directory
        self.extra_args = extra_args
        self.port = _free_port()
        self.log_path = directory / f"redis-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start on ``self.port`` and return once it answers PING."""
        assert not self.is_running, "redis-server is already running"
        self._process = subprocess.Popen(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.log_path),
                *self.extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not _ping(self.port, timeout=0.2):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server did not start on {self.port}:\n{self._log_tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def stop(self) -> None:
        """Terminate it (clients see their connections closed); no-op when stopped."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections stay open, nothing answers, the data stays."""
        assert self._process is not None and self.is_running
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server run again (SIGCONT)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"


def start_redis_server(directory: Path, extra_args: tuple[str, ...] = ()) -> RedisServer:
    """Start a redis-server in ``directory`` (retried on a new port if the free one got taken)."""
    # A port found free may be taken before redis-server binds it: try a few.
    for attempt in range(3):
        server = RedisServer(directory, extra_args)
        try:
            server.start()
        except RuntimeError:
            if attempt == 2:
                raise
            continue
        return server
    raise AssertionError("unreachable")


@pytest.fixture(scope="session", name="redis_server")
def redis_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session."""
    require_redis_server()
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="own_redis_server")
def own_redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for one test (which may stop and start it)."""
    require_redis_server()
    server = start_redis_server(tmp_path)
    try:
        yield server
    finally:
        server.stop()
