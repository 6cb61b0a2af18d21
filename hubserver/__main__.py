"""The ``hubserver`` command: serve, token, members.

Every flag of ``serve`` can also come from the environment as
``HUBSERVER_<FLAG>`` (``--data-dir`` is ``HUBSERVER_DATA_DIR``); a flag given
on the command line wins.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from functools import partial
from pathlib import Path

import trio

from hubcore import HubError, HubLimits

from .app import HUB_SCOPE, PUBLISH_SCOPE
from .auth import ensure_dev_key
from .config import PERMISSION_SOURCES, ConfigError, ServerConfig, permission_source
from .permissions import RedisPermissionStore, Role, SqlitePermissionStore
from .permissions import cli as members_cli
from .server import RunningServer, serve
from .workers import PARENT_GONE_EXIT_TIMEOUT, watch_parent

__all__ = ["main"]

log = logging.getLogger("hubserver")


def _env(flag: str) -> str | None:
    return os.environ.get("HUBSERVER_" + flag.lstrip("-").replace("-", "_").upper())


def _add(
    parser: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup, flag: str, **kwargs: object
) -> None:
    value = _env(flag)
    if value is not None:
        if kwargs.get("action") == "store_true":
            kwargs["default"] = value.strip().lower() in ("1", "true", "yes", "on")
        else:
            kwargs["default"] = value
    help_text = str(kwargs.pop("help", ""))
    env_name = "HUBSERVER_" + flag.lstrip("-").replace("-", "_").upper()
    parser.add_argument(flag, help=f"{help_text} (env {env_name})", **kwargs)  # type: ignore[arg-type]


class _ListFlag(argparse.Action):
    """A repeatable flag whose values may also be comma-separated.

    The environment's value (a comma-separated string) is the default; the
    first use on the command line replaces it rather than adding to it, as
    any flag given on the command line wins.
    """

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest)
        items = [] if current is self.default else list(current)
        items += _split_list(str(values))
        setattr(namespace, self.dest, items)


def _split_list(value: str | list[str] | None) -> tuple[str, ...]:
    """``a,b`` or ``[a, b]``: the non-empty items, stripped."""
    if value is None:
        return ()
    parts = value.split(",") if isinstance(value, str) else value
    return tuple(part.strip() for part in parts if part.strip())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hubserver", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    s = commands.add_parser("serve", help="run the server")
    _add(s, "--host", default="127.0.0.1", help="address to listen on")
    _add(s, "--port", type=int, default=5000, help="port (0 = any free port)")
    _add(s, "--data-dir", type=Path, default=Path(".hubserver"), help="data directory")
    keys = s.add_mutually_exclusive_group()
    _add(keys, "--jwks-file", type=Path, help="trust the keys of this JWKS file")
    _add(keys, "--jwks-url", help="trust the keys of this JWKS URL")
    _add(s, "--issuer", help="required token issuer (iss)")
    _add(s, "--audience", help="required token audience (aud)")
    _add(
        s,
        "--no-audience-check",
        action="store_true",
        help="with --jwks-file/--jwks-url, accept tokens for any audience (not recommended)",
    )
    _add(s, "--demo", action="store_true", help="publish demo events, grant a demo Site Admin")
    _add(s, "--demo-interval", type=float, default=1.0, help="seconds between demo entries")
    _add(s, "--keepalive-interval", type=float, default=15.0, help="seconds between hub Pings")
    _add(s, "--client-timeout", type=float, default=30.0, help="seconds of client silence")
    _add(s, "--handshake-timeout", type=float, default=15.0, help="seconds for the handshake")
    _add(s, "--max-message-bytes", type=int, default=32 * 1024, help="inbound hub message limit")
    _add(s, "--max-outbox-bytes", type=int, default=1 << 20, help="queued bytes per connection")
    _add(
        s,
        "--slow-client-timeout",
        type=float,
        default=5.0,
        help="seconds a connection's output may stay over --max-outbox-bytes",
    )
    _add(s, "--max-publish-bytes", type=int, default=1 << 20, help="publish body limit")
    _add(s, "--drain-timeout", type=float, default=10.0, help="seconds to drain on shutdown")
    _add(s, "--backplane", help="redis://HOST:PORT/DB to run several nodes as one service")
    _add(s, "--history-size", type=int, default=1000, help="events kept per site and hub")
    _add(s, "--resume-window", type=float, default=0.5, help="seconds live events wait for Resume")
    _add(
        s,
        "--stateful-reconnect-window",
        type=float,
        default=30.0,
        help="seconds a stateful-reconnect connection waits for its client's new WebSocket "
        "(0: never offered)",
    )
    _add(
        s,
        "--publish-window",
        type=int,
        default=1000,
        help="events awaiting local delivery before publishes wait (1: lowest latency)",
    )
    _add(s, "--workers", default="1", help="worker processes on the port: a number or 'auto'")
    _add(
        s,
        "--dedupe-window",
        type=float,
        default=600.0,
        help="seconds a published event id is remembered: a retry is not published again (0: off)",
    )
    _add(
        s,
        "--max-dedupe-ids",
        type=int,
        default=100_000,
        help="event ids remembered at most without Redis (past it the oldest go early)",
    )
    _add(
        s,
        "--site-idle-timeout",
        type=float,
        default=600.0,
        help="seconds before a site with no subscriber and no event is forgotten from memory",
    )
    _add(
        s,
        "--max-history-sites",
        type=int,
        default=10_000,
        help="sites whose history is kept at most without Redis (least recently used go first)",
    )
    _add(
        s,
        "--request-timeout",
        type=float,
        default=15.0,
        help="seconds for one HTTP request: head, body and writing the answer",
    )
    _add(
        s,
        "--http-idle-timeout",
        type=float,
        default=120.0,
        help="seconds a keep-alive HTTP connection may idle between requests",
    )
    _add(
        s,
        "--max-connections",
        default="auto",
        help="open connections per process, 503 above ('auto': the open-files limit, "
        "raised to its hard limit, minus 64)",
    )
    _add(
        s,
        "--max-connections-per-ip",
        type=int,
        default=1000,
        help="open connections per client address, 429 above (0 = off; raise it or "
        "turn it off behind a proxy)",
    )
    _add(
        s,
        "--max-hub-connections-per-subject",
        type=int,
        default=100,
        help="open hub connections per token subject, 429 above (0 = off)",
    )
    _add(
        s,
        "--cors-origin",
        action=_ListFlag,
        metavar="ORIGIN",
        help="a browser origin (scheme://host[:port]) whose pages may call the hubs and the "
        "publish API, with credentials; repeatable or comma-separated; '*' alone: any origin, "
        "without credentials. With a list, WebSocket upgrades from other origins get 403",
    )
    _add(
        s,
        "--permissions",
        choices=PERMISSION_SOURCES,
        help="where roles live: sqlite (a file in --data-dir, per node), redis (the "
        "--backplane's Redis, one set for the fleet) or url (--permissions-url); default: "
        "url if --permissions-url, else redis with --backplane, else sqlite",
    )
    _add(
        s,
        "--permissions-url",
        help="ask the access-control backend for roles: GET URL?site_id=S&subject=U "
        'answers {"role": "site_admin"|"site_super_user"|"site_user"|null}',
    )
    _add(
        s,
        "--permissions-ttl",
        type=float,
        default=60.0,
        help="seconds an answer of --permissions-url is reused (and between re-checks of "
        "open connections)",
    )
    _add(s, "--log-level", default="info", help="debug, info, warning or error")
    _add(
        s,
        "--access-log",
        action="store_true",
        help="log every HTTP request at INFO (by default only refusals and errors)",
    )
    # Set by the --workers parent for its workers only.
    s.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--broker-socket", type=Path, help=argparse.SUPPRESS)
    s.add_argument("--parent-fd", type=int, help=argparse.SUPPRESS)
    _add(
        s,
        "--broker-max-queue-bytes",
        type=int,
        default=8 << 20,
        help="--workers without --backplane: bytes queued for a worker's event stream "
        "before that worker is disconnected (it resubscribes, recovering from history)",
    )

    t = commands.add_parser("token", help="print a development token signed with the dev key")
    t.add_argument("--subject", required=True)
    t.add_argument("--scope", action="append", help=f"repeatable; default {HUB_SCOPE}")
    t.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")
    _add(t, "--data-dir", type=Path, default=Path(".hubserver"), help="data directory")

    m = commands.add_parser("members", help="grant, revoke or list site roles")
    actions = m.add_subparsers(dest="action", required=True)
    grant = actions.add_parser(
        "grant", help="grant a role on one site or many (one transaction for all of them)"
    )
    grant.add_argument(
        "--site", action="append", default=[], help="a site id (repeatable for several sites)"
    )
    grant.add_argument(
        "--sites-file", type=Path, help="a file of site ids, one per line (with or without --site)"
    )
    grant.add_argument("--subject", required=True)
    grant.add_argument("--role", required=True, choices=[role.value for role in Role])
    revoke = actions.add_parser("revoke")
    revoke.add_argument("--site", required=True)
    revoke.add_argument("--subject", required=True)
    listing = actions.add_parser("list")
    listing.add_argument("--site")
    for sub in (grant, revoke, listing):
        _add(sub, "--data-dir", type=Path, default=Path(".hubserver"), help="data directory")
        sub.add_argument(
            "--redis",
            default=_env("--backplane"),
            metavar="URL",
            help="the fleet's Redis (redis://HOST:PORT/DB, the nodes' --backplane): roles "
            "there, seen by every node at once (default: env HUBSERVER_BACKPLANE; without "
            "it, the SQLite file in --data-dir)",
        )
        _add(
            sub,
            "--permissions",
            choices=("sqlite", "redis"),
            help="sqlite: the file in --data-dir even with --redis (nodes run with "
            "--permissions sqlite); default: redis with --redis, else sqlite",
        )
    return parser


def _config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=int(args.port),
        data_dir=Path(args.data_dir),
        jwks_file=Path(args.jwks_file) if args.jwks_file else None,
        jwks_url=args.jwks_url or None,
        issuer=args.issuer or None,
        audience=args.audience or None,
        demo=bool(args.demo),
        demo_interval=float(args.demo_interval),
        hub_limits=HubLimits(
            keepalive_interval=float(args.keepalive_interval),
            client_timeout=float(args.client_timeout),
            handshake_timeout=float(args.handshake_timeout),
            max_message_bytes=int(args.max_message_bytes),
        ),
        max_outbox_bytes=int(args.max_outbox_bytes),
        slow_client_timeout=float(args.slow_client_timeout),
        max_publish_bytes=int(args.max_publish_bytes),
        drain_timeout=float(args.drain_timeout),
        backplane=args.backplane or None,
        history_size=int(args.history_size),
        resume_window=float(args.resume_window),
        stateful_reconnect_window=float(args.stateful_reconnect_window),
        publish_window=int(args.publish_window),
        reuse_port=bool(args.reuse_port),
        broker_socket=args.broker_socket,
        broker_max_queue_bytes=int(args.broker_max_queue_bytes),
        dedupe_window=float(args.dedupe_window),
        max_dedupe_ids=int(args.max_dedupe_ids),
        site_idle_timeout=float(args.site_idle_timeout),
        max_history_sites=int(args.max_history_sites),
        request_timeout=float(args.request_timeout),
        http_idle_timeout=float(args.http_idle_timeout),
        max_connections=_max_connections(str(args.max_connections)),
        max_connections_per_ip=int(args.max_connections_per_ip),
        max_hub_connections_per_subject=int(args.max_hub_connections_per_subject),
        allow_any_audience=bool(args.no_audience_check),
        access_log=bool(args.access_log),
        cors_origins=_split_list(args.cors_origin),
        permissions=args.permissions or None,
        permissions_url=args.permissions_url or None,
        permissions_ttl=float(args.permissions_ttl),
    )


def _members_redis(args: argparse.Namespace) -> str | None:
    """The Redis ``members`` works on, or None for the SQLite file (as ``serve`` decides)."""
    source = permission_source(
        args.permissions or None,
        backplane=args.redis or None,
        permissions_url=None if args.permissions else _env("--permissions-url"),
    )
    if source == "url":
        raise ConfigError(
            "roles come from the access-control backend (HUBSERVER_PERMISSIONS_URL): "
            "change them there; it notifies the nodes"
        )
    return args.redis if source == "redis" else None


def _max_connections(value: str) -> int | None:
    """``--max-connections``: a number, or 'auto' (None: from the open-files limit)."""
    if value.strip().lower() == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--max-connections must be a number or 'auto', got {value!r}") from None


def _announce(config: ServerConfig, port: int) -> None:
    if config.is_dev_mode:
        log.warning(
            "DEVELOPMENT MODE: no JWKS configured; trusting the development key in %s. "
            "Anyone who can read that directory can mint tokens. Use --jwks-file or "
            "--jwks-url in production.",
            config.data_dir.resolve(),
        )
    if config.demo:
        from .demo import DEMO_SITE, DEMO_SUBJECT

        token = ensure_dev_key(config.data_dir).mint(
            DEMO_SUBJECT, [HUB_SCOPE], 24 * 3600, time.time()
        )
        host = "localhost" if config.host in ("127.0.0.1", "0.0.0.0", "::") else config.host
        print(
            f"\nDemo: entries and incidents of site '{DEMO_SITE}' flow every second.\n"
            f"Demo Site Admin '{DEMO_SUBJECT}' token (24 h):\n\n{token}\n\n"
            f"Watch them:  http://{host}:{port}/v1/hub/entries?site_id={DEMO_SITE}\n"
            "(see README: 'Watch the demo with the JavaScript client')\n",
            flush=True,
        )


async def _grant_demo(config: ServerConfig) -> None:
    """Make the demo subject a Site Admin of the demo site, where roles live."""
    from .demo import DEMO_SITE, DEMO_SUBJECT

    match config.permission_source:
        case "redis":
            assert config.backplane is not None
            async with RedisPermissionStore(config.backplane) as redis_store:
                await redis_store.grant(DEMO_SITE, DEMO_SUBJECT, Role.SITE_ADMIN)
        case "url":
            log.warning(
                "--demo: roles come from --permissions-url; the demo subject %r needs a role "
                "on site %r there",
                DEMO_SUBJECT,
                DEMO_SITE,
            )
        case _:
            with SqlitePermissionStore.open(config.data_dir) as store:
                store.grant(DEMO_SITE, DEMO_SUBJECT, Role.SITE_ADMIN)


async def _serve_main(config: ServerConfig, parent_fd: int | None = None) -> None:
    if config.demo:
        await _grant_demo(config)
    async with trio.open_nursery() as nursery:
        server: RunningServer = await nursery.start(_serve_until_drained, config, nursery)
        # Everything made so far (modules, keys, config) lives as long as the
        # process: keep it out of every later cyclic collection.
        gc.collect()
        gc.freeze()
        _announce(config, server.port)
        if parent_fd is not None:
            gone = partial(_parent_gone, server, nursery.cancel_scope)
            nursery.start_soon(watch_parent, parent_fd, gone)
        # Open until the server has drained (then the nursery is cancelled): a
        # second signal (a --workers parent forwarding the SIGTERM this worker
        # already got from systemd or the terminal) must not meet the default
        # action and kill the process mid-drain.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await _on_signals(signals, server)


async def _serve_until_drained(
    config: ServerConfig,
    nursery: trio.Nursery,
    *,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve(config, task_status=task_status)
    nursery.cancel_scope.cancel()  # drained: stop watching signals and the parent


async def _on_signals(signals: AsyncIterator[int], server: RunningServer) -> None:
    is_draining = False
    async for signum in signals:
        name = signal.Signals(signum).name
        if is_draining:
            log.info("received %s again: already draining", name)
            continue
        log.info("received %s", name)
        is_draining = True
        server.request_shutdown()


def _parent_gone(server: RunningServer, scope: trio.CancelScope) -> None:
    """A --workers worker lost its parent: drain briefly, then exit."""
    log.warning(
        "the --workers parent is gone; draining for at most %.0f s", PARENT_GONE_EXIT_TIMEOUT
    )
    server.request_shutdown()
    scope.deadline = min(scope.deadline, trio.current_time() + PARENT_GONE_EXIT_TIMEOUT)


def _worker_argv(argv: Sequence[str]) -> list[str]:
    """The parent's ``serve`` arguments a worker gets: all but --workers, --port, --demo."""
    out: list[str] = []
    skip = False
    for arg in argv[1:]:  # argv[0] is "serve"
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--workers", "--port"):
            skip = "=" not in arg
            continue
        if name == "--demo":
            continue
        out.append(arg)
    return out


