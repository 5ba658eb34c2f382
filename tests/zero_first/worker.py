"""One rank of the zero_first tests (tests/test_zero_first.py).

Started either as a plain process with Slurm step variables (srun's shape: rank 0 hosts the store)
or by torchrun (the agent hosts it); `harness.env.detect` tells which. Each rank writes
`<out>/rank<r>-a<restart>.json` with its outcome and the wall time it was known; the master of a
scope writes `<out>/event-<rank>.json` just before it raises, freezes or kills itself, and every body
appends `<tag> <rank> <node> start|end <time>` to `<out>/body.log` (tag: scope and round).

Scenarios: raise, hang (SIGSTOP), kill (SIGKILL) and slow are what the master does in its body;
restart raises in attempt 0 and succeeds after; nodes fetches `<url>/local.bin` with scope local into
$HARNESS_CACHE, then `<url>/global.bin` with scope global into --shared-cache, each for --rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def _append(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", required=True, choices=["raise", "hang", "kill", "slow", "restart", "nodes"])
    p.add_argument("--out", required=True)
    p.add_argument("--dead-after", type=float, default=30.0)
    p.add_argument("--body-s", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--url", default="")
    p.add_argument("--sha256", default="")
    p.add_argument("--shared-cache", default="")
    a = p.parse_args()

    from harness import dist as hdist
    from harness import watchdog
    from harness.data.cache import fetch
    from harness.env import detect
    from harness.zero_first import ZeroFirstError, zero_first

    env = detect(os.environ)
    out = Path(a.out)
    hdist.init(env, backend="gloo", timeout_s=60.0, gpu=None)
    # the attempt: torchrun's restart count, or ZF_ATTEMPT where a test replays a membership change
    attempt = int(os.environ.get("ZF_ATTEMPT", env.restart_count))
    tag = f"rank{env.rank}-a{attempt}"

    def record(outcome: str, message: str = "") -> None:
        result = {"rank": env.rank, "node": env.node_rank, "restart": attempt, "pid": os.getpid(),
                  "outcome": outcome, "message": message, "t": time.time()}
        (out / f"{tag}.json").write_text(json.dumps(result))

    def event(what: str) -> None:
        (out / f"event-{env.rank}.json").write_text(json.dumps({"what": what, "pid": os.getpid(),
                                                               "t": time.time()}))

    def body(scope: str, round_: int) -> None:
        leads = env.local_rank == 0 if scope == "local" else env.rank == 0
        mark = f"{scope}{round_} {env.rank} {env.node_rank}"
        _append(out / "body.log", f"{mark} start {time.time()}")
        if leads and (a.scenario == "raise" or a.scenario == "restart" and attempt == 0):
            event("raise")
            raise ValueError(f"disk quota exceeded while preparing on rank {env.rank}")
        if leads and a.scenario == "hang":
            event("stop")
            os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(3600)
        if leads and a.scenario == "kill":
            event("kill")
            os.kill(os.getpid(), signal.SIGKILL)
        if leads and (a.scenario == "slow" and round_ == 0 or a.scenario == "restart"):
            time.sleep(a.body_s)  # restart: the others look at the store while the master is still busy
        if a.scenario == "nodes":
            root = os.environ["HARNESS_CACHE"] if scope == "local" else a.shared_cache
            fetch(f"{a.url}/{scope}.bin", a.sha256, root)
        _append(out / "body.log", f"{mark} end {time.time()}")

    scopes = ["local", "global"] if a.scenario == "nodes" else ["local"]
    try:  # as harness.runtime.session does: the watchdog for the whole run, tear down in `finally`
        with watchdog.watching(watchdog.WatchdogConfig(dead_after=a.dead_after)):
            try:
                for scope in scopes:
                    for round_ in range(a.rounds):
                        with zero_first(f"data-{scope}", scope=scope):  # type: ignore[arg-type]
                            body(scope, round_)
            except ZeroFirstError as exc:
                record("ZeroFirstError", str(exc))
                raise
            except BaseException as exc:
                record(type(exc).__name__, str(exc))
                raise
            record("ok")
    finally:
        hdist.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
