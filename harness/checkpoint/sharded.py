"""The sharded parts of a checkpoint: `torch.distributed.checkpoint` (DCP) files in the entry.

    checkpoints/step-N/state.pt     everything replicated (rank 0 writes it, as for DDP), and in its
                                    meta the names of the parts that are sharded
    checkpoints/step-N/shards/      DCP: one .distcp file per rank that holds data, and .metadata

Every rank writes its own shards into the partial entry rank 0 made; rank 0 writes state.pt and
commits the entry once DCP's save has returned on it (DCP's coordinator writes .metadata after
every rank's files are written), so an entry is complete or absent as before. Loading goes through
DCP's planner, which reshards to whatever world size the run has now. `read_full` gathers one
part's full tensors from the files in one process, without a process group (`export`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from harness.checkpoint.format import METADATA, SHARDS


def save(states: dict[str, Any], entry: Path) -> None:
    """Every rank: write this rank's shards of `states` (part name -> state dict) under `entry`."""
    dcp.save(states, checkpoint_id=entry / SHARDS)


def load(templates: dict[str, Any], entry: Path) -> None:
    """Every rank: fill `templates` (part name -> this run's state dict, the shapes to load into) in place."""
    dcp.load(templates, checkpoint_id=entry / SHARDS)


def complete(entry: Path) -> bool:
    return (entry / SHARDS / METADATA).is_file()


def read_full(entry: Path, part: str) -> dict[str, torch.Tensor]:
    """The full tensors of `part` (its nested keys joined with dots, as DCP stores them), on the CPU."""
    reader = FileSystemReader(entry / SHARDS)
    prefix = f"{part}."
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in reader.read_metadata().state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {key[len(prefix):]: value for key, value in state.items()}
