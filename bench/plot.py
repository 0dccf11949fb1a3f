"""The PNG of deliveries/s over time for the alertd runs (matplotlib, Agg backend).

Imports matplotlib lazily: it is a bench-only dependency, absent from the
daemon's and the tests' environments.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import report


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Write the plot to `path`; returns None when there is nothing to draw."""
    runs = [r for r in results.get("alertd", []) if r.get("series")]
    mock = results.get("alertd_mock") or {}
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on a server, and no GUI toolkit needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for r in runs:
        xs = [t for t, _ in r["series"]]
        ys = [v / 1000 for _, v in r["series"]]
        ax.plot(xs, ys, label=f"{report.run_name(r)} ({r['deliveries_per_s'] / 1000:.0f}k/s)")
    if mock.get("series"):
        xs = [t for t, _ in mock["series"]]
        ys = [v / 1000 for _, v in mock["series"]]
        ax.plot(xs, ys, label=f"alertd, {mock['workers']} workers → mock webhook"
                              f" ({mock['deliveries_per_s'] / 1000:.0f}k/s)")
    wrk = results.get("wrk", {}).get("requests_per_s")
    if wrk:
        ax.axhline(wrk / 1000, color="grey", linestyle="--", label=f"wrk ceiling ({wrk / 1000:.0f}k/s)")
        ax.axhline(wrk / 2000, color="grey", linestyle=":", label="0.5 × wrk (target)")
    base = results.get("baseline", {}).get("deliveries_per_s")
    if base:
        ax.axhline(base / 1000, color="tab:red", linestyle="-.",
                   label=f"naive aiohttp baseline ({base / 1000:.0f}k/s)")
    ax.set_xlabel("seconds since the file was renamed into the inbox")
    ax.set_ylabel("deliveries/s (thousands)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"alertd deliveries/s over time — {results.get('started_at', '')}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
