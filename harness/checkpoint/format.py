"""What a checkpoint file holds: the keys, the format version, reading, writing and migration.

A checkpoint is one dict that `torch.load(weights_only=True)` reads (tensors, numbers, strings,
lists and dicts of them; the config is YAML text), so loading never unpickles arbitrary objects:

    format          "harness-checkpoint-2"
    meta            {"world_size", "metrics" (the last epoch's row), "config" (YAML), "torch",
                     "written_as": the format the file was written in (a migrated file says so),
                     "sharded": the parts kept in the entry's shards/ instead (FSDP; sharded.py)}
    model ... rng   one entry per part (PARTS), each what that part's `state_dict()` returned

The parts own their contents (`Stateful`: `state_dict` / `load_state_dict`); this module owns which
parts there are, the meta keys, and the `progress` keys that say where training stands, since
`info` reads them. Version 1 files (`harness-checkpoint-1`, a flat `last.pt`) are migrated on read.
Where files live is `store.py`'s job; gathering and restoring the parts is `checkpointer.py`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from harness import atomic

FORMAT = "harness-checkpoint-2"
LEGACY_FORMAT = "harness-checkpoint-1"
STATE_FILE = "state.pt"  # in each entry directory: what rank 0 writes (all of it, for DDP)
SHARDS, METADATA = "shards", ".metadata"  # the sharded parts' directory (FSDP) and DCP's index in it

# every part a checkpoint may hold; the first four are in every checkpoint
REQUIRED = ("model", "optimizer", "scheduler", "progress")
PARTS = (*REQUIRED, "scaler", "ema", "early_stopping", "sampler", "rng")
# the loop's position: epochs done, global batches of the current epoch done, optimizer steps done,
# the current epoch's summed loss so far, and the best validation metric so far
PROGRESS_KEYS = ("epoch", "step_in_epoch", "step", "epoch_loss", "best")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit this run; names the file."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def pack(parts: dict[str, dict[str, Any]], *, world_size: int, metrics: dict[str, float],
         config: str, sharded: tuple[str, ...] = ()) -> dict[str, Any]:
    """The state file's contents: `parts` (replicated) plus meta; `sharded` names the parts in shards/."""
    unknown = sorted(set(parts) - set(PARTS))
    missing = [name for name in REQUIRED if name not in parts and name not in sharded]
    if unknown or missing:
        raise ValueError(f"checkpoint parts: unknown {unknown}, missing {missing}; the parts are {', '.join(PARTS)}")
    meta = {"world_size": world_size, "metrics": dict(metrics), "config": config, "torch": str(torch.__version__),
            "written_as": FORMAT, "sharded": list(sharded)}
    return {"format": FORMAT, "meta": meta, **parts}


def write(state: dict[str, Any], path: Path) -> None:
    with atomic.open_atomic(path, "wb") as f:
        torch.save(state, f)


def read(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A whole, valid checkpoint in the current format (version 1 migrated), or CheckpointError."""
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a harness checkpoint: {_reason(exc)}") from exc
    version = raw.get("format") if isinstance(raw, dict) else None
    if version == LEGACY_FORMAT:
        raw = migrate_v1(raw)
    elif version != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a harness checkpoint (format {version!r}; this harness "
                              f"reads {FORMAT} and {LEGACY_FORMAT})")
    sharded = sharded_parts(raw)
    missing = [k for k in (*REQUIRED, "meta") if k not in raw and k not in sharded]
    if sharded and not (path.parent / SHARDS / METADATA).is_file():
        missing.append(f"{SHARDS}/{METADATA}")
    missing += [f"progress.{k}" for k in PROGRESS_KEYS if "progress" in raw and k not in raw["progress"]]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: no {', '.join(missing)}")
    return raw


def sharded_parts(state: dict[str, Any]) -> list[str]:
    """The parts a checkpoint keeps in its shards/ (none for DDP and single-process checkpoints)."""
    meta = state.get("meta")
    return list(meta.get("sharded", [])) if isinstance(meta, dict) else []


def _reason(exc: BaseException) -> str:
    """The line of torch.load's error that says what is wrong (its weights_only advice is pages long)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    said = [line for line in lines if "Unpickler error" in line or "Unsupported global" in line]
    return f"{type(exc).__name__}: {(said or lines or [''])[0]}"


def first_valid(files: list[Path], map_location: str | torch.device = "cpu"
                ) -> tuple[Path, dict[str, Any], list[str]]:
    """The first of `files` that reads as a valid checkpoint, with the errors of those before it;
    CheckpointError naming every file when none does."""
    failures: list[str] = []
    for path in files:
        try:
            return path, read(path, map_location=map_location), failures
        except CheckpointError as exc:
            failures.append(str(exc))
    raise CheckpointError(f"no valid checkpoint: {'; '.join(failures) or 'none found'}")


def migrate_v1(old: dict[str, Any]) -> dict[str, Any]:
    """harness-checkpoint-1 (one flat dict, written by `Loop.state`) -> the current layout."""
    new: dict[str, Any] = {
        "format": FORMAT,
        "meta": {"world_size": old["world_size"], "metrics": old["metrics"], "config": old["config"],
                 "torch": "", "written_as": LEGACY_FORMAT},
        "model": old["model"], "optimizer": old["optimizer"], "scheduler": old["scheduler"], "scaler": old["scaler"],
        "progress": {"epoch": old["epoch"], "step_in_epoch": old["step_in_epoch"], "step": old["step"],
                     "epoch_loss": old["epoch_loss"], "best": old["best"]},
        "rng": {"world_size": old["world_size"], "ranks": old["rng"]},
    }
    if old["ema"] is not None:
        new["ema"] = old["ema"]
    if old["early_stopping"] is not None:
        new["early_stopping"] = dict(old["early_stopping"])
    return new  # version 1 did not record the sampler's sequence: nothing to check it against
