"""bench/peers/ (`make bench-peers`): the pure parts (round order, paired statistics, the median's
confidence interval, the table and JSON lines, the peers' shared batches) and one end-to-end run of
the driver per group of sides. No timing assertions: timings belong to the bench, never to the tests.
The peers are an optional extra (pip install -e '.[peers]'): their runs skip when it is not installed."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bench.peers import stats
from bench.peers.__main__ import INSTALL, SIDES, choose_sides
from bench.peers.common import epoch_order, lr_lambda, rank_batches
from bench.report import median_ci
from tests.conftest import REPO, clean_env

PREFIX = '{"bench": "peers", "name": '


def summary(steady: float, first: float = 5.0, rss: tuple[float, ...] = (300.0, 310.0)) -> dict:
    return {"steady_ms": steady, "steady_cpu_ms": steady / 2, "first_step_s": first, "exit_s": 1.0,
            "wall_s": first + 3.0, "peak_rss_mib": list(rss), "threads": [1, 1]}


def rounds_of(*pairs: tuple[float, float], side: str = "lightning") -> list[dict]:
    """Rounds where the reference and `side` stepped in the given ms; the side's weights equal in the first."""
    return [{"runs": {"reference": summary(r), side: summary(s, first=6.0, rss=(330.0, 341.0))},
             "weights": {side: 0.0 if i == 0 else 1e-6}} for i, (r, s) in enumerate(pairs)]


def test_median_ci_is_the_binomial_order_statistics() -> None:
    assert median_ci([float(v) for v in range(10, 0, -1)]) == (2.0, 9.0, pytest.approx(1 - 2 * 11 / 1024))
    assert median_ci(list(range(1, 21))) == (6, 15, pytest.approx(0.9586, abs=1e-4))  # the textbook n = 20
    low, high, coverage = median_ci(list(range(1, 101)))
    assert (low, high) == (40, 61) and coverage >= 0.95
    # too few values for 95%: the whole range, and what it covers
    assert median_ci([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0, pytest.approx(1 - 2 / 32))
    assert median_ci([7.0]) == (7.0, 7.0, 0.0)
    assert median_ci(list(range(1, 11)), confidence=0.5)[:2] == (4, 7)  # narrower when less is asked
    with pytest.raises(ValueError):
        median_ci([])


@pytest.mark.parametrize("n", [6, 7, 10, 13, 30])
def test_median_ci_coverage_is_exact_and_the_narrowest(n: int) -> None:
    low, high, coverage = median_ci(list(range(1, n + 1)))
    k = low  # values 1..n: the k-th order statistic is k
    assert high == n + 1 - k
    assert coverage == pytest.approx(1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n) and coverage >= 0.95
    narrower = 1 - 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    assert k + 1 > (n + 1) // 2 or narrower < 0.95


def test_rotate_puts_every_side_first_once() -> None:
    orders = [stats.rotate(list(SIDES), r) for r in range(len(SIDES))]
    assert {o[0] for o in orders} == set(SIDES)
    assert all(sorted(o) == sorted(SIDES) for o in orders)
    assert stats.rotate(list(SIDES), len(SIDES)) == list(SIDES)


def test_paired_ratios_and_differences_per_round() -> None:
    rounds = rounds_of((10.0, 11.0), (20.0, 20.0), (10.0, 12.0))
    rounds.append({"runs": {"reference": summary(10.0)}, "weights": {}})  # the side did not run this round
    assert stats.paired(rounds, "lightning", "steady_ms", "ratio") == pytest.approx([1.1, 1.0, 1.2])
    assert stats.paired(rounds, "lightning", "first_step_s", "diff") == pytest.approx([1.0, 1.0, 1.0])
    st = stats.side_stats(rounds, "lightning")
    assert st["rounds"] == 3
    assert st["steady_ms"]["median"] == pytest.approx(1.1)
    assert (st["steady_ms"]["min"], st["steady_ms"]["max"]) == pytest.approx((1.0, 1.2))
    assert st["peak_rss_mib"]["median"] == pytest.approx(341.0 / 310.0)  # the largest rank of each side
    assert st["weights"] == {"bitwise_equal": 1, "rounds": 3, "max_abs_diff": 1e-6}
    assert st["absolute"]["steady_ms"] == 12.0
    assert "steady_ms" not in stats.side_stats(rounds, "reference")  # the reference: its own medians only
    assert stats.weights_text(st["weights"]) == "1/3 bitwise, max 1.0e-06"
    assert stats.weights_text({"bitwise_equal": 2, "rounds": 2, "max_abs_diff": 0.0}) == "bitwise 2/2"


def result_of(rounds: list[dict], sides: list[str], skipped: dict[str, str]) -> dict:
    return {"params": {"arch": "cnn", "world": 2, "batch": 64, "threads": 1}, "n": 20,
            "machine": {"cpu": "x", "cores": 2, "ram_gib": 1.0, "python": "3", "torch": "t", "git_commit": "abc",
                        "harness_source": "d"},
            "versions": {"torch": "t"}, "sides": sides, "skipped": skipped, "load_start": [1.0], "load_end": [1.0],
            "stats": {s: stats.side_stats(rounds, s) for s in sides if s not in skipped},
            "notes": [f"{s} skipped: {w}" for s, w in skipped.items()]}


def test_table_and_json_lines() -> None:
    rounds = rounds_of((10.0, 11.0), (20.0, 20.0))
    result = result_of(rounds, ["reference", "lightning", "accelerate"], {"accelerate": f"not installed: {INSTALL}"})
    text = stats.table(result)
    assert "lightning" in text and "95% CI" in text and "1/2 bitwise" in text and INSTALL in text
    lines = stats.json_lines(result)
    assert len(lines) == 3 and all(line.startswith(PREFIX) for line in lines)
    ref, light, acc = map(json.loads, lines)
    assert ref["name"] == "reference" and ref["vs"] is None and ref["absolute"]["steady_ms"] == 15.0
    assert light["vs"] == "reference" and light["steady_ms_ratio"]["median"] == pytest.approx(1.05)
    assert light["first_step_s_diff"]["kind"] == "diff" and len(light["exit_s_diff"]["ci"]) == 2
    assert light["git"] == "abc" and light["machine"]["cores"] == 2
    assert acc["skipped"].endswith(INSTALL) and "steady_ms_ratio" not in acc


def test_a_missing_peer_is_skipped_with_the_install_hint() -> None:
    sides, skipped = choose_sides(["harness", "lightning", "accelerate"], installed=lambda name: None)
    assert sides == ["reference", "reference-aa", "harness"]
    assert set(skipped) == {"lightning", "accelerate"} and all(INSTALL in why for why in skipped.values())
    assert choose_sides(["reference"], installed=lambda name: object())[0] == ["reference", "reference-aa"]
    with pytest.raises(SystemExit, match="unknown side"):
        choose_sides(["pytorch-ignite"])


def test_peer_batches_and_schedule_are_the_references() -> None:
    order = epoch_order(64 * 5, seed=3)
    assert sorted(order) == list(range(320)) and order == epoch_order(320, seed=3)
    ranks = [rank_batches(order, 64, r, 2) for r in range(2)]
    assert all(len(b) == 5 and all(len(x) == 32 for x in b) for b in ranks)
    assert [i for s in range(5) for r in range(2) for i in ranks[r][s]] == order  # global batch s = slices of ranks
    f = lr_lambda(10)
    assert (f(0), f(5), f(10), f(20)) == pytest.approx((1.0, 0.5, 0.0, 0.0))
    assert lr_lambda(10, cosine=False)(7) == 1.0


def test_peers_are_an_extra_never_a_dependency_of_the_harness() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0] for d in project["dependencies"]}
    assert "torch" in names and not names & {"lightning", "accelerate", "pytorch-lightning"}
    peers = project["optional-dependencies"]["peers"]
    assert {p.split("==")[0] for p in peers} == {"lightning", "accelerate"} and all("==" in p for p in peers)
    imports = [p for p in (REPO / "harness").rglob("*.py")
               if any(w in p.read_text() for w in ("import lightning", "import accelerate", "from accelerate"))]
    assert imports == []


