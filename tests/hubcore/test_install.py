"""hubcore installs alone, type-checks for an embedder, and hubserver's wheel leaves it out.

Issue #13. What it takes to stay in seconds (PyPI is reachable, but a test that
downloads is slow and flaky): the wheels are built by pip from a copy of the
sources (so nothing is written into the checkout), with build isolation, whose
setuptools comes from pip's cache after the first run. hubcore's wheel goes into
a venv made without pip, with ``--no-deps --no-index``. Its two dependencies are
checked in the wheel's metadata and then lent from this interpreter rather than
downloaded again: a ``.pth`` file names a directory holding links to the msgpack
and orjson packages only. So the venv holds hubcore and exactly what it declares,
and nothing of trio, h11, pyjwt, cryptography or hiredis can leak in.
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import msgpack
import orjson
import pytest

ROOT = Path(__file__).parents[2]
SERVER_ONLY = ("trio", "h11", "jwt", "cryptography", "hiredis")
# The children see only what they install: no search path of ours, no MYPYPATH trick.
CLEAN_ENV = {
    name: value
    for name, value in os.environ.items()
    if name not in ("PYTHONPATH", "PYTHONHOME", "MYPYPATH")
}

EMBEDDER = '''
from __future__ import annotations

import hubcore


def accept(data: str, now: float) -> tuple[hubcore.HubConnection, bytes]:
    conn = hubcore.HubConnection(hubcore.Role.SERVER, now=now)
    conn.receive_data(data, now)
    out = b""
    try:
        while (event := conn.next_event()) is not None:
            match event:
                case hubcore.HandshakeRequest():
                    out += conn.send(hubcore.HandshakeResponse(), now)
                case hubcore.Invocation(invocation_id=str(invocation_id), arguments=args):
                    out += conn.send(hubcore.Completion.with_result(invocation_id, args[0]), now)
                case _:
                    pass
    except hubcore.RemoteProtocolError as exc:
        out += conn.send(exc.reply, now)
    binary: bool = conn.transfer_format is hubcore.TransferFormat.BINARY
    groups: dict[hubcore.HubProtocol, list[hubcore.HubConnection]] = {}
    if conn.is_open and conn.protocol is not None and not binary:
        groups.setdefault(conn.protocol, []).append(conn)
    return conn, out
'''
# Proves the check sees hubcore's types: a wrong argument must be reported.
MISTAKE = """
import hubcore

hubcore.HubConnection(hubcore.Role.SERVER, now="0")
"""


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        env=CLEAN_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _wheel(project: Path, out: Path) -> Path:
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
         "--no-deps", "--wheel-dir", out, project)  # fmt: skip
    [wheel] = out.glob("*.whl")
    return wheel


def _requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(archive.read(name))
    return [str(value) for value in metadata.get_all("Requires-Dist") or []]


def _top_level(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name.split("/")[0] for name in archive.namelist()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of what the two distributions are built from."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    for name in ("hubcore", "hubserver", "bench", "packages"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    return src


@pytest.fixture(scope="module")
def hubcore_wheel(sources: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _wheel(sources / "packages" / "hubcore", tmp_path_factory.mktemp("hubcore-wheel"))


@pytest.fixture(scope="module")
def venv(hubcore_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with hubcore installed from its wheel, msgpack and orjson lent."""
    base = tmp_path_factory.mktemp("embedder")
    env = base / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", env)
    python = env / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q",
         "--disable-pip-version-check", "--no-deps", "--no-index", hubcore_wheel)  # fmt: skip
    lent = base / "lent"
    lent.mkdir()
    for module in (msgpack, orjson):
        assert module.__file__ is not None
        (lent / module.__name__).symlink_to(Path(module.__file__).parent)
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    (Path(site.strip()) / "lent.pth").write_text(f"{lent}\n")
    yield python


def test_the_hubcore_wheel_holds_hubcore_and_needs_msgpack_and_orjson_only(
    hubcore_wheel: Path,
) -> None:
    assert _top_level(hubcore_wheel) == {"hubcore", "hubcore-0.1.0.dist-info"}
    assert sorted(_requires(hubcore_wheel)) == ["msgpack<2,>=1.0.7", "orjson<4,>=3.9"]
    with zipfile.ZipFile(hubcore_wheel) as archive:
        assert "hubcore/py.typed" in archive.namelist()


def test_hubcore_works_alone_in_a_fresh_venv(venv: Path) -> None:
    probe = f"""
import importlib.metadata, importlib.util, json
import hubcore
conn = hubcore.HubConnection(hubcore.Role.SERVER, now=0.0)
conn.receive_data('{{"protocol":"messagepack","version":1}}\\x1e', 0.0)
conn.next_event()
conn.send(hubcore.HandshakeResponse(), 0.0)
record = conn.send(hubcore.Invocation(target="a", arguments=["x"]), 0.0)
print(json.dumps({{
    "file": hubcore.__file__,
    "record": record.hex(),
    "present": [m for m in {list(SERVER_ONLY)!r} if importlib.util.find_spec(m) is not None],
    "distributions": sorted(d.metadata["Name"] for d in importlib.metadata.distributions()),
}}))
"""
    # Run away from the checkout: its directory on sys.path would show hubserver.egg-info.
    seen = json.loads(_run(venv, "-c", probe, cwd=venv.parents[1]))
    assert seen["present"] == []
    assert seen["distributions"] == ["hubcore"]
    assert Path(seen["file"]).is_relative_to(venv.parents[1])  # the installed copy
    assert bytes.fromhex(seen["record"]) == bytes.fromhex("0a960180c0a16191a17890")


def test_an_embedders_strict_mypy_sees_hubcores_types(venv: Path, tmp_path: Path) -> None:
    # The embedder's own configuration, not this project's (which ignores msgpack).
    (tmp_path / "mypy.ini").write_text("[mypy]\n")
    (tmp_path / "server.py").write_text(EMBEDDER)
    (tmp_path / "mistake.py").write_text(MISTAKE)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", "mypy.ini",
         "--cache-dir", str(tmp_path / "cache"), "--python-executable", str(venv),
         "server.py", "mistake.py"],
        cwd=tmp_path, env=CLEAN_ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, done.stdout + done.stderr
    assert errors[0].startswith("mistake.py:4:") and "[arg-type]" in errors[0], errors


def test_the_hubserver_wheel_leaves_hubcore_to_its_distribution(
    sources: Path, tmp_path: Path
) -> None:
    wheel = _wheel(sources, tmp_path)
    assert "hubcore" not in _top_level(wheel)
    assert {"hubserver", "bench"} <= _top_level(wheel)
    requires = _requires(wheel)
    assert f"hubcore @ {(sources / 'packages' / 'hubcore').as_uri()}" in requires
    assert {"trio<1,>=0.25", "hiredis<4,>=2.3"} <= set(requires)


def test_this_editable_install_keeps_hubcore_live_from_the_tree() -> None:
    # ./dev installs the project editable: one distribution, hubcore from the tree.
    import hubcore

    assert Path(hubcore.__file__).parent == ROOT / "hubcore"
    purelib = Path(sysconfig.get_paths()["purelib"])
    assert not (purelib / "hubcore").exists()
