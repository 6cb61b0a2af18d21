"""``serve``: listeners, background tasks and graceful shutdown, in one nursery tree.

The root nursery owns the accept loops (the main port's, and the metrics
listener's with ``--metrics-port``), the permission watcher and the demo
publisher; connections live in a separate handler nursery, so shutdown can
stop accepting first, then ask every hub connection to close (a Close that
allows reconnect), then give them ``drain_timeout`` before cancelling.
"""

from __future__ import annotations

import logging
import shlex
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial

import trio

from hubcore import Close

from .app import App
from .auth import (
    CachingVerifier,
    JwksCache,
    StaticKeys,
    TokenVerifier,
    ensure_dev_key,
    load_jwks_file,
)
from .backplane import Backplane, MemoryBackplane, RedisBackplane, UnixBackplane
from .config import ServerConfig, read_token_file
from .config.settings import redact_credentials
from .connection import ACCESS_REVOKED_TEXT, HubSession, SessionContext
from .http import handle_connection, handle_internal_connection
from .http._accept import (
    METRICS_MAX_CONNECTIONS,
    ConnectionGate,
    accept_connections,
    descriptor_budget,
    fd_headroom,
)
from .logs import MAX_FIELD_CHARS, session_fields
from .metrics import SYNC_INTERVAL, Metrics
from .permissions import (
    CachedPermissionStore,
    ChangeFeed,
    NoticeRelay,
    PermissionStore,
    PermissionStoreError,
    PermissionStoreUnavailable,
    RedisPermissionStore,
    SqlitePermissionStore,
    UrlPermissionStore,
    WorkerNoticeChannel,
    may_subscribe,
    watch_permissions,
)
from .permissions._sqlite import FILE_NAME as SQLITE_FILE_NAME
from .routing import Broker, Router
from .timers import TimerQueue

#: Room for a Publish invocation's own bytes around its events.
PUBLISH_INVOCATION_OVERHEAD = 4096
#: Pairs a re-check of open connections asks the store about at once. The URL
#: store sends 8 requests at a time; SQLite answers one at a time from its
#: thread; more would only queue inside the store.
MAX_CONCURRENT_RECHECKS = 16

__all__ = [
    "RunningServer",
    "build_verifier",
    "open_permission_store",
    "read_permissions_url_token",
    "serve",
]

#: Seconds between the event-loop lag probe's wake-ups.
LOOP_LAG_INTERVAL = 0.5
log = logging.getLogger("hubserver")

SHUTDOWN_TEXT = None  # ASP.NET Core's graceful close carries no error text (spec §5)


@dataclass(slots=True)
class RunningServer:
    """What ``serve`` reports through ``task_status.started``."""

    port: int
    app: App
    _shutdown: trio.Event
    #: The metrics listener's port (``--metrics-port``; 0 there is resolved here).
    metrics_port: int | None = None

    def request_shutdown(self) -> None:
        """Start a graceful shutdown (what SIGTERM and SIGINT do)."""
        self._shutdown.set()


def build_verifier(config: ServerConfig) -> TokenVerifier:
    """The token verifier the configuration asks for (dev key when no JWKS)."""
    if config.jwks_file is not None:
        return StaticKeys(
            keys=load_jwks_file(config.jwks_file),
            issuer=config.issuer,
            audience=config.audience,
            leeway=config.token_leeway,
        )
    if config.jwks_url is not None:
        return JwksCache(
            config.jwks_url,
            issuer=config.issuer,
            audience=config.audience,
            leeway=config.token_leeway,
        )
    dev = ensure_dev_key(config.data_dir)
    if config.issuer is None and config.audience is None:
        return dev.verifier(leeway=config.token_leeway)
    return StaticKeys(
        keys=dev.key_set(),
        issuer=config.issuer,
        audience=config.audience,
        leeway=config.token_leeway,
    )


