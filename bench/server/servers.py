"""The servers a profile can compare, and how each is started and addressed.

Every server runs as a subprocess of the bench on 127.0.0.1 with a free port
and a fresh temporary directory; the load client and the publisher are the
same for all of them, only the URL (and, for socketio, the dialect) differ.

- ``hubserver``: ``python -m hubserver serve`` in development mode. Before it
  starts, the bench creates the dev key in the data directory, mints a hub
  token and a publish token, and makes the subscriber Site Admin of every
  site in the SQLite store.
- ``hubserver-w2``: the same with ``--workers 2``: a parent process (the
  in-process broker on a unix socket) and two workers sharing the port with
  SO_REUSEPORT. The bench waits until both workers listen.
- ``hubserver-redis2``: two ``hubserver serve --backplane redis://...`` nodes
  on two ports, sharing one data directory and one redis-server that the
  bench starts on a free port (no persistence) and stops at the end. The
  subscribers are split evenly over the nodes; the publisher posts to node 1.
- ``hubserver-pubhub``: one ``hubserver serve`` process, like ``hubserver``,
  whose events the bench publishes over the publisher hub
  (``/v1/hub/publish``, ``bench.server.hubpublisher``) instead of HTTP POSTs.
- ``hubserver-nometrics``: ``hubserver`` with ``--metrics off`` (no
  /metrics, no histogram observations, no event-loop lag probe): beside
  ``hubserver`` in one run, the A/B of what the metrics cost (issue #12). A
  flag, not ``HUBSERVER_METRICS``: a ``--hubserver-src`` tree without the
  setting then fails to start instead of measuring metrics on as off.
- ``aiosignalr``, ``socketio``, ``ceiling``: ``bench.server.peers``; no auth.

The scale-out layouts (``hubserver-w2``, ``hubserver-redis2``) are chosen
with ``--servers``; by default a profile runs ``DEFAULT_SERVERS`` (the
``fanout`` profile: ``FANOUT_DEFAULT_SERVERS``, with ``hubserver-pubhub``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.profile import BenchError
from bench.server.procs import (
    REPO_ROOT,
    ServerGroup,
    ServerProcess,
    free_ports,
    listening_sockets,
    python,
    start_server,
)
from bench.server.publisher import site_name
from bench.server.wire import Dialect

__all__ = [
    "DEFAULT_SERVERS",
    "FANOUT_DEFAULT_SERVERS",
    "HTTP_PUBLISH",
    "HUB_PUBLISH",
    "SERVERS",
    "Credentials",
    "add_hubserver_src_argument",
    "ServerKind",
    "describe_hubserver",
    "launch",
    "peer_versions",
    "parse_servers",
    "redis_server_binary",
]

PUBLISH_PATH: Final = "/v1/events/entries"
#: How the bench publishes to a server: HTTP POSTs, or the publisher hub.
HTTP_PUBLISH: Final = "http"
HUB_PUBLISH: Final = "hub"
READY_TIMEOUT: Final = 30.0


@dataclass(frozen=True, slots=True)
class Credentials:
    """Tokens for one server run (None where the server checks none)."""

    hub_token: str | None = None
    publish_token: str | None = None
    #: One hub token per subscriber subject (``hub_token`` is the first).
    hub_tokens: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerKind:
    """A server under test."""

    name: str
    dialect: Dialect
    module: str
    extra_args: tuple[str, ...] = ()
    #: hubserver ``--workers``: processes sharing one port.
    workers: int = 1
    #: separate nodes on ports of their own sharing a Redis backplane (1: no Redis).
    nodes: int = 1
    #: how the bench publishes: ``HTTP_PUBLISH`` or ``HUB_PUBLISH`` (hubserver only).
    publish: str = HTTP_PUBLISH

    @property
    def is_hubserver(self) -> bool:
        return self.module == "hubserver"

    @property
    def is_scale_out(self) -> bool:
        return self.workers > 1 or self.nodes > 1

    @property
    def layout(self) -> str:
        """How the server is laid out, for a table cell."""
        if self.nodes > 1:
            return f"{self.nodes} nodes + redis"
        if self.workers > 1:
            return f"{self.workers} workers"
        return "1 process"

    def command(self, port: int, data_dir: Path, backplane: str | None = None) -> list[str]:
        if self.is_hubserver:
            command = [
                python(),
                "-m",
                "hubserver",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
                "--log-level",
                "warning",
            ]
            if self.workers > 1:
                command += ["--workers", str(self.workers)]
            if backplane is not None:
                command += ["--backplane", backplane]
            return [*command, *self.extra_args]
        return [python(), "-m", self.module, "--port", str(port), *self.extra_args]

    def prepare(self, data_dir: Path, sites: int, source: Path, subjects: int = 1) -> Credentials:
        """Keys, tokens and grants the server needs before it starts.

        For hubserver this runs ``bench.server.hubprep`` in ``source`` (the
        hubserver being measured), not in the bench's own process;
        ``subjects`` subscriber subjects get a hub token each.
        """
        if not self.is_hubserver:
            return Credentials()
        command = [python(), "-m", "bench.server.hubprep", str(data_dir), str(sites)]
        if subjects > 1:
            command.append(str(subjects))
        done = subprocess.run(
            command,
            cwd=source,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"hubserver from {source}: preparing failed:\n{done.stderr[-2000:]}")
        tokens = json.loads(done.stdout.strip().splitlines()[-1])
        # An older hubprep (``--hubserver-src``) mints one subject only.
        hub_tokens = tuple(tokens.get("hub_tokens", [tokens["hub_token"]]))
        return Credentials(tokens["hub_token"], tokens["publish_token"], hub_tokens)

    def hub_target(self, site: int, credentials: Credentials, subject: int = 0) -> str:
        """The request target a subscriber of ``site`` upgrades on, as subject
        ``subject`` (modulo the subjects there are tokens for)."""
        if self.dialect is Dialect.ENGINEIO:
            return f"/socket.io/?EIO=4&transport=websocket&site_id={site_name(site)}"
        target = f"/v1/hub/entries?site_id={site_name(site)}"
        token = credentials.hub_token
        if credentials.hub_tokens:
            token = credentials.hub_tokens[subject % len(credentials.hub_tokens)]
        if token is not None:
            target += f"&access_token={token}"
        return target


SERVERS: Final = {
    kind.name: kind
    for kind in (
        ServerKind("hubserver", Dialect.SIGNALR, "hubserver"),
        ServerKind("hubserver-w2", Dialect.SIGNALR, "hubserver", workers=2),
        ServerKind("hubserver-redis2", Dialect.SIGNALR, "hubserver", nodes=2),
        ServerKind("hubserver-pubhub", Dialect.SIGNALR, "hubserver", publish=HUB_PUBLISH),
        ServerKind(
            "hubserver-nometrics", Dialect.SIGNALR, "hubserver", extra_args=("--metrics", "off")
        ),
        ServerKind("aiosignalr", Dialect.SIGNALR, "bench.server.peers.aiosignalr_peer"),
        ServerKind("socketio", Dialect.ENGINEIO, "bench.server.peers.socketio_peer"),
        ServerKind("ceiling", Dialect.SIGNALR, "bench.server.peers.ceiling"),
    )
}
#: What a profile runs without ``--servers``: hubserver beside its peers.
DEFAULT_SERVERS: Final = ("hubserver", "aiosignalr", "socketio", "ceiling")
#: The ``fanout`` profile's: publishing over HTTP and over the publisher hub.
FANOUT_DEFAULT_SERVERS: Final = (
    "hubserver",
    "hubserver-pubhub",
    "aiosignalr",
    "socketio",
    "ceiling",
)


def add_server_arguments(
    parser: argparse.ArgumentParser, defaults: tuple[str, ...] = DEFAULT_SERVERS
) -> None:
    """The options every server profile shares: which servers, and which hubserver code."""
    add_hubserver_src_argument(parser)
    parser.add_argument(
        "--servers",
        default=",".join(defaults),
        help="comma-separated, from: "
        + ", ".join(SERVERS)
        + " (hubserver-w2: --workers 2; hubserver-redis2: two nodes sharing a redis-server "
        "the bench starts; hubserver-pubhub: events published over /v1/hub/publish; "
        "hubserver-nometrics: --metrics off, to compare with hubserver)",
    )


def add_hubserver_src_argument(parser: argparse.ArgumentParser) -> None:
    """``--hubserver-src DIR``: which hubserver code a profile runs."""
    parser.add_argument(
        "--hubserver-src",
        type=Path,
        metavar="DIR",
        help="run the hubserver/ and hubcore/ found in DIR (e.g. a `git archive` export) "
        "instead of this checkout's",
    )


def parse_servers(text: str) -> tuple[str, ...]:
    """``hubserver,ceiling`` -> ("hubserver", "ceiling"); raises ValueError for unknown names."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in SERVERS]
    if unknown or not names:
        raise ValueError(f"unknown server(s) {unknown}; choose from {', '.join(SERVERS)}")
    return names


