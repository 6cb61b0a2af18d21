"""Interleaved timing of competing implementations on a noisy machine.

Each run calls one pass of a workload until ``seconds_per_run`` has elapsed and
gives seconds per operation. Rounds go A B A B ...: every contender of every
case runs once per round, so a burst of noise from a neighbour hits one round
of everybody rather than all rounds of one contender, and the median over
rounds drops it. The garbage collector is off while a run is timed, as in
``timeit``: a collection would land on whichever contender happened to cross
the threshold.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from bench.report import Progress

__all__ = ["Case", "Contender", "Samples", "loop_overhead", "run_interleaved", "seconds_per_op"]


@dataclass(frozen=True, slots=True)
class Contender:
    """One implementation's workload: ``run_pass()`` does ``ops_per_pass`` operations."""

    label: str
    run_pass: Callable[[], object]
    ops_per_pass: int


@dataclass(frozen=True, slots=True)
class Case:
    """One table row: the contenders that do the same work."""

    name: str
    contenders: tuple[Contender, ...]


@dataclass(frozen=True, slots=True)
class Samples:
    """Seconds per operation, one sample per round."""

    seconds_per_op: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds_per_op)

    @property
    def spread(self) -> float:
        """(max - min) / median: how much the rounds disagreed."""
        return (max(self.seconds_per_op) - min(self.seconds_per_op)) / self.median


def seconds_per_op(contender: Contender, min_seconds: float) -> float:
    """Time whole passes until ``min_seconds`` have elapsed (at least one pass)."""
    run_pass = contender.run_pass
    clock = time.perf_counter
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        passes = 0
        start = clock()
        while True:
            run_pass()
            passes += 1
            elapsed = clock() - start
            if elapsed >= min_seconds:
                break
    finally:
        if was_enabled:
            gc.enable()
    return elapsed / (passes * contender.ops_per_pass)


def loop_overhead(items: Sequence[object], min_seconds: float) -> float:
    """Seconds per iteration of an empty ``for`` loop over ``items``.

    Every workload iterates like this, so this much of each row is the loop.
    """

    def run_pass() -> None:
        for _item in items:
            pass

    return seconds_per_op(Contender("loop", run_pass, len(items)), min_seconds)


def run_interleaved(
    cases: Iterable[Case],
    *,
    rounds: int,
    seconds_per_run: float,
    progress: Progress,
    prefix: str,
) -> dict[tuple[str, str], Samples]:
    """Run every contender of every case once per round, in order, ``rounds`` times.

    Returns:
        Samples per ``(case name, contender label)``.
    """
    cases = list(cases)
    progress.update(f"{prefix}: warm-up", is_milestone=True)
    for case in cases:
        for contender in case.contenders:
            progress.update(f"{prefix}: warm-up: {case.name} ({contender.label})")
            contender.run_pass()
    collected: dict[tuple[str, str], list[float]] = {
        (case.name, contender.label): [] for case in cases for contender in case.contenders
    }
    for round_number in range(1, rounds + 1):
        progress.update(f"{prefix}: round {round_number}/{rounds}", is_milestone=True)
        for case in cases:
            for contender in case.contenders:
                progress.update(
                    f"{prefix}: round {round_number}/{rounds}: {case.name} ({contender.label})"
                )
                collected[case.name, contender.label].append(
                    seconds_per_op(contender, seconds_per_run)
                )
    return {key: Samples(tuple(values)) for key, values in collected.items()}
