"""One training job in one process: composed config -> session -> data, model, optimizer -> fit.

Owns the step from configuration to objects: fetching the dataset inside `zero_first`, and
instantiating the user-pluggable `_target_` parts (dataset, model, optimizer, loss, metric).
The same function runs in a launcher that trains in-process, in each worker our launcher starts,
and in each worker started by torchrun or srun.
"""

from __future__ import annotations

import gc
import os

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from harness import engine, rundir, strategy, watchdog
from harness.batching import plan_batch
from harness.config import to_config
from harness.data.cache import fetch_configured
from harness.env import detect
from harness.logs import get_logger
from harness.runtime import seed_everything, session
from harness.zero_first import zero_first


def run_job(cfg: DictConfig, *, run_id: str | None = None) -> engine.FitResult:
    """Train the job `cfg` describes, as this process's rank; raises on any failure."""
    # What exists now (torch's and the libraries' modules: some 300,000 objects) lives as long as the
    # process: no collection during the job walks it again (a full one took 0.2 s), and the job's own
    # garbage below is found in milliseconds. torch._dynamo is among it: the first optimizer step
    # imports it anyway (0.06 s to walk at the end if it came after the freeze)
    import torch._dynamo  # noqa: F401

    gc.freeze()
    try:
        return _train(cfg, run_id)
    finally:
        # The model's wrappers can sit in reference cycles that hold the destroyed process group (FSDP's
        # hooks do): left to the interpreter's exit, gloo's destructor runs half torn down
        # and aborts the process ("terminate called without an active exception": fsdp once in ~20 runs,
        # a 4-rank ddp job on two Slurm nodes once in CI while this collection was fsdp-only); collect
        # them now, while everything is alive
        gc.collect()
        gc.unfreeze()  # a second job in this process starts as the first did


def _train(cfg: DictConfig, run_id: str | None) -> engine.FitResult:
    c = to_config(cfg)
    plan_batch(c.data.batch_size, detect(os.environ).world_size, c.trainer.accumulate)  # before any file is made
    liveness = watchdog.WatchdogConfig(c.dist.dead_after, c.dist.stall_after, c.dist.on_stall) \
        if c.dist.watchdog else None
    with session(device=c.device, backend=c.dist.backend, timeout_s=c.dist.timeout, run_root=c.run_root,
                 run_id_override=run_id, deterministic=c.trainer.deterministic, liveness=liveness) as s:
        log = get_logger()
        batch = plan_batch(c.data.batch_size, s.world_size, c.trainer.accumulate)
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        if s.is_master:
            rundir.write_config(s.run_dir, config_yaml)
        with zero_first("data"):
            path = fetch_configured(c.data, progress=s.env.local_rank == 0)
        if path is not None:
            log.info(f"dataset {c.data.url} -> {path}")
        with zero_first("dataset"):  # a dataset may cache derived files of its own on first use
            train_set = instantiate(cfg.data.dataset, path=path, split="train")
            val_set = instantiate(cfg.data.dataset, path=path, split="val")

        how = strategy.choose(c.trainer.strategy, s.world_size, c.trainer.fsdp, c.trainer.amp)
        seed_everything(c.seed)  # the same initial weights on every rank, and for every strategy
        model = how.build(lambda: instantiate(cfg.model), s.device)
        optimizer = instantiate(cfg.optim, params=model.parameters())
        loss_fn = instantiate(cfg.loss)
        metric = instantiate(cfg.metric)
        seed_everything(c.seed + s.rank)  # per-rank randomness (augmentation, dropout) differs
        return engine.fit(model=model, optimizer=optimizer, loss_fn=loss_fn, metric=metric,
                          train_set=train_set, val_set=val_set, batch=batch, trainer=c.trainer,
                          device=s.device, run_dir=s.run_dir, seed=c.seed, num_workers=c.data.num_workers,
                          config_yaml=config_yaml, strategy=how)

