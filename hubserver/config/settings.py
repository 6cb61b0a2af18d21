"""The ``serve`` settings: one table behind the flags, the environment, the file, ``config show``.

Each ``Setting`` is named once, as its config file key (``max_outbox_bytes``);
its flag (``--max-outbox-bytes``) and environment variable
(``HUBSERVER_MAX_OUTBOX_BYTES``) are derived from that name, and its default
comes from the ``ServerConfig`` (or ``HubLimits``) field it fills, so a
default is written in one place. A setting no dataclass holds (``workers``,
``log_level``, ``log_format``) carries its own default and is read by the
command itself. ``SETTINGS`` is the only list: the parser, the loader, the
example file's test and ``config show`` all walk it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from hubcore import HubLimits

from . import METRICS_SWITCH, PERMISSION_SOURCES, ServerConfig

__all__ = [
    "ENV_PREFIX",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "SETTINGS",
    "SETTINGS_BY_NAME",
    "Kind",
    "Setting",
    "SettingValueError",
    "redact_credentials",
    "split_list",
]

ENV_PREFIX: Final = "HUBSERVER_"
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
#: ``auto``: text when stderr is a terminal (a person reads it), JSON otherwise
#: (a collector reads it: a container runtime, journald, a file).
LOG_FORMATS: Final = ("auto", "text", "json")
_REDACTED: Final = "***"
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


class Kind(enum.Enum):
    """A setting's type, and how it is written in each source."""

    TEXT = "a string"
    INTEGER = "an integer"
    SECONDS = "a number"
    SWITCH = "a boolean"
    PATH = "a path (string)"
    LIST = "an array of strings"
    INTEGER_OR_AUTO = "an integer or 'auto'"
    CHOICE = "one of"


