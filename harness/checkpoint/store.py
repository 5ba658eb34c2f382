"""Where checkpoints live in a run directory, and which one is current.

    checkpoints/
      step-00000044/state.pt    one entry per save, named by the global step
      latest                    the newest complete entry's name (replaced atomically, after the entry)
      best                      the entry with the best validation metric so far
      superseded/               entries set aside by a resume from an earlier point (never deleted here)
      last.pt, best.pt          harness-checkpoint-1 files of older runs: read, never written

A save fills `.step-N.partial/` (`begin`, the writers, `finish`), renames it to `step-N/` (so an
entry exists only whole), then replaces `latest` (and `best`): a crash at any point leaves the
previous entry, and a pointer that names a whole entry or none (resume then takes the newest entry
there is). Only then are older entries pruned, down to the `keep` newest plus `best`. An entry is a
directory so that a sharded writer (FSDP through torch.distributed.checkpoint, one file per rank:
sharded.py) fills the same partial directory from every rank and rank 0 finishes it: the pointers,
the pruning and the fallback are the same for both kinds. Pure file handling: no torch.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from harness import atomic
from harness.checkpoint.format import STATE_FILE

ENTRY = re.compile(r"step-(\d+)")
LATEST, BEST = "latest", "best"
SUPERSEDED = "superseded"
LEGACY_FILES = ("last.pt", "best.pt")


def entry_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(entry: Path) -> int:
    m = ENTRY.fullmatch(entry.name)
    if m is None:
        raise ValueError(f"{entry} is not a checkpoint entry (step-<N>)")
    return int(m.group(1))


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Store:
    """One run's `checkpoints/` directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def entries(self) -> list[Path]:
        """Complete entries, oldest step first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and ENTRY.fullmatch(p.name)]
        return sorted(found, key=step_of)

    def pointed(self, pointer: str) -> Path | None:
        """The entry `latest` or `best` names (which may have been removed since), or None."""
        path = self.root / pointer
        if not path.is_file():
            return None
        name = path.read_text().strip()
        return self.root / name if ENTRY.fullmatch(name) else None

    def candidates(self) -> list[Path]:
        """State files in the order resume tries them: `latest`, the other entries newest first,
        then a version-1 `last.pt`."""
        entries = self.entries()
        latest = self.pointed(LATEST)
        order = ([latest] if latest in entries else []) + [e for e in reversed(entries) if e != latest]
        files = [e / STATE_FILE for e in order]
        legacy = self.root / LEGACY_FILES[0]
        return files + ([legacy] if legacy.is_file() else [])

    def commit(self, step: int, write: Callable[[Path], None], *, best: bool) -> Path:
        """Write an entry for `step` through `write(partial_directory)`, put it in place, point to it."""
        partial = self.begin(step)
        try:
            write(partial)
        except BaseException:
            self.abandon(partial)
            raise
        return self.finish(step, partial, best=best)

    def partial(self, step: int) -> Path:
        """Where the entry for `step` is filled before it is put in place (every writer's target)."""
        return self.root / f".{entry_name(step)}.partial"

    def begin(self, step: int) -> Path:
        """An empty partial entry for `step` (one writer: rank 0; other ranks fill it after it exists)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in [*self.root.glob(".step-*.partial"), *self.root.glob(".step-*.replaced")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a save that was killed
        partial = self.partial(step)
        partial.mkdir()
        return partial

    def abandon(self, partial: Path) -> None:
        shutil.rmtree(partial, ignore_errors=True)

    def finish(self, step: int, partial: Path, *, best: bool) -> Path:
        """Put the filled `partial` in place as the entry for `step`; point `latest` (and `best`) to it."""
        name = entry_name(step)
        final = self.root / name
        replaced = None
        if final.exists():  # the same step saved again (mid-epoch, then at the end of the epoch)
            replaced = self.root / f".{name}.replaced"
            os.replace(final, replaced)
        os.replace(partial, final)
        # one directory fsync for the entry's rename and the pointers': should a crash keep a pointer's
        # rename but not the entry's, the pointer names no entry and resume takes the newest there is
        atomic.write_text(self.root / LATEST, name + "\n", sync_dir=False)
        if best:
            atomic.write_text(self.root / BEST, name + "\n", sync_dir=False)
        atomic.fsync_dir(self.root)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        for legacy in LEGACY_FILES:  # an older run's files: the new entries supersede them
            if (self.root / legacy).is_file():
                self._set_aside(self.root / legacy)
        return final

    def prune(self, keep: int) -> list[Path]:
        """Remove all but the `keep` newest entries and the one `best` names; return what went."""
        protected = {self.pointed(LATEST), self.pointed(BEST)}
        entries = self.entries()
        doomed = [e for e in entries[: max(len(entries) - keep, 0)] if e not in protected]
        for entry in doomed:
            shutil.rmtree(entry, ignore_errors=True)
        return doomed

    def set_aside(self, after_step: int, current: Path | None) -> list[str]:
        """Move entries beyond `after_step` (the point this run continues from) to superseded/, so
        that order by step stays the order of saving; point `latest` at `current` (an entry here) or
        at nothing. A start from scratch (`after_step` 0) sets aside version-1 files too. Returns the
        names set aside."""
        moved = [e for e in self.entries() if step_of(e) > after_step]
        if after_step == 0:
            moved += [self.root / f for f in LEGACY_FILES if (self.root / f).is_file()]
        for entry in moved:
            self._set_aside(entry)
        for pointer in (LATEST, BEST):
            target = self.pointed(pointer)
            if target is not None and not target.is_dir():
                (self.root / pointer).unlink()
        if current is not None and current.parent == self.root and current.is_dir() \
                and self.pointed(LATEST) != current:  # a fallback: point past the unreadable one
            atomic.write_text(self.root / LATEST, current.name + "\n")
        return [e.name for e in moved]

    def _set_aside(self, path: Path) -> None:
        target = self.root / SUPERSEDED / path.name
        target.parent.mkdir(exist_ok=True)
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)


def resolve(path: Path) -> list[Path]:
    """The state files a user-given path means, in the order to try them: a state file; a `latest` or
    `best` pointer; an entry directory; a checkpoints directory; a run directory. [] when none."""
    if path.is_file() and path.name in (LATEST, BEST):
        target = Store(path.parent).pointed(path.name)
        return [target / STATE_FILE] if target is not None else []
    if path.is_file():
        return [path]
    if (path / STATE_FILE).is_file():
        return [path / STATE_FILE]
    for root in (path / "checkpoints", path):
        found = Store(root).candidates()
        if found:
            return found
    return []
