"""Summarise a py-spy raw (collapsed-stack) profile: where the server's time goes.

    python -m bench.server.pyspy_summary PROFILE.txt [--top 25]

Prints the functions with the most samples on top of the stack (self) and
anywhere in it (inclusive), as a share of all samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

__all__ = ["summarise"]

_LINE = re.compile(r" \(([^)]*?):\d+\)$")


def _function(frame: str) -> str:
    # "name (path/to/file.py:123)" -> "name (path/to/file.py)": merge a function's lines.
    return _LINE.sub(lambda m: f" ({m.group(1)})", frame.strip())


def summarise(text: str, top: int = 25) -> str:
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples"]
    for title, counter in (("self", self_counts), ("inclusive", inclusive)):
        lines.append(f"\ntop {top} by {title} samples:")
        for frame, count in counter.most_common(top):
            lines.append(f"  {100 * count / total:5.1f}%  {frame}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summarise(args.profile.read_text(encoding="utf-8"), args.top))


if __name__ == "__main__":
    main()
