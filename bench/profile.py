"""The seam between ``python -m bench`` and a profile.

A profile module defines ``PROFILE = Profile(...)``: its options go on its own
subcommand, ``prepare`` turns the parsed options into a ``Run`` whose
``parameters`` are printed before ``execute`` measures anything.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from bench.report import JsonValue, Outcome, Progress

__all__ = ["BenchError", "Profile", "Run"]


class BenchError(Exception):
    """A profile cannot give a trustworthy result (a codec disagreed, a server failed...)."""


class Run(Protocol):
    """One configured run of a profile."""

    @property
    def parameters(self) -> Mapping[str, JsonValue]:
        """Every knob that changes the numbers, as printed and written to JSON."""
        ...

    def execute(self, progress: Progress) -> Outcome:
        """Measure; report what is running on ``progress``.

        Raises:
            BenchError: the measurement would be meaningless.
        """
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """A ``python -m bench`` subcommand.

    Attributes:
        name: the subcommand.
        summary: one line for ``--help``.
        add_arguments: adds the profile's own options to its subparser.
        prepare: builds a run from the parsed options; raises ValueError
            for options out of range (``python -m bench`` reports it, exit 2).
    """

    name: str
    summary: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    prepare: Callable[[argparse.Namespace], Run]
