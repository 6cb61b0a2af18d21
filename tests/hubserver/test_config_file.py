"""Issue #12, item 3: one settings table behind the flags, the environment, a TOML file and
``config show``.

Precedence per setting: flag > ``HUBSERVER_*`` > file > default. A bad file (an
unknown key, a wrong type, a value the server refuses) stops ``serve`` before
anything starts, with one line naming the key and the file, and exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest
import trio

from hubcore import HubLimits
from hubserver.__main__ import _config, _parser, main
from hubserver.config import ConfigError, ServerConfig
from hubserver.config.settings import SETTINGS, SETTINGS_BY_NAME, Kind, Setting
from hubserver.config.sources import Origin, Settings, read_config_file, resolve

from .helpers import ProcessLog, build_request, exchange

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "hubserver.toml"
#: ServerConfig fields no setting fills, and why.
NOT_SETTINGS = {
    "hub_limits": "filled field by field (hub_limits.<field>)",
    "permission_poll_interval": "internal tuning, not a flag",
    "token_leeway": "internal tuning, not a flag",
    "reuse_port": "set by the --workers parent for its workers",
    "broker_socket": "set by the --workers parent for its workers",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No HUBSERVER_* of the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.startswith("HUBSERVER_"):
            monkeypatch.delenv(name)


def settings_of(
    argv: list[str], env: dict[str, str] | None = None, text: str | None = None, *, tmp: Path
) -> Settings:
    from hubserver.config.sources import settings_from_arguments

    if text is not None:
        (tmp / "hubserver.toml").write_text(text)
        argv = [*argv, "--config", str(tmp / "hubserver.toml")]
    return settings_from_arguments(_parser().parse_args(["serve", *argv]), env or {})


def write(tmp_path: Path, text: str, name: str = "hubserver.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- one table -------------------------------------------------------------------------


def test_every_config_field_is_a_setting_or_named_as_internal() -> None:
    targets = {s.target for s in SETTINGS if s.target is not None}
    fields = {f.name for f in dataclasses.fields(ServerConfig)}
    assert targets - {t for t in targets if t.startswith("hub_limits.")} <= fields
    assert fields - targets == set(NOT_SETTINGS), "a new ServerConfig field needs a setting"
    for target in targets:
        if target.startswith("hub_limits."):
            assert target.removeprefix("hub_limits.") in {
                f.name for f in dataclasses.fields(HubLimits)
            }


KIND_TYPES = {
    Kind.TEXT: {str, str | None},
    Kind.INTEGER: {int, int | None},  # None: unset (--metrics-port)
    Kind.SECONDS: {float},
    Kind.SWITCH: {bool},
    Kind.PATH: {Path, Path | None},
    Kind.LIST: {tuple[str, ...]},
    Kind.INTEGER_OR_AUTO: {int | None},
    Kind.CHOICE: {str, str | None},
}


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.target], ids=lambda s: s.name)
def test_each_setting_kind_matches_its_field_type(setting: Setting) -> None:
    assert setting.target is not None
    owner, _, name = setting.target.rpartition(".")
    hints = typing.get_type_hints(HubLimits if owner else ServerConfig)
    assert hints[name] in KIND_TYPES[setting.kind], (setting.name, hints[name])
    if setting.kind is Kind.INTEGER:
        # Only a setting that may be unset (no default) holds None.
        assert (hints[name] == int | None) is setting.is_optional, setting.name


def test_the_defaults_are_those_the_flags_always_had() -> None:
    """The settings no flag sets give what ``hubserver serve`` always gave."""
    config = _config(_parser().parse_args(["serve"]))
    assert config == ServerConfig(
        host="127.0.0.1",
        port=5000,
        data_dir=Path(".hubserver"),
        hub_limits=HubLimits(
            keepalive_interval=15.0,
            client_timeout=30.0,
            handshake_timeout=15.0,
            max_message_bytes=32 * 1024,
        ),
        demo_interval=1.0,
        max_outbox_bytes=1 << 20,
        slow_client_timeout=5.0,
        max_publish_bytes=1 << 20,
        drain_timeout=10.0,
        history_size=1000,
        resume_window=0.5,
        stateful_reconnect_window=30.0,
        publish_window=1000,
        dedupe_window=600.0,
        max_dedupe_ids=100_000,
        site_idle_timeout=600.0,
        max_history_sites=10_000,
        request_timeout=15.0,
        http_idle_timeout=120.0,
        max_connections=None,
        max_connections_per_ip=1000,
        max_hub_connections_per_subject=100,
        broker_max_queue_bytes=8 << 20,
    )
    settings = settings_of([], tmp=Path("."))
    assert (settings["workers"], settings["log_level"], settings["access_log"]) == (
        1,
        "info",
        False,
    )


def sample(setting: Setting) -> tuple[object, str, object]:
    """A value other than the default: as TOML, as flag/env text, and as parsed."""
    match setting.kind:
        case Kind.INTEGER | Kind.INTEGER_OR_AUTO:
            return 7, "7", 7
        case Kind.SECONDS:
            return 2.5, "2.5", 2.5
        case Kind.SWITCH:
            return True, "true", True
        case Kind.TEXT:
            return "http://x.example/a", "http://x.example/a", "http://x.example/a"
        case Kind.PATH:
            return "/srv/x", "/srv/x", Path("/srv/x")
        case Kind.LIST:
            return (
                ["https://a.example", "https://b.example"],
                "https://a.example,https://b.example",
                (
                    "https://a.example",
                    "https://b.example",
                ),
            )
        case Kind.CHOICE:
            return setting.choices[-1], setting.choices[-1], setting.choices[-1]
    raise AssertionError(setting.kind)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_every_setting_comes_from_a_flag_the_environment_or_the_file(
    setting: Setting, tmp_path: Path
) -> None:
    toml_value, text, expected = sample(setting)
    assert expected != setting.default
    file = write(tmp_path, f"{setting.name.replace('_', '-')} = {tomllib_dump(toml_value)}\n")
    from_file = resolve({}, {}, file).values[setting.name]
    assert (from_file.value, from_file.origin) == (expected, Origin.FILE)
    from_env = resolve({}, {setting.env: text}, file).values[setting.name]
    assert (from_env.value, from_env.origin) == (expected, Origin.ENV)
    flag = [setting.flag] if setting.kind is Kind.SWITCH else [setting.flag, text]
    from_flag = settings_of(flag, {setting.env: text}, tmp=tmp_path).values[setting.name]
    assert (from_flag.value, from_flag.origin) == (expected, Origin.FLAG)


def tomllib_dump(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(tomllib_dump(item) for item in value) + "]"
    return str(value)


# -- precedence ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env", "expected", "origin"),
    [
        ([], {}, 5000, Origin.DEFAULT),
        ([], None, 6001, Origin.FILE),
        ([], {"HUBSERVER_PORT": "6002"}, 6002, Origin.ENV),
        (["--port", "6003"], {"HUBSERVER_PORT": "6002"}, 6003, Origin.FLAG),
        ([], {"HUBSERVER_PORT": ""}, 6001, Origin.FILE),  # empty counts as unset
    ],
    ids=["default", "file", "env-over-file", "flag-over-env", "empty-env"],
)
def test_flag_over_environment_over_file_over_default(
    tmp_path: Path, argv: list[str], env: dict[str, str] | None, expected: int, origin: Origin
) -> None:
    text = None if env == {} and not argv else "port = 6001\n"
    settings = settings_of(argv, env or {}, text, tmp=tmp_path)
    assert settings.values["port"].value == expected
    assert settings.values["port"].origin is origin


def test_the_config_file_can_come_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "max_outbox_bytes = 4096\n")
    settings = settings_of([], {"HUBSERVER_CONFIG": str(path)}, tmp=tmp_path)
    assert settings.server_config().max_outbox_bytes == 4096
    assert settings.file == path


def test_list_settings_are_toml_arrays_and_the_flag_replaces_them(tmp_path: Path) -> None:
    text = 'cors_origin = ["https://App.example.com:443", "http://127.0.0.1:8080"]\n'
    settings = settings_of([], {}, text, tmp=tmp_path)
    assert settings.server_config().cors_origins == (
        "https://app.example.com",
        "http://127.0.0.1:8080",
    )
    env = {"HUBSERVER_CORS_ORIGIN": "https://env.example"}
    assert settings_of([], env, text, tmp=tmp_path)["cors_origin"] == ("https://env.example",)
    argv = ["--cors-origin", "https://flag.example", "--cors-origin", "*"]
    with pytest.raises(ConfigError, match="cannot be combined"):
        settings_of(argv, env, text, tmp=tmp_path).server_config()
    assert settings_of(argv[:2], env, text, tmp=tmp_path)["cors_origin"] == (
        "https://flag.example",
    )


def test_relative_paths_in_the_file_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = write(tmp_path / "etc", 'data_dir = "data"\njwks_file = "../keys/jwks.json"\n')
    values = read_config_file(path)
    assert values["data_dir"] == tmp_path / "etc" / "data"
    assert values["jwks_file"] == tmp_path / "etc" / ".." / "keys" / "jwks.json"


def test_keys_take_dashes_or_underscores_but_not_both(tmp_path: Path) -> None:
    both = write(tmp_path, "max-outbox-bytes = 1\nmax_outbox_bytes = 2\n")
    with pytest.raises(ConfigError, match="max_outbox_bytes is given twice"):
        read_config_file(both)


# -- errors: one line, naming the key and the file, before anything starts ---------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'cors_origins = ["https://a.example"]\n',
            "unknown setting 'cors_origins' (did you mean 'cors_origin'?)",
        ),
        ("reuse_port = true\n", "unknown setting 'reuse_port'"),
        ("[serve]\nport = 1\n", "unknown table [serve]"),
        ('port = "5000"\n', 'port: expected an integer, got a string "5000"'),
        ("port = 5000.0\n", "port: expected an integer, got a float"),
        ("access-log = 1\n", "access-log: expected a boolean, got an integer"),
        ("demo_interval = true\n", "demo_interval: expected a number, got a boolean"),
        (
            'cors_origin = "https://a.example"\n',
            "cors_origin: expected an array of strings, got a string",
        ),
        (
            "cors_origin = [1]\n",
            "cors_origin: expected an array of strings, got an array with an integer",
        ),
        ("workers = 0\n", "workers: expected a positive integer or 'auto', got 0"),
        ('log_format = "xml"\n', "log_format: expected one of auto, text, json"),
        ("backplane = 6379\n", "backplane: expected a string, got an integer"),
        ("port =\n", "not valid TOML"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = write(tmp_path, text)
    assert main(["serve", "--config", str(path), "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err == f"hubserver: error: {path}: {message}" + err.split(message, 1)[1]
    assert err.count("\n") == 1, err
    assert not (tmp_path / "data").exists(), "something started"


def test_a_value_the_server_refuses_says_where_it_was_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "max_outbox_bytes = 0\nport = 70000\n")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hubserver: error: port must be 0..65535"), err
    assert f"(port in {path})" in err
    assert main(["serve", "--port", "1", "--config", str(path)]) == 2
    assert f"(max_outbox_bytes in {path})" in capsys.readouterr().err


def test_bad_environment_values_name_the_variable_and_never_a_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUBSERVER_MAX_CONNECTIONS", "lots")
    assert main(["serve"]) == 2
    assert capsys.readouterr().err == (
        "hubserver: error: HUBSERVER_MAX_CONNECTIONS: expected an integer or 'auto', got 'lots'\n"
    )
    monkeypatch.delenv("HUBSERVER_MAX_CONNECTIONS")
    monkeypatch.setenv("HUBSERVER_ACCESS_LOG", "maybe")
    assert main(["serve"]) == 2
    assert (
        "HUBSERVER_ACCESS_LOG: expected 1/true/yes/on or 0/false/no/off" in capsys.readouterr().err
    )


# -- the permissions URL's token file ----------------------------------------------------


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read it: No such file or directory"),
        (b"", "the file is empty"),
        (b" \n\t\n", "the file is empty"),
        (b"s3cret-one\ns3cret-two\n", "expected one token (one line of visible ASCII, no spaces)"),
        (b"Bearer s3cret", "expected one token (one line of visible ASCII, no spaces)"),
        ("s3crét".encode(), "expected one token (one line of visible ASCII, no spaces)"),
        (b"s3cret" * 4000, "over 16384 bytes, not a token"),
    ],
)
def test_a_token_file_that_holds_no_token_stops_serve_and_never_shows_its_content(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, problem: str
) -> None:
    token_file = tmp_path / "acl-token"
    if content is not None:
        token_file.write_bytes(content)
    url = "http://127.0.0.1:9/roles"
    for workers in ("1", "2"):  # refused by the --workers parent, before any worker starts
        argv = ["serve", "--permissions-url", url, "--permissions-url-token-file"]
        assert main([*argv, str(token_file), "--workers", workers, "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err == f"hubserver: error: --permissions-url-token-file {token_file}: {problem}\n"
        assert "s3cr" not in err


def test_a_token_file_is_read_whole_and_shown_as_a_path_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hubserver.config import read_token_file

    token_file = tmp_path / "acl-token"
    token_file.write_text("  eyJhbGciOi.s3cret-payload.sig==\r\n")
    assert read_token_file(token_file) == "eyJhbGciOi.s3cret-payload.sig=="
    path = write(
        tmp_path,
        'permissions_url = "https://acl.internal/roles"\n'
        'permissions_url_token_file = "acl-token"\n',  # relative to the file
    )
    assert main(["config", "show", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f'permissions_url_token_file = "{token_file}"' in out
    assert "s3cret" not in out
    # A token for no URL is a mistake worth stopping for.
    assert main(["serve", "--permissions-url-token-file", str(token_file)]) == 2
    assert "give both, or neither" in capsys.readouterr().err


def test_a_permissions_url_with_credentials_is_refused_and_never_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials in the URL were dropped without a word (only a bearer token from
    a file is sent): refused, wherever the URL comes from, without repeating it."""
    url = "https://ops:s3cret@acl.internal/roles?api_key=k3y"
    path = write(tmp_path, f'permissions_url = "{url}"\n')
    data = ["--data-dir", str(tmp_path / "data")]
    hint = "put it in a file and give --permissions-url-token-file PATH"
    with pytest.raises(ConfigError, match=hint):  # before anything could start
        _config(_parser().parse_args(["serve", "--permissions-url", url]))
    assert main(["serve", "--permissions-url", url, *data]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hubserver: error: --permissions-url must not hold credentials"), err
    assert hint in err and err.endswith("(--permissions-url)\n")
    assert main(["serve", "--config", str(path), *data]) == 2
    assert f"(permissions_url in {path})" in capsys.readouterr().err
    assert main(["check", "--config", str(path), *data]) == 1
    assert hint in capsys.readouterr().out
    assert main(["config", "show", "--config", str(path)]) == 0
    shown = capsys.readouterr().out
    assert 'permissions_url = "https://ops:***@acl.internal/roles?api_key=***"' in shown
    monkeypatch.setenv("HUBSERVER_PERMISSIONS_URL", url)
    assert main(["serve", *data]) == 2
    assert "(HUBSERVER_PERMISSIONS_URL)" in capsys.readouterr().err
    assert main(["config", "show"]) == 0
    shown += capsys.readouterr().out
    assert "s3cret" not in shown and "k3y" not in shown
    assert not (tmp_path / "data").exists(), "something started"
    # The query names what each question adds: refused too (a second subject= would
    # leave the answer to the backend's choice of the two).
    assert main(["serve", "--permissions-url", "https://acl.internal/r?subject=x", *data]) == 2
    assert "must not have site_id or subject in its query" in capsys.readouterr().err


def test_a_permissions_ttl_below_one_second_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", "--permissions-url", "https://acl.internal/roles", "--permissions-ttl"]
    with pytest.raises(ConfigError, match="at least 1 second"):  # before anything could start
        _config(_parser().parse_args([*argv, "0.001"]))
    assert main([*argv, "0.001", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hubserver: error: permissions_ttl must be at least 1 second"), err
    assert err.endswith("(--permissions-ttl)\n")
    assert not (tmp_path / "data").exists(), "something started"


def test_a_missing_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: cannot read the config file: No such file or directory" in (
        capsys.readouterr().err
    )


# -- config show -----------------------------------------------------------------------


def test_config_show_says_where_each_value_came_from_and_hides_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        'backplane = "redis://ops:hunter2@redis.internal:6379/1"\n'
        "port = 6000\n"
        'cors_origin = ["https://a.example"]\n'
        "access_log = true\n",
    )
    monkeypatch.setenv("HUBSERVER_JWKS_URL", "https://svc:s3cr3t@idp.example/jwks?api_key=k3y&x=1")
    monkeypatch.setenv("HUBSERVER_PORT", "6001")
    assert main(["config", "show", "--config", str(path), "--log-level", "debug"]) == 0
    out = capsys.readouterr().out
    for secret in ("hunter2", "s3cr3t", "k3y"):
        assert secret not in out
    lines = {line.split(" = ")[0]: line for line in out.splitlines() if " = " in line}
    assert lines["backplane"].startswith('backplane = "redis://ops:***@redis.internal:6379/1"')
    assert lines["backplane"].endswith(f"# file {path}")
    assert lines["jwks_url"].startswith(
        'jwks_url = "https://svc:***@idp.example/jwks?api_key=***&x=***"'
    )
    assert lines["jwks_url"].endswith("# env HUBSERVER_JWKS_URL")
    assert lines["port"].startswith("port = 6001") and lines["port"].endswith(
        "# env HUBSERVER_PORT"
    )
    assert lines["log_level"].endswith("# flag --log-level")
    assert lines["host"].endswith("# default")
    assert lines["cors_origin"].startswith('cors_origin = ["https://a.example"]')
    assert "# issuer is not set" in out
    unset = {
        "issuer",
        "audience",
        "jwks_file",
        "permissions",
        "permissions_url",
        "permissions_url_token_file",
        "metrics_port",
    }
    assert set(lines) | unset == set(SETTINGS_BY_NAME)


def test_config_show_and_the_file_carry_the_metrics_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, 'metrics-port = 9100\nmetrics = "on"\n')
    monkeypatch.setenv("HUBSERVER_METRICS_HOST", "0.0.0.0")
    assert main(["config", "show", "--config", str(path)]) == 0
    lines = {
        line.split(" = ")[0]: line for line in capsys.readouterr().out.splitlines() if " = " in line
    }
    assert lines["metrics_port"].startswith("metrics_port = 9100")
    assert lines["metrics_port"].endswith(f"# file {path}")
    assert lines["metrics_host"].startswith('metrics_host = "0.0.0.0"')
    assert lines["metrics_host"].endswith("# env HUBSERVER_METRICS_HOST")
    config = settings_of(["--config", str(path)], dict(os.environ), tmp=tmp_path).server_config()
    assert (config.metrics_host, config.metrics_port, config.is_metrics_on) == (
        "0.0.0.0",
        9100,
        True,
    )
    # Unset by default: /metrics stays on the main port, shown as not set.
    assert main(["config", "show"]) == 0
    assert "# metrics_port is not set" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('metrics = "off"\nmetrics_port = 9100\n', "--metrics off turns off"),
        ("port = 9100\nmetrics_port = 9100\n", "--metrics-port must differ from --port"),
        ("metrics_port = 70000\n", "metrics_port must be 0..65535"),
        ("metrics = false\n", "metrics: expected one of on, off, got a boolean"),
    ],
    ids=["off-with-port", "same-port", "out-of-range", "boolean"],
)
def test_metrics_settings_the_server_refuses(tmp_path: Path, text: str, error: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=error) as caught:
        settings_of(["--config", str(path)], tmp=tmp_path).server_config()
    assert str(path) in str(caught.value)


