"""``hubserver check``: will ``serve`` start, and can it reach what it needs?

For deploy pipelines and container health checks: the same settings as
``serve`` (flags, environment, ``--config``), then one line per check,
``ok`` or ``FAIL`` with the detail, and a non-zero exit on any failure.

The checks do what ``serve`` does at start, short of listening: they create
the data directory if it is missing (and, in development mode, the
development key), open the permission store, fetch the JWKS and ping Redis;
with ``--metrics-port``, they bind its address (and let it go). A metrics
port already held by a running hubserver (``check`` as a container health
check beside ``serve``) passes when that server answers ``/healthz`` there.
Each is bounded by ``CHECK_TIMEOUT``. Nothing they print holds a secret:
URLs go through ``redact_credentials``.
"""

from __future__ import annotations

import dataclasses
import errno
import resource
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from hubcore import HubError

from .auth import JwksCache, ensure_dev_key, load_jwks_file
from .backplane import RedisBackplane, RedisConnection, parse_redis_url
from .config import ConfigError, ServerConfig
from .config.settings import redact_credentials
from .config.sources import Origin, Settings
from .http._accept import descriptor_budget, fd_headroom
from .permissions import RedisPermissionStore

__all__ = ["CHECK_TIMEOUT", "CheckResult", "check_config", "run_checks"]

#: Seconds each check may take (a JWKS fetch, a Redis connection and PING).
CHECK_TIMEOUT: Final = 5.0
#: Seconds a program holding the metrics port has to answer ``GET /healthz``.
PROBE_TIMEOUT: Final = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class CheckResult:
    """One line of ``hubserver check``."""

    name: str
    is_ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.is_ok else 'FAIL':<5} {self.name:<12} {self.detail}"


class CheckFailed(Exception):
    """A check's failure, with what to print."""


def check_config(settings: Settings) -> tuple[CheckResult, ServerConfig | None]:
    """The settings make a configuration the server accepts (the first check)."""
    try:
        config = settings.server_config()
    except ConfigError as exc:
        return CheckResult("config", False, str(exc)), None
    origins = [
        f"{count} from {name}"
        for origin, name in (
            (Origin.FILE, str(settings.file)),
            (Origin.ENV, "the environment"),
            (Origin.FLAG, "flags"),
        )
        if (count := settings.count(origin))
    ]
    detail = "the defaults only" if not origins else ", ".join(origins) + ", the rest default"
    if config.is_dev_mode:
        detail += "; DEVELOPMENT MODE (no --jwks-file or --jwks-url)"
    return CheckResult("config", True, detail), config


async def run_checks(config: ServerConfig) -> list[CheckResult]:
    """Every check after the configuration's, in order; none stops the others."""
    checks: list[tuple[str, Callable[[ServerConfig], Awaitable[str]]]] = [
        ("data_dir", _data_dir),
        ("keys", _keys),
        ("backplane", _backplane),
        ("permissions", _permissions),
        ("descriptors", _descriptors),
    ]
    if config.metrics_port is not None:
        checks.append(("metrics_port", _metrics_port))
    results = []
    for name, check in checks:
        try:
            with trio.fail_after(CHECK_TIMEOUT):
                detail = await check(config)
        except trio.TooSlowError:
            results.append(CheckResult(name, False, f"no answer within {CHECK_TIMEOUT:g} s"))
        except (CheckFailed, HubError, OSError) as exc:
            results.append(CheckResult(name, False, str(exc)))
        else:
            results.append(CheckResult(name, True, detail))
    return results


async def _data_dir(config: ServerConfig) -> str:
    directory = config.data_dir
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # What the server writes there: a file it creates, writes and syncs.
        with tempfile.TemporaryFile(dir=directory) as probe:
            probe.write(b"hubserver check\n")
            probe.flush()
    except OSError as exc:
        raise CheckFailed(
            f"{directory} is not a writable directory: {exc.strerror or exc}"
        ) from exc
    free = shutil.disk_usage(directory).free
    return f"{directory.absolute()} is writable ({free / (1 << 30):.1f} GiB free)"