def build_backplane(config: ServerConfig) -> Backplane:
    """Redis when ``--backplane`` is given, the parent's broker for a worker, else in-process."""
    if config.backplane is not None:
        return RedisBackplane(
            config.backplane,
            history_size=config.history_size,
            dedupe_window=config.dedupe_window,
        )
    if config.broker_socket is not None:
        return UnixBackplane(config.broker_socket)
    return build_memory_backplane(config)


def build_memory_backplane(config: ServerConfig) -> MemoryBackplane:
    """The in-process backplane (this process's, or the ``--workers`` parent's)."""
    return MemoryBackplane(
        history_size=config.history_size,
        dedupe_window=config.dedupe_window,
        max_dedupe_ids=config.max_dedupe_ids,
        max_sites=config.max_history_sites,
        max_history_bytes=config.max_history_bytes,
    )


@asynccontextmanager
async def open_permission_store(config: ServerConfig) -> AsyncIterator[PermissionStore]:
    """The store ``config.permission_source`` names, closed at the end of the block.

    Raises:
        PermissionStoreError: the SQLite file cannot be opened.
        ConfigError: ``--permissions-url-token-file`` cannot be read.
    """
    match config.permission_source:
        case "redis":
            assert config.backplane is not None  # checked by ServerConfig
            _warn_of_unused_sqlite_roles(config)
            async with RedisPermissionStore(config.backplane) as redis_store:
                yield redis_store
        case "url":
            assert config.permissions_url is not None  # checked by ServerConfig
            relay: str | NoticeRelay | None = config.backplane
            if relay is None and config.broker_socket is not None:
                # A --workers worker without Redis: a notice must reach the
                # other workers of this node too, through the parent.
                relay = WorkerNoticeChannel(config.broker_socket)
            url_store = UrlPermissionStore(
                config.permissions_url,
                ttl=config.permissions_ttl,
                relay=relay,
                token=read_permissions_url_token(config),
            )
            try:
                yield url_store
            finally:
                with trio.CancelScope(shield=True):
                    await url_store.aclose()
        case _:
            with SqlitePermissionStore.open(config.data_dir) as sqlite_store:
                yield sqlite_store


def read_permissions_url_token(config: ServerConfig) -> str | None:
    """The token of ``--permissions-url-token-file``, or None without one.

    Raises:
        ConfigError: the file cannot be read or does not hold one token.
    """
    path = config.permissions_url_token_file
    return None if path is None else read_token_file(path)


def _warn_of_unused_sqlite_roles(config: ServerConfig) -> None:
    """Say so when this node's SQLite file holds grants that Redis now stands in for.

    With ``--backplane`` roles live in Redis unless ``--permissions sqlite``:
    a node upgraded with grants in its file would otherwise refuse their
    holders (403) without a word.
    """
    path = config.data_dir / SQLITE_FILE_NAME
    if not path.exists():
        return
    try:
        with SqlitePermissionStore.open(config.data_dir) as sqlite_store:
            count = len(sqlite_store.list())
    except PermissionStoreError as exc:
        log.debug("could not read %s: %s", path, exc)
        return
    if count:
        # The backplane URL's password stays out of the log: the operator adds it.
        command = (
            f"hubserver members import --from-sqlite {shlex.quote(str(path.absolute()))} "
            f"--redis {shlex.quote(redact_credentials(config.backplane or ''))}"
        )
        log.warning(
            "roles are read from the backplane's Redis (--permissions redis, the default with "
            "--backplane); the %d grant(s) in %s are not used. Copy them into Redis with "
            "`%s` (add --dry-run first to see what it would do), or run with "
            "--permissions sqlite",
            count,
            path,
            command,
            extra={"event": "sqlite_roles_unused", "command": command},
        )


async def open_listeners(host: str, port: int, *, reuse_port: bool) -> list[trio.SocketListener]:
    """The listeners of one address: SO_REUSEPORT's (a ``--workers`` worker), or trio's."""
    if reuse_port:
        return [reuse_port_listener(host, port)]
    return await trio.open_tcp_listeners(port, host=host)


