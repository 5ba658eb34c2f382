"""results.png's Plotter: drawn off the caller's thread, every update drawn by close(), failures logged."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from harness import plots
from harness.logs import MetricsWriter


def _row(epoch: int) -> dict[str, float | int | str]:
    return {"epoch": epoch, "step": 10 * epoch, "train_loss": 1.0 / epoch, "val_loss": 1.2 / epoch,
            "val_accuracy": 0.5 + 0.1 * epoch, "val_samples": 64, "lr": 0.1, "epoch_time": 1.0, "samples_per_s": 64.0}


def test_close_waits_for_the_newest_row_and_draws_off_the_callers_thread(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[tuple[str, int]] = []
    real = plots.plot_results

    def recording(csv: Path, out: Path) -> Path | None:
        drawn.append((threading.current_thread().name, len(csv.read_text().splitlines()) - 1))
        return real(csv, out)

    monkeypatch.setattr(plots, "plot_results", recording)
    metrics = MetricsWriter(tmp_path / "metrics.csv")
    plotter = plots.Plotter(metrics.path, tmp_path / "results.png")
    for epoch in (1, 2, 3):
        metrics.write(_row(epoch))
        plotter.update()
    plotter.close()
    assert drawn and all(name == "harness-plotter" for name, _ in drawn)
    assert drawn[-1][1] == 3  # the last drawing has every row
    assert len(drawn) <= 3  # updates during a drawing coalesce
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left beside it
    plotter.close()  # idempotent
    plotter.update()  # after close: ignored, no thread left behind
    assert not [t for t in threading.enumerate() if t.name == "harness-plotter"]


def test_a_failing_drawing_is_logged_once_and_given_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def broken(csv: Path, out: Path) -> Path | None:
        calls.append(1)
        raise ValueError("no fonts")

    monkeypatch.setattr(plots, "plot_results", broken)
    plotter = plots.Plotter(tmp_path / "metrics.csv", tmp_path / "results.png")
    with caplog.at_level(logging.WARNING, logger="harness"):
        plotter.update()
        plotter.close()
    assert calls == [1] and isinstance(plotter.failed, ValueError)
    assert "results.png not drawn: ValueError: no fonts" in caplog.text


def test_close_without_updates_starts_nothing(tmp_path: Path) -> None:
    plotter = plots.Plotter(tmp_path / "metrics.csv", tmp_path / "results.png")
    plotter.close()
    assert not (tmp_path / "results.png").exists()


def test_during_training_a_drawing_starts_at_most_every_every_s(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[int] = []
    monkeypatch.setattr(plots, "plot_results", lambda csv, out: drawn.append(len(drawn)))
    eager = plots.Plotter(tmp_path / "metrics.csv", tmp_path / "a.png", every_s=0.0)
    eager.update()
    deadline = time.monotonic() + 30
    while not drawn and time.monotonic() < deadline:  # drawn without waiting for close()
        time.sleep(0.01)
    assert drawn == [0]
    eager.close()
    drawn.clear()
    lazy = plots.Plotter(tmp_path / "metrics.csv", tmp_path / "b.png", every_s=3600.0)
    for _ in range(5):
        lazy.update()
    time.sleep(0.2)
    assert drawn == []  # too soon: only close() draws, once, with every row
    lazy.close()
    assert drawn == [0]