async def _keys(config: ServerConfig) -> str:
    if config.jwks_url is not None:
        cache = JwksCache(
            config.jwks_url,
            issuer=config.issuer,
            audience=config.audience,
            fetch_timeout=CHECK_TIMEOUT,
        )
        keys = await cache.refresh()
        where = redact_credentials(config.jwks_url)
        return f"{len(keys.keys)} signing key(s) from {where}"
    if config.jwks_file is not None:
        keys = load_jwks_file(config.jwks_file)
        return f"{len(keys.keys)} signing key(s) from {config.jwks_file}"
    key = ensure_dev_key(config.data_dir)
    return f"development key {key.kid} in {config.data_dir.absolute()} (development mode)"


async def _backplane(config: ServerConfig) -> str:
    if config.backplane is None:
        if config.broker_socket is not None:
            return "the --workers parent's broker"
        return "none: events stay in this process (no --backplane)"
    address = parse_redis_url(config.backplane)
    started = trio.current_time()
    async with await RedisConnection.connect(address) as connection:
        reply = await connection.execute("PING")
    if reply != b"PONG":
        raise CheckFailed(f"Redis at {address} answered PING with {reply!r}")
    elapsed_ms = (trio.current_time() - started) * 1000
    # The channel tells fleets sharing one Redis apart (it names the database).
    channel = RedisBackplane(config.backplane).channel
    return f"Redis at {address} answered PING in {elapsed_ms:.1f} ms (channel {channel})"


async def _permissions(config: ServerConfig) -> str:
    # The store serve would open, asked what serve asks of it.
    from .server import open_permission_store

    async with open_permission_store(config) as store:
        match config.permission_source:
            case "url":
                assert config.permissions_url is not None
                # Any well-formed answer will do; garbage or no answer fails.
                role = await store.role_of("hubserver-check", "hubserver-check")
                where = redact_credentials(config.permissions_url)
                answer = "null" if role is None else role.value
                return f"the permissions URL {where} answers a role lookup ({answer})"
            case "redis":
                assert config.backplane is not None
                assert isinstance(store, RedisPermissionStore)
                version = await store.version()
                address = parse_redis_url(config.backplane)
                return (
                    f"roles in Redis at {address} answer (version {version}, "
                    f"channel {store.channel})"
                )
            case _:
                version = await store.version()
                return (
                    f"SQLite store in {config.data_dir.absolute()} opens and answers "
                    f"(version {version})"
                )


async def _descriptors(config: ServerConfig) -> str:
    # As serve does: raise the soft limit to the hard one, then count.
    headroom = fd_headroom(has_metrics_listener=config.metrics_port is not None)
    budget = descriptor_budget(headroom)
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = config.max_connections
    if wanted is None:
        return f"--max-connections auto: {budget} (open-files limit {soft} minus {headroom})"
    if wanted > budget:
        raise CheckFailed(
            f"--max-connections {wanted} needs {wanted + headroom} open files; the limit is "
            f"{soft} (raise it: ulimit -n, or LimitNOFILE= in the systemd unit)"
        )
    return f"--max-connections {wanted} fits the open-files limit {soft}"


async def _metrics_port(config: ServerConfig) -> str:
    host, port = config.metrics_host, config.metrics_port
    assert port is not None  # only checked when set
    where = f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        # As serve binds it (trio sets SO_REUSEADDR): a port in TIME_WAIT is free.
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            bound = sock.getsockname()[1]
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise CheckFailed(
                f"cannot listen on {where} for /metrics: {exc.strerror or exc}"
            ) from exc
        bound = None
    if bound is None:
        if await _hubserver_answers(host, port):
            return f"{where} is in use by a running hubserver, which answers /healthz there"
        raise CheckFailed(f"{where} is in use by another program: /metrics cannot listen there")
    if port == 0:
        return f"{host} can be bound (any free port, {bound} this time), for /metrics"
    return f"http://{where}/metrics can be bound"


async def _hubserver_answers(host: str, port: int) -> bool:
    """Whether a hubserver answers ``GET /healthz`` at ``host:port`` (a wildcard
    address is asked on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    request = b"GET /healthz HTTP/1.1\r\nhost: hubserver-check\r\nconnection: close\r\n\r\n"
    answer = b""
    # A hubserver answers /healthz at once; another program may never answer.
    with trio.move_on_after(PROBE_TIMEOUT):
        try:
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(request)
                while len(answer) < 4096 and (chunk := await stream.receive_some(4096)):
                    answer += chunk
        except (OSError, trio.BrokenResourceError):
            return False
    head = answer.partition(b"\r\n\r\n")[0].lower()
    return head.startswith(b"http/1.1 200") and b"\r\nserver: hubserver" in head