@pytest.mark.slow
@pytest.mark.parametrize("group", ["harness", "lightning", "accelerate"])
def test_driver_runs_each_side_for_a_few_steps(tmp_path: Path, group: str) -> None:
    # one round of tiny N at world 2 (the real gloo path); the reference and its A/A twin run in every group
    if group == "harness":
        sides = "harness-torchrun,harness"
    else:
        pytest.importorskip(group, reason=f"{group} is not installed (the peers extra: {INSTALL})")
        sides = group
    args = ["--sides", sides, "--rounds", "1", "--warmup", "0", "--n", "10", "--log-every", "10",
            "--budget-s", "200", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "bench.peers", *args], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines and proc.stdout.rstrip().splitlines()[-len(lines):] == lines  # at the very end
    rows = {r["name"]: r for r in map(json.loads, lines)}
    assert all(line.startswith(PREFIX) for line in lines)
    assert set(rows) == {"reference", "reference-aa", *sides.split(",")}
    for name, row in rows.items():
        if name != "reference":
            assert row["weights"] == {"bitwise_equal": 1, "rounds": 1, "max_abs_diff": 0.0}, name
            assert row["steady_ms_ratio"]["n"] == 1 and row["rounds"] == 1
    (result,) = tmp_path.glob("*-peers-cnn-x2.json")
    data = json.loads(result.read_text())
    assert len(data["rounds"]) == 1 and set(data["rounds"][0]["runs"]) == set(rows)
    assert "steady ms/step" in proc.stdout
