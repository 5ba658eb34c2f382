"""`make bench`: the harness against the hand-written loop (bench/reference.py), side by side.

    python -m bench.run                                  # CPU: mlp, 1 and 2 processes, 10 pairs each
    python -m bench.run --arch mlp,cnn --pairs 12
    python -m bench.run --device cuda --arch mlp,cnn --amp bf16 --channels-last --check-sync --worlds 1

For each setting (model x process count) the two sides run in alternation, reference then harness,
`--warmup` pairs first (discarded; the last one also sizes N so that the steady window lasts about
`--window-s` on the reference) and then `--pairs` pairs; settings take turns round by round, so a
change in the machine's load reaches all of them alike. Each run is a fresh command, timed from its
start; inside it the step clock (bench/data.py) gives the steady state (T(3N) - T(N)) / 2N.
Launcher start-up: the largest world's pairs already give torchrun + reference and
`python -m harness.train` to first step; `--launcher-rounds` runs of the harness under torchrun,
each right after a pair, split that into worker start-up and launcher. zero_first's release latency
and the in-process comparison (bench/inproc.py: the loop's own overhead, steadier than separate
commands on a shared machine) run once, first. `--budget-s` bounds the whole: when the next round
would not fit, it stops and says how many pairs it got. Prints one table (bench/report.py) and
writes every run's numbers with the machine to `--out`/<time>-<device>-<archs>.json. Exit 1 when a
run fails (its output's tail is printed), 2 for --device cuda without CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="mlp", help="comma-separated: mlp, cnn")
    p.add_argument("--worlds", default="1,2", help="comma-separated process counts")
    p.add_argument("--pairs", type=int, default=10, help="measured pairs per setting")
    p.add_argument("--warmup", type=int, default=1, help="pairs run first and discarded")
    p.add_argument("--n", type=int, default=0,
                   help="steady window N..3N; 0 = from the warm-up, so that the window lasts --window-s")
    p.add_argument("--window-s", type=float, default=0.6, help="target length of the steady window (adaptive N)")
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process, both sides")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", default="off", choices=["off", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--check-sync", action="store_true", help="CUDA: fail on a host-device sync outside logging steps")
    p.add_argument("--launcher-rounds", type=int, default=3,
                   help="runs of the harness under torchrun next to the largest world's pairs (0 = skip)")
    p.add_argument("--inproc-rounds", type=int, default=10,
                   help="CPU: harness.fit vs the reference loop inside one process (bench/inproc.py; 0 = skip)")
    p.add_argument("--zero-first-rounds", type=int, default=20, help="zero_first latency rounds (0 = skip)")
    p.add_argument("--no-calls", dest="calls", action="store_false",
                   help="CPU: skip counting what one step of each loop calls (bench/step_calls.py)")
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


def run_zero_first(rounds: int, spec: Spec, work: Path, timeout_s: float, root: Path) -> dict:
    out = work / "zero_first.json"
    cmd = [*torchrun(2), "-m", "bench.zero_first", f"--rounds={rounds}", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=root, env=clean_env(spec, root), capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not out.is_file():
        raise RunFailed(f"zero_first (exit {proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(out.read_text())


def run_inproc(args: argparse.Namespace, spec: Spec, work: Path, root: Path) -> dict:
    """bench/inproc.py for one setting: one process, or torchrun for several."""
    out = work / f"inproc-{spec.arch}-x{spec.world}.json"
    launcher = torchrun(spec.world) if spec.world > 1 else [sys.executable]
    n = args.n or (200 if spec.world == 1 else 100)
    cmd = [*launcher, "-m", "bench.inproc", f"--arch={spec.arch}", f"--rounds={args.inproc_rounds}",
           f"--batch={args.batch}", f"--log-every={args.log_every}", f"--n-steps={n}", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=root, env=clean_env(spec, root), capture_output=True, text=True,
                          timeout=args.run_timeout_s)
    if proc.returncode != 0 or not out.is_file():
        raise RunFailed(f"inproc (exit {proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")
    result = json.loads(out.read_text())
    result.pop("blocks_ms")  # thousands of numbers; the quantiles are kept
    return result


def run_step_calls(spec: Spec, work: Path, timeout_s: float, root: Path) -> dict:
    """bench/step_calls.py for one setting: per-step call counts of both loops, exact."""
    out = work / f"calls-{spec.arch}-x{spec.world}.json"
    launcher = torchrun(spec.world) if spec.world > 1 else [sys.executable]
    cmd = [*launcher, "-m", "bench.step_calls", f"--arch={spec.arch}", f"--batch={spec.batch}", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=root, env=clean_env(spec, root), capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not out.is_file():
        raise RunFailed(f"step_calls (exit {proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")
    return json.loads(out.read_text())


def choose_n(step_ms: float, window_s: float, log_every: int, cap: int = 5000) -> int:
    """N (a multiple of log_every) for a steady window of 2N steps lasting about `window_s`."""
    n = round(window_s * 1e3 / step_ms / 2 / log_every) * log_every
    return min(max(n, log_every), cap // log_every * log_every)


def launcher_stats(setting: dict, harness_torchrun: list[dict]) -> dict:
    """Time to first step of the largest world: the pairs' two sides and the harness under torchrun."""
    pairs = setting["pairs"]
    return {"world": setting["world"], "runs": harness_torchrun, "first_step_s": {
        "reference-torchrun": report.spread([p["reference"]["first_step_s"] for p in pairs]),
        "harness-torchrun": report.spread([r["first_step_s"] for r in harness_torchrun]),
        "harness": report.spread([p["harness"]["first_step_s"] for p in pairs])}}


