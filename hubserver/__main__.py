"""The ``hubserver`` command: serve, check, config show, token, members.

Every ``serve`` setting is a flag, a ``HUBSERVER_<FLAG>`` environment variable
(``--data-dir`` is ``HUBSERVER_DATA_DIR``) and a key of the ``--config`` TOML
file (``data_dir``); a flag wins over the environment, which wins over the
file (``hubserver.config.sources``). ``check`` and ``config show`` take the
same settings.
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

from hubcore import HubError

from .app import HUB_SCOPE
from .auth import ensure_dev_key
from .config import PERMISSION_SOURCES, ConfigError, ServerConfig
from .config.settings import SETTINGS_BY_NAME, SettingValueError
from .config.sources import (
    CONFIG_ENV,
    Settings,
    add_arguments,
    read_config_file,
    settings_from_arguments,
)
from .logs import configure_logging
from .permissions import RedisPermissionStore, Role, SqlitePermissionStore
from .permissions import cli as members_cli
from .server import RunningServer, read_permissions_url_token, serve
from .workers import PARENT_GONE_EXIT_TIMEOUT, watch_parent

__all__ = ["main"]

log = logging.getLogger("hubserver")


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` of the commands without a config file (token)."""
    env = "HUBSERVER_DATA_DIR"
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get(env) or ".hubserver"),
        help=f"data directory (env {env})",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hubserver", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    s = commands.add_parser("serve", help="run the server")
    add_arguments(s)
    # Set by the --workers parent for its workers only.
    s.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--broker-socket", type=Path, help=argparse.SUPPRESS)
    s.add_argument("--parent-fd", type=int, help=argparse.SUPPRESS)

    c = commands.add_parser(
        "check",
        help="preflight: load the settings, fetch the JWKS, ping Redis, open the permission "
        "store, check the data directory and the open-files limit; exit 1 on any failure",
    )
    add_arguments(c)

    config = commands.add_parser("config", help="the settings serve would use")
    config_actions = config.add_subparsers(dest="action", required=True)
    show = config_actions.add_parser(
        "show", help="print the effective settings as TOML, with where each came from"
    )
    add_arguments(show)

    t = commands.add_parser("token", help="print a development token signed with the dev key")
    t.add_argument("--subject", required=True)
    t.add_argument("--scope", action="append", help=f"repeatable; default {HUB_SCOPE}")
    t.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds")
    _add_data_dir(t)

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
    imports = actions.add_parser(
        "import",
        help="copy every grant of a node's SQLite file into the fleet's Redis (idempotent; "
        "refuses, writing nothing, where Redis holds another role, unless --overwrite)",
    )
    imports.add_argument(
        "--from-sqlite",
        type=Path,
        required=True,
        metavar="PATH",
        help="the node's permissions.sqlite3 (or its data directory); only read",
    )
    imports.add_argument(
        "--redis",
        default=os.environ.get("HUBSERVER_BACKPLANE") or None,
        metavar="URL",
        help="the fleet's Redis (redis://HOST:PORT/DB, the nodes' --backplane; default: env "
        "HUBSERVER_BACKPLANE)",
    )
    imports.add_argument(
        "--overwrite",
        action="store_true",
        help="where Redis holds another role for a grant of the file, give it the file's role",
    )
    imports.add_argument(
        "--dry-run", action="store_true", help="compare only: say what would be done"
    )
    for sub in (grant, revoke, listing):
        # Unset flags stay None: `_members_store` falls back to the environment
        # and the config file, as serve does.
        sub.add_argument(
            "--config",
            type=Path,
            metavar="FILE",
            help=f"the nodes' config file: its data_dir, backplane, permissions and "
            f"permissions_url say where roles live, below these flags and the HUBSERVER_* "
            f"variables (env {CONFIG_ENV})",
        )
        sub.add_argument(
            "--data-dir", type=Path, help="data directory (env HUBSERVER_DATA_DIR; .hubserver)"
        )
        sub.add_argument(
            "--redis",
            metavar="URL",
            help="the fleet's Redis (redis://HOST:PORT/DB, the nodes' --backplane): roles "
            "there, seen by every node at once (default: env HUBSERVER_BACKPLANE, or the "
            "config file's backplane; without it, the SQLite file in --data-dir)",
        )
        sub.add_argument(
            "--permissions",
            choices=PERMISSION_SOURCES,
            type=str.lower,
            help="sqlite: the file in --data-dir even with --redis (nodes run with "
            "--permissions sqlite); url: roles live in the access-control backend, and "
            "members does not apply; default: as serve decides (env HUBSERVER_PERMISSIONS)",
        )
    return parser


