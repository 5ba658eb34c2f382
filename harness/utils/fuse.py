"""Conv + BatchNorm folding for inference: `fuse_conv_and_bn` for one pair, `fuse_model` for a model.

BatchNorm in eval mode is an affine map per output channel, y = (x - mean) / sqrt(var + eps) * gamma
+ beta, so it folds into the preceding convolution's weight and bias. The fused layer equals
conv -> bn in eval mode only; a fused model is for inference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from harness.utils.modules import require_whole

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BatchNorm = nn.modules.batchnorm._BatchNorm


def fuse_conv_and_bn(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, bn: _BatchNorm) -> nn.Module:
    """One convolution (any stride, padding, padding mode, dilation, groups; with or without bias)
    equal to `bn(conv(x))` with `bn` in eval mode. Folded in float64, stored in the conv's dtype."""
    if not isinstance(conv, _CONVS) or not isinstance(bn, _BatchNorm):
        raise TypeError(f"fuse_conv_and_bn needs a Conv1d/2d/3d and a BatchNorm, got "
                        f"{type(conv).__name__} and {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fuse a BatchNorm without running statistics (track_running_stats=False): "
                         "in eval mode it still normalises with batch statistics")
    require_whole(conv, "fuse_conv_and_bn")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"BatchNorm has {bn.num_features} features but the conv {conv.out_channels} outputs")
    w = conv.weight
    shape: dict[str, Any] = {"kernel_size": conv.kernel_size, "stride": conv.stride, "padding": conv.padding,
                             "dilation": conv.dilation}  # tuples of the conv's own dimension
    fused = type(conv)(conv.in_channels, conv.out_channels, **shape,
                       groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
                       device=w.device, dtype=w.dtype).requires_grad_(False)
    with torch.no_grad():
        f64 = torch.float64
        mean, var = bn.running_mean.to(f64), bn.running_var.to(f64)
        gamma = bn.weight.to(f64) if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.to(f64) if bn.bias is not None else torch.zeros_like(var)
        scale = gamma / torch.sqrt(var + bn.eps)
        b_conv = conv.bias.to(f64) if conv.bias is not None else torch.zeros_like(var)
        fused.weight.copy_((w.to(f64) * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
        assert fused.bias is not None  # made with bias=True
        fused.bias.copy_(((b_conv - mean) * scale + beta).to(w.dtype))
    return fused


def _pairs_in_sequence(seq: nn.Sequential) -> list[tuple[str, str]]:
    names = list(seq._modules)
    return [(a, b) for a, b in zip(names, names[1:], strict=False)
            if isinstance(seq._modules[a], _CONVS) and isinstance(seq._modules[b], _BatchNorm)]


def fuse_model(model: nn.Module) -> nn.Module:
    """Fold every Conv-BN pair of `model` in place, for inference; returns the model.

    Found in two shapes, the ones where the data flow is certain:
    - inside an `nn.Sequential`, a conv directly followed by a BatchNorm (the BN becomes Identity);
    - YOLOv5's convention, a module with `conv`, `bn` and `forward_fuse` (it loses `bn` and its
      forward becomes `forward_fuse`).
    A conv whose output also feeds something else in between is never touched.
    """
    require_whole(model, "fuse_model")
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            for conv_name, bn_name in _pairs_in_sequence(module):
                conv, bn = module._modules[conv_name], module._modules[bn_name]
                assert isinstance(conv, _CONVS) and isinstance(bn, _BatchNorm)  # _pairs_in_sequence chose them
                module._modules[conv_name] = fuse_conv_and_bn(conv, bn)
                module._modules[bn_name] = nn.Identity()
        elif (isinstance(getattr(module, "conv", None), _CONVS)
              and isinstance(getattr(module, "bn", None), _BatchNorm)
              and callable(getattr(module, "forward_fuse", None))):
            module.conv = fuse_conv_and_bn(module.conv, module.bn)  # type: ignore[arg-type]  # checked above
            delattr(module, "bn")
            module.forward = module.forward_fuse  # type: ignore[assignment]  # YOLOv5's convention
    return model
