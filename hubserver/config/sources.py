"""Where each ``serve`` setting comes from: a flag, the environment, a file, or its default.

Precedence, per setting: a flag on the command line wins over its
``HUBSERVER_*`` variable, which wins over the config file (``--config FILE``
or ``HUBSERVER_CONFIG``), which wins over the default. An empty environment
variable counts as unset. Everything is read and checked before anything
starts: an unknown key, a value of the wrong type or a value the server
refuses is one ``ConfigError`` naming the key and where it came from.

The config file is TOML, with the flags' names as keys at the top level
(``max-outbox-bytes`` or ``max_outbox_bytes``), TOML types (``cors_origin =
["https://a.example"]``, ``access_log = true``), and relative paths taken
relative to the file's directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, cast

from hubcore import HubError, HubLimits

from . import ConfigError, ServerConfig
from .settings import (
    ENV_PREFIX,
    SETTINGS,
    SETTINGS_BY_NAME,
    Kind,
    Setting,
    SettingValueError,
    split_list,
)

__all__ = [
    "CONFIG_ENV",
    "Origin",
    "Settings",
    "Value",
    "add_arguments",
    "read_config_file",
    "resolve",
    "settings_from_arguments",
]

#: The environment variable naming the config file (``--config`` wins over it).
CONFIG_ENV: Final = ENV_PREFIX + "CONFIG"


class Origin(enum.Enum):
    """Where a setting's value came from, strongest first."""

    FLAG = "flag"
    ENV = "env"
    FILE = "file"
    DEFAULT = "default"


