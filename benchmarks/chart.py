"""The comparison as a picture (`benchmarks/results.png`): ops/s and round trips per call.

matplotlib is a benchmark-only dependency; without it no chart is drawn and the report says so.
"""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.comparison import Comparison
from benchmarks.peers import HOT_CALLS

COLOURS = {
    "todo_store": "#1f6feb",
    "todo_store atomic=False": "#74a7f7",
    "todo_store on AsyncConnection, atomic=False": "#b6d3fb",
    "tutorial ORM": "#d29922",
    "advanced-alchemy": "#a371f7",
    "SQLAlchemy Core": "#3fb950",
    "raw asyncpg": "#6e7781",
    "raw asyncpg, no transaction": "#c1c7cd",
}


def draw(
    comparison: Comparison, round_trips: dict[str, dict[str, int]], output: Path
) -> str | None:
    """Write the chart; returns why not when it cannot (matplotlib missing), else None.

    `round_trips` is implementation label -> call -> round trips per unit of work.
    """
    try:
        import matplotlib  # noqa: PLC0415 (optional, benchmark-only)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "matplotlib is not installed (`pip install matplotlib`)"

    panels = 2 if round_trips else 1
    figure, axes = plt.subplots(
        1, panels, figsize=(15 if panels == 2 else 10, 5.2), width_ratios=[3, 2][:panels]
    )
    ops_axis = axes[0] if panels == 2 else axes
    labels = comparison.labels
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [n + (i - (len(labels) - 1) / 2) * width for n in range(len(HOT_CALLS))]
        spreads = [comparison.ops(label, call) for call in HOT_CALLS]
        medians = [s.median for s in spreads]
        errors = [
            [s.median - s.low for s in spreads],
            [s.high - s.median for s in spreads],
        ]
        ops_axis.bar(
            xs, medians, width, yerr=errors, capsize=2, label=label, color=COLOURS.get(label)
        )
    ops_axis.set_xticks(range(len(HOT_CALLS)), HOT_CALLS)
    ops_axis.set_ylabel("operations / s (median, bars: min-max of rounds)")
    plan = comparison.plan
    ops_axis.set_title(
        f"Throughput, each operation its own unit of work ({plan.workers} workers, "
        f"pool of {plan.workers}, direct, {plan.rounds} rounds)",
        fontsize=10,
    )
    ops_axis.legend(fontsize=8)
    ops_axis.grid(axis="y", alpha=0.3)

    if panels == 2:
        trips_axis = axes[1]
        shown = list(round_trips)
        width = 0.8 / len(shown)
        for i, label in enumerate(shown):
            xs = [n + (i - (len(shown) - 1) / 2) * width for n in range(len(HOT_CALLS))]
            # NaN draws no bar: that call was not measured for this implementation.
            counts = [round_trips[label].get(call, math.nan) for call in HOT_CALLS]
            trips_axis.bar(xs, counts, width, label=label, color=COLOURS.get(label))
        trips_axis.set_xticks(range(len(HOT_CALLS)), HOT_CALLS)
        trips_axis.set_ylabel("round trips per unit of work (counted by a proxy)")
        trips_axis.set_title("Round trips per call (fewer is better on Neon)", fontsize=10)
        trips_axis.legend(fontsize=8)
        trips_axis.grid(axis="y", alpha=0.3)

    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return None