#: Every load client connects from 127.0.0.1, most with one token subject: a
#: server's per-address and per-subject limits (issue #9) would refuse the load
#: generator itself. The grants are made in the data directory's SQLite file
#: (``hubprep``, before any Redis starts), which the ``hubserver-redis2`` nodes
#: share; with a backplane roles would otherwise be read from Redis (issue #12).
#: Set through the environment, which a ``--hubserver-src`` tree without those
#: settings ignores.
LOAD_GENERATOR_ENV: Final = {
    "HUBSERVER_MAX_CONNECTIONS_PER_IP": "0",
    "HUBSERVER_MAX_HUB_CONNECTIONS_PER_SUBJECT": "0",
    "HUBSERVER_PERMISSIONS": "sqlite",
}


def launch(
    kind: ServerKind,
    work_dir: Path,
    *,
    sites: int,
    fd_limit: int,
    hubserver_source: Path | None = None,
    subjects: int = 1,
) -> tuple[ServerGroup, Credentials]:
    """Prepare and start ``kind`` with its data in ``work_dir``.

    ``hubserver_source`` is a directory holding ``hubserver/`` and ``hubcore/``
    to run instead of this checkout's (it becomes the working directory, which
    ``python -m`` puts first on ``sys.path``). The nodes of a layout share one
    data directory (one development key, one permission store), as the
    workers of ``--workers`` do.

    Raises:
        BenchError: a part did not start (with its log's tail); whatever had
            started is stopped.
    """
    data_dir = work_dir / "data"
    source = REPO_ROOT
    if kind.is_hubserver and hubserver_source is not None:
        source = hubserver_source.resolve()
    credentials = kind.prepare(data_dir, sites, source, subjects)
    group = ServerGroup(kind.name)
    try:
        backplane = None
        if kind.nodes > 1:
            redis = _start_redis(work_dir)
            group.helpers.append(redis)
            backplane = f"redis://127.0.0.1:{redis.port}/0"
        for index, port in enumerate(free_ports(kind.nodes)):
            name = kind.name if kind.nodes == 1 else f"{kind.name} node {index + 1}"
            node = start_server(
                name,
                kind.command(port, data_dir, backplane),
                port=port,
                log_path=work_dir / f"{name.replace(' ', '-')}.log",
                fd_limit=fd_limit,
                cwd=source,
                env=LOAD_GENERATOR_ENV if kind.is_hubserver else None,
            )
            group.nodes.append(node)
        if kind.is_scale_out:
            _wait_ready(group, kind.workers)
    except BaseException:
        group.stop()
        raise
    return group, credentials


