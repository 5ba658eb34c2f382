"""The watchdog every rank runs for the whole run, and what a rank does about a lost peer.

Owns the two threads of the liveness protocol (harness/health.py) and the actions on a verdict:
- the **round** thread beats, reads its peer and the news every period, on the one extra store
  connection this rank opens; it judges its peer (dead, gone, stalled) and posts what it finds;
- the **clock** thread only watches the round thread: a store call can block for ever when the
  store's host is frozen, whatever its timeout, so "no round finished for dead_after" is how a
  rank learns that it lost the store;
- on a verdict (`_act`), once per rank: fence a frozen peer on this host (harness/fencing.py:
  SIGKILL, checking pid and start time so no other process is hit), log ONE report, the first
  reporter records it (harness/incidents.py: `<run dir>/incidents.jsonl`), write torchrun's error
  file so the agent names the cause, let the store's host (rank 0) linger until the others have
  read the verdict, and leave with EXIT_PEER_LOST (a peer's user error: 2; Ctrl-C: 130,
  harness/failures.py) even when the main thread is blocked inside a collective (os._exit: no
  checkpoint is written on the way out).
- stacks: a rank its watcher finds holding the others up is asked (through the news) for its
  threads' stacks; it dumps them (faulthandler, which needs no GIL) into its own log and the
  store, and the watcher's report carries the stuck frame.

The main thread's side is `watching()`: its error path asks `explain()` before printing anything,
so a gloo "connection closed" caused by a lost peer becomes that peer's one-line report.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch.distributed as dist

from harness import dist as hdist
from harness import failures, fencing, health, incidents, logs
from harness.config import ON_STALL
from harness.health import Identity, Keys, Member, PeerWatch, Progress, Verdict

EXIT_PEER_LOST = failures.EXIT_PEER_LOST
GRACE_S = 2.0  # how long a rank whose main thread is not handling the verdict waits before os._exit
LEAVING_S = 10.0  # a main thread that is already leaving gets this long before os._exit
# what a collective raises when a peer went away (gloo: "Connection reset by peer", "Connection closed by
# peer", "Application timeout caused pair closure"; NCCL: "remote process exited"); torch's Dist*Error too
COMM_ERROR = re.compile(r"\b(gloo|nccl|connection (reset|closed|refused)|socket|pair closure|timed out|"
                        r"broken pipe|remote process exited)\b", re.I)

log = logging.getLogger("harness")


class PeerLostError(RuntimeError):
    """This rank stopped because a peer (or the store) was lost; carries the verdict."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.line())
        self.verdict = verdict


@dataclass(frozen=True)
class WatchdogConfig:
    dead_after: float = 15.0  # dist.dead_after
    stall_after: float = 300.0  # dist.stall_after
    on_stall: str = "report"  # dist.on_stall

    def __post_init__(self) -> None:
        if self.dead_after <= 0 or self.stall_after <= 0:
            raise ValueError(f"dead_after={self.dead_after} and stall_after={self.stall_after} must be > 0 seconds")
        if self.on_stall not in ON_STALL:
            raise ValueError(f"on_stall={self.on_stall!r} is not one of {', '.join(ON_STALL)}")

    @property
    def period(self) -> float:
        return health.period_for(self.dead_after)


def _store_address(store: Any) -> str:
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return f"{store.host}:{store.port}" if isinstance(store, dist.TCPStore) else type(store).__name__


