"""`make bench-memory`: what a rank holds under trainer.strategy=ddp and fsdp, side by side, with ratios.

    python -m bench.memory                              # Tower (12.7M), ddp and fsdp at 1, 2 and 4 ranks
    python -m bench.memory --worlds 1,2 --rounds 3 --steps 10
    python -m bench.memory --width 64 --depth 2 --ckpt-rounds 1     # seconds, for a quick check

Each setting (strategy x world size) is a fresh command: `python -m bench.memory_rank` for one
rank, torchrun (`torch.distributed.run --standalone`, gloo) for several; settings take turns round
by round, so a change in the machine's load reaches all of them alike. At world size 1, `ddp` is
what the harness runs there (the bare module: harness/strategy.py) and `fsdp` a one-rank mesh.
Every rank builds harness.models.Tower through harness.strategy, trains a few AdamW steps on
synthetic data, times a checkpoint save and load through harness.checkpoint.Checkpointer, and
writes its figures (bench/memory_rank.py says how each is measured). This prints one table (per
rank: parameter, gradient and optimizer-state bytes, the resident-set peaks while building and
while training, the median step time; per world size: fsdp/ddp of the largest rank's figures and
that ratio times N, where 1.000 means exactly 1/N), the checkpoint timings, and ends with one JSON
line per setting for scripts; the whole result also goes to `--out`/<time>-memory.json. Exit 1 when
a run fails (its output's tail is printed) or when the fsdp ranks' bytes do not add up to ddp's.
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
from typing import Any

from bench import report
from bench.runs import REPO, RunFailed, scratch, torchrun, worker_env

MIB = 2**20
MEMORY = ("param_bytes", "grad_bytes", "optim_bytes", "build_peak", "train_peak")  # the table's columns
SHARDED = ("param_bytes", "grad_bytes", "sharded_optim")  # exact: the fsdp ranks' sum is ddp's


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="1,2,4", help="comma-separated process counts")
    p.add_argument("--strategies", default="ddp,fsdp", help="comma-separated: ddp, fsdp")
    p.add_argument("--width", type=int, default=0, help="Tower width; 0 = its default (conf/model/tower.yaml)")
    p.add_argument("--depth", type=int, default=0, help="Tower depth; 0 = its default")
    p.add_argument("--wrap", default="TowerBlock", help="trainer.fsdp.wrap, comma-separated; '' = size policy")
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--warmup", type=int, default=2, help="steps in the training peak, not timed")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--ckpt-rounds", type=int, default=3, help="checkpoint saves and loads per run (0 = none)")
    p.add_argument("--rounds", type=int, default=1, help="runs per setting, settings in turn")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every rank")
    p.add_argument("--run-timeout-s", type=float, default=300.0, help="one command's limit")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="directory for the results JSON; '' = none")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rank_cmd(args: argparse.Namespace, strategy: str, world: int, out: Path) -> list[str]:
    opts = [f"--strategy={strategy}", f"--width={args.width}", f"--depth={args.depth}", f"--wrap={args.wrap}",
            f"--batch={args.batch}", f"--warmup={args.warmup}", f"--steps={args.steps}",
            f"--ckpt-rounds={args.ckpt_rounds}", f"--ckpt-dir={out / 'checkpoints'}", f"--out={out}"]
    launcher = torchrun(world) if world > 1 else [sys.executable]
    return [*launcher, "-m", "bench.memory_rank", *opts]


def run_one(args: argparse.Namespace, strategy: str, world: int, work: Path) -> list[dict[str, Any]]:
    """One fresh command for one setting; its ranks' records, rank 0 first."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cmd = rank_cmd(args, strategy, world, work)
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=worker_env(args.threads), capture_output=True, text=True,
                              timeout=args.run_timeout_s)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, output = None, f"{exc.stdout or ''}{exc.stderr or ''}"
    files = sorted(work.glob("rank*.json"))
    if rc != 0 or len(files) != world:
        why = "timed out" if rc is None else f"exit {rc}, {len(files)} of {world} ranks' records"
        raise RunFailed(f"{strategy} x{world} ({why}): {' '.join(cmd)}\n{output[-3000:]}")
    ranks = sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["rank"])
    for r in ranks:
        r["sharded_optim"] = r["optim_bytes"] - r["optim_scalar_bytes"]
    return ranks


