"""``--plot FILE.png``: throughput and latency percentiles per server, one group per row.

matplotlib is imported here only, and only when a plot is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.server.fanout import RowResult

__all__ = ["plot_fanout"]


def plot_fanout(path: Path, rows: Sequence[RowResult]) -> None:
    """Two panels: deliveries/s per server and row; p50/p90/p99 latency per server and row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys: list[tuple[int, int, str, int]] = []
    servers: list[str] = []
    for row in rows:
        if row.row_key not in keys:
            keys.append(row.row_key)
        if row.server not in servers:
            servers.append(row.server)
    by = {(row.row_key, row.server): row for row in rows}

    def label(key: tuple[int, int, str, int]) -> str:
        connections, sites, mode, batch = key
        return (
            f"{connections} conns\n{sites} site(s)\n{mode if mode != 'batch' else f'batch {batch}'}"
        )

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 2.5 * len(keys) + 4), 9))
    width = 0.8 / max(1, len(servers))
    for index, server in enumerate(servers):
        xs = [k + (index - (len(servers) - 1) / 2) * width for k in range(len(keys))]
        rates = []
        for key in keys:
            found = by.get((key, server))
            rates.append((found.deliveries_per_second or 0) if found else 0)
        top.bar(xs, rates, width, label=server)
        for fraction, alpha, hatch in ((0.99, 0.35, "//"), (0.9, 0.6, ""), (0.5, 1.0, "")):
            values = []
            for key in keys:
                found = by.get((key, server))
                value = found.latency(fraction) if found else None
                values.append(value or 0)
            bottom.bar(
                xs,
                values,
                width,
                alpha=alpha,
                hatch=hatch,
                color=f"C{index}",
                label=f"{server} p{int(fraction * 100)}",
            )
    for axis in (top, bottom):
        axis.set_xticks(range(len(keys)))
        axis.set_xticklabels([label(key) for key in keys])
        axis.grid(axis="y", alpha=0.3)
    top.set_ylabel("deliveries/s")
    top.set_title("fan-out throughput")
    top.legend()
    bottom.set_ylabel("end-to-end latency, ms (log)")
    bottom.set_yscale("log")
    bottom.set_title("latency p50 (solid), p90, p99 (hatched)")
    bottom.legend(fontsize="small", ncol=max(1, len(servers)))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
