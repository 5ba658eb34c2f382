"""Statistics, the machine's description, and the one table `make bench` prints.

Pure functions of the runs' summaries (bench/runs.py `Run.summary()`), so the table can be rebuilt
from a results JSON: `python -m bench.report bench/results/<file>.json`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free confidence interval for the median: (low, high, coverage).

    The order statistics x_(k) and x_(n+1-k) (1-based, sorted) with the largest k for which the
    interval still covers the median with probability >= `confidence`: the count of values below
    the median is Binomial(n, 1/2), so the coverage is 1 - 2 P(B <= k - 1). With too few values for
    the asked confidence (n < 6 at 0.95) it is the whole range, and `coverage` says what that covers.
    """
    if not values:
        raise ValueError("median_ci of no values")
    x, n = sorted(values), len(values)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return x[k - 1], x[n - k], coverage(k)


def fmt(s: dict[str, float], digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict[str, object]:
    import psutil
    import torch

    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    info: dict[str, object] = {
        "host": platform.node(), "platform": platform.platform(), "cpu": cpu_model(),
        "cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": sys.version.split()[0],
        "torch": torch.__version__, "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty_files": len(git("status", "--porcelain", "--untracked-files=no").splitlines()),
    }
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def pair_stats(pairs: list[dict]) -> dict[str, dict]:
    """Per side and metric: median [min-max] over the pairs, plus the ratios harness/reference."""
    out: dict[str, dict] = {}
    for metric in ("steady_ms", "steady_cpu_ms", "first_step_s", "exit_s", "wall_s"):
        ref = [p["reference"][metric] for p in pairs]
        har = [p["harness"][metric] for p in pairs]
        out[metric] = {"reference": spread(ref), "harness": spread(har),
                       "ratio_of_medians": statistics.median(har) / statistics.median(ref),
                       "pair_ratios": spread([h / r for h, r in zip(har, ref, strict=True)])}
    for key in ("peak_rss_mib", "loop_rss_mib"):
        if any(None in p[side][key] for p in pairs for side in ("reference", "harness")):
            continue
        rss = {side: spread([max(p[side][key]) for p in pairs]) for side in ("reference", "harness")}
        rss["ratio_of_medians"] = rss["harness"]["median"] / rss["reference"]["median"]
        out[key] = rss
    cuda = [p["harness"]["cuda_max_allocated_mib"][0] for p in pairs]
    if cuda and cuda[0] is not None:
        out["cuda_max_allocated_mib"] = {
            side: spread([max(p[side]["cuda_max_allocated_mib"]) for p in pairs]) for side in ("reference", "harness")}
    diffs = [p["weights_max_abs_diff"] for p in pairs]
    out["weights"] = {"bitwise_equal": sum(d == 0.0 for d in diffs), "pairs": len(diffs),
                      "max_abs_diff": max((d for d in diffs if d is not None), default=None)}
    return out


def table(result: dict) -> str:
    """The printed report: one block per setting, then launcher and zero_first lines."""
    p, m = result["params"], result["machine"]
    lines = [
        f"harness vs hand-written loop: {p['device']}, threads/process {p['threads']}, global batch {p['batch']}, "
        f"log every {p['log_every']} steps, amp {p['amp']}, channels_last {p['channels_last']}",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB, {m['platform']}, python {m['python']}, "
        f"torch {m['torch']}" + (f", {m['gpu']}" if m.get("gpu") else "")
        + f"; git {m['git_commit']} (+{m['git_dirty_files']} modified files)",
        f"load average 1/5/15 min: start {' '.join(map(str, result['load_start']))}, "
        f"end {' '.join(map(str, result['load_end']))}",
        "steady ms/step = (T(3N) - T(N)) / 2N inside one run; median [min-max] over alternating pairs; "
        "ratio = harness/reference of the medians (min-max of per-pair ratios)",
        "",
        f"{'setting':<18}{'metric':<22}{'reference':<26}{'harness':<26}ratio",
    ]
    for s in result["settings"]:
        st = s.get("stats")
        name = f"{s['arch']} x{s['world']} N={s['n']}"
        if not st:
            lines.append(f"{name:<18}(no pairs measured)")
            continue
        pairs = f"{st['steady_ms']['reference']['n']} pairs"
        for label, key, digits in (("steady ms/step", "steady_ms", 3), ("  CPU ms/step", "steady_cpu_ms", 3),
                                   ("first step s", "first_step_s", 2), ("last step to exit s", "exit_s", 2),
                                   ("total wall s", "wall_s", 2)):
            if key not in st:  # a results file from before exit_s
                continue
            x = st[key]
            lines.append(f"{name:<18}{label:<22}{fmt(x['reference'], digits):<26}{fmt(x['harness'], digits):<26}"
                         f"{x['ratio_of_medians']:.3f} ({x['pair_ratios']['min']:.2f}-{x['pair_ratios']['max']:.2f})")
            name = pairs if label == "steady ms/step" else ""
        for label, key in (("peak RSS MiB/rank", "peak_rss_mib"), ("  RSS in the loop", "loop_rss_mib")):
            if key in st:
                r = st[key]
                lines.append(f"{'':<18}{label:<22}{fmt(r['reference'], 0):<26}{fmt(r['harness'], 0):<26}"
                             f"{r['ratio_of_medians']:.3f}")
        if "cuda_max_allocated_mib" in st:
            c = st["cuda_max_allocated_mib"]
            lines.append(f"{'':<18}{'cuda max alloc MiB':<22}{fmt(c['reference'], 1):<26}{fmt(c['harness'], 1):<26}")
        w = st["weights"]
        lines.append(f"{'':<18}{'same final weights':<22}{w['bitwise_equal']}/{w['pairs']} pairs bitwise"
                     + (f" (max abs diff {w['max_abs_diff']:.2e})" if w["max_abs_diff"] else ""))
    launcher = result.get("launcher")
    if launcher:
        f = launcher["first_step_s"]
        lines += ["", f"to first step, {launcher['world']} processes, s, median [min-max] (runs): "
                  f"torchrun + reference {fmt(f['reference-torchrun'], 2)} ({f['reference-torchrun']['n']}); "
                  f"torchrun + harness {fmt(f['harness-torchrun'], 2)} ({f['harness-torchrun']['n']}); "
                  f"python -m harness.train {fmt(f['harness'], 2)} ({f['harness']['n']})",
                  f"  harness worker start-up over the reference's: "
                  f"{f['harness-torchrun']['median'] - f['reference-torchrun']['median']:+.2f} s; "
                  f"harness launcher over torchrun: {f['harness']['median'] - f['harness-torchrun']['median']:+.2f} s"]
    zf = result.get("zero_first")
    if zf:
        lines += ["", f"zero_first release latency, {zf['world_size']} ranks gloo, ms, median [min-max] of "
                  f"{zf['rounds']}: zero_first {fmt(spread(zf['latency_ms']['zero_first']))}; "
                  f"dist.barrier (yardstick) {fmt(spread(zf['latency_ms']['barrier']))}"]
    for ip in result.get("inproc") or []:
        q, r = ip["quantiles_ms"], ip["ratios"]
        lines += ["", f"in one process per rank ({ip['arch']} x{ip.get('world_size', 1)}, {ip['rounds']} alternating "
                  f"rounds, {q['cpu']['reference']['n']} blocks of {ip['log_every']} steps per side), ms/step "
                  f"p10 / p50: CPU time reference {q['cpu']['reference']['p10']:.3f} / "
                  f"{q['cpu']['reference']['p50']:.3f}, harness {q['cpu']['harness']['p10']:.3f} / "
                  f"{q['cpu']['harness']['p50']:.3f}",
                  f"  ratio CPU time p10 {r['cpu']['p10']:.3f}, p50 {r['cpu']['p50']:.3f}; wall p10 "
                  f"{r['wall']['p10']:.3f}, p50 {r['wall']['p50']:.3f}; same weights in "
                  f"{ip['weights_equal_rounds']}/{ip['rounds'] + 1} rounds"]
        ab = ip.get("watchdog_ab")
        if ab:
            lines.append(f"  liveness watchdog A/B (harness with / without it, dist.watchdog=false): CPU time p10 "
                         f"{ab['cpu']['p10']:.3f}, p50 {ab['cpu']['p50']:.3f}; wall p10 {ab['wall']['p10']:.3f}, "
                         f"p50 {ab['wall']['p50']:.3f}")
    for c in result.get("step_calls") or []:
        sides, extra = c["sides"], c["harness_minus_reference"]
        more = ", ".join(f"{k} {v:+g}" for k, v in list(extra.items())[:8])
        lines += ["", f"calls per step ({c['arch']} x{c['world_size']}, exact: runs of {c['steps']} and "
                  f"{2 * c['steps']} steps differenced), reference / harness: Python functions "
                  f"{sides['reference']['python']} / {sides['harness']['python']}, C functions "
                  f"{sides['reference']['c']} / {sides['harness']['c']}, torch functions (tensor ops) "
                  f"{sides['reference']['torch']} / {sides['harness']['torch']}",
                  f"  the largest differences: {more}"]
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m bench.report bench/results/<file>.json")
    print(table(json.loads(Path(sys.argv[1]).read_text())))
