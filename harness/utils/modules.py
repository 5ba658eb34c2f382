"""Small helpers that walk or unwrap models and tensors: YOLOv5's initialize_weights, find_modules,
scale_img, de_parallel, copy_attr, smart_inference_mode. Fusion is in fuse.py, EMA in ema.py."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

Fn = TypeVar("Fn", bound=Callable[..., Any])

PAD_VALUE = 0.447  # YOLOv5's fill for scale_img: the ImageNet mean, so padding looks like "average image"
_INPLACE_ACTIVATIONS = (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU)


def smart_inference_mode(torch_1_9: bool = True) -> Callable[[Fn], Fn]:
    """Decorator: `torch.inference_mode` (`torch.no_grad` when asked for torch < 1.9's behaviour)."""

    def decorate(fn: Fn) -> Fn:
        return (torch.inference_mode if torch_1_9 else torch.no_grad)()(fn)

    return decorate


def require_whole(model: nn.Module, what: str) -> None:
    """Refuse a sharded model (FSDP: DTensor parameters) in `what`, which needs every weight whole."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise TypeError(f"{what} needs the whole model, and this {type(model).__name__} is sharded "
                        f"(trainer.strategy=fsdp): export the checkpoint (python -m harness.checkpoint export RUN "
                        f"model.pt) and load it into a plain model")


def is_parallel(model: nn.Module) -> bool:
    """True for DataParallel and DistributedDataParallel wrappers."""
    return isinstance(model, (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel))


def de_parallel(model: nn.Module) -> nn.Module:
    """The model inside DataParallel / DistributedDataParallel / torch.compile wrappers (any nesting)."""
    while True:
        inner = getattr(model, "module", None) if is_parallel(model) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):  # inner: of a DDP / DataParallel wrapper, or torch.compile's
            return model
        model = inner


def copy_attr(a: object, b: object, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> None:
    """Copy b's public instance attributes to a (only `include` if given, never `exclude`)."""
    include, exclude = tuple(include), tuple(exclude)
    for k, v in b.__dict__.items():
        if (include and k not in include) or k.startswith("_") or k in exclude:
            continue
        setattr(a, k, v)


def initialize_weights(model: nn.Module) -> None:
    """YOLOv5's defaults: BatchNorm eps 1e-3 and momentum 0.03, in-place activations.

    Conv and Linear weights keep torch's own initialisation, as in YOLOv5."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = 1e-3
            m.momentum = 0.03
        elif isinstance(m, _INPLACE_ACTIVATIONS):
            m.inplace = True


def find_modules(model: nn.Module, mclass: type | tuple[type, ...] = nn.Conv2d) -> list[int]:
    """Indices of the layers that are `mclass` instances: in `model.module_list` when the model has one
    (YOLOv3/Darknet), else in `model.modules()` order."""
    layers = getattr(model, "module_list", None)
    layers = list(layers.children()) if isinstance(layers, nn.Module) else list(model.modules())
    return [i for i, m in enumerate(layers) if isinstance(m, mclass)]


def scale_img(img: torch.Tensor, ratio: float = 1.0, same_shape: bool = False, gs: int = 32) -> torch.Tensor:
    """Resize a batch (N, C, H, W) by `ratio`, then pad with 0.447 at the bottom and right: back to
    (H, W) if `same_shape`, else up to the next multiple of the grid size `gs`."""
    if ratio == 1.0:
        return img
    h, w = img.shape[2:]
    s = (int(h * ratio), int(w * ratio))
    img = F.interpolate(img, size=s, mode="bilinear", align_corners=False)
    if not same_shape:
        h, w = (math.ceil(x * ratio / gs) * gs for x in (h, w))
    return F.pad(img, [0, w - s[1], 0, h - s[0]], value=PAD_VALUE)
