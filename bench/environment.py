"""The machine and the software versions a result was measured with."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Final

from bench.report import JsonValue

__all__ = ["describe_environment"]

#: Label and distribution of the packages whose versions decide the numbers;
#: hubcore ships inside the hubserver distribution.
DISTRIBUTIONS: Final = (
    ("hubcore/hubserver", "hubserver"),
    ("msgpack", "msgpack"),
    ("orjson", "orjson"),
    ("aiosignalr", "aiosignalr"),
)


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _msgpack_build() -> str:
    # The pure-Python fallback is ~10x slower: say which one ran.
    try:
        import msgpack
    except ImportError:
        return "not installed"
    module = getattr(msgpack.Packer, "__module__", "")
    return "C extension" if module.endswith("_cmsgpack") else "pure Python fallback"


def _usable_cores() -> int | None:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else None


def _load_average() -> list[JsonValue] | None:
    try:
        return [round(load, 2) for load in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def describe_environment() -> dict[str, JsonValue]:
    """The machine (cores, load, Python, OS) and the versions of the packages measured."""
    versions: dict[str, JsonValue] = {label: _version(dist) for label, dist in DISTRIBUTIONS}
    return {
        "cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "load_average": _load_average(),
        "python": f"{platform.python_implementation()} {' '.join(sys.version.split())}",
        "platform": platform.platform(),
        "machine": platform.machine(),
        "executable": sys.executable,
        "versions": versions,
        "msgpack_build": _msgpack_build(),
    }
