"""The servers a profile can compare, and how each is started and addressed.

Every server runs as a subprocess of the bench on 127.0.0.1 with a free port
and a fresh temporary directory; the load client and the publisher are the
same for all of them, only the URL (and, for socketio, the dialect) differ.

- ``hubserver``: ``python -m hubserver serve`` in development mode. Before it
  starts, the bench creates the dev key in the data directory, mints a hub
  token and a publish token, and makes the subscriber Site Admin of every
  site in the SQLite store.
- ``aiosignalr``, ``socketio``, ``ceiling``: ``bench.server.peers``; no auth.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.profile import BenchError
from bench.server.procs import REPO_ROOT, ServerProcess, free_port, python, start_server
from bench.server.publisher import site_name
from bench.server.wire import Dialect

__all__ = [
    "SERVERS",
    "Credentials",
    "ServerKind",
    "describe_hubserver",
    "launch",
    "peer_versions",
    "parse_servers",
]

PUBLISH_PATH: Final = "/v1/events/entries"


@dataclass(frozen=True, slots=True)
class Credentials:
    """Tokens for one server run (None where the server checks none)."""

    hub_token: str | None = None
    publish_token: str | None = None


@dataclass(frozen=True, slots=True)
class ServerKind:
    """A server under test."""

    name: str
    dialect: Dialect
    module: str
    extra_args: tuple[str, ...] = ()

    def command(self, port: int, data_dir: Path) -> list[str]:
        if self.name == "hubserver":
            return [
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
                *self.extra_args,
            ]
        return [python(), "-m", self.module, "--port", str(port), *self.extra_args]

    def prepare(self, data_dir: Path, sites: int, source: Path) -> Credentials:
        """Keys, tokens and grants the server needs before it starts.

        For hubserver this runs ``bench.server.hubprep`` in ``source`` (the
        hubserver being measured), not in the bench's own process.
        """
        if self.name != "hubserver":
            return Credentials()
        done = subprocess.run(
            [python(), "-m", "bench.server.hubprep", str(data_dir), str(sites)],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"hubserver from {source}: preparing failed:\n{done.stderr[-2000:]}")
        tokens = json.loads(done.stdout.strip().splitlines()[-1])
        return Credentials(tokens["hub_token"], tokens["publish_token"])

    def hub_target(self, site: int, credentials: Credentials) -> str:
        """The request target a subscriber of ``site`` upgrades on."""
        if self.dialect is Dialect.ENGINEIO:
            return f"/socket.io/?EIO=4&transport=websocket&site_id={site_name(site)}"
        target = f"/v1/hub/entries?site_id={site_name(site)}"
        if credentials.hub_token is not None:
            target += f"&access_token={credentials.hub_token}"
        return target


SERVERS: Final = {
    kind.name: kind
    for kind in (
        ServerKind("hubserver", Dialect.SIGNALR, "hubserver"),
        ServerKind("aiosignalr", Dialect.SIGNALR, "bench.server.peers.aiosignalr_peer"),
        ServerKind("socketio", Dialect.ENGINEIO, "bench.server.peers.socketio_peer"),
        ServerKind("ceiling", Dialect.SIGNALR, "bench.server.peers.ceiling"),
    )
}


def parse_servers(text: str) -> tuple[str, ...]:
    """``hubserver,ceiling`` -> ("hubserver", "ceiling"); raises ValueError for unknown names."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in SERVERS]
    if unknown or not names:
        raise ValueError(f"unknown server(s) {unknown}; choose from {', '.join(SERVERS)}")
    return names


def launch(
    kind: ServerKind,
    work_dir: Path,
    *,
    sites: int,
    fd_limit: int,
    hubserver_source: Path | None = None,
) -> tuple[ServerProcess, Credentials]:
    """Prepare and start ``kind`` with its data in ``work_dir``.

    ``hubserver_source`` is a directory holding ``hubserver/`` and ``hubcore/``
    to run instead of this checkout's (it becomes the working directory, which
    ``python -m`` puts first on ``sys.path``).
    """
    data_dir = work_dir / "data"
    source = REPO_ROOT
    if kind.name == "hubserver" and hubserver_source is not None:
        source = hubserver_source.resolve()
    credentials = kind.prepare(data_dir, sites, source)
    port = free_port()
    server = start_server(
        kind.name,
        kind.command(port, data_dir),
        port=port,
        log_path=work_dir / f"{kind.name}.log",
        fd_limit=fd_limit,
        cwd=source,
    )
    return server, credentials


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
        "numpy",
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
