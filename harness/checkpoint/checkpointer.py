"""The checkpointer: gathers the parts' states into one checkpoint, and gives them back on resume.

The loop hands over its stateful parts once (model, optimizer, schedule, GradScaler, EMA, early
stopping, sampler, progress counters, every rank's RNG), each with `state_dict` / `load_state_dict`
(torchtitan's `Stateful` pattern); the checkpointer never reaches into them. Every rank calls `save`
and `restore` (the RNG part gathers over ranks; rank 0 chooses the file so that all ranks load the
same one); rank 0 writes. Parts named `sharded` (FSDP's model, optimizer and EMA) are written by
every rank into the same entry and loaded back resharded to this run's world size (sharded.py).

Resume (`trainer.resume`): `auto` tries the run directory's entries, newest first, and falls back
past unreadable ones with a warning naming both; it fails only when none is valid, naming every file
and `trainer.resume=never`. A path resumes from that checkpoint (or directory). `never` starts over.
Either way, entries beyond the point the run continues from are set aside (store.py), so the run
directory holds one line of saves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from harness.checkpoint import format as fmt
from harness.checkpoint.format import CheckpointError, Stateful
from harness.checkpoint.store import Store, resolve
from harness.logs import get_logger


class Checkpointer:
    def __init__(self, parts: dict[str, Stateful], *, directory: Path | None, rank: int, world_size: int,
                 keep: int, config: str, device: torch.device, sharded: tuple[str, ...] = ()) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep}: at least the newest checkpoint must be kept")
        self.parts, self.rank, self.world_size, self.keep = parts, rank, world_size, keep
        self.sharded = tuple(name for name in sharded if name in parts)
        self.store = Store(directory) if directory is not None else None
        self.config, self.device = config, device
        self.log = get_logger()

    def save(self, *, best: bool, metrics: dict[str, float]) -> Path | None:
        """Every rank calls this at a step boundary; rank 0 writes an entry. Returns it (rank 0)."""
        states = {name: part.state_dict() for name, part in self.parts.items()}  # rng: a collective
        if self.store is None:
            return None
        sharded = {name: states.pop(name) for name in self.sharded}
        state = fmt.pack(states, world_size=self.world_size, metrics=metrics, config=self.config,
                         sharded=self.sharded)
        step = states["progress"]["step"]
        if sharded:
            return self._save_sharded(step, state, sharded, best=best)
        if self.rank != 0:
            return None
        entry = self.store.commit(step, lambda d: fmt.write(state, d / fmt.STATE_FILE), best=best)
        self.store.prune(self.keep)
        return entry

    def _save_sharded(self, step: int, state: dict[str, Any], sharded: dict[str, Any], *, best: bool) -> Path | None:
        """Rank 0 makes the partial entry; every rank writes its shards there; rank 0 finishes it."""
        assert self.store is not None
        partial = self.store.begin(step) if self.rank == 0 else self.store.partial(step)
        if self.world_size > 1:
            dist.barrier()  # the partial entry exists (and no stale one will be removed under a writer)
        from harness.checkpoint import sharded as shards  # torch.distributed.checkpoint: ~0.9 s to import

        try:
            shards.save(sharded, partial)  # returns on rank 0 once every rank's files and the index are written
            if self.rank != 0:
                return None
            fmt.write(state, partial / fmt.STATE_FILE)
        except BaseException:
            if self.rank == 0:
                self.store.abandon(partial)
            raise
        entry = self.store.finish(step, partial, best=best)
        self.store.prune(self.keep)
        return entry

    def restore(self, resume: str) -> Path | None:
        """Load the parts from the checkpoint `resume` selects; return its file, or None (a fresh start)."""
        chosen, state = self._agree(resume)
        if chosen is not None:
            if state is None:  # rank 0 validated it already; the others read the same file
                state = fmt.read(chosen, map_location=self.device)
            self._load(chosen, state)
        if self.rank == 0 and self.store is not None:
            start = state["progress"]["step"] if state is not None else 0
            current = chosen.parent if chosen is not None and chosen.name == fmt.STATE_FILE else None
            moved = self.store.set_aside(start, current)
            if moved:
                self.log.warning(f"set aside {', '.join(moved)} (saved beyond step {start}, where this run "
                                 f"continues) in {self.store.root / 'superseded'}")
        return chosen

    def _agree(self, resume: str) -> tuple[Path | None, dict[str, Any] | None]:
        """Rank 0 picks the file (falling back past unreadable ones); every rank gets its choice."""
        choice: list[Any] = [None, None]  # [path, error]
        state = None
        if self.rank == 0:
            try:
                path, state = self._choose(resume)
                choice[0] = str(path) if path is not None else None
            except (CheckpointError, OSError) as exc:  # every rank must hear of it, or they wait forever
                choice[1] = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
        if self.world_size > 1:
            dist.broadcast_object_list(choice, src=0)
        if choice[1] is not None:
            raise CheckpointError(choice[1])
        return (Path(choice[0]) if choice[0] is not None else None), state

    def _choose(self, resume: str) -> tuple[Path | None, dict[str, Any] | None]:
        if resume == "never":
            return None, None
        if resume == "auto":
            candidates = self.store.candidates() if self.store is not None else []
            if not candidates:
                return None, None
        else:
            given = Path(resume).expanduser()
            if not given.exists():
                raise CheckpointError(f"trainer.resume={resume!r}: no such checkpoint file or directory")
            candidates = resolve(given)
            if not candidates:
                raise CheckpointError(f"trainer.resume={resume!r}: no checkpoint in {given}")
        try:
            path, state, failures = fmt.first_valid(candidates, map_location=self.device)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}. Fix or remove these files, or start over with trainer.resume=never") \
                from None
        for failure in failures:
            self.log.warning(failure)
        if failures:
            self.log.warning(f"the newest checkpoint {candidates[0]} is unreadable; resuming from the previous "
                             f"valid one, {path}")
        return path, state

    def _load(self, path: Path, state: dict[str, Any]) -> None:
        saved_sharded = fmt.sharded_parts(state)
        if bool(saved_sharded) != bool(self.sharded):
            kinds = ("sharded (trainer.strategy=fsdp)", "whole (trainer.strategy=ddp or auto)")
            raise CheckpointError(f"checkpoint {path} was saved {kinds[0] if saved_sharded else kinds[1]}, and this "
                                  f"run is {kinds[0] if self.sharded else kinds[1]}: resume with the strategy it was "
                                  f"saved with, or start over with trainer.resume=never")
        templates = {name: self.parts[name].state_dict() for name in saved_sharded if name in self.sharded}
        if templates:
            from harness.checkpoint import sharded as shards

            try:
                shards.load(templates, path.parent)  # resharded to this world size, in place
            except Exception as exc:
                raise CheckpointError(f"checkpoint {path.parent / fmt.SHARDS} cannot be loaded: "
                                      f"{type(exc).__name__}: {exc}") from exc
            state = {**state, **templates}
        for name, part in self.parts.items():
            if name not in state:
                if self.rank == 0:
                    self.log.warning(f"checkpoint {path} has no {name} state: this run's keeps its initial state")
                continue
            try:
                part.load_state_dict(state[name])
            except (KeyError, ValueError, RuntimeError, TypeError) as exc:
                raise CheckpointError(f"checkpoint {path}: its {name} state does not fit this run: "
                                      f"{type(exc).__name__}: {exc}") from exc
        unused = [name for name in fmt.PARTS if name in state and name not in self.parts]
        if unused and self.rank == 0:
            self.log.info(f"checkpoint {path}: not restored (this run has them off): {', '.join(unused)}")
