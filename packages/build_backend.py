"""The hubserver distribution's build backend: setuptools, told whether the build is editable.

setup.py needs to know: a wheel of hubserver leaves hubcore out and requires the hubcore
distribution (packages/hubcore), while an editable install keeps hubcore in hubserver,
live from the tree. setuptools prepares the metadata of both kinds of build with the same
command, so only the PEP 660 hooks below can tell them apart.
"""

from __future__ import annotations

import os
import shutil

from setuptools import build_meta
from setuptools.build_meta import (
    build_sdist,
    get_requires_for_build_sdist,
    get_requires_for_build_wheel,
    prepare_metadata_for_build_wheel,
)

__all__ = [
    "build_editable",
    "build_sdist",
    "build_wheel",
    "get_requires_for_build_editable",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
    "prepare_metadata_for_build_editable",
    "prepare_metadata_for_build_wheel",
]

#: Read by setup.py. Each hook runs in a fresh backend process, so setting it there is enough.
EDITABLE_VARIABLE = "HUBSERVER_EDITABLE_BUILD"


def build_wheel(
    wheel_directory: str,
    config_settings: dict[str, object] | None = None,
    metadata_directory: str | None = None,
) -> str:
    # setuptools copies all of build/lib into the wheel and never empties it, so the
    # modules of an earlier build with other packages (hubcore, which this wheel must
    # not hold) would slip in.
    shutil.rmtree(os.path.join("build", "lib"), ignore_errors=True)
    name: str = build_meta.build_wheel(wheel_directory, config_settings, metadata_directory)
    return name


def _editable() -> None:
    os.environ[EDITABLE_VARIABLE] = "1"


def get_requires_for_build_editable(config_settings: dict[str, object] | None = None) -> list[str]:
    _editable()
    requires: list[str] = build_meta.get_requires_for_build_editable(config_settings)
    return requires


def prepare_metadata_for_build_editable(
    metadata_directory: str, config_settings: dict[str, object] | None = None
) -> str:
    _editable()
    name: str = build_meta.prepare_metadata_for_build_editable(metadata_directory, config_settings)
    return name


def build_editable(
    wheel_directory: str,
    config_settings: dict[str, object] | None = None,
    metadata_directory: str | None = None,
) -> str:
    _editable()
    name: str = build_meta.build_editable(wheel_directory, config_settings, metadata_directory)
    return name
