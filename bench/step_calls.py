"""What one step of each loop calls, counted: a measure of the loop's own cost that no noise moves.

    python -m bench.step_calls                # 1 process: the harness's fit against bench/reference.py
    torchrun --standalone --nproc-per-node 2 -m bench.step_calls

On a shared 2-core machine a step's time wanders by up to 2x from one second to the next, so a
1% difference in the loop's own overhead is below what timing resolves. Counting is exact: each
side trains twice in this process, for S and for 2S steps (one epoch each, logging every
`--log-every`), under `sys.setprofile` (every Python function call and every call of a C function:
a lock's acquire, a store's get, a builtin) and a `TorchFunctionMode` (every call into torch's
Python API: a tensor op); the difference between the two runs, divided by S, is what one step
calls, with set-up, evaluation and checkpointing cancelled out. Reported per side, and the calls
the harness makes a step that the reference does not, by name.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.overrides import TorchFunctionMode

from bench import inproc
from harness.runtime import session


class Counting(TorchFunctionMode):
    """Counts calls by kind and name while active (Python functions, C functions, torch functions)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.counts["torch", getattr(func, "__qualname__", None) or str(func)] += 1
        return func(*args, **(kwargs or {}))

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            self.counts["python", f"{Path(code.co_filename).name}:{code.co_name}"] += 1
        elif event == "c_call":
            self.counts["c", getattr(arg, "__qualname__", None) or repr(arg)] += 1

    def __enter__(self) -> Counting:
        super().__enter__()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)
        super().__exit__(*exc)


def count(side: str, args: argparse.Namespace, steps: int, out: Path, s: Any) -> collections.Counter:
    run = argparse.Namespace(**{**vars(args), "n": (steps - 1) // 3})  # inproc's runs take 3N + 1 steps
    with Counting() as c:
        if side == "reference":
            inproc.reference_round(run, out, s)
        else:
            inproc._harness_fit(run, out, s)
    return c.counts


def per_step(args: argparse.Namespace, s: Any, tmp: Path) -> dict[str, Any]:
    """Per-step counts of both sides, from runs of S + 1 and 2S + 1 steps."""
    short, long = args.steps + 1, 2 * args.steps + 1
    result: dict[str, Any] = {"steps": args.steps, "sides": {}}
    by_name = {}
    for side in ("reference", "harness"):
        count(side, args, short, tmp / f"{side}-warm-up", s)  # first-use imports (torch._dynamo, ...) out of the way
        a = count(side, args, short, tmp / f"{side}-a", s)
        b = count(side, args, long, tmp / f"{side}-b", s)
        diff = {k: (b[k] - a.get(k, 0)) / args.steps for k in b}
        by_name[side] = diff
        result["sides"][side] = {kind: round(sum(v for (k, _), v in diff.items() if k == kind), 2)
                                 for kind in ("python", "c", "torch")}
    ref, har = by_name["reference"], by_name["harness"]
    extra = {f"{kind} {name}": round(v - ref.get((kind, name), 0.0), 2) for (kind, name), v in har.items()}
    extra.update({f"{kind} {name}": -round(v, 2) for (kind, name), v in ref.items() if (kind, name) not in har})
    result["harness_minus_reference"] = dict(sorted(((k, v) for k, v in extra.items() if abs(v) >= 0.05),
                                                    key=lambda kv: -abs(kv[1])))
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--steps", type=int, default=60, help="S (a multiple of --log-every and of trainer.check_every)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the result (rank 0)")
    args = p.parse_args(argv)
    tmp = Path(args.out).with_suffix(".runs") if args.out else Path("/tmp/harness-step-calls")
    if int(os.environ.get("RANK", 0)) == 0:  # a previous invocation's run directories would be resumed
        shutil.rmtree(tmp, ignore_errors=True)
    with session(device="cpu", run_root=str(tmp), run_id_override="calls", liveness=None) as s:
        result = {"arch": args.arch, "world_size": s.world_size, **per_step(args, s, tmp / "calls")}
    if s.rank == 0:
        text = json.dumps(result, indent=1)
        if args.out:
            Path(args.out).write_text(text)
        print(text)


if __name__ == "__main__":
    main()
