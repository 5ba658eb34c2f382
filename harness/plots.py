"""results.png: loss and metric curves from metrics.csv, in the spirit of YOLOv5's results plot.

`Plotter` redraws it in a thread of its own as epochs end (at most every 30 s), so that neither
matplotlib's import (0.5-0.7 s on a 2-core machine) nor a drawing (0.15 s) stands between two
epochs; `close()` draws what is pending and waits for it, so the file shows every finished epoch
once the run ends. The thread is the process's own (never a detached process, which Slurm or
the elastic agent could kill mid-write), and every drawing replaces the file atomically.
"""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

from harness import atomic
from harness.logs import get_logger


def plot_results(metrics_csv: Path, out: Path) -> Path | None:
    """One panel per numeric column of interest against the epoch; returns the file, or None if no rows."""
    # a Figure with the Agg canvas, not pyplot: no global state (this runs in the Plotter's thread),
    # never a window
    from matplotlib.figure import Figure

    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    keys = [k for k in rows[0] if k.startswith(("train_", "val_")) and k != "val_samples"] + ["lr"]
    epochs = [int(r["epoch"]) for r in rows]
    fig = Figure(figsize=(3.2 * len(keys), 3.0))
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.17, top=0.9, wspace=0.3)  # tight_layout: 2x the time
    for ax, key in zip(fig.subplots(1, len(keys)), keys, strict=True):
        ax.plot(epochs, [float(r[key]) for r in rows], marker=".", linewidth=2, markersize=6)
        ax.set_title(key)
        ax.set_xlabel("epoch")
    with atomic.open_atomic(out, "wb") as f:  # a run killed while drawing leaves the previous plot, not half of one
        fig.savefig(f, dpi=120, format="png")
    return out


class Plotter:
    """results.png from `metrics_csv`, redrawn in one background thread after `update()`s.

    A drawing during training starts at most every `every_s` seconds (matplotlib's import and a
    drawing cost 0.7 s of CPU the training shares; a short run draws once, at close); updates that
    arrive in between, or during a drawing, coalesce. A drawing that fails is logged once and the
    run goes on (a plot is never worth a training run)."""

    def __init__(self, metrics_csv: Path, out: Path, every_s: float = 30.0) -> None:
        self.metrics_csv, self.out, self.every_s = metrics_csv, out, every_s
        self._cond = threading.Condition()
        self._requested = self._drawn = 0  # updates asked for; the newest one drawn (or given up)
        self._last = time.monotonic()  # when the last drawing started (the first waits as long from here)
        self._closing = False
        self._thread: threading.Thread | None = None
        self.failed: BaseException | None = None

    def update(self) -> None:
        """metrics.csv has a new row: draw it (off this thread). Once per epoch, never per step."""
        with self._cond:
            if self._closing:
                return
            self._requested += 1
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="harness-plotter")
                self._thread.start()

    def close(self) -> None:
        """Draw what is pending now, and wait until it is drawn (or failed); idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    pending = self._requested > self._drawn
                    wait = self.every_s - (time.monotonic() - self._last)
                    if pending and (self._closing or wait <= 0):
                        break
                    if self._closing:
                        return  # nothing left to draw
                    self._cond.wait(timeout=wait if pending else None)
                newest, self._last = self._requested, time.monotonic()
            if self.failed is None:
                try:
                    plot_results(self.metrics_csv, self.out)
                except Exception as exc:  # noqa: BLE001 (reported, and the plot given up)
                    self.failed = exc
                    get_logger().warning(f"results.png not drawn: {type(exc).__name__}: {exc}")
            with self._cond:
                self._drawn = newest
