"""The process group, rank helpers, and rank-0-first execution.

Owns: `init` / `teardown` of torch.distributed for the three worker shapes (torchrun's env://, a
Slurm step's tcp:// to rank 0), the rank helpers the rest of the code asks, and `zero_first`, the
context that lets one rank prepare (download, verify, cache) while the others wait.

`zero_first` never parks the waiters in a collective. The master publishes its outcome through the
process group's key-value store when it leaves the body (`ok`, or `error: <type>: <message>`) and
writes a numbered heartbeat key while inside it; the waiters block on the next heartbeat key (no
polling: the store wakes them), and the outcome is written together with one last beat, so the
others are released at once. A master that raises stops every rank with its message; a master that
dies or freezes is noticed after `dead_after` seconds; a slow master with a live heartbeat is simply
waited for. Keys carry the restart count and a per-name generation.

Traps this handles (tests/test_zero_first.py shows each):
- where rank 0 hosts the store (srun), a frozen rank 0 freezes the store and a store call never
  returns, whatever its timeout: the waiters talk to the store from a helper thread, on a second
  connection opened in `init` (a new one to a dead store retries for seconds), and the main thread
  keeps the clock; a killed rank 0 breaks the connection, which becomes ZeroFirstError at once;
- under torchrun the agent SIGTERMs the other workers ~0.1 s after one exits: a failed master waits
  (at most ACK_WAIT_S) until the others have read its error, they let it exit first (so the agent
  names it as the root cause), and SIGTERM while waiting raises ZeroFirstError with the reason.
"""

from __future__ import annotations

import logging
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

import torch
import torch.distributed as dist

from harness.env import DistEnv, EnvError, detect

HEARTBEAT_S = 1.0  # master's heartbeat period (at most dead_after / 4)
ARRIVE_S = 60.0  # how long waiters allow the master to reach zero_first (at least dead_after)
ACK_WAIT_S = 1.0  # how long a failed master waits for the others to read its error
LINGER_S = 2.0  # under an elastic agent, how long a waiter that read the error lets the master exit first
POLL_S = 0.01  # the failed master's poll for acknowledgements
CONNECT_S = 5.0  # a waiter's second connection to the store gives up after this (or dead_after)
MESSAGE_MAX = 4000  # characters of the master's error passed on

log = logging.getLogger("harness")


class ZeroFirstError(RuntimeError):
    """Raised on a waiting rank when the master rank failed, died or stopped responding."""


_ENV: DistEnv = DistEnv("launcher")
_generations: Counter[str] = Counter()
# A second connection to the store for zero_first's waiters, opened while everybody is known to be up
# (in init): one opened later, when the store's host may just have died, retries for seconds.
_spare: tuple[dist.Store, dist.Store] | None = None  # (the store, a second connection to it)
_spare_lock = threading.Lock()


def init(env: DistEnv, *, backend: str, timeout_s: float, cuda: bool) -> torch.device:
    """Pick this rank's device and, for world size > 1, join the process group."""
    global _ENV
    _ENV = env
    if cuda:
        # a task that sees one GPU (srun --gpus-per-task) uses it; else visible GPU LOCAL_RANK
        index = 0 if torch.cuda.device_count() == 1 else env.local_rank
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)  # before init: NCCL binds the current device
    else:
        device = torch.device("cpu")
    if env.world_size > 1 and not dist.is_initialized():
        kwargs: dict = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if env.mode == "slurm":
            # rank 0 hosts the store on the first node; every task knows the address from the hostlist
            kwargs.update(init_method=f"tcp://{env.master_addr}:{env.master_port}",
                          rank=env.rank, world_size=env.world_size)
        if cuda:
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
        try:
            _spare_put(_store(), _connect(_store()))
        except Exception as exc:  # waiters open one when they need it
            log.debug(f"zero_first: no spare store connection ({exc})")
    return device


def teardown(clean: bool = False) -> None:
    """Leave the process group. `clean` (every rank got here without an error): meet at a barrier
    first, so no rank tears its connections down while a peer still uses them (seen: a gloo rank
    aborting with 'terminate called without an active exception' when its peer left first)."""
    _spare_take(None)  # drop zero_first's spare connection first
    if dist.is_initialized():
        if clean and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_master() -> bool:
    return rank() == 0


def env() -> DistEnv:
    """The environment this process was initialised with."""
    return _ENV


def _store() -> dist.Store:
    return dist.distributed_c10d._get_default_store()


