"""Classifiers with n outputs: `reshape_classifier_output` swaps the output layer of a torchvision-style
model, `load_classifier` builds one, loads local weights and reshapes it.

Nothing here downloads: pretrained weights come only from a local state-dict file, and torchvision
is imported only when a bare torchvision model name is asked for.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def _last_of(seq: nn.Sequential, kind: type[nn.Module]) -> int | None:
    idx = [i for i, m in enumerate(seq) if isinstance(m, kind)]
    return idx[-1] if idx else None


def _new_head(old: nn.Module, n: int) -> nn.Module:
    w = old.weight
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, n, bias=old.bias is not None, device=w.device, dtype=w.dtype)
    assert isinstance(old, nn.Conv2d)
    return nn.Conv2d(old.in_channels, n, old.kernel_size, old.stride,  # type: ignore[arg-type]  # (int, int)
                     bias=old.bias is not None,
                     device=w.device, dtype=w.dtype)


def _find_head(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(parent, attribute name) of the output layer, in torchvision's layouts, most specific first."""
    for attr in ("fc", "classifier", "head"):
        m = getattr(model, attr, None)
        if isinstance(m, nn.Linear):  # ResNet, Inception, GoogLeNet (fc); DenseNet (classifier)
            return model, attr
        if isinstance(m, nn.Sequential):  # VGG, AlexNet, MobileNet, EfficientNet; SqueezeNet's Conv2d
            for kind in (nn.Linear, nn.Conv2d):
                i = _last_of(m, kind)
                if i is not None:
                    return m, str(i)
    last = None
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                last = (parent, name)
    return last


def reshape_classifier_output(model: nn.Module, n: int = 1000) -> nn.Module | None:
    """Give `model` n outputs by replacing its output layer (a final `fc`, the last Linear or Conv2d of a
    `classifier`/`head` Sequential, else the last Linear in the model) with a freshly initialised one.

    Returns the new layer, or None when the layer already had n outputs and was kept.
    """
    if n < 1:
        raise ValueError(f"a classifier needs n >= 1 classes, got {n}")
    found = _find_head(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no output layer to reshape "
                         "(no fc, classifier, or Linear)")
    parent, name = found
    old = parent._modules[name]
    assert old is not None
    out = old.out_features if isinstance(old, nn.Linear) else old.out_channels
    if out == n:
        return None
    new = _new_head(old, n)
    parent._modules[name] = new
    return new


def _constructor(name: str | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    if callable(name):
        return name
    if ":" in name or "." in name:  # 'package.module:Class' or 'package.module.Class'
        module, _, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
        return getattr(importlib.import_module(module), attr)
    try:
        import torchvision  # only for bare torchvision names; everything else works without it
    except ImportError as exc:
        raise ImportError(f"load_classifier({name!r}): a bare model name means torchvision.models.{name}, "
                          "but torchvision is not installed; pass a class, a callable, "
                          "or 'module:Class'") from exc
    return getattr(torchvision.models, name)


def load_classifier(
    name: str | nn.Module | Callable[[], nn.Module] = "resnet101",
    n: int = 2,
    weights: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """A classifier with n outputs: `name` is a model, a class or callable (called with no arguments,
    so torchvision builds it without weights), 'module:Class', or a torchvision model name.

    `weights` is a local state-dict file for the model as built (e.g. 1000 ImageNet classes); it is
    loaded before the output layer is reshaped. The new output layer starts at zero, as in YOLOv5.
    """
    if weights is not None and "://" in str(weights):
        raise ValueError(f"weights={str(weights)!r}: load_classifier never downloads; "
                         "download the state dict once and pass its local path")
    model = name if isinstance(name, nn.Module) else _constructor(name)()
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights={str(weights)!r}: no such file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        model.load_state_dict(state)
    head = reshape_classifier_output(model, n)
    if head is not None:
        with torch.no_grad():
            for p in head.parameters():
                p.zero_()
    return model