def redis_server_binary() -> str | None:
    """The redis-server the Redis layout starts (PATH, then /usr/bin), or None."""
    found = shutil.which("redis-server")
    if found is None and Path("/usr/bin/redis-server").exists():
        found = "/usr/bin/redis-server"
    return found


def _start_redis(work_dir: Path) -> ServerProcess:
    binary = redis_server_binary()
    if binary is None:
        raise BenchError("hubserver-redis2 needs redis-server (apt-get install redis-server)")
    (port,) = free_ports(1)
    command = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(work_dir),
    ]
    return start_server(
        "redis-server",
        command,
        port=port,
        log_path=work_dir / "redis-server.log",
        fd_limit=4096,
        cwd=work_dir,
    )


def _wait_ready(group: ServerGroup, workers: int) -> None:
    """Every worker of every node listens, and ``/readyz`` says ready on every node.

    The port accepts as soon as one worker listens; connecting then would put
    every subscriber on that worker, so the listening sockets are counted.
    ``/readyz`` is asked a few times per worker on fresh connections, which
    SO_REUSEPORT spreads over the workers.
    """
    deadline = time.monotonic() + READY_TIMEOUT
    for node in group.nodes:
        while listening_sockets(node.port) < workers:
            _check_deadline(group, node, deadline, f"{workers} listening sockets")
            time.sleep(0.05)
        ready = 0
        while ready < 4 * workers:
            ready = ready + 1 if _is_ready(node.port) else 0
            if not ready:
                _check_deadline(group, node, deadline, "GET /readyz 200")
                time.sleep(0.05)


def _check_deadline(group: ServerGroup, node: ServerProcess, deadline: float, what: str) -> None:
    status = group.exit_status()
    if status:
        raise BenchError(f"{group.name}: {status}")
    if time.monotonic() > deadline:
        raise BenchError(
            f"{node.name}: no {what} on port {node.port} within {READY_TIMEOUT:g} s:\n"
            + node.log_tail()
        )


def _is_ready(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2.0)
    try:
        connection.request("GET", "/readyz")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def peer_versions() -> dict[str, str]:
    """Versions of what the peers run on (the machine section lists hubserver's)."""
    from importlib import metadata

    versions = {}
    for name in (
        "aiosignalr",
        "aiohttp",
        "python-socketio",
        "python-engineio",
        "uvicorn",
        "websockets",
        "trio",
        "h11",
        "wsproto",
    ):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def describe_hubserver(source: Path | None) -> str:
    """Which hubserver is measured: a directory, or this checkout's commit (+ changes)."""
    if source is not None:
        return str(source.resolve())
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "hubserver", "hubcore"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"working tree {REPO_ROOT}"
    return f"working tree {REPO_ROOT} at {head}" + (" + uncommitted changes" if dirty else "")
