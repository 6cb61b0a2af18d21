"""What a profile hands back, and how it is shown: header, table, notes, JSON.

Every profile prints the same way: its parameters and the machine first (so a
pasted result always says where it came from), then the workload, the table,
the notes and the bar. ``--json FILE`` writes the same content as one object.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO, TypeAlias

__all__ = [
    "JsonValue",
    "Outcome",
    "Progress",
    "Table",
    "percentile",
    "render_environment",
    "render_header",
    "render_outcome",
    "write_json",
]

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"


@dataclass(frozen=True, slots=True)
class Table:
    """A plain-text table; columns listed in ``right_aligned`` hold numbers."""

    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    right_aligned: frozenset[int] = frozenset()

    def render(self) -> str:
        widths = [len(name) for name in self.columns]
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"row has {len(row)} cells, the table {len(self.columns)}")
            widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]

        def line(cells: Sequence[str]) -> str:
            out = [
                cell.rjust(width) if index in self.right_aligned else cell.ljust(width)
                for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
            ]
            return "  ".join(out).rstrip()

        rule = "  ".join("-" * width for width in widths)
        return "\n".join([line(self.columns), rule, *(line(row) for row in self.rows)])


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What a profile measured.

    Attributes:
        workload: facts about what was measured that only exist once it is built
            (message sizes, ...), printed before the table.
        table: the human-readable result.
        results: one JSON object per table row, with every sample.
        notes: how to read the numbers (what a timed loop includes, ...).
        bar: the target the numbers are judged against, if any.
        passed: whether every judged row met the bar; None when there is no bar.
        checks: one row per judged part of the bar (value, target, verdict),
            printed after the notes; None when the bar is judged in ``table``.
    """

    workload: Mapping[str, JsonValue]
    table: Table
    results: Sequence[Mapping[str, JsonValue]]
    notes: Sequence[str] = ()
    bar: str | None = None
    passed: bool | None = None
    checks: Table | None = None


def _render_value(value: JsonValue) -> str:
    if isinstance(value, list):
        return ", ".join(_render_value(item) for item in value)
    if isinstance(value, dict):
        return ", ".join(f"{key} {_render_value(item)}" for key, item in value.items())
    if value is None:
        return "-"
    return str(value)


def _render_mapping(title: str, mapping: Mapping[str, JsonValue]) -> list[str]:
    width = max((len(key) for key in mapping), default=0)
    lines = [f"  {key.ljust(width)}  {_render_value(value)}" for key, value in mapping.items()]
    return [f"{title}:", *lines]


def render_environment(environment: Mapping[str, JsonValue]) -> list[str]:
    """The machine section: a few merged lines rather than one per key."""
    lines = dict(environment)
    cores = lines.pop("cores", None)
    usable = lines.pop("usable_cores", None)
    load = lines.pop("load_average", None)
    summary = f"{cores}"
    if usable is not None and usable != cores:
        summary += f" ({usable} usable)"
    if load is not None:
        summary += f", load average {_render_value(load)}"
    versions = lines.pop("versions", None)
    ordered: dict[str, JsonValue] = {"cores": summary, **lines}
    if versions is not None:
        ordered["versions"] = versions
    return _render_mapping("machine", ordered)


def render_header(
    profile: str, parameters: Mapping[str, JsonValue], environment: Mapping[str, JsonValue]
) -> str:
    """The lines printed before a profile runs."""
    lines = [f"profile: {profile}", *_render_mapping("parameters", parameters)]
    lines += render_environment(environment)
    return "\n".join(lines)


def render_outcome(outcome: Outcome) -> str:
    """Workload, table, notes and the bar, as printed after a profile ran."""
    lines = _render_mapping("workload", outcome.workload) if outcome.workload else []
    lines.append("")
    if outcome.bar is not None:
        lines.append(f"bar: {outcome.bar}")
    lines += [outcome.table.render(), ""]
    lines += [f"note: {note}" for note in outcome.notes]
    if outcome.checks is not None:
        lines += ["", "bar checks:", outcome.checks.render(), ""]
    if outcome.passed is not None:
        lines.append(f"verdict: {'PASS' if outcome.passed else 'FAIL'}")
    return "\n".join(lines).rstrip("\n")


def to_json(
    *,
    profile: str,
    started_at: str,
    parameters: Mapping[str, JsonValue],
    environment: Mapping[str, JsonValue],
    outcome: Outcome,
) -> dict[str, JsonValue]:
    """Everything printed, as one JSON object (``checks`` only when the outcome has them)."""
    document: dict[str, JsonValue] = {
        "profile": profile,
        "started_at": started_at,
        "parameters": dict(parameters),
        "environment": dict(environment),
        "workload": dict(outcome.workload),
        "bar": outcome.bar,
        "passed": outcome.passed,
        "results": [dict(result) for result in outcome.results],
        "notes": list(outcome.notes),
    }
    if outcome.checks is not None:
        columns = outcome.checks.columns
        document["checks"] = [dict(zip(columns, row, strict=True)) for row in outcome.checks.rows]
    return document


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of already sorted values; None when there are none."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def write_json(path: Path, document: Mapping[str, JsonValue]) -> None:
    """Write ``document`` to ``path`` (UTF-8, indented, newline-terminated)."""
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@dataclass(slots=True)
class Progress:
    """One status line on a stream (stderr), rewritten in place on a terminal.

    Off a terminal only milestones are written, each on its own line, so a log
    shows what ran without one line per step. ``Progress(None)`` is silent.
    """

    stream: TextIO | None = field(default_factory=lambda: sys.stderr)
    _is_tty: bool = field(init=False, default=False)
    _shown: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        isatty = getattr(self.stream, "isatty", None)
        self._is_tty = bool(isatty is not None and isatty())

    def update(self, text: str, *, is_milestone: bool = False) -> None:
        """Show ``text`` as what is running now."""
        if self.stream is None:
            return
        if self._is_tty:
            self.stream.write("\r\x1b[K" + text)
        elif is_milestone:
            self.stream.write(text + "\n")
        else:
            return
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Remove the status line (on a terminal) before results are printed."""
        if self.stream is not None and self._is_tty and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self._shown = False