def _server_config(settings: Settings, args: argparse.Namespace) -> ServerConfig:
    return settings.server_config(
        reuse_port=bool(getattr(args, "reuse_port", False)),
        broker_socket=getattr(args, "broker_socket", None),
    )


def _config(args: argparse.Namespace) -> ServerConfig:
    """The configuration of a ``serve`` command line (its flags, the environment, the file)."""
    return _server_config(settings_from_arguments(args), args)


def _members_store(args: argparse.Namespace) -> tuple[Path, str | None]:
    """The data directory, and the Redis ``members`` works on (None: the SQLite file there).

    Where roles live is decided as ``serve`` decides it, from the same four
    settings: a flag (``--data-dir``, ``--redis`` for ``--backplane``,
    ``--permissions``), else its ``HUBSERVER_*`` variable, else the config
    file (``--config``, ``HUBSERVER_CONFIG``), else the default. An explicit
    ``--permissions sqlite|redis`` wins over a permissions URL set elsewhere.

    Raises:
        ConfigError: the roles live in the access-control backend (members does
            not apply there), or a setting is bad; the message says where it was set.
    """
    flags: dict[str, tuple[object, str]] = {
        name: (value, "the command line")
        for name, value in (
            ("data_dir", args.data_dir),
            ("backplane", args.redis),
            ("permissions", args.permissions),
        )
        if value is not None
    }
    config_file: Path | None = args.config
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = Path(os.environ[CONFIG_ENV])
    from_file = read_config_file(config_file) if config_file is not None else {}
    values: dict[str, object] = {}
    origins: dict[str, str] = {}
    for name in ("data_dir", "backplane", "permissions", "permissions_url"):
        setting = SETTINGS_BY_NAME[name]
        if name in flags:
            values[name], origins[name] = flags[name]
        elif os.environ.get(setting.env):
            try:
                values[name] = setting.from_text(os.environ[setting.env])
            except SettingValueError as exc:
                raise ConfigError(f"{setting.env}: {exc}") from None
            origins[name] = setting.env
        elif name in from_file:
            values[name], origins[name] = from_file[name], str(config_file)
        else:
            values[name], origins[name] = setting.default, "default"
    permissions, backplane = values["permissions"], values["backplane"]
    if permissions == "url" or (permissions is None and values["permissions_url"] is not None):
        # Never the URL itself: it may hold a credential.
        why = (
            f"permissions url, set by {origins['permissions']}"
            if permissions == "url"
            else f"a permissions URL, set by {origins['permissions_url']}"
        )
        raise ConfigError(
            f"roles live in the access-control backend here ({why}): the members commands "
            "do not apply. Change them there: the backend notifies the nodes "
            "(POST /v1/permissions/changed)"
        )
    if permissions == "redis" and backplane is None:
        raise ConfigError(
            f"permissions redis (set by {origins['permissions']}) keeps roles in the fleet's "
            "Redis: give --redis URL (or HUBSERVER_BACKPLANE)"
        )
    is_redis = permissions == "redis" or (permissions is None and backplane is not None)
    data_dir = values["data_dir"]
    assert isinstance(data_dir, Path)  # the setting's kind
    return data_dir, str(backplane) if is_redis else None


