"""Starting worker processes on this node through PyTorch's elastic launcher (torchrun's engine).

Owns: the LaunchConfig (c10d rendezvous on 127.0.0.1:0, restarts from `dist.max_restarts`), the
environment the workers inherit (CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS as torchrun sets it,
HARNESS_RUN_ID so every worker names the same run directory), and turning a worker failure into an
exit code. Workers are `python -m harness.train <the job's overrides>`, the same command torchrun
would run, so launcher mode and torchrun mode share one worker path.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import psutil
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from harness import errors, incidents, watchdog
from harness.config import HANDED
from harness.devices import DevicePlan


def worker_environment(plan: DevicePlan, run_id: str, omp_threads: int, environ: Mapping[str, str],
                       max_restarts: int = 0) -> dict[str, str]:
    """Variables to set for the workers (pure). OMP_NUM_THREADS: the user's value wins; else
    `dist.omp_threads`; else torchrun's rule (1 when several processes share the node)."""
    env = {"HARNESS_RUN_ID": run_id, "HARNESS_LAUNCHED": "1"}
    if max_restarts > 0:
        # The agent's shared TCPStore keeps the last attempt's keys, and restarted gloo/NCCL groups
        # may read the dead workers' addresses (pytorch/pytorch#135712): give each attempt its own.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if plan.cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = plan.cuda_visible_devices
    if "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = str(omp_threads or (1 if plan.nproc > 1 else os.cpu_count() or 1))
    return env


@contextmanager
def patched_environ(changes: Mapping[str, str]) -> Iterator[None]:
    """Set variables for the duration (workers inherit them), then restore: a multirun's next job
    must start from the user's environment, not ours."""
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def forwarding(signal_name: str) -> Iterator[None]:
    """Pass the preemption signal on to every descendant (the workers) instead of dying of it.

    Its default action would kill the launcher and orphan the workers; Slurm may signal only the
    launcher, or every process of the step (then the workers see it twice: it only sets a flag)."""
    signum = getattr(signal, signal_name)

    def forward(sig: int, frame: object) -> None:
        for child in psutil.Process().children(recursive=True):
            try:
                child.send_signal(sig)
            except psutil.Error:
                pass

    previous = signal.signal(signum, forward)
    try:
        yield
    finally:
        signal.signal(signum, previous)


# the agent's own lines that ours restate (the cause, the signal, the last checkpoint) with the right rank
_AGENT_NOISE = ("death signal, shutting down workers", "closing signal", "failed (exitcode:")


def _restated(record: logging.LogRecord) -> bool:
    return not any(text in record.getMessage() for text in _AGENT_NOISE)


@contextmanager
def quiet_agent() -> Iterator[None]:
    """Drop the elastic agent's lines that the launcher restates: a user error or Ctrl-C then reads
    as one line, not as a wall of W/E lines naming whichever rank the agent stopped last."""
    loggers = [logging.getLogger(n) for n in ("torch.distributed.elastic.agent.server.api",
                                               "torch.distributed.elastic.multiprocessing.api")]
    for lg in loggers:
        lg.addFilter(_restated)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(_restated)


def launch_workers(plan: DevicePlan, *, run_id: str, overrides: list[str], max_restarts: int,
                   omp_threads: int, forward: str = "SIGUSR2", run_dir: Path | None = None, config: str = "") -> int:
    """Run `plan.nproc` workers to completion; return the exit code for the launcher. They get
    `overrides` on their command line, and `config` (config.hand_over: the composition those
    overrides made here) so that they need not compose them again.

    A lost or failed rank that the workers' watchdogs recorded in `run_dir`/incidents.jsonl during
    this launch becomes one line per incident instead of the agent's summary (exit EXIT_PEER_LOST
    when a rank was lost; 1 when one failed)."""
    started = time.time()
    agent = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=plan.nproc,
        run_id=run_id,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=max_restarts,
        monitor_interval=0.1,
        local_addr="127.0.0.1",
    )
    handed = {HANDED: config} if config else {}
    with patched_environ({**worker_environment(plan, run_id, omp_threads, os.environ, max_restarts), **handed}), \
            forwarding(forward), quiet_agent():
        try:
            elastic_launch(agent, sys.executable)("-u", "-m", "harness.train", *overrides)
        except ChildFailedError as exc:
            found = incidents.read(run_dir, since=started) if run_dir is not None else []
            if any(f.exitcode == errors.EXIT_USER_ERROR for f in exc.failures.values()) and \
                    all(i.get("extra", {}).get("user_error") for i in found):
                return errors.EXIT_USER_ERROR  # the rank that hit it said `error: ...`; its peers, one line each
            lost = any(i["kind"] != "failed" for i in found)
            for incident in found:
                print(f"error: {'' if lost else 'worker(s) failed: '}{incident['line']}", file=sys.stderr)
            if found:
                return watchdog.EXIT_PEER_LOST if lost else 1
            # the failing rank's traceback was printed by the worker (@record); this names the rank
            print(f"error: worker(s) failed:\n{exc.format_msg()}", file=sys.stderr)
            return 1
        except SignalException as exc:  # SIGTERM/SIGINT/SIGHUP reached the agent: it passed it on, and waited
            print(stopped_line(exc.sigval.name, run_dir, run_id), file=sys.stderr)
            return 128 + int(exc.sigval)
    return 0


def stopped_line(signal_name: str, run_dir: Path | None, run_id: str) -> str:
    """The one line for a launcher stopped by a signal: what happened, the checkpoint a rerun
    resumes from, and how to rerun (the run id names the run directory)."""
    from harness.checkpoint.store import resolve

    what = "interrupted" if signal_name == "SIGINT" else f"stopped by {signal_name}"
    found = resolve(run_dir) if run_dir is not None else []
    where = f"last checkpoint {found[0].parent}" if found else "no checkpoint yet"
    return f"{what}: {where}; HARNESS_RUN_ID={run_id} and the same command resume it"
