"""Issue #12, item 5: ``hubserver check``, the preflight, run as a process.

A good setup (a JWKS served over HTTP, a real redis-server, a writable data
directory) passes every check; a broken one (unreachable Redis, a data
directory that cannot be made, a JWKS URL that answers 404, too few
descriptors for ``--max-connections``) fails each with its reason, and the
exit code says so. Secrets in URLs never reach the output.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from hubserver.auth import DevKey

from .redis_fixture import (  # noqa: F401 (fixtures, found by pytest)
    RedisServer,
    redis_server_fixture,
)
from .role_backend import role_backend
from .test_auth import JwksServer

CHECKS = ["config", "data_dir", "keys", "backplane", "permissions", "descriptors"]


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    return shared_dev_key


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def run_check(
    args: list[str], *, nofile: int | None = None, env: dict[str, str] | None = None
) -> tuple[int, dict[str, tuple[str, str]], str]:
    """``hubserver check ARGS``: its exit code, its lines by check name, and all it printed."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HUBSERVER_")}
    environment.update(env or {})

    def limit_files() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with trio.fail_after(40):
        done = await trio.run_process(
            [sys.executable, "-m", "hubserver", "check", *args],
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=environment,
            preexec_fn=limit_files,
        )
    out = done.stdout.decode()
    lines: dict[str, tuple[str, str]] = {}
    for line in out.splitlines():
        status, name, detail = line.split(maxsplit=2)
        assert status in ("ok", "FAIL"), line
        lines[name] = (status, detail)
    return done.returncode, lines, out + done.stderr.decode()


async def test_a_good_setup_passes_every_check(
    tmp_path: Path, nursery: trio.Nursery, dev_key: DevKey, redis_server: RedisServer
) -> None:
    jwks = JwksServer({"keys": [dev_key.public_jwk()]})
    url = await jwks.start(nursery)
    config = tmp_path / "hubserver.toml"
    config.write_text(
        f'jwks_url = "{url}"\naudience = "event-streaming"\n'
        f'backplane = "{redis_server.url}"\ndata_dir = "data"\nmax_connections = 100\n'
    )
    code, lines, out = await run_check(["--config", str(config)], nofile=1024)
    assert code == 0, out
    assert list(lines) == CHECKS, out
    assert all(status == "ok" for status, _ in lines.values()), out
    assert lines["config"][1].startswith(f"5 from {config}"), out
    assert lines["keys"][1] == (
        "1 signing key(s) from " + url.replace("access_token=x", "access_token=***")
    ), out
    assert jwks.requests == 1
    assert lines["backplane"][1].startswith(f"Redis at 127.0.0.1:{redis_server.port}/0 answered"), (
        out
    )
    assert (tmp_path / "data").is_dir()
    assert lines["data_dir"][1].startswith(f"{tmp_path / 'data'} is writable"), out
    assert lines["descriptors"][1] == "--max-connections 100 fits the open-files limit 1024", out
    # With a backplane, roles live in its Redis.
    assert lines["permissions"][1].startswith(
        f"roles in Redis at 127.0.0.1:{redis_server.port}/0 answer"
    ), out


async def test_a_fleet_on_another_database_is_told_its_channels(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/3"
    code, lines, out = await run_check(["--data-dir", str(tmp_path / "d"), "--backplane", url])
    assert code == 0, out
    assert lines["backplane"][1].endswith("(channel hubserver:events:db3)"), out
    assert lines["permissions"][1].startswith(
        f"roles in Redis at 127.0.0.1:{redis_server.port}/3 answer"
    ), out
    assert lines["permissions"][1].endswith("channel hubserver:perm:changes:db3)"), out


async def test_development_mode_and_a_jwks_file_pass(tmp_path: Path, dev_key: DevKey) -> None:
    code, lines, out = await run_check(["--data-dir", str(tmp_path / "d")])
    assert code == 0, out
    assert "DEVELOPMENT MODE" in lines["config"][1]
    assert lines["keys"][1].startswith("development key"), out
    assert lines["backplane"][1].startswith("none"), out
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [dev_key.public_jwk()]}))
    code, lines, out = await run_check(
        ["--data-dir", str(tmp_path / "d"), "--jwks-file", str(jwks_file), "--no-audience-check"]
    )
    assert code == 0, out
    assert lines["keys"] == ("ok", f"1 signing key(s) from {jwks_file}"), out