def _worker_total(settings: Settings) -> int:
    from .workers import worker_count

    workers = settings["workers"]
    return worker_count("auto" if workers is None else str(workers))


def _announce(config: ServerConfig, port: int) -> None:
    if config.is_dev_mode:
        log.warning(
            "DEVELOPMENT MODE: no JWKS configured; trusting the development key in %s. "
            "Anyone who can read that directory can mint tokens. Use --jwks-file or "
            "--jwks-url in production.",
            config.data_dir.resolve(),
            extra={"event": "development_mode"},
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
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                await _on_signals(signals, server)
        finally:
            # Drained, and the receiver gave the default actions back: a signal
            # still on its way (a --workers parent forwarding the one this worker
            # already drained for) must not turn the clean exit into a kill (-15).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)


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
            log.info("received %s again: already draining", name, extra={"event": "signal"})
            continue
        log.info("received %s", name, extra={"event": "signal"})
        is_draining = True
        server.request_shutdown()


def _parent_gone(server: RunningServer, scope: trio.CancelScope) -> None:
    """A --workers worker lost its parent: drain briefly, then exit."""
    log.warning(
        "the --workers parent is gone; draining for at most %.0f s",
        PARENT_GONE_EXIT_TIMEOUT,
        extra={"event": "parent_gone"},
    )
    server.request_shutdown()
    scope.deadline = min(scope.deadline, trio.current_time() + PARENT_GONE_EXIT_TIMEOUT)


def _worker_argv(argv: Sequence[str]) -> list[str]:
    """The parent's ``serve`` arguments a worker gets: all but --workers, --port,
    --metrics-port (the parent gives the ports it reserved) and --demo."""
    out: list[str] = []
    skip = False
    for arg in argv[1:]:  # argv[0] is "serve"
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--workers", "--port", "--metrics-port"):
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


def _check(args: argparse.Namespace) -> int:
    from .check import check_config, run_checks

    try:
        settings = settings_from_arguments(args)
    except ConfigError as exc:
        print(f"FAIL  {'config':<12} {exc}", flush=True)
        return 1
    result, config = check_config(settings)
    print(result.line(), flush=True)
    if config is None:
        return 1
    # Only what a check itself logs (a JWKS fetch) goes to stderr, below warnings.
    configure_logging("warning", "text")
    results = trio.run(run_checks, config)
    for result in results:
        print(result.line(), flush=True)
    return 0 if all(result.is_ok for result in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            # Everything is read and checked before anything starts.
            settings = settings_from_arguments(args)
            config = _server_config(settings, args)
            read_permissions_url_token(config)  # a bad file stops here, not in each worker
            count = _worker_total(settings)
            configure_logging(str(settings["log_level"]), str(settings["log_format"]))
            if count > 1:
                trio.run(_workers_main, config, count, _worker_argv(argv))
            else:
                trio.run(_serve_main, config, args.parent_fd)
        elif args.command == "check":
            return _check(args)
        elif args.command == "config":
            print(settings_from_arguments(args).show(), end="")
        elif args.command == "token":
            scopes = args.scope or [HUB_SCOPE]
            key = ensure_dev_key(Path(args.data_dir))
            print(key.mint(args.subject, scopes, float(args.ttl), time.time()))
        elif args.command == "members" and args.action == "import":
            if not args.redis:
                raise ConfigError("members import needs --redis URL (or HUBSERVER_BACKPLANE)")
            report, is_ok = members_cli.import_from_sqlite(
                args.from_sqlite,
                args.redis,
                allow_overwrite=args.overwrite,
                is_dry_run=args.dry_run,
            )
            print(report, file=sys.stdout if is_ok else sys.stderr)
            return 0 if is_ok else 1
        elif args.command == "members":
            data_dir, redis_url = _members_store(args)
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
