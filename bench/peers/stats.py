"""`python -m bench.peers`' pure part: the rounds' order, the paired statistics against the
reference, the table and the JSON lines. Functions of the runs' summaries (bench.runs.Run.summary),
so the table can be rebuilt from a results JSON: `python -m bench.peers.stats bench/results/<file>.json`."""

from __future__ import annotations

import json
import statistics

from bench.report import median_ci, spread

REFERENCE = "reference"
AA = "reference-aa"  # the reference again, in the same round: the noise floor
# the metrics compared per round: (summary key, ratio or difference, label, digits)
METRICS = (("steady_ms", "ratio", "steady ms/step", 3), ("steady_cpu_ms", "ratio", "  CPU ms/step", 3),
           ("first_step_s", "diff", "first step s", 2), ("exit_s", "diff", "exit s", 2),
           ("wall_s", "diff", "total wall s", 2), ("peak_rss_mib", "ratio", "peak RSS MiB/rank", 0))


def rotate(sides: list[str], rnd: int) -> list[str]:
    """Round `rnd`'s order: the sides shifted by one each round, so that none always runs first."""
    k = rnd % len(sides) if sides else 0
    return sides[k:] + sides[:k]


def value(summary: dict, key: str) -> float:
    v = summary[key]
    return max(v) if isinstance(v, list) else v  # per-rank lists (peak RSS): the largest rank


def paired(rounds: list[dict], side: str, key: str, kind: str) -> list[float]:
    """Per round: side / reference ("ratio") or side - reference ("diff"), rounds where both ran."""
    out = []
    for r in rounds:
        if side in r["runs"] and REFERENCE in r["runs"]:
            a, b = value(r["runs"][side], key), value(r["runs"][REFERENCE], key)
            out.append(a / b if kind == "ratio" else a - b)
    return out


def side_stats(rounds: list[dict], side: str) -> dict:
    """Median [min-max] and a 95% CI of the median of the per-round ratios and differences to the
    reference, the side's own medians, and how often its final weights equalled the reference's."""
    runs = [r["runs"][side] for r in rounds if side in r["runs"]]
    out: dict = {"rounds": len(runs), "absolute": {k: statistics.median(value(s, k) for s in runs)
                                                   for k, *_ in METRICS} if runs else {}}
    if side == REFERENCE or not runs:
        return out
    for key, kind, *_ in METRICS:
        values = paired(rounds, side, key, kind)
        low, high, coverage = median_ci(values)
        out[key] = {"kind": kind, **spread(values), "ci": [low, high], "ci_coverage": coverage}
    diffs = [r["weights"].get(side) for r in rounds if side in r["runs"]]
    known = [d for d in diffs if d is not None]
    out["weights"] = {"bitwise_equal": sum(d == 0.0 for d in known), "rounds": len(diffs),
                      "max_abs_diff": max(known, default=None)}
    return out


def weights_text(w: dict | None) -> str:
    if not w:
        return "-"
    if w["max_abs_diff"] is None:
        return "no checkpoint"
    if w["bitwise_equal"] == w["rounds"]:
        return f"bitwise {w['bitwise_equal']}/{w['rounds']}"
    return f"{w['bitwise_equal']}/{w['rounds']} bitwise, max {w['max_abs_diff']:.1e}"


def _cell(s: dict, digits: int) -> str:
    """Ratios: 3 decimals, their range 2; differences: signed, `digits` decimals."""
    if s["kind"] == "ratio":
        return f"{s['median']:.3f} ({s['min']:.2f}..{s['max']:.2f})"
    return f"{s['median']:+.{digits}f} ({s['min']:+.{digits}f}..{s['max']:+.{digits}f})"


def _ci(s: dict, digits: int) -> str:
    low, high = s["ci"]
    d = 3 if s["kind"] == "ratio" else digits
    return f"[{low:.{d}f}, {high:.{d}f}]"


def table(result: dict) -> str:
    """The printed report: absolute medians, then per side its paired ratios / differences."""
    p, m, stats = result["params"], result["machine"], result["stats"]
    sides = [s for s in result["sides"] if s in stats and stats[s]["rounds"]]
    others = [s for s in sides if s != REFERENCE]
    n = stats[REFERENCE]["rounds"] if REFERENCE in stats else 0
    w = 24
    lines = [
        f"peers side by side: {p['arch']} x{p['world']} gloo, global batch {p['batch']}, N={result['n']} "
        f"({3 * result['n'] + 1} steps), threads/process {p['threads']}, {n} interleaved rounds (order rotated)",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB, python {m['python']}, torch {m['torch']}; "
        f"{', '.join(f'{k} {v}' for k, v in result['versions'].items())}; git {m['git_commit']}",
        f"load average 1/5/15 min: start {' '.join(map(str, result['load_start']))}, "
        f"end {' '.join(map(str, result['load_end']))}",
        "ratio = side/reference, diff = side - reference, per round; median (min..max) over rounds; CI: 95% "
        "distribution-free interval of the median (order statistics; coverage shown when n is too small)",
        "", "medians" + " " * (w - 7) + "".join(f"{s:>18}" for s in sides),
    ]
    for key, _, label, digits in METRICS:
        lines.append(f"{label:<{w}}" + "".join(f"{stats[s]['absolute'][key]:>18.{digits}f}" for s in sides))
    c = 22
    lines += ["", f"{'vs reference':<{w}}" + "".join(f"{s:>{c}}" for s in others)]
    for key, kind, label, digits in METRICS:
        lines.append(f"{label.strip() + (' ratio' if kind == 'ratio' else ' diff'):<{w}}"
                     + "".join(f"{_cell(stats[s][key], digits):>{c}}" for s in others))
        lines.append(f"{'  95% CI':<{w}}" + "".join(f"{_ci(stats[s][key], digits):>{c}}" for s in others))
    cov = {round(stats[s][METRICS[0][0]]["ci_coverage"], 3) for s in others}
    if others and max(cov) < 0.95:
        lines.append(f"{'':<{w}}(with {n} rounds the CI is the whole range and covers {max(cov):.0%} only)")
    lines.append(f"{'same final weights':<{w}}" + "".join(f"{weights_text(stats[s].get('weights')):>{c}}"
                                                             for s in others))
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def json_lines(result: dict) -> list[str]:
    """One line per side, each starting `{"bench": "peers", "name": ...`: its statistics and the machine."""
    m, lines = result["machine"], []
    common = {"arch": result["params"]["arch"], "world": result["params"]["world"], "n": result["n"],
              "machine": m, "git": m.get("git_commit"), "harness_source": m.get("harness_source"),
              "versions": result["versions"]}
    for side in result["sides"]:
        st = result["stats"].get(side)
        line: dict = {"bench": "peers", "name": side}
        if side in result["skipped"]:
            line["skipped"] = result["skipped"][side]
        elif st:
            line.update(vs=None if side == REFERENCE else REFERENCE, rounds=st["rounds"], absolute=st["absolute"])
            line.update({f"{key}_{kind}": st[key] for key, kind, *_ in METRICS if key in st})
            if "weights" in st:
                line["weights"] = st["weights"]
        lines.append(json.dumps({**line, **common}, default=str))
    return lines


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m bench.peers.stats bench/results/<time>-peers-<arch>-x<world>.json")
    print(table(json.loads(Path(sys.argv[1]).read_text())))
