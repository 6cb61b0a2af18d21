"""Shared test setup: hypothesis profiles and the spec's wire vectors.

Profiles: ``ci`` (60 examples, derandomized, no deadline) and ``dev`` (200
examples); ``HYPOTHESIS_PROFILE`` picks one, ``dev`` by default.

The vectors live in ``shared/protocol/vectors.json`` beside the repository
(locally and in CI alike). A test that takes a ``vectors`` fixture, or one of
the parameters ``vector`` / ``varint_example``, is skipped with a clear reason
when the file is missing. ``@pytest.mark.vector_filter(predicate)`` keeps only
the vectors (or VarInt examples) a test is about.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    # One bug is enough to fail CI; shrinking every distinct failure found can
    # take minutes when a change breaks the codec (seconds with this off).
    report_multiple_bugs=False,
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

VECTORS_PATH = (Path(__file__).parents[1] / ".." / "shared" / "protocol" / "vectors.json").resolve()
_MISSING = f"SignalR wire vectors not found at {VECTORS_PATH} (expected shared/ beside the repo)"


def _load_vectors() -> dict[str, Any] | None:
    if not VECTORS_PATH.is_file():
        return None
    with VECTORS_PATH.open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


@pytest.fixture(scope="session")
def vectors() -> dict[str, Any]:
    """The whole parsed vectors.json; skips the test when the file is missing."""
    data = _load_vectors()
    if data is None:
        pytest.skip(_MISSING)
    return data


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vector_filter(predicate): parametrize only the vectors the predicate keeps"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``vector`` (one per entry of "vectors") and ``varint_example``."""
    marker = metafunc.definition.get_closest_marker("vector_filter")
    keep = marker.args[0] if marker is not None else (lambda _: True)
    for name, key, ident in (
        ("vector", "vectors", lambda v: v["name"]),
        ("varint_example", "varint_examples", lambda v: str(v["value"])),
    ):
        if name not in metafunc.fixturenames:
            continue
        data = _load_vectors()
        if data is None:
            skipped = pytest.param(None, marks=pytest.mark.skip(reason=_MISSING))
            metafunc.parametrize(name, [skipped])
        else:
            items = [v for v in data[key] if keep(v)]
            metafunc.parametrize(name, items, ids=[ident(v) for v in items])
