"""The step loop's own overhead, in one process: `harness.fit` against the reference's loop.

    python -m bench.inproc --rounds 12 --out result.json                         # world size 1
    torchrun --standalone --nproc-per-node 2 -m bench.inproc --out result.json   # 2 ranks, gloo

Separate commands (bench/run.py) measure what a user gets, but on a shared machine two processes
seldom get the same share of a core, so their medians wander by more than the few percent in
question. Here both loops run in one process (per rank), alternately, round after round, on the
same data and the same seeded model: the harness through its Python API (`session`, so logging
goes where a real run's does, and `fit` with a run directory, so metrics and checkpoints are
written as in a real run), the reference through `bench.reference.train`. The
steady window's blocks of `log_every` steps (each ends with one logging step) are pooled per side,
in wall time and in this process's CPU time (which a busy machine disturbs much less); their low
quantiles are what each loop costs when the core is its own. The weights are compared
too: both loops must do the same work.

The harness runs twice per round, with the liveness watchdog (harness/watchdog.py) and without it
(`dist.watchdog=false`), in alternating order: the session itself starts none, and the "harness"
side starts one for its own round only, so neither the reference nor the "no watchdog" side shares
the CPU with its thread. With one process there is no watchdog: that A/B is an A/A (the noise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path

import torch
from torch import nn

from bench import reference
from bench.data import Synthetic
from bench.runs import cosine_schedule
from harness import watchdog
from harness.batching import plan_batch
from harness.config import TrainerConfig
from harness.engine import fit
from harness.metrics import Accuracy
from harness.runtime import Session, seed_everything, session


def blocks_ms(ds: Synthetic, n: int, log_every: int) -> dict[str, list[float]]:
    """ms per step of each `log_every`-step block between fetches N and 3N, in wall and in CPU time."""
    assert ds.clock is not None
    out = {}
    for clock, t in (("wall", ds.clock.times), ("cpu", ds.clock.cpu_times)):
        out[clock] = [(t[k + log_every] - t[k]) / log_every * 1e3 for k in range(n, 3 * n, log_every)]
    return out


def reference_round(args: argparse.Namespace, out: Path,
                    session: Session) -> tuple[dict[str, list[float]], dict]:
    ref_args = reference.parse_args([f"--arch={args.arch}", f"--steps={3 * args.n + 1}", f"--batch={args.batch}",
                                     f"--log-every={args.log_every}", f"--seed={args.seed}", f"--out={out}",
                                     f"--schedule={'cosine' if cosine_schedule() else 'constant'}"])
    model, train_set = reference.train(ref_args, session.rank, session.world_size, session.device)
    return blocks_ms(train_set, args.n, args.log_every), model.state_dict()


def harness_round(args: argparse.Namespace, out: Path, session: Session,
                  watched: bool) -> tuple[dict[str, list[float]], dict]:
    if watched:  # as a real run has it; a collective, like the session's own start
        watchdog.start(watchdog.WatchdogConfig())
    try:
        return _harness_fit(args, out, session)
    finally:
        watchdog.stop()


def _harness_fit(args: argparse.Namespace, out: Path, session: Session) -> tuple[dict[str, list[float]], dict]:
    data = {"steps": 3 * args.n + 1, "batch": args.batch, "log_every": args.log_every, "seed": args.seed}
    train_set = Synthetic(split="train", out=str(out), **data)
    val_set = Synthetic(split="val", **data)
    seed_everything(args.seed)
    model = reference.ARCHS[args.arch]()
    optimizer = torch.optim.SGD(model.parameters(), **reference.SGD)
    run_dir = session.run_dir / out.name  # fresh (a new name each round): nothing to resume
    run_dir.mkdir(exist_ok=True)  # every rank's, and the ranks share it
    fit(model=model, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(), metric=Accuracy(), train_set=train_set,
        val_set=val_set, batch=plan_batch(args.batch, session.world_size),
        trainer=TrainerConfig(epochs=1, log_every=args.log_every), device=session.device, run_dir=run_dir,
        seed=args.seed)
    return blocks_ms(train_set, args.n, args.log_every), model.state_dict()


def quantiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=20)
    return {"p5": q[0], "p10": q[1], "p25": q[4], "p50": statistics.median(values), "n": len(values)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="mlp", choices=sorted(reference.ARCHS))
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--n-steps", dest="n", type=int, default=200, help="N: the steady window is steps N..3N of each run")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON file for the result")
    args = p.parse_args(argv)
    sides = ("reference", "harness", "harness-no-watchdog")
    pooled: dict[str, dict[str, list[float]]] = {c: {side: [] for side in sides} for c in ("cpu", "wall")}
    round_ratios: dict[str, list[float]] = {"cpu": [], "wall": []}
    equal = 0
    # one run directory for every rank (the session checks that they share it), next to the result
    tmp = str(Path(args.out).with_suffix(".runs"))
    if int(os.environ.get("RANK", 0)) == 0:  # a previous invocation's run directories would be resumed
        shutil.rmtree(tmp, ignore_errors=True)
    with session(device="cpu", run_root=tmp, run_id_override="inproc", liveness=None) as s:
        for i in range(args.rounds + 1):  # round 0 warms up
            ref, ref_state = reference_round(args, Path(tmp) / f"r{i}", s)
            # the two harness sides swap places every round: the later run of two tends to be faster
            if i % 2:
                bare, _ = harness_round(args, Path(tmp) / f"b{i}", s, watched=False)
            har, har_state = harness_round(args, Path(tmp) / f"h{i}", s, watched=True)
            if not i % 2:
                bare, _ = harness_round(args, Path(tmp) / f"b{i}", s, watched=False)
            equal += all(torch.equal(ref_state[k], har_state[k]) for k in ref_state)
            for c in ("cpu", "wall"):
                if i:
                    for side, blocks in zip(sides, (ref, har, bare), strict=True):
                        pooled[c][side] += blocks[c]
                    round_ratios[c].append(statistics.median(har[c]) / statistics.median(ref[c]))
    q = {c: {side: quantiles(v) for side, v in by_side.items()} for c, by_side in pooled.items()}
    ratios = {c: {k: q[c]["harness"][k] / q[c]["reference"][k] for k in ("p5", "p10", "p25", "p50")} for c in q}
    watchdog_ab = {c: {k: q[c]["harness"][k] / q[c]["harness-no-watchdog"][k] for k in ("p10", "p50")} for c in q}
    result = {"arch": args.arch, "rounds": args.rounds, "n": args.n, "batch": args.batch, "log_every": args.log_every,
              "world_size": s.world_size, "threads": torch.get_num_threads(), "quantiles_ms": q, "ratios": ratios,
              "watchdog_ab": watchdog_ab, "round_ratios": round_ratios,
              "weights_equal_rounds": equal, "blocks_ms": pooled}
    if s.rank == 0:  # rank 0's clock: DDP keeps the ranks in step
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
