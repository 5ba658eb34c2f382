"""The training loop.

Owns: wrapping (SyncBN, channels_last, the strategy's wrapper, torch.compile), the step loop
(AMP, accumulation with `no_sync` on the non-final micro-steps, clipping, the lr schedule, EMA),
exact evaluation over ranks, early stopping, the per-epoch metrics row, when to save (every epoch and
every `save_every_steps`) and which parts a checkpoint holds, and stopping at a step boundary on
preemption. What a checkpoint looks like, where it goes and how resume picks one is harness.checkpoint's;
what differs between replicated and sharded models is harness.strategy's; evaluation is harness.evaluate's.
It knows nothing of Hydra or of how the process was started.

No host-device sync in the step loop except at `trainer.log_every` steps (fp16's GradScaler is the
documented exception): losses accumulate on the device. The signal check every `check_every` steps
is a CPU all-reduce of a flag, not a device sync.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sized
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from harness import checkpoint, preempt, watchdog
from harness import dist as hdist
from harness.batching import BatchPlan
from harness.config import ConfigError, TrainerConfig
from harness.data.sampler import GlobalBatchSampler, ShardSampler
from harness.evaluate import Metric, evaluate, sync_buffers, to_device, weights_digest
from harness.health import BACKWARD, DATA, EVAL, FORWARD, OPTIM, SAVE
from harness.logs import MetricsWriter, get_logger
from harness.plots import Plotter
from harness.schedule import build_scheduler
from harness.strategy import Strategy, choose
from harness.utils.early_stopping import EarlyStopping

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class FitResult:
    epochs: int = 0
    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    digest: str = ""
    stopped: str = ""  # "" (finished), "early" (early stopping), "preempted", "terminated"

    @property
    def last(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


_NO_CONTEXT = nullcontext()  # reusable: the step loop makes no context object when there is nothing to enter


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("trainer.logger=tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _size(dataset: Dataset) -> int:
    """A map-style dataset's length (torch's Dataset type does not declare __len__; ours all have it)."""
    return len(cast(Sized, dataset))


def check_trainer(trainer: TrainerConfig, device: torch.device) -> None:
    """Options that need hardware this process does not have fail here, naming the key."""
    if trainer.amp == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.amp=fp16 needs CUDA (its GradScaler); on the CPU use trainer.amp=bf16 or off")
    if trainer.sync_bn and device.type != "cuda":
        raise ConfigError("trainer.sync_bn=true needs CUDA (SyncBatchNorm has no CPU kernel); set it to false")


class _Progress:
    """The loop's counters as the checkpoint's `progress` part (its keys: checkpoint.format.PROGRESS_KEYS)."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop

    def state_dict(self) -> dict[str, Any]:
        lp = self.loop
        return {"epoch": lp.epoch, "step_in_epoch": lp.step_in_epoch, "step": lp.global_step,
                "epoch_loss": lp.epoch_loss, "best": lp.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lp = self.loop
        lp.epoch, lp.step_in_epoch, lp.global_step = state["epoch"], state["step_in_epoch"], state["step"]
        lp.epoch_loss, lp.best = state["epoch_loss"], state["best"]


class Loop:
    """One fit: holds the wrapped model, optimizer, schedule, scaler, EMA, samplers and counters."""

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, metric: Metric,
                 train_set: Dataset, val_set: Dataset, batch: BatchPlan, trainer: TrainerConfig,
                 device: torch.device, run_dir: Path | None, seed: int, num_workers: int, config_yaml: str,
                 strategy: Strategy | None = None) -> None:
        check_trainer(trainer, device)
        self.log = get_logger()
        self.rank, self.world = hdist.rank(), hdist.world_size()
        self.strategy = strategy or choose(trainer.strategy, self.world, trainer.fsdp, trainer.amp)
        self.t, self.batch, self.device, self.run_dir, self.config_yaml = trainer, batch, device, run_dir, config_yaml
        self.loss_fn, self.metric = loss_fn, metric
        self.metric_name = getattr(metric, "name", "metric")
        cuda = device.type == "cuda"
        if trainer.sync_bn and self.world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if trainer.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model = model  # the bare (or sharded) module: what is evaluated, saved and digested
        self.forward: nn.Module = self.strategy.wrap(model, device)
        wrapped = self.forward  # what no_sync acts on (not the compiled wrapper)
        self.no_sync = lambda: self.strategy.no_sync(wrapped)  # noqa: E731 (a fresh context per micro-step)
        if trainer.compile:
            self.forward = torch.compile(self.forward, backend=trainer.compile_backend)  # type: ignore[assignment]
        self.optimizer = optimizer
        self.ema = self.strategy.ema(model, trainer.ema_decay, trainer.ema_tau) if trainer.ema else None
        self.monitor, self.maximize = _monitor(trainer, self.metric_name)
        self.stopper = EarlyStopping(patience=trainer.patience, mode="max" if self.maximize else "min") \
            if trainer.patience else None
        amp = AMP_DTYPES.get(trainer.amp)
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else (lambda: _NO_CONTEXT)
        self.fp16 = trainer.amp == "fp16"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.fp16)

        self.sampler = GlobalBatchSampler(_size(train_set), batch.global_batch, rank=self.rank, world_size=self.world,
                                          seed=seed)
        self.loader = DataLoader(train_set, batch_sampler=self.sampler, num_workers=num_workers, pin_memory=cuda,
                                 persistent_workers=num_workers > 0)
        # sharded: every rank runs as many forwards (each is a collective), the short shards padded
        shard = ShardSampler(_size(val_set), rank=self.rank, world_size=self.world, pad=self.strategy.sharded)
        self.val_loader = DataLoader(val_set, sampler=shard, batch_size=max(batch.per_rank, 1),
                                     num_workers=num_workers, pin_memory=cuda)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.scheduler = build_scheduler(optimizer, total=trainer.epochs * self.steps_per_epoch,
                                         warmup=trainer.warmup_steps, kind=trainer.lr_schedule,
                                         min_ratio=trainer.min_lr_ratio)
        if run_dir is not None and self.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsWriter(run_dir / "metrics.csv") if run_dir is not None and self.rank == 0 else None
        self.plotter = Plotter(self.metrics.path, run_dir / "results.png") if self.metrics is not None \
            and run_dir is not None else None
        self.board = _tensorboard(run_dir) if trainer.logger == "tensorboard" and run_dir is not None \
            and self.rank == 0 else None
        # progress: where training stands; all of it goes into checkpoints
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.epoch_loss = 0.0  # this epoch's summed loss over the steps already taken (all ranks)
        self.epoch_seconds = 0.0  # wall time of the last train_epoch
        self.best = float("-inf") if self.maximize else float("inf")  # the best `monitor` value so far
        self.result = FitResult()
        self.pending_rng: dict[str, Any] | None = None
        self.progress = watchdog.progress()  # where this rank is, for the liveness watchdog: set, never read
        self.rng = checkpoint.RankStreams(self.rank, self.world)
        self.checkpointer = self._checkpointer()
        self.log.info(f"data: {_size(train_set)} train / {_size(val_set)} val samples; {batch.describe()}; "
                      f"{self.steps_per_epoch} steps per epoch")

    # ---------------------------------------------------------------- checkpoints
    def _checkpointer(self) -> checkpoint.Checkpointer:
        """The parts this run saves and restores, each with its own state_dict / load_state_dict."""
        parts: dict[str, checkpoint.Stateful] = {
            **self.strategy.parts(self.model, self.optimizer), "scheduler": self.scheduler, "scaler": self.scaler,
            "sampler": self.sampler, "progress": _Progress(self), "rng": self.rng}
        if self.ema:
            parts["ema"] = self.ema
        if self.stopper:
            parts["early_stopping"] = self.stopper
        directory = self.run_dir / "checkpoints" if self.run_dir is not None else None
        return checkpoint.Checkpointer(parts, directory=directory, rank=self.rank, world_size=self.world,
                                       keep=self.t.keep_checkpoints, config=self.config_yaml, device=self.device,
                                       sharded=("model", "optimizer", "ema") if self.strategy.sharded else ())

    def save(self, best: bool = False, synced: bool = False) -> None:
        """Every rank calls this (RNG states are gathered); rank 0 writes (and every rank its shards,
        under fsdp). Never inside a micro-step. `synced`: the buffers are rank 0's already."""
        self.progress.phase = SAVE
        if not synced:  # a sharded save may write any rank's copy of a buffer: make them all rank 0's
            sync_buffers(self.model)
        self.checkpointer.save(best=best, metrics=self.result.last)

    def resume(self) -> None:
        path = self.checkpointer.restore(self.t.resume)
        # The uninterrupted run had drawn this epoch's DataLoader seed from the generators before a
        # mid-epoch save, and not yet before a save between epochs: restore them on the same side of it
        if self.rng.pending is not None and self.step_in_epoch == 0:
            checkpoint.set_rng_state(self.rng.pending)
        else:
            self.pending_rng = self.rng.pending  # train_epoch restores it once the iterator exists
        self.result.steps = self.global_step
        if self.rank == 0 and self.run_dir is not None:
            preempt.clear_marker(self.run_dir)
            if self.metrics is not None:
                self.metrics.truncate(after_epoch=self.epoch)  # this run writes the epochs after it
        if path is not None:
            self.log.info(f"resumed from {path} at epoch {self.epoch + 1} step {self.global_step} "
                          f"({self.step_in_epoch}/{self.steps_per_epoch} of the epoch done)")

    # ---------------------------------------------------------------- the loop
    def run(self) -> FitResult:
        try:
            return self._run()
        finally:
            if self.plotter is not None:
                self.plotter.close()  # the last epoch's drawing, under way since end_epoch
            if self.board is not None:
                self.board.close()

    def _run(self) -> FitResult:
        self.resume()
        self.progress.first = self.progress.step = self.global_step  # the watchdog never calls step 1 a stall
        with preempt.SignalWatch(self.t.preempt_signal, self.t.check_every) as signals:
            while self.epoch < self.t.epochs:
                code = self.train_epoch(signals)
                if code:
                    return self._stop(code, signals)
                if self.end_epoch():
                    self.result.stopped = "early"
                    break
        self.result.epochs = self.epoch
        self.result.digest = weights_digest(self.model)
        self.log.info(f"final weights digest {self.result.digest} (rank {self.rank})")
        return self.result

    def _stop(self, code: int, signals: preempt.SignalWatch) -> FitResult:
        what = preempt.STOPPED[code]
        self.save()
        if self.rank == 0 and self.run_dir is not None and code == preempt.PREEMPT:
            preempt.write_marker(self.run_dir, f"epoch {self.epoch + 1} step {self.global_step}\n")
        signals.barrier()  # nobody exits before rank 0 has written
        # rank 0 says it; the others only into their own logs (a console line per rank is the noise we avoid)
        (self.log.warning if self.rank == 0 else self.log.info)(
            f"{what}: saved at epoch {self.epoch + 1} step {self.global_step}; "
            f"{'requeue to resume' if code == preempt.PREEMPT else 'not requeued'}"
            f"{' (the same run id resumes it)' if code == preempt.INTERRUPT else ''}")
        self.result.epochs, self.result.stopped = self.epoch, what
        return self.result

    def train_epoch(self, signals: preempt.SignalWatch) -> int:
        """Steps to the end of the epoch; returns a signal code if the ranks agreed to stop early."""
        t, acc = self.t, self.batch.accumulate
        self.sampler.set_epoch(self.epoch, start_step=self.step_in_epoch)
        self.forward.train()
        batches = iter(self.loader)
        if self.pending_rng is not None:  # after the iterator drew its seed, as the uninterrupted run did
            checkpoint.set_rng_state(self.pending_rng)
            self.pending_rng = None
        bar = self._progress()
        window = torch.zeros((), device=self.device)
        epoch_sum = torch.zeros((), device=self.device)
        t0 = time.perf_counter()
        code = preempt.NONE
        progress = self.progress  # phases are constants: attribute stores, nothing else, in the hot path
        progress.phase = DATA
        for x, y in batches:
            x, y = to_device(x, self.device, t.channels_last), y.to(self.device, non_blocking=True)
            # without accumulation, no chunk and no division: 4 tensor ops a step, ~6% of a tiny model's step
            micro = ((x, y),) if acc == 1 else zip(x.chunk(acc), y.chunk(acc), strict=True)
            for i, (xm, ym) in enumerate(micro):
                progress.phase = FORWARD
                with _NO_CONTEXT if i == acc - 1 else self.no_sync():
                    with self.autocast():
                        loss = self.loss_fn(self.forward(xm), ym)
                        if acc > 1:
                            loss = loss / acc
                    progress.phase = BACKWARD
                    (self.scaler.scale(loss) if self.fp16 else loss).backward()
                window += loss.detach()
            progress.phase = OPTIM
            if t.grad_clip > 0:
                if self.fp16:
                    self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            if self.fp16:  # the scaler's calls cost a tiny model ~2% a step even when disabled
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            if self.ema:
                self.ema.update(self.model)
            self.step_in_epoch += 1
            self.global_step += 1
            self.result.steps = progress.step = self.global_step
            if bar is not None:
                bar.update(1)
            if self.global_step % t.log_every == 0:
                epoch_sum += window
                self.log.info(f"epoch {self.epoch + 1}/{t.epochs} step {self.global_step} "
                              f"loss {window.item() / t.log_every:.4f}")  # the logging sync
                window.zero_()
            if t.save_every_steps and self.global_step % t.save_every_steps == 0:
                self._fold_loss(epoch_sum + window)
                epoch_sum.zero_()
                window.zero_()
                self.save()
            code = signals.agreed(self.global_step)
            if code:
                break
            progress.phase = DATA
        progress.phase = EVAL  # the epoch's bookkeeping and evaluation: never a stall
        if bar is not None:
            bar.close()
        self._fold_loss(epoch_sum + window)
        if code:
            return code
        self.epoch_seconds = time.perf_counter() - t0
        return preempt.NONE

    def _fold_loss(self, local: torch.Tensor) -> None:
        """Add this stretch's loss, summed over ranks, to the epoch's running total (a sync: rare)."""
        self.epoch_loss += hdist.all_reduce_sum(local.detach().double().clone()).item()

    def _progress(self) -> Any:
        if not (self.t.progress and self.rank == 0 and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}",
                    leave=False, file=sys.stderr)

    def end_epoch(self) -> bool:
        """Evaluate, record, save; True when early stopping says stop (the same on every rank)."""
        sync_buffers(self.model)
        with self.ema.evaluated(self.model) if self.ema else nullcontext(self.model) as evaluated:
            val = evaluate(evaluated, self.val_loader, self.loss_fn, self.metric, self.device, self.autocast,
                           self.t.channels_last)
        steps = self.steps_per_epoch
        seconds = self.epoch_seconds
        values = (self.epoch + 1, self.global_step, self.epoch_loss / (steps * self.world), val["val_loss"],
                  val["val_metric"], int(val["val_samples"]), self.optimizer.param_groups[0]["lr"], seconds,
                  steps * self.batch.global_batch / max(seconds, 1e-9))
        row = dict(zip(row_keys(self.metric_name), values, strict=True))
        self.result.history.append(row)
        self.log.info(f"epoch {self.epoch + 1}/{self.t.epochs}: train_loss {row['train_loss']:.4f} "
                      f"val_loss {val['val_loss']:.4f} val_{self.metric_name} {val['val_metric']:.4f} "
                      f"({int(val['val_samples'])} samples) {seconds:.2f}s")
        value = row[self.monitor]
        improved = value > self.best if self.maximize else value < self.best
        self.best = max(self.best, value) if self.maximize else min(self.best, value)
        stop = self.stopper(self.epoch + 1, value) if self.stopper else False
        self.epoch, self.step_in_epoch, self.epoch_loss = self.epoch + 1, 0, 0.0
        if self.metrics is not None:
            self.metrics.write(row)
        if self.plotter is not None:
            self.plotter.update()
        if self.board is not None:
            for key, value in row.items():
                if key not in ("epoch", "step"):
                    self.board.add_scalar(key, value, global_step=row["epoch"])
            self.board.flush()
        self.save(best=improved, synced=True)  # since evaluation, which changes no buffer
        return stop


