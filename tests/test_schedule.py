"""Learning-rate schedule (pure) and the metrics file."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.logs import MetricsWriter
from harness.schedule import lr_factor


def test_warmup_then_cosine() -> None:
    f = [lr_factor(s, total=110, warmup=10, min_ratio=0.1) for s in range(110)]
    assert f[:3] == pytest.approx([0.1, 0.2, 0.3]) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert lr_factor(110, total=110, warmup=10, min_ratio=0.1) == pytest.approx(0.1)


def test_constant() -> None:
    assert [lr_factor(s, total=10, warmup=2, kind="constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_metrics_truncate(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path / "m.csv")
    for e in (1, 2, 3):
        w.write({"epoch": e, "loss": 1.0 / e})
    again = MetricsWriter(tmp_path / "m.csv")  # a resumed run reopens it
    again.truncate(after_epoch=1)
    again.write({"epoch": 2, "loss": 0.4})
    assert (tmp_path / "m.csv").read_text().split() == ["epoch,loss", "1,1.0", "2,0.4"]
