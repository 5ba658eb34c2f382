"""Entry point: `python -m harness.train [overrides]`, also under torchrun and srun.

Detects how it was started (harness/env.py) and takes one of two paths:
- launcher: Hydra composes the config (overrides, multirun, --help, --cfg); we check devices and
  batch before anything starts, choose the run id, then train here (one process) or start the
  workers through the elastic launcher (harness/launch.py), each running this same module;
- worker (torchrun, srun, or our own launcher's children): compose the same overrides without
  Hydra's run directories or logging, and run the job as this process's rank.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record

from harness import errors, preempt, rundir, slurm
from harness.batching import plan_batch
from harness.config import (
    ConfigError,
    compose,
    conf_dir,
    hand_over,
    handed,
    quote_device_override,
    register_configs,
    to_config,
)
from harness.devices import count_visible_gpus, place
from harness.env import detect, run_id
from harness.job import run_job
from harness.launch import launch_workers, patched_environ, stopped_line

EXIT_USER_ERROR = errors.EXIT_USER_ERROR


def launch(cfg: DictConfig) -> int:
    """Launcher mode for one (multirun: each) job; returns the exit code."""
    hc = HydraConfig.get()
    job_num = hc.job.num if hc.mode == RunMode.MULTIRUN else None
    c = to_config(cfg)
    placement = place(c.device, shape="launcher", visible_gpus=count_visible_gpus(),
                      current_mask=os.environ.get("CUDA_VISIBLE_DEVICES"),
                      cuda_initialized=torch.cuda.is_initialized(), nproc=c.dist.nproc)
    plan = placement.plan
    plan_batch(c.data.batch_size, plan.nproc, c.trainer.accumulate)
    rid = run_id(os.environ, job_num) or rundir.create_unique(Path(c.run_root), _sweep_stem(job_num)).name
    if plan.nproc == 1:  # trains here, on the devices place() chose (the workers' rule: harness/runtime.py)
        env = {"CUDA_VISIBLE_DEVICES": placement.mask} if placement.mask else {}
        with patched_environ({**env, "HARNESS_LAUNCHED": "1"}):
            result = run_job(cfg, run_id=rid)
        if result.stopped in ("terminated", "interrupted"):  # the same line as with workers
            print(stopped_line("SIGINT" if result.stopped == "interrupted" else "SIGTERM", Path(c.run_root) / rid,
                               rid), file=sys.stderr)
        return exit_code(result.stopped)
    code = launch_workers(plan, run_id=rid, config=hand_over(cfg),
                          overrides=[*list(hc.overrides.task), *_search_path_override(hc)],
                          max_restarts=c.dist.max_restarts, omp_threads=c.dist.omp_threads,
                          forward=c.trainer.preempt_signal, run_dir=Path(c.run_root) / rid)
    if code == 0 and preempt.was_preempted(Path(c.run_root) / rid):
        return preempt.EXIT_PREEMPTED
    return code


def exit_code(stopped: str) -> int:
    """Preempted: 3, so a script requeues; terminated (SIGTERM): 143, never requeued; interrupted
    (Ctrl-C): 130; else 0."""
    return {"preempted": preempt.EXIT_PREEMPTED, "terminated": preempt.EXIT_TERMINATED,
            "interrupted": preempt.EXIT_INTERRUPTED}.get(stopped, 0)


_SWEEP_STAMP: list[str] = []


def _sweep_stem(job_num: int | None) -> str | None:
    """In a multirun, every job's directory shares the sweep's start time: <stamp>_<job number>."""
    if job_num is None:
        return None
    if not _SWEEP_STAMP:
        _SWEEP_STAMP.append(rundir.timestamp())
    return f"{_SWEEP_STAMP[0]}_{job_num}"


def _search_path_override(hc) -> list[str]:
    """Workers compose with conf/ only: hand them the user's extra config dirs (--config-dir,
    hydra.searchpath) as one hydra.searchpath override."""
    paths = [s.path for s in hc.runtime.config_sources
             if s.provider in ("command-line", "hydra.searchpath in command-line") and s.schema == "file"]
    return [f"hydra.searchpath=[{','.join('file://' + p for p in paths)}]"] if paths else []


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    _JOBS_STARTED.append(1)
    with errors.reporting():  # inside Hydra's call: a multirun's failing job says why in one line
        code = launch(cfg)
        if code == preempt.EXIT_PREEMPTED and slurm.in_sweep_job(os.environ):  # a submitit sweep's point
            code = slurm.requeue("preempted", code, None, os.environ)
    if code:
        sys.exit(code)


@record
def worker(argv: list[str]) -> None:
    """Worker mode: same overrides, no Hydra run directory or log files, this process's rank."""
    with errors.reporting(interrupted=None):  # Ctrl-C reaches every rank: the launcher says it once
        flags = [a for a in argv if a.startswith("-")]
        if flags:
            raise ConfigError(f"{flags[0]!r}: under torchrun or srun pass overrides only "
                              "(sweeps with -m run from the launcher: python -m harness.train -m ...)")
        cfg = handed(os.environ) or compose(argv)  # compose: ConfigError in Hydra's words
        result = run_job(cfg, run_id=run_id(os.environ))
    if result.stopped in ("terminated", "interrupted"):  # preempted workers exit 0: the agent must not restart them
        raise SystemExit(exit_code(result.stopped))


def main() -> None:
    """Both modes; Ctrl-C outside training (composing, starting, a second Ctrl-C) is one line, 130."""
    try:
        with errors.reporting():
            _main()
    finally:
        # The process ends now. The interpreter's own collections at exit would walk every object
        # torch's modules made (about 1 s on 2 cores, after the last step, in every rank and in the
        # launcher); frozen, they are only freed. The job's garbage was collected when it ended.
        gc.freeze()


def _main() -> None:
    register_configs()
    argv = sys.argv[1:]
    if detect(os.environ).is_worker:
        worker(argv)
        return
    sys.argv = [sys.argv[0], *quote_device_override(argv)]
    _JOBS_STARTED.clear()
    try:
        with _mode_probe_skipped(argv):
            _hydra_main()
    except SystemExit as exc:
        # Hydra says a composition error (unknown key, wrong type, missing group) in its own words
        # and exits 1 before any job starts: that is a user error, exit 2 as in every other mode
        if exc.code == 1 and not _JOBS_STARTED:
            raise SystemExit(EXIT_USER_ERROR) from None
        raise


_JOBS_STARTED: list[int] = []  # how many jobs Hydra started in this call (0: it stopped while composing)

# what lets a config other than conf/'s set hydra.mode: then Hydra's probe is needed
_MODE_SOURCES = ("hydra.mode", "+hydra.mode", "hydra.searchpath", "--config-dir", "-cd", "--config-path", "-cp",
                 "--config-name", "-cn")


@contextmanager
def _mode_probe_skipped(argv: list[str]) -> Iterator[None]:
    """Hydra's @main composes the whole config once only to read `hydra.mode`, then again for the
    run: 0.15-0.2 s of every launch. No file under conf/ sets hydra.mode (tests/test_config.py checks),
    so where the command line neither sets it nor brings other configs, the probe's answer is known:
    unset (None), and Hydra decides by -m as it would. Hydra 1.3's internals (pinned <1.4)."""
    if any(a.split("=", 1)[0] in _MODE_SOURCES for a in argv):
        yield
        return
    from hydra._internal.hydra import Hydra

    probe = Hydra.get_mode
    Hydra.get_mode = lambda self, config_name, overrides: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        Hydra.get_mode = probe  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