class Watchdog:
    """This rank's watchdog. Made by `start()` (a collective); `progress` is what the loop sets."""

    def __init__(self, config: WatchdogConfig, me: Identity, table: list[dict[str, Any]], attempt: str,
                 store: Any, agent_store: bool) -> None:
        self.config, self.me, self.table = config, me, table
        self.keys = Keys(attempt)
        self.progress = Progress()
        self.run_dir: Path | None = None
        world = len(table)
        peer = health.watched_by(me.rank, world, health.watch_shift([t["host"] for t in table]))
        self.address = _store_address(store)
        host0 = table[0]
        self.agent_store = agent_store
        self.store_host = (f"the elastic agent on {host0['host']}" if agent_store
                           else f"rank 0, pid {host0['pid']} on {host0['host']}")
        # rank 0 hosts the store (srun, or torchrun without the agent's store): when it leaves, the
        # store goes with it, so it lingers until the others have read the verdict
        self.hosts_store = me.rank == 0 and not agent_store
        # the one extra connection, for the threads; the main thread's own calls (fail, stop) go through
        # the process group's, so no connection is ever used by two threads at once
        self._own = store.clone()
        self.member = Member(self._own, self.keys, me, peer)
        self._main = Member(store, self.keys, me, peer)
        now = time.monotonic()
        self.watch = PeerWatch(peer, config.dead_after, config.stall_after, config.period, since=now)
        self.verdict: Verdict | None = None
        self.leaving = False  # the main thread is handling an error (or leaving) itself
        self.failed = False  # ... one of this rank's own, which it has told the others (fail())
        self._news_seen, self._reports_seen = 0, 0
        self._last_ok = now
        self._pending_stall: tuple[Verdict, int] | None = None  # waiting a few rounds for the peer's stack
        self._mine: tuple[tuple[int, int] | None, float] = (None, now)  # our own position, and since when
        # explain()'s census: asked by the main thread, taken by the round thread on its own connection
        self._census_asked, self._all_alive = threading.Event(), threading.Event()
        self._census_since: dict[int, tuple[int, str]] | None = None
        self._acted = threading.Lock()
        self._stopping, self._done = threading.Event(), threading.Event()
        self._threads = [threading.Thread(target=self._rounds, name="harness-watchdog", daemon=True),
                         threading.Thread(target=self._clock, name="harness-watchdog-clock", daemon=True)]

    # ------------------------------------------------------------------ threads
    def _start_threads(self) -> None:
        self.member.beat(self.progress)
        for t in self._threads:
            t.start()

    def _rounds(self) -> None:
        period = self.config.period
        while not self._stopping.wait(period):
            try:
                record, news = self.member.round(self.progress)
                self._last_ok = time.monotonic()
                self._judge(record, self._last_ok)
                if news != self._news_seen:
                    self._news_seen = news
                    self._read_news()
                if self._census_asked.is_set() and self.verdict is None:
                    self._census()
            except Exception as exc:  # the store went away (its host died): a verdict of our own
                if not self._stopping.is_set():
                    self._lost_store(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                return
        with contextlib.suppress(Exception):  # say goodbye, so the watcher does not call us dead
            self.progress.phase = health.EXITED
            self.member.beat(self.progress)

    def _clock(self) -> None:
        limit = self.config.dead_after + self.config.period
        while not self._stopping.wait(self.config.period / 2):
            silent = time.monotonic() - self._last_ok
            if silent > limit and self.verdict is None:
                self._lost_store(f"no answer for {silent:.1f} s")
                return

    def _judge(self, record: dict[str, Any] | None, now: float) -> None:
        watch = self.watch
        watch.observe(record, now)
        position = self.progress.position()
        if position != self._mine[0]:
            self._mine = (position, now)
        if self._pending_stall is not None:
            self._finish_stall(now)
        if watch.exited or self.verdict is not None or self.progress.phase == health.TEARDOWN:
            return  # in teardown, peers leave: the barrier before it settles who got there
        if watch.is_dead(now):
            self._post(self._verdict("dead", watch, f"no heartbeat for {watch.silent_for(now):.1f} s "
                                     "(frozen, dead or cut off)", watch.silent_for(now)))
        elif watch.last is not None and fencing.gone(watch.last, self.me.host):  # known at once
            self._post(self._verdict("gone", watch, "its process is gone", watch.silent_for(now)))
        elif watch.is_stalled(now, *self._mine):
            watch.stalled = True
            asking = self._verdict("ask", watch, "stacks, please", now - watch.position_at)
            self.member.post_report(asking)  # the stuck rank reads the news too, and dumps its stacks
            self._pending_stall = (replace(asking, kind="stall"), 0)

    def _finish_stall(self, now: float) -> None:
        """A stall report waits up to 3 rounds for the stuck rank's own stack dump."""
        verdict, tries = self._pending_stall  # type: ignore[misc]
        if not self.watch.stalled:  # it moved after all (observe() clears the flag): no report
            self._pending_stall = None
            return
        stack_key = self.keys.stack(self.watch.rank)
        dumped = self._own.check([stack_key])
        if not dumped and tries < 3:
            self._pending_stall = (verdict, tries + 1)
            return
        self._pending_stall = None
        stack = self._own.get(stack_key).decode() if dumped else ""
        seconds = now - self.watch.position_at
        verdict = replace(verdict, stack=stack, seconds=seconds,
                          cause=f"no progress for {seconds:.1f} s while rank {self.me.rank} waits for it "
                                f"(dist.stall_after={self.config.stall_after:g} s)")
        if self.config.on_stall == "stop":
            self._post(verdict)
        else:
            self.member.post_report(verdict)

    def _census(self) -> None:
        """explain() asked: is every other rank still beating? Counts from one census to a later one
        tell; the news is read once more, so a verdict posted meanwhile is never passed over."""
        counts = self.member.census(len(self.table))
        if counts is None:
            return
        if self._census_since is None:
            self._census_since = counts
        elif health.all_alive(self._census_since, counts, self.me.rank) \
                and self._own.add(self.keys.news, 0) == self._news_seen:
            self._all_alive.set()

    def _dump_stacks(self, asked_by: int) -> None:
        """A watcher finds us holding the others up: every thread's stack into our own log, the main
        thread's into the store, where the watcher picks it up for its report."""
        everything, main = incidents.thread_stacks()
        logs.emit_unblocked(logging.WARNING, f"rank {self.me.rank} is holding the others up (rank {asked_by} asked "
                            f"for its stacks) at step {self.progress.step} in {self.progress.phase}; this "
                            f"process's threads:\n{everything}")
        self._own.set(self.keys.stack(self.me.rank), main[: health.STACK_MAX])

    def _verdict(self, kind: str, watch: PeerWatch, cause: str, seconds: float) -> Verdict:
        subject = watch.last or {**self.table[watch.rank], "step": 0, "phase": ""}
        return Verdict(kind, {k: subject[k] for k in ("rank", "host", "pid", "start", "step", "phase")},
                       seconds, cause, self.me.rank, self.keys.attempt, time=time.time())

    def _post(self, verdict: Verdict) -> None:
        won = self.member.post_verdict(verdict)
        self._act(won, reporter=won == verdict)

    def _read_news(self) -> None:
        verdict, reports = self.member.read_news(self._reports_seen)
        self._reports_seen += len(reports)
        for report in reports:
            if report.kind != "ask":
                self._report(report, first=report.reporter == self.me.rank)
            elif report.rank == self.me.rank:
                self._dump_stacks(asked_by=report.reporter)
        if verdict is not None:
            self._act(verdict, reporter=verdict.reporter == self.me.rank)

    def _lost_store(self, why: str) -> None:
        if self.progress.phase in (health.TEARDOWN, health.EXITED):
            return  # past the last barrier the store's host may leave first: the main thread finishes
        cause = f"lost contact with the store at {self.address} (hosted by {self.store_host}): {why}"
        self._act(Verdict("store", {"rank": None}, time.monotonic() - self._last_ok, cause, self.me.rank,
                          self.keys.attempt, time=time.time()), reporter=True, shared=False)

    # ------------------------------------------------------------------ actions
    def _report(self, verdict: Verdict, first: bool) -> None:
        level, text = failures.report(verdict)
        logs.emit_unblocked(level, text)
        if first and level == logging.ERROR:  # a peer's Ctrl-C is no incident
            incidents.append(self.run_dir, verdict)

    def _act(self, verdict: Verdict, reporter: bool, shared: bool = True) -> None:
        """Once per rank: fence, report, acknowledge, linger if we may host the store, leave."""
        if not self._acted.acquire(blocking=False):
            return
        # a frozen peer on this host cannot leave by itself; the store's host only when stopped, not slow
        fenced = None
        if shared and verdict.kind == "dead" and fencing.kill(verdict.subject, self.me.host):
            fenced = verdict.subject
        elif verdict.kind == "store" and not self.agent_store \
                and fencing.kill(self.table[0], self.me.host, only_if_stopped=True):
            fenced = self.table[0]
        if fenced is not None:
            logs.emit_unblocked(logging.INFO, f"rank {self.me.rank}: killed frozen rank {fenced['rank']} "
                                              f"(pid {fenced['pid']})")
        if not self.failed:  # also when the main thread waits in explain(): its PeerLostError says nothing
            self._report(verdict, first=reporter and shared)
            incidents.write_error_file(verdict)
        if not shared and reporter:
            incidents.append(self.run_dir, verdict)
        self.verdict = verdict  # after the report: a main thread waiting for it may end the process
        if shared:
            with contextlib.suppress(Exception):
                self._own.add(self.keys.acks, 1)
                if self.hosts_store:
                    self._linger(self._own, expected=len(self.table) - (verdict.kind in ("dead", "gone")))
        if self._done.wait(LEAVING_S if self.leaving else GRACE_S):
            return  # the main thread finished on its own
        # every handler flushed its record already (the console's, if it could)
        os._exit(failures.exit_code(verdict))

    def _linger(self, store: Any, expected: int) -> None:
        deadline = time.monotonic() + 2 * self.config.period + 1.0
        while time.monotonic() < deadline and store.add(self.keys.acks, 0) < expected:
            time.sleep(0.02)

    # ------------------------------------------------------------------ the main thread's side
    def beat_now(self) -> None:
        """Publish the phase at once, from the main thread: before a body that may take long, so a
        report about this rank says where it was (zero_first's master)."""
        self.member.count += 1  # one sequence for the beats of both connections
        with contextlib.suppress(Exception):
            self._main.store.set(self.keys.beat(self.me.rank),
                                 health.encode_beat(self.me, self.progress, self.member.count))

    def explain(self, exc: BaseException, peer_caused: bool = False) -> Verdict | None:
        """Called by the main thread's error path: the verdict that explains `exc`, if any.

        A collective that failed because a peer went away is usually raised before the watchdog has
        a verdict: wait for one (at most dead_after and three periods) when the caller knows a peer
        caused it (zero_first: the master posts its own failure), or when the error looks like it
        until a census finds every other rank beating on (a collective's timeout with every rank
        alive, a mismatched collective: this rank's own error, said within a few periods)."""
        self.leaving = True
        comm = isinstance(exc, dist.DistError) or COMM_ERROR.search(str(exc)) is not None
        if self.verdict is None and (peer_caused or comm):
            if not peer_caused:
                self._census_asked.set()
            deadline = time.monotonic() + self.config.dead_after + 3 * self.config.period
            while self.verdict is None and not self._all_alive.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
        return self.verdict

    def fail(self, exc: BaseException) -> None:
        """This rank raised: tell the others now, rather than let them wait in a collective."""
        self.leaving = self.failed = True
        if self.verdict is not None:
            return
        verdict = failures.failed(exc, self.me, self.progress.step, self.progress.phase, self.keys.attempt,
                                  time.time())
        with contextlib.suppress(Exception):
            if verdict.extra["interrupted"]:  # Ctrl-C in zero_first's wait: its helper thread blocks this connection
                self._main.store = self._main.store.clone()
            won = self._main.post_verdict(verdict)
            if won == verdict and not verdict.extra["interrupted"]:  # every rank is, at once: no incident
                incidents.append(self.run_dir, verdict)
            self.verdict = won
            if self.hosts_store:
                self._linger(self._main.store, expected=len(self.table) - 1)

    def stop(self) -> None:
        """Stop beating (the last beat says `exited`) and let any pending action know we are done."""
        if self.leaving and self._acted.acquire(blocking=False):
            with contextlib.suppress(Exception):  # leaving on an error of our own: a lingering store host need not wait
                self._main.store.add(self.keys.acks, 1)
        self._stopping.set()
        self._done.set()
        for t in self._threads:
            t.join(timeout=2 * self.config.period + 1.0)


_current: Watchdog | None = None


def progress() -> Progress:
    """The running watchdog's Progress, or a detached one (setting it then costs nothing and does nothing)."""
    return _current.progress if _current is not None else Progress()


def start(config: WatchdogConfig) -> Watchdog | None:
    """Start this rank's watchdog (every rank at once: it is a collective). None without a group."""
    global _current
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    proc = psutil.Process()
    me = Identity(dist.get_rank(), socket.gethostname(), proc.pid, proc.create_time())
    entry: dict[str, Any] = {"rank": me.rank, "host": me.host, "pid": me.pid, "start": me.start}
    if me.rank == 0:  # the attempt id: new at every rendezvous, the same on every rank
        entry["attempt"] = f"{int(time.time())}-{os.urandom(4).hex()}"
    table: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(table, entry)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    wd = Watchdog(config, me, table, table[0]["attempt"], hdist.store(), agent_store=agent)
    wd._start_threads()
    _current = wd
    return wd


def stop() -> None:
    global _current
    wd, _current = _current, None
    if wd is not None:
        wd.stop()


@contextlib.contextmanager
def watching(config: WatchdogConfig | None) -> Iterator[Watchdog | None]:
    """Run the body with this rank's watchdog (None: without one). On an error, a lost peer that
    explains it becomes PeerLostError (no traceback wall); any other error is told to the others.
    On success, every rank meets at a barrier before anyone stops watching or leaves."""
    wd = start(config) if config is not None else None
    try:
        yield wd
    except BaseException as exc:
        if wd is not None:
            from harness.zero_first import ZeroFirstError  # its master's own verdict names the cause

            peer_caused = isinstance(exc, ZeroFirstError | PeerLostError)
            verdict = wd.explain(exc, peer_caused)
            if verdict is not None and verdict.rank != wd.me.rank:
                raise PeerLostError(verdict) from None
            if not peer_caused:
                wd.fail(exc)
        raise
    else:
        if wd is not None:
            wd.progress.phase = health.TEARDOWN
        hdist.meet()
    finally:
        if wd is not None and _current is wd:
            stop()


@contextlib.contextmanager
def scoped(config: WatchdogConfig | None = None) -> Iterator[Watchdog]:
    """The running watchdog; or, outside a harness session (a user's own process group), one that
    lives for the body only. Every rank must enter (starting one is a collective)."""
    if _current is not None:
        yield _current
        return
    wd = start(config or WatchdogConfig())
    assert wd is not None, "scoped() needs a process group of more than one rank"
    try:
        yield wd
    finally:
        stop()