def reuse_port_listener(host: str, port: int) -> trio.SocketListener:
    """A listener with SO_REUSEPORT: the kernel spreads connections over the workers."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def serve(
    config: ServerConfig,
    *,
    store: PermissionStore | None = None,
    verifier: TokenVerifier | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until a shutdown is requested and connections have drained.

    Args:
        config: the validated configuration.
        store: the permission store; by default the one ``config`` names
            (``open_permission_store``).
        verifier: the token verifier; by default from ``config``.
        task_status: receives a ``RunningServer`` once listening.
    """
    if store is None:
        async with open_permission_store(config) as own_store:
            await serve(config, store=own_store, verifier=verifier, task_status=task_status)
        return
    if verifier is None:
        verifier = build_verifier(config)
    router = Router()
    app = App(
        config=config,
        metrics=Metrics() if config.is_metrics_on else None,
        verifier=CachingVerifier(verifier),
        store=CachedPermissionStore(store),
        permission_feed=store if isinstance(store, ChangeFeed) else None,
        router=router,
        broker=Broker(
            router,
            build_backplane(config),
            trio.current_time,
            publish_window=config.publish_window,
            site_idle_timeout=config.site_idle_timeout,
        ),
    )
    await _run(app, task_status)


async def _run(app: App, task_status: trio.TaskStatus[RunningServer]) -> None:
    config = app.config
    metrics = app.metrics
    listeners = await open_listeners(config.host, config.port, reuse_port=config.reuse_port)
    port = listeners[0].socket.getsockname()[1]
    metrics_listeners: list[trio.SocketListener] = []
    if config.metrics_port is not None:
        try:
            metrics_listeners = await open_listeners(
                config.metrics_host, config.metrics_port, reuse_port=config.reuse_port
            )
        except BaseException:
            for listener in listeners:
                listener.socket.close()
            raise
    metrics_port = metrics_listeners[0].socket.getsockname()[1] if metrics_listeners else None
    shutdown = trio.Event()
    try:
        async with trio.open_nursery() as handlers:
            # Sessions' helper tasks (writers, resumes) and their shared timer task
            # live beside the connections, through the drain.
            timers = TimerQueue()
            handlers.start_soon(timers.run)
            publish_latency = None
            if metrics is not None:  # --metrics off: no probe, no observation
                handlers.start_soon(_watch_loop_lag, metrics)
                if metrics.is_multiprocess:
                    handlers.start_soon(_sync_metrics, app, metrics)
                app.broker.lag_observer = metrics.delivery_lag.observe
                publish_latency = metrics.observe_hub_publish
            app.sessions = SessionContext(
                limits=config.hub_limits,
                max_outbox_bytes=config.max_outbox_bytes,
                slow_client_timeout=config.slow_client_timeout,
                resume_window=config.resume_window,
                stateful_reconnect_window=config.stateful_reconnect_window,
                join=app.join,
                leave=app.leave,
                replay=app.broker.replay,
                stats=app.stats,
                timers=timers,
                tasks=handlers,
                publish=app.broker.publish,
                publish_latency=publish_latency,
                # A publisher's message may carry what a publish request's body may
                # (plus the invocation around it).
                publisher_limits=replace(
                    config.hub_limits,
                    max_message_bytes=max(
                        config.hub_limits.max_message_bytes,
                        config.max_publish_bytes + PUBLISH_INVOCATION_OVERHEAD,
                    ),
                ),
            )
            async with trio.open_nursery() as root:
                accept_scope = trio.CancelScope()
                # Raised to the hard limit in any case: an explicit --max-connections
                # above what the descriptors allow would meet EMFILE, not its 503.
                headroom = fd_headroom(has_metrics_listener=bool(metrics_listeners))
                budget = descriptor_budget(headroom)
                max_total = budget if config.max_connections is None else config.max_connections
                if max_total > budget:
                    log.warning(
                        "--max-connections %d is more than the open-files limit allows (%d): "
                        "past that, accepts fail (EMFILE) instead of answering 503",
                        max_total,
                        budget,
                    )
                gate = ConnectionGate(max_total=max_total, max_per_ip=config.max_connections_per_ip)
                app.connections = gate
                metrics_gate = ConnectionGate(max_total=METRICS_MAX_CONNECTIONS, max_per_ip=0)
                log.info(
                    "connection limits: %d in total, %s per address",
                    gate.max_total,
                    gate.max_per_ip or "no limit",
                    extra={
                        "event": "connection_limits",
                        "max_connections": gate.max_total,
                        "max_connections_per_ip": gate.max_per_ip,
                    },
                )

                async def accept() -> None:
                    with accept_scope:
                        async with trio.open_nursery() as loops:
                            for listener in listeners:
                                loops.start_soon(
                                    accept_connections,
                                    listener,
                                    partial(_handle, app=app),
                                    handlers,
                                    gate,
                                )
                            for listener in metrics_listeners:
                                loops.start_soon(
                                    accept_connections,
                                    listener,
                                    partial(_handle_internal, app=app),
                                    handlers,
                                    metrics_gate,
                                )

                await root.start(app.broker.run)
                root.start_soon(accept)
                root.start_soon(_watch_permissions, app)
                if config.demo:
                    from .demo import publish_demo_events

                    root.start_soon(publish_demo_events, app.broker.publish, config.demo_interval)
                app.is_ready = True
                log.info(
                    "listening on http://%s:%d",
                    config.host,
                    port,
                    extra={"event": "listening", "host": config.host, "port": port},
                )
                if metrics_port is not None:
                    log.info(
                        "metrics on http://%s:%d/metrics",
                        config.metrics_host,
                        metrics_port,
                        extra={
                            "event": "metrics_listening",
                            "host": config.metrics_host,
                            "port": metrics_port,
                        },
                    )
                task_status.started(
                    RunningServer(
                        port=port, app=app, _shutdown=shutdown, metrics_port=metrics_port
                    )
                )
                await shutdown.wait()
                log.info(
                    "shutting down: not ready, no new connections, closing %d hub connections",
                    app.stats.open,
                    extra={"event": "draining", "open_connections": app.stats.open},
                )
                app.is_draining = True
                accept_scope.cancel()
                root.cancel_scope.cancel()
            await _drain(app)
            handlers.cancel_scope.cancel()
    finally:
        # A command connection a publisher held while the backplane stopped went
        # back to the pool after the backplane's own cleanup: close it with the rest.
        with trio.move_on_after(1) as cleanup:
            cleanup.shield = True
            await app.broker.backplane.aclose()


