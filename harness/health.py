"""The liveness protocol: what every rank publishes, whom it watches, and how a loss is judged.

Owns the store keys of the protocol and of `zero_first` (built here, in `Keys`, and nowhere else),
the heartbeat record, one rank's per-period round (`Member.round`: one set, one get, one add, at
any world size), the judging of the one peer a rank watches (`PeerWatch`, pure: it is given the
time), and the verdict with its one-line report. The threads that run the protocol, and what a
rank does about a verdict (report, fence, leave), live in harness/watchdog.py.

Per attempt (an id rank 0 draws and every rank learns when the watchdog starts, so keys that an
earlier attempt left in a store that outlives it are never read):
- rank r writes `beat/<r>` every period: rank, host, pid, process start time, step, phase, a count;
- rank r watches `(r + shift) % world`; shift = the number of ranks on rank 0's host (so the peer is
  on another node where there is one) or 1 on one node. One shift for everybody is a permutation:
  every rank is watched by exactly one other;
- whoever has something to say writes `verdict` (the first writer wins: compare_set) or
  `report/<n>` (stalls, which stop nobody by default), then bumps `news`, which every rank reads
  each period, so store traffic per rank per period does not grow with the world size.
- a census (`Member.census`, `all_alive`): every rank's beat, read only when a rank's collective failed
  and it must tell a lost peer (a verdict will come) from none (every other rank beats on: the error is
  its own); one multi_get a period, for those few periods only.

The step loop only sets `Progress.step` and `Progress.phase` (attribute stores of constants: no
store call, no device sync, no lock, no allocation). A rank holds the others up when its position
(step, then the order of its phase inside a step) is behind its watcher's and has not moved for
`stall_after` seconds while its heartbeat goes on. Step 0 of an attempt, `eval`, `save`, `compile`
and `zero_first:*` are never a stall: only the four training phases below are judged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

# phases; the first four are a training step, in this order
DATA, FORWARD, BACKWARD, OPTIM = "data", "forward", "backward", "optim"
SETUP, EVAL, SAVE, TEARDOWN, EXITED = "setup", "eval", "save", "teardown", "exited"
STEP_ORDER = {DATA: 0, FORWARD: 1, BACKWARD: 2, OPTIM: 3}
STACK_MAX = 6000  # characters of a stack dump carried in the store and in reports


def period_for(dead_after: float) -> float:
    """Heartbeat and watching period: at most 1 s, and at least five beats within dead_after."""
    return min(1.0, dead_after / 5)


class Progress:
    """Where this rank's main thread is: written by the loop, read by the watchdog thread."""

    __slots__ = ("step", "phase", "first")

    def __init__(self) -> None:
        self.step = 0
        self.phase = SETUP
        self.first = -1  # the step this attempt's training started from (after a resume); -1 before

    def position(self) -> tuple[int, int] | None:
        """(step, order of the phase inside it) inside a training step; None elsewhere."""
        order = STEP_ORDER.get(self.phase)
        return None if order is None else (self.step, order)


@dataclass(frozen=True)
class Identity:
    """Who a rank is, for reports and for fencing (pid + start time name one process on one host)."""

    rank: int
    host: str
    pid: int
    start: float  # the process's start time (psutil's create_time)


@dataclass(frozen=True)
class Keys:
    """Every store key of the liveness protocol and of zero_first, under one attempt."""

    attempt: str

    @property
    def root(self) -> str:
        return f"harness/{self.attempt}"

    def beat(self, rank: int) -> str:
        return f"{self.root}/beat/{rank}"

    def stack(self, rank: int) -> str:
        return f"{self.root}/stack/{rank}"

    @property
    def news(self) -> str:
        return f"{self.root}/news"

    @property
    def verdict(self) -> str:
        return f"{self.root}/verdict"

    @property
    def reports(self) -> str:
        return f"{self.root}/reports"

    def report(self, n: int) -> str:
        return f"{self.root}/report/{n}"

    @property
    def acks(self) -> str:
        return f"{self.root}/acks"

    def zero_first(self, name: str, generation: int, group: str) -> str:
        return f"{self.root}/zero_first/{name}/{generation}/{group}"


def encode_beat(me: Identity, progress: Progress, count: int) -> str:
    return json.dumps({"rank": me.rank, "host": me.host, "pid": me.pid, "start": me.start,
                       "step": progress.step, "phase": progress.phase, "first": progress.first, "count": count})


@dataclass(frozen=True)
class Verdict:
    """What happened to whom, as the reporter saw it. kind: dead (no heartbeat), gone (its process
    ended, seen on its host), failed (it raised), stall (alive, holding the others up), ask (a
    watcher asks the rank it finds stalled for its stacks), store (this rank lost contact with the
    store; never written to the store)."""

    kind: str
    subject: dict[str, Any]  # the lost rank's last heartbeat (rank, host, pid, start, step, phase), or the store
    seconds: float  # silence (dead, store) or how long it has not moved (stall)
    cause: str  # the human part: "no heartbeat for 15.2 s", "ValueError: ...", ...
    reporter: int
    attempt: str
    stack: str = ""
    time: float = 0.0  # wall clock at the reporter, for incidents.jsonl
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int | None:
        return self.subject.get("rank")

    def line(self) -> str:
        """The one line every survivor logs and the launcher prints."""
        s = self.subject
        if self.kind == "store":
            return self.cause
        who = f"rank {s['rank']} (pid {s['pid']} on {s['host']})"
        where = f"at step {s['step']}" + (f" in {s['phase']}" if s.get("phase") else "")
        if self.kind == "stall":
            return f"{who} stuck {where}: {self.cause}"
        if self.kind == "failed":
            return f"{who} failed {where}: {self.cause}"
        return f"{who} lost {where}: {self.cause}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Verdict:
        return cls(**json.loads(text))