def row_keys(metric_name: str) -> tuple[str, ...]:
    """The keys of the per-epoch metrics row (`Loop.end_epoch` builds it in this order)."""
    return ("epoch", "step", "train_loss", "val_loss", f"val_{metric_name}", "val_samples", "lr", "epoch_time",
            "samples_per_s")


def _monitor(trainer: TrainerConfig, metric_name: str) -> tuple[str, bool]:
    """trainer.monitor (checked against the row's keys) and whether higher is better."""
    keys = row_keys(metric_name)
    monitor = trainer.monitor or f"val_{metric_name}"
    if monitor not in keys:
        raise ConfigError(f"trainer.monitor={monitor!r} is not a key of the metrics row; the keys: {', '.join(keys)}")
    if trainer.monitor_mode == "auto":
        return monitor, "loss" not in monitor
    return monitor, trainer.monitor_mode == "max"


def fit(*, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, metric: Metric,
        train_set: Dataset, val_set: Dataset, batch: BatchPlan, trainer: TrainerConfig, device: torch.device,
        run_dir: Path | None = None, seed: int = 0, num_workers: int = 0, config_yaml: str = "",
        strategy: Strategy | None = None) -> FitResult:
    """Train for `trainer.epochs` epochs (resuming per `trainer.resume`); rank 0 writes under `run_dir`.
    `strategy`: the one the model was built with (harness.strategy.choose); else trainer.strategy's."""
    loop = Loop(model=model, optimizer=optimizer, loss_fn=loss_fn, metric=metric, train_set=train_set,
                val_set=val_set, batch=batch, trainer=trainer, device=device, run_dir=run_dir, seed=seed,
                num_workers=num_workers, config_yaml=config_yaml, strategy=strategy)
    return loop.run()
