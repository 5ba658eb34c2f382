"""`make bench-peers`: the reference loop, the harness and other frameworks' loops, in one interleaved run.

    python -m bench.peers                           # cnn x2 gloo, 10 rounds after 1 warm-up round
    python -m bench.peers --rounds 3 --sides reference,harness,lightning

Sides, each a fresh command per round, all training the same thing (bench/reference.py's work:
the same model seeded the same, the same per-rank batches, SGD, per-step cosine lr, evaluation,
checkpoint) on bench.data.Synthetic, whose step clock times every side from inside:
  reference         bench/reference.py under torchrun
  reference-aa      the same again in the same round: the A/A pair, the noise floor
  harness-torchrun  python -m harness.train under torchrun
  harness           python -m harness.train, its own launcher
  lightning         bench/peers/lightning_loop.py under torchrun (Trainer, DDP, barebones)
  accelerate        bench/peers/accelerate_loop.py under torchrun (Accelerator.prepare)
Each round runs every side once, the order rotated by one each round. `--warmup` rounds come first
and are discarded; the last one sizes N (unless --n) so that the steady window N..3N lasts about
`--window-s` on the reference. Per side against the reference, over rounds: the median (min..max)
and a 95% CI of the per-round ratios of steady step time (wall and CPU) and peak RSS, and of the
differences of time to first step, exit time and total wall; and whether the final weights equal
the reference's. A missing peer (pip install -e '.[peers]') is skipped with a note. `--budget-s`:
no round starts that would not fit. Prints the table, the raw results' path, then one JSON line per
side, each starting {"bench": "peers", "name": ...}; writes the results to `--out`. Exit 1 when a run fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

from bench import report
from bench.peers import stats
from bench.run import choose_n
from bench.runs import REPO, Run, RunFailed, Spec, execute, same_weights, scratch, snapshot, source_digest

SIDES = ("reference", "reference-aa", "harness-torchrun", "harness", "lightning", "accelerate")
LOOPS = {"lightning": "bench.peers.lightning_loop", "accelerate": "bench.peers.accelerate_loop"}
PACKAGES = {"lightning": "lightning", "accelerate": "accelerate"}  # the import that a peer's loop needs
INSTALL = "pip install -e '.[peers]'"
CAVEATS = {"accelerate": "accelerate: its DataLoaderShard reads one batch ahead, so its step clock ticks one step "
                         "early: the steady window is still 2N steps, its exit time includes one more step"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", default=",".join(SIDES),
                   help="comma-separated, from: " + ", ".join(SIDES) + " (reference and reference-aa always run)")
    p.add_argument("--rounds", type=int, default=10, help="measured rounds")
    p.add_argument("--warmup", type=int, default=1, help="rounds run first and discarded")
    p.add_argument("--arch", default="cnn", choices=["mlp", "cnn"])
    p.add_argument("--world", type=int, default=2, help="processes (gloo)")
    p.add_argument("--n", type=int, default=0, help="steady window N..3N; 0 = sized by the warm-up (--window-s)")
    p.add_argument("--window-s", type=float, default=0.6, help="target length of the steady window (adaptive N)")
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    p.add_argument("--budget-s", type=float, default=900.0, help="start no round that would end after this")
    p.add_argument("--run-timeout-s", type=float, default=240.0, help="one command's limit")
    p.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                   help="run the checkout itself, not a copy of harness/, conf/, bench/ taken at the start")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="directory for the results JSON")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def choose_sides(asked: list[str], installed=importlib.util.find_spec) -> tuple[list[str], dict[str, str]]:
    """The sides to run (the reference and its A/A twin first, always) and the skipped ones with why."""
    unknown = [s for s in asked if s not in SIDES]
    if unknown:
        raise SystemExit(f"unknown side(s) {', '.join(unknown)}; choose from {', '.join(SIDES)}")
    sides = [s for s in SIDES if s in asked or s in ("reference", "reference-aa")]
    skipped = {s: f"{PACKAGES[s]} is not installed: {INSTALL}" for s in sides
               if s in PACKAGES and installed(PACKAGES[s]) is None}
    return [s for s in sides if s not in skipped], skipped


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", *PACKAGES.values()):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def run_side(side: str, spec: Spec, workdir: Path, timeout_s: float, root: Path) -> Run:
    if side == stats.AA:
        run = execute(stats.REFERENCE, spec, workdir, timeout_s, root)
        run.side = side
        return run
    return execute(side, spec, workdir, timeout_s, root, loop=LOOPS.get(side))


def run_round(order: list[str], spec: Spec, work: Path, timeout_s: float, root: Path) -> dict:
    runs = {side: run_side(side, spec, work / side, timeout_s, root) for side in order}
    ref = runs[stats.REFERENCE].checkpoint
    return {"order": order, "n": spec.n, "runs": {s: r.summary() for s, r in runs.items()},
            "weights": {s: same_weights(ref, r.checkpoint) for s, r in runs.items() if s != stats.REFERENCE},
            "load": report.load_avg()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sides, skipped = choose_sides([s.strip() for s in args.sides.split(",") if s.strip()])
    for side, why in skipped.items():
        log(f"note: skipping {side}: {why}")
    spec = Spec(arch=args.arch, world=args.world, n=args.n or 2 * args.log_every, batch=args.batch,
                log_every=args.log_every, threads=args.threads)
    started = time.monotonic()
    deadline = started + args.budget_s
    work = scratch("harness-bench-peers-")
    root = snapshot(work / "src") if args.snapshot else REPO
    result: dict = {
        "params": vars(args), "machine": {**report.machine("cpu"), "harness_source": source_digest(root)},
        "versions": versions(), "sides": [s for s in SIDES if s in sides or s in skipped], "skipped": skipped,
        "n": spec.n, "load_start": report.load_avg(), "load_end": None, "warmup": [], "rounds": [],
        "stats": {}, "notes": [*(f"{s} skipped: {why}" for s, why in skipped.items()),
                               *(CAVEATS[s] for s in sides if s in CAVEATS)],
    }
    code, took = 0, 0.0
    try:
        for rnd in range(args.warmup + args.rounds):
            measured = rnd - args.warmup
            if measured > 0 and time.monotonic() + took > deadline:
                result["notes"].append(f"budget of {args.budget_s:.0f} s reached: {measured} measured rounds "
                                       f"instead of {args.rounds}")
                log(f"note: {result['notes'][-1]}")
                break
            t0 = time.monotonic()
            entry = run_round(stats.rotate(sides, rnd), spec, work, args.run_timeout_s, root)
            result["warmup" if measured < 0 else "rounds"].append(entry)
            took = time.monotonic() - t0
            steady = ", ".join(f"{s} {entry['runs'][s]['steady_ms']:.2f}" for s in entry["order"])
            log(f"{'warm-up' if measured < 0 else f'round {measured + 1}/{args.rounds}'} N={spec.n} ({took:.0f} s), "
                f"steady ms/step: {steady}; load {entry['load'][0]}")
            if measured == -1 and not args.n:  # the last warm-up round sizes the window
                ref_ms = entry["runs"][stats.REFERENCE]["steady_ms"]
                spec = dataclasses.replace(spec, n=choose_n(ref_ms, args.window_s, spec.log_every))
                result["n"] = spec.n
        result["stats"] = {s: stats.side_stats(result["rounds"], s) for s in sides} if result["rounds"] else {}
    except RunFailed as exc:
        log(f"error: {exc}")
        result["error"] = str(exc)
        code = 1
    finally:
        for entry in result["rounds"]:
            for side, summary in entry["runs"].items():
                if set(summary["threads"]) != {args.threads}:
                    result["notes"].append(f"{side} ran with {summary['threads']} threads, not {args.threads}")
        result["load_end"] = report.load_avg()
        result["seconds"] = time.monotonic() - started
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{time.strftime('%Y%m%d-%H%M%S')}-peers-{args.arch}-x{args.world}.json"
        path.write_text(json.dumps(result, indent=1, default=str))
        shutil.rmtree(work, ignore_errors=True)
    if code == 0 and result["rounds"]:
        print(stats.table(result))
    print(f"\nraw results: {path} ({result['seconds']:.0f} s)")
    if code == 0:
        print("\n".join(stats.json_lines(result)))
    return code


if __name__ == "__main__":
    sys.exit(main())
