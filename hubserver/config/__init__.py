"""Server configuration: one frozen dataclass, validated once at start.

Where its values come from (flags, ``HUBSERVER_*``, a TOML file) is
``config.settings`` (the table of settings) and ``config.sources`` (reading
and precedence); they import this module, not the other way round.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import parse_qsl, urlsplit

from hubcore import HubError, HubLimits

__all__ = [
    "ANY_ORIGIN",
    "METRICS_SWITCH",
    "MIN_PERMISSIONS_TTL",
    "PERMISSION_SOURCES",
    "ConfigError",
    "ServerConfig",
    "normalize_origins",
    "permission_source",
    "read_token_file",
]

#: ``--cors-origin '*'``: any page may call, but without credentials (Fetch
#: standard §3.2.5: a credentialed answer must name its origin).
ANY_ORIGIN = "*"
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: What a host of a serialized origin is made of (a DNS name, IPv4, or IPv6 unbracketed).
_HOST_CHARS = re.compile(r"[a-z0-9.\-_:]+")


class ConfigError(HubError):
    """The configuration cannot work (bad value, missing file, conflicting flags)."""


#: ``--metrics on|off``.
METRICS_SWITCH: Final = ("on", "off")

#: Where roles live (``--permissions``): a file per node, the backplane's
#: Redis, or the access-control backend (``--permissions-url``).
PERMISSION_SOURCES: Final = ("sqlite", "redis", "url")
#: The shortest ``--permissions-ttl``, in seconds: every TTL each node asks the
#: backend about every (site, subject) with an open connection.
MIN_PERMISSIONS_TTL: Final = 1.0
#: The query parameters each question to ``--permissions-url`` adds.
_ADDED_PARAMETERS: Final = frozenset({"site_id", "subject"})


def permission_source(
    permissions: str | None, *, backplane: str | None, permissions_url: str | None
) -> str:
    """Where roles live, from ``--permissions``, ``--backplane`` and ``--permissions-url``.

    Unset, it follows the deployment: the URL when one is given, else Redis
    with a backplane (one set of roles for the fleet), else SQLite.

    Raises:
        ConfigError: an unknown source, or one that lacks what it needs.
    """
    if permissions is None:
        if permissions_url is not None:
            return "url"
        return "sqlite" if backplane is None else "redis"
    source = permissions.strip().lower()
    if source not in PERMISSION_SOURCES:
        raise ConfigError(
            f"--permissions must be one of {', '.join(PERMISSION_SOURCES)}, got {permissions!r}"
        )
    if source == "redis" and backplane is None:
        raise ConfigError(
            "--permissions redis keeps roles in the backplane's Redis: give --backplane"
        )
    if source == "url" and permissions_url is None:
        raise ConfigError("--permissions url needs --permissions-url")
    if source != "url" and permissions_url is not None:
        raise ConfigError(
            f"--permissions-url asks the access-control backend for roles; it cannot be "
            f"combined with --permissions {source}"
        )
    return source


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Everything ``serve`` needs; defaults are the embedded development setup.

    Attributes:
        host, port: where to listen (port 0 picks a free one).
        data_dir: development key, SQLite permission store.
        jwks_file, jwks_url: where verification keys come from; neither means
            development mode (a key made in ``data_dir``).
        issuer, audience: checked when set.
        hub_limits: hubcore's message size limit and timers.
        max_outbox_bytes: one connection's output budget: every byte queued
            for it (deliveries, replays, replies, pongs, closes). Over it the
            server stops reading from that client; a live event that finds it
            over closes it as too slow.
        slow_client_timeout: how long a connection's output may stay over
            its budget before it is closed as too slow.
        max_publish_bytes: largest publish request body (413 above).
        drain_timeout: how long shutdown waits for connections to close.
        request_timeout: the one deadline of an HTTP request: its head, its
            body and the writing of the response (a response that cannot be
            written in time closes the connection).
        permission_poll_interval: how often the permission store is asked
            whether grants changed (revocations reach open connections).
        token_leeway: clock skew allowed on ``exp`` / ``nbf``.
        demo: publish demo events and grant a demo Site Admin.
        backplane: ``redis://HOST:PORT/DB`` to share numbering, history and
            fan-out with other nodes; None keeps them in this process.
        history_size: events kept per site and hub for resume.
        resume_window: after a handshake, how long live events wait for the
            client's ``Resume`` call so that replay and live stay in order
            (0 turns the wait off; ``since_seq`` in the URL never waits).
        publish_window: events that may wait for local delivery before a
            publish waits for them (backpressure; 1: a publish returns once its
            events reached this node's subscribers, lowest latency, less
            batching in bursts).
        reuse_port: listen with SO_REUSEPORT (a worker of ``--workers``).
        broker_socket: the parent's broker (a worker without ``--backplane``).
        broker_max_queue_bytes: with ``--workers`` and no ``--backplane``, the
            bytes the parent queues for one worker's event stream before it
            disconnects that worker (which resubscribes and recovers the rest
            from history, or sends its subscribers a Gap).
        stateful_reconnect_window: how long a connection that negotiated
            stateful reconnect (spec §8) waits for its client to come back on a
            new WebSocket after its transport dropped; 0 never offers it.
        dedupe_window: seconds an accepted event id keeps a retry from being
            published again (per hub and site; 0 turns it off).
        max_dedupe_ids: ids remembered for that, at most, without Redis (past
            it the oldest are forgotten early).
        site_idle_timeout: a site without local subscribers and without
            events for this long is forgotten from the broker's memory.
        max_history_bytes: bytes the histories of every site hold together,
            at most, without Redis (the least recently used site's oldest
            events go first; a client resuming there gets a Gap).
        max_history_sites: sites whose history is kept, at most, without
            Redis (the least recently used is forgotten first).
        http_idle_timeout: how long a keep-alive HTTP connection may wait
            between requests before it is closed.
        max_connections: open TCP connections this process serves at once
            (503 above); None: what the descriptor limit allows, after raising
            the soft RLIMIT_NOFILE to the hard one (see ``http.descriptor_budget``).
        max_connections_per_ip: open TCP connections per peer address (429
            above; 0 turns it off; behind a proxy every client shares the
            proxy's address: raise it or turn it off there).
        max_hub_connections_per_subject: open hub connections per token
            subject (429 at the upgrade above it; 0 turns it off).
        allow_any_audience: with a JWKS, accept tokens without checking ``aud``
            (``--no-audience-check``); otherwise ``audience`` is required.
        access_log: log every HTTP request at INFO (``--access-log``); without
            it only refusals and errors are logged.
        permissions: where roles live: ``"sqlite"`` (a file in ``data_dir``,
            per node), ``"redis"`` (the backplane's Redis, shared by the
            fleet), ``"url"`` (the access-control backend at
            ``permissions_url``); None: the URL if given, else Redis with a
            backplane, else SQLite (see ``permission_source``).
        permissions_url: ``GET URL?site_id=S&subject=U`` answers
            ``{"role": ...}`` (``--permissions-url``); without credentials
            (``permissions_url_token_file`` holds the token) and without
            ``site_id`` or ``subject`` in its query.
        permissions_ttl: seconds an answer of ``permissions_url`` is reused,
            and between two re-checks of every open connection against it
            (at least ``MIN_PERMISSIONS_TTL``).
        permissions_url_token_file: a file holding the token sent to
            ``permissions_url`` as ``Authorization: Bearer`` (read at start,
            by ``read_token_file``; the token itself is never held here).
        cors_origins: the browser origins (``scheme://host[:port]``) whose
            pages may call the hubs and the publish API (``--cors-origin``),
            normalized as browsers send them; ``("*",)`` allows every origin,
            without credentials. Empty: no CORS (today's answers) and no
            Origin check on WebSocket upgrades.
        metrics: ``"on"`` (Prometheus metrics at ``GET /metrics``) or
            ``"off"``: no ``/metrics`` anywhere, no event-loop lag probe, no
            histogram observation on the publish and delivery paths (the
            plain counters the server keeps for itself stay).
        metrics_host, metrics_port: with a port, ``/metrics`` (and
            ``/healthz``, ``/readyz``) are served by a listener of their own
            there, and the main port answers ``/metrics`` with 404; 0 picks a
            free port. None: ``/metrics`` on the main port. The host defaults
            to loopback: the metrics tell about the service's operation, and
            exposing them is a choice to make on purpose.
    """

    host: str = "127.0.0.1"
    port: int = 5000
    data_dir: Path = field(default_factory=lambda: Path(".hubserver"))
    jwks_file: Path | None = None
    jwks_url: str | None = None
    issuer: str | None = None
    audience: str | None = None
    hub_limits: HubLimits = field(default_factory=HubLimits)
    max_outbox_bytes: int = 1 << 20
    slow_client_timeout: float = 5.0
    max_publish_bytes: int = 1 << 20
    drain_timeout: float = 10.0
    request_timeout: float = 15.0
    permission_poll_interval: float = 1.0
    token_leeway: float = 30.0
    demo: bool = False
    demo_interval: float = 1.0
    backplane: str | None = None
    history_size: int = 1000
    resume_window: float = 0.5
    publish_window: int = 1000
    reuse_port: bool = False
    broker_socket: Path | None = None
    broker_max_queue_bytes: int = 8 << 20
    dedupe_window: float = 600.0
    stateful_reconnect_window: float = 30.0
    max_dedupe_ids: int = 100_000
    site_idle_timeout: float = 600.0
    max_history_sites: int = 10_000
    max_history_bytes: int = 1 << 30
    http_idle_timeout: float = 120.0
    max_connections: int | None = None
    max_connections_per_ip: int = 1000
    max_hub_connections_per_subject: int = 100
    allow_any_audience: bool = False
    access_log: bool = False
    cors_origins: tuple[str, ...] = ()
    permissions: str | None = None
    permissions_url: str | None = None
    permissions_ttl: float = 60.0
    permissions_url_token_file: Path | None = None
    metrics: str = "on"
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        # Frozen: the normalized list replaces the given one once, here.
        object.__setattr__(self, "cors_origins", normalize_origins(self.cors_origins))
        self._check_permissions()
        self._check_metrics()
        if self.jwks_file is not None and self.jwks_url is not None:
            raise ConfigError("give --jwks-file or --jwks-url, not both")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if self.jwks_url is not None and not self.jwks_url.startswith(("http://", "https://")):
            raise ConfigError("--jwks-url must be an http:// or https:// URL")
        if self.backplane is not None and not self.backplane.startswith("redis://"):
            raise ConfigError("--backplane must be a redis://HOST:PORT/DB URL")
        for name in ("max_outbox_bytes", "max_publish_bytes", "history_size", "publish_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive")
        for name in ("max_dedupe_ids", "max_history_sites", "max_history_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive")
        for name in (
            "drain_timeout",
            "request_timeout",
            "permission_poll_interval",
            "token_leeway",
            "demo_interval",
            "resume_window",
            "slow_client_timeout",
            "dedupe_window",
            "site_idle_timeout",
            "stateful_reconnect_window",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a non-negative number of seconds")
        if self.broker_max_queue_bytes < 1:
            raise ConfigError("broker_max_queue_bytes must be positive")
        if not math.isfinite(self.http_idle_timeout) or self.http_idle_timeout <= 0:
            raise ConfigError("http_idle_timeout must be a positive number of seconds")
        if not math.isfinite(self.request_timeout) or self.request_timeout <= 0:
            raise ConfigError("request_timeout must be a positive number of seconds")
        if self.max_connections is not None and self.max_connections < 1:
            raise ConfigError("max_connections must be positive (or None: from the fd limit)")
        for name in ("max_connections_per_ip", "max_hub_connections_per_subject"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be non-negative (0 turns it off)")
        # RFC 8725 §3.9: a token the identity provider issued for another API
        # must not open this one, so a real key source needs an audience.
        if not self.is_dev_mode and self.audience is None and not self.allow_any_audience:
            raise ConfigError(
                "--jwks-file/--jwks-url need --audience (the aud your identity provider puts "
                "in tokens for this API); without it a token issued for any other API would "
                "be accepted. Give --no-audience-check to accept that on purpose."
            )
        if self.audience is not None and self.allow_any_audience:
            raise ConfigError("give --audience or --no-audience-check, not both")

    @property
    def permission_source(self) -> str:
        """Where roles live: ``"sqlite"``, ``"redis"`` or ``"url"`` (see ``permissions``)."""
        return permission_source(
            self.permissions, backplane=self.backplane, permissions_url=self.permissions_url
        )

    def _check_permissions(self) -> None:
        self.permission_source  # noqa: B018 (raises ConfigError for a bad combination)
        url = self.permissions_url
        if url is not None:
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 (raises ValueError for a bad port)
            except ValueError:
                raise ConfigError("--permissions-url is not a URL") from None
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
                raise ConfigError(
                    "--permissions-url must be an http:// or https:// URL with a host "
                    "(and no #fragment)"
                )
            # Messages never repeat the URL: it may hold what they are about.
            if "@" in parts.netloc:
                raise ConfigError(
                    "--permissions-url must not hold credentials (USER:PASSWORD@ before the "
                    "host): they would never be sent. A backend behind authentication gets a "
                    "bearer token: put it in a file and give --permissions-url-token-file PATH"
                )
            named = {name for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
            if named & _ADDED_PARAMETERS:
                raise ConfigError(
                    "--permissions-url must not have site_id or subject in its query: each "
                    "question adds them (GET URL?site_id=S&subject=U)"
                )
        ttl = self.permissions_ttl
        if not math.isfinite(ttl) or ttl < MIN_PERMISSIONS_TTL:
            raise ConfigError(
                f"permissions_ttl must be at least {MIN_PERMISSIONS_TTL:g} second (a number "
                "of seconds): each node re-checks every open connection against the "
                "backend that often"
            )
        if self.permissions_url_token_file is not None and url is None:
            raise ConfigError(
                "--permissions-url-token-file is the credential of --permissions-url: "
                "give both, or neither"
            )

    @property
    def is_metrics_on(self) -> bool:
        """``--metrics on``: metrics are kept and served."""
        return self.metrics == "on"

    def _check_metrics(self) -> None:
        if self.metrics not in METRICS_SWITCH:
            raise ConfigError(f"--metrics must be on or off, got {self.metrics!r}")
        port = self.metrics_port
        if port is None:
            return
        if not 0 <= port <= 65535:
            raise ConfigError(f"metrics_port must be 0..65535, got {port}")
        if not self.is_metrics_on:
            raise ConfigError(
                "--metrics-port serves /metrics, which --metrics off turns off: drop one of them"
            )
        # With --workers both listeners take SO_REUSEPORT, so one port would
        # silently share the hubs' connections between the two.
        if port != 0 and port == self.port:
            raise ConfigError(f"--metrics-port must differ from --port (both {port})")
        if not self.metrics_host:
            raise ConfigError("--metrics-host must not be empty")

    @property
    def is_dev_mode(self) -> bool:
        """No JWKS configured: trust the development key in ``data_dir``."""
        return self.jwks_file is None and self.jwks_url is None


def normalize_origins(origins: tuple[str, ...]) -> tuple[str, ...]:
    """Check ``--cors-origin`` values; return them as browsers write an Origin header.

    An origin is ``scheme://host[:port]`` (RFC 6454 §6.1): the scheme and host
    lower-cased and a default port dropped (a browser at https://a.example
    sends ``Origin: https://a.example``, never ``...:443``), so what the
    operator wrote matches by plain string comparison. Duplicates are dropped.

    Raises:
        ConfigError: a value that no browser sends as an Origin (a path, a
            trailing slash, userinfo, another scheme, ``null``), or ``*``
            together with listed origins.
    """
    normalized: list[str] = []
    for origin in origins:
        origin = origin.strip()
        value = ANY_ORIGIN if origin == ANY_ORIGIN else _normalize_origin(origin)
        if value not in normalized:
            normalized.append(value)
    if ANY_ORIGIN in normalized and len(normalized) > 1:
        raise ConfigError(
            "--cors-origin '*' allows every origin without credentials; it cannot be combined "
            "with listed origins (which get credentials): give one or the other"
        )
    return tuple(normalized)


def _normalize_origin(origin: str) -> str:
    hint = f"--cors-origin {origin!r} is not an origin: write scheme://host[:port]"
    if not origin.isascii():
        raise ConfigError(f"{hint}, with the host in punycode (xn--...) as browsers send it")
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        raise ConfigError(hint) from None
    scheme = parts.scheme.lower()
    host = parts.hostname  # lower-cased by urlsplit; an IPv6 address without its brackets
    if parts.path == "/" and not (parts.query or parts.fragment):
        raise ConfigError(f"{hint}, without the trailing '/'")
    if (
        scheme not in _DEFAULT_PORTS
        or not host
        or not _HOST_CHARS.fullmatch(host)
        or "@" in parts.netloc
        or parts.path
        or "?" in origin
        or "#" in origin
    ):
        raise ConfigError(f"{hint}, as in https://app.example.com or http://127.0.0.1:8080")
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


#: A bearer token is a line of a few hundred bytes (a JWT, an opaque key); a
#: file far bigger than that is not one.
MAX_TOKEN_FILE_BYTES: Final = 16 * 1024
#: RFC 6750 §2.1's b64token, plus what opaque API keys use beside it: visible
#: ASCII, no spaces (anything else could not travel in a header as it is).
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")


def read_token_file(path: Path, *, setting: str = "--permissions-url-token-file") -> str:
    """The bearer token held by the file at ``path`` (surrounding blanks and newlines dropped).

    The file's mode is not checked: secrets mounted by container platforms
    (Kubernetes secret volumes, Docker secrets) are 0644 or 0444 by default,
    and what may read the file is the platform's business, as for the other
    credentials (a backplane or JWKS URL in the environment or the config
    file). Messages name the file, never what it holds.

    Raises:
        ConfigError: the file cannot be read, is empty, too big, or does not
            hold one token (one line of visible ASCII).
    """
    try:
        with path.open("rb") as file:
            data = file.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{setting} {path}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise ConfigError(f"{setting} {path}: over {MAX_TOKEN_FILE_BYTES} bytes, not a token")
    token = data.strip().decode("ascii", errors="replace")
    if not token:
        raise ConfigError(f"{setting} {path}: the file is empty")
    if not _TOKEN_CHARS.fullmatch(token):
        raise ConfigError(
            f"{setting} {path}: expected one token (one line of visible ASCII, no spaces)"
        )
    return token