def share_from_master(key: str, value: str | None) -> str:
    """Rank 0 publishes `value` under `key`; every rank returns it. Without a group, returns `value`."""
    if not dist.is_initialized():
        assert value is not None
        return value
    full = f"harness/share/{_ENV.restart_count}/{key}/{_next_generation('share:' + key)}"
    if is_master():
        assert value is not None
        _store().set(full, value)
        return value
    return _store().get(full).decode()


def _next_generation(name: str) -> int:
    _generations[name] += 1
    return _generations[name]


# ---------------------------------------------------------------------------------------------
# zero_first


@dataclass(frozen=True)
class _Place:
    """Who goes first for one scope, from this rank's point of view."""

    leads: bool  # this rank runs the body first
    master: int  # the global rank that goes first
    group: str  # key component shared by the master and its waiters
    waiters: int  # how many ranks wait for that master
    restart_count: int


def _topology() -> DistEnv:
    """The env `init` was given; else (a user's own init_process_group) the one torchrun/srun set."""
    world = dist.get_world_size()
    if _ENV.is_worker and _ENV.world_size == world:
        return _ENV
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
        return _Place(me == 0, 0, "all", world - 1, e.restart_count)
    # ranks of a node are contiguous under torchrun and srun's default block distribution; the master's
    # number is only used in messages, the key group is the node
    return _Place(e.local_rank == 0, me - e.local_rank, f"node{e.node_rank}", e.local_world_size - 1,
                  e.restart_count)


@contextmanager
def zero_first(
    name: str = "default",
    scope: Literal["local", "global"] = "local",
    dead_after: float = 30.0,
    timeout: float | None = None,
) -> Iterator[None]:
    """Run the body on the master first (local rank 0 per node, or rank 0), then on the others.

    scope="local": local rank 0 of each node goes first (node-local disks); "global": rank 0 only
    (a shared file system). The others wait outside any collective; if the master raises, dies, or
    stops its heartbeat for `dead_after` seconds, they raise ZeroFirstError carrying the reason
    instead of hanging. Before its first heartbeat the master gets max(dead_after, ARRIVE_S) to
    arrive. `timeout` bounds the whole wait (None: as long as the master is alive). Every rank must
    enter zero_first with a given name equally often (the n-th entries pair up). Without a process
    group, or with one process, the context does nothing.
    """
    if scope not in ("local", "global"):
        raise ValueError(f"zero_first scope={scope!r} is not 'local' or 'global'")
    if dead_after <= 0:
        raise ValueError(f"zero_first dead_after={dead_after} must be > 0 seconds")
    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield
        return
    place = _place(scope)
    prefix = f"harness/zero_first/{place.restart_count}/{name}/{_next_generation(name)}/{place.group}"
    store = _store()
    if place.leads:
        beat = _Heartbeat(store, prefix, period=min(HEARTBEAT_S, dead_after / 4))
        try:
            yield
        except BaseException as exc:
            beat.finish(_describe(exc))
            _wait_for_acks(store, prefix, place.waiters)
            raise
        beat.finish("ok")
    else:
        what = f"rank {place.master} (preparing {name!r})"
        _wait_for_master(store, prefix, what, dead_after, timeout)
        yield


def _describe(exc: BaseException) -> str:
    kind = type(exc)
    qual = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    text = str(exc)
    if len(text) > MESSAGE_MAX:
        text = text[:MESSAGE_MAX] + " [...]"
    return f"error: {qual}: {text}" if text else f"error: {qual}"


class _Heartbeat:
    """The master's side: beat n is key `<prefix>/beat/<n>`; the outcome is `<prefix>/status` + one beat.

    The first beat is written before the body starts (it also says "the master has arrived").
    """

    def __init__(self, store: dist.Store, prefix: str, period: float) -> None:
        self.store, self.prefix = store, prefix
        self._stop = threading.Event()
        self.beat()
        self._thread = threading.Thread(target=self._run, args=(period,), name="zero_first-heartbeat",
                                        daemon=True)
        self._thread.start()

    def beat(self) -> None:
        n = self.store.add(self.prefix + "/beats", 1)
        self.store.set(f"{self.prefix}/beat/{n}", b"")

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                self.beat()
            except Exception:  # the store went away: the waiters notice on their own
                return

    def finish(self, status: str) -> None:
        self._stop.set()
        self._thread.join(timeout=10.0)
        try:
            self.store.set(self.prefix + "/status", status)
            self.beat()  # wakes the waiters, who look at the status before waiting again
        except Exception as exc:
            log.warning(f"zero_first: could not publish {status[:200]!r} to the others: {exc}")


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