def summarize(strategy: str, world: int, runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One setting over its runs: bytes (the same every run), medians of the peaks, rank 0's step times."""
    ranks = []
    for k in range(world):
        mine = [run[k] for run in runs]
        row = {key: mine[-1][key] for key in ("rank", "param_bytes", "param_storage", "param_count", "grad_bytes",
                                               "optim_bytes", "optim_scalar_bytes", "sharded_optim")}
        for key in ("build_peak", "build_held", "train_peak"):
            row[key] = statistics.median(r[key] for r in mine)
        row["step_ms"] = statistics.median(t for r in mine for t in r["step_ms"])
        row["step_cpu_ms"] = statistics.median(t for r in mine for t in r["step_cpu_ms"])
        ranks.append(row)
    first = runs[-1][0]
    parameters = sum(r["param_count"] for r in runs[-1]) if strategy == "fsdp" else first["param_count"]
    setting: dict[str, Any] = {
        "name": f"{strategy}-x{world}", "strategy": strategy, "resolved": first["resolved"], "world": world,
        "model": {"class": "harness.models.Tower", **first["model"], "parameters": parameters},
        "wrap": first["wrap"], "batch": first["batch"], "threads": first["threads"], "malloc": first["malloc"],
        "rss_method": first["rss_method"], "runs": len(runs), "ranks": ranks,
        "step_ms": report.spread([t for run in runs for t in run[0]["step_ms"]]),
        "step_cpu_ms": report.spread([t for run in runs for t in run[0]["step_cpu_ms"]])}
    if "save_s" in first:
        setting.update(save_s=report.spread([t for run in runs for t in run[0]["save_s"]]),
                       load_s=report.spread([t for run in runs for t in run[0]["load_s"]]),
                       ckpt_bytes=first["ckpt_bytes"], ckpt_files=first["ckpt_files"])
    return setting


def compare(ddp: dict[str, Any], fsdp: dict[str, Any]) -> dict[str, Any]:
    """fsdp/ddp of the largest rank's figures (the one that decides whether it fits), of step time, and
    whether the shards add up exactly to the whole."""
    def top(s: dict[str, Any], key: str) -> float:
        return max(r[key] for r in s["ranks"])

    ratios = {key: top(fsdp, key) / top(ddp, key) for key in MEMORY if top(ddp, key) > 0}
    for key in ("step_ms", "step_cpu_ms"):
        ratios[key] = fsdp[key]["median"] / ddp[key]["median"]
    sums = {key: [sum(r[key] for r in fsdp["ranks"]), ddp["ranks"][0][key]] for key in SHARDED}
    # AdamW's `step` is a 0-dim tensor per parameter that every fsdp rank keeps whole
    sums["optim_scalar_bytes"] = [fsdp["ranks"][0]["optim_scalar_bytes"], ddp["ranks"][0]["optim_scalar_bytes"]]
    return {"world": ddp["world"], "ratios": ratios, "sums": sums,
            "sums_match": all(a == b for a, b in sums.values())}


def mib(x: float) -> str:
    return f"{x / MIB:.2f}"


def table(settings: list[dict[str, Any]], comparisons: list[dict[str, Any]]) -> str:
    s0 = settings[0]
    m = s0["model"]
    lines = [f"{m['class']} {m['parameters']:,} parameters ({mib(m['parameters'] * 4)} MiB fp32), AdamW, global "
             f"batch {s0['batch']}, {s0['threads']} thread(s) per rank, fsdp wrap={s0['wrap']}, {s0['runs']} run(s)",
             f"MiB per rank; peaks: resident set ({s0['rss_method']}; malloc {s0['malloc']['peaks']}) over the one "
             f"before the build; step wall and CPU ms: rank 0's median [min-max], the other ranks' median",
             f"{'setting':<10}{'rank':>5}{'params':>10}{'grads':>10}{'optim':>10}{'build peak':>12}"
             f"{'train peak':>12}   {'step ms':<18}{'CPU ms':<18}"]
    by_world = {c["world"]: c for c in comparisons}
    for s in settings:
        for r in s["ranks"]:
            name = f"{s['strategy']} x{s['world']}" if r["rank"] == 0 else ""
            step = [report.fmt(s[k], 0) if r["rank"] == 0 else f"{r[k]:.0f}" for k in ("step_ms", "step_cpu_ms")]
            lines.append(f"{name:<10}{r['rank']:>5}" + "".join(f"{mib(r[k]):>{12 if 'peak' in k else 10}}"
                                                             for k in MEMORY) + f"   {step[0]:<18}{step[1]:<18}")
        c = by_world.get(s["world"])
        if c is not None and s["strategy"] == "fsdp":
            rat = c["ratios"]
            cells = "".join(f"{rat[k]:>{12 if 'peak' in k else 10}.3f}" if k in rat else " " * 10 for k in MEMORY)
            lines.append(f"{'fsdp/ddp':<15}{cells}   {rat['step_ms']:<18.2f}{rat['step_cpu_ms']:<18.2f}")
            times_n = "".join(f"{rat[k] * s['world']:>{12 if 'peak' in k else 10}.3f}" if k in rat else " " * 10
                              for k in MEMORY)
            lines.append(f"{'  x N':<15}{times_n}   (1.000 = exactly 1/N of ddp's)")
            ok = "exactly" if c["sums_match"] else "NOT"
            lines.append(f"{'':<15}fsdp ranks' params + grads + optimizer shards sum {ok} to ddp's")
    if any("save_s" in s for s in settings):
        lines += ["", "checkpoint through harness.checkpoint.Checkpointer (model + AdamW state; every rank; "
                  "seconds, median [min-max])",
                  f"{'setting':<10}{'MiB':>9}{'files':>7}   {'save s':<20}{'load s':<20}"]
        for s in settings:
            if "save_s" in s:
                lines.append(f"{s['strategy'] + ' x' + str(s['world']):<10}{mib(s['ckpt_bytes']):>9}"
                             f"{s['ckpt_files']:>7}   {report.fmt(s['save_s'], 2):<20}{report.fmt(s['load_s'], 2):<20}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",") if w.strip()]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in ("ddp", "fsdp")]
    bad = [w for w in worlds if w < 1 or args.batch % w]
    if unknown or bad:
        log(f"error: strategies {unknown} are not ddp or fsdp; world sizes {bad} do not divide --batch {args.batch}")
        return 2
    started, work = time.monotonic(), scratch("harness-bench-memory-")
    keys = [(s, w) for w in worlds for s in strategies]
    runs: dict[tuple[str, int], list[list[dict[str, Any]]]] = {k: [] for k in keys}
    machine = {**report.machine("cpu"), "load_start": report.load_avg()}
    code = 0
    try:
        for rnd in range(args.rounds):
            for strategy, world in keys:
                ranks = run_one(args, strategy, world, work / f"{strategy}-x{world}")
                runs[strategy, world].append(ranks)
                log(f"round {rnd + 1}/{args.rounds} {strategy} x{world}: params {mib(ranks[0]['param_bytes'])} MiB, "
                    f"build peak {mib(ranks[0]['build_peak'])} MiB, "
                    f"step {statistics.median(ranks[0]['step_ms']):.0f} ms; load {report.load_avg()[0]}")
    except RunFailed as exc:
        log(f"error: {exc}")
        code = 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine["load_end"] = report.load_avg()
    settings = [summarize(s, w, runs[s, w]) for s, w in keys if runs[s, w]]
    comparisons = [compare(d, f) for d in settings if d["strategy"] == "ddp"
                   for f in settings if f["strategy"] == "fsdp" and f["world"] == d["world"]]
    if not settings:
        return code
    print(table(settings, comparisons))
    if not all(c["sums_match"] for c in comparisons):
        log("error: the fsdp ranks' bytes do not add up to ddp's: " +
            "; ".join(f"x{c['world']}: {c['sums']}" for c in comparisons if not c["sums_match"]))
        code = code or 1
    for s in settings:
        print(json.dumps({**s, "comparison": next((c for c in comparisons if c["world"] == s["world"]), None),
                          "machine": machine, "git": machine["git_commit"]}))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{time.strftime('%Y%m%d-%H%M%S')}-memory.json"
        path.write_text(json.dumps({"params": vars(args), "machine": machine, "settings": settings,
                                    "comparisons": comparisons, "seconds": time.monotonic() - started}, indent=1))
        log(f"raw results: {path} ({time.monotonic() - started:.0f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
