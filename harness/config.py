"""Typed configuration: the schema every YAML file under conf/ is merged onto.

Owns: the dataclasses (one per concern, one home per default, a comment per field), their
registration in Hydra's ConfigStore, composing conf/ with overrides outside Hydra's own `@main`
(`compose`: the one way workers, `harness.profile`, the Slurm scripts and the tests do it; our
launcher's workers are handed its composition instead, `hand_over`), the
cross-field checks (`__post_init__` runs when `to_config` turns a composed DictConfig into these
objects), where conf/ lives, and the small argv fix that lets `device=0,1` reach our device parser
outside multirun. Importing it has no side effects and does not import Hydra or torch.

The user-pluggable parts (model, dataset, loss, metric, optimizer) are `_target_` nodes typed
`Any`: Hydra instantiates them; everything the harness itself reads is typed here.
"""

from __future__ import annotations

import base64
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

BACKENDS = ("auto", "gloo", "nccl")
ON_STALL = ("report", "stop")


class ConfigError(ValueError):
    """A value that passes Hydra's type check but breaks a rule; names the key and what is valid."""


@dataclass
class DataConfig:
    url: str = ""  # the dataset file: file://, http:// or https://; "" = the dataset needs no file
    sha256: str = ""  # expected digest of that file; a file:// source without one is hashed and logged
    root: str = "${oc.env:HARNESS_CACHE,'~/.cache/harness'}"  # cache directory (one per node)
    # several files under the base URL `url`: file name -> sha256; the dataset then gets their directory
    files: dict[str, str] = field(default_factory=dict)
    extract: bool = False  # unpack an archive (.tar, .tar.gz, .tgz, .zip) safely; the dataset gets the directory
    verify: str = "fast"  # fast: a cache hit reads and hashes nothing; full: re-hash cached files on every run
    allow_unverified: bool = False  # accept a remote url without sha256 (nothing is checked; not recommended)
    offline: bool = "${oc.env:HARNESS_OFFLINE,false}"  # type: ignore[assignment]  # cache only, no network
    batch_size: int = 64  # the GLOBAL batch: split over ranks and accumulation micro-steps
    num_workers: int = 0  # DataLoader worker processes per rank
    # called as dataset(path=<verified cached file, or None without url>, split="train" | "val")
    dataset: Any = MISSING

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")
        if self.verify not in ("fast", "full"):
            raise ConfigError(f"data.verify={self.verify!r} is not one of fast, full")
        remote = self.url.startswith(("http://", "https://"))
        unpinned = [name for name, digest in self.files.items() if not digest]
        if remote and not self.allow_unverified and (unpinned or not self.files and not self.sha256):
            what = f"data.files[{unpinned[0]!r}]" if unpinned else "data.sha256"
            raise ConfigError(f"data.url={self.url!r}: {what} is empty; a download must be verified: give the "
                              f"published sha256, or set data.allow_unverified=true")


AMP_MODES = ("off", "bf16", "fp16")
STRATEGIES = ("auto", "ddp", "fsdp")
MONITOR_MODES = ("auto", "max", "min")


@dataclass
class FsdpConfig:
    """`trainer.strategy=fsdp`: FSDP2 (`fully_shard`) on a 1-D device mesh of every rank (harness/fsdp.py)."""

    # module classes sharded as units of their own (their name, e.g. Block, or module.path.Block);
    # [] = by size: every module whose not-yet-sharded parameters reach min_params (FSDP1's size policy)
    wrap: list[str] = field(default_factory=list)
    min_params: int = 1_000_000  # the size policy's threshold, when wrap is []
    reshard_after_forward: bool = True  # true: free gathered parameters after forward (ZeRO-3); false: ZeRO-2

    def __post_init__(self) -> None:
        if self.min_params < 1:
            raise ConfigError(f"trainer.fsdp.min_params={self.min_params} must be >= 1")
LR_SCHEDULES = ("cosine", "constant")
LOGGERS = ("csv", "tensorboard")


