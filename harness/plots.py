"""results.png: loss and metric curves from metrics.csv, in the spirit of YOLOv5's results plot."""

from __future__ import annotations

import csv
from pathlib import Path

from harness import atomic


def plot_results(metrics_csv: Path, out: Path) -> Path | None:
    """One panel per numeric column of interest against the epoch; returns the file, or None if no rows."""
    import matplotlib

    matplotlib.use("Agg")  # no display; never opens a window
    import matplotlib.pyplot as plt

    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    keys = [k for k in rows[0] if k.startswith(("train_", "val_")) and k != "val_samples"] + ["lr"]
    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), tight_layout=True)
    for ax, key in zip(axes, keys, strict=True):
        ax.plot(epochs, [float(r[key]) for r in rows], marker=".", linewidth=2, markersize=6)
        ax.set_title(key)
        ax.set_xlabel("epoch")
    with atomic.open_atomic(out, "wb") as f:  # a run killed while drawing leaves the previous plot, not half of one
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)
    return out