def _toml_type(value: object) -> str:
    """How TOML (and ``config show``) calls the type of a value ``tomllib`` returned."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # dates and times


class SettingValueError(ValueError):
    """A value of the wrong type or form; the message never repeats a secret value."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    """One ``serve`` setting.

    Attributes:
        name: the config file key; the flag and environment variable follow from it.
        kind: its type.
        help: one line for ``--help``.
        target: the ``ServerConfig`` field it fills, ``hub_limits.<field>`` for
            a ``HubLimits`` field, or None when the command reads it itself.
        default: the value when no source gives one (None: not set, or
            ``auto`` for ``INTEGER_OR_AUTO``).
        choices: the allowed values of a ``CHOICE``.
        is_secret: may hold a credential (a URL's password): ``config show``
            and error messages redact it.
        group: flags of one group exclude each other on the command line.
        metavar: what ``--help`` calls the value.
    """

    name: str
    kind: Kind
    help: str
    target: str | None
    default: object
    choices: tuple[str, ...] = ()
    is_secret: bool = False
    group: str | None = None
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def is_optional(self) -> bool:
        """Unset is a value of its own (no JWKS URL, no backplane, no metrics port)."""
        return self.default is None and self.kind in (Kind.TEXT, Kind.PATH, Kind.INTEGER)

    def from_text(self, text: str) -> object:
        """The value of a flag or an environment variable.

        Raises:
            SettingValueError: not a value of this setting.
        """
        kind = self.kind
        if kind is Kind.TEXT:
            return None if self.is_optional and not text else text
        if kind is Kind.PATH:
            return None if self.is_optional and not text else Path(text)
        if kind is Kind.LIST:
            return split_list(text)
        if kind is Kind.SWITCH:
            word = text.strip().lower()
            if word in _TRUE or word in _FALSE:
                return word in _TRUE
            raise self._invalid(self._quoted(text), "1/true/yes/on or 0/false/no/off")
        if kind is Kind.CHOICE:
            word = text.strip().lower()
            if word in self.choices:
                return word
            raise self._invalid(self._quoted(text))
        if kind is Kind.INTEGER_OR_AUTO and text.strip().lower() == "auto":
            return None
        if kind is Kind.INTEGER and self.is_optional and not text.strip():
            return None
        try:
            number = float(text) if kind is Kind.SECONDS else int(text)
        except ValueError:
            raise self._invalid(self._quoted(text)) from None
        return self._checked(number)

    def _checked(self, number: float) -> float:
        # 'auto' stands for "as many as fit": a count below one is never meant.
        if self.kind is Kind.INTEGER_OR_AUTO and number < 1:
            raise self._invalid(repr(number), "a positive integer or 'auto'")
        return number

    def from_toml(self, value: object, *, base: Path) -> object:
        """The value of a config file key, as ``tomllib`` read it.

        Args:
            value: what the file holds.
            base: the file's directory: relative paths are relative to it.

        Raises:
            SettingValueError: the wrong TOML type, or not a value of this setting.
        """
        kind = self.kind
        got = _toml_type(value)
        if kind is Kind.SWITCH and isinstance(value, bool):
            return value
        if isinstance(value, bool):
            raise self._invalid(got)  # an int to Python, never a number here
        if kind is Kind.INTEGER and isinstance(value, int):
            return value
        if kind is Kind.SECONDS and isinstance(value, int | float):
            return float(value)
        if kind is Kind.INTEGER_OR_AUTO:
            if isinstance(value, int):
                return self._checked(value)
            if isinstance(value, str) and value.strip().lower() == "auto":
                return None
        if kind is Kind.TEXT and isinstance(value, str):
            return value
        if kind is Kind.PATH and isinstance(value, str):
            return base / Path(value).expanduser()
        if kind is Kind.CHOICE and isinstance(value, str):
            return self.from_text(value)
        if kind is Kind.LIST and isinstance(value, list):
            if all(isinstance(item, str) for item in value):
                return split_list([str(item) for item in value])
            got = "an array with " + ", ".join(
                sorted({_toml_type(item) for item in value if not isinstance(item, str)})
            )
        if isinstance(value, str) and not self.is_secret:
            got = f"{got} {json.dumps(value)[:80]}"
        raise self._invalid(got)

    def _invalid(self, got: str, expected: str | None = None) -> SettingValueError:
        if expected is None:
            expected = self.kind.value
            if self.kind is Kind.CHOICE:
                expected = "one of " + ", ".join(self.choices)
        return SettingValueError(f"expected {expected}, got {got}")

    def _quoted(self, text: str) -> str:
        """A value given as text, for an error message (a secret's is not repeated)."""
        return "a value not shown here (it may hold a secret)" if self.is_secret else repr(text)

    def to_toml(self, value: object) -> str | None:
        """``value`` as a TOML value, redacted if secret; None when unset."""
        if value is None:
            return '"auto"' if self.kind is Kind.INTEGER_OR_AUTO else None
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            if math.isinf(value):
                return "inf" if value > 0 else "-inf"
            return repr(value)
        if isinstance(value, int):
            return str(value)
        if isinstance(value, tuple):
            return "[" + ", ".join(json.dumps(str(item)) for item in value) + "]"
        text = str(value)
        if self.is_secret:
            text = redact_credentials(text)
        # A JSON string is a TOML basic string (the same escapes, \uXXXX included).
        return json.dumps(text, ensure_ascii=False)

    def help_text(self) -> str:
        shown = self.to_toml(self.default)
        default = "not set" if shown is None else f"default {shown}"
        return f"{self.help} ({default}; env {self.env})"


def split_list(value: str | list[str]) -> tuple[str, ...]:
    """``a,b`` or ``[a, b]``: the non-empty items, stripped."""
    parts = value.split(",") if isinstance(value, str) else value
    return tuple(part.strip() for part in parts if part.strip())


def redact_credentials(url: str) -> str:
    """``url`` without what could be a credential: the userinfo's password, and
    every query value.

    ``redis://:pw@host/0`` becomes ``redis://:***@host/0``; a user name alone
    (``https://TOKEN@host``) may itself be the credential and is hidden too.
    Anything that does not parse as a URL is hidden whole.
    """
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a malformed port
    except ValueError:
        return _REDACTED
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{_REDACTED}@{host}" if colon else f"{_REDACTED}@{host}"
    query = "&".join(
        f"{name}={_REDACTED}" if equals else name
        for name, equals, _value in (field.partition("=") for field in parts.query.split("&"))
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query if parts.query else "", ""))


# -- the table ---------------------------------------------------------------------------


def _dataclass_defaults(cls: type[object]) -> dict[str, object]:
    defaults: dict[str, object] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]  # any dataclass
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults


