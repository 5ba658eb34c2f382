"""`python -m harness.profile [options] [overrides]`: what the configured model costs per step.

Composes the same config as `python -m harness.train` (same overrides: `model=mlp`, `device=cpu`,
`data.batch_size=128`), builds the model, and prints `model_info` and a `profile` row for one
forward/backward on one device at the per-device micro-batch training would use. The input is real
samples from the configured dataset, or random ones of `--shape C,H,W` (then no data is fetched).

    python -m harness.profile                       # the default job
    python -m harness.profile model=mlp -n 50 --verbose
    python -m harness.profile --shape 3,224,224 --batch 32 model=...
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from harness import errors
from harness.batching import plan_batch
from harness.config import ConfigError, compose, to_config
from harness.devices import count_visible_gpus, parse_device, plan_devices
from harness.utils.torch_utils import model_info, profile, select_device

EXIT_USER_ERROR = errors.EXIT_USER_ERROR


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,8,8 or 3x224x224 "
                                         "(one sample, no batch dimension)")
    return dims


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for harness.train (model=mlp ...)")
    p.add_argument("--shape", type=_shape, help="one sample's shape, e.g. 3,224,224 (default: the dataset's)")
    p.add_argument("--batch", type=int, help="samples per forward (default: the per-device micro-batch)")
    p.add_argument("-n", type=int, default=10, help="timed forward/backward passes (default 10)")
    p.add_argument("--verbose", action="store_true", help="also print the per-parameter table")
    return p.parse_args(argv)


def _micro_batch(cfg: DictConfig) -> int:
    """Samples one device sees per forward in training: global batch / (processes x accumulation)."""
    c = to_config(cfg)
    plan = plan_devices(parse_device(c.device), visible_gpus=count_visible_gpus(), nproc=c.dist.nproc,
                        current_mask=os.environ.get("CUDA_VISIBLE_DEVICES"), raw=c.device)
    return plan_batch(c.data.batch_size, plan.nproc, c.trainer.accumulate).micro


def _inputs(cfg: DictConfig, batch: int, shape: tuple[int, ...] | None) -> torch.Tensor:
    if shape is not None:
        return torch.randn(batch, *shape)
    from harness.data.cache import fetch_configured

    path = fetch_configured(to_config(cfg).data)
    dataset = instantiate(cfg.data.dataset, path=path, split="val")
    return torch.stack([dataset[i % len(dataset)][0] for i in range(batch)])


@errors.entry_point()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = compose(args.overrides)
    batch = args.batch or _micro_batch(cfg)
    if batch < 1:
        raise ConfigError(f"--batch={batch} must be >= 1")
    device = select_device(to_config(cfg).device)
    torch.manual_seed(to_config(cfg).seed)
    model = instantiate(cfg.model).to(device)
    x = _inputs(cfg, batch, args.shape)
    model_info(model, verbose=args.verbose, img_size=list(x.shape[-2:]), input_shape=(1, *x.shape[1:]))
    rows = profile(x, [model], n=args.n, device=device)
    return 0 if rows[0] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