async def _handle(stream: trio.SocketStream, ip: str, *, app: App) -> None:
    try:
        session = await handle_connection(stream, app, ip)
    except Exception:
        # The per-connection boundary: one connection's bug never takes the server down.
        app.stats.crashed += 1
        log.exception(
            "connection handler failed (before any upgrade)",
            extra={"event": "connection_failed", "reason": "error"},
        )
        return
    if session is not None:
        # Run here, not inside handle_connection: an idle session's stack (kept
        # for its whole life) is then only this frame and its own. It contains
        # its own failures (its guard); this boundary is the last line.
        try:
            await session.run()
        except Exception:
            app.stats.crashed += 1
            log.exception(
                "connection handler failed (session %d)",
                session.session_id,
                extra={
                    "event": "session_failed",
                    "session_id": session.session_id,
                    "subject": session.subject[:MAX_FIELD_CHARS],
                    "reason": "error",
                },
            )
        finally:
            if session.has_subject_count:
                app.hub_closed(session.subject)  # counted by the front's hub_opened


async def _handle_internal(stream: trio.SocketStream, ip: str, *, app: App) -> None:
    try:
        await handle_internal_connection(stream, app, ip)
    except Exception:
        # The same boundary as the main port's: one scrape's bug ends that scrape.
        app.stats.crashed += 1
        log.exception(
            "connection handler failed (metrics listener)",
            extra={"event": "connection_failed", "reason": "error"},
        )


async def _watch_loop_lag(metrics: Metrics) -> None:
    """How late a periodic timer wakes: what else the loop had to do first."""
    while True:
        due = trio.current_time() + LOOP_LAG_INTERVAL
        await trio.sleep_until(due)
        metrics.loop_lag.observe(max(0.0, trio.current_time() - due))


