"""`make train`'s job against the same job written by hand (bench/by_hand.py), whole commands.

    python -m bench.job                  # 10 interleaved rounds
    python -m bench.job --rounds 12 --epochs 10

Each round runs, in an order that rotates round by round, `python -m harness.train` (the default
job, as `make train` runs it, in a scratch run_root), `python -m bench.by_hand` and a second
`bench.by_hand` (the A/A pair: the noise floor), each a fresh command timed from its start to its
exit. Reported: the median of the per-round differences harness - by hand with a 95% confidence
interval, next to the A/A's; the first and last log lines' times (start-up, and the end after the
last epoch), read from each command's output as it arrives. Ends with one JSON line per comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from bench.runs import REPO, scratch, worker_env

SIDES = ("harness", "by_hand", "by_hand_again")


def command(side: str, work: Path, epochs: int) -> list[str]:
    if side == "harness":
        return [sys.executable, "-m", "harness.train", f"run_root={work / 'runs'}", f"trainer.epochs={epochs}"]
    return [sys.executable, "-m", "bench.by_hand", f"--out={work / side}", f"--epochs={epochs}"]


def timed(cmd: list[str], env: dict[str, str], timeout_s: float) -> dict[str, float]:
    """Wall time of one command, and when its first and last `epoch N/M:` lines came (monotonic,
    relative to its start)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = last = None
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if ": train_loss" in line:  # both sides' end-of-epoch line
            last = time.monotonic() - start
            first = first if first is not None else last
    code = proc.wait(timeout=timeout_s)
    wall = time.monotonic() - start
    if code != 0 or first is None or last is None:
        raise RuntimeError(f"{' '.join(cmd)}: exit {code}\n{''.join(lines[-30:])}")
    return {"wall_s": wall, "first_epoch_s": first, "after_last_epoch_s": wall - last}


def paired(rounds: list[dict[str, dict[str, float]]], a: str, b: str, metric: str) -> dict[str, float]:
    diffs = [r[a][metric] - r[b][metric] for r in rounds]
    lo, hi, coverage = report.median_ci(diffs)
    return {"median": statistics.median(diffs), "ci95": [lo, hi], "coverage": coverage, "min": min(diffs),
            "max": max(diffs), "n": len(diffs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1, help="rounds run first and discarded")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    work = scratch("harness-bench-job-")
    env = worker_env(1)
    env.pop("OMP_NUM_THREADS")  # as `make train` runs: torch's own thread count, the same for both
    rounds: list[dict[str, dict[str, float]]] = []
    loads: list[list[float]] = []
    try:
        for i in range(args.warmup + args.rounds):
            order = SIDES[i % 3:] + SIDES[:i % 3]
            got = {}
            for side in order:
                shutil.rmtree(work / side, ignore_errors=True)
                got[side] = timed(command(side, work / side, args.epochs), env, args.timeout_s)
            loads.append(report.load_avg())
            if i >= args.warmup:
                rounds.append(got)
            print(f"round {i + 1 - args.warmup}{' (warm-up)' if i < args.warmup else ''}: " + ", ".join(
                f"{s} {got[s]['wall_s']:.2f} s" for s in SIDES) + f"; load {loads[-1][0]}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"params": vars(args), "machine": report.machine("cpu"), "rounds": rounds, "loads": loads,
              "comparisons": {}}
    for name, (a, b) in {"harness - by hand": ("harness", "by_hand"),
                         "A/A: by hand - by hand": ("by_hand_again", "by_hand")}.items():
        result["comparisons"][name] = {m: paired(rounds, a, b, m)
                                       for m in ("wall_s", "first_epoch_s", "after_last_epoch_s")}
    print(f"\nmake train's job ({args.epochs} epochs, 1 process) vs the same job by hand, {args.rounds} rounds; "
          f"load {loads[0][0]} -> {loads[-1][0]}")
    print(f"{'':26s} {'total wall':>24s} {'to 1st epoch line':>24s} {'after last epoch':>24s}")
    for name, c in result["comparisons"].items():
        print(f"{name:26s} " + " ".join(
            f"{c[m]['median']:+7.2f} s [{c[m]['ci95'][0]:+.2f}, {c[m]['ci95'][1]:+.2f}]".rjust(24)
            for m in ("wall_s", "first_epoch_s", "after_last_epoch_s")))
    by_hand = statistics.median(r["by_hand"]["wall_s"] for r in rounds)
    print(f"(median wall by hand {by_hand:.2f} s, harness "
          f"{statistics.median(r['harness']['wall_s'] for r in rounds):.2f} s; [95% CI of the median difference])")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{time.strftime('%Y%m%d-%H%M%S')}-job.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"raw results: {path}")
    for name, c in result["comparisons"].items():
        print(json.dumps({"bench": "job", "name": name, "differences_s": c, "machine": result["machine"],
                          "git": result["machine"]["git_commit"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
