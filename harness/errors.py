"""The one user-error wrapper around every entry point (`python -m harness.train`, `.profile`,
`.info`, `.checkpoint`), as lightning-hydra-template's `task_wrapper` is around its tasks.

Owns how an error a user can cause (harness/failures.py says which those are) is said: `error: ...`
on stderr, one line per cause, no traceback, exit 2; and Ctrl-C: one line, exit 130. A rank that
stops because a *peer* failed with a user error (the watchdog's "failed" verdict, zero_first's
master) says nothing more here: its watchdog has logged the one line, and it exits 2 as well, so
the launcher reports one cause with one code. Anything else is a bug or a fault, and keeps its
traceback (exit 1).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from harness.failures import EXIT_INTERRUPTED, EXIT_USER_ERROR, exit_code, is_user_error, names_user_error, user_errors

__all__ = ["EXIT_INTERRUPTED", "EXIT_USER_ERROR", "Leave", "entry_point", "message", "reporting"]

F = TypeVar("F", bound=Callable[..., Any])


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
        raise Leave(exit_code(exc.verdict)) from None
    except ZeroFirstError as exc:  # no watchdog to report it (dist.watchdog=false): the master's error,
        print(f"stopped: {exc}", file=sys.stderr)  # which the master itself says as `error: ...`
        raise Leave(EXIT_USER_ERROR if names_user_error(str(exc).split(" failed: ", 1)[-1]) else 1) from None
    except KeyboardInterrupt:
        if interrupted:
            print(interrupted, file=sys.stderr)
        raise Leave(EXIT_INTERRUPTED) from None


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
