"""What of the hubserver distribution depends on the kind of build (the rest is pyproject.toml).

hubcore is also a distribution of its own (packages/hubcore), so that servers embedding
it install it without trio, h11 or the rest. For hubserver and hubcore never to own the
same files when both are installed, a hubserver wheel (``pip install .``) leaves hubcore
out and requires that distribution, by its path in this checkout: no package index has
it (a release to one would pin ``hubcore==<version>`` here instead).

An editable install (``pip install -e .``, what ./dev does) stays one distribution with
hubcore in it, live from the tree, as before: a path requirement would install a copy of
hubcore that shadows the tree. packages/build_backend.py says which kind of build this is.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import find_namespace_packages, setup

HERE = Path(__file__).resolve().parent

DEPENDENCIES = [
    "msgpack>=1.0.7,<2",
    # orjson parses inbound JSON about 3x faster than the stdlib; hubcore falls
    # back to the stdlib where orjson would be lossy (integers beyond 64 bits).
    "orjson>=3.9,<4",
    "trio>=0.25,<1",
    "h11>=0.14,<1",
    "pyjwt[crypto]>=2.8,<3",
    "cryptography>=42",
    "hiredis>=2.3,<4",
    # Prometheus' own client: its text exposition and its multiprocess mode
    # (one scrape for every worker of --workers) rather than a hand-written format.
    "prometheus-client>=0.20,<1",
]

if os.environ.get("HUBSERVER_EDITABLE_BUILD") == "1":
    packages = find_namespace_packages(include=["hubcore*", "hubserver*", "bench*"])
    requires = DEPENDENCIES
else:
    packages = find_namespace_packages(include=["hubserver*", "bench*"])
    hubcore = (HERE / "packages" / "hubcore").as_uri()
    requires = [f"hubcore @ {hubcore}", *DEPENDENCIES]

setup(packages=packages, install_requires=requires)
