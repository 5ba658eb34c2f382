"""Rank-0-first execution: one rank prepares (download, verify, cache) while the others wait.

Owns `zero_first` and YOLOv5's drop-in `torch_distributed_zero_first`. It is one phase of the
liveness protocol (harness/health.py, harness/watchdog.py), not a mechanism of its own: the
master's heartbeat is its watchdog's, with the phase `zero_first:<name>`, and a master that dies or
freezes is named by the same verdict as anywhere else in the run. What is zero_first's own:

- the outcome: the master writes `ok` or `error: <type>: <message>` under its key (built by
  `health.Keys`, under the attempt) when it leaves the body, success or exception; the waiters
  block on that key from a helper thread, so they are released the moment it is written;
- the waiters never sit in a collective, and their main thread only waits on a queue, so a verdict
  (the master lost, or the store's host lost: a frozen rank 0 under srun freezes the store, and a
  store call then never returns) turns into ZeroFirstError at once;
- under torchrun the agent SIGTERMs the other workers ~0.1 s after one exits: a failed master waits
  (at most ACK_WAIT_S) until the others have read its error, they let it exit first (so the agent
  names it as the root cause), and SIGTERM while waiting raises ZeroFirstError with the reason.

Outside a harness session (a user's own process group) a watchdog runs for the body only.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch.distributed as dist

from harness import dist as hdist
from harness import watchdog
from harness.env import DistEnv, EnvError, detect

ACK_WAIT_S = 1.0  # how long a failed master waits for the others to read its error
LINGER_S = 2.0  # under an elastic agent, how long a waiter that read the error lets the master exit first
POLL_S = 0.01  # the failed master's poll for acknowledgements
WAKE_S = 0.05  # a waiter's main thread looks at the verdict and the timeout this often
MESSAGE_MAX = 4000  # characters of the master's error passed on

_generations: Counter[str] = Counter()


class ZeroFirstError(RuntimeError):
    """Raised on a waiting rank when the master rank failed, died or stopped responding."""


@dataclass(frozen=True)
class _Place:
    """Who goes first for one scope, from this rank's point of view."""

    leads: bool  # this rank runs the body first
    master: int  # the global rank that goes first
    group: str  # key component shared by the master and its waiters
    waiters: int  # how many ranks wait for that master


def _topology() -> DistEnv:
    """The env `init` was given; else (a user's own init_process_group) the one torchrun/srun set."""
    world, known = dist.get_world_size(), hdist.env()
    if known.is_worker and known.world_size == world:
        return known
    try:
        found = detect(os.environ)
    except EnvError:
        found = DistEnv("launcher")
    if found.is_worker and found.world_size == world:
        return found
    # nothing says how ranks sit on nodes: treat the job as one node
    me = dist.get_rank()
    return DistEnv("torchrun", rank=me, local_rank=me, world_size=world, local_world_size=world)


def _place(scope: str) -> _Place:
    me, world, e = dist.get_rank(), dist.get_world_size(), _topology()
    if scope == "global":
        return _Place(me == 0, 0, "all", world - 1)
    # ranks of a node are contiguous under torchrun and srun's default block distribution; the master's
    # number is only used in messages, the key group is the node
    return _Place(e.local_rank == 0, me - e.local_rank, f"node{e.node_rank}", e.local_world_size - 1)


@contextmanager
def zero_first(name: str = "default", scope: Literal["local", "global"] = "local",
               timeout: float | None = None) -> Iterator[None]:
    """Run the body on the master first (local rank 0 per node, or rank 0), then on the others.

    scope="local": local rank 0 of each node goes first (node-local disks); "global": rank 0 only
    (a shared file system). The others wait outside any collective; if the master raises, they
    raise ZeroFirstError with its message; if it dies or freezes (the watchdog's dist.dead_after),
    ZeroFirstError names it. A slow master with a live heartbeat is waited for; `timeout` bounds
    the whole wait (None: as long as the master is alive). Every rank must enter zero_first with a
    given name equally often (the n-th entries pair up). Without a process group, or with one
    process, the context does nothing.
    """
    if scope not in ("local", "global"):
        raise ValueError(f"zero_first scope={scope!r} is not 'local' or 'global'")
    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield
        return
    with watchdog.scoped() as wd:
        place = _place(scope)
        _generations[name] += 1
        prefix = wd.keys.zero_first(name, _generations[name], place.group)
        store = hdist.store()
        if place.leads:
            before, wd.progress.phase = wd.progress.phase, f"zero_first:{name}"
            wd.beat_now()
            try:
                yield
            except BaseException as exc:
                _publish(store, prefix, _describe(exc))
                _wait_for_acks(store, prefix, place.waiters)
                raise
            finally:
                wd.progress.phase = before
            _publish(store, prefix, "ok")
        else:
            _wait_for_master(store, prefix, f"rank {place.master} (preparing {name!r})", wd, timeout)
            yield


