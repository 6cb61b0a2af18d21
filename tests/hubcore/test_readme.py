"""The README's "Embedding hubcore" section stays true: its example runs as written, and its
install command names the hubcore distribution (tests/hubcore/test_install.py installs it)."""

from __future__ import annotations

import re
from pathlib import Path

import hubcore

README = Path(__file__).parents[2] / "README.md"


def _section() -> str:
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Embedding hubcore\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section is not None, "README.md has no '## Embedding hubcore' section"
    return section.group(1)


def _embedding_example() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", _section(), re.M | re.S)
    assert len(blocks) == 1, "expected exactly one ```python block in 'Embedding hubcore'"
    return str(blocks[0])


def test_embedding_example_runs() -> None:
    code = _embedding_example()
    assert "hubcore.HubConnection" in code and "assert" in code
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(code, f"{README}:Embedding hubcore", "exec"), namespace)
    # The example leaves its first connection open after the broadcast.
    conn = namespace["conn"]
    assert isinstance(conn, hubcore.HubConnection)
    assert conn.state is hubcore.ConnectionState.OPEN


def test_the_first_install_command_installs_hubcore_alone() -> None:
    commands = re.findall(r"^pip install (\S+)$", _section(), re.M)
    assert commands, "no 'pip install' line in 'Embedding hubcore'"
    project = README.parent / commands[0]
    assert re.search(r'^name = "hubcore"$', (project / "pyproject.toml").read_text(), re.M)
