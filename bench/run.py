"""`make bench`: the harness against the hand-written loop (bench/reference.py), side by side.

    python -m bench.run                                  # CPU: mlp, 1 and 2 processes, 10 pairs each
    python -m bench.run --arch mlp,cnn --pairs 12
    python -m bench.run --device cuda --arch mlp,cnn --amp bf16 --channels-last --check-sync --worlds 1

For each setting (model x process count) the two sides run in alternation, reference then harness,
`--warmup` pairs first (discarded) and then `--pairs` pairs; settings take turns round by round, so
a change in the machine's load reaches all of them alike. Each run is a fresh command, timed from
its start; inside it the step clock (bench/data.py) gives the steady state (T(3N) - T(N)) / 2N.
Then the launcher's start-up against torchrun's and zero_first's release latency. `--budget-s`
bounds the whole: when the next round would not fit, it stops and says how many pairs it got.
Prints one table (bench/report.py) and writes every run's numbers with the machine to
`--out`/<time>-<device>-<archs>.json. Exit 1 when a run fails (its output's tail is printed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from bench.runs import (
    REPO,
    RunFailed,
    Spec,
    clean_env,
    cosine_schedule,
    execute,
    same_weights,
    scratch,
    snapshot,
    source_digest,
    torchrun,
)

DEFAULT_N = {"mlp": 400, "cnn": 40}  # steps N: on one CPU core the steady window (2N steps) takes 0.3-4 s


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="mlp", help="comma-separated: mlp, cnn")
    p.add_argument("--worlds", default="1,2", help="comma-separated process counts")
    p.add_argument("--pairs", type=int, default=10, help="measured pairs per setting")
    p.add_argument("--warmup", type=int, default=1, help="pairs run first and discarded")
    p.add_argument("--n", type=int, default=0, help=f"steady window N..3N; 0 = per arch {DEFAULT_N}")
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process, both sides")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", default="off", choices=["off", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--check-sync", action="store_true", help="CUDA: fail on a host-device sync outside logging steps")
    p.add_argument("--launcher-rounds", type=int, default=5, help="launcher start-up triples (largest world; 0 = skip)")
    p.add_argument("--zero-first-rounds", type=int, default=20, help="zero_first latency rounds (0 = skip)")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting rounds after this many seconds")
    p.add_argument("--run-timeout-s", type=float, default=240.0, help="one command's limit")
    p.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                   help="run the checkout itself, not a copy of harness/, conf/, bench/ taken at the start")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="directory for the results JSON")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_pair(spec: Spec, work: Path, timeout_s: float, root: Path) -> dict:
    ref = execute("reference", spec, work / "a", timeout_s, root)
    har = execute("harness", spec, work / "b", timeout_s, root)
    return {"reference": ref.summary(), "harness": har.summary(),
            "weights_max_abs_diff": same_weights(ref.checkpoint, har.checkpoint), "load": report.load_avg()}


def run_triple(spec: Spec, work: Path, timeout_s: float, root: Path) -> dict:
    return {side: execute(side, spec, work / side, timeout_s, root).summary()
            for side in ("reference", "harness-torchrun", "harness")}


def run_zero_first(rounds: int, spec: Spec, work: Path, timeout_s: float, root: Path) -> dict:
    out = work / "zero_first.json"
    cmd = [*torchrun(2), "-m", "bench.zero_first", f"--rounds={rounds}", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=root, env=clean_env(spec, root), capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not out.is_file():
        raise RunFailed(f"zero_first (exit {proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    worlds = [int(w) for w in args.worlds.split(",") if w.strip()]
    common = dict(batch=args.batch, log_every=args.log_every, threads=args.threads, device=args.device,
                  amp=args.amp, channels_last=args.channels_last, check_sync=args.check_sync)
    specs = [Spec(arch=a, world=w, n=args.n or DEFAULT_N[a], **common) for a in archs for w in worlds]
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            log("error: --device cuda, but torch sees no CUDA device (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda})")
            return 2
    started = time.monotonic()
    deadline = started + args.budget_s
    work = scratch()
    root = snapshot(work / "src") if args.snapshot else REPO
    result: dict = {
        "params": {**vars(args), "archs": archs, "worlds": worlds, "cosine_schedule": cosine_schedule(root)},
        "machine": {**report.machine(args.device), "harness_source": source_digest(root)},
        "load_start": report.load_avg(), "load_end": None,
        "settings": [{"arch": s.arch, "world": s.world, "n": s.n, "spec": s.__dict__, "warmup": [], "pairs": []}
                     for s in specs],
        "launcher": None, "zero_first": None, "notes": [],
    }
    code = 0
    try:
        multi = [s for s in specs if s.world > 1]
        if args.zero_first_rounds and multi:
            result["zero_first"] = run_zero_first(args.zero_first_rounds, multi[0], work, args.run_timeout_s,
                                                  root)
            log(f"zero_first: {report.fmt(report.spread(result['zero_first']['latency_ms']['zero_first']))} ms")
        launch_spec = max(specs, key=lambda s: s.world).short(args.log_every)
        launcher: dict = {"world": launch_spec.world, "triples": [], "first_step_s": None}
        do_launcher = args.launcher_rounds > 0 and launch_spec.world > 1
        took: dict[str, float] = {}  # the last duration of each kind of unit, to plan within the budget
        for rnd in range(args.warmup + args.pairs):
            units = [(f"{s.arch} x{s.world}", s, entry) for s, entry in zip(specs, result["settings"], strict=True)]
            if do_launcher and rnd < args.launcher_rounds:
                units.append(("launcher", launch_spec, None))
            if rnd > args.warmup and time.monotonic() + sum(took.get(u[0], 0.0) for u in units) > deadline:
                result["notes"].append(f"budget of {args.budget_s:.0f} s reached: {rnd - args.warmup} measured "
                                       f"pairs per setting instead of {args.pairs}")
                log(f"note: {result['notes'][-1]}")
                break
            for name, spec, entry in units:
                t0 = time.monotonic()
                if entry is None:
                    launcher["triples"].append(run_triple(spec, work / "launcher", args.run_timeout_s, root))
                    t = launcher["triples"][-1]
                    log(f"launcher {len(launcher['triples'])}: first step s: torchrun+reference "
                        f"{t['reference']['first_step_s']:.2f}, torchrun+harness "
                        f"{t['harness-torchrun']['first_step_s']:.2f}, python -m harness.train "
                        f"{t['harness']['first_step_s']:.2f}")
                else:
                    pair = run_pair(spec, work / name.replace(" ", ""), args.run_timeout_s, root)
                    warm = rnd < args.warmup
                    entry["warmup" if warm else "pairs"].append(pair)
                    r, h = pair["reference"]["steady_ms"], pair["harness"]["steady_ms"]
                    log(f"{name} {'warm-up' if warm else f'pair {rnd - args.warmup + 1}/{args.pairs}'}: "
                        f"{r:.3f} vs {h:.3f} ms/step ({h / r:.3f}); load {pair['load'][0]}")
                took[name] = time.monotonic() - t0
        for entry in result["settings"]:
            if entry["pairs"]:
                entry["stats"] = report.pair_stats(entry["pairs"])
        if launcher["triples"]:
            launcher["first_step_s"] = {
                ("reference-torchrun" if side == "reference" else side):
                    report.spread([t[side]["first_step_s"] for t in launcher["triples"]])
                for side in ("reference", "harness-torchrun", "harness")}
            result["launcher"] = launcher
    except (RunFailed, subprocess.TimeoutExpired) as exc:
        log(f"error: {exc}")
        result["error"] = str(exc)
        code = 1
    finally:
        result["load_end"] = report.load_avg()
        result["seconds"] = time.monotonic() - started
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.device}-{'-'.join(archs)}.json"
        path.write_text(json.dumps(result, indent=1, default=str))
        shutil.rmtree(work, ignore_errors=True)
    if code == 0:
        for entry in result["settings"]:
            for p in entry["pairs"] + entry["warmup"]:
                for side in ("reference", "harness"):
                    if len(set(p[side]["threads"])) != 1 or p[side]["threads"][0] != args.threads:
                        result["notes"].append(f"{side} ran with {p[side]['threads']} threads, not {args.threads}")
        print(report.table(result))
    print(f"\nraw results: {path} ({result['seconds']:.0f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