@dataclass
class PeerWatch:
    """The watcher's memory of its one peer, judged on the watcher's own clock (hosts' clocks differ)."""

    rank: int
    dead_after: float
    stall_after: float
    period: float
    since: float  # when watching began: a peer that never beats is dead after dead_after from here
    last: dict[str, Any] | None = None  # the peer's latest heartbeat record
    count_at: float = 0.0  # when its beat count last changed
    position: tuple[int, int] | None = None
    position_at: float = 0.0  # when its training position last changed
    stalled: bool = False  # a stall of the current position was already reported

    def observe(self, record: dict[str, Any] | None, now: float) -> None:
        if record is None:
            return
        if self.last is None or record["count"] != self.last["count"]:
            self.count_at = now
        order = STEP_ORDER.get(record["phase"])
        position = None if order is None else (record["step"], order)
        if position != self.position:
            self.position, self.position_at, self.stalled = position, now, False
        self.last = record

    @property
    def exited(self) -> bool:
        return self.last is not None and self.last["phase"] == EXITED

    def silent_for(self, now: float) -> float:
        return now - (self.count_at if self.last is not None else self.since)

    def is_dead(self, now: float) -> bool:
        """No new beat for dead_after, counted from the first round that saw the last one, plus a
        period: the peer may have beaten just before freezing, so we never call it early."""
        return not self.exited and self.silent_for(now) > self.dead_after + self.period

    def is_stalled(self, now: float, mine: tuple[int, int] | None, mine_since: float) -> bool:
        """Alive, inside a training step after its first one, behind us, and neither it nor we have
        moved for stall_after (we wait for it; a position we saw a period ago is no proof alone)."""
        if self.stalled or self.position is None or mine is None or self.last is None:
            return False
        if not 0 <= self.last["first"] < self.position[0]:
            return False  # the first step of this attempt (compile, warm-up, first batch) is never a stall
        waited = min(now - self.position_at, now - mine_since)
        return self.position < mine and waited > self.stall_after


class Member:
    """One rank's side of the protocol over any store (a real TCPStore in tests, with 512 of these)."""

    def __init__(self, store: Any, keys: Keys, me: Identity, peer: int) -> None:
        self.store, self.keys, self.me, self.peer = store, keys, me, peer
        self.count = 0
        self.peer_seen = False

    def beat(self, progress: Progress) -> None:
        self.count += 1
        self.store.set(self.keys.beat(self.me.rank), encode_beat(self.me, progress, self.count))

    def round(self, progress: Progress) -> tuple[dict[str, Any] | None, int]:
        """Beat, read the peer's beat, read the news counter: three operations.

        Until the peer's first beat is there, a `check` replaces the `get` (a get of a missing key
        would block until the store's timeout)."""
        self.beat(progress)
        record = None
        key = self.keys.beat(self.peer)
        if self.peer_seen or self.store.check([key]):
            self.peer_seen = True
            record = json.loads(self.store.get(key))
        return record, self.store.add(self.keys.news, 0)

    def census(self, world: int) -> dict[int, tuple[int, str]] | None:
        """Every rank's beat count and phase; None while some rank has not beaten yet (a get of a missing
        key would block until the store's timeout)."""
        keys = [self.keys.beat(r) for r in range(world)]
        if not self.store.check(keys):
            return None
        records = [json.loads(v) for v in self.store.multi_get(keys)]
        return {r["rank"]: (r["count"], r["phase"]) for r in records}

    def post_verdict(self, verdict: Verdict) -> Verdict:
        """The first verdict of the attempt wins; returns the one that did."""
        text = verdict.to_json()
        won = self.store.compare_set(self.keys.verdict, "", text)
        self.store.add(self.keys.news, 1)
        return verdict if won.decode() == text else Verdict.from_json(won)

    def post_report(self, verdict: Verdict) -> None:
        n = self.store.add(self.keys.reports, 1)
        self.store.set(self.keys.report(n), verdict.to_json())
        self.store.add(self.keys.news, 1)

    def read_news(self, reports_seen: int) -> tuple[Verdict | None, list[Verdict]]:
        """After `news` moved: the verdict if there is one, and reports after the first `reports_seen`."""
        verdict = None
        if self.store.check([self.keys.verdict]):
            verdict = Verdict.from_json(self.store.get(self.keys.verdict))
        count = self.store.add(self.keys.reports, 0)
        reports = [Verdict.from_json(self.store.get(self.keys.report(n))) for n in range(reports_seen + 1, count + 1)]
        return verdict, reports


def all_alive(before: dict[int, tuple[int, str]], now: dict[int, tuple[int, str]], me: int) -> bool:
    """Every rank but `me` beat since the census `before` and is not leaving: no peer is lost."""
    return all(now[r][0] > count and now[r][1] != EXITED for r, (count, _) in before.items() if r != me)


def watch_shift(hosts: list[str]) -> int:
    """The ring's shift from every rank's host: the ranks on rank 0's host, or 1 when that is all of them."""
    shift = sum(1 for h in hosts if h == hosts[0])
    return shift if shift < len(hosts) else 1


def watched_by(rank: int, world: int, shift: int) -> int:
    return (rank + shift) % world