async def _workers_main(config: ServerConfig, count: int, worker_argv: list[str]) -> None:
    from .workers import run_workers

    if config.demo:
        await _grant_demo(config)
    ensure_dev_key(config.data_dir)  # made once here, not raced by the workers
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(run_workers, config, count, worker_argv)
        _announce(config, port)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            logging.basicConfig(
                level=str(args.log_level).upper(),
                format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            )
            config = _config(args)
            from .workers import worker_count

            count = worker_count(str(args.workers))
            if count > 1:
                trio.run(_workers_main, config, count, _worker_argv(argv))
            else:
                trio.run(_serve_main, config, args.parent_fd)
        elif args.command == "token":
            scopes = args.scope or [HUB_SCOPE]
            key = ensure_dev_key(Path(args.data_dir))
            print(key.mint(args.subject, scopes, float(args.ttl), time.time()))
        elif args.command == "members":
            data_dir = Path(args.data_dir)
            redis_url = _members_redis(args)
            if args.action == "grant":
                sites = list(args.site)
                if args.sites_file is not None:
                    sites += members_cli.read_sites_file(Path(args.sites_file))
                print(
                    members_cli.grant_sites(
                        data_dir, sites, args.subject, args.role, redis_url=redis_url
                    )
                )
            elif args.action == "revoke":
                print(members_cli.revoke(data_dir, args.site, args.subject, redis_url=redis_url))
            else:
                print(members_cli.list_members(data_dir, args.site, redis_url=redis_url))
    except (ConfigError, HubError, ValueError) as exc:
        print(f"hubserver: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

_ = PUBLISH_SCOPE
