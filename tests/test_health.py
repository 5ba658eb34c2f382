"""harness.health: the liveness protocol's pieces, judged on a clock the test owns, and the store
traffic of 512 ranks replayed against a real TCPStore from this one process."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as dist

from harness import health
from harness.health import Identity, Keys, Member, PeerWatch, Progress, Verdict


def beat(count: int, step: int = 0, phase: str = health.DATA, rank: int = 1, first: int = 0) -> dict[str, Any]:
    return {"rank": rank, "host": "h", "pid": 10 + rank, "start": 1.0, "step": step, "phase": phase, "first": first,
            "count": count}


def watch(dead_after: float = 5.0, stall_after: float = 10.0) -> PeerWatch:
    return PeerWatch(1, dead_after, stall_after, health.period_for(dead_after), since=0.0)


def test_every_key_lives_under_the_attempt() -> None:
    k = Keys("a1")
    keys = [k.beat(3), k.stack(3), k.news, k.verdict, k.reports, k.report(2), k.acks, k.zero_first("data", 1, "node0")]
    assert all(key.startswith("harness/a1/") for key in keys)
    assert len(set(keys)) == len(keys)
    assert Keys("a2").beat(3) != k.beat(3)


def test_a_silent_peer_is_dead_only_after_dead_after_and_a_period() -> None:
    w = watch(dead_after=5.0)  # period 1 s
    w.observe(beat(1), now=0.0)
    w.observe(beat(2), now=1.0)
    w.observe(beat(2), now=5.9)
    assert not w.is_dead(6.9)  # 5.9 s of silence since the last change: it may have beaten at 1.9
    assert w.is_dead(7.1) and w.silent_for(7.1) == pytest.approx(6.1)
    never = watch()
    assert not never.is_dead(5.9) and never.is_dead(6.1)  # a peer that never beat, counted from the start
    gone = watch()
    gone.observe(beat(1, phase=health.EXITED), now=0.0)
    assert not gone.is_dead(100.0)  # it said goodbye


def test_a_stall_is_a_live_peer_behind_us_that_does_not_move() -> None:
    w = watch(stall_after=10.0)
    mine = (5, health.STEP_ORDER[health.BACKWARD])  # we wait inside step 5's backward
    for t in range(30):  # beats go on (alive), the position stays at step 5's data
        w.observe(beat(t, step=5 if t else 4, phase=health.DATA), now=float(t))
    assert not w.is_stalled(10.5, mine, 0.0)  # 9.5 s at step 5 so far
    assert w.is_stalled(11.5, mine, 0.0)
    assert not w.is_stalled(11.5, (5, health.STEP_ORDER[health.DATA]), 0.0)  # we are not ahead: not waiting for it
    assert not w.is_stalled(11.5, None, 0.0)  # we are evaluating or saving ourselves
    assert not w.is_stalled(11.5, mine, 9.0)  # we only just got here (a position seen a period ago is stale)
    w.stalled = True
    assert not w.is_stalled(20.0, mine, 0.0)  # once per position
    w.observe(beat(31, step=6, phase=health.FORWARD), now=31.0)
    assert not w.stalled  # it moved: a new position


def test_the_first_step_eval_save_and_zero_first_are_never_a_stall() -> None:
    ahead = (100, 0)
    first = watch(stall_after=1.0)
    for t in range(10):  # a 10 s first step (compile, warm-up) of an attempt resumed at step 40
        first.observe(beat(t, step=40, phase=health.FORWARD, first=40), now=float(t))
    assert not first.is_stalled(10.0, ahead, 0.0)
    before = watch(stall_after=1.0)
    for t in range(10):  # still setting up: no training step yet
        before.observe(beat(t, step=3, phase=health.DATA, first=-1), now=float(t))
    assert not before.is_stalled(10.0, ahead, 0.0)
    for phase in (health.EVAL, health.SAVE, "zero_first:data", "compile", health.SETUP):
        w = watch(stall_after=1.0)
        w.observe(beat(1, step=3, phase=health.DATA), now=0.0)
        for t in range(1, 10):
            w.observe(beat(t + 1, step=4, phase=phase), now=float(t))
        assert not w.is_stalled(10.0, ahead, 0.0), phase


def test_the_report_line_names_rank_pid_host_step_phase_and_cause() -> None:
    subject = {"rank": 1, "host": "nodeb", "pid": 4242, "start": 1.0, "step": 60, "phase": "backward"}
    dead = Verdict("dead", subject, 15.2, "no heartbeat for 15.2 s", 0, "a")
    assert dead.line() == "rank 1 (pid 4242 on nodeb) lost at step 60 in backward: no heartbeat for 15.2 s"
    assert Verdict.from_json(dead.to_json()) == dead
    assert Verdict("stall", subject, 31, "no progress", 0, "a").line().startswith("rank 1 (pid 4242 on nodeb) stuck")
    assert "failed at step 60" in Verdict("failed", subject, 0, "ValueError: x", 1, "a").line()
    store = Verdict("store", {"rank": None}, 3, "lost contact with the store at h:1", 1, "a")
    assert store.line() == "lost contact with the store at h:1" and store.rank is None


@pytest.mark.parametrize(("hosts", "world"), [(1, 2), (1, 8), (2, 4), (4, 32), (3, 6)])
def test_everyone_is_watched_once_and_by_another_node_where_there_is_one(hosts: int, world: int) -> None:
    per = world // hosts
    host_of = [f"n{r // per}" for r in range(world)]
    shift = health.watch_shift(host_of)
    peers = [health.watched_by(r, world, shift) for r in range(world)]
    assert sorted(peers) == list(range(world)) and all(p != r for r, p in enumerate(peers))
    if hosts > 1:
        assert all(host_of[p] != host_of[r] for r, p in enumerate(peers))


class CountingStore:
    """A real TCPStore connection that counts the operations each rank makes."""

    def __init__(self, store: dist.Store, counts: Counter[str]) -> None:
        self._store, self.counts = store, counts

    def __getattr__(self, op: str) -> Any:
        method = getattr(self._store, op)

        def counted(*args: Any) -> Any:
            self.counts[op] += 1
            return method(*args)

        return counted


def replay(world: int, per_host: int, dead: int | None, rounds: int, dead_after: float = 5.0) -> dict[str, Any]:
    """`rounds` periods of `world` ranks on one real TCPStore; rank `dead` stops beating after round 2."""
    server = dist.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=30), wait_for_workers=False)
    keys, period = Keys("replay"), health.period_for(dead_after)
    hosts = [f"node{r // per_host}" for r in range(world)]
    shift = health.watch_shift(hosts)
    counts = [Counter[str]() for _ in range(world)]
    members = [Member(CountingStore(server, counts[r]), keys, Identity(r, hosts[r], 1000 + r, 0.0),
                      health.watched_by(r, world, shift)) for r in range(world)]
    watches = [PeerWatch(m.peer, dead_after, 300.0, period, since=0.0) for m in members]
    progress = Progress()
    for m in members:  # as the watchdog starts: one beat each, then the rounds
        m.beat(progress)
    per_round: list[list[int]] = []
    news_seen = [0] * world
    heard: dict[int, Verdict] = {}
    for k in range(rounds):
        now = k * period
        before = [sum(c.values()) for c in counts]
        for r, m in enumerate(members):
            if r == dead and k > 2:
                continue
            record, news = m.round(progress)
            watches[r].observe(record, now)
            if news != news_seen[r]:
                news_seen[r] = news
                verdict, _ = m.read_news(0)
                assert verdict is not None
                heard[r] = verdict
            elif watches[r].is_dead(now) and r not in heard:
                heard[r] = m.post_verdict(Verdict("dead", record or {}, watches[r].silent_for(now), "silent", r,
                                                  keys.attempt))
        per_round.append([sum(c.values()) - b for c, b in zip(counts, before, strict=True)])
    return {"per_round": per_round, "heard": heard}


@pytest.mark.timeout(120)
def test_store_traffic_per_rank_does_not_grow_with_the_world_size() -> None:
    """Every rank makes 3 operations a period (beat, read its peer, read the news), at 8 ranks as at 512:
    the store's load grows linearly with the ranks, each rank's does not. (Counts, not timings.)"""
    for world, per_host in ((8, 4), (512, 8)):
        quiet = replay(world, per_host, dead=None, rounds=4)["per_round"][1:]  # round 0 also checks for the peer's key
        assert {n for row in quiet for n in row} == {3}, world


@pytest.mark.timeout(120)
def test_a_rank_that_stops_beating_is_named_once_and_everyone_hears_it_next_period() -> None:
    world, dead = 512, 77
    out = replay(world, 8, dead=dead, rounds=12)
    heard = out["heard"]
    assert set(heard) == set(range(world)) - {dead}
    assert {v.rank for v in heard.values()} == {dead}
    watcher = next(r for r in range(world) if health.watched_by(r, world, 8) == dead)
    assert {v.reporter for v in heard.values()} == {watcher}  # its one watcher, on another node
    rows = out["per_round"]
    # the verdict costs its reader 2 more operations (check, get) + the reports count, once
    assert max(max(row) for row in rows) <= 3 + 4


@pytest.mark.timeout(60)
def test_a_census_tells_every_rank_beating_on_from_a_lost_or_leaving_one() -> None:
    """On a real TCPStore: no census while a rank has never beaten; every rank but the asker must beat
    between two censuses (the asker's own count is its business), and one that said goodbye is leaving."""
    server = dist.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=30), wait_for_workers=False)
    keys, world = Keys("census"), 4
    members = [Member(server, keys, Identity(r, "h", 100 + r, 0.0), (r + 1) % world) for r in range(world)]
    progress = Progress()
    for m in members[:3]:
        m.beat(progress)
    assert members[0].census(world) is None  # rank 3 has not beaten yet
    members[3].beat(progress)
    before = members[0].census(world)
    assert before == {r: (1, health.SETUP) for r in range(world)}
    for m in members[1:3]:
        m.beat(progress)
    assert not health.all_alive(before, members[0].census(world), me=0)  # rank 3 has not beaten since
    members[3].beat(progress)
    assert health.all_alive(before, members[0].census(world), me=0)
    assert not health.all_alive(before, members[1].census(world), me=1)  # rank 0 did not beat again
    progress.phase = health.EXITED
    members[0].beat(progress)
    assert not health.all_alive(before, members[1].census(world), me=1)  # rank 0 beat, to say goodbye
