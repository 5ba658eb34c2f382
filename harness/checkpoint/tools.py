"""Checkpoints for people: `info` (what is there, and is it valid) and `export` (the model alone).

    python -m harness.checkpoint info <run dir | checkpoints dir | entry | file> [--json]
    python -m harness.checkpoint export <run dir | ... | file> <model.pt> [--ema]

`export` writes the model's plain state dict (the bare module's keys, no DDP `module.` prefix, CPU
tensors; a sharded checkpoint's shards gathered into full tensors, in this one process), which
`torch.load(path, weights_only=True)` reads in one process with no process group: for inference
and YOLOv5-style tools. From a run directory it takes the checkpoint resume would take.
Exit codes: 0; 1 when no checkpoint is valid; 2 for a path that holds no checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from harness import atomic, errors
from harness.checkpoint import format as fmt
from harness.checkpoint.format import CheckpointError
from harness.checkpoint.store import BEST, LATEST, Store, resolve, size_of


def _describe(path: Path) -> dict[str, Any]:
    entry = path.parent if path.name == fmt.STATE_FILE else path
    store = Store(entry.parent)
    row: dict[str, Any] = {"path": str(entry), "latest": store.pointed(LATEST) == entry,
                           "best": store.pointed(BEST) == entry, "size": size_of(entry)}
    try:
        state = fmt.read(path)
    except CheckpointError as exc:
        return {**row, "valid": False, "error": str(exc)}
    progress, meta = state["progress"], state["meta"]
    shards = fmt.sharded_parts(state)
    return {**row, "valid": True, "format": meta["written_as"], "epoch": progress["epoch"],
            "step": progress["step"], "step_in_epoch": progress["step_in_epoch"], "world_size": meta["world_size"],
            "metrics": meta["metrics"], "parts": [name for name in fmt.PARTS if name in state or name in shards],
            "sharded": shards}


def info(target: str | Path) -> list[dict[str, Any]]:
    """One row per checkpoint under `target` (the order resume tries them): where, whether valid,
    and for valid ones epoch, step, world size, metrics, format, size in bytes."""
    files = resolve(Path(target))
    if not files:
        raise FileNotFoundError(f"{target}: no checkpoint there (a run directory, its checkpoints/, "
                                f"a step-N entry or a .pt file)")
    return [_describe(f) for f in files]


def export_model(source: str | Path, dest: str | Path, *, ema: bool = False) -> Path:
    """Write the model (or its EMA) weights of the checkpoint `source` means to `dest`; return dest."""
    files = resolve(Path(source))
    if not files:
        raise FileNotFoundError(f"{source}: no checkpoint there")
    path, state, _ = fmt.first_valid(files)
    part = "ema" if ema else "model"
    shards = fmt.sharded_parts(state)
    if ema and "ema" not in state and "ema" not in shards:
        raise CheckpointError(f"checkpoint {path} has no EMA (the run had trainer.ema=false); export without --ema")
    if part in shards:
        from harness.checkpoint import sharded  # torch.distributed.checkpoint: ~0.9 s to import

        weights = sharded.read_full(path.parent, "ema.ema" if ema else "model")
    else:
        weights = state["ema"]["ema"] if ema else state["model"]
    plain = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    with atomic.open_atomic(Path(dest), "wb") as f:
        torch.save(plain, f)
    return Path(dest)


def load(target: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint a path means (run directory, checkpoints/, entry, pointer or file): the first
    valid one in the order resume tries them. A sharded checkpoint's model comes gathered into full
    tensors (on the CPU); its optimizer and EMA stay in the entry's shards/."""
    files = resolve(Path(target))
    if not files:
        raise CheckpointError(f"{target}: no checkpoint there")
    path, state, _ = fmt.first_valid(files, map_location=map_location)
    if "model" in fmt.sharded_parts(state):
        from harness.checkpoint import sharded

        state["model"] = sharded.read_full(path.parent, "model")
    return state


def _text(row: dict[str, Any]) -> str:
    marks = " ".join(m for m in ("latest", "best") if row[m])
    head = f"{row['path']}{'  (' + marks + ')' if marks else ''}"
    if not row["valid"]:
        return f"{head}\n  INVALID: {row['error']}"
    metrics = " ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in row["metrics"].items())
    position = f"epoch {row['epoch']} done"
    if row["step_in_epoch"]:
        position += f" + {row['step_in_epoch']} global batches"
    shards = f" (sharded: {', '.join(row['sharded'])})" if row["sharded"] else ""
    return (f"{head}\n  valid {row['format']}, {row['size'] / 1024:.0f} KiB; {position}, step {row['step']}, "
            f"world size {row['world_size']}\n  parts: {', '.join(row['parts'])}{shards}\n"
            f"  metrics: {metrics or '-'}")


@errors.entry_point(also=(FileNotFoundError,))  # a path that holds no checkpoint: exit 2
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.checkpoint", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="epoch, step, world size, metrics, format, size and validity")
    p_info.add_argument("target", help="a run directory, its checkpoints/, a step-N entry or a checkpoint file")
    p_info.add_argument("--json", action="store_true", help="one JSON list of rows")
    p_export = sub.add_parser("export", help="the model's plain state dict, for torch.load(weights_only=True)")
    p_export.add_argument("source", help="a run directory, its checkpoints/, a step-N entry or a checkpoint file")
    p_export.add_argument("dest", help="the file to write, e.g. model.pt")
    p_export.add_argument("--ema", action="store_true", help="the EMA weights instead of the model's")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            rows = info(args.target)
            print(json.dumps(rows, indent=2) if args.json else "\n".join(_text(r) for r in rows))
            return 0 if any(r["valid"] for r in rows) else 1
        dest = export_model(args.source, args.dest, ema=args.ema)
        print(f"wrote {dest} ({dest.stat().st_size / 1024:.0f} KiB)")
        return 0
    except CheckpointError as exc:  # checkpoints there, none valid: this tool's documented exit 1
        print(f"error: {exc}", file=sys.stderr)
        return 1
