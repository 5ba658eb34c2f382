"""The one run directory: `<run_root>/<run id>`.

Owns its creation and the resolved `config.yaml` in it. The id comes from `env.run_id` (Slurm job,
elastic run id, or what the launcher chose); without one, a timestamp, made unique by creating the
directory exclusively, so two runs started in the same second never share a directory.

Also owns the check that every rank sees the same directory (`check_shared`): on several nodes the
run directory must be on a file system they all mount. A node-local one would let a rank 0 that
restarts on another node find no checkpoint and start the run over, silently; so at start rank 0
writes `.shared-<nonce>` there, every rank looks for it, and all refuse together if one cannot.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from harness import atomic

MARK_PREFIX = ".shared-"  # <run>/.shared-<nonce>: rank 0's mark, new each start (a new name: no stale cache)
MARK_WAIT_S = 1.0  # how long a rank looks for the mark (a file system that shows new files late)
MARK_POLL_S = 0.05
VIEWS_LISTED = 8  # ranks named in the error; the rest are counted


class RunDirError(RuntimeError):
    """The ranks of one run do not all see rank 0's run directory."""


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def create_unique(root: Path, stem: str | None = None) -> Path:
    """A new directory named `stem` or the current time (with -1, -2, ... on collision)."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = stem or timestamp()
    for n in range(1000):
        path = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a unique run directory under {root}")


def ensure(root: Path, run_id: str) -> Path:
    """The directory for a known run id; reused when it exists (a requeued or restarted job)."""
    path = root / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_config(run_dir: Path, config_yaml: str) -> None:
    """The resolved config.yaml, replaced atomically (a rerun of the same run id rewrites it)."""
    atomic.write_text(run_dir / "config.yaml", config_yaml)


def mark_shared(run_dir: Path, nonce: str, host: str) -> Path:
    """Rank 0: write the mark for this start (its host and path inside), and drop older starts' marks."""
    mark = run_dir / f"{MARK_PREFIX}{nonce}"
    for old in run_dir.glob(f"{MARK_PREFIX}*"):
        if old != mark:
            old.unlink(missing_ok=True)
    atomic.write_text(mark, f"{host}\n{run_dir}\n")
    return mark


def sees_mark(run_dir: Path, nonce: str, wait_s: float = MARK_WAIT_S) -> bool:
    """Whether this rank finds rank 0's mark in its own `run_dir` (looking for up to `wait_s`)."""
    mark = run_dir / f"{MARK_PREFIX}{nonce}"
    deadline = time.monotonic() + wait_s
    while not mark.is_file():
        if time.monotonic() >= deadline:
            return False
        time.sleep(MARK_POLL_S)
    return True


def unshared_error(views: Sequence[tuple[str, str, bool]], nonce: str) -> str | None:
    """The error for every rank's (host, run directory, sees the mark), in rank order; None: all see it."""
    blind = [(rank, host, path) for rank, (host, path, seen) in enumerate(views) if not seen]
    if not blind:
        return None
    host0, path0, _ = views[0]
    listed = "; ".join(f"rank {rank} on {host} ({path})" for rank, host, path in blind[:VIEWS_LISTED])
    if len(blind) > VIEWS_LISTED:
        listed += f"; and {len(blind) - VIEWS_LISTED} more"
    return (f"the run directory is not shared: rank 0 on {host0} wrote {path0}/{MARK_PREFIX}{nonce}, and "
            f"{len(blind)} of {len(views)} ranks do not see it in their run directory: {listed}. Every rank must "
            f"see the same run directory: put run_root on a file system every node mounts (with a node-local "
            f"one, a rank 0 restarted on another node would find no checkpoint and start the run over)")


def check_shared(run_dir: Path, rank: int) -> None:
    """Every rank, right after the process group is up: raise RunDirError on every rank unless all of
    them see the mark rank 0 writes in `run_dir`. Without a group, or with one rank, does nothing."""
    import torch.distributed as dist

    from harness.dist import share_from_master

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    host = socket.gethostname()
    nonce = secrets.token_hex(8) if rank == 0 else None
    if nonce is not None:
        mark_shared(run_dir, nonce, host)  # before the nonce is out: whoever has the nonce may look
    nonce = share_from_master(nonce)
    views: list[tuple[str, str, bool] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(views, (host, str(run_dir), sees_mark(run_dir, nonce)))
    error = unshared_error([v for v in views if v is not None], nonce)
    if error is not None:
        raise RunDirError(error)