async def test_a_broken_setup_fails_each_check_with_its_reason(
    tmp_path: Path, nursery: trio.Nursery, dev_key: DevKey
) -> None:
    jwks = JwksServer({"keys": [dev_key.public_jwk()]})
    jwks.status = 404
    url = await jwks.start(nursery)
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    redis_port = closed_port()
    env = {
        "HUBSERVER_JWKS_URL": url,
        "HUBSERVER_NO_AUDIENCE_CHECK": "1",
        "HUBSERVER_BACKPLANE": f"redis://:hunter2@127.0.0.1:{redis_port}/0",
    }
    args = ["--data-dir", str(not_a_directory / "data"), "--max-connections", "5000"]
    code, lines, out = await run_check(args, nofile=256, env=env)
    assert code == 1, out
    assert list(lines) == CHECKS, out
    assert lines["config"][0] == "ok", out
    assert lines["keys"] == ("FAIL", lines["keys"][1]), out
    assert "HTTP 404 instead of 200" in lines["keys"][1], out
    assert lines["backplane"][0] == "FAIL", out
    assert f"cannot connect to Redis at 127.0.0.1:{redis_port}/0" in lines["backplane"][1], out
    assert lines["data_dir"][0] == "FAIL", out
    assert f"{not_a_directory / 'data'} is not a writable directory" in lines["data_dir"][1]
    assert lines["permissions"][0] == "FAIL", out
    assert lines["descriptors"] == (
        "FAIL",
        "--max-connections 5000 needs 5064 open files; the limit is 256 (raise it: ulimit -n, "
        "or LimitNOFILE= in the systemd unit)",
    ), out
    assert "hunter2" not in out
    assert "access_token=x" not in out


async def test_a_bad_config_is_a_failed_check(tmp_path: Path) -> None:
    config = tmp_path / "hubserver.toml"
    config.write_text('port = "80"\n')
    code, lines, out = await run_check(["--config", str(config)])
    assert code == 1
    assert lines == {"config": ("FAIL", f'{config}: port: expected an integer, got a string "80"')}
    code, lines, out = await run_check(["--jwks-url", "https://idp.example/jwks"])
    assert code == 1
    assert lines["config"][0] == "FAIL" and "need --audience" in lines["config"][1], out
    assert list(lines) == ["config"], "nothing is tried on a configuration serve would refuse"


async def test_the_permissions_url_is_asked_and_garbage_fails(tmp_path: Path) -> None:
    async with role_backend() as backend:
        url = backend.url("api_key=s3cret")
        args = ["--data-dir", str(tmp_path), "--permissions-url", url]
        code, lines, out = await run_check(args)
        assert code == 0, out
        assert lines["permissions"] == (
            "ok",
            f"the permissions URL http://127.0.0.1:{backend.port}/roles?api_key=*** answers "
            "a role lookup (null)",
        ), out
        backend.misbehave = "unknown_role"
        code, lines, out = await run_check(args)
        assert code == 1, out
        assert lines["permissions"][0] == "FAIL", out
        assert "expected a role" in lines["permissions"][1], out
        assert "s3cret" not in out


async def test_the_permissions_url_is_asked_with_the_token_of_the_file(tmp_path: Path) -> None:
    async with role_backend() as backend:
        backend.required_token = "tok-s3cret"
        token_file = tmp_path / "acl-token"
        args = ["--data-dir", str(tmp_path), "--permissions-url", backend.url()]
        args += ["--permissions-url-token-file", str(token_file)]
        code, lines, out = await run_check(args)
        assert code == 1, out
        assert lines["permissions"] == (
            "FAIL",
            f"--permissions-url-token-file {token_file}: cannot read it: No such file or directory",
        ), out
        token_file.write_text("tok-s3cret\n")
        code, lines, out = await run_check(args)
        assert code == 0, out
        assert backend.authorizations == ["Bearer tok-s3cret"]
        token_file.write_text("tok-old\n")
        code, lines, out = await run_check(args)
        assert lines["permissions"][0] == "FAIL", out
        assert "HTTP 401 instead of 200 (check --permissions-url-token-file)" in out
        assert "s3cret" not in out


async def test_the_metrics_port_is_checked_when_set(tmp_path: Path, start_server: Any) -> None:
    """Free: ok. Held by another program: FAIL. Held by a running hubserver's metrics
    listener (check as a health check beside serve): ok, since it answers /healthz.
    An address not of this machine: FAIL with the reason."""
    args = ["--data-dir", str(tmp_path / "d")]
    free = closed_port()
    code, lines, out = await run_check([*args, "--metrics-port", str(free)])
    assert code == 0, out
    assert list(lines) == [*CHECKS, "metrics_port"], out
    assert lines["metrics_port"] == ("ok", f"http://127.0.0.1:{free}/metrics can be bound"), out
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        code, lines, out = await run_check([*args, "--metrics-port", str(taken)])
    assert code == 1, out
    assert lines["metrics_port"] == (
        "FAIL",
        f"127.0.0.1:{taken} is in use by another program: /metrics cannot listen there",
    ), out
    h = await start_server(metrics_port=0)
    ours = h.server.metrics_port
    code, lines, out = await run_check([*args, "--metrics-port", str(ours)])
    assert code == 0, out
    assert lines["metrics_port"] == (
        "ok",
        f"127.0.0.1:{ours} is in use by a running hubserver, which answers /healthz there",
    ), out
    elsewhere = ["--metrics-port", "0", "--metrics-host", "192.0.2.1"]  # TEST-NET-1
    code, lines, out = await run_check([*args, *elsewhere])
    assert code == 1, out
    assert lines["metrics_port"][0] == "FAIL", out
    assert lines["metrics_port"][1].startswith("cannot listen on 192.0.2.1:0 for /metrics: "), out