def _connect(store: dist.Store, connect_s: float | None = None) -> dist.Store:
    """A second connection to the store. A new connection to a dead store retries until the store's
    timeout (the process group's: minutes); `connect_s` shortens that, for a moment in which other
    threads' store calls would also give up sooner."""
    original = store.timeout
    if connect_s is not None:
        store.set_timeout(timedelta(seconds=connect_s))
    try:
        own = store.clone()
    finally:
        store.set_timeout(original)
    own.set_timeout(original)
    return own


def _spare_take(store: dist.Store | None) -> dist.Store | None:
    """The spare connection to `store`, if there is one (None: drop whatever there is)."""
    global _spare
    with _spare_lock:
        spare, _spare = _spare, None
    return spare[1] if spare is not None and spare[0] is store else None


def _spare_put(store: dist.Store, connection: dist.Store) -> None:
    global _spare
    with _spare_lock:
        if _spare is None:
            _spare = (store, connection)


def _watch(store: dist.Store, prefix: str, dead_after: float, events: queue.SimpleQueue[tuple[str, Any]]) -> None:
    """The waiter's helper thread: follow the master's beats on a connection of our own.

    Posts ("beat", n), then ("status", text) or ("lost", exception). A store call can block for
    ever when the store's host is frozen; then this thread is simply left behind.
    """
    try:
        # first on the process group's connection, already open: if the store's host has died this fails
        # at once, where a new connection would retry until the store's timeout
        n = store.add(prefix + "/beats", 0)
        events.put(("beat", n))
        # the blocking waits must not hold the process group's connection
        own = _spare_take(store) or _connect(store, connect_s=min(dead_after, CONNECT_S))
        while True:
            if own.check([prefix + "/status"]):
                status = own.get(prefix + "/status").decode()
                if status != "ok":
                    own.add(prefix + "/acks", 1)
                _spare_put(store, own)  # a thread that is left behind keeps its connection: never reused
                events.put(("status", status))
                return
            # the main thread keeps the clock; this timeout only ends a thread that was left behind
            own.wait([f"{prefix}/beat/{n + 1}"], timedelta(seconds=dead_after + 30.0))
            n += 1
            events.put(("beat", n))
    except Exception as exc:
        events.put(("lost", exc))


def _wait_for_master(store: dist.Store, prefix: str, what: str, dead_after: float,
                     timeout: float | None) -> None:
    events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    watcher = threading.Thread(target=_watch, args=(store, prefix, dead_after, events),
                               name="zero_first-watch", daemon=True)
    start = last_beat_at = time.monotonic()
    seen, contact = 0, False
    with _sigterm_raises(what) as known:
        watcher.start()
        while True:
            # no answer from the store yet: its host may be frozen (rank 0 under srun);
            # an answer but no beat yet: the master has not arrived
            allowance = dead_after if seen or not contact else max(dead_after, ARRIVE_S)
            limit = last_beat_at + allowance
            if timeout is not None:
                limit = min(limit, start + timeout)
            try:
                kind, value = events.get(timeout=max(limit - time.monotonic(), 0.0) + 0.01)
            except queue.Empty:
                now = time.monotonic()
                if timeout is not None and now - start >= timeout:
                    raise ZeroFirstError(f"{what} did not finish within timeout={timeout}s") from None
                if now - last_beat_at < allowance:
                    continue
                if seen:
                    raise ZeroFirstError(
                        f"{what} stopped responding: no heartbeat for {now - last_beat_at:.1f}s "
                        f"(dead_after={dead_after}s); it is frozen, dead, or cut off") from None
                if not contact:
                    raise ZeroFirstError(
                        f"{what} stopped responding: the store did not answer for {now - start:.1f}s "
                        f"(dead_after={dead_after}s); where rank 0 hosts it, as under srun, rank 0 is "
                        f"frozen") from None
                raise ZeroFirstError(f"{what} did not reach zero_first within {allowance:.1f}s of this rank; "
                                     f"it may be stuck or dead before it") from None
            contact = True
            if kind == "beat":
                if value > seen:
                    seen, last_beat_at = value, time.monotonic()
            elif kind == "status":
                if value == "ok":
                    return
                known.reason = f"{what} failed: {value.removeprefix('error: ')}"
                if "TORCHELASTIC_RUN_ID" in os.environ:
                    # let the master exit first: the agent then names it as the root cause and stops
                    # this rank (SIGTERM -> the same error) a moment later
                    time.sleep(LINGER_S)
                raise ZeroFirstError(known.reason)
            else:
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


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t