def _default_of(target: str) -> object:
    if target.startswith("hub_limits."):
        return _dataclass_defaults(HubLimits)[target.removeprefix("hub_limits.")]
    return _dataclass_defaults(ServerConfig)[target]


def _s(
    name: str,
    kind: Kind,
    help: str,
    *,
    target: str | None = "",
    default: object = None,
    choices: tuple[str, ...] = (),
    is_secret: bool = False,
    group: str | None = None,
    metavar: str | None = None,
) -> Setting:
    """A setting that fills ``target`` (by default the field of its own name),
    whose default is that field's."""
    if target == "":
        target = name
    return Setting(
        name=name,
        kind=kind,
        help=help,
        target=target,
        default=default if target is None else _default_of(target),
        choices=choices,
        is_secret=is_secret,
        group=group,
        metavar=metavar,
    )


def _build() -> tuple[Setting, ...]:
    return (
        _s("host", Kind.TEXT, "address to listen on", metavar="HOST"),
        _s("port", Kind.INTEGER, "port (0 = any free port)"),
        _s("data_dir", Kind.PATH, "data directory (development key, SQLite permission store)"),
        _s("jwks_file", Kind.PATH, "trust the keys of this JWKS file", group="keys"),
        _s(
            "jwks_url",
            Kind.TEXT,
            "trust the keys of this JWKS URL",
            group="keys",
            is_secret=True,
            metavar="URL",
        ),
        _s("issuer", Kind.TEXT, "required token issuer (iss)", metavar="ISS"),
        _s("audience", Kind.TEXT, "required token audience (aud)", metavar="AUD"),
        _s(
            "no_audience_check",
            Kind.SWITCH,
            "with --jwks-file/--jwks-url, accept tokens for any audience (not recommended)",
            target="allow_any_audience",
        ),
        _s("demo", Kind.SWITCH, "publish demo events, grant a demo Site Admin"),
        _s("demo_interval", Kind.SECONDS, "seconds between demo entries"),
        _s(
            "keepalive_interval",
            Kind.SECONDS,
            "seconds between hub Pings",
            target="hub_limits.keepalive_interval",
        ),
        _s(
            "client_timeout",
            Kind.SECONDS,
            "seconds of client silence",
            target="hub_limits.client_timeout",
        ),
        _s(
            "handshake_timeout",
            Kind.SECONDS,
            "seconds for the handshake",
            target="hub_limits.handshake_timeout",
        ),
        _s(
            "max_message_bytes",
            Kind.INTEGER,
            "inbound hub message limit",
            target="hub_limits.max_message_bytes",
        ),
        _s("max_outbox_bytes", Kind.INTEGER, "queued bytes per connection"),
        _s(
            "slow_client_timeout",
            Kind.SECONDS,
            "seconds a connection's output may stay over --max-outbox-bytes",
        ),
        _s("max_publish_bytes", Kind.INTEGER, "publish body limit"),
        _s("drain_timeout", Kind.SECONDS, "seconds to drain on shutdown"),
        _s(
            "backplane",
            Kind.TEXT,
            "redis://[[USER]:PASSWORD@]HOST:PORT/DB to run several nodes as one service",
            is_secret=True,
            metavar="URL",
        ),
        _s(
            "permissions",
            Kind.CHOICE,
            "where roles live: sqlite (a file in --data-dir, per node), redis (the "
            "--backplane's Redis, one set for the fleet) or url (--permissions-url); unset: "
            "url with --permissions-url, else redis with --backplane, else sqlite",
            choices=PERMISSION_SOURCES,
        ),
        _s(
            "permissions_url",
            Kind.TEXT,
            "ask the access-control backend for roles: GET URL?site_id=S&subject=U answers "
            '{"role": "site_admin"|"site_super_user"|"site_user"|null} (no credentials in '
            "the URL: see --permissions-url-token-file)",
            is_secret=True,
            metavar="URL",
        ),
        _s(
            "permissions_url_token_file",
            Kind.PATH,
            "a file holding the token --permissions-url gets as Authorization: Bearer TOKEN "
            "(read at start; never logged)",
            metavar="PATH",
        ),
        _s(
            "permissions_ttl",
            Kind.SECONDS,
            "seconds an answer of --permissions-url is reused (and between two re-checks of "
            "every open connection against it); at least 1",
        ),
        _s("history_size", Kind.INTEGER, "events kept per site and hub"),
        _s("resume_window", Kind.SECONDS, "seconds live events wait for Resume"),
        _s(
            "stateful_reconnect_window",
            Kind.SECONDS,
            "seconds a stateful-reconnect connection waits for its client's new WebSocket "
            "(0: never offered)",
        ),
        _s(
            "publish_window",
            Kind.INTEGER,
            "events awaiting local delivery before publishes wait (1: lowest latency)",
        ),
        _s(
            "workers",
            Kind.INTEGER_OR_AUTO,
            "worker processes on the port: a number or 'auto' (one per core)",
            target=None,
            default=1,
            metavar="N",
        ),
        _s(
            "dedupe_window",
            Kind.SECONDS,
            "seconds a published event id is remembered: a retry is not published again (0: off)",
        ),
        _s(
            "max_dedupe_ids",
            Kind.INTEGER,
            "event ids remembered at most without Redis (past it the oldest go early)",
        ),
        _s(
            "site_idle_timeout",
            Kind.SECONDS,
            "seconds before a site with no subscriber and no event is forgotten from memory",
        ),
        _s(
            "max_history_sites",
            Kind.INTEGER,
            "sites whose history is kept at most without Redis (least recently used go first)",
        ),
        _s(
            "max_history_bytes",
            Kind.INTEGER,
            "bytes all sites' histories hold at most without Redis (the least recently used "
            "site's oldest events go first)",
        ),
        _s(
            "request_timeout",
            Kind.SECONDS,
            "seconds for one HTTP request: head, body and writing the answer",
        ),
        _s(
            "http_idle_timeout",
            Kind.SECONDS,
            "seconds a keep-alive HTTP connection may idle between requests",
        ),
        _s(
            "max_connections",
            Kind.INTEGER_OR_AUTO,
            "open connections per process, 503 above ('auto': the open-files limit, "
            "raised to its hard limit, minus 64)",
            metavar="N",
        ),
        _s(
            "max_connections_per_ip",
            Kind.INTEGER,
            "open connections per client address, 429 above (0 = off; raise it or "
            "turn it off behind a proxy)",
        ),
        _s(
            "max_hub_connections_per_subject",
            Kind.INTEGER,
            "open hub connections per token subject, 429 above (0 = off)",
        ),
        _s(
            "cors_origin",
            Kind.LIST,
            "a browser origin (scheme://host[:port]) whose pages may call the hubs and the "
            "publish API, with credentials; repeatable or comma-separated; '*' alone: any "
            "origin, without credentials. With a list, WebSocket upgrades from other origins "
            "get 403",
            target="cors_origins",
            metavar="ORIGIN",
        ),
        _s(
            "log_level",
            Kind.CHOICE,
            "least severe level logged",
            target=None,
            default="info",
            choices=LOG_LEVELS,
        ),
        _s(
            "log_format",
            Kind.CHOICE,
            "text, json (one object per line), or auto: text on a terminal, json otherwise",
            target=None,
            default="auto",
            choices=LOG_FORMATS,
        ),
        _s(
            "access_log",
            Kind.SWITCH,
            "log every HTTP request at INFO (by default only refusals and errors)",
        ),
        _s(
            "metrics",
            Kind.CHOICE,
            "Prometheus metrics at GET /metrics; off: no /metrics, no event-loop lag probe, "
            "no histograms on the publish and delivery paths",
            choices=METRICS_SWITCH,
        ),
        _s(
            "metrics_host",
            Kind.TEXT,
            "with --metrics-port: the metrics listener's address (loopback by default: the "
            "metrics tell about the service's operation; exposing them is a choice)",
            metavar="HOST",
        ),
        _s(
            "metrics_port",
            Kind.INTEGER,
            "serve /metrics (and /healthz, /readyz) on a listener of its own on this port, "
            "and answer /metrics on the main port with 404 (0 = any free port)",
            metavar="PORT",
        ),
        _s(
            "broker_max_queue_bytes",
            Kind.INTEGER,
            "--workers without --backplane: bytes queued for a worker's event stream "
            "before that worker is disconnected (it resubscribes, recovering from history)",
        ),
    )


SETTINGS: Final[tuple[Setting, ...]] = _build()
SETTINGS_BY_NAME: Final[Mapping[str, Setting]] = {s.name: s for s in SETTINGS}
