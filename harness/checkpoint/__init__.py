"""Checkpoints: one schema, one writer, resumable on any world size, inspectable and exportable.

    format.py        what a checkpoint holds (the parts, meta, progress keys), its version, migration
    store.py         where entries live (checkpoints/step-N/, `latest` and `best` pointers), retention
    checkpointer.py  gathers the parts' states on save; chooses (with fallback) and restores on resume
    rng.py           every rank's random generators as one part
    tools.py         `python -m harness.checkpoint info | export`, and `export_model` for Python

What lives elsewhere: each part's own state (`state_dict` / `load_state_dict` on the model, optimizer,
schedule, GradScaler, `ModelEMA`, `EarlyStopping`, `GlobalBatchSampler`, the loop's counters); the
atomic write (`harness.atomic`); when to save (the loop).
"""

from harness.checkpoint.checkpointer import Checkpointer
from harness.checkpoint.format import FORMAT, LEGACY_FORMAT, CheckpointError, Stateful, read
from harness.checkpoint.rng import RankStreams, rng_state, set_rng_state
from harness.checkpoint.store import Store, resolve
from harness.checkpoint.tools import export_model, info, load

__all__ = ["FORMAT", "LEGACY_FORMAT", "CheckpointError", "Checkpointer", "RankStreams", "Stateful", "Store",
           "export_model", "info", "load", "read", "resolve", "rng_state", "set_rng_state"]
