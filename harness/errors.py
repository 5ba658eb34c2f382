"""The one user-error wrapper around every entry point (`python -m harness.train`, `.profile`,
`.info`, `.checkpoint`), as lightning-hydra-template's `task_wrapper` is around its tasks.

Owns what counts as an error a user can cause (user_errors(): a bad device string, batch, config key
or value, checksum, URL, archive, checkpoint, run directory), how it is said (`error: ...` on
stderr, one line per cause, no traceback) and the exit codes of leaving on one: 2 for a user error,
130 for Ctrl-C. A rank that stops because a *peer* failed with a user error (the watchdog's
"failed" verdict, zero_first's master) says nothing more here: its watchdog has logged the one line,
and it exits 2 as well, so the launcher reports one cause with one code. Anything else is a bug or
a fault, and keeps its traceback (exit 1).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from hydra.errors import HydraException, InstantiationException
from omegaconf.errors import OmegaConfBaseException

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended


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


F = TypeVar("F", bound=Callable[..., Any])


def is_user_error(exc: BaseException) -> bool:
    # Hydra wraps whatever a user's constructor raises (a bug, with a traceback to show) in an
    # InstantiationException: only composing is the user's configuration
    return isinstance(exc, user_errors()) and not isinstance(exc, InstantiationException)


def names_user_error(text: str) -> bool:
    """Whether a peer's `<Type>: message` (a verdict's cause, zero_first's `error: <module.Type>: ...`)
    is one of user_errors(): what crosses the store is text, not the exception."""
    head = text.removeprefix("error: ").split(":", 1)[0].strip()
    return head.rsplit(".", 1)[-1] in {t.__name__ for t in user_errors()}


def message(exc: BaseException) -> str:
    """The `error: ...` text; Hydra's own words keep the cause they wrap (the offending key)."""
    cause = f"\n{exc.__cause__}" if isinstance(exc, HydraException | OmegaConfBaseException) \
        and exc.__cause__ is not None else ""
    return f"error: {exc}{cause}"


class Leave(SystemExit):
    """How reporting() leaves: the line has been said; the code is the exit status."""


@contextmanager
def reporting(also: tuple[type[BaseException], ...] = (), interrupted: str | None = "interrupted") -> Iterator[None]:
    """Leave on a user error (user_errors(), plus an entry point's own `also`) with its `error:` line
    and exit 2, and on Ctrl-C with the line `interrupted` (None: silent, as workers are, whose
    launcher says it once for all) and exit 130, instead of a traceback (raises Leave)."""
    from harness.watchdog import PeerLostError
    from harness.zero_first import ZeroFirstError

    try:
        yield
    except user_errors() + also as exc:
        if not isinstance(exc, also) and not is_user_error(exc):
            raise
        print(message(exc), file=sys.stderr)
        raise Leave(EXIT_USER_ERROR) from None
    except PeerLostError as exc:  # the watchdog has logged the one report; no traceback on top of it
        raise Leave(peer_exit_code(exc)) from None
    except ZeroFirstError as exc:  # no watchdog to report it (dist.watchdog=false): the master's error
        print(f"error: {exc}", file=sys.stderr)
        raise Leave(EXIT_USER_ERROR if names_user_error(str(exc).split(" failed: ", 1)[-1]) else 1) from None
    except KeyboardInterrupt:
        if interrupted:
            print(interrupted, file=sys.stderr)
        raise Leave(EXIT_INTERRUPTED) from None


def peer_exit_code(exc: Any) -> int:
    """A rank that stops for a peer's sake (PeerLostError): 2 when the peer failed with a user error,
    130 when it was interrupted, else EXIT_PEER_LOST."""
    from harness.watchdog import EXIT_PEER_LOST

    extra = exc.verdict.extra
    if extra.get("user_error"):
        return EXIT_USER_ERROR
    if extra.get("interrupted"):
        return EXIT_INTERRUPTED
    return EXIT_PEER_LOST


def entry_point(also: tuple[type[BaseException], ...] = ()) -> Callable[[F], F]:
    """`reporting()` around a CLI's `main(argv) -> int`, which then returns the exit code (2, 130)
    instead of raising: `sys.exit(main())` and tests calling `main([...])` see the same."""
    def wrap(f: F) -> F:
        @functools.wraps(f)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                with reporting(also):
                    return f(*args, **kwargs)
            except Leave as exc:
                return exc.code
        return run  # type: ignore[return-value]
    return wrap
