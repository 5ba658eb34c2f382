"""`python -m harness.slurm prelude|epilogue`: what every scripts/slurm/*.sbatch does around its step.

Owns the batch script's decisions, written once instead of copied into six scripts:
- prelude (before the step): compose and check the config with the workers' overrides (a typo ends
  the job with exit 2 before any srun), check HARNESS_MAX_REQUEUES, find the run directory (the
  run-id rule of harness/env.py: the same after a requeue), the first node (the hostlist parser: no
  scontrol inside the job) and the rendezvous port; clear the last attempt's PREEMPTED marker; print
  shell assignments and the attempt line for the script to `eval`;
- epilogue (after the step): from the step's exit code, the PREEMPTED marker and this attempt's
  incidents, decide whether to requeue (preempted: exit 3; a peer lost: exit 4), bounded by
  HARNESS_MAX_REQUEUES, and do it (`scontrol requeue`, then the task count reset). The same
  `requeue` serves a preempted point of a submitit sweep (harness/train.py calls it there).

The scripts find this module with `$PYTHON -m`, never by their own path (under sbatch a script
runs from Slurm's spool copy). What stays in each script's shell: the step itself, the signal traps
and the wait loop (the batch shell is what Slurm signals, and bash `wait` returns early on a
trapped signal). The decisions are pure functions over a Mapping; `main` passes os.environ.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf.errors import OmegaConfBaseException

from harness.config import ConfigError, compose, to_config
from harness.env import SLURM_PORT_BASE, SLURM_PORT_SPAN, parse_hostlist, run_id
from harness.failures import EXIT_PEER_LOST, EXIT_PREEMPTED

MAX_REQUEUES = 50  # requeues a job may have (SLURM_RESTART_COUNT) before the next one is refused
EXIT_USER_ERROR = 2


def max_requeues(environ: Mapping[str, str]) -> int:
    raw = environ.get("HARNESS_MAX_REQUEUES", "")
    if raw == "":
        return MAX_REQUEUES
    if not raw.isdigit():
        raise ConfigError(f"HARNESS_MAX_REQUEUES={raw!r} is not a whole number >= 0 (the most requeues a job "
                          f"may have; default {MAX_REQUEUES})")
    return int(raw)


@dataclass(frozen=True)
class Attempt:
    """This attempt of the job, as the batch script needs it."""

    run_dir: Path
    first_node: str
    port: int
    number: int  # 1 for the first run, 2 after one requeue...
    started: float  # wall time: incidents at or after it are this attempt's

    def shell(self, environ: Mapping[str, str]) -> str:
        """Assignments for the script's `eval`, and the attempt line that tests and people read."""
        line = (f"harness: job {environ['SLURM_JOB_ID']} attempt {self.number} on {environ['SLURM_JOB_NODELIST']} "
                f"(batch host {os.uname().nodename}, port {self.port}); run directory {self.run_dir}")
        q = shlex.quote
        return "\n".join([f"RUN_DIR={q(str(self.run_dir))}", f"FIRST_NODE={q(self.first_node)}",
                          f"PORT={self.port}", f"STARTED={self.started!r}", "export FIRST_NODE PORT",
                          f"printf '%s\\n' {q(line)}", ""])


def attempt(overrides: Sequence[str], environ: Mapping[str, str], now: float) -> Attempt:
    """Compose and check the config (ConfigError: the key, the value, what is valid) and locate the attempt."""
    cfg = to_config(compose(overrides))
    max_requeues(environ)  # a bad value fails now, not after hours of training
    rid = run_id(environ)
    if rid is None:
        raise ConfigError("SLURM_JOB_ID is not set: python -m harness.slurm runs inside a batch script")
    return Attempt(run_dir=Path(cfg.run_root) / rid, first_node=parse_hostlist(environ["SLURM_JOB_NODELIST"])[0],
                   port=SLURM_PORT_BASE + int(environ["SLURM_JOB_ID"]) % SLURM_PORT_SPAN,
                   number=int(environ.get("SLURM_RESTART_COUNT") or 0) + 1, started=now)


def lost_peers(run_dir: Path, since: float) -> str:
    """This attempt's losses in incidents.jsonl, one line each ('; '-joined); a rank's own failure
    ("failed") is not a loss: requeueing would repeat it."""
    from harness import incidents

    return "; ".join(i["line"] for i in incidents.read(run_dir, since) if i["kind"] != "failed")