def json_lines(result: dict) -> list[str]:
    """One JSON object per setting (and for the in-process and launcher measurements), for scripts:
    the ratios harness/reference with their spread over pairs, the machine, the git revision."""
    machine = result["machine"]
    base = {"bench": "run", "device": result["params"]["device"], "machine": machine, "git": machine["git_commit"]}
    out = []
    for s in result["settings"]:
        st = s.get("stats")
        if not st:
            continue
        ratios = {m: {"ratio_of_medians": st[m]["ratio_of_medians"], "pair_ratios": st[m]["pair_ratios"]}
                  for m in ("steady_ms", "steady_cpu_ms", "first_step_s", "exit_s", "wall_s")}
        diffs = {m: st[m]["harness"]["median"] - st[m]["reference"]["median"]
                 for m in ("first_step_s", "exit_s", "wall_s")}
        rss = st.get("peak_rss_mib", {}).get("ratio_of_medians")
        out.append({**base, "name": f"{s['arch']} x{s['world']}", "n": s["n"], "ratios": ratios,
                    "median_differences_s": diffs, "peak_rss_ratio": rss, "weights": st["weights"]})
    for ip in result.get("inproc") or []:
        out.append({**base, "name": f"inproc {ip['arch']} x{ip.get('world_size', 1)}", "ratios": ip["ratios"],
                    "watchdog_ab": ip.get("watchdog_ab"), "rounds": ip["rounds"],
                    "weights_equal_rounds": ip["weights_equal_rounds"]})
    for c in result.get("step_calls") or []:
        out.append({**base, "name": f"calls per step {c['arch']} x{c['world_size']}", "sides": c["sides"],
                    "harness_minus_reference": c["harness_minus_reference"]})
    if result.get("launcher"):
        f = result["launcher"]["first_step_s"]
        out.append({**base, "name": f"first step x{result['launcher']['world']}", "first_step_s": f})
    return [json.dumps(o, default=str) for o in out]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    worlds = [int(w) for w in args.worlds.split(",") if w.strip()]
    common = dict(batch=args.batch, log_every=args.log_every, threads=args.threads, device=args.device,
                  amp=args.amp, channels_last=args.channels_last, check_sync=args.check_sync)
    start_n = args.n or 2 * args.log_every  # adaptive N: warm up short, then size the window
    specs = [Spec(arch=a, world=w, n=start_n, **common) for a in archs for w in worlds]
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
        "settings": [{"arch": s.arch, "world": s.world, "n": s.n, "warmup": [], "pairs": []} for s in specs],
        "launcher": None, "zero_first": None, "inproc": [], "step_calls": [], "notes": [],
    }
    biggest = max(range(len(specs)), key=lambda i: specs[i].world)
    do_launcher = args.launcher_rounds > 0 and specs[biggest].world > 1
    harness_torchrun: list[dict] = []
    code = 0
    try:
        if args.zero_first_rounds and specs[biggest].world > 1:
            result["zero_first"] = run_zero_first(args.zero_first_rounds, specs[biggest], work, args.run_timeout_s,
                                                  root)
            log(f"zero_first: {report.fmt(report.spread(result['zero_first']['latency_ms']['zero_first']))} ms")
        if args.inproc_rounds and args.device == "cpu" and (args.amp != "off" or args.channels_last):
            result["notes"].append("no in-process comparison: bench/inproc.py trains in float32, contiguous")
        elif args.inproc_rounds and args.device == "cpu":
            result["inproc"] = []
            for spec in specs:
                result["inproc"].append(run_inproc(args, spec, work, root))
                r = result["inproc"][-1]["ratios"]["cpu"]
                log(f"{spec.arch} x{spec.world} in one process per rank: harness/reference CPU ms/step p10 "
                    f"{r['p10']:.3f}, p50 {r['p50']:.3f}")
        if args.calls and args.device == "cpu":
            for spec in specs:
                result["step_calls"].append(run_step_calls(spec, work, args.run_timeout_s, root))
                c = result["step_calls"][-1]["sides"]
                log(f"{spec.arch} x{spec.world} calls per step, reference / harness: Python "
                    f"{c['reference']['python']} / {c['harness']['python']}, C {c['reference']['c']} / "
                    f"{c['harness']['c']}, torch "
                    f"{c['reference']['torch']} / {c['harness']['torch']}")
        took: dict[int, float] = {}  # each setting's last round, to plan within the budget
        for rnd in range(args.warmup + args.pairs):
            measured = rnd - args.warmup
            if measured > 0 and time.monotonic() + sum(took.values()) > deadline:
                result["notes"].append(f"budget of {args.budget_s:.0f} s reached: {measured} measured pairs per "
                                       f"setting instead of {args.pairs}")
                log(f"note: {result['notes'][-1]}")
                break
            for i, entry in enumerate(result["settings"]):
                t0, spec = time.monotonic(), specs[i]
                name = f"{spec.arch} x{spec.world}"
                pair = run_pair(spec, work / name.replace(" ", ""), args.run_timeout_s, root)
                entry["warmup" if measured < 0 else "pairs"].append(pair)
                r, h = pair["reference"]["steady_ms"], pair["harness"]["steady_ms"]
                log(f"{name} N={spec.n} {'warm-up' if measured < 0 else f'pair {measured + 1}/{args.pairs}'}: "
                    f"{r:.3f} vs {h:.3f} ms/step ({h / r:.3f}); load {pair['load'][0]}")
                if measured == -1 and not args.n:  # the last warm-up sizes the window
                    specs[i] = dataclasses.replace(spec, n=choose_n(r, args.window_s, spec.log_every))
                    entry["n"] = specs[i].n
                if i == biggest and do_launcher and 0 <= measured < args.launcher_rounds:
                    run = execute("harness-torchrun", specs[i], work / "torchrun", args.run_timeout_s, root)
                    harness_torchrun.append(run.summary())
                    log(f"{name} first step s: reference (torchrun) {pair['reference']['first_step_s']:.2f}, harness "
                        f"(launcher) {pair['harness']['first_step_s']:.2f}, harness (torchrun) "
                        f"{run.first_step_s:.2f}")
                took[i] = time.monotonic() - t0
        for entry in result["settings"]:
            if entry["pairs"]:
                entry["stats"] = report.pair_stats(entry["pairs"])
        if harness_torchrun and result["settings"][biggest]["pairs"]:
            result["launcher"] = launcher_stats(result["settings"][biggest], harness_torchrun)
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
    for line in json_lines(result):
        print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