async def _sync_metrics(app: App, metrics: Metrics) -> None:
    """With --workers: keep this worker's values fresh for scrapes another worker answers."""
    while True:
        await trio.sleep(SYNC_INTERVAL)
        metrics.sync(app)


async def _drain(app: App) -> None:
    drained = app.stats.drained = trio.Event()
    answered = app.requests_done = trio.Event()
    for session in list(app.stats.by_id.values()):
        app.stats.drain_closed += 1
        session.close(Close(error=SHUTDOWN_TEXT, allow_reconnect=True))
    with trio.move_on_after(app.config.drain_timeout):
        if app.stats.open:
            await drained.wait()
        # A request being handled (a publish whose body is still coming) gets
        # its answer: cutting it would leave its publisher guessing.
        if app.requests_in_flight:
            await answered.wait()
    if app.stats.open or app.requests_in_flight:
        log.warning(
            "drain timeout: cutting %d hub connections and %d HTTP requests",
            app.stats.open,
            app.requests_in_flight,
            extra={
                "event": "drain_timeout",
                "open_connections": app.stats.open,
                "requests_in_flight": app.requests_in_flight,
            },
        )


async def _watch_permissions(app: App) -> None:
    """Re-check open connections whenever the grants change (revoke takes effect live)."""
    async with trio.open_nursery() as nursery:
        feed = app.permission_feed
        if feed is not None:
            nursery.start_soon(feed.watch_changes, app.permission_changes.put)
        await watch_permissions(
            app.store,
            partial(_recheck_permissions, app),
            poll_interval=app.config.permission_poll_interval,
            changes=app.permission_changes,
            has_feed=feed is not None,
        )


async def _recheck_permissions(app: App, pairs: frozenset[tuple[str, str]] | None) -> None:
    """Re-check the open connections of these ``(site_id, subject)`` pairs (None: all).

    The store is asked once per pair, however many connections it has, and
    about up to ``MAX_CONCURRENT_RECHECKS`` pairs at once: a re-check of
    everyone on a node with 100,000 connections, one slow question after
    another, would take minutes.

    A store failure raises out of here and leaves the connections not yet
    re-checked open; the watcher runs this again, for everyone, once the store
    is back. A lookup that failed while the store stays available (one pair's
    answer was unusable) leaves that pair's connections as they were and the
    others are still re-checked, before it raises: one bad record must not
    hold back every revoke.
    """
    app.store.forget(pairs)
    by_pair: dict[tuple[str, str], list[HubSession]] = {}
    for session in list(app.stats.by_id.values()):
        key = session.key
        if key is None:
            continue
        pair = (key.site_id, session.subject)
        if pairs is None or pair in pairs:
            by_pair.setdefault(pair, []).append(session)
    failure: PermissionStoreUnavailable | None = None
    # Shared by the lookup tasks: each takes the next pair (sync, so never twice).
    todo = iter(by_pair.items())

    async def recheck_pairs(nursery: trio.Nursery) -> None:
        nonlocal failure
        for (site_id, subject), sessions in todo:
            try:
                role = await app.store.role_of(site_id, subject)
            except PermissionStoreUnavailable as exc:
                failure = exc
                if not app.store.is_available:
                    nursery.cancel_scope.cancel()  # the rest waits for the store
                    return
                continue
            for session in sessions:
                key = session.key
                assert key is not None  # only subscribers were gathered
                if session.is_closing or may_subscribe(role, subject=subject, user_id=key.user_id):
                    continue
                app.stats.revoked_closed += 1
                log.info(
                    "session %d: access revoked, closing",
                    session.session_id,
                    extra=session_fields(session, "session_closing", reason="revoked"),
                )
                session.close(Close(error=ACCESS_REVOKED_TEXT, allow_reconnect=False))

    async with trio.open_nursery() as nursery:
        for _ in range(min(MAX_CONCURRENT_RECHECKS, len(by_pair))):
            nursery.start_soon(recheck_pairs, nursery)
    if failure is not None:
        raise failure