@dataclass
class TrainerConfig:
    epochs: int = 10  # passes over the training set
    accumulate: int = 1  # micro-steps per optimizer step (the global batch stays data.batch_size)
    log_every: int = 20  # optimizer steps between loss logs: the only host-device sync in the loop
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    deterministic: bool = False  # torch.use_deterministic_algorithms + no cuDNN benchmark
    amp: str = "off"  # off | bf16 (autocast, CPU or CUDA) | fp16 (CUDA, with a GradScaler)
    lr_schedule: str = "cosine"  # cosine (to min_lr_ratio x lr at the last step) | constant
    warmup_steps: int = 0  # linear warmup from 0 over this many optimizer steps
    min_lr_ratio: float = 0.0  # the cosine schedule's final lr as a fraction of the initial lr
    ema: bool = False  # keep an EMA of the weights (ModelEMA); evaluated and saved
    ema_decay: float = 0.9999  # EMA decay after its ramp
    ema_tau: float = 2000.0  # optimizer steps over which the EMA decay ramps up
    patience: int = 0  # early stopping: epochs without a better `monitor` value; 0 = never stop early
    monitor: str = ""  # the metrics-row key that decides best.pt and early stopping; "" = the val metric
    monitor_mode: str = "auto"  # max | min | auto: min for a key with "loss" in it, else max
    sync_bn: bool = False  # SyncBatchNorm across ranks (CUDA only)
    channels_last: bool = False  # NHWC memory format for 4-D inputs and the model
    compile: bool = False  # torch.compile the model
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager compiles fast, for tests)
    resume: str = "auto"  # auto (the run's newest valid checkpoint) | never | a run dir, step-N entry or file
    save_every_steps: int = 0  # also save every N optimizer steps; 0 = once per epoch
    keep_checkpoints: int = 2  # checkpoints/step-N entries kept: the newest N, plus the best
    preempt_signal: str = "SIGUSR2"  # preemption: save at a step boundary, mark PREEMPTED, exit 0
    check_every: int = 10  # steps between the ranks' agreement on a signal (a pipelined CPU all-reduce)
    progress: bool = True  # tqdm bar on rank 0 (never when stderr is not a terminal)
    logger: str = "csv"  # csv (metrics.csv, always) | tensorboard (also <run>/tensorboard)
    # auto: DDP when world size > 1, the bare module at 1 | ddp: the same | fsdp: shard parameters,
    # gradients and optimizer state over the ranks (FSDP2; sharded checkpoints; also at world size 1)
    strategy: str = "auto"
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)

    def __post_init__(self) -> None:
        for key in ("epochs", "accumulate", "log_every", "check_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key}={getattr(self, key)} must be >= 1")
        for key in ("warmup_steps", "patience", "save_every_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"trainer.{key}={getattr(self, key)} must be >= 0")
        if self.grad_clip < 0:
            raise ConfigError(f"trainer.grad_clip={self.grad_clip} must be >= 0 (0 = off)")
        for key, valid in (("amp", AMP_MODES), ("lr_schedule", LR_SCHEDULES), ("logger", LOGGERS),
                           ("strategy", STRATEGIES), ("monitor_mode", MONITOR_MODES)):
            if getattr(self, key) not in valid:
                raise ConfigError(f"trainer.{key}={getattr(self, key)!r} is not one of {', '.join(valid)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"trainer.ema_decay={self.ema_decay} must be in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"trainer.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        import signal

        if not hasattr(signal, self.preempt_signal) or not self.preempt_signal.startswith("SIG"):
            raise ConfigError(f"trainer.preempt_signal={self.preempt_signal!r} is not a signal name like SIGUSR2")
        if self.preempt_signal in ("SIGKILL", "SIGSTOP", "SIGTERM", "SIGINT"):
            raise ConfigError(f"trainer.preempt_signal={self.preempt_signal} cannot be the preemption signal "
                              "(SIGTERM and SIGINT mean stop without requeue); use SIGUSR2 or SIGUSR1")
        if self.strategy == "fsdp":
            self._check_fsdp()

    def _check_fsdp(self) -> None:
        """What FSDP2 here cannot do, refused at start rather than failing mid-run."""
        if self.sync_bn:
            raise ConfigError("trainer.sync_bn=true with trainer.strategy=fsdp: FSDP shards BatchNorm's "
                              "parameters but not its statistics; use trainer.strategy=ddp for SyncBatchNorm")
        if self.amp == "fp16":
            raise ConfigError("trainer.amp=fp16 with trainer.strategy=fsdp: sharded training here uses bf16 "
                              "(FSDP's mixed-precision policy, no GradScaler); set trainer.amp=bf16 or off")
        if self.channels_last:
            raise ConfigError("trainer.channels_last=true with trainer.strategy=fsdp: FSDP shards convolution "
                              "weights along dim 0 in the default layout; set trainer.channels_last=false")


@dataclass
class DistConfig:
    nproc: int = 0  # processes on this node: 0 = one per GPU id, or 1 on CPU; for CPU runs
    backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU
    timeout: float = 600.0  # seconds a collective may wait before the process group gives up
    max_restarts: int = 0  # times the elastic agent restarts failed workers (launcher mode)
    omp_threads: int = 0  # OMP_NUM_THREADS for workers when unset: 0 = as torchrun (1 if nproc > 1)
    # liveness (world size > 1): every rank's watchdog names a lost or stuck rank on every survivor
    watchdog: bool = True  # false: no heartbeat (dist.timeout is then the only bound on a hung rank)
    dead_after: float = 15.0  # seconds without a heartbeat before a rank is lost (frozen, dead, cut off)
    stall_after: float = 300.0  # seconds a live rank may hold the others up inside a training step
    on_stall: str = "report"  # report (its stack in every survivor's log; keep waiting) | stop (exit 4)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"dist.backend={self.backend!r} is not one of {', '.join(BACKENDS)}")
        for key in ("timeout", "dead_after", "stall_after"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"dist.{key}={getattr(self, key)} must be > 0 seconds")
        if self.on_stall not in ON_STALL:
            raise ConfigError(f"dist.on_stall={self.on_stall!r} is not one of {', '.join(ON_STALL)}")
        for key in ("nproc", "max_restarts", "omp_threads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"dist.{key}={getattr(self, key)} must be >= 0")


@dataclass
class Config:
    device: Any = ""  # '', auto, cpu, cuda, 0, 0,1,2,3, cuda:0 ... (see harness/devices.py)
    seed: int = 0  # same on every rank for the model; data order is seeded from it too
    run_root: str = "runs"  # run directories go to <run_root>/<run id>
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING  # _target_: the nn.Module
    optim: Any = MISSING  # _target_: an optimizer class, called with params=...
    loss: Any = field(default_factory=lambda: {"_target_": "torch.nn.CrossEntropyLoss"})
    metric: Any = field(default_factory=lambda: {"_target_": "harness.metrics.Accuracy"})
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def conf_dir() -> Path:
    """conf/ at the top of a checkout (or editable install); harness/conf inside an installed wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no conf/config.yaml next to {package} or inside it")


def asset_url(name: str) -> str:
    """`${harness.asset:digits.npz}`: the file:// URL of a dataset shipped inside the package."""
    path = Path(__file__).resolve().parent / "data" / "assets" / name
    return path.as_uri()


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore and the resolvers in OmegaConf. Call before composing."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="harness_schema", node=Config)
    if not OmegaConf.has_resolver("harness.asset"):
        OmegaConf.register_new_resolver("harness.asset", asset_url)


def compose(overrides: Sequence[str]) -> DictConfig:
    """conf/config.yaml with `overrides`, as the launcher's Hydra would compose it, without Hydra's run
    directory or logging set-up. Raises ConfigError with Hydra's words (and the cause, which names
    the key) for an unknown key, a wrong type, a missing group option or a bad override."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose("config", overrides=quote_device_override(list(overrides)))
    except (HydraException, OmegaConfBaseException) as exc:
        cause = f"\n{exc.__cause__}" if exc.__cause__ is not None else ""
        raise ConfigError(f"{exc}{cause}") from exc


HANDED = "HARNESS_CONFIG"  # the launcher's composed config, handed to the workers it starts


def hand_over(cfg: DictConfig) -> str:
    """The launcher's composed `cfg` as an environment value for its workers (base64 of a pickle:
    a DictConfig pickles whole, schema, flags and unresolved interpolations alike), so that they skip
    composing it again: 0.07-0.2 s of every worker's start-up. A few KB."""
    return base64.b64encode(pickle.dumps(cfg)).decode()


def handed(environ: Mapping[str, str]) -> DictConfig | None:
    """The config our own launcher handed this worker (hand_over); None when started otherwise
    (torchrun, srun), where the worker composes its overrides itself."""
    value = environ.get(HANDED)
    if not value or environ.get("HARNESS_LAUNCHED") != "1":
        return None
    cfg = pickle.loads(base64.b64decode(value))  # set by our launcher, in this process's own environment
    assert isinstance(cfg, DictConfig), type(cfg)
    return cfg


def to_config(cfg: DictConfig) -> Config:
    """Resolve and validate a composed config: runs every `__post_init__` check."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config), type(obj)
    return obj


_SWEEP_FLAGS = ("-m", "--multirun")


def quote_device_override(argv: list[str]) -> list[str]:
    """`device=0,1` is a sweep to Hydra (and an error outside -m); quote it so it stays one string.

    Leaves multirun command lines alone (there `device=0,1` IS a sweep over two runs), and leaves
    already quoted or bracketed values (`device='0,1'`, `device=[0,1]`) as they are.
    """
    if any(a in _SWEEP_FLAGS for a in argv):
        return list(argv)
    out = []
    for arg in argv:
        m = re.fullmatch(r"(\+{0,2}device)=(.*)", arg, flags=re.S)
        if m and "," in m.group(2) and m.group(2)[:1] not in ("'", '"', "["):
            arg = f"{m.group(1)}='{m.group(2)}'"
        out.append(arg)
    return out
