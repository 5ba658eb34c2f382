"""Rank-aware logging and the metrics file.

Owns the one logger (`harness`) and who writes where: rank 0 writes to the console and to
`<run>/train.log`; every rank writes its own `<run>/logs/rank<r>.log`; other ranks send only
warnings and errors to the console, prefixed with their rank. Also `MetricsWriter`, the per-epoch
`metrics.csv` that only rank 0 writes. (Named logs.py so that `import logging` always means the
standard library.)
"""

from __future__ import annotations

import csv
import logging
import sys
import threading
from pathlib import Path

from harness import atomic

LOGGER = "harness"
FORMAT = "%(asctime)s %(levelname)s %(message)s"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER)


def setup_console(rank: int = 0) -> logging.Logger:
    """Console only, before the run directory exists."""
    log = get_logger()
    log.setLevel(logging.INFO)
    log.propagate = False  # Hydra may configure the root logger; never print twice
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    console = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    if rank == 0:
        console.setFormatter(logging.Formatter("%(message)s"))
    else:
        console.setLevel(logging.WARNING)
        console.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
    log.addHandler(console)
    return log


def setup_files(run_dir: Path, rank: int) -> logging.Logger:
    """Add the run directory's files: train.log on rank 0, logs/rank<r>.log on every rank."""
    log = get_logger()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    own = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
    own.setFormatter(logging.Formatter(FORMAT))
    log.addHandler(own)
    if rank == 0:
        main = logging.FileHandler(run_dir / "train.log")
        main.setFormatter(logging.Formatter(FORMAT))
        log.addHandler(main)
    return log


def emit_unblocked(level: int, message: str, console_s: float = 1.0) -> None:
    """Log to the files first, then to the console from a thread waited for at most `console_s`: a
    console nobody reads (a full pipe) must not keep the watchdog from acting and the rank from leaving."""
    log = get_logger()
    if not log.isEnabledFor(level):
        return
    record = log.makeRecord(log.name, level, __file__, 0, message, (), None)
    handlers = [h for h in log.handlers if record.levelno >= h.level]
    for h in handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)
    console = [h for h in handlers if not isinstance(h, logging.FileHandler)]
    if console:
        thread = threading.Thread(target=lambda: [h.handle(record) for h in console], daemon=True)
        thread.start()
        thread.join(console_s)


def close() -> None:
    """Remove our handlers and give the logger back as we found it (a library leaves no global state)."""
    log = get_logger()
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.propagate = True
    log.setLevel(logging.NOTSET)


class MetricsWriter:
    """One row per epoch in metrics.csv; the header comes from the first row's keys.

    Each write replaces the whole file atomically (it is small: one row per epoch), so a crash never
    leaves half a row, and a resumed run that truncates it never loses the rows it keeps.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fields: list[str] | None = None
        self.rows: list[dict[str, object]] = []
        if path.is_file() and path.stat().st_size:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.rows = list(reader)
                self.fields = list(reader.fieldnames) if reader.fieldnames else None

    def truncate(self, after_epoch: int) -> None:
        """Drop rows of epochs after `after_epoch` (a resumed run redoes them)."""
        if self.fields is None:
            return
        kept = [r for r in self.rows if int(str(r["epoch"])) <= after_epoch]
        if len(kept) != len(self.rows):
            self.rows = kept
            self._flush()

    def write(self, row: dict[str, float | int | str]) -> None:
        if self.fields is None:
            self.fields = list(row)
        self.rows.append(dict(row))
        self._flush()

    def _flush(self) -> None:
        assert self.fields is not None
        with atomic.open_atomic(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