def decide(rc: int, *, terminated: bool, preempted: bool, lost: str) -> tuple[str, int] | None:
    """(why, exit code) when the job should go back to the queue; None: leave with the step's rc.

    Preempted: the workers saved at a step boundary, wrote PREEMPTED and exited 0. A peer lost: the
    step failed and this attempt's incidents name a loss. SIGTERM to the script (scancel, the time
    limit) never requeues."""
    if terminated:
        return None
    if rc == 0 and preempted:
        return "preempted", EXIT_PREEMPTED
    if rc != 0 and lost:
        return "a peer was lost", EXIT_PEER_LOST
    return None


def job_spec(environ: Mapping[str, str]) -> str:
    """This job for scontrol: an array task as <array job>_<task> (its SLURM_JOB_ID is not always its own)."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ["SLURM_JOB_ID"]


def in_sweep_job(environ: Mapping[str, str]) -> bool:
    """A point of a Hydra sweep run by submitit (hydra/launcher=slurm): its batch script is submitit's."""
    return environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in environ


def requeue(why: str, code: int, run_dir: Path | None, environ: Mapping[str, str]) -> int:
    """Put the job back in the queue (it keeps its id, so the next attempt resumes in its run directory)
    and return `code`; refuse beyond HARNESS_MAX_REQUEUES. SIGTERM is ignored from here on, in this
    process and its children: the requeue sends it to every process of the job (SIGKILL after
    KillWait), and the task count update must still run."""
    job, limit = job_spec(environ), max_requeues(environ)
    where = f"{run_dir}/checkpoints/latest" if run_dir is not None else "its newest checkpoint"
    if int(environ.get("SLURM_RESTART_COUNT") or 0) >= limit:
        resume = f"; resume it with trainer.resume={run_dir}" if run_dir is not None else ""
        print(f"harness: {why} after {limit} requeues already (HARNESS_MAX_REQUEUES={limit}); not requeueing"
              f"{resume}", file=sys.stderr, flush=True)
        return code
    print(f"harness: {why}; requeueing job {job} (it resumes from {where})", flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if subprocess.run(["scontrol", "requeue", job]).returncode != 0:
        print(f"harness: job {job} not requeued (Slurm refused: submitted with --no-requeue?)",
              file=sys.stderr, flush=True)
        return code
    # Slurm keeps the task count of the first allocation (--nodes=1-2 x 2 a node: 4) for the requeued
    # job, which would then wait for every node it had: one node's worth (what a fresh submission
    # starts from) lets --nodes=MIN-MAX place it on the nodes that are up
    if environ.get("SLURM_NTASKS_PER_NODE"):
        subprocess.run(["scontrol", "update", f"JobId={job}", f"NumTasks={environ['SLURM_NTASKS_PER_NODE']}"])
    return code


def epilogue(rc: int, terminated: bool, run_dir: Path, since: float, environ: Mapping[str, str]) -> int:
    """The script's exit code after a step that ended with `rc`; requeues the job when it should."""
    lost = lost_peers(run_dir, since) if rc != 0 and not terminated else ""
    verdict = decide(rc, terminated=terminated, preempted=(run_dir / "PREEMPTED").exists(), lost=lost)
    if verdict is None:
        return rc
    if lost:
        print(f"harness: a peer was lost: {lost}", flush=True)
    return requeue(*verdict, run_dir, environ)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.slurm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("prelude", help="check the config, print shell for eval (run directory, first node, port)")
    pre.add_argument("overrides", nargs="*", help="the workers' Hydra overrides")
    post = sub.add_parser("epilogue", help="after the step: requeue if preempted or a peer was lost; exit code")
    post.add_argument("--rc", type=int, required=True, help="the step's exit code")
    post.add_argument("--terminated", action="store_true", help="the script got SIGTERM: never requeue")
    post.add_argument("--run-dir", type=Path, required=True)
    post.add_argument("--since", type=float, required=True, help="the attempt's start (wall time)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "epilogue":
        return epilogue(args.rc, args.terminated, args.run_dir, args.since, os.environ)
    try:
        found = attempt(args.overrides, os.environ, time.time())
    except (ConfigError, OmegaConfBaseException) as exc:  # OmegaConf's: a missing value, a bad interpolation
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    (found.run_dir / "PREEMPTED").unlink(missing_ok=True)  # left by the attempt before a requeue: old news
    print(found.shell(os.environ), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
