"""zero_first release latency: from the master leaving the body to the others resuming.

    torchrun --standalone --nproc-per-node 2 -m bench.zero_first --rounds 20 --out result.json

Each round: all ranks line up (a barrier), the master holds the body for `--hold` seconds (the others
are then surely waiting) and stamps `time.monotonic()` as the body's last statement; each other rank
stamps the clock as the body's first statement. The same rounds with `dist.barrier()` in place of
zero_first (what a hand-written "rank 0 first" does) give the yardstick. CLOCK_MONOTONIC is one
clock for all processes on the machine, so the stamps subtract across ranks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch.distributed as dist

from harness.zero_first import zero_first


def measure(rounds: int, hold_s: float) -> dict[str, list[float]]:
    """Per round, the latest waiter's resume minus the master's exit, in ms (filled in on rank 0)."""
    master = dist.get_rank() == 0
    stamps: dict[str, list[float]] = {"zero_first": [], "barrier": []}
    for _ in range(rounds):
        dist.barrier()
        with zero_first("bench-latency"):
            if master:
                time.sleep(hold_s)
            stamps["zero_first"].append(time.monotonic())
        dist.barrier()
        if master:
            time.sleep(hold_s)
            stamps["barrier"].append(time.monotonic())
        dist.barrier()
        if not master:
            stamps["barrier"].append(time.monotonic())
    everyone: list[dict[str, list[float]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, stamps)
    out: dict[str, list[float]] = {}
    for key in stamps:
        left = everyone[0][key]  # type: ignore[index]
        resumed = [max(s[key][i] for s in everyone[1:]) for i in range(rounds)]  # type: ignore[index]
        out[key] = [(r - m) * 1e3 for r, m in zip(resumed, left, strict=True)]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--hold", type=float, default=0.05, help="seconds the master spends in the body")
    p.add_argument("--out", required=True, help="JSON file rank 0 writes")
    args = p.parse_args(argv)
    dist.init_process_group("gloo")
    try:
        if dist.get_world_size() < 2:
            raise SystemExit("bench.zero_first needs at least 2 processes (torchrun --nproc-per-node 2)")
        result = measure(args.rounds, args.hold)
        if dist.get_rank() == 0:
            Path(args.out).write_text(json.dumps({"rounds": args.rounds, "hold_s": args.hold,
                                                  "world_size": dist.get_world_size(), "latency_ms": result}))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