def test_config_show_output_is_a_config_file_of_the_same_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--port", "6000", "--cors-origin", "https://a.example", "--max-connections", "900"]
    argv += ["--no-audience-check", "--jwks-file", str(tmp_path / "jwks.json"), "--workers", "auto"]
    assert main(["config", "show", *argv]) == 0
    shown = write(tmp_path, capsys.readouterr().out, "shown.toml")
    tomllib.loads(shown.read_text())
    again = resolve({}, {}, shown)
    original = settings_of(argv, tmp=tmp_path)
    # The same directory, written absolute (relative in a file would be the file's).
    absolute = Path(".hubserver").absolute()
    assert again.server_config() == dataclasses.replace(original.server_config(), data_dir=absolute)
    assert {n: v.value for n, v in again.values.items()} == {
        n: absolute if n == "data_dir" else v.value for n, v in original.values.items()
    }


# -- the example file --------------------------------------------------------------------


def test_the_example_file_loads_and_its_values_are_the_defaults() -> None:
    settings = resolve({}, {}, EXAMPLE)
    defaults = resolve({}, {})
    assert settings.server_config() == defaults.server_config()
    for name, value in settings.values.items():
        assert value.value == defaults.values[name].value, name


def test_the_example_file_mentions_every_setting() -> None:
    text = EXAMPLE.read_text()
    written = set(tomllib.loads(text))
    commented = {
        line.lstrip("# ").split(" =")[0].replace("-", "_")
        for line in text.splitlines()
        if line.startswith("# ") and " = " in line
    }
    assert set(SETTINGS_BY_NAME) <= written | commented
    # What is commented out is an example of a value that has no default.
    for name in commented - written:
        assert SETTINGS_BY_NAME[name].default is None or name == "data_dir", name