@dataclasses.dataclass(frozen=True, slots=True)
class Value:
    """A setting's effective value and its origin."""

    setting: Setting
    value: object
    origin: Origin
    #: The flag, the variable or the file that gave it ("" for the default).
    where: str = ""

    def describe(self) -> str:
        """``flag --port``, ``env HUBSERVER_PORT``, ``file /etc/hubserver.toml`` or ``default``."""
        if self.origin is Origin.DEFAULT:
            return "default"
        return f"{self.origin.value} {self.where}"


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Every ``serve`` setting's effective value (``settings["port"]``) and its origin.

    Attributes:
        values: by setting name, in ``SETTINGS`` order.
        file: the config file read, if any.
    """

    values: Mapping[str, Value]
    file: Path | None = None

    def __getitem__(self, name: str) -> object:
        return self.values[name].value

    def server_config(
        self, *, reuse_port: bool = False, broker_socket: Path | None = None
    ) -> ServerConfig:
        """The ``ServerConfig`` these settings make (plus a ``--workers`` worker's own two).

        Raises:
            ConfigError: the server refuses a value; the message says where it came from.
        """
        fields: dict[str, object] = {"reuse_port": reuse_port, "broker_socket": broker_socket}
        limits: dict[str, object] = {}
        for value in self.values.values():
            target = value.setting.target
            if target is None:
                continue
            if target.startswith("hub_limits."):
                limits[target.removeprefix("hub_limits.")] = value.value
            else:
                fields[target] = value.value
        try:
            # Each value was checked against its setting's kind, which a test
            # matches with the field's annotation.
            fields["hub_limits"] = HubLimits(**cast("dict[str, Any]", limits))
            return ServerConfig(**cast("dict[str, Any]", fields))
        except (HubError, ValueError) as exc:
            raise ConfigError(self._blame(str(exc))) from exc

    def _blame(self, message: str) -> str:
        """``message``, plus where each setting it names was set (when not by default)."""
        named = [
            value
            for value in self.values.values()
            if value.origin is not Origin.DEFAULT
            and any(
                re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", message)
                for word in (value.setting.name, value.setting.flag)
            )
        ]
        if not named:
            return message
        return f"{message} ({'; '.join(_where(value) for value in named)})"

    def count(self, origin: Origin) -> int:
        return sum(1 for value in self.values.values() if value.origin is origin)

    def show(self) -> str:
        """The effective settings as TOML, each with its origin, secrets redacted.

        Without its secrets the output is itself a config file that gives the
        same settings.
        """
        lines = [
            "# hubserver serve: effective settings. A flag wins over its HUBSERVER_* variable,",
            "# which wins over the config file"
            + (f" ({self.file})" if self.file is not None else "")
            + ", which wins over the default.",
        ]
        rows: list[tuple[str, str]] = []
        for value in self.values.values():
            # Absolute: relative paths in a file are the file's, on the command line the cwd's.
            raw = value.value.absolute() if isinstance(value.value, Path) else value.value
            shown = value.setting.to_toml(raw)
            if shown is None:
                rows.append((f"# {value.setting.name} is not set", value.describe()))
            else:
                rows.append((f"{value.setting.name} = {shown}", value.describe()))
        width = min(max(len(left) for left, _ in rows), 48)
        lines += [f"{left:<{width}}  # {origin}" for left, origin in rows]
        return "\n".join(lines) + "\n"


def _where(value: Value) -> str:
    if value.origin is Origin.FILE:
        return f"{value.setting.name} in {value.where}"
    return value.where


def read_config_file(path: Path) -> dict[str, object]:
    """Read ``path``: its settings by name, each checked against its kind.

    Raises:
        ConfigError: unreadable, not TOML, an unknown key, a key given twice,
            or a value of the wrong type; the message names the file and the key.
    """
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text") from exc
    base = path.absolute().parent
    values: dict[str, object] = {}
    keys: dict[str, str] = {}
    for key, raw in document.items():
        name = key.replace("-", "_")
        setting = SETTINGS_BY_NAME.get(name)
        if setting is None:
            raise ConfigError(f"{path}: {_unknown(key, raw)}")
        if name in keys:
            raise ConfigError(f"{path}: {name} is given twice (as {keys[name]!r} and {key!r})")
        keys[name] = key
        try:
            values[name] = setting.from_toml(raw, base=base)
        except SettingValueError as exc:
            raise ConfigError(f"{path}: {key}: {exc}") from None
    return values


def _unknown(key: str, value: object) -> str:
    if isinstance(value, dict):
        return f"unknown table [{key}]: settings go at the top level of the file, in no table"
    close = difflib.get_close_matches(key.replace("-", "_"), list(SETTINGS_BY_NAME), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown setting {key!r}{hint}; `hubserver serve --help` lists them all"


def resolve(
    flags: Mapping[str, object],
    environ: Mapping[str, str],
    config_file: Path | None = None,
) -> Settings:
    """Every setting's value, by precedence: flag, environment, file, default.

    Args:
        flags: the values given on the command line, by setting name (already
            parsed, as ``settings_from_arguments`` does).
        environ: the environment (``HUBSERVER_*`` is read; anything else ignored).
        config_file: the TOML file to read, if any.

    Raises:
        ConfigError: a bad file, key or value, naming where it came from.
    """
    from_file = read_config_file(config_file) if config_file is not None else {}
    values: dict[str, Value] = {}
    for setting in SETTINGS:
        name = setting.name
        if name in flags:
            values[name] = Value(setting, flags[name], Origin.FLAG, setting.flag)
        elif environ.get(setting.env):
            try:
                value = setting.from_text(environ[setting.env])
            except SettingValueError as exc:
                raise ConfigError(f"{setting.env}: {exc}") from None
            values[name] = Value(setting, value, Origin.ENV, setting.env)
        elif name in from_file:
            values[name] = Value(setting, from_file[name], Origin.FILE, str(config_file))
        else:
            values[name] = Value(setting, setting.default, Origin.DEFAULT)
    return Settings(values, config_file)


# -- the command line --------------------------------------------------------------------


class _ListFlag(argparse.Action):
    """A repeatable flag whose values may also be comma-separated; the command
    line's list replaces the environment's and the file's."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        items += split_list(str(values))
        setattr(namespace, self.dest, items)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and a flag for every setting.

    A flag not given leaves no attribute (``argparse.SUPPRESS``), so that
    ``settings_from_arguments`` knows what the command line set.
    """
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"read settings from this TOML file; flags and HUBSERVER_* variables win over "
        f"it (env {CONFIG_ENV})",
    )
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for setting in SETTINGS:
        container: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup = parser
        if setting.group is not None:
            if setting.group not in groups:
                groups[setting.group] = parser.add_mutually_exclusive_group()
            container = groups[setting.group]
        common: dict[str, Any] = {
            "dest": setting.name,
            "default": argparse.SUPPRESS,
            "help": setting.help_text(),
        }
        if setting.kind is Kind.SWITCH:
            container.add_argument(setting.flag, action="store_true", **common)
        elif setting.kind is Kind.LIST:
            container.add_argument(
                setting.flag, action=_ListFlag, metavar=setting.metavar, **common
            )
        else:
            metavar = setting.metavar or ("|".join(setting.choices) if setting.choices else None)
            container.add_argument(setting.flag, metavar=metavar, **common)


def settings_from_arguments(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Settings:
    """The settings of a command whose parser ``add_arguments`` built.

    Raises:
        ConfigError: a bad flag value, variable, file, key or value.
    """
    environ = os.environ if environ is None else environ
    flags: dict[str, object] = {}
    for setting in SETTINGS:
        if not hasattr(args, setting.name):
            continue
        raw = getattr(args, setting.name)
        if isinstance(raw, bool):
            flags[setting.name] = raw
        elif isinstance(raw, list):
            flags[setting.name] = tuple(raw)
        else:
            try:
                flags[setting.name] = setting.from_text(str(raw))
            except SettingValueError as exc:
                raise ConfigError(f"{setting.flag}: {exc}") from None
    config_file: Path | None = getattr(args, "config", None)
    if config_file is None and environ.get(CONFIG_ENV):
        config_file = Path(environ[CONFIG_ENV])
    return resolve(flags, environ, config_file)
