"""The README's "Embedding hubcore" example runs as written (so the docs stay true)."""

from __future__ import annotations

import re
from pathlib import Path

import hubcore

README = Path(__file__).parents[2] / "README.md"


def _embedding_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Embedding hubcore\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section is not None, "README.md has no '## Embedding hubcore' section"
    blocks = re.findall(r"^```python\n(.*?)^```", section.group(1), re.M | re.S)
    assert len(blocks) == 1, "expected exactly one ```python block in 'Embedding hubcore'"
    return str(blocks[0])


def test_embedding_example_runs() -> None:
    code = _embedding_example()
    assert "hubcore.HubConnection" in code and "assert" in code
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(code, f"{README}:Embedding hubcore", "exec"), namespace)
    # The example leaves its connection open after the keep-alive ping.
    conn = namespace["conn"]
    assert isinstance(conn, hubcore.HubConnection)
    assert conn.state is hubcore.ConnectionState.OPEN