def test_config_check_and_serve_share_every_setting_flag() -> None:
    parser = _parser()
    flags = {s.flag for s in SETTINGS}
    for argv in (["serve"], ["check"], ["config", "show"]):
        args = parser.parse_args([*argv, "--config", "x.toml"])
        assert args.config == Path("x.toml")
    actions = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command in ("serve", "check"):
        assert flags <= set(actions[command]._option_string_actions)


# -- serve with a config file, as a process ----------------------------------------------


async def test_serve_runs_on_a_config_file_with_workers(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """``workers = 2`` in the file: the parent starts two workers (each told
    HUBSERVER_WORKERS=1, which wins over the file) that all apply the file."""
    page = "http://page.example"
    path = write(
        tmp_path,
        f'port = 0\ndata_dir = "data"\nworkers = 2\ncors_origin = ["{page}"]\n'
        'log_format = "text"\nresume_window = 0\n',
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBSERVER_")}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "hubserver", "serve", "--config", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,  # not the file's directory: its relative paths still go there
    )
    log = ProcessLog()
    assert process.stderr is not None
    nursery.start_soon(log.pump, process.stderr)
    try:
        with trio.fail_after(30):
            port = int((await log.wait_for(r"2 workers on http://.*:(\d+)")).group(1))
            await log.wait_for(r"worker 1 started")
            while sum("listening on" in line for line in log.lines) < 2:
                await log.lot.park()
            preflight = build_request(
                "OPTIONS",
                "/v1/events/entries",
                headers=[("Origin", page), ("Access-Control-Request-Method", "POST")],
            )
            for _ in range(4):  # the kernel spreads connections over both workers
                response = await exchange(port, preflight)
                assert response.headers.get("access-control-allow-origin") == page, response
        assert (tmp_path / "data" / "permissions.sqlite3").exists()
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(20):
            await process.wait()
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0, "\n".join(log.lines)
    assert sum("worker" in line and "started" in line for line in log.lines) == 2



def test_the_readme_fleet_example_is_a_working_config_file(tmp_path: Path) -> None:
    text = (REPO / "README.md").read_text().split("## Operating a fleet", 1)[1]
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    settings = resolve({}, {}, write(tmp_path, block))
    config = settings.server_config()
    assert config.backplane == "redis://:PASSWORD@redis.internal:6379/0"
    assert config.cors_origins == ("https://app.example.com",)
    assert config.jwks_url is not None and config.audience == "event-streaming"
    assert settings["workers"] is None  # auto
    assert config.metrics_port == 9100
    assert settings.count(Origin.FILE) == 12  # as README's `hubserver check` example says
