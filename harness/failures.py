"""What kind of failure an exception is, on this rank and as the others hear of it.

Owns `user_errors()` (the one tuple of what a user can cause: a bad device string, batch, config key
or value, checksum, URL, archive, checkpoint, run directory), the exit codes that are not bugs (2: a
user error; 3: preempted, requeue; 4: a peer lost; 130: Ctrl-C; 143: SIGTERM; importing them costs
no torch, so the Slurm epilogue decides in 0.1 s), and the watchdog's "failed" verdict that carries the
kind to the other ranks (`extra.user_error`, `extra.interrupted`), so a rank that stops for a peer's
sake leaves with the peer's code. A service: the watchdog (harness/watchdog.py) and the entry
points' wrapper (harness/errors.py) both use it; it imports only the modules that define the errors.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict
from typing import Any

from hydra.errors import HydraException, InstantiationException
from omegaconf.errors import OmegaConfBaseException

from harness.health import Identity, Verdict

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 3  # `python -m harness.train` exits with this when the run was preempted (requeue it)
EXIT_PEER_LOST = 4  # a rank left because a peer was lost (README: exit codes)
EXIT_INTERRUPTED = 130  # 128 + SIGINT (Ctrl-C): saved like SIGTERM; a rerun with the same run id resumes
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended


@functools.cache
def user_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause. Imported on first use: harness.checkpoint's own CLI is wrapped too,
    and its package imports its CLI."""
    from harness.batching import BatchSizeError
    from harness.checkpoint.format import CheckpointError
    from harness.config import ConfigError
    from harness.data.archive import ArchiveError
    from harness.data.cache import SourceError
    from harness.devices import DeviceError
    from harness.rundir import RunDirError

    return (DeviceError, BatchSizeError, ConfigError, CheckpointError, SourceError, ArchiveError, RunDirError,
            HydraException, OmegaConfBaseException)


def is_user_error(exc: BaseException) -> bool:
    # Hydra wraps whatever a user's constructor raises (a bug, with a traceback to show) in an
    # InstantiationException: only composing is the user's configuration
    return isinstance(exc, user_errors()) and not isinstance(exc, InstantiationException)


def names_user_error(text: str) -> bool:
    """Whether a peer's `<Type>: message` (a verdict's cause, zero_first's `error: <module.Type>: ...`)
    is one of user_errors(): what crosses the store is text, not the exception."""
    head = text.removeprefix("error: ").split(":", 1)[0].strip()
    return head.rsplit(".", 1)[-1] in {t.__name__ for t in user_errors()}


def failed(exc: BaseException, me: Identity, step: int, phase: str, attempt: str, now: float) -> Verdict:
    """The verdict a rank posts about its own exception. Ctrl-C reaches every rank at once: it is
    marked, so peers do not call it a failure incident."""
    interrupted = isinstance(exc, KeyboardInterrupt)
    text = str(exc).splitlines()[0][:500] if str(exc) else ""
    cause = "interrupted (SIGINT)" if interrupted else f"{type(exc).__name__}: {text}".rstrip(": ")
    return Verdict("failed", {**asdict(me), "step": step, "phase": phase}, 0.0, cause, me.rank, attempt, time=now,
                   extra={"user_error": is_user_error(exc), "interrupted": interrupted})


def exit_code(verdict: Verdict) -> int:
    """How a rank that stops for the sake of the verdict's subject leaves: 2 when it failed with a
    user error, 130 when it was interrupted, else EXIT_PEER_LOST."""
    extra: dict[str, Any] = verdict.extra
    return EXIT_USER_ERROR if extra.get("user_error") else EXIT_INTERRUPTED if extra.get("interrupted") \
        else EXIT_PEER_LOST


def report(verdict: Verdict) -> tuple[int, str]:
    """The level and text a rank logs about a verdict: Ctrl-C reaches every rank at once, so a
    peer's is news (INFO), not an error."""
    if verdict.extra.get("interrupted"):
        return logging.INFO, f"{verdict.line()}; stopping too"
    return logging.ERROR, verdict.line() + (f"\n  its main thread:\n{verdict.stack}" if verdict.stack else "")