def _describe(exc: BaseException) -> str:
    kind = type(exc)
    qual = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    text = str(exc)
    if len(text) > MESSAGE_MAX:
        text = text[:MESSAGE_MAX] + " [...]"
    return f"error: {qual}: {text}" if text else f"error: {qual}"


def _publish(store: dist.Store, prefix: str, status: str) -> None:
    try:
        store.set(prefix + "/status", status)
    except Exception as exc:  # the store is gone: the waiters learn it from their watchdogs
        watchdog.log.warning(f"zero_first: could not publish {status[:200]!r} to the others: {exc}")


def _wait_for_acks(store: dist.Store, prefix: str, waiters: int) -> None:
    """Give the waiters a moment to read the error: torchrun stops them ~0.1 s after this rank exits."""
    deadline = time.monotonic() + ACK_WAIT_S
    try:
        while time.monotonic() < deadline:
            if store.add(prefix + "/acks", 0) >= waiters:
                return
            time.sleep(POLL_S)
    except Exception:
        return


def _fetch_status(store: dist.Store, prefix: str, events: queue.SimpleQueue[tuple[str, Any]]) -> None:
    """The waiter's helper thread: block on the outcome key (woken by the store, no polling).

    A store call can block for ever when the store's host is frozen: then this thread is simply left
    behind, and the main thread leaves on the watchdog's verdict."""
    key = prefix + "/status"
    try:
        while True:
            try:
                store.wait([key], timedelta(seconds=60))
                break
            except dist.DistStoreError as exc:
                if "timeout" not in str(exc):  # a slow master: wait again
                    raise
        status = store.get(key).decode()
        if status != "ok":
            store.add(prefix + "/acks", 1)
        events.put(("status", status))
    except Exception as exc:
        events.put(("lost", exc))


def _wait_for_master(store: dist.Store, prefix: str, what: str, wd: watchdog.Watchdog,
                     timeout: float | None) -> None:
    events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    helper = threading.Thread(target=_fetch_status, args=(store, prefix, events), name="zero_first-wait",
                              daemon=True)
    start = time.monotonic()
    with _sigterm_raises(what) as known:
        helper.start()
        while True:
            try:
                kind, value = events.get(timeout=WAKE_S)
            except queue.Empty:
                if wd.verdict is not None:
                    raise ZeroFirstError(f"{what} stopped responding: {wd.verdict.line()}") from None
                if timeout is not None and time.monotonic() - start >= timeout:
                    raise ZeroFirstError(f"{what} did not finish within timeout={timeout}s") from None
                continue
            if kind == "status":
                if value == "ok":
                    return
                known.reason = f"{what} failed: {value.removeprefix('error: ')}"
                if "TORCHELASTIC_RUN_ID" in os.environ:
                    # let the master exit first: the agent then names it as the root cause and stops
                    # this rank (SIGTERM -> the same error) a moment later
                    time.sleep(LINGER_S)
                raise ZeroFirstError(known.reason)
            raise ZeroFirstError(
                f"lost contact with {what} through the store: {type(value).__name__}: "
                f"{str(value).splitlines()[0] if str(value) else ''} (where rank 0 hosts the store, "
                f"as under srun, this means rank 0 died)") from value


class _Reason:
    reason: str | None = None  # the master's error, once read


@contextmanager
def _sigterm_raises(what: str) -> Iterator[_Reason]:
    """While waiting, SIGTERM raises ZeroFirstError: torchrun's agent sends it when another worker
    (usually the master) has exited, and the reason belongs in this rank's log. A previous Python
    handler still runs first."""
    known = _Reason()
    if threading.current_thread() is not threading.main_thread():
        yield known
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:  # someone chose to ignore it; so do we
        yield known
        return

    agent = "TORCHELASTIC_RUN_ID" in os.environ

    def handler(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        why = ("the elastic agent stops every worker when one exits, so that rank probably died" if agent
               else "the job is being stopped")
        raise ZeroFirstError(known.reason or f"SIGTERM while waiting for {what}: {why}")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield known
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def torch_distributed_zero_first(local_rank: int) -> Iterator[None]:
    """YOLOv5's drop-in: local rank 0 of each node first, the others after; -1 means no group."""
    if local_rank == -1:
        yield
        return
    with zero_first("torch_distributed_zero_first", scope="local"):
        yield
