"""Startup safety: a real key source without an audience is refused (RFC 8725 §3.9)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from hubserver.auth import DevKey
from hubserver.config import ConfigError, ServerConfig

from .helpers import http_request

REFUSAL = "--jwks-file/--jwks-url need --audience"


@pytest.fixture
def dev_key(shared_dev_key: DevKey) -> DevKey:
    return shared_dev_key


@pytest.fixture
def jwks_file(tmp_path: Path, dev_key: DevKey) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [dev_key.public_jwk()]}))
    return path


@pytest.mark.parametrize(
    "keys", [{"jwks_file": Path("jwks.json")}, {"jwks_url": "https://idp.example/jwks"}]
)
def test_config_with_a_key_source_needs_an_audience(keys: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=REFUSAL):
        ServerConfig(**keys)  # type: ignore[arg-type]
    ServerConfig(**keys, audience="event-streaming")  # type: ignore[arg-type]
    ServerConfig(**keys, allow_any_audience=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not both"):
        ServerConfig(**keys, audience="event-streaming", allow_any_audience=True)  # type: ignore[arg-type]


def test_development_mode_needs_no_audience() -> None:
    assert ServerConfig().is_dev_mode  # the dev key's own audience is always checked


async def _run_cli(args: list[str], tmp_path: Path) -> trio.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUBSERVER_")}
    env["HUBSERVER_LOG_FORMAT"] = "text"  # read as text lines (a pipe gets JSON by default)
    return await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "hubserver",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path),
            *args,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


async def test_cli_refuses_a_jwks_without_audience(tmp_path: Path, jwks_file: Path) -> None:
    process = await _run_cli(["--jwks-file", str(jwks_file)], tmp_path)
    assert process.stderr is not None
    with trio.fail_after(20):
        stderr = b""
        async for chunk in process.stderr:
            stderr += chunk
        await process.wait()
    text = stderr.decode()
    assert process.returncode == 2, text
    assert text.startswith(f"hubserver: error: {REFUSAL}"), text
    assert "--no-audience-check" in text
    assert "Traceback" not in text


async def test_cli_starts_with_no_audience_check(tmp_path: Path, jwks_file: Path) -> None:
    process = await _run_cli(["--jwks-file", str(jwks_file), "--no-audience-check"], tmp_path)
    assert process.stderr is not None
    log = ""
    try:
        with trio.fail_after(20):
            async for chunk in process.stderr:
                log += chunk.decode()
                if "listening on http://" in log and log.endswith("\n"):
                    break
            port = int(log.split("listening on http://", 1)[1].split()[0].rsplit(":", 1)[1])
            assert (await http_request(port, "GET", "/readyz")).status == 200
            process.send_signal(signal.SIGTERM)
            async for chunk in process.stderr:
                log += chunk.decode()
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0, log
